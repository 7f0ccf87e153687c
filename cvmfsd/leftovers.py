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

One cvmfsd per distribution: :func:`lock_dist` takes an exclusive flock(2) on
``<dist>/.cvmfsd.lock`` for the life of ``cvmfsd run`` (close-on-exec, so
nothing it starts inherits it), and a second cvmfsd on a distribution in use
fails with :class:`DistInUse`.  Leftovers are looked for only once the lock is
held: a live cvmfsd's mounts and cvmfs2 look exactly like leftovers, and are
never touched.  cvmfsd passes its locked descriptor to its janitor, which keeps
the lock until its clean-up is finished: a cvmfsd killed outright leaves the
distribution locked while its janitor cleans (tens of milliseconds, a few
seconds with hung mounts).  The lock file records the owner and its janitor
(pid and start time), for the error message, and so that a new run waits
(bounded) for the lock of a dead owner's janitor but fails at once on a live
owner.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cvmfsd import janitor
from cvmfsd.launch import Dist, LaunchError

PROBE_TIMEOUT = 2.0
STOP_GRACE = 1.0
LOCK_NAME = ".cvmfsd.lock"
#: How long a new owner waits for the janitor of a dead cvmfsd to finish its
#: clean-up (bounded by the janitor's own timeouts: a few seconds per mount).
JANITOR_WAIT = 30.0
#: How long it waits for a lock whose holder is not recorded as alive (the
#: owner recording itself, or a janitor whose pid cvmfsd had no time to record).
UNRECORDED_WAIT = 1.0
#: flock's errors where the file system cannot lock (e.g. a network file system).
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
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


# --- one cvmfsd per distribution ------------------------------------------------------


class DistInUse(LaunchError):
    """The distribution belongs to another cvmfsd that is alive, or to its janitor.

    Attributes:
        owner: the other cvmfsd's pid, if it is recorded.
    """

    def __init__(self, message: str, *, owner: int | None, hint: str) -> None:
        super().__init__(message, hint=hint)
        self.owner = owner


def _holders(fd: int) -> dict[str, tuple[int, int]]:
    """What the lock file records: {"cvmfsd" | "janitor": (pid, start time)}."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] in ("cvmfsd", "janitor") and all(
                w.isdigit() for w in words[1:]):
            found[words[0]] = (int(words[1]), int(words[2]))
    return found


def _alive(ident: tuple[int, int] | None, marker: bytes, proc_root: str) -> bool:
    """Whether ``ident`` (pid, start time) still runs and its command line holds ``marker``.

    The start time names the process; an empty command line (it reads so for
    an instant during execve) counts as a match.
    """
    if ident is None or ident[0] <= 0 or janitor.process_start(ident[0], proc_root) != ident[1]:
        return False
    try:
        cmdline = Path(f"{proc_root}/{ident[0]}/cmdline").read_bytes()
    except OSError:
        return False
    return not cmdline or marker in cmdline


@dataclass
class DistLock:
    """cvmfsd's exclusive lock on a distribution, from :func:`lock_dist`.

    Attributes:
        path: the lock file.
        fd: its descriptor, which holds the lock until cvmfsd exits; None
            where the file system has no flock(2) (nothing is exclusive then).
        unsupported: why there is no lock (the errno's message), if there is none.
    """

    path: Path
    fd: int | None
    unsupported: str = ""

    @property
    def exclusive(self) -> bool:
        """Whether no other live cvmfsd can be using the distribution."""
        return self.fd is not None

    def record(self, janitor_pid: int | None = None) -> None:
        """Write us (and our janitor, which holds the lock too) to the file."""
        if self.fd is None:
            return
        holders = {"cvmfsd": os.getpid(), "janitor": janitor_pid}
        text = "".join(f"{name} {pid} {janitor.process_start(pid) or 0}\n"
                       for name, pid in holders.items() if pid is not None)
        try:  # only informative (and how long to wait): a full disk must not stop us
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, text.encode(), 0)
        except OSError:
            pass

    def release(self) -> None:
        """Give the distribution up (cvmfsd's exit does the same), once our janitor
        (which shares the lock) has exited too."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_dist(dist: Dist, *, janitor_wait: float = JANITOR_WAIT,
              proc_root: Path = Path("/proc")) -> DistLock:
    """Make this process the only cvmfsd of ``dist`` for as long as it lives.

    If the previous owner was killed and its janitor, which holds the lock
    until it has cleaned up, is still at work, wait for it (at most
    ``janitor_wait`` s).  It takes microseconds otherwise.

    Raises:
        DistInUse: another cvmfsd that is alive has the distribution, or the
            janitor of a dead one did not finish in time.
        LaunchError: the lock file cannot be opened or locked.
    """
    path = dist.root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise LaunchError(f"cannot open {path} to lock distribution {dist.root}: {exc.strerror}",
                          hint="the distribution must be writable by the user cvmfsd runs as"
                          ) from None
    root = str(proc_root)
    started = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holders = _holders(fd)  # read again each time: a new owner records itself
            owner, cleaner = holders.get("cvmfsd"), holders.get("janitor")
            owned = _alive(owner, b"cvmfsd", root)
            cleaning = not owned and _alive(cleaner, b"cvmfsd.janitor", root)
            patience = janitor_wait if cleaning else min(janitor_wait, UNRECORDED_WAIT)
            if owned or time.monotonic() - started >= patience:
                os.close(fd)
                if cleaning and cleaner is not None:
                    dead = owner[0] if owner else "unknown"
                    raise DistInUse(
                        f"distribution {dist.root} is still being cleaned up by the janitor "
                        f"(pid {cleaner[0]}) of cvmfsd pid {dead}, which died; waited "
                        f"{janitor_wait:g} s", owner=None,
                        hint=f"see {dist.root / 'log' / 'janitor.log'}; use another "
                        "distribution (--dist), or try again once that janitor has exited"
                        ) from None
                raise _in_use(dist, owner, root) from None
            time.sleep(0.01)
        except OSError as exc:
            os.close(fd)
            if exc.errno in NO_FLOCK:  # e.g. a network file system without locks
                return DistLock(path, None, unsupported=exc.strerror or str(exc))
            raise LaunchError(f"cannot lock distribution {dist.root} ({path}): {exc.strerror}"
                              ) from None
    lock = DistLock(path, fd)
    lock.record()
    return lock


def _in_use(dist: Dist, owner: tuple[int, int] | None, proc_root: str) -> DistInUse:
    hint = "give each cvmfsd a distribution of its own (--dist)"
    if owner is None:
        return DistInUse(f"distribution {dist.root} is in use by another cvmfsd (its pid is "
                         "not recorded yet); expected one cvmfsd per distribution",
                         owner=None, hint=f"{hint}, or stop the other one first")
    if _alive(owner, b"cvmfsd", proc_root):
        return DistInUse(f"distribution {dist.root} is in use by cvmfsd pid {owner[0]}; "
                         "expected one cvmfsd per distribution", owner=owner[0],
                         hint=f"{hint}, or stop the other one (pid {owner[0]}) first")
    lock = dist.root / LOCK_NAME
    return DistInUse(f"distribution {dist.root} is in use: {lock} is locked, though the cvmfsd "
                     f"that took it (pid {owner[0]}) has exited; expected one cvmfsd per "
                     "distribution", owner=owner[0],
                     hint=f"{hint}, or end the process that holds it (fuser {lock})")
