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

The start of a pilot's payload waits for no import.  :func:`spawn` queues the
shim's ``start`` message (with the payload's environment) in the socketpair
before the mounts even begin, so the shim starts the payload as soon as its
own check of the mounts passes (after a failed check it ignores that message
and waits for the supervisor's ``abort``).  Meanwhile ``cvmfsd run`` waits in
:func:`wait_for_shim`, plain blocking code that shows the mount progress, and
imports trio and the rest of the supervisor only once the shim has spoken: the
imports cost some 0.15 s of CPU, which would otherwise be taken from cvmfs2 as
it mounts.  The control socket is bound before cvmfsexec starts, so a payload
that asks cvmfsd something at once is queued, not refused.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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
                     "at a self-extracting file made by `makedist -o`, or at GlideinWMS's "
                     "CVMFSEXEC_DIR of cvmfsexec-<src>-<os><ver>-<arch> files",
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
    #: when cvmfsexec was started (CLOCK_MONOTONIC, :func:`time.monotonic`)
    started: float = field(default_factory=time.monotonic)
    #: the part of the queued ``start`` message the socket buffer did not take
    start_rest: bytes = b""
    #: cvmfsexec's complete output lines read by :func:`wait_for_shim`, for the
    #: session: (time.monotonic() when read, "stdout" or "stderr", text)
    early_lines: list[tuple[float, str, str]] = field(default_factory=list)
    #: the unterminated ends of those streams, by stream name
    early_partial: dict[str, bytes] = field(default_factory=dict)
    #: the progress lines shown so far, as (index, repo)
    shown: set[tuple[int, str]] = field(default_factory=set)
    #: the shim's first message as :func:`wait_for_shim` read it (its check of
    #: the mounts), with everything read from the channel so far, and the shim's
    #: pid (SCM_CREDENTIALS): the session starts its reading from there
    verified: Mapping[str, object] | None = None
    early_channel: bytes = b""
    early_pid: int | None = None
    #: cvmfsexec ended while :func:`wait_for_shim` waited (before the shim spoke)
    exited_early: bool = False

    def checks_passed(self) -> bool:
        """Whether the shim's check of every repository passed (as it judged it)."""
        repos = self.verified.get("repos") if self.verified else None
        return isinstance(repos, dict) and all(
            isinstance(check, dict) and check.get("ok") for check in repos.values())


def progress(index: int, total: int, repo: str, *, as_json: bool = False) -> None:
    """A progress line for a pilot's log (stderr; stdout is the payload's).

    With ``--log-format json`` it is shaped like every other log event
    (``event``, ``level``, ``timestamp``): it is printed before logging is set up.
    """
    if as_json:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        print(json.dumps({"index": index, "total": total, "repo": repo, "event": "mounting",
                          "level": "info", "timestamp": f"{stamp}Z"}),
              file=sys.stderr, flush=True)
    else:
        print(f"cvmfsd: mounting {index}/{total}: {repo}", file=sys.stderr, flush=True)


def next_mount(order: Sequence[str], mounted: str) -> int | None:
    """The 1-based index in ``order`` of the mount that starts once ``mounted`` is done."""
    if mounted not in order:
        return None
    index = order.index(mounted) + 2
    return index if index <= len(order) else None


def wait_for_shim(spawned: Spawned, *, until: float, wake_fd: int | None = None,
                  on_line: Callable[[str, str], None] = lambda stream, text: None) -> None:
    """Block until the shim has something to say, cvmfsexec ends, or ``until``.

    cvmfsexec's output is read meanwhile (a full pipe would stall it) and kept
    in ``spawned`` for the session, each complete line also given to
    ``on_line`` (progress); the shim's first message is read into
    ``spawned.verified``.  Readable ``wake_fd`` (a :func:`signal.set_wakeup_fd`
    pipe) ends the wait too.  cvmfsexec's end sets ``spawned.exited_early``
    (its output may stay open in the processes it leaves).
    """
    streams = {pipe.fileno(): name for name, pipe in
               (("stdout", spawned.process.stdout), ("stderr", spawned.process.stderr))
               if pipe is not None}
    channel = spawned.channel.fileno()
    stops = [channel] if wake_fd is None else [channel, wake_fd]
    try:
        exited: int | None = os.pidfd_open(spawned.process.pid)
    except (AttributeError, OSError):  # Linux < 5.3: its output's end tells
        exited = None
    try:
        _wait_for_shim(spawned, until, [*stops, *([exited] if exited is not None else [])],
                       streams, on_line)
    finally:
        if exited is not None:
            spawned.exited_early = bool(select.select([exited], [], [], 0)[0]) and (
                spawned.verified is None)
            os.close(exited)


def _wait_for_shim(spawned: Spawned, until: float, stops: list[int], streams: dict[int, str],
                   on_line: Callable[[str, str], None]) -> None:
    channel = spawned.channel.fileno()
    while streams:
        left = until - time.monotonic()
        if left <= 0:
            return
        readable, _, _ = select.select([*stops, *streams], [], [], left)
        if channel in readable:
            _read_first_message(spawned, until)
            return
        if any(fd in readable for fd in stops):
            return
        for fd in readable:
            name = streams[fd]
            chunk = os.read(fd, 65536)
            if not chunk:  # its end: the session's pump reads it again, at once
                del streams[fd]
                continue
            *lines, spawned.early_partial[name] = (
                spawned.early_partial.get(name, b"") + chunk).split(b"\n")
            for raw in lines:
                text = raw.decode(errors="replace")
                spawned.early_lines.append((time.monotonic(), name, text))
                on_line(name, text)


CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _read_first_message(spawned: Spawned, until: float) -> None:
    """Read the shim's first message line into ``spawned`` (see :attr:`Spawned.verified`)."""
    channel, buffer = spawned.channel, b""
    while b"\n" not in buffer and time.monotonic() < until:
        if not select.select([channel], [], [], until - time.monotonic())[0]:
            break
        try:
            data, ancdata, _flags, _addr = channel.recvmsg(65536, socket.CMSG_SPACE(CRED.size))
        except OSError:  # the shim is gone; the session learns how from cvmfsexec's exit
            break
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                spawned.early_pid = CRED.unpack(payload[: CRED.size])[0]
        if not data:
            break
        buffer += data
    spawned.early_channel = buffer
    try:
        body = json.loads(buffer.split(b"\n", 1)[0])
    except ValueError:
        return
    if isinstance(body, dict) and body.get("event") == "verified":
        spawned.verified = body


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
    began = time.monotonic()
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
    # The shim's go, queued now: it reads it once its check of the mounts has
    # passed.  What the socket buffer does not take, the session sends.
    start = json.dumps({"event": "start", "env": dict(plan.env)}).encode() + b"\n"
    ours.setblocking(False)
    try:
        sent = ours.send(start)
    except OSError:  # EAGAIN: a buffer full already; EPIPE: the shim's fate says more
        sent = 0
    finally:
        ours.setblocking(True)
    return Spawned(process, ours, started=began, start_rest=start[sent:])
