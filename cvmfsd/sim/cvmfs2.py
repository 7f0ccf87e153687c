"""The simulated ``cvmfs2`` binary: ``python -m cvmfsd.sim.cvmfs2 -o config=F <fqrn> <mnt>``.

It is a drop-in for the real loader as cvmfsexec's ``mountrepo`` calls it,
and behaves like it where the supervisor can tell:

1. Set umask 007 (``loader.cc`` ``FuseMain``), parse options and the
   configuration files (``-o config=a:b``) *before* daemonising, because
   ``mountrepo`` deletes the file as soon as we return. A missing mount point
   is ``Mount point <mnt> does not exist`` and code 3, before anything is
   printed on stdout (``loader.cc``).
2. Print ``CernVM-FS: loading Fuse module... `` and initialise like the fuse
   module's ``Init`` does: fork the crash watchdog (:mod:`._watchdog`; not with
   ``-o disable_watchdog``); fault knobs (``mount_delay``, ``mount_fail``);
   cache directory (code 9); the workspace lock ``lock.<fqrn>`` (see
   :func:`_lock`: a double mount exits 0, a lock held by a cvmfs2 still
   shutting down is waited for); change into the workspace; the shared cache
   manager (:mod:`._cachemgr`, code 12); manifest and root catalog (code 16);
   the talk socket ``./cvmfs_io.<fqrn>``, relative to the workspace (code 14,
   see :func:`cvmfsd.sim._sockets.make_socket`); then print ``done``.
3. Mount (code 4, or 3 when /dev/fuse cannot be opened) with no ``fsname`` and
   no ``subtype``: the loader calls ``fuse_mount``/``fuse_session_mount``
   directly and libfuse then names the device as the source, so mountinfo
   reads ``fuse`` / ``/dev/fuse``. Without ``allow_other``: the kernel then
   lets in only the mounting user, which in cvmfsexec mode 3 is the real uid
   behind fake root, so the supervisor can read the mount through
   ``/proc/<pid>/root`` from the initial namespace.
4. Fork; the child starts a session (keeping the workspace as its working
   directory, as ``Daemonize`` does), starts the watchdog's supervision,
   serves, and reports through a pipe once every service runs; the parent
   prints ``CernVM-FS: mounted cvmfs on <mnt>`` and exits 0. Failures print
   ``<reason> (<code> - <text>)`` on stderr and exit with the loader code (see
   :mod:`cvmfsd.loader`).

``-f`` keeps it in the foreground (no fork), as the real ``-f``.
``__cachemgr__`` as the first argument runs the shared cache manager instead.

Where the simulation differs: the real loader prints ``mounted cvmfs on``
and exits right after forking, before the daemon's services run; the
simulated one waits for them. There is no loader socket
(``CVMFS_RELOAD_SOCKETS``) and no reload.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cvmfsd.loader import LoaderCode
from cvmfsd.sim import _cachemgr, cvmfsconf
from cvmfsd.sim._client import CatalogError, Client
from cvmfsd.sim._settings import VERSION, Settings, SettingsError, make_settings
from cvmfsd.sim._sockets import make_socket
from cvmfsd.sim._state import Log
from cvmfsd.sim._watchdog import Watchdog, fork_watchdog
from cvmfsd.sim.stratum import StratumError, validate_fqrn

#: ``sizeof(sockaddr_un.sun_path)``: longer socket paths go through a short symlink.
#: talk.cc ``TalkManager::Create``: ``listen(socket_fd_, 1)``.
TALK_BACKLOG = 1

USAGE = (
    "Usage: cvmfs2 [-h] [-V] [-f] [-d] [-o mount options] <repository name> <mount point>\n"
    "Mount options: config=<file>[:<file>...], debug, disable_watchdog, and FUSE options"
    " (ignored)\n"
)

#: ``Code2Ascii`` texts of the real loader, printed after a failure's code.
_CODE_TEXT = {
    LoaderCode.UNKNOWN: "unknown error",
    LoaderCode.OPTIONS: "illegal options",
    LoaderCode.PERMISSION: "permission denied",
    LoaderCode.MOUNT: "failed to mount",
    LoaderCode.LOADER_TALK: "unable to init loader talk socket",
    LoaderCode.FUSE_LOOP: "cannot run FUSE event loop",
    LoaderCode.LOAD_LIBRARY: "failed to load shared library",
    LoaderCode.INCOMPATIBLE_VERSIONS: "incompatible library version",
    LoaderCode.CACHE_DIR: "cache directory/plugin problem",
    LoaderCode.PEERS: "peering problem",
    LoaderCode.NFS_MAPS: "NFS maps init failure",
    LoaderCode.QUOTA: "quota init failure",
    LoaderCode.MONITOR: "watchdog failure",
    LoaderCode.TALK: "talk socket failure",
    LoaderCode.SIGNATURE: "signature verification failure",
    LoaderCode.CATALOG: "file catalog failure",
    LoaderCode.MAINTENANCE_MODE: "maintenance mode",
    LoaderCode.SAVE_STATE: "save state failure",
    LoaderCode.RESTORE_STATE: "restore state failure",
    LoaderCode.OTHER_MOUNT: "already mounted",
    LoaderCode.DOUBLE_MOUNT: "double mount",
    LoaderCode.HISTORY: "history init failure",
    LoaderCode.WPAD: "proxy auto-discovery failed",
    LoaderCode.LOCK_WORKSPACE: "workspace already locked",
    LoaderCode.REVISION_BLACKLIST: "revision blacklisted",
}


class LoaderFailure(Exception):
    """Mounting failed with a loader exit code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _describe(code: int) -> str:
    try:
        return _CODE_TEXT.get(LoaderCode(code), "unknown error")
    except ValueError:
        return "unknown error"


