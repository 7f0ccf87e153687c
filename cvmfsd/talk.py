"""A cvmfs_talk client for trio: one command per connection, always with a deadline.

cvmfs2 answers its talk socket with one responder thread, one command at a
time, and some commands wait on others (``cache size``, ``remount sync``), so
every call here is bounded (cvmfs-facts.md, part B §2).  The socket is on the
host file system even in mode 3, so no namespace needs entering.
"""

from __future__ import annotations

import socket
from pathlib import Path

import trio

TALK_TIMEOUT = 5.0


async def talk(path: Path, command: str, *, deadline: float = TALK_TIMEOUT) -> str:
    """Send ``command`` to the talk socket at ``path`` and return the whole answer.

    Raises:
        TimeoutError: no complete answer within ``timeout`` seconds.
        OSError: the socket cannot be reached (no such repository mounted, ...).
    """
    try:
        with trio.fail_after(deadline):
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                await sock.connect(str(path))
                await sock.send(command.encode())
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
