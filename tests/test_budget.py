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
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from cvmfsd import budget, control, ctl, httpd
from tests.conftest import reap
from tests.livedaemon import Daemon
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


async def test_control_descriptors_closed_before_a_waiting_verb_waits(
        short_tmp: Path, glidein_config: Path) -> None:
    """A descriptor sent with ``wait`` is closed at once, not held while the wait lasts."""
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, short_tmp, glidein_config)
        read_end, write_end = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                request = b'{"v":1,"verb":"wait","args":{"path":"/cvmfs/repo.a/x","timeout":60}}\n'
                await trio.to_thread.run_sync(_send_fds, sock, request, [write_end])
                os.close(write_end)
                # EOF on the pipe: the server's copy of its write end is closed too,
                # while the wait (for a path that never appears) goes on.
                with trio.fail_after(5):
                    got = await trio.to_thread.run_sync(
                        os.read, read_end, 1, abandon_on_cancel=True)
                assert got == b""
        finally:
            os.close(read_end)
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


# -- the budget itself ----------------------------------------------------------------

@pytest.mark.parametrize(("soft", "caps"), [
    (1024, (384, 96)), (20000, (512, 128)), (65536, (512, 128)), (300, (22, 8)), (64, (8, 8)),
])
def test_connection_caps_fit_the_limit(soft: int, caps: tuple[int, int]) -> None:
    """Both listeners' shares, at their worst, fit in the limit beside the reserve."""
    assert budget.connection_caps(soft) == caps


@pytest.mark.parametrize(("soft", "hard", "ceiling", "expected"), [
    (1024, 20000, 65536, 20000), (1024, 20000, 4096, 4096), (100, 100, 65536, 100),
    (8192, 20000, 4096, 8192),
])
def test_the_soft_limit_is_raised_toward_the_hard_one(soft: int, hard: int, ceiling: int,
                                                      expected: int) -> None:
    """Raised to min(hard, ceiling), never lowered; the hard limit is left alone."""
    if hard > resource.getrlimit(resource.RLIMIT_NOFILE)[1]:
        pytest.skip(f"the hard limit here is below {hard}")
    code = ("import resource; from cvmfsd import budget; "
            f"print(*budget.raise_nofile_limit({ceiling}), "
            "*resource.getrlimit(resource.RLIMIT_NOFILE))")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    assert result.stdout.split()[-4:] == [str(soft), str(expected), str(expected), str(hard)]


EMFILE_SERVER = """
import resource, sys, trio
from cvmfsd import httpd
resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
def render(accept): return b"up 1\\n", "text/plain"
async def main():
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(
            lambda task_status: httpd.serve_metrics("127.0.0.1", 0, render, max_connections=1000,
                                                    task_status=task_status))
        print("PORT", port, flush=True)
trio.run(main)
"""


def test_out_of_descriptors_on_accept_sleeps_and_retries(tmp_path: Path) -> None:
    """accept() failing with EMFILE (limit 48, cap 1000) neither crashes the server nor
    floods the log; once the flood ends, scrapes are answered again."""
    process = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        line = ""
        while not line.startswith("PORT"):
            line = process.stdout.readline()
            assert line, "the server did not start"
        port = int(line.split()[1])
        flood = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(120)]
        time.sleep(1.5)  # accept fails again and again meanwhile
        assert process.poll() is None
        for sock in flood:
            sock.close()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.endswith(b"up 1\n")
        assert process.poll() is None
    finally:
        process.kill()
        output, _ = process.communicate(timeout=30)
    warnings = [x for x in output.splitlines() if "accept failed" in x]
    assert 1 <= len(warnings) <= 2, output
    assert "EMFILE" in warnings[0]
    assert "Traceback" not in output


# -- a live cvmfsd, flooded from another process ---------------------------------------

FLOOD = """
import resource, socket, sys, time, array
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
kind, where, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
held = []
def one():
    if kind == "tcp":
        host, port = where.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=10)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(where)  # blocking: waits while the backlog is full
        fds = array.array("i", [0, 1, 2]).tobytes()
        try:  # descriptors without a newline, as the issue's payload did
            sock.sendmsg([b"{"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError:
            pass
    held.append(sock)
for _ in range(count):
    one()
print("READY", flush=True)
end = time.monotonic() + 20
while time.monotonic() < end:  # keep the pressure on: replace the oldest connections
    held.pop(0).close()
    one()
    time.sleep(0.002)
"""


@pytest.fixture(name="daemon")
def _daemon(dist: Path, short_tmp: Path) -> Iterator[Daemon]:
    daemon = Daemon(dist, short_tmp)
    yield daemon
    daemon.stop()


def _flood(kind: str, where: str, count: int) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", FLOOD, kind, where, str(count)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline() == "READY\n"
    return process


def _pilot_is_served(daemon: Daemon) -> None:
    for _ in range(10):
        start = time.monotonic()
        assert ctl.call(str(daemon.socket), "ping", timeout=5).error is None
        took_ping = time.monotonic() - start
        took_scrape, body = daemon.scrape()
        assert "cvmfs_mount_up" in body
        assert took_ping <= 0.1 and took_scrape <= 0.1, (took_ping, took_scrape)
    payload = daemon.status()["payload"]
    assert isinstance(payload, dict) and payload["status"] is None  # still running


@pytest.mark.fuse
def test_5000_connections_to_metrics_leave_the_pilot_served(daemon: Daemon) -> None:
    """Another process holds and churns 5,000 connections to /metrics: cvmfsd keeps
    answering the pilot's ping and scrape within 100 ms, and the payload keeps running."""
    flood = _flood("tcp", daemon.address, 5000)
    try:
        # The burst fills the kernel's accept queue (4,096); once cvmfsd has drained it,
        # with the churn going on, every answer must come within 100 ms.
        end = time.monotonic() + 5
        while daemon.scrape()[0] > 0.05 and time.monotonic() < end:
            time.sleep(0.1)
        _pilot_is_served(daemon)
        assert flood.poll() is None  # the flood was not refused wholesale: it was absorbed
    finally:
        reap(flood)
    assert daemon.process.poll() is None
    log = daemon.stop()
    assert "Traceback" not in log
    assert log.count("dropping idle connections") <= 3


@pytest.mark.fuse
def test_the_payload_flooding_the_control_socket_leaves_others_served(daemon: Daemon) -> None:
    """1,500 connections, each holding descriptors without a newline: cvmfsd survives and
    answers other clients within 100 ms."""
    flood = _flood("unix", str(daemon.socket), 1500)
    try:
        _pilot_is_served(daemon)
    finally:
        reap(flood)
    assert daemon.process.poll() is None
    assert "Traceback" not in daemon.stop()
