"""The control channel's unix-socket server (the protocol itself is :mod:`cvmfsd.protocol`).

One task per connection, so a slow or stuck client only holds up itself: every
read has an idle deadline and every write a send deadline.  The peer's
credentials (SO_PEERCRED) are checked on every connection: only our own uid
is served.  The socket is created mode 0600 in a 0700 directory that we own,
on a host path: cvmfsexec binds the whole host / into the namespace, so the
same path works inside.

What the verbs do is up to a :class:`Backend`, which the supervisor fills in.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NoReturn

import structlog
import trio

from cvmfsd import budget, protocol
from cvmfsd.config import bind_socket
from cvmfsd.errors import CvmfsdError, LocalProtocolError
from cvmfsd.protocol import ErrorCode, Request, Response, Verb
from cvmfsd.shim import received_fds
from cvmfsd.state import DaemonState, LiveConfig

log = structlog.get_logger("cvmfsd.control")

IDLE_TIMEOUT = 60.0  # seconds a connection may sit without a complete request
IDLE_SLACK = 1 / 60  # the idle deadline is not moved by less than this part of it
SEND_TIMEOUT = 10.0  # seconds a client may take to read a response
MAX_FDS = 3  # descriptors a request may bring (exec: stdin, stdout, stderr)
_UCRED = struct.Struct("3i")
# Another uid knocking is worth a line in the log, not one line per connection.
_warn_refused = budget.RateLimitedWarning("control connection refused")


class RequestFailed(Exception):
    """A verb cannot be carried out; becomes an error response, not a crash."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Backend:
    """What the verbs act on; the supervisor provides each piece.

    Attributes:
        locate: maps a path under /cvmfs to where this process can see it
            (``/proc/<shim>/root/cvmfs/...`` in mode 3), or None while CVMFS
            is not provided.
        run_exec: runs a command inside the namespace; None when exec is
            disabled (the default, like cvmfsexec's -N).
        metrics, classad: give the metrics text / ClassAd lines; None while
            there are none.
        on_request: told the verb of every request answered (counted).
        probe_now: returns once ``repo`` has been probed afresh and the state
            shows the result (so ``status`` is never behind what ``wait``
            saw); None when nothing watches the repositories.
    """

    state: DaemonState
    config: LiveConfig
    export: Callable[[Mapping[str, str]], dict[str, str]]
    locate: Callable[[str], Path | None]
    mounts: Callable[[], list[dict[str, str]]]
    remount: Callable[[str], Awaitable[str]]
    stop: Callable[[], Awaitable[None]]
    run_exec: Callable[[protocol.ExecArgs, Sequence[int]], Awaitable[int]] | None = None
    metrics: Callable[[], str] | None = None
    classad: Callable[[], str] | None = None
    on_request: Callable[[str], None] = lambda verb: None
    probe_now: Callable[[str], Awaitable[None]] | None = None
    owner_uid: int = field(default_factory=os.getuid)
    # config.visible() of each key asked for, for one version of the values
    # (LiveConfig hands out the same mapping until the file changes).
    _shown: tuple[Mapping[str, str], dict[str, bool]] = field(
        default=({}, {}), init=False, repr=False)

    def visible(self, values: Mapping[str, str], key: str) -> bool:
        """Whether ``key`` of ``values`` (``config.values()``) may be shown; worked out once."""
        seen, shown = self._shown
        if seen is not values:
            shown = {}
            self._shown = (values, shown)
        answer = shown.get(key)
        if answer is None:
            answer = shown[key] = self.config.visible(key, values[key])
        return answer


