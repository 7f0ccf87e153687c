"""The ``cvmfs_talk`` control socket of the simulated ``cvmfs2``.

Like the real responder (``talk.cc`` ``MainResponder``), connections are
served one at a time: **one** ``recv`` of at most 512 bytes
(``kMaxCommandSize``, talk.h:42) is the command, a single trailing NUL
dropped, nothing else trimmed (``"pid\n"`` is an unknown command); anything a
client sent beyond 512 bytes is never read, the answer goes to the first 512
and the connection is shut down. The listen backlog is 1 (talk.cc:89). The
socket lives in the trio loop next to the FUSE handlers but never waits on
them, so it keeps answering while the file system hangs.

Where the simulation differs: a client that connects and sends nothing is
dropped after 10 s; the real responder waits in ``recv`` for ever and
answers nobody else meanwhile.

Besides the real commands, three **simulation-only** commands inject faults
on demand (they do not exist in real CVMFS):

- ``sim crash``: answer ``OK`` then abort the process (the mount turns ENOTCONN);
- ``sim hang``: every FUSE request stalls from now on;
- ``sim eio on`` / ``sim eio off``: make every read fail with EIO / go back to
  the fault file's ``eio`` knob.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from typing import NoReturn

import trio

from cvmfsd.sim import _report
from cvmfsd.sim._client import Client
from cvmfsd.sim._settings import VERSION

MAX_COMMAND = 512  # TalkManager::kMaxCommandSize (talk.h:42)
_CONNECTION_TIMEOUT = 10.0  # policy: a client that sends nothing is dropped

_STATIC: dict[str, Callable[[Client], str]] = {
    "cache size": _report.cache_size,
    "host info": _report.host_info,
    "internal affairs": _report.internal_affairs,
    "metrics prometheus": _report.metrics_prometheus,
    "mountpoint": lambda c: c.settings.mountpoint + "\n",
    "open catalogs": _report.open_catalogs,
    "parameters": _report.parameters,
    "pid": lambda c: f"{os.getpid()}\n",
    # Separate processes, as upstream (talk.cc ~671-677).
    "pid cachemgr": lambda c: f"{c.cachemgr_pid}\n",
    "pid watchdog": lambda c: f"{c.watchdog_pid}\n",
    "proxy info": _report.proxy_info,
    "revision": lambda c: f"{c.tree.manifest.revision}\n",
    "timeout info": _report.timeout_info,
    "version": lambda c: f"{VERSION} (CernVM-FS Fuse Module)\n{VERSION} (Loader)\n",
}


async def answer(client: Client, command: str, crash: Callable[[str], NoReturn]) -> str:
    """Compute the answer to one talk command (may change state).

    ``sim crash`` is the exception: it returns ``OK`` and the caller must call
    ``crash`` after sending it.
    """
    static = _STATIC.get(command)
    if static is not None:
        return static(client)
    if command in ("remount", "remount sync"):
        return await trio.to_thread.run_sync(client.check_revision) + "\n"
    if command == "reset error counters":
        client.reset_error_counters()
        return "OK\n"
    if command.startswith("sim "):
        return _simulation_command(client, command)
    return "unknown command\n"


def _simulation_command(client: Client, command: str) -> str:
    """The simulation-only fault commands (``sim crash`` is finished by the caller)."""
    if command == "sim hang":
        client.hanging = True
        client.log.info("simulated hang: FUSE requests stall from now on")
    elif command in ("sim eio on", "sim eio off"):
        client.eio_override = True if command.endswith("on") else None
    elif command != "sim crash":
        return "unknown command\n"
    return "OK\n"


async def serve_talk(
    client: Client,
    sock: trio.socket.SocketType,
    crash: Callable[[str], NoReturn],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Answer talk commands on the listening socket ``sock`` forever."""
    task_status.started()
    while True:
        conn, _ = await sock.accept()
        stream = trio.SocketStream(conn)
        command = ""
        with trio.move_on_after(_CONNECTION_TIMEOUT):
            data = await stream.receive_some(MAX_COMMAND)
            if data.endswith(b"\0"):
                data = data[:-1]
            command = data.decode(errors="replace")
            if data:
                client.log.debug(f"received {command} (length {len(data)})")
                reply = await answer(client, command, crash)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(reply.encode())
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()
        if command == "sim crash":
            crash("sim crash via cvmfs_talk")
