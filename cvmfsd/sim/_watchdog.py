"""The crash watchdog of the simulated ``cvmfs2`` (upstream monitor.cc, auto_umount.cc).

Real cvmfs2 forks its watchdog early in the fuse module's ``Init`` (``cvmfs.cc``,
``Watchdog::Create`` right after logging is set up, before the workspace is
locked), by ``fork`` without ``exec``: the watchdog has cvmfs2's command line
and ``comm``. It is double-forked and daemonised (``Watchdog::Fork`` then
``Daemonize``: its own session, stdio on /dev/null) and closes every other
descriptor but its two pipes, so it holds neither the workspace lock nor the
talk socket nor ``/dev/fuse``. It then waits:

* until ``Spawn`` (after the loader daemonised) sends *supervise* and the
  crash-dump path ``<workspace>/stacktrace.<fqrn>``; the watchdog changes into
  that directory. End of file before that (a failed mount, a double mount)
  or *quit* make it exit.
* then for the next message: *quit* (clean unmount or SIGTERM of cvmfs2) ends
  it; *stack trace* (cvmfs2's crash-signal handler) makes it log a report,
  SIGKILL cvmfs2 and run the crash handler; end of file (cvmfs2 died without a
  word: SIGKILL, OOM) logs ``watchdog: unexpected termination`` and runs the
  crash handler.

The crash handler (``auto_umount::UmountOnCrash``) reads ``/proc/mounts``,
sleeps 2 s, and only if the mount point was listed *in what it read before the
sleep* (it does not look again) and ``opendir`` on it fails with ENOTCONN now,
regains root (``seteuid(0)``: works for (fake) root, as in cvmfsexec mode 3,
fails for an ordinary user, as in mode 1) and lazily unmounts the path
(``platform_umount``: where ``/etc/mtab`` is a regular file, it first takes
``/etc/mtab.cvmfslock``, trying once a second for 10 s, and rewrites the file
without the mount point; then ``umount2(MNT_DETACH)``, which detaches whatever
is mounted on top at that moment). The watchdog then exits.

The watchdog treats HUP, INT, QUIT, ILL, ABRT, BUS, FPE, USR1, SEGV, USR2,
TERM, XCPU and XFSZ as unexpected: it logs and exits 1. cvmfs2 notices its
watchdog gone (its end of a second pipe hangs up) and aborts ("watchdog
disappeared, aborting"): a SIGTERM to the watchdog crashes the repository.

Where the simulation differs: no gdb stack trace (the report says so), the
mtab is ``$CVMFS_SIM_PATH_MOUNTED`` when set (tests give it a regular file of
their own, to hold its lock), and the pipes
carry one-byte tags instead of C structs.
"""

# The watchdog runs in a forked child that mirrors C code: plain os calls.
# ruff: noqa: PTH101, PTH104, PTH108, PTH116, PTH119, PTH120, PTH123, PTH208

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import stat
import struct
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from cvmfsd.sim._settings import VERSION
from cvmfsd.sim._state import Log

#: Tags on the control pipe (``ControlFlow::Flags`` in monitor.h).
SUPERVISE = b"S"
QUIT = b"Q"
STACKTRACE = b"T"
_CRASH = struct.Struct("=iii")  # signal, errno, pid (CrashData)
_PATH_LEN = struct.Struct("=I")
#: monitor.cc ``g_suppressed_signals``: the watchdog logs them and exits 1.
SUPPRESSED_SIGNALS = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGILL, signal.SIGABRT, signal.SIGBUS,
    signal.SIGFPE, signal.SIGUSR1, signal.SIGSEGV, signal.SIGUSR2, signal.SIGTERM,
    signal.SIGXCPU, signal.SIGXFSZ,
)
UMOUNT_DELAY = 2.0  # auto_umount.cc: SafeSleepMs(2000)
_MNT_DETACH = 2
#: ``_PATH_MOUNTED``; simulation only: ``$CVMFS_SIM_PATH_MOUNTED`` replaces it.
PATH_MOUNTED = "/etc/mtab"
PATH_MOUNTED_ENV = "CVMFS_SIM_PATH_MOUNTED"
MTAB_LOCK_TRIES = 10  # platform_umount: 10 more tries of the lock, 1 s apart
#: How long a crashing cvmfs2 waits for its watchdog's SIGKILL (monitor.cc SendTrace: 300 x 100 ms).
SEND_TRACE_WAIT = 30.0


