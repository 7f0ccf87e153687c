"""The shared cache manager of the simulated ``cvmfs2`` (upstream ``cvmfs/quota_posix.cc``).

With ``CVMFS_SHARED_CACHE=yes`` (the default) every cvmfs2 of one cache
connects to a single ``cvmfs2 __cachemgr__`` process through the FIFO
``<workspace>/cachemgr`` (``PosixQuotaManager::CreateShared``):

* under the blocking lock ``<workspace>/lock_cachemgr`` it tries to open the
  FIFO for writing (non-blocking). That works while a cache manager reads it;
  the manager's pid is then read from the lock file (magic 142857, then the
  pid, native ints).
* Otherwise the first client creates the FIFO and starts a new manager with
  ``ExecAsDaemon`` (fork, setsid, fork, stdio on /dev/null, ``execvp``):
  ``<cvmfs2 argv[0]> __cachemgr__ <cache>[:<workspace>] <boot-fd>
  <handshake-fd> <limit bytes> <threshold bytes> 1 <syslog level 1-3>
  <syslog facility, -1 = user> <debuglog>:<usyslog>``. ``<cache>`` is ``.``
  when the cache directory is the workspace (the usual case: the fuse module
  has already changed into it, ``mountpoint.cc DeterminePosixCacheSettings``),
  and the manager's working directory is cvmfs2's, the workspace. The
  threshold is half the limit. ``ExecAsDaemon`` closes no descriptor
  (util/posix.cc ``ExecAsDaemon``), and cvmfs2 opens its workspace lock
  (``TryLockFile``, a ``flock`` without ``O_CLOEXEC``) and its watchdog pipes
  before it starts the manager, so upstream the manager probably inherits them
  (**[inferred] from the source, not seen on a real node**: while it lived,
  ``lock.<fqrn>`` of the cvmfs2 that started it would stay locked, so
  remounting that repository would wait until every other repository of the
  cache is gone).  **The simulation differs here: it passes neither on**,
  until that is confirmed on a real node; cvmfsd bounds every remount anyway.
* The manager forks a watchdog of its own (no crash handler), takes
  ``lock_cachemgr.fifo``, opens the FIFO for reading, reports on the boot
  pipe, waits for the handshake and then reads commands until **end of file,
  i.e. until the last client closed its end**: it exits by itself once the
  last cvmfs2 of the cache is gone (clean exit, crash or SIGKILL alike), and
  its watchdog follows.

Where the simulation differs: the clients send no commands (the simulated
fetcher keeps its own cache accounting), so the manager only counts what it
reads; no SQLite database (``cachemgr.running`` and ``cachemgr.protocol`` are
still created and removed).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

from cvmfsd.sim._state import Log
from cvmfsd.sim._watchdog import _daemon_stdio, fork_watchdog

MAGIC = 142857  # PosixQuotaManager::kLockFileMagicNumber
PROTOCOL_REVISION = 2
_HEADER = struct.Struct("=Ii")  # magic number, pid
ARGV_FLAG = "__cachemgr__"


class CacheMgrError(Exception):
    """The shared cache manager could not be reached or started (loader code 12)."""


def _lock_file(path: Path) -> int:
    """``LockFile``: open (O_RDONLY|O_CREAT) and flock, blocking if needed."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class SharedCacheClient:
    """A cvmfs2's connection to the shared cache manager."""

    def __init__(self, pid: int, fifo_fd: int) -> None:
        self.pid = pid
        #: The write end of ``<workspace>/cachemgr``; the manager exits when the last one closes.
        self.fifo_fd = fifo_fd

    def close(self) -> None:
        """Disconnect (cvmfs2's exit does the same)."""
        if self.fifo_fd >= 0:
            os.close(self.fifo_fd)
            self.fifo_fd = -1


