"""The simulated ``cvmfs2`` binary: ``python -m cvmfsd.sim.cvmfs2 -o config=F <fqrn> <mnt>``.

It is a drop-in for the real loader as cvmfsexec's ``mountrepo`` calls it,
and behaves like it where the supervisor can tell:

1. Parse options and the configuration files (``-o config=a:b``) *before*
   daemonising, because ``mountrepo`` deletes the file as soon as we return.
2. Print ``CernVM-FS: loading Fuse module... `` and initialise like the fuse
   module does: fault knobs (``mount_delay``, ``mount_fail``), cache directory
   (code 9), the per-repository lock (code 21), manifest and root catalog
   (code 16), talk socket (code 14); then print ``done``.
3. Mount (code 4, or 3 when /dev/fuse cannot be opened). Without
   ``allow_other``: the kernel then lets in only the mounting user, which in
   cvmfsexec mode 3 is the real uid behind fake root, so the supervisor can
   read the mount through ``/proc/<pid>/root`` from the initial namespace.
4. Fork; the child starts a session, serves, and reports through a pipe once
   every service runs; the parent prints ``CernVM-FS: mounted cvmfs on <mnt>``
   and exits 0. Failures print ``<reason> (<code> - <text>)`` on stderr and exit
   with the loader code (see :mod:`cvmfsd.loader`).

``-f`` keeps it in the foreground (no fork), as the real ``-f``.
"""

from __future__ import annotations

import fcntl
import os
import resource
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cvmfsd.loader import LoaderCode
from cvmfsd.sim import cvmfsconf
from cvmfsd.sim._client import CatalogError, Client
from cvmfsd.sim._settings import VERSION, Settings, SettingsError, make_settings
from cvmfsd.sim.stratum import StratumError, validate_fqrn

USAGE = (
    "Usage: cvmfs2 [-h] [-V] [-f] [-d] [-o mount options] <repository name> <mount point>\n"
    "Mount options: config=<file>[:<file>...], debug, and FUSE options (ignored)\n"
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


def _lock(settings: Settings) -> int:
    """Take the per-repository lock in the workspace; return its descriptor."""
    path = settings.workspace / f"lock.{settings.fqrn}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LoaderFailure(
            LoaderCode.DOUBLE_MOUNT, f"Repository {settings.fqrn} is already mounted on {holder}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{settings.mountpoint}\n".encode(), 0)
    return fd


def _talk_socket(settings: Settings) -> socket.socket:
    path = settings.talk_socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)  # a dead daemon's socket; the lock says it is dead
        sock.bind(str(path))
        path.chmod(0o660)
        sock.listen(8)
    except OSError as exc:
        sock.close()
        raise LoaderFailure(
            LoaderCode.TALK, f"failed to initialize talk socket {path} ({exc.strerror or exc})"
        ) from None
    return sock


def _initialise(client: Client) -> tuple[int, socket.socket]:
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
        s.workspace.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoaderFailure(
            LoaderCode.CACHE_DIR, f"Failed to setup cache in {s.cache_dir}: {exc.strerror or exc}"
        ) from None
    lock_fd = _lock(client.settings)
    try:
        client.apply(client.load())
    except CatalogError as exc:
        client.log.info(f"failed to load the root catalog: {exc}")
        raise LoaderFailure(LoaderCode.CATALOG, "Failed to initialize root file catalog") from None
    return lock_fd, _talk_socket(s)


def _mount(client: Client) -> None:
    import pyfuse3

    from cvmfsd.sim._fs import CvmfsOperations

    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise LoaderFailure(LoaderCode.PERMISSION, "Failed to open /dev/fuse: permission denied")
    mnt = client.settings.mountpoint
    if not Path(mnt).is_dir():
        raise LoaderFailure(LoaderCode.MOUNT, f"Failed to mount: {mnt} is not a directory")
    options = {"fsname=cvmfs2", "ro", "nodev", "nosuid", "default_permissions"}
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
        client.settings.talk_socket.unlink(missing_ok=True)
        client.close_all()
    pyfuse3.close(unmount=not unmounted)
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
    os.setsid()
    os.chdir("/")
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
    if args and args[0] in ("-V", "--version"):
        print(f"CernVM-FS version {VERSION}")
        return 0
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    try:
        options, fqrn, mountpoint, foreground = _parse_args(args)
        validate_fqrn(fqrn)
    except (LoaderFailure, StratumError) as exc:
        sys.stderr.write(f"{exc}\n{USAGE}")
        return LoaderCode.OPTIONS
    print("CernVM-FS: loading Fuse module... ", end="", flush=True)
    try:
        settings = _read_config(options, fqrn, str(Path(mountpoint).absolute()))
    except LoaderFailure as exc:
        _fail(exc.code, exc.reason)
        return exc.code
    client = Client(settings)
    try:
        _raise_nofile(settings)
        lock_fd, talk = _initialise(client)
        print("done", flush=True)
        try:
            _mount(client)
        except LoaderFailure:
            talk.close()
            settings.talk_socket.unlink(missing_ok=True)
            raise
    except LoaderFailure as exc:
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