def _read_exact(fd: int, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            chunk = os.read(fd, size - len(data))
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        if not chunk:
            return None
        data += chunk
    return data


def mount_list(path: str = "/proc/mounts") -> list[str]:
    """The mount points in ``path`` (``platform_mountlist``: getmntent on /proc/mounts)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return []
    # getmntent decodes \040 (space), \011, \012 and \134.
    return [mount_list_entry(line) for line in lines if len(line.split(" ")) >= 2]


def _rewrite_mtab(path: str, mountpoint: str) -> bool:
    """``platform_umount``'s update of a regular mtab: every entry but ``mountpoint``'s."""
    new = path + ".cvmfstmp"
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as old:
            lines = old.read().splitlines(keepends=True)
        kept = [line for line in lines
                if len(line.split(" ")) < 2 or mount_list_entry(line) != mountpoint]
        with open(new, "w", encoding="utf-8", errors="surrogateescape") as out:
            out.writelines(kept)
        mode = os.stat(path)
        os.rename(new, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(new)
        return False
    with contextlib.suppress(OSError):  # best effort, as upstream
        os.chmod(path, stat.S_IMODE(mode.st_mode))
        os.chown(path, mode.st_uid, mode.st_gid)
    return True


def platform_umount(mountpoint: str, *, lazy: bool, path_mounted: str) -> bool:
    """``platform_umount`` (util/platform_linux.h): the mtab first, if a regular file; then umount2.

    The lock is tried at once and then once a second, 10 more times; as
    upstream, a lock taken at the last try still counts as a failure.
    """
    try:
        regular = stat.S_ISREG(os.lstat(path_mounted).st_mode)
    except OSError:
        regular = False
    if regular:
        try:
            lock = os.open(path_mounted + ".cvmfslock", os.O_RDONLY | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            tries = MTAB_LOCK_TRIES
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if tries <= 0:
                        break
                except OSError:
                    return False
                time.sleep(1.0)
                tries -= 1
            if tries <= 0 or not _rewrite_mtab(path_mounted, mountpoint):
                return False
        finally:
            os.close(lock)  # drops the lock
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.umount2(os.fsencode(mountpoint), _MNT_DETACH if lazy else 0) == 0)


def mount_list_entry(line: str) -> str:
    """The mount point of one mtab line, decoded as getmntent does."""
    return (line.split(" ")[1].replace("\\040", " ").replace("\\011", "\t")
            .replace("\\012", "\n").replace("\\134", "\\"))


def umount_on_crash(mountpoint: str, log: Log, *, delay: float = UMOUNT_DELAY,
                    path_mounted: str | None = None) -> str:
    """``auto_umount::UmountOnCrash``; returns what it did (also logged).

    Args:
        mountpoint: the loader's mount point.
        log: the client's log.
        delay: the sleep between reading the mount list and looking.
        path_mounted: the mtab ``platform_umount`` updates if it is a regular
            file (default: ``$CVMFS_SIM_PATH_MOUNTED``, else ``/etc/mtab``).
    """
    if path_mounted is None:
        path_mounted = os.environ.get(PATH_MOUNTED_ENV) or PATH_MOUNTED
    points = mount_list()
    if not points:
        outcome = "crash cleanup handler: failed to read mount point list"
        log.info(outcome)
        return outcome
    time.sleep(delay)  # "Mitigate auto-mount - crash - umount - auto-mount loops"
    # auto_umount.cc:54-62: the list read before the sleep, not a new one.
    if mountpoint not in points:
        outcome = f"crash cleanup handler: {mountpoint} not mounted"
        log.info(outcome)
        return outcome
    try:
        os.scandir(mountpoint).close()  # opendir(): stat() could be served from caches
        code = 0
    except OSError as exc:
        code = exc.errno or 0
    if code != errno.ENOTCONN:
        outcome = f"crash cleanup handler: {mountpoint} seems not to be stalled ({code})"
        log.info(outcome)
        return outcome
    try:  # SwitchCredentials(0, getegid(), true)
        if os.geteuid() != 0:
            os.seteuid(0)
    except OSError:
        outcome = "crash cleanup handler: failed to re-gain root privileges"
        log.info(outcome)
        return outcome
    if not platform_umount(mountpoint, lazy=True, path_mounted=path_mounted):
        outcome = f"crash cleanup handler: failed to unmount {mountpoint}"
        log.info(outcome)
        return outcome
    outcome = f"crash cleanup handler unmounted stalled {mountpoint}"
    log.info(outcome)
    return outcome


class Watchdog:
    """cvmfs2's side of its watchdog: the pid, the control pipe, the listener pipe."""

    def __init__(self, pid: int, control: int, listener: int) -> None:
        self.pid = pid
        #: Write end of the control pipe (``pipe_watchdog_``).
        self.control = control
        #: Read end of the pipe whose write end only the watchdog holds (``pipe_listener_``).
        self.listener = listener
        self.spawned = False

    def fds(self) -> tuple[int, int]:
        """The descriptors cvmfs2 holds; an exec'd child (the cache manager) inherits them."""
        return (self.control, self.listener)

    def _send(self, data: bytes) -> bool:
        try:
            os.write(self.control, data)
        except OSError:
            return False
        return True

    def spawn(self, crash_dump_path: str) -> None:
        """``Watchdog::Spawn``: start the supervision (after the loader daemonised)."""
        path = os.fsencode(crash_dump_path)
        self._send(SUPERVISE + _PATH_LEN.pack(len(path)) + path)
        self.spawned = True

    def quit(self) -> None:
        """``~Watchdog``: tell it that cvmfs2 ends cleanly."""
        self._send(QUIT)
        for fd in (self.control, self.listener):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.control = self.listener = -1

    def send_trace(self, sig: int, err: int) -> NoReturn:
        """``Watchdog::SendTrace``: report a crash and wait to be killed by the watchdog."""
        if self._send(STACKTRACE + _CRASH.pack(sig, err, os.getpid())):
            deadline = time.monotonic() + SEND_TRACE_WAIT
            while time.monotonic() < deadline:
                time.sleep(0.1)
        os._exit(1)


def fork_watchdog(
    fqrn: str,
    mountpoint: str,
    log: Log,
    *,
    on_crash: bool = True,
    exe_path: str = sys.executable,
) -> Watchdog:
    """``Watchdog::Create``: fork the watchdog process and return cvmfs2's handle on it.

    Must be called while the process has a single thread (before trio and FUSE).

    Args:
        fqrn: the repository (for the log).
        mountpoint: the mount point the crash handler checks (the loader's argument).
        log: the client's log.
        on_crash: run the crash handler after a crash (False for the cache
            manager's watchdog, ``Watchdog::Create(NULL)``).
        exe_path: reported as ``Executable path`` in the crash report.
    """
    control_r, control_w = os.pipe()
    listener_r, listener_w = os.pipe()
    pid_r, pid_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        try:
            os.setsid()
            if os.fork() == 0:
                os.close(control_w)
                os.close(listener_r)
                os.close(pid_r)
                os.write(pid_w, struct.pack("=i", os.getpid()))
                os.close(pid_w)
                _watchdog_main(control_r, listener_w, mountpoint, log, on_crash=on_crash,
                               exe_path=exe_path)
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(control_r)
    os.close(listener_w)
    os.close(pid_w)
    os.waitpid(child, 0)
    raw = _read_exact(pid_r, 4)
    os.close(pid_r)
    if raw is None:
        os.close(control_w)
        os.close(listener_r)
        raise OSError(errno.ECHILD, "the watchdog did not start")
    (pid,) = struct.unpack("=i", raw)
    log.debug(f"watchdog of {fqrn} forked (pid {pid})")
    return Watchdog(pid, control_w, listener_r)


def _daemon_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def _close_all_but(keep: set[int]) -> None:
    """``CloseAllFildes``: close every descriptor above 2 except ``keep``."""
    try:
        fds = sorted(int(name) for name in os.listdir("/proc/self/fd"))
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _watchdog_main(  # noqa: PLR0915 # pragma: no cover - runs in the forked watchdog
    control: int, listener: int, mountpoint: str, log: Log, *, on_crash: bool, exe_path: str
) -> NoReturn:
    _daemon_stdio()
    _close_all_but({control, listener})
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def unexpected(signum: int, frame: object) -> None:
        log.info(f"watchdog: received unexpected signal {signum} from PID ? / UID ?")
        os._exit(1)

    for sig in SUPPRESSED_SIGNALS:
        signal.signal(sig, unexpected)
    crash_dump = ""
    tag = _read_exact(control, 1)
    if tag is None:
        log.debug("supervisee canceled watchdog")
        os._exit(0)
    if tag == QUIT:
        os._exit(0)
    if tag != SUPERVISE:
        log.info("Internal error: invalid control flow")
        os._exit(0)
    raw = _read_exact(control, _PATH_LEN.size)
    size = _PATH_LEN.unpack(raw)[0] if raw else 0
    if size:
        path = os.fsdecode(_read_exact(control, size) or b"")
        try:
            os.chdir(os.path.dirname(path) or "/")
        except OSError:
            log.info(f"Cannot change to crash dump directory: {path}")
            os._exit(0)
        crash_dump = os.path.basename(path)

    def emergency(message: str) -> None:
        if crash_dump:
            try:
                with open(crash_dump, "a", encoding="utf-8") as out:
                    out.write(f"{message}\nTimestamp: {time.ctime()}\n")
            except OSError:
                message += f" (failed to open crash dump file {crash_dump})"
        log.info(message)

    crash_handler: Callable[[], object] = (
        (lambda: umount_on_crash(mountpoint, log)) if on_crash else (lambda: None)
    )
    tag = _read_exact(control, 1)
    if tag is None:
        emergency("watchdog: unexpected termination (0)")
        crash_handler()
    elif tag == STACKTRACE:
        raw = _read_exact(control, _CRASH.size)
        if raw is None:
            emergency("failed to read crash data (0)")
        else:
            sig, err, pid = _CRASH.unpack(raw)
            report = (
                f"--\nSignal: {sig}, errno: {err}, version: {VERSION}, PID: {pid}\n"
                f"Executable path: {exe_path}\n"
                "(simulated cvmfs2: no gdb stack trace)\n\n"
            )
            try:
                os.kill(pid, signal.SIGKILL)  # "Give the dying process the finishing stroke"
            except OSError as exc:
                report += f"Failed to kill cvmfs client! ({exc.strerror})\n\n"
            emergency(report)
        crash_handler()
    elif tag != QUIT:
        emergency("watchdog: unexpected error")
    os._exit(0)