def connect(
    workspace: Path,
    cache_workspace: str,
    *,
    program: Sequence[str],
    limit: int,
    log_spec: str,
    inherit: Sequence[int],
    log: Log,
) -> SharedCacheClient:
    """``PosixQuotaManager::CreateShared``: connect to the manager, starting it if needed.

    Args:
        workspace: the workspace directory (absolute).
        cache_workspace: the manager's second argument (``.`` usually).
        program: how to run cvmfs2 (``argv[0]`` of the real one; the sim's
            ``python -m cvmfsd.sim.cvmfs2``).
        limit: the quota limit in bytes.
        log_spec: ``<debuglog>:<usyslog>``.
        inherit: descriptors an exec'd child inherits (see the module docstring).
        log: the client's log.

    Raises:
        CacheMgrError: it could not be started or reached.
    """
    fifo = workspace / "cachemgr"
    lock = _lock_file(workspace / "lock_cachemgr")
    try:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            connect_error = exc.errno
        else:
            raw = (workspace / "lock_cachemgr").read_bytes()[: _HEADER.size]
            if len(raw) < _HEADER.size or _HEADER.unpack(raw)[0] != MAGIC:
                os.close(fd)
                raise CacheMgrError("could not read cache manager pid from lockfile")
            os.set_blocking(fd, True)
            log.debug("connected to existing cache manager pipe")
            return SharedCacheClient(_HEADER.unpack(raw)[1], fd)
        # Let an exiting cache manager finish first.
        _unlock(_lock_file(workspace / "lock_cachemgr.fifo"))
        if connect_error == errno.ENXIO:
            log.debug("left-over FIFO found, unlinking")
            fifo.unlink(missing_ok=True)
        try:
            os.mkfifo(fifo, 0o600)
        except OSError as exc:
            raise CacheMgrError(f"failed to create cache manager FIFO ({exc.errno})") from None
        boot_r, boot_w = os.pipe()
        shake_r, shake_w = os.pipe()
        argv = [*program, ARGV_FLAG, cache_workspace, str(boot_w), str(shake_r), str(limit),
                str(limit // 2), "1", "3", "-1", log_spec]
        pid = _exec_as_daemon(argv, [boot_w, shake_r, *inherit])
        log.debug(f"new cache manager pid: {pid}")
        os.close(boot_w)
        os.close(shake_r)
        with (workspace / "lock_cachemgr").open("r+b") as out:
            out.truncate(0)
            out.write(_HEADER.pack(MAGIC, pid))
        started = os.read(boot_r, 1)
        os.close(boot_r)
        if len(started) != 1:
            os.close(shake_w)
            raise CacheMgrError("cache manager did not start")
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            os.close(shake_w)
            raise CacheMgrError(f"failed to connect to newly created FIFO ({exc.errno})") from None
        os.write(shake_w, b"C")
        os.close(shake_w)
        os.set_blocking(fd, True)
        log.debug("connected to a new cache manager")
        return SharedCacheClient(pid, fd)
    finally:
        _unlock(lock)


def _exec_as_daemon(argv: list[str], inherit: Sequence[int]) -> int:
    """``ExecAsDaemon``: fork, setsid, fork, /dev/null stdio, exec; return the grandchild's pid."""
    pid_r, pid_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        try:
            os.close(pid_r)
            os.setsid()
            grandchild = os.fork()
            if grandchild:
                os.write(pid_w, struct.pack("=i", grandchild))
                os._exit(0)
            os.close(pid_w)
            _daemon_stdio()
            for fd in inherit:
                os.set_inheritable(fd, True)
            os.execv(argv[0], argv)  # noqa: S606 - ExecAsDaemon's execvp
        finally:
            os._exit(1)
    os.close(pid_w)
    os.waitpid(child, 0)
    raw = os.read(pid_r, 4)
    os.close(pid_r)
    if len(raw) != 4:
        raise CacheMgrError("failed to start cache manager")
    return int(struct.unpack("=i", raw)[0])


def main(argv: Sequence[str]) -> int:
    """``PosixQuotaManager::MainCacheManager``; ``argv`` starts with ``__cachemgr__``."""
    if len(argv) < 10:
        return 1
    dirs = argv[1].split(":")
    cache_dir = Path(dirs[0])
    workspace = Path(dirs[1] if len(dirs) > 1 else dirs[0])
    pipe_boot, pipe_handshake = int(argv[2]), int(argv[3])
    debuglog, _, usyslog = argv[9].partition(":")
    log = Log("cachemgr", Path(usyslog) if usyslog else None,
              Path(debuglog + ".cachemgr") if debuglog else None)
    watchdog = fork_watchdog("cachemgr", "", log, on_crash=False)
    watchdog.spawn("./stacktrace.cachemgr")
    try:
        fifo_lock = _lock_file(workspace / "lock_cachemgr.fifo")
    except OSError:
        log.info(f"could not open lock file {workspace / 'lock_cachemgr.fifo'}")
        return 1
    crash_guard = cache_dir / "cachemgr.running"
    protocol = workspace / "cachemgr.protocol"
    fifo = workspace / "cachemgr"
    try:
        crash_guard.touch(0o600)
        protocol.write_text(str(PROTOCOL_REVISION))
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        log.info(f"shared cache manager failed to start: {exc}")
        _unlock(fifo_lock)
        return 1
    os.set_blocking(reader, True)
    log.debug("shared cache manager listening")
    os.write(pipe_boot, b"C")
    os.close(pipe_boot)
    os.read(pipe_handshake, 1)
    os.close(pipe_handshake)
    received = 0
    while chunk := os.read(reader, 4096):  # EOF once the last client closed its end
        received += len(chunk)
    log.debug(f"shared cache manager: last client gone ({received} bytes of commands)")
    fifo.unlink(missing_ok=True)
    protocol.unlink(missing_ok=True)
    crash_guard.unlink(missing_ok=True)
    _unlock(fifo_lock)
    watchdog.quit()
    return 0


def program() -> list[str]:
    """How the simulated cvmfs2 runs itself (``argv[0]`` of the real one)."""
    return [sys.executable, "-m", "cvmfsd.sim.cvmfs2"]