async def serve_control(path: Path, backend: Backend, *, max_connections: int | None = None,
                        listener: socket.socket | None = None,
                        accepting: trio.Event | None = None,
                        task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
                        ) -> NoReturn:
    """Listen on ``path`` until cancelled; ``task_status.started(path)`` once bound.

    ``listener``: the socket already bound there (:func:`cvmfsd.config.bind_socket`,
    which binds one by default).  ``accepting``: connections wait in the backlog
    until it is set (the supervisor's view is not yet what the payload already
    knows).  At most ``max_connections`` (default: the control share of the
    descriptor budget, :mod:`cvmfsd.budget`) are open at once.
    """
    # Local, tiny file-system calls on our own private directory: not worth a thread.
    listener = listener or bind_socket(path)
    try:
        if max_connections is None:
            max_connections = budget.connection_caps(budget.soft_nofile())[1]
        log.info("control socket ready", path=str(path), max_connections=max_connections)
        task_status.started(path)
        if accepting is not None:
            await accepting.wait()
        await budget.serve_pool(partial(_accept, listener),
                                partial(_serve_connection, backend=backend),
                                budget.Pool("control", max_connections))
    finally:
        listener.close()
        _unlink(path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # noqa: PTH108 - called from async code; pathlib is flagged there


async def _accept(listener: socket.socket) -> socket.socket:
    """The next connection, as a non-blocking plain socket (see :func:`_converse`)."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        try:
            conn, _addr = listener.accept()
        except BlockingIOError:
            continue  # the client gave up between the wake-up and the accept
        conn.setblocking(False)
        return conn


async def _serve_connection(conn: socket.socket, slot: budget.Slot, *,
                            backend: Backend) -> None:
    pid, uid, _gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    protocol_conn = protocol.ServerConnection()
    if uid != backend.owner_uid:
        _warn_refused(peer_pid=pid, peer_uid=uid)
        refusal = protocol.error(
            None, ErrorCode.REFUSED,
            f"uid {uid} may not use this cvmfsd (owner uid {backend.owner_uid})")
        with trio.CancelScope() as scope:
            await _send_all(conn, protocol_conn.send(refusal), scope)
        return
    fds: list[int] = []
    try:
        await _converse(conn, protocol_conn, backend, fds, slot)
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise
    finally:
        _close_all(fds)


def _descriptors_for(event: Request | protocol.BadMessage, fds: list[int]) -> list[int]:
    """Hand the descriptors held over to ``exec``; for anything else close them now."""
    if isinstance(event, Request) and event.verb is Verb.EXEC:
        taken, fds[:] = list(fds), []
        return taken
    _close_all(fds)
    return []


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


async def _converse(conn: socket.socket, protocol_conn: protocol.ServerConnection,
                    backend: Backend, fds: list[int], slot: budget.Slot) -> None:
    """Answer requests until the client is done, misbehaves, or idles past its deadline.

    The idle deadline starts when the server begins to wait for a request and
    reads do not move it: a client trickling a byte at a time is dropped on
    time.  Descriptors (SCM_RIGHTS) are held only until the request they came
    with is parsed, and only ``exec`` keeps them past that; more than
    ``MAX_FDS`` pending, or a truncated control message, ends the connection.

    Theory of operation (what a request costs)
    ==========================================

    A request of a busy connection must cost little more than the bytes it
    moves: entering a trio cancel scope, or trio's socket methods (which
    yield to the scheduler after every call that did not block), each cost
    as much as parsing the request.  So the socket is a plain non-blocking
    one, and the connection has one cancel scope whose deadline is moved
    only when it must be:

    * waiting for a request: the idle deadline, set after each response.
      When it would move by less than ``IDLE_SLACK`` of ``IDLE_TIMEOUT`` it
      is left alone, so a connection is dropped after 59 to 60 seconds
      without a complete request (one move a second at most);
    * answering: none.  Most verbs answer at once (``_ANSWERS``): a plain
      call, no coroutine, nothing a deadline could interrupt.  The verbs
      that wait by design (``_WAITING``) run with no deadline;
    * writing a response that does not fit in the socket's buffer: the
      client gets ``SEND_TIMEOUT`` from then on to read it.

    The scope's expiry ends the connection, as any of the deadlines should.
    A response that fits is written at once, then the loop checkpoints
    once: the other connections run, so a pipelining client cannot keep
    them waiting, and by the time this one is back its client has most
    often sent the next request, which ``recvmsg`` then reads without a
    wait (a wait costs two ``epoll_ctl`` calls and a trip through the
    scheduler).
    """
    with trio.CancelScope(deadline=trio.current_time() + IDLE_TIMEOUT) as scope:
        while True:
            event = protocol_conn.next_event()
            if event is protocol.NEED_DATA:
                slot.idle()
                received = _receive(conn, protocol_conn, fds)
                if received is None:
                    await trio.lowlevel.wait_readable(conn)
                elif not received:
                    await _send_final(conn, protocol_conn, scope, protocol.error(
                        None, ErrorCode.BAD_REQUEST, f"more than {MAX_FDS} descriptors sent "
                        "with one request; the connection will be closed"))
                    return
                continue
            if event is protocol.EOF:
                return
            slot.busy()
            taken = _descriptors_for(event, fds)
            if isinstance(event, protocol.BadMessage):
                response = event.response()
            elif event.verb in _WAITING:
                scope.deadline = math.inf
                response = await _answer_waiting(event, backend, taken)
            else:
                response = _answer_now(event, backend)
            await _send_all(conn, _encode(protocol_conn, response), scope)
            if protocol_conn.must_close:
                return
            idle = trio.current_time() + IDLE_TIMEOUT
            if not idle - IDLE_TIMEOUT * IDLE_SLACK <= scope.deadline <= idle:
                scope.deadline = idle
            await trio.lowlevel.checkpoint()  # see the theory of operation


_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)


def _receive(conn: socket.socket, protocol_conn: protocol.ServerConnection,
             fds: list[int]) -> bool | None:
    """Read what has arrived into ``protocol_conn``, and the descriptors that came with it.

    Returns None if nothing had, and False (having closed every descriptor
    held) if the client sent more than ``MAX_FDS``: the connection must end.
    """
    try:
        data, ancdata, flags, _addr = conn.recvmsg(65536, _ANCILLARY_SPACE)
    except BlockingIOError:
        return None
    if ancdata:
        fds.extend(received_fds(ancdata))
    if len(fds) > MAX_FDS or flags & socket.MSG_CTRUNC:
        _close_all(fds)
        return False
    protocol_conn.receive_data(data)
    return True


async def _send_final(conn: socket.socket, protocol_conn: protocol.ServerConnection,
                      scope: trio.CancelScope, response: Response) -> None:
    """Write the last ``response`` of a connection, within ``SEND_TIMEOUT``."""
    scope.deadline = trio.current_time() + SEND_TIMEOUT
    await _send_all(conn, _encode(protocol_conn, response), scope)


def _encode(protocol_conn: protocol.ServerConnection, response: Response) -> bytes:
    try:
        return protocol_conn.send(response)
    except LocalProtocolError as exc:
        if exc.code == ErrorCode.TOO_LARGE.value:  # over MAX_RESPONSE: say so, nothing partial
            return protocol_conn.send(protocol.error(
                response.id, ErrorCode.TOO_LARGE, f"{exc}; ask for less (cvmfsctl get KEY)"))
        return protocol_conn.send(protocol.error(response.id, ErrorCode.INTERNAL, str(exc)))


async def _send_all(conn: socket.socket, data: bytes, scope: trio.CancelScope) -> None:
    """Write ``data``: at once if it fits, else within ``SEND_TIMEOUT`` (``scope``'s deadline)."""
    try:
        sent = conn.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    scope.deadline = trio.current_time() + SEND_TIMEOUT
    view = memoryview(data)[sent:]
    while view:
        await trio.lowlevel.wait_writable(conn)
        try:
            sent = conn.send(view)
        except BlockingIOError:
            continue
        view = view[sent:]


def _answer_now(request: Request, backend: Backend) -> Response:
    """The response to a request whose verb answers at once (not in ``_WAITING``)."""
    try:
        result = _ANSWERS[request.verb](request, backend)
    except Exception as exc:  # every failure becomes an error response
        return _failed(request, exc)
    return _succeeded(request, backend, result)


async def _answer_waiting(request: Request, backend: Backend, fds: list[int]) -> Response:
    """The response to a request whose verb waits; ``fds`` are closed when it is done."""
    try:
        result = await _WAITING[request.verb](request, backend, fds)
    except Exception as exc:  # every failure becomes an error response
        return _failed(request, exc)
    finally:
        _close_all(fds)
    return _succeeded(request, backend, result)


def _succeeded(request: Request, backend: Backend, result: object) -> Response:
    backend.state.control_requests += 1
    backend.on_request(request.verb.value)
    return protocol.ok(request.id, result)


def _failed(request: Request, exc: Exception) -> Response:
    """The error response for ``exc``; call it while handling ``exc`` (it may log the traceback)."""
    if isinstance(exc, RequestFailed):
        return protocol.error(request.id, exc.code, str(exc))
    if isinstance(exc, CvmfsdError):
        return protocol.error(request.id, ErrorCode.UNAVAILABLE, str(exc))
    log.exception("control verb failed", verb=request.verb.value)
    return protocol.error(request.id, ErrorCode.INTERNAL,
                          f"{request.verb.value} failed inside cvmfsd; see its log")


def _ping(request: Request, backend: Backend) -> object:
    from cvmfsd import __version__

    return {"pong": True, "version": __version__, "protocol": protocol.VERSION}


def _status(request: Request, backend: Backend) -> object:
    return backend.state.snapshot()


def _get(request: Request, backend: Backend) -> object:
    args = request.args
    assert isinstance(args, protocol.GetArgs)  # noqa: S101 - VERBS guarantees it
    values = backend.config.values()
    if args.key not in values:
        raise RequestFailed(ErrorCode.NOT_FOUND, f"{args.key} is not set in glidein_config")
    if not backend.visible(values, args.key):
        raise RequestFailed(ErrorCode.REFUSED, f"{args.key} looks like a secret and is withheld; "
                            "the pilot can allow it with cvmfsd run --allow-key")
    return {"key": args.key, "value": values[args.key]}


def _env(request: Request, backend: Backend) -> object:
    exported = backend.export(backend.config.values())
    return {"variables": exported, "shell": protocol.shell_exports(exported)}


def _config(request: Request, backend: Backend) -> object:
    values = backend.config.values()
    return {k: v for k, v in values.items() if backend.visible(values, k)}


async def _mounts(request: Request, backend: Backend, fds: list[int]) -> object:
    return await trio.to_thread.run_sync(backend.mounts)


async def _wait(request: Request, backend: Backend, fds: list[int]) -> object:
    args = request.args
    assert isinstance(args, protocol.WaitArgs)  # noqa: S101 - VERBS guarantees it
    repo = args.path[len("/cvmfs/"):].split("/", 1)[0]
    if repo not in backend.state.repos:
        raise RequestFailed(ErrorCode.NOT_FOUND, f"{repo} is not mounted by this cvmfsd "
                            f"(its repositories: {', '.join(backend.state.repos) or 'none'})")
    delay = 0.05
    with trio.move_on_after(args.timeout) as scope:
        while True:
            where = backend.locate(args.path)
            # A hung mount must not hang the server: the check runs in a
            # thread that is abandoned when the deadline passes.
            if where is not None and await trio.to_thread.run_sync(
                    os.path.lexists, where, abandon_on_cancel=True):
                break
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)
    if not scope.cancelled_caught:
        # The path may be from a revision the watcher has not probed yet: have
        # it probed before answering, so that a status asked after this answer
        # never shows an older revision than the one the path came with.
        if backend.probe_now is not None:
            await backend.probe_now(repo)
        return {"path": args.path, "exists": True}
    raise RequestFailed(ErrorCode.TIMEOUT, f"{args.path} did not appear within {args.timeout:g} s")


