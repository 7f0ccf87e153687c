"""Launch plans and the pure parts of talking to cvmfsexec.

A :class:`LaunchPlan` is everything needed to start CVMFS and the payload,
decided before anything runs.  This module also reads what cvmfsexec and
mountrepo print (progress and failures) and walks /proc to find namespace
PID 1.  No trio here; :mod:`cvmfsd.session` runs the plans.

Theory of operation (mode 3): the supervisor starts ::

    <dist>/cvmfsexec [-N] REPOS -- <python> -m cvmfsd.shim --channel-fd C
        --stdio-fds I,O,E --repos REPOS -- PAYLOAD

with stdin /dev/null and stdout/stderr on pipes, so that mount chatter is
parsed (progress, failures) instead of mixing with the payload's output.  The
pilot's own stdin/stdout/stderr travel as the inherited fds I, O, E, and the
shim hands them to the payload.  C is one end of a socketpair; the kernel
stamps the shim's messages with its pid as seen by the supervisor
(SCM_CREDENTIALS), and the shim's parent is namespace PID 1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cvmfsd._selfexec import module_argv
from cvmfsd.errors import CvmfsdError
from cvmfsd.loader import LoaderCode

_MOUNTED = re.compile(r"^CernVM-FS: mounted cvmfs on (?P<path>.+)$")
# cvmfs2 leaves "loading Fuse module... " unterminated when it fails, so
# cvmfsexec's verdict may share that line.
_FAILED = re.compile(r"(?:^|\.\.\. )mountrepo (?P<repo>\S+) failed$")
LOG_TAIL_LINES = 10


class LaunchError(CvmfsdError):
    """CVMFS could not be provided.

    Attributes:
        repo: the repository that failed, if one did.
        code: the loader exit code, if one was reported.
        log_tail: the last lines of the repository's log.
        signal: the signal that killed the attempt (cvmfsexec, unshare or
            mountrepo), if it died of one: a transient fault, worth one more try.
    """

    exit_status = 69  # EX_UNAVAILABLE: CVMFS is required and could not be had

    def __init__(self, message: str, *, repo: str | None = None, code: int | None = None,
                 log_tail: Sequence[str] = (), hint: str | None = None,
                 signal: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.repo = repo
        self.code = code
        self.log_tail = tuple(log_tail)
        self.signal = signal


@dataclass(frozen=True)
class Dist:
    """A cvmfsexec distribution directory (the one holding ``cvmfsexec``)."""

    root: Path

    @property
    def mount_dir(self) -> Path:
        """Where mountrepo mounts: ``dist/cvmfs``."""
        return self.root / "dist" / "cvmfs"

    def log_file(self, repo: str) -> Path:
        """The repository's cvmfs2 log (``CVMFS_USYSLOG`` as mountrepo sets it)."""
        return self.root / "log" / f"{repo}.log"

    def talk_socket(self, repo: str) -> Path:
        """The repository's cvmfs_talk socket with the distribution's default cache.

        mountrepo relocates ``CVMFS_CACHE_BASE=/var/lib/cvmfs`` into ``dist/``
        and the cache is shared by default, so the socket is
        ``dist/var/lib/cvmfs/shared/cvmfs_io.<repo>``.  A default.local that
        moves the cache moves the socket too; that case is not followed yet.
        """
        return self.root / "dist/var/lib/cvmfs/shared" / f"cvmfs_io.{repo}"

    def config_repo(self) -> str | None:
        """CVMFS_CONFIG_REPOSITORY as cvmfsexec finds it: the last one in default.d."""
        found = None
        for conf in sorted((self.root / "dist/etc/cvmfs/default.d").glob("*.conf")):
            for line in conf.read_text(errors="replace").splitlines():
                if line.startswith("CVMFS_CONFIG_REPOSITORY="):
                    found = line.split("=", 1)[1].strip().strip("\"'")
        return found

    def check(self) -> None:
        """Raise :class:`LaunchError` unless this looks like a cvmfsexec distribution."""
        missing = [rel for rel in ("cvmfsexec", "mountrepo", "umountrepo",
                                   "dist/usr/bin/cvmfs2", "dist/etc/cvmfs/default.conf")
                   if not (self.root / rel).exists()]
        if missing:
            raise LaunchError(
                f"{self.root} is not a cvmfsexec distribution: missing {', '.join(missing)}",
                hint="point --dist at the directory that holds cvmfsexec, mountrepo and dist/, "
                     "or at GlideinWMS's CVMFSEXEC_DIR of cvmfsexec-<src>-<os><ver>-<arch> files",
            )


def mount_order(dist: Dist, repos: Iterable[str]) -> list[str]:
    """The repositories in the order cvmfsexec mounts them: config repo first, no repeats."""
    order = list(dict.fromkeys(repos))
    config = dist.config_repo()
    if config and config not in order:
        order.insert(0, config)
    return order


@dataclass(frozen=True)
class LaunchPlan:
    """How to start CVMFS and the payload in mode 3 (cvmfsexec plus the shim)."""

    dist: Dist
    repos: tuple[str, ...]
    payload: tuple[str, ...]
    nonesting: bool = True
    python: str = sys.executable
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self, *, channel_fd: int, stdio_fds: Sequence[int]) -> list[str]:
        """cvmfsexec's command line, with the shim wrapped around the payload."""
        # Never -N: the shim keeps cvmfsexec's mount-request interface to remount
        # crashed repositories, and hands it to the payload only if allowed.
        shim = [*module_argv("cvmfsd.shim", python=self.python), "--channel-fd", str(channel_fd),
                "--stdio-fds", ",".join(map(str, stdio_fds)), "--repos", ",".join(self.repos)]
        if not self.nonesting:
            shim.append("--allow-nesting")
        return [str(self.dist.root / "cvmfsexec"), *self.repos, "--", *shim, "--",
                *self.payload]


