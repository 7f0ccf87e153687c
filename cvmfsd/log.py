"""structlog, configured once for the whole process.

Logs go to stderr: the pilot's stdout belongs to the payload.  ``console``
renders for people, ``json`` one object per line for log shippers.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

import structlog


def configure_logging(fmt: str = "console", *, level: str = "info") -> None:
    """Set up structlog; ``fmt`` is ``console`` or ``json``."""
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def print_error(message: str, hint: str | None, fmt: str = "console", *,
                exit_status: int | None = None) -> None:
    """The error that ends cvmfsd, on stderr: two plain lines, or one JSON object.

    With ``json`` it is shaped like the log events (``event``, ``level``,
    ``timestamp``), so that every line of a JSON log parses.
    """
    if fmt == "json":
        event = {"event": "cvmfsd failed", "error": message, "hint": hint,
                 "exit_status": exit_status, "level": "error",
                 "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}
        print(json.dumps(event), file=sys.stderr, flush=True)
        return
    print(f"cvmfsd: error: {message}", file=sys.stderr)
    if hint:
        print(f"cvmfsd: hint: {hint}", file=sys.stderr)
