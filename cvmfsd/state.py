"""The daemon's state, written by the supervisor and read by the control channel.

One writer per field (the supervisor task that owns it); readers take
:meth:`DaemonState.snapshot`, a plain JSON-ready copy.  Also :class:`LiveConfig`,
the glidein_config as it is *now*: later ``add_config_line`` calls by the pilot
are seen without a restart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cvmfsd import glidein
from cvmfsd.config import is_secret


@dataclass
class RepoState:
    """What is known about one repository."""

    state: str = "mounting"  # mounting | ok | failed | absent (watchers add more)
    revision: str | None = None
    error: str | None = None


@dataclass
class DaemonState:
    """Everything ``cvmfsctl status`` reports."""

    mode: str = "deciding"
    policy: str = ""
    dist: str | None = None
    socket: str | None = None
    metrics_address: str | None = None
    phase: str = "starting"  # starting | mounting | running | stopping | done
    repos: dict[str, RepoState] = field(default_factory=dict)
    payload: tuple[str, ...] = ()
    payload_status: int | None = None
    shim_pid: int | None = None
    ns_init_pid: int | None = None
    control_requests: int = 0
    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready copy for readers."""
        return {
            "mode": self.mode, "policy": self.policy, "phase": self.phase, "dist": self.dist,
            "socket": self.socket, "metrics_address": self.metrics_address,
            "repos": {name: {"state": r.state, "revision": r.revision, "error": r.error}
                      for name, r in self.repos.items()},
            "payload": {"argv": list(self.payload), "status": self.payload_status},
            "shim_pid": self.shim_pid, "ns_init_pid": self.ns_init_pid,
            "shim_namespaces": namespace_ids(self.shim_pid),
            "pid": os.getpid(), "started": self.started,
            "uptime_seconds": round(time.monotonic() - self.started_monotonic, 3),
        }


def namespace_ids(pid: int | None) -> dict[str, str] | None:
    """The mount, pid and user namespaces of ``pid`` (``{"mnt": "mnt:[4026532...]", ...}``).

    ``cvmfsctl enter`` checks the namespace files it opens against these (the
    pid could be reused), and compares its own to know when it is already
    inside.  None when there is no such process (any more).
    """
    if pid is None:
        return None
    try:
        return {kind: str(Path(f"/proc/{pid}/ns/{kind}").readlink())
                for kind in ("mnt", "pid", "user")}
    except OSError:
        return None


class LiveConfig:
    """glidein_config values, re-read whenever the file changes.

    A stat per read decides (inode, size, mtime): GlideinWMS rewrites the file
    by rename, so a changed inode is the usual signal.  Secret-looking keys are
    withheld unless ``allow`` names them.
    """

    def __init__(self, path: Path | None, *, allow: tuple[str, ...] = ()) -> None:
        self.path = path
        self._name = None if path is None else os.fspath(path)  # os.stat(str): no Path call
        self.allow = allow
        self._stamp: tuple[int, int, int] | None = None
        self._values: Mapping[str, str] = {}

    def values(self) -> Mapping[str, str]:
        """All current values (secrets included: callers filter with :meth:`visible`)."""
        if self.path is None or self._name is None:
            return {}
        try:
            st = os.stat(self._name)  # noqa: PTH116 - on every get: the Path method costs ~1 us
        except OSError:
            return self._values
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._values = glidein.read_glidein_config(self.path).values
            self._stamp = stamp
        return self._values

    def visible(self, key: str, value: str = "") -> bool:
        """Whether ``key`` with ``value`` may be shown to a client (:func:`is_secret`)."""
        return key in self.allow or not is_secret(key, value)
