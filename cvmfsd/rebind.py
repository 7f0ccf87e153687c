"""Put a repository's mount back at ``/cvmfs/<repo>`` in cvmfsd's mode-3 namespace.

Theory of operation
-------------------
cvmfsexec's request processor (``proccmd``, cvmfsexec 4.51) unmounts a
repository only if ``umount /cvmfs/<repo>`` succeeds: otherwise it answers 1,
removes the directory and keeps the repository in its list of mounted ones,
and a MOUNTREPO of a listed repository does nothing.  So once
``/cvmfs/<repo>`` has lost its mount (a lazy unmount from inside the
namespace), no request can bring the repository back.  This helper gives the
processor something to unmount again: it joins the user namespace that owns
the namespace's mounts (``unshare -rm`` made it, and it belongs to our uid, so
joining it gives its capabilities; the shim and namespace PID 1 are in a user
namespace of their own, without them) and the mount namespace and its root
(cvmfsexec pivots into a new one), makes ``/cvmfs/<repo>`` and bind-mounts
``<dist>/dist/cvmfs/<repo>`` there, as cvmfsexec does after each mount.  If
cvmfs2 still serves that mount, the repository is whole again; if not, the
remount that follows gets through UMOUNTREPO.

A process of its own: ``setns`` into a user namespace needs a single-threaded
caller.  Usage::

    python -m cvmfsd.rebind SHIM_PID SOURCE TARGET

``SHIM_PID`` is the shim, whose mount namespace and root are joined.  Exit
status 0: bound, or something is mounted at ``TARGET`` already; 1: the
reason is on stderr.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 4096


class RebindError(Exception):
    """The bind could not be made; the message says what and where."""


def _mounted(target: str, table: Path) -> bool:
    from cvmfsd.mountinfo import parse_mountinfo

    text = table.read_text(encoding="utf-8", errors="surrogateescape")
    return any(m.mountpoint == target for m in parse_mountinfo(text))


def rebind(shim_pid: int, source: str, target: str) -> bool:
    """Join the shim's mounts and bind ``source`` at ``target``; False if something is there.

    Raises:
        RebindError: the namespace is gone, a join or the mount failed.
    """
    import fcntl

    from cvmfsd.enter import NS_GET_USERNS, setns_function

    proc = f"/proc/{shim_pid}"
    fds: dict[str, int] = {}
    try:
        # Read from here: in the namespace our pid, and so /proc/self, is not in its /proc.
        if _mounted(target, Path(f"{proc}/mountinfo")):
            return False
        fds["mnt"] = os.open(f"{proc}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        fds["root"] = os.open(f"{proc}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # The owner of the mounts: namespace PID 1 and the shim live in a user
        # namespace of their own, without the capabilities (cvmfsexec's unshare -U).
        fds["user"] = int(fcntl.ioctl(fds["mnt"], NS_GET_USERNS))
    except OSError as exc:
        for fd in fds.values():
            os.close(fd)
        raise RebindError(f"the namespace of the shim (pid {shim_pid}) is gone or closed "
                          f"to us: {exc}") from None
    setns = setns_function()
    try:
        for kind, nstype in (("user", CLONE_NEWUSER), ("mnt", CLONE_NEWNS)):
            try:
                setns(fds[kind], nstype)
            except OSError as exc:
                raise RebindError(f"cannot join the shim's {kind} namespace: "
                                  f"{exc.strerror}") from None
        # Joining a mount namespace starts at its first root; cvmfsexec pivoted
        # into another one, where /cvmfs and the distribution's paths are.
        os.fchdir(fds["root"])
        os.chroot(".")
    finally:
        for fd in fds.values():
            os.close(fd)
    try:
        Path(target).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RebindError(f"cannot make {target} in the namespace: {exc.strerror}") from None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None) != 0:
        code = ctypes.get_errno()
        raise RebindError(f"bind mount of {source} at {target} in the namespace: "
                          f"{os.strerror(code)}")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or not args[0].isdigit():
        print("usage: python -m cvmfsd.rebind SHIM_PID SOURCE TARGET", file=sys.stderr)
        return 2
    try:
        bound = rebind(int(args[0]), args[1], args[2])
    except RebindError as exc:
        print(f"cvmfsd rebind: {exc}", file=sys.stderr)
        return 1
    print("bound" if bound else "mounted already")
    return 0


if __name__ == "__main__":
    sys.exit(main())
