"""Start-up timeline: where ``cvmfsd run`` spends its time before the payload runs.

With ``CVMFSD_TIMELINE=FILE`` in the environment, every process of a run
(cvmfsd, the shim inside the namespace) appends one line per phase it passes::

    <CLOCK_MONOTONIC seconds> <pid> <phase>

CLOCK_MONOTONIC is one clock for every process of the node (namespaces do not
change it), so ``bench/overhead.py --timeline`` lines them up against the
moment it spawned ``cvmfsd run`` and the moment the payload's first line
arrived.  Unset, :func:`mark` costs a dictionary lookup: it stays in the code.
Each line is one ``write`` on an ``O_APPEND`` descriptor, so lines of
different processes never interleave.
"""

from __future__ import annotations

import contextlib  # loaded at start-up anyway
import os
import time

ENV = "CVMFSD_TIMELINE"


def _open(path: str | None) -> int | None:
    if not path:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None  # a timeline is a measurement aid; it never fails a run


_fd = _open(os.environ.get(ENV))


def mark(phase: str) -> None:
    """Record that this process reached ``phase`` now (if a timeline is asked for)."""
    if _fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(_fd, f"{time.monotonic():.6f} {os.getpid()} {phase}\n".encode())
