"""Find and clean up what an earlier, crashed run left behind in the same distribution.

A cvmfsd (and its janitor) killed outright in mode 1 or 2 leaves mounts below
``<dist>/dist/cvmfs`` in the host mount namespace, stale ones answering ENOTCONN,
and possibly cvmfs2 processes; a mode-3 run on a masked /proc (no pid namespace)
can leave cvmfs2 processes.  At start, before it mounts anything, cvmfsd calls
:func:`find_leftovers` and, if there are any, :func:`clean_leftovers`.

What counts as a leftover, and what never does:

* mounts strictly below this distribution's ``dist/cvmfs`` in *our* mount
  namespace (``/proc/self/mountinfo``); mounts of other distributions, as other
  pilots on the node may have (cvmfs-facts §3, #287), are never touched;
* cvmfs2 processes of our uid whose command line ends with a mount point
  directly below that directory (the mount point is cvmfs2's last argument);
* not ``<dist>/mnt``, cvmfsexec's underlay: a namespace still running may use it,
  and cvmfsexec empties it itself when it starts.

Theory of operation: reading mountinfo and ``/proc/<pid>/cmdline`` never touches
FUSE.  Whether a mount still answers is asked in a disposable child process with
a deadline, one per mount, all at once (cvmfs-facts B §6: a stuck daemon leaves
its callers in D state); the child calls statvfs, which always reaches the daemon,
whereas stat may be answered from the kernel's attribute cache.  Cleaning kills
the cvmfs2 processes first (SIGTERM, a grace period, SIGKILL; pid and start time
re-checked through a pidfd before each signal), then unmounts: normally, and
lazily only where no cvmfs2 serves the mount any more (cvmfs PR #1281).
"""

from __future__ import annotations

import enum
import errno
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cvmfsd import janitor
from cvmfsd.launch import Dist

PROBE_TIMEOUT = 2.0
STOP_GRACE = 1.0
_PROBE = ("import os, sys\n"
          "try:\n    os.statvfs(sys.argv[1])\n"
          "except OSError as exc:\n    sys.exit(exc.errno or 255)\n")


class MountState(enum.Enum):
    """What probing a leftover mount found."""

    OK = "ok"  #: its daemon answered
    ENOTCONN = "enotconn"  #: its daemon is dead
    HUNG = "hung"  #: no answer within the deadline
    ERROR = "error"  #: another error (see ``LeftoverMount.error``)
    UNKNOWN = "unknown"  #: not probed


@dataclass(frozen=True)
class LeftoverMount:
    """A mount below the distribution's ``dist/cvmfs``."""

    mountpoint: Path
    state: MountState
    error: str = ""  # the errno name when state is ERROR

    @property
    def repo(self) -> str:
        """The repository mounted there (the mount point's name)."""
        return self.mountpoint.name


@dataclass(frozen=True)
class OrphanProcess:
    """A cvmfs2 process serving (or having served) a mount point of the distribution."""

    pid: int
    start_time: int  # clock ticks after boot, field 22 of /proc/<pid>/stat
    mountpoint: Path

    @property
    def repo(self) -> str:
        """The repository it serves."""
        return self.mountpoint.name


@dataclass(frozen=True)
class Leftovers:
    """What :func:`find_leftovers` found; false when there is nothing.

    ``mounts`` are in unmount order: newest first, configuration repository last.
    """

    mounts: tuple[LeftoverMount, ...] = ()
    processes: tuple[OrphanProcess, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.mounts or self.processes)


@dataclass(frozen=True)
class Report:
    """What :func:`clean_leftovers` did, and what it could not."""

    signalled: tuple[tuple[int, str], ...] = ()  #: (pid, signal name), in order
    unmounted: tuple[Path, ...] = ()
    lazily_unmounted: tuple[Path, ...] = ()
    remaining_mounts: tuple[Path, ...] = ()
    remaining_processes: tuple[int, ...] = ()

    @property
    def clean(self) -> bool:
        """Whether every leftover is gone."""
        return not (self.remaining_mounts or self.remaining_processes)


