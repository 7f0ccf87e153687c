"""A cvmfs_talk client for trio: one command per connection, always with a deadline.

What the client must allow for, from cvmfs2's side (tests/test_fidelity_talk.py
names the upstream lines):

* One responder thread answers one command at a time, and some commands wait
  on others (``cache size``, ``remount sync``), so every call is bounded.
* The socket listens with a backlog of 1: a connect while another client is
  being served may find the queue full.  A non-blocking ``connect`` then
  fails with EAGAIN (Linux), so this client retries, with a short backoff,
  until its deadline.  ECONNREFUSED (nobody listens: cvmfs2 is gone) is not
  retried.  (trio's own ``connect`` would wait for writability
  and then take the unconnected socket for connected.)
* Commands are at most 512 bytes.
* cvmfs2 binds the socket relative to its workspace (``./cvmfs_io.<fqrn>``),
  so it works at any depth; an absolute path does not fit ``sun_path``
  (108 bytes) in a glidein's deep scratch directory.  So the client opens
  the workspace directory and connects through
  ``/proc/self/fd/<dirfd>/cvmfs_io.<fqrn>``, a short path at any depth.

The socket is on the host file system even in mode 3, so no namespace needs
entering.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import trio

TALK_TIMEOUT = 5.0
MAX_COMMAND = 512  # bytes: cvmfs2 reads no more of a command (talk.h)
RETRY_FIRST, RETRY_MAX = 0.005, 0.1  # backoff while the listen queue is full


def short_address(dirfd: int, name: str) -> str:
    """A path to ``name`` in the directory open as ``dirfd`` that fits ``sun_path``."""
    return f"/proc/self/fd/{dirfd}/{name}"


async def _connect(path: Path) -> socket.socket:
    """A connected (non-blocking) stdlib socket to ``path``; retries a full queue forever.

    The caller bounds it.  A socket nobody listens on (ECONNREFUSED: its cvmfs2
    is gone) fails at once: waiting for it would only delay whoever asks (the
    watcher asks a just-died cvmfs2 for its pid, and its next probe waited).
    """
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        address = short_address(dirfd, path.name)
        delay = RETRY_FIRST
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                sock.connect(address)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EAGAIN:
                    raise OSError(exc.errno, f"cannot connect to {path}: {exc.strerror}") from None
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            return sock
    finally:
        os.close(dirfd)


async def talk(path: Path, command: str, *, deadline: float = TALK_TIMEOUT) -> str:
    """Send ``command`` to the talk socket at ``path`` and return the whole answer.

    Raises:
        ValueError: ``command`` is longer than cvmfs2 reads.
        TimeoutError: no complete answer within ``deadline`` seconds (this
            includes a socket that never accepted the connection).
        OSError: the socket cannot be reached (no such repository mounted, ...).
    """
    data = command.encode()
    if len(data) > MAX_COMMAND:
        raise ValueError(f"cvmfs_talk command of {len(data)} bytes: cvmfs2 reads at most "
                         f"{MAX_COMMAND}")
    try:
        with trio.fail_after(deadline):
            with trio.socket.from_stdlib_socket(await _connect(path)) as sock:
                await sock.send(data)
                chunks = []
                while True:
                    chunk = await sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
    except trio.TooSlowError:
        raise TimeoutError(f"cvmfs_talk {command!r} on {path}: no answer within "
                           f"{deadline:g} s") from None
    return b"".join(chunks).decode(errors="replace")