def _parse_args(argv: Sequence[str]) -> tuple[dict[str, str], str, str, bool]:
    """Return (mount options, fqrn, mount point, foreground)."""
    options: dict[str, str] = {}
    positional: list[str] = []
    foreground = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "-o":
            if not args:
                raise LoaderFailure(LoaderCode.OPTIONS, "option -o needs an argument")
            for opt in args.pop(0).split(","):
                key, _, value = opt.partition("=")
                options[key] = value
        elif arg in ("-f", "-d"):
            foreground = True
            if arg == "-d":
                options["debug"] = ""
        elif arg.startswith("-") and arg != "-":
            raise LoaderFailure(LoaderCode.OPTIONS, f"unknown option {arg}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise LoaderFailure(LoaderCode.OPTIONS, "expected <repository name> <mount point>")
    return options, positional[0], positional[1], foreground


def _read_config(options: dict[str, str], fqrn: str, mountpoint: str) -> Settings:
    if not options.get("config"):
        raise LoaderFailure(LoaderCode.OPTIONS, "Failed to read configuration: no -o config=")
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for name in options["config"].split(":"):
        try:
            text = Path(name).read_text()
        except OSError as exc:
            raise LoaderFailure(
                LoaderCode.OPTIONS, f"Failed to read configuration {name}: {exc.strerror}"
            ) from None
        before = dict(values)
        values = cvmfsconf.parse_config(text, values)
        sources.update({k: name for k, v in values.items() if before.get(k) != v})
    try:
        return make_settings(values, fqrn, mountpoint, sources=sources)
    except SettingsError as exc:
        raise LoaderFailure(exc.code, exc.message) from None


def _lock(settings: Settings, log: Log) -> int:
    """Take the workspace lock ``lock.<fqrn>``; return its descriptor.

    ``FileSystem::LockWorkspace`` (``mountpoint.cc``) and ``InitSystemFs``
    (``cvmfs.cc`` ~2225-2245): if another process holds the lock, the
    ``user.fqrn`` attribute of the mount point decides. It names this
    repository: it is already mounted there (``DOUBLE_MOUNT``, which the loader
    turns into exit 0). It names another one: ``OTHER_MOUNT``. It cannot be
    read (not a cvmfs mount, e.g. the holder is a cvmfs2 still shutting down,
    or a crashed mount answering ENOTCONN): wait for the lock, without a
    deadline (``wait_workspace``).
    """
    path = settings.workspace / f"lock.{settings.fqrn}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LoaderFailure(
            LoaderCode.CACHE_DIR, f"could not acquire workspace lock ({exc.errno})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        pass
    try:
        owner: str | None = os.getxattr(settings.mountpoint, "user.fqrn").decode(
            errors="replace"
        )
    except OSError:
        owner = None
    if owner is None:
        log.info(f"another process holds {path}, waiting.")
        fcntl.flock(fd, fcntl.LOCK_EX)
        log.info(f"lock {path} acquired")
        return fd
    os.close(fd)
    if owner == settings.fqrn:
        raise LoaderFailure(
            LoaderCode.DOUBLE_MOUNT, f"repository already mounted on {settings.mountpoint}"
        )
    raise LoaderFailure(
        LoaderCode.OTHER_MOUNT,
        f"CernVM-FS repository {settings.fqrn} already mounted on {settings.mountpoint}",
    )


def _talk_socket(settings: Settings) -> socket.socket:
    """``TalkManager::Create`` (talk.cc ~85-90): ``MakeSocket(path, 0660)``, ``listen(fd, 1)``.

    The path is ``./cvmfs_io.<fqrn>`` (or ``CVMFS_TALK_SOCKET`` as written),
    resolved against the working directory, which is the workspace by now.
    """
    try:
        sock = make_socket(settings.talk_bind, 0o660)
        sock.listen(TALK_BACKLOG)
    except OSError as exc:
        raise LoaderFailure(
            LoaderCode.TALK, f"failed to initialize talk socket ({exc.errno or 0})"
        ) from None
    return sock


def _initialise(
    client: Client, watchdog: Watchdog | None, foreground: bool
) -> tuple[int, socket.socket]:
    """The fuse module's start-up; returns the lock fd and the talk socket."""
    s = client.settings
    try:
        client.faults = client.fetcher.fetch_faults()
    except StratumError as exc:
        client.log.info(f"ignoring malformed fault knobs: {exc}")
    if client.faults.mount_delay:
        time.sleep(client.faults.mount_delay)
    if client.faults.mount_fail is not None:
        raise LoaderFailure(client.faults.mount_fail, "Failed to mount repository (simulated)")
    try:
        client.fetcher.setup_cache()
        s.workspace.mkdir(mode=0o770, parents=True, exist_ok=True)
    except OSError as exc:
        raise LoaderFailure(
            LoaderCode.CACHE_DIR, f"Failed to setup cache in {s.cache_dir}: {exc.strerror or exc}"
        ) from None
    lock_fd = _lock(client.settings, client.log)
    try:
        os.chdir(s.workspace)  # FileSystem::SetupCwd
    except OSError:
        os.close(lock_fd)
        raise LoaderFailure(
            LoaderCode.CACHE_DIR, f"workspace {s.workspace} is unavailable"
        ) from None
    try:
        if s.shared_cache:
            _connect_cachemgr(client)
        try:
            client.apply(client.load())
        except CatalogError as exc:
            client.log.info(f"failed to load the root catalog: {exc}")
            raise LoaderFailure(
                LoaderCode.CATALOG, "Failed to initialize root file catalog"
            ) from None
        return lock_fd, _talk_socket(s)
    except LoaderFailure:
        os.close(lock_fd)
        raise


def _connect_cachemgr(client: Client) -> None:
    """Connect to (or start) ``cvmfs2 __cachemgr__`` (``FileSystem::SetupPosixQuotaMgr``)."""
    s = client.settings
    cache_path = "." if s.cache_dir == s.workspace else str(s.cache_dir)
    cache_workspace = cache_path if s.cache_dir == s.workspace else f"{cache_path}:{s.workspace}"
    # Upstream, ExecAsDaemon closes nothing and the workspace lock and watchdog
    # pipes are opened without O_CLOEXEC, so the manager would inherit them
    # ([inferred], not seen on a real node).  The simulation does NOT pass them
    # on (see _cachemgr's docstring): unverified, and it would make the first
    # repository of a cache impossible to remount while the others live.
    try:
        client.cachemgr = _cachemgr.connect(
            s.workspace,
            cache_workspace,
            program=_cachemgr.program(),
            limit=s.quota_limit_mb * 1024 * 1024,
            log_spec=f"{s.debuglog or ''}:{s.usyslog or ''}",
            inherit=(),
            log=client.log,
        )
    except (_cachemgr.CacheMgrError, OSError) as exc:
        client.log.info(f"failed to initialize shared lru cache: {exc}")
        raise LoaderFailure(LoaderCode.QUOTA, "Failed to initialize shared lru cache") from None


def _mount(client: Client) -> None:
    import pyfuse3

    from cvmfsd.sim._fs import CvmfsOperations

    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise LoaderFailure(LoaderCode.PERMISSION, "Failed to open /dev/fuse: permission denied")
    mnt = client.settings.mountpoint
    # No fsname, no subtype: loader.cc mounts with fuse_mount/fuse_session_mount
    # directly, so libfuse names the device: mountinfo reads "fuse /dev/fuse".
    options = {"ro", "nodev", "nosuid", "default_permissions"}
    try:
        pyfuse3.init(CvmfsOperations(client), mnt, options)
    except RuntimeError as exc:
        raise LoaderFailure(LoaderCode.MOUNT, f"Failed to mount {mnt} ({exc})") from None
    client.mount_time = time.monotonic()


def _raise_nofile(settings: Settings) -> None:
    """Raise the soft open-files limit towards CVMFS_NFILES, as the real loader does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = settings.nfiles if hard == resource.RLIM_INFINITY else min(settings.nfiles, hard)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            raise LoaderFailure(
                LoaderCode.PERMISSION, f"Failed to set maximum number of open files ({exc})"
            ) from None


def _run_daemon(client: Client, talk: socket.socket, ready_fd: int | None) -> int:
    """Serve until unmounted or signalled; returns the process exit status."""
    import pyfuse3
    import trio

    from cvmfsd.sim._daemon import serve

    def on_ready() -> None:
        client.log.info(f"CernVM-FS: mounted cvmfs on {client.settings.mountpoint}")
        if client.watchdog is not None:
            # cvmfs.cc Spawn(): the crash dump goes to <cwd>/stacktrace.<fqrn>.
            client.watchdog.spawn(f"{Path.cwd()}/stacktrace.{client.settings.fqrn}")
        if ready_fd is not None:
            os.write(ready_fd, bytes([0]))
            os.close(ready_fd)

    try:
        unmounted = trio.run(serve, client, talk, on_ready)
    except BaseException as exc:
        client.log.info(f"FUSE loop failed: {exc!r}")
        pyfuse3.close(unmount=True)
        raise
    finally:
        talk.close()
        with contextlib.suppress(OSError):
            Path(client.settings.talk_bind).unlink()  # ~TalkManager, relative to the workspace
        client.close_all()
    pyfuse3.close(unmount=not unmounted)
    if client.watchdog is not None:
        client.watchdog.quit()
    return 0


def _daemonize(client: Client, talk: socket.socket) -> int:
    """Fork; the parent returns the child's start-up result, the child serves."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        status = os.read(read_end, 1)
        if not status:  # the child died before it was ready
            _fail(LoaderCode.FUSE_LOOP, "Failed to start the FUSE event loop")
            return LoaderCode.FUSE_LOOP
        print(f"CernVM-FS: mounted cvmfs on {client.settings.mountpoint}", flush=True)
        return status[0]
    os.close(read_end)
    os.setsid()  # Daemonize() keeps the working directory: the workspace
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    try:
        code = _run_daemon(client, talk, write_end)
    except BaseException:
        code = LoaderCode.FUSE_LOOP
    os._exit(code)


def _fail(code: int, reason: str) -> None:
    print(f"{reason} ({code} - {_describe(code)})", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the loader; returns the exit status (a :class:`LoaderCode` value).

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    os.umask(0o007)  # loader.cc FuseMain: "a decent umask", group may use the talk socket
    if args and args[0] == _cachemgr.ARGV_FLAG:
        return _cachemgr.main(args)
    if args and args[0] in ("-V", "--version", "-h", "--help"):
        version = args[0] in ("-V", "--version")
        sys.stdout.write(f"CernVM-FS version {VERSION}\n" if version else USAGE)
        return 0
    try:
        options, fqrn, mountpoint, foreground = _parse_args(args)
        validate_fqrn(fqrn)
    except (LoaderFailure, StratumError) as exc:
        sys.stderr.write(f"{exc}\n{USAGE}")
        return LoaderCode.OPTIONS
    if not Path(mountpoint).is_dir():  # DirectoryExists(): stat, so ENOTCONN too
        print(f"Mount point {mountpoint} does not exist", file=sys.stderr, flush=True)
        return LoaderCode.PERMISSION
    print("CernVM-FS: loading Fuse module... ", end="", flush=True)
    try:
        settings = _read_config(options, fqrn, str(Path(mountpoint).absolute()))
    except LoaderFailure as exc:
        _fail(exc.code, exc.reason)
        return exc.code
    return _load(Client(settings), options, foreground=foreground)


def _load(client: Client, options: dict[str, str], *, foreground: bool) -> int:
    """From ``fnInit`` on: start, mount, and serve or daemonise; returns the exit status."""
    settings = client.settings
    lock_fd = -1
    try:
        _raise_nofile(settings)
        if "disable_watchdog" not in options:
            try:  # cvmfs.cc Init, before the file system (and its workspace lock)
                client.watchdog = fork_watchdog(settings.fqrn, settings.mountpoint, client.log)
            except OSError:
                raise LoaderFailure(LoaderCode.MONITOR, "failed to initialize watchdog.") from None
        lock_fd, talk = _initialise(client, client.watchdog, foreground)
        print("done", flush=True)
        try:
            _mount(client)
        except LoaderFailure:
            talk.close()
            with contextlib.suppress(OSError):
                Path(settings.talk_bind).unlink()
            raise
    except LoaderFailure as exc:
        if client.watchdog is not None:
            client.watchdog.quit()
        if client.cachemgr is not None:
            client.cachemgr.close()
        if lock_fd >= 0:
            os.close(lock_fd)
        if exc.code == LoaderCode.DOUBLE_MOUNT:
            # loader.cc ~985-990: not an error; nothing else is printed.
            client.log.info(exc.reason)
            print(
                f"\nCernVM-FS: repository {settings.fqrn} already mounted on "
                f"{settings.mountpoint}",
                file=sys.stderr,
                flush=True,
            )
            return 0
        client.log.info(f"{exc.reason} ({exc.code} - {_describe(exc.code)})")
        _fail(exc.code, exc.reason)
        return exc.code
    if foreground:
        print(f"CernVM-FS: mounted cvmfs on {settings.mountpoint}", flush=True)
        code = _run_daemon(client, talk, None)
    else:
        code = _daemonize(client, talk)
    os.close(lock_fd)
    return code


if __name__ == "__main__":
    sys.exit(main())