@dataclass(frozen=True)
class MountEvent:
    """Something cvmfsexec or mountrepo said about a repository."""

    repo: str
    ok: bool


def parse_mount_line(line: str, dist: Dist) -> MountEvent | None:
    """Recognise mountrepo's success and cvmfsexec's failure lines; None otherwise."""
    mounted = _MOUNTED.match(line)
    if mounted:
        path = Path(mounted["path"])
        if path.parent == dist.mount_dir:
            return MountEvent(path.name, ok=True)
        return None
    failed = _FAILED.search(line)
    if failed:
        return MountEvent(failed["repo"], ok=False)
    return None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log file, or [] if it cannot be read."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def killed_by(returncode: int) -> int | None:
    """The signal a mount attempt died of: a negative return code (our child), or a shell's
    128+N (cvmfsexec reports unshare's death so); None for an exit, a loader code."""
    if returncode < 0:
        return -returncode
    return returncode - 128 if 128 < returncode < 128 + 65 else None


def mount_failure(dist: Dist, repo: str | None, status: int, output: Sequence[str], *,
                  killed_by_us: bool = False) -> LaunchError:
    """Explain a failed mount: the loader code's name and cause, the log's tail.

    ``status`` is the raw return code (negative: killed by that signal);
    ``killed_by_us``: cvmfsd ended the attempt itself (a timeout), so a death by
    signal is not the transient fault :attr:`LaunchError.signal` reports.
    """
    signum = None if killed_by_us else killed_by(status)
    if signum is not None:
        name = signal_name(signum)
        where = f"mounting {repo}" if repo else "cvmfsexec"
        return LaunchError(f"{where}: killed by {name} before CVMFS was ready", repo=repo,
                           signal=signum)
    if repo is None:
        detail = "; ".join(output[-3:]) or "no output"
        shown = 128 - status if status < 0 else status  # as a shell reports it
        return LaunchError(f"cvmfsexec exited with status {shown} before CVMFS was ready "
                           f"({detail})", code=None)
    tail = log_tail(dist.log_file(repo))
    return LaunchError(
        f"mounting {repo} failed: {LoaderCode.describe(status)}",
        repo=repo, code=status, log_tail=tail,
        hint=f"see {dist.log_file(repo)}" if tail else None,
    )


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _status_fields(proc_root: Path, pid: int) -> dict[str, str]:
    try:
        text = (proc_root / str(pid) / "status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def parent_pid(pid: int, proc_root: Path = Path("/proc")) -> int | None:
    """The parent of ``pid`` as this pid namespace sees it, or None if gone."""
    ppid = _status_fields(proc_root, pid).get("PPid")
    return int(ppid) if ppid else None


def is_running(pid: int, proc_root: Path = Path("/proc")) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie has already exited)."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] not in (["Z"], ["X"])


def is_namespace_init(pid: int, proc_root: Path = Path("/proc")) -> bool:
    """Whether ``pid`` is PID 1 of a pid namespace below ours (NSpid ends in 1)."""
    nspid = _status_fields(proc_root, pid).get("NSpid", "").split()
    return len(nspid) > 1 and nspid[-1] == "1"


#: Pids cvmfsd itself sent a signal to: when one of them (or a child of one) dies of a
#: signal, that is cvmfsd's doing, not a hard kill from outside (see cvmfsd.procevents).
SIGNALLED: set[int] = set()


def send_signal(pid: int, signum: int, *, group: bool = False) -> bool:
    """``kill(pid, signum)`` (``killpg`` with ``group``), remembered in :data:`SIGNALLED`.

    Returns:
        False if there is no such process (or group).
    """
    SIGNALLED.add(pid)
    try:
        (os.killpg if group else os.kill)(pid, signum)
    except ProcessLookupError:
        SIGNALLED.discard(pid)
        return False
    return True


def descendants(pid: int, proc_root: Path = Path("/proc")) -> list[int]:
    """Every live descendant of ``pid``, parents before children."""
    found: list[int] = []
    queue = [pid]
    while queue:
        current = queue.pop(0)
        try:
            tasks = (proc_root / str(current) / "task").iterdir()
            children = {int(c) for t in tasks
                        for c in (t / "children").read_text().split()}
        except OSError:
            continue
        for child in sorted(children):
            found.append(child)
            queue.append(child)
    return found


@dataclass
class Spawned:
    """cvmfsexec started by :func:`spawn`, before any event loop exists.

    Attributes:
        process: the cvmfsexec process (stdout and stderr are pipes).
        channel: our end of the socketpair the shim reports on, with
            SO_PASSCRED set so every message carries the shim's pid.
    """

    process: subprocess.Popen[bytes]
    channel: socket.socket


def spawn(plan: LaunchPlan) -> Spawned:
    """Start cvmfsexec for ``plan`` now (blocking, but only for the fork and exec).

    ``cvmfsd run`` calls this before it imports trio, so the mounts proceed
    while the rest of the supervisor loads.

    Raises:
        LaunchError: cvmfsexec could not be started at all.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    stdio = [os.dup(fd) for fd in (0, 1, 2)]
    try:
        argv = plan.argv(channel_fd=theirs.fileno(), stdio_fds=stdio)
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(theirs.fileno(), *stdio), env=dict(plan.env),
        )
    except OSError as exc:
        ours.close()
        raise LaunchError(f"cannot start {plan.dist.root / 'cvmfsexec'}: {exc.strerror}") from None
    finally:
        theirs.close()
        for fd in stdio:
            os.close(fd)
    return Spawned(process, ours)
