"""HTTP ``/metrics``, served from the trio event loop.

A deliberately small HTTP/1.1 server: ``GET`` and ``HEAD`` of ``/metrics``
(OpenMetrics or the Prometheus text format, as the ``Accept`` header asks)
and ``/`` (a pointer to ``/metrics``); keep-alive, as Prometheus uses it.
Bodies come from memory (:meth:`cvmfsd.metrics.Metrics.render`), so a hung
repository cannot delay an answer.  Every read has a deadline and a size
limit; a bad request gets a 4xx and the connection is closed.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn

import structlog
import trio

from cvmfsd import budget

log = structlog.get_logger("cvmfsd.httpd")

MAX_HEAD = 16384  # bytes of request line and headers
IDLE_DEADLINE = 60.0  # policy: seconds a connection may sit between requests
SEND_DEADLINE = 10.0  # policy: seconds to hand an answer to a slow client
LINGER_DEADLINE = 2.0  # policy: seconds to drain a closing client's input
LINGER_BYTES = 262144  # and at most this much of it

Render = Callable[[str], "tuple[bytes, str]"]  # Accept header -> (body, content type)


class BadRequest(Exception):
    """The client sent something this server does not take; answer and close."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Method, path, version and headers (lower-case names) of a request head.

    Raises:
        BadRequest: the head is not an HTTP/1.x request.
    """
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes any byte
        raise BadRequest("400 Bad Request", str(exc)) from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("400 Bad Request",
                         f"request line {lines[0][:80]!r}: expected METHOD PATH HTTP/1.x")
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest("400 Bad Request", f"header line {line[:80]!r}: expected Name: value")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers


def respond(method: str, path: str, headers: dict[str, str],
            render: Render) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status line, headers and body for one request."""
    if headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers:
        raise BadRequest("400 Bad Request", "request bodies are not accepted")
    route = path.split("?", 1)[0]
    if route not in ("/metrics", "/"):
        return "404 Not Found", [("Content-Type", "text/plain")], b"not found; try /metrics\n"
    if method not in ("GET", "HEAD"):
        return ("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")],
                b"only GET and HEAD\n")
    if route == "/":
        return ("200 OK", [("Content-Type", "text/html; charset=utf-8")],
                b'<html><body><a href="/metrics">cvmfsd metrics</a></body></html>\n')
    body, content_type = render(headers.get("accept", ""))
    return "200 OK", [("Content-Type", content_type)], body


async def serve_metrics(host: str, port: int, render: Render, *,
                        max_connections: int | None = None,
                        sockets: Sequence[socket.socket] = (),
                        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
                        ) -> NoReturn:
    """Serve until cancelled; ``task_status`` gets the bound (host, port).

    ``sockets``: listening already (:func:`cvmfsd.config.bind_tcp`); by default
    ``host`` and ``port`` are bound here.  At most ``max_connections`` (default:
    the HTTP share of the descriptor budget, :mod:`cvmfsd.budget`) are open at
    once, over all listeners.
    """
    if sockets:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    else:
        listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    if max_connections is None:
        max_connections = budget.connection_caps(budget.soft_nofile())[0]
    pool = budget.Pool("http", max_connections)
    log.info("serving metrics", address=f"http://{_hostport(bound[0], bound[1])}/metrics",
             max_connections=max_connections)

    async def handle(sock: trio.socket.SocketType, slot: budget.Slot) -> None:
        await _connection(trio.SocketStream(sock), render, slot)

    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(budget.serve_pool, _acceptor(listener), handle, pool)
            task_status.started((bound[0], bound[1]))
            await trio.sleep_forever()
    finally:
        for listener in listeners:
            listener.socket.close()
    raise AssertionError("unreachable")  # pragma: no cover


def _acceptor(listener: trio.SocketListener) -> Callable[[], Awaitable[trio.socket.SocketType]]:
    async def accept() -> trio.socket.SocketType:
        sock, _ = await listener.socket.accept()
        return sock
    return accept


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _connection(stream: trio.SocketStream, render: Render,
                      slot: budget.Slot | None = None) -> None:
    buffer = bytearray()
    try:
        async with stream:
            while True:
                if slot is not None:
                    slot.idle()
                head = await _read_head(stream, buffer)
                if head is None:
                    return
                if slot is not None:
                    slot.busy()
                keep = await _answer(stream, head, render)
                if not keep:
                    if slot is not None:
                        slot.idle()
                    await _linger(stream)
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        return


async def _linger(stream: trio.SocketStream) -> None:
    """Read what the client still sends before closing, so that its unread bytes (a
    head over the limit, say) do not make the kernel reset the connection and
    destroy the answer before the client has read it.  Bounded in time and bytes."""
    await stream.send_eof()
    with trio.move_on_after(LINGER_DEADLINE):
        drained = 0
        while drained < LINGER_BYTES:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            drained += len(chunk)


# The blank line that ends a head.  A bare LF ends lines too (RFC 9112 section 2.2
# lets a server take it), so "GET / HTTP/1.1\n\n" is answered, not left waiting.
_HEAD_END = re.compile(rb"\n\r?\n")


async def _read_head(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """The next request head, or None when the client is done (or idle too long).

    The deadline counts from the moment the server starts waiting, so a client
    that trickles bytes cannot extend it; a head that is not complete within
    ``MAX_HEAD`` bytes is ``b""`` (answered 431) however the bytes arrive, as no
    read asks for more than the limit leaves room for.
    """
    with trio.move_on_after(IDLE_DEADLINE):
        while True:
            end = _HEAD_END.search(buffer, 0, MAX_HEAD + 3)
            if end is not None:
                head = bytes(buffer[:end.start()])
                del buffer[:end.end()]
                return head
            room = MAX_HEAD + 3 - len(buffer)
            if room <= 0:
                return b""  # answered as a bad request
            chunk = await stream.receive_some(room)
            if not chunk:
                return None
            buffer += chunk
    return None


async def _answer(stream: trio.SocketStream, head: bytes, render: Render) -> bool:
    """Answer one request; whether the connection may carry another."""
    keep = False
    try:
        if not head:
            raise BadRequest("431 Request Header Fields Too Large",
                             f"request head over {MAX_HEAD} bytes")
        method, path, version, headers = parse_head(head)
        connection = headers.get("connection", "").lower()
        keep = connection != "close" and (version != "HTTP/1.0" or connection == "keep-alive")
        status, extra, body = respond(method, path, headers, render)
    except BadRequest as exc:
        status, extra, body = exc.status, [("Content-Type", "text/plain")], f"{exc}\n".encode()
        keep = False
        method = ""
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in extra),
             f"Content-Length: {len(body)}", f"Connection: {'keep-alive' if keep else 'close'}"]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with trio.fail_after(SEND_DEADLINE):
        await stream.send_all(data if method == "HEAD" else data + body)
    return keep
