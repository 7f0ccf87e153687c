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
from cvmfsd.config import prepare_socket_dir
from cvmfsd.errors import CvmfsdError, LocalProtocolError
from cvmfsd.protocol import ErrorCode, Request, Response, Verb
from cvmfsd.shim import received_fds
from cvmfsd.state import DaemonState, LiveConfig

log = structlog.get_logger("cvmfsd.control")

IDLE_TIMEOUT = 60.0  # seconds a connection may sit without a complete request
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


async def serve_control(path: Path, backend: Backend, *, max_connections: int | None = None,
                        task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
                        ) -> NoReturn:
    """Listen on ``path`` until cancelled; ``task_status.started(path)`` once bound.

    At most ``max_connections`` (default: the control share of the descriptor
    budget, :mod:`cvmfsd.budget`) are open at once.
    """
    prepare_socket_dir(path)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Local, tiny file-system calls on our own private directory: not worth a thread.
    try:
        _unlink(path)
        old_umask = os.umask(0o177)
        try:
            await listener.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)  # noqa: PTH101 - see above
        listener.listen(128)
        if max_connections is None:
            max_connections = budget.connection_caps(budget.soft_nofile())[1]
        log.info("control socket ready", path=str(path), max_connections=max_connections)
        task_status.started(path)

        async def accept() -> trio.socket.SocketType:
            conn, _ = await listener.accept()
            return conn

        await budget.serve_pool(accept, partial(_serve_connection, backend=backend),
                                budget.Pool("control", max_connections))
    finally:
        listener.close()
        _unlink(path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # noqa: PTH108 - called from async code; pathlib is flagged there


async def _serve_connection(conn: trio.socket.SocketType, slot: budget.Slot, *,
                            backend: Backend) -> None:
    pid, uid, _gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    protocol_conn = protocol.ServerConnection()
    if uid != backend.owner_uid:
        _warn_refused(peer_pid=pid, peer_uid=uid)
        refusal = protocol.error(
            None, ErrorCode.REFUSED,
            f"uid {uid} may not use this cvmfsd (owner uid {backend.owner_uid})")
        with trio.move_on_after(SEND_TIMEOUT):
            await conn.send(protocol_conn.send(refusal))
        return
    fds: list[int] = []
    try:
        await _converse(conn, protocol_conn, backend, fds, slot)
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise
    finally:
        _close_all(fds)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


async def _converse(conn: trio.socket.SocketType, protocol_conn: protocol.ServerConnection,
                    backend: Backend, fds: list[int], slot: budget.Slot) -> None:
    """Answer requests until the client is done, misbehaves, or idles past its deadline.

    The idle deadline starts when the server begins to wait for a request and
    reads do not move it: a client trickling a byte at a time is dropped on
    time.  Descriptors (SCM_RIGHTS) are held only until the request they came
    with is parsed, and only ``exec`` keeps them past that; more than
    ``MAX_FDS`` pending, or a truncated control message, ends the connection.
    """
    space = socket.CMSG_SPACE(MAX_FDS * 4)
    deadline = trio.current_time() + IDLE_TIMEOUT
    while True:
        event = protocol_conn.next_event()
        if event is protocol.NEED_DATA:
            slot.idle()
            with trio.move_on_at(deadline):
                data, ancdata, flags, _addr = await conn.recvmsg(65536, space)
                fds.extend(received_fds(ancdata))
                if len(fds) > MAX_FDS or flags & socket.MSG_CTRUNC:
                    _close_all(fds)
                    response = protocol.error(
                        None, ErrorCode.BAD_REQUEST, f"more than {MAX_FDS} descriptors sent "
                        "with one request; the connection will be closed")
                    with trio.move_on_after(SEND_TIMEOUT):
                        await _send_all(conn, _encode(protocol_conn, response))
                    return
                protocol_conn.receive_data(data)
                continue
            return  # idle for too long
        if event is protocol.EOF:
            return
        slot.busy()
        if isinstance(event, protocol.BadMessage):
            _close_all(fds)
            response = event.response()
        elif event.verb is Verb.EXEC:
            taken, fds[:] = list(fds), []
            response = await _dispatch(event, backend, taken)
        else:
            _close_all(fds)  # only exec uses descriptors: closed before the verb runs
            response = await _dispatch(event, backend, [])
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            await _send_all(conn, _encode(protocol_conn, response))
        if scope.cancelled_caught or protocol_conn.must_close:
            return
        deadline = trio.current_time() + IDLE_TIMEOUT


def _encode(protocol_conn: protocol.ServerConnection, response: Response) -> bytes:
    try:
        return protocol_conn.send(response)
    except LocalProtocolError as exc:
        if exc.code == ErrorCode.TOO_LARGE.value:  # over MAX_RESPONSE: say so, nothing partial
            return protocol_conn.send(protocol.error(
                response.id, ErrorCode.TOO_LARGE, f"{exc}; ask for less (cvmfsctl get KEY)"))
        return protocol_conn.send(protocol.error(response.id, ErrorCode.INTERNAL, str(exc)))


async def _send_all(conn: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await conn.send(view)
        view = view[sent:]


async def _dispatch(request: Request, backend: Backend, fds: list[int]) -> Response:
    try:
        handler = _HANDLERS[request.verb]
        result = await handler(request, backend, fds)
    except RequestFailed as exc:
        return protocol.error(request.id, exc.code, str(exc))
    except CvmfsdError as exc:
        return protocol.error(request.id, ErrorCode.UNAVAILABLE, str(exc))
    except Exception:
        log.exception("control verb failed", verb=request.verb.value)
        return protocol.error(request.id, ErrorCode.INTERNAL,
                              f"{request.verb.value} failed inside cvmfsd; see its log")
    finally:
        for fd in fds:
            os.close(fd)
        fds.clear()
    backend.state.control_requests += 1
    backend.on_request(request.verb.value)
    return protocol.ok(request.id, result)


Handler = Callable[[Request, Backend, list[int]], Awaitable[object]]


async def _ping(request: Request, backend: Backend, fds: list[int]) -> object:
    from cvmfsd import __version__

    return {"pong": True, "version": __version__, "protocol": protocol.VERSION}


async def _status(request: Request, backend: Backend, fds: list[int]) -> object:
    return backend.state.snapshot()


async def _get(request: Request, backend: Backend, fds: list[int]) -> object:
    args = request.args
    assert isinstance(args, protocol.GetArgs)  # noqa: S101 - VERBS guarantees it
    values = backend.config.values()
    if args.key not in values:
        raise RequestFailed(ErrorCode.NOT_FOUND, f"{args.key} is not set in glidein_config")
    if not backend.config.visible(args.key, values[args.key]):
        raise RequestFailed(ErrorCode.REFUSED, f"{args.key} looks like a secret and is withheld; "
                            "the pilot can allow it with cvmfsd run --allow-key")
    return {"key": args.key, "value": values[args.key]}


async def _env(request: Request, backend: Backend, fds: list[int]) -> object:
    exported = backend.export(backend.config.values())
    return {"variables": exported, "shell": protocol.shell_exports(exported)}


async def _config(request: Request, backend: Backend, fds: list[int]) -> object:
    values = backend.config.values()
    return {k: v for k, v in values.items() if backend.config.visible(k, v)}


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


async def _metrics(request: Request, backend: Backend, fds: list[int]) -> object:
    if backend.metrics is None:
        raise RequestFailed(ErrorCode.UNAVAILABLE, "metrics are not collected yet")
    return {"text": backend.metrics()}


async def _classad(request: Request, backend: Backend, fds: list[int]) -> object:
    if backend.classad is None:
        raise RequestFailed(ErrorCode.UNAVAILABLE, "metrics are not collected yet")
    return {"text": backend.classad()}


_HANDLERS: Mapping[Verb, Handler] = {
    Verb.PING: _ping, Verb.STATUS: _status, Verb.GET: _get, Verb.ENV: _env,
    Verb.CONFIG: _config, Verb.MOUNTS: _mounts, Verb.WAIT: _wait, Verb.EXEC: _exec,
    Verb.REMOUNT: _remount, Verb.STOP: _stop, Verb.METRICS: _metrics, Verb.CLASSAD: _classad,
}
