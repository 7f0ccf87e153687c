"""Unix socket paths longer than ``sun_path``, as cvmfs's util/posix.cc handles them.

``MakeSocket`` and ``ConnectSocket`` (util/posix.cc:296-340 and :427-455 at
cvmfs ae7450ec9) reach a path of 108 bytes or more through a temporary
symlink ``/tmp/cvmfs.XXXXXX/l`` to its directory, removed right after the
bind or connect.  The simulated cvmfs2 binds its talk socket this way, and the
simulated ``cvmfs_talk`` connects this way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

SUN_PATH_MAX = 108


def make_short_socket_link(path: str) -> str | None:
    """``MakeShortSocketLink`` (util/posix.cc): ``/tmp/cvmfs.XXXXXX/l`` -> the socket's dir."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix="cvmfs.", dir="/tmp"))
    except OSError:
        return None
    link = tmp / "l"
    # GetParentPath/GetFileName split at the last '/' (the path may be relative).
    parent, _, name = path.rpartition("/")
    result = f"{link}/{name}"
    if len(os.fsencode(result)) >= SUN_PATH_MAX:
        tmp.rmdir()
        return None
    try:
        link.symlink_to(parent)
    except OSError:
        tmp.rmdir()
        return None
    return result


def remove_short_socket_link(short: str) -> None:
    link = Path(short).parent
    with contextlib.suppress(OSError):
        link.unlink()
    with contextlib.suppress(OSError):
        link.parent.rmdir()




def shortened(path: str) -> str:
    """``path``, or a temporary link's path to it when it does not fit ``sun_path``.

    Raises:
        OSError: ENAMETOOLONG, when even the link's path would not fit.
    """
    if len(os.fsencode(path)) < SUN_PATH_MAX:
        return path
    made = make_short_socket_link(path)
    if made is None:
        raise OSError(errno.ENAMETOOLONG, "cannot shorten the socket path", path)
    return made


@contextlib.contextmanager
def short_path(path: str) -> Iterator[str]:
    """:func:`shortened` ``path`` for one bind or connect; the link goes right after."""
    short = shortened(path)
    try:
        yield short
    finally:
        if short != path:
            remove_short_socket_link(short)


def make_socket(path: str, mode: int) -> socket.socket:
    """``MakeSocket`` (util/posix.cc ~325-380): bind a unix socket at ``path``.

    A path of ``sizeof(sun_path)`` (108) bytes or more is bound through a
    temporary symlink ``/tmp/cvmfs.XXXXXX/l`` to its directory, which is
    removed right after the bind. The socket gets ``mode`` before the bind
    (the kernel applies the umask to it). A bind failing with EADDRINUSE
    unlinks ``path`` and tries once more.

    Raises:
        OSError: the socket cannot be bound.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), mode)
        with short_path(path) as short:
            try:
                sock.bind(short)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                Path(path).unlink()  # "Second try, perhaps the file was left over"
                sock.bind(short)
    except OSError:
        sock.close()
        raise
    return sock


def connect_socket(path: str) -> socket.socket:
    """``ConnectSocket``: a unix stream socket connected to ``path``, however long.

    Raises:
        OSError: it cannot be connected (or the path cannot be shortened).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(path) as short:
            sock.connect(short)
    except OSError:
        sock.close()
        raise
    return sock