async def _exec(request: Request, backend: Backend, fds: list[int]) -> object:
    args = request.args
    assert isinstance(args, protocol.ExecArgs)  # noqa: S101 - VERBS guarantees it
    if backend.run_exec is None:
        raise RequestFailed(ErrorCode.REFUSED, "exec is disabled; the pilot can enable it with "
                            "cvmfsd run --allow-exec")
    if len(fds) != 3:
        raise RequestFailed(ErrorCode.BAD_REQUEST, f"exec needs the caller's stdin, stdout and "
                            f"stderr passed with SCM_RIGHTS; got {len(fds)} descriptors")
    return {"status": await backend.run_exec(args, fds)}


async def _remount(request: Request, backend: Backend, fds: list[int]) -> object:
    args = request.args
    assert isinstance(args, protocol.RemountArgs)  # noqa: S101 - VERBS guarantees it
    if args.repo not in backend.state.repos:
        raise RequestFailed(ErrorCode.NOT_FOUND, f"{args.repo} is not one of this cvmfsd's "
                            f"repositories ({', '.join(backend.state.repos) or 'none'})")
    try:
        answer = await backend.remount(args.repo)
    except OSError as exc:
        raise RequestFailed(ErrorCode.UNAVAILABLE, f"{args.repo}: {exc}") from None
    return {"repo": args.repo, "answer": answer}


