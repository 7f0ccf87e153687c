"""The running daemon: FUSE loop, talk socket, revision and fault watchers.

Theory of operation: :func:`serve` owns one nursery with the talk server, the
revision watcher (re-reads the manifest when the root catalog TTL runs out),
the fault watcher (polls the stratum's fault knobs once a second and fires
``crash_after``/``hang_after``), the watchdog listener (monitor.cc
``MainWatchdogListener``: the watchdog gone means abort) and the signal
watcher. ``pyfuse3.main()``
runs in the nursery's body and returns when the file system is unmounted from
outside; a SIGTERM/SIGINT cancels everything instead, including FUSE handlers
stalled by a hang. Either way the session is closed afterwards, unmounting
only if nobody else did.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from typing import NoReturn

import pyfuse3
import trio

from cvmfsd.sim._client import Client
from cvmfsd.sim._talk import serve_talk
from cvmfsd.sim.stratum import StratumError

_FAULT_POLL = 1.0  # seconds between reads of the fault knobs
_PR_SET_DUMPABLE = 4


def crash(client: Client, reason: str) -> NoReturn:
    """Die like a cvmfs2 that received SIGABRT, leaving no core file behind.

    With a watchdog, as its crash-signal handler does (monitor.cc
    ``SendTrace``): tell the watchdog, which SIGKILLs this process and then
    runs its crash handler (lazy unmount after 2 s if it can regain root).
    Without one (``-o disable_watchdog``), abort. Either way the kernel then
    aborts the FUSE connection, so the mount answers ENOTCONN.
    """
    client.log.info(f"simulated crash ({reason}): signal 6")
    if client.watchdog is not None and client.watchdog.spawned:
        client.watchdog.send_trace(signal.SIGABRT, 0)
    _abort()


def _abort() -> NoReturn:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Not dumpable also stops pipe core handlers (systemd-coredump, apport).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    os.abort()


async def _watch_revision(client: Client) -> NoReturn:
    while True:
        left = client.expires_in()
        if left > 0:
            await trio.sleep(left)
            continue  # a talk remount may have renewed the TTL meanwhile
        # A failed check keeps the old revision with a short-term TTL (180 s).
        await trio.to_thread.run_sync(client.check_revision)


async def _watch_faults(client: Client, die: Callable[[str], NoReturn]) -> NoReturn:
    while True:
        try:
            client.faults = await trio.to_thread.run_sync(client.fetcher.fetch_faults)
        except StratumError as exc:
            client.log.info(f"ignoring malformed fault knobs: {exc}")
        faults = client.faults
        elapsed = time.monotonic() - client.mount_time
        if faults.crash_after is not None and elapsed >= faults.crash_after:
            die(f"crash_after={faults.crash_after}")
        if faults.hang_after is not None and elapsed >= faults.hang_after and not client.hanging:
            client.hanging = True
            client.log.info(f"simulated hang (hang_after={faults.hang_after})")
        wait = _FAULT_POLL
        for deadline in (faults.crash_after, faults.hang_after):
            if deadline is not None and deadline > elapsed:
                wait = min(wait, deadline - elapsed)
        await trio.sleep(wait)


async def _watch_watchdog(client: Client, listener: int) -> NoReturn:
    """Abort when the watchdog disappears (its end of the listener pipe hangs up)."""
    await trio.lowlevel.wait_readable(listener)
    client.log.info("watchdog disappeared, disabling stack trace reporting")
    client.log.info("watchdog disappeared, aborting")
    _abort()


async def serve(client: Client, talk: socket.socket, on_ready: Callable[[], None]) -> bool:
    """Serve the mounted file system until unmounted or signalled.

    Args:
        client: the repository state (catalog loaded, FUSE session initialised).
        talk: the bound, listening talk socket.
        on_ready: called once every service runs (tells the loader to exit 0).

    Returns:
        True if the file system was unmounted from outside, False if a signal
        stopped the daemon (then the caller must unmount).
    """

    def die(reason: str) -> NoReturn:
        crash(client, reason)

    unmounted_outside = False
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            sock = trio.socket.from_stdlib_socket(talk)
            await nursery.start(serve_talk, client, sock, die)
            nursery.start_soon(_watch_revision, client)
            nursery.start_soon(_watch_faults, client, die)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    client.log.info(f"received signal {signum}, unmounting")
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            on_ready()
            if client.watchdog is not None:
                nursery.start_soon(_watch_watchdog, client, client.watchdog.listener)
            await pyfuse3.main()
            unmounted_outside = True
            client.log.info("file system unmounted, exiting")
            nursery.cancel_scope.cancel()
    return unmounted_outside
