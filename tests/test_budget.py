"""The descriptor budget and input bounds (issue 12, items 1, 3 and 10), acted out.

Each test does what a hostile party can do: another local user floods /metrics
with connections or oversized heads; the payload (the pilot's own uid,
untrusted) floods the control socket, sends descriptors without a request, or
trickles bytes.  cvmfsd must go on serving the pilot.  Loopback only; every
test is bounded by a ``fail_after`` or a subprocess timeout.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from cvmfsd import budget, control, ctl, httpd
from tests.test_control import make_backend

CVMFSD = [sys.executable, "-m", "cvmfsd"]
CVMFSCTL = str(Path(sys.executable).parent / "cvmfsctl")


# -- item 10: small things ------------------------------------------------------------

@pytest.mark.parametrize("repos", ["../etc", "repo.a,../../x", "/etc", "a b"])
def test_probe_validates_repos_like_run(repos: str) -> None:
    """``cvmfsd probe --repos ../etc`` is refused with exit 2 and a message, as ``run`` is."""
    result = subprocess.run([*CVMFSD, "probe", "--repos", repos], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "--repos: invalid repository name" in result.stderr
    assert "Traceback" not in result.stderr
    assert "repos_present" not in result.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root connects whatever the socket's mode")
def test_cvmfsctl_on_a_socket_it_may_not_open(tmp_path: Path) -> None:
    """EACCES connecting: a clear error and exit 77, no traceback (as the CI user)."""
    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        path.chmod(0)
        for argv in (["ping"], ["wait", "/cvmfs/repo.a", "--timeout", "1"]):
            result = subprocess.run([CVMFSCTL, "--socket", str(path), *argv],
                                    capture_output=True, text=True, timeout=30, check=False)
            assert result.returncode == 77
            assert result.stderr == (f"cvmfsctl: cannot connect to cvmfsd at {path}: Permission "
                                     "denied (the socket serves only the uid that runs cvmfsd)\n")


@pytest.mark.parametrize(("code", "status", "message"), [
    (errno.EACCES, 77, "cannot connect to cvmfsd at S: Permission denied"),
    (errno.ENOBUFS, 69, "cannot talk to cvmfsd at S: No buffer space available"),
    (errno.ENOTSOCK, 69, "cannot talk to cvmfsd at S: Socket operation on non-socket"),
])
def test_cvmfsctl_reports_os_errors_without_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        code: int, status: int, message: str) -> None:
    """Any OSError while connecting ends cvmfsctl with one line and an exit status."""
    def refuse(self: socket.socket, address: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert ctl.main(["--socket", "S", "ping"]) == status
    err = capsys.readouterr().err
    assert err.startswith(f"cvmfsctl: {message}")
    assert err.count("\n") == 1


# -- HTTP: heads, bare LF, trickles, floods ------------------------------------------

def _metrics_render(accept: str) -> tuple[bytes, str]:
    return b"cvmfs_up 1\n", "text/plain; version=0.0.4"


async def _http(port: int, data: bytes, *, deadline: float = 5.0) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        chunks = []
        with trio.fail_after(deadline):
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("size", [16 * 1024 + 100, 20 * 1024, 24 * 1024, 200 * 1024])
async def test_http_head_limit_holds_whatever_arrives_at_once(size: int) -> None:
    """A complete head over 16 KiB sent in one piece gets 431, not 200."""
    head = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * size + b"\r\n\r\n"
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(httpd.serve_metrics, "127.0.0.1", 0, _metrics_render)
        answer = await _http(port, head)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
        nursery.cancel_scope.cancel()


async def test_http_head_just_under_the_limit_is_served() -> None:
    """The limit is the head's size, so a head just under it is answered."""
    head = b"GET /metrics HTTP/1.1\r\nX: "
    head += b"a" * (httpd.MAX_HEAD - len(head) - 4) + b"\r\n\r\n"
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(httpd.serve_metrics, "127.0.0.1", 0, _metrics_render)
        assert (await _http(port, head.replace(b"HTTP/1.1", b"HTTP/1.0"))).startswith(
            b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("request_bytes", [
    b"GET /metrics HTTP/1.0\n\n",
    b"GET /metrics HTTP/1.0\nAccept: */*\n\n",
    b"GET /metrics HTTP/1.0\r\nAccept: */*\n\r\n",
])
async def test_http_bare_lf_is_answered_at_once(request_bytes: bytes) -> None:
    """Lines ended by a bare LF are taken (RFC 9112 2.2): answered within 2 s, not 60."""
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(httpd.serve_metrics, "127.0.0.1", 0, _metrics_render)
        answer = await _http(port, request_bytes, deadline=2.0)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"cvmfs_up 1\n")
        nursery.cancel_scope.cancel()