def _probe(points: Sequence[str], timeout: float) -> dict[str, tuple[MountState, str]]:
    """statvfs every mount point in a child of its own, all within one deadline."""
    children: dict[int, str] = {}
    states: dict[str, tuple[MountState, str]] = {}
    for point in points:
        try:
            pid = os.posix_spawn(
                sys.executable, [sys.executable, "-I", "-S", "-c", _PROBE, point], os.environ,
                file_actions=[(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0)
                              for fd in (0, 1, 2)])
        except OSError as exc:
            states[point] = (MountState.ERROR, f"cannot start the probe: {exc.strerror}")
            continue
        children[pid] = point
    deadline = time.monotonic() + timeout
    while children and time.monotonic() < deadline:
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                point = children.pop(pid)
                if code == 0:
                    states[point] = (MountState.OK, "")
                elif code == errno.ENOTCONN:
                    states[point] = (MountState.ENOTCONN, "")
                else:
                    states[point] = (MountState.ERROR, errno.errorcode.get(code, str(code)))
        time.sleep(0.005)
    for pid, point in children.items():
        # Stuck in FUSE: SIGKILL may not end it before the request is answered,
        # so it is not waited for (it stays a zombie until then).
        os.kill(pid, signal.SIGKILL)
        states[point] = (MountState.HUNG, "")
    return states


def find_leftovers(dist: Dist, proc_root: Path = Path("/proc"), *,
                   probe_timeout: float | None = PROBE_TIMEOUT) -> Leftovers:
    """Look for mounts and cvmfs2 processes of ``dist`` left by an earlier run.

    It blocks for at most ``probe_timeout`` s (run it in a thread from trio).

    Args:
        dist: the distribution.
        proc_root: where /proc is (tests pass a canned tree).
        probe_timeout: deadline for probing the mounts; None: do not probe
            (their state is UNKNOWN).
    """
    root = str(proc_root)
    dirs = janitor.mount_dirs(str(dist.root))
    points = janitor.dist_mounts(janitor.read_mountinfo(root), dirs, dist.config_repo())
    states = ({} if probe_timeout is None else _probe(points, probe_timeout))
    mounts = tuple(LeftoverMount(Path(p), *states.get(p, (MountState.UNKNOWN, "")))
                   for p in points)
    processes = tuple(OrphanProcess(pid, start, Path(point))
                      for pid, start, point in janitor.find_cvmfs2(dirs, root))
    return Leftovers(mounts, processes)


def clean_leftovers(dist: Dist, leftovers: Leftovers, *, grace: float = STOP_GRACE,
                    proc_root: Path = Path("/proc")) -> Report:
    """End the processes and unmount the mounts that :func:`find_leftovers` found.

    Each process is signalled only while it is still the same cvmfs2 (pid,
    start time and command line checked again); a mount is unmounted lazily
    only if the normal unmount fails and no cvmfs2 of ours serves it.  It
    blocks for a few seconds at most.
    """
    root = str(proc_root)
    dirs = janitor.mount_dirs(str(dist.root))
    signalled: list[tuple[int, str]] = []

    def on_signal(proc: janitor.Cvmfs2, sig: signal.Signals) -> None:
        signalled.append((proc[0], sig.name))

    procs = [(p.pid, p.start_time, str(p.mountpoint)) for p in leftovers.processes]
    left = janitor.stop_cvmfs2(procs, dirs, exit_grace=0.0, term_grace=grace, proc_root=root,
                               on_signal=on_signal)
    unmounted, lazily, remaining = [], [], []
    for mount in leftovers.mounts:
        point = str(mount.mountpoint)
        if point not in janitor.dist_mounts(janitor.read_mountinfo(root), dirs):
            continue  # its cvmfs2 unmounted it on SIGTERM
        if janitor.unmount(point, lazy=False):
            unmounted.append(mount.mountpoint)
        elif any(served == point for _, _, served in janitor.find_cvmfs2(dirs, root)):
            remaining.append(mount.mountpoint)
        elif janitor.unmount(point, lazy=True):
            lazily.append(mount.mountpoint)
        else:
            remaining.append(mount.mountpoint)
    return Report(signalled=tuple(signalled), unmounted=tuple(unmounted),
                  lazily_unmounted=tuple(lazily), remaining_mounts=tuple(remaining),
                  remaining_processes=tuple(pid for pid, _, _ in left))