async def _stop(request: Request, backend: Backend, fds: list[int]) -> object:
    await backend.stop()
    return {"stopping": True}


def _metrics(request: Request, backend: Backend) -> object:
    if backend.metrics is None:
        raise RequestFailed(ErrorCode.UNAVAILABLE, "metrics are not collected yet")
    return {"text": backend.metrics()}


def _classad(request: Request, backend: Backend) -> object:
    if backend.classad is None:
        raise RequestFailed(ErrorCode.UNAVAILABLE, "metrics are not collected yet")
    return {"text": backend.classad()}


# Verbs that answer at once, without a deadline of their own: a plain call.
_ANSWERS: Mapping[Verb, Callable[[Request, Backend], object]] = {
    Verb.PING: _ping, Verb.STATUS: _status, Verb.GET: _get, Verb.ENV: _env,
    Verb.CONFIG: _config, Verb.METRICS: _metrics, Verb.CLASSAD: _classad,
}
# Verbs that wait by design (for a thread, a path, a command, a remount, the stop):
# no deadline while they run.  Only exec takes the request's descriptors.
_WAITING: Mapping[Verb, Callable[[Request, Backend, list[int]], Awaitable[object]]] = {
    Verb.MOUNTS: _mounts, Verb.WAIT: _wait, Verb.EXEC: _exec, Verb.REMOUNT: _remount,
    Verb.STOP: _stop,
}
