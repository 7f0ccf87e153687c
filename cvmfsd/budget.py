"""The descriptor budget: how many files cvmfsd may open, and who gets them.

Theory of operation
===================

Every connection costs cvmfsd a descriptor, and a descriptor cvmfsd cannot
get is a crash waiting to happen: ``accept()`` raising EMFILE used to end
the run and, with it, the namespace and the pilot's payload.  Three rules
keep the process inside its budget whatever a local user or the payload does:

1. At start the soft ``RLIMIT_NOFILE`` is raised toward the hard limit (up to
   ``NOFILE_CEILING``), so the budget is as large as the node allows.
2. Each listener gets a share of the budget (:func:`connection_caps`) and a
   :class:`Pool` that never holds more connections than its share.  When the
   pool is full, the connection that has been waiting longest for a request
   is dropped to make room (an idle socket is the cheap attack; a client that
   is being answered is never dropped); when none is waiting, new connections
   stay queued in the kernel's backlog until one ends.
3. Should ``accept()`` still fail for want of descriptors or memory (another
   part of cvmfsd, or the whole node, ran out), the listener does what trio's
   ``serve_listeners`` does: sleep 100 ms and try again.  The warning is
   logged at most once per ``WARN_INTERVAL`` per listener, with a count of what
   it did not repeat, so a flood cannot flood the log too.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Awaitable, Callable
from typing import NoReturn, Protocol, TypeVar

import structlog
import trio

log = structlog.get_logger("cvmfsd.budget")

NOFILE_CEILING = 65536  # children inherit the limit; programs that close every fd up to it pay
RESERVED = 256  # descriptors kept for cvmfsd itself: logs, /proc reads, children, pipes
MAX_HTTP = 512  # connections to /metrics (one descriptor each)
MAX_CONTROL = 128  # control connections (each may also hold SCM_RIGHTS descriptors)
CONTROL_COST = 4  # one socket and up to three received descriptors (exec's stdio)
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY = 0.1  # seconds, as trio.serve_listeners
WARN_INTERVAL = 10.0  # seconds between two warnings of one kind from one listener
MAX_EVICTING = 8  # connections dropped but not yet closed, at most


def raise_nofile_limit(ceiling: int = NOFILE_CEILING) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE toward the hard limit, never above ``ceiling``.

    Never lowers it.  Returns the (old, new) soft limit; a refusal by the
    kernel leaves the limit as it was (the budget then shrinks to fit).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the descriptor limit", soft=soft, hard=hard,
                        error=str(exc))
            return soft, soft
        log.info("descriptor limit raised", soft=target, was=soft, hard=hard)
        return soft, target
    return soft, soft


def soft_nofile() -> int:
    """The current soft RLIMIT_NOFILE (unlimited counts as the ceiling)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return NOFILE_CEILING if soft == resource.RLIM_INFINITY else soft


def connection_caps(soft_limit: int) -> tuple[int, int]:
    """(HTTP, control) connection caps that fit in ``soft_limit`` descriptors.

    Half of what is not reserved goes to each listener; each cap is at least 8
    so that a tiny limit still serves the pilot.
    """
    share = max(soft_limit - RESERVED, 0) // 2
    return (max(8, min(MAX_HTTP, share)), max(8, min(MAX_CONTROL, share // CONTROL_COST)))


class RateLimitedWarning:
    """A warning logged at most once per ``interval``, with how often it was held back."""

    def __init__(self, event: str, interval: float = WARN_INTERVAL, **context: object) -> None:
        self._event, self._interval, self._context = event, interval, context
        self._next = -float("inf")
        self.suppressed = 0

    def __call__(self, **details: object) -> None:
        now = trio.current_time()
        if now < self._next:
            self.suppressed += 1
            return
        log.warning(self._event, **self._context, **details, repeated=self.suppressed)
        self._next, self.suppressed = now + self._interval, 0


class _Closable(Protocol):
    def close(self) -> None: ...


_Socket = TypeVar("_Socket", bound=_Closable)  # a trio socket, or a plain non-blocking one


class Slot:
    """One connection's place in a :class:`Pool`; ``idle`` while it waits for a request."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.scope = trio.CancelScope()

    @property
    def evicted(self) -> bool:
        """Dropped by the pool to make room for a newer connection."""
        return self.scope.cancel_called

    def idle(self) -> None:
        """Waiting for the client's next request: may be dropped when the pool is full."""
        self._pool._idle[self] = None

    def busy(self) -> None:
        """A request is being answered: kept until it is done."""
        self._pool._idle.pop(self, None)


class Pool:
    """At most ``limit`` connections of one listener; see the module's theory of operation."""

    def __init__(self, name: str, limit: int) -> None:
        self.name, self.limit = name, limit
        self.open = 0
        self.evicted_total = 0
        self._idle: dict[Slot, None] = {}  # oldest first
        self._evicting = 0
        self._changed = trio.lowlevel.ParkingLot()
        self._warn_evict = RateLimitedWarning("dropping idle connections: too many open",
                                              listener=name, limit=limit)

    async def wait_for_room(self) -> None:
        """Return once a new connection can be taken (possibly by dropping an idle one)."""
        while self.open - self._evicting >= self.limit and not (
                self._idle and self._evicting < MAX_EVICTING):
            await self._changed.park()

    def admit(self) -> Slot:
        """A slot for a connection just accepted, dropping the oldest idle one if full."""
        if self.open - self._evicting >= self.limit and self._idle:
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            oldest.scope.cancel()
            self._evicting += 1
            self.evicted_total += 1
            self._warn_evict(open=self.open)
        self.open += 1
        return Slot(self)

    def release(self, slot: Slot) -> None:
        """The connection of ``slot`` is closed."""
        self._idle.pop(slot, None)
        self.open -= 1
        if slot.evicted:
            self._evicting -= 1
        self._changed.unpark_all()


async def serve_pool(accept: Callable[[], Awaitable[_Socket]],
                     handle: Callable[[_Socket, Slot], Awaitable[None]],
                     pool: Pool) -> NoReturn:
    """Accept connections forever and run ``handle(sock, slot)`` for each, within ``pool``.

    ``handle`` should mark its slot idle while it waits for a request; it runs
    inside the slot's cancel scope, and the socket is closed when it returns.

    Error handling:
        EMFILE, ENFILE, ENOMEM and ENOBUFS from accept: a rate-limited warning,
        100 ms of sleep, and another try.  Other errors propagate.
    """
    warn = RateLimitedWarning("accept failed for want of resources; retrying",
                              listener=pool.name, retry_seconds=ACCEPT_RETRY)
    async with trio.open_nursery() as nursery:
        while True:
            await pool.wait_for_room()
            try:
                sock = await accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                warn(error=errno.errorcode[exc.errno], reason=os.strerror(exc.errno),
                     open=pool.open)
                await trio.sleep(ACCEPT_RETRY)
                continue
            nursery.start_soon(_run, sock, handle, pool, pool.admit())


async def _run(sock: _Socket, handle: Callable[[_Socket, Slot], Awaitable[None]],
               pool: Pool, slot: Slot) -> None:
    try:
        with slot.scope:
            await handle(sock, slot)
    finally:
        sock.close()
        pool.release(slot)
