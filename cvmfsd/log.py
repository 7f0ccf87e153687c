"""structlog, configured once for the whole process.

Logs go to stderr: the pilot's stdout belongs to the payload.  ``console``
renders for people, ``json`` one object per line for log shippers.
"""

from __future__ import annotations

import logging
import sys

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