async def test_http_trickle_cannot_extend_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client sending a byte every 0.3 s is dropped at the deadline (1 s here)."""
    monkeypatch.setattr(httpd, "IDLE_DEADLINE", 1.0)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(httpd.serve_metrics, "127.0.0.1", 0, _metrics_render)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        start = trio.current_time()
        with trio.fail_after(5):
            for byte in b"GET /metrics HTTP/1.1\r\nX: abcdefghijklmnop":
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break
                if await _closed(stream, 0.3):
                    break
        assert 0.9 <= trio.current_time() - start <= 2.0
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def _closed(stream: trio.SocketStream, wait: float) -> bool:
    with trio.move_on_after(wait):
        try:
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True
    return False


async def test_http_flood_of_idle_connections_never_starves_a_scrape() -> None:
    """With 300 idle connections against a cap of 32, each new scrape is answered at once,
    and no more than the cap (plus those being dropped) is ever open."""
    base = _fd_count()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(partial(httpd.serve_metrics, max_connections=32),
                                      "127.0.0.1", 0, _metrics_render)
        flood = []
        for _ in range(300):
            flood.append(await trio.open_tcp_stream("127.0.0.1", port))
        for _ in range(5):
            with trio.fail_after(0.1):
                answer = await _http(port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert answer.endswith(b"cvmfs_up 1\n")
        assert _fd_count() < base + 300 + 32 + budget.MAX_EVICTING + 8
        for stream in flood:
            await stream.aclose()
        nursery.cancel_scope.cancel()


def _fd_count() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


# -- control socket: the payload floods it -------------------------------------------

@pytest.fixture(name="glidein_config")
def _glidein_config(short_tmp: Path) -> Path:
    path = short_tmp / "glidein_config"
    path.write_text("GLIDEIN_Site A Site\n")
    return path


PING = b'{"v":1,"verb":"ping"}\n'


def _ping(path: Path, timeout: float = 2.0) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(PING)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, "closed without an answer"
            answer += chunk
    return dict(json.loads(answer))


def _send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def _serve(nursery: trio.Nursery, short_tmp: Path, glidein_config: Path,
                 **kwargs: object) -> Path:
    path: Path = await nursery.start(partial(control.serve_control, **kwargs),  # type: ignore[arg-type]
                                     short_tmp / "s" / "c.sock", make_backend(glidein_config))
    return path


async def test_control_descriptors_without_a_request_are_bounded(
        short_tmp: Path, glidein_config: Path) -> None:
    """SCM_RIGHTS sent again and again without a newline: refused after 3 held, all closed."""
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, short_tmp, glidein_config)
        base = _fd_count()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            await trio.to_thread.run_sync(_send_fds, sock, b"{", [0, 1])
            await trio.to_thread.run_sync(_send_fds, sock, b"\"", [0, 1])
            answer = await trio.to_thread.run_sync(_recv_all, sock)
        assert b'"code":"bad-request"' in answer and b"more than 3 descriptors" in answer
        await trio.sleep(0.05)
        assert _fd_count() <= base
        assert (await trio.to_thread.run_sync(_ping, path))["ok"] is True
        nursery.cancel_scope.cancel()


async def test_control_too_many_descriptors_in_one_message(short_tmp: Path,
                                                           glidein_config: Path) -> None:
    """200 descriptors in one message: the kernel drops what does not fit, cvmfsd the rest."""
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, short_tmp, glidein_config)
        base = _fd_count()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            await trio.to_thread.run_sync(_send_fds, sock, PING, [1] * 200)
            answer = await trio.to_thread.run_sync(_recv_all, sock)
        assert b"more than 3 descriptors" in answer
        await trio.sleep(0.05)
        assert _fd_count() <= base
        nursery.cancel_scope.cancel()


async def test_control_descriptors_closed_before_the_verb_runs(short_tmp: Path,
                                                               glidein_config: Path) -> None:
    """Descriptors that came with a verb other than exec are closed before it is answered."""
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, short_tmp, glidein_config)
        base = _fd_count()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            await trio.to_thread.run_sync(_send_fds, sock, PING, [0, 1, 2])
            answer = await trio.to_thread.run_sync(sock.recv, 65536)
            assert b'"pong":true' in answer
            # the connection is open (one descriptor here, one in the server); no more
            assert _fd_count() <= base + 2
        nursery.cancel_scope.cancel()


async def test_control_trickle_cannot_extend_the_deadline(
        monkeypatch: pytest.MonkeyPatch, short_tmp: Path, glidein_config: Path) -> None:
    """A client sending a byte every 0.3 s is dropped at the idle deadline (1 s here)."""
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 1.0)
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, short_tmp, glidein_config)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            await sock.connect(str(path))
            start = trio.current_time()
            closed = False
            with trio.fail_after(5):
                for byte in b'{"v":1,"verb":"ping","id":"abcdefghijklmnopqrstuvwxyz"}':
                    try:
                        await sock.send(bytes([byte]))
                    except OSError:
                        closed = True
                        break
                    with trio.move_on_after(0.3):
                        if await sock.recv(1) == b"":
                            closed = True
                            break
            assert closed
            assert 0.9 <= trio.current_time() - start <= 2.0
        nursery.cancel_scope.cancel()


async def test_control_flood_of_idle_connections_never_starves_a_client(
        short_tmp: Path, glidein_config: Path) -> None:
    """The payload holds 400 idle connections against a cap of 16: pings answered in 100 ms,
    and cvmfsd holds no more than the cap (plus those being dropped)."""
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, short_tmp, glidein_config, max_connections=16)
        base = _fd_count()
        flood = []
        try:
            with trio.fail_after(10):
                for _ in range(400):
                    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    flood.append(sock)
                    await sock.connect(str(path))
            await trio.sleep(0.2)
            assert _fd_count() <= base + 400 + 16 + budget.MAX_EVICTING
            for _ in range(5):
                with trio.fail_after(0.1):
                    assert (await trio.to_thread.run_sync(_ping, path))["ok"] is True
        finally:
            for sock in flood:
                sock.close()
        nursery.cancel_scope.cancel()
