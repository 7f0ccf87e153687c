"""The control server over a real unix socket, with a fake backend (no FUSE needed)."""

from __future__ import annotations

import array
import gc
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from cvmfsd import control, ctl, protocol
from cvmfsd.sim import stratum
from cvmfsd.state import DaemonState, LiveConfig, RepoState
from tests.conftest import REPO_B, wait_for

CVMFSCTL = str(Path(sys.executable).parent / "cvmfsctl")


class Client:
    """A line-at-a-time client on one connection."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def ask(self, line: bytes) -> protocol.Response:
        await self.sock.send(line)
        return await self.answer()

    async def answer(self) -> protocol.Response:
        conn = protocol.ClientConnection()
        while True:
            event = conn.next_event()
            if isinstance(event, protocol.Response):
                return event
            assert event is protocol.NEED_DATA, "the server closed the connection"
            conn.receive_data(await self.sock.recv(65536))


@pytest.fixture(name="glidein_config")
def _glidein_config(short_tmp: Path) -> Path:
    path = short_tmp / "glidein_config"
    path.write_text("GLIDEIN_Site A Site\nGLIDEIN_PASSWORD hunter2\n")
    return path


def make_backend(glidein_config: Path, **overrides: object) -> control.Backend:
    stops: list[bool] = []

    async def remount(repo: str) -> str:
        return "Catalog up to date"

    async def stop() -> None:
        stops.append(True)

    fields: dict[str, object] = {
        "state": DaemonState(mode="mode3", repos={"repo.a": RepoState("ok", "3")}),
        "config": LiveConfig(glidein_config), "export": dict, "locate": lambda p: None,
        "mounts": list, "remount": remount, "stop": stop,
    }
    fields.update(overrides)
    return control.Backend(**fields)  # type: ignore[arg-type]


OPEN: list[Client] = []


async def connect(path: Path) -> Client:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    OPEN.append(Client(sock))
    return OPEN[-1]


def finish(nursery: trio.Nursery) -> None:
    """Close every client socket the test opened, then stop the server."""
    while OPEN:
        OPEN.pop().sock.close()
    nursery.cancel_scope.cancel()


async def serve(nursery: trio.Nursery, short_tmp: Path, backend: control.Backend) -> Path:
    started: Path = await nursery.start(control.serve_control, short_tmp / "s" / "c.sock", backend)
    return started


async def test_socket_is_private(short_tmp: Path, glidein_config: Path) -> None:
    """The socket is 0600 in a 0700 directory, and gone after the server stops."""
    async with trio.open_nursery() as nursery:
        path = await serve(nursery, short_tmp, make_backend(glidein_config))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        finish(nursery)
    assert not path.exists()


async def test_get_follows_the_file_and_withholds_secrets(short_tmp: Path,
                                                          glidein_config: Path) -> None:
    """get reads glidein_config as it is now; secret-looking keys are refused."""
    async with trio.open_nursery() as nursery:
        client = await connect(await serve(nursery, short_tmp, make_backend(glidein_config)))
        get = protocol.encode_request("get", {"key": "GLIDEIN_Site"})
        assert (await client.ask(get)).result == {"key": "GLIDEIN_Site", "value": "A Site"}
        with glidein_config.open("a") as f:
            f.write("GLIDEIN_Site Another  Site\n")
        assert (await client.ask(get)).result == {"key": "GLIDEIN_Site",
                                                 "value": "Another  Site"}
        secret = await client.ask(protocol.encode_request("get", {"key": "GLIDEIN_PASSWORD"}))
        assert secret.error is not None and secret.error.code is protocol.ErrorCode.REFUSED
        missing = await client.ask(protocol.encode_request("get", {"key": "NOPE"}))
        assert missing.error is not None and missing.error.code is protocol.ErrorCode.NOT_FOUND
        finish(nursery)


async def test_another_uid_is_refused(short_tmp: Path, glidein_config: Path) -> None:
    """A peer whose uid is not the owner's gets 'refused' and a closed connection."""
    backend = make_backend(glidein_config, owner_uid=os.getuid() + 1)
    async with trio.open_nursery() as nursery:
        client = await connect(await serve(nursery, short_tmp, backend))
        response = await client.answer()
        assert response.error is not None and response.error.code is protocol.ErrorCode.REFUSED
        assert f"uid {os.getuid()} may not use this cvmfsd" in response.error.message
        assert await client.sock.recv(10) == b""
        finish(nursery)


async def test_garbage_gets_errors_and_the_connection_survives(short_tmp: Path,
                                                               glidein_config: Path) -> None:
    """Malformed and unknown messages are answered with errors; ping still works after."""
    async with trio.open_nursery() as nursery:
        client = await connect(await serve(nursery, short_tmp, make_backend(glidein_config)))
        for line, code in ((b"not json\n", "bad-request"),
                           (b'{"v":1,"verb":"launch"}\n', "unknown-verb"),
                           (b'{"v":9,"verb":"ping"}\n', "unsupported-version")):
            response = await client.ask(line)
            assert response.error is not None and response.error.code.value == code
        assert (await client.ask(b'{"v":1,"verb":"ping"}\n')).ok
        finish(nursery)


async def test_oversized_message_closes_the_connection(short_tmp: Path,
                                                       glidein_config: Path) -> None:
    """More than 64 KiB without a newline: too-large, then the server hangs up."""
    async with trio.open_nursery() as nursery:
        client = await connect(await serve(nursery, short_tmp, make_backend(glidein_config)))
        response = await client.ask(b"x" * (protocol.MAX_MESSAGE + 10))
        assert response.error is not None and response.error.code is protocol.ErrorCode.TOO_LARGE
        assert await client.sock.recv(10) == b""
        finish(nursery)


async def test_a_stuck_client_does_not_block_others(short_tmp: Path,
                                                    glidein_config: Path) -> None:
    """One connection half-way through a line; another is served at once."""
    async with trio.open_nursery() as nursery:
        path = await serve(nursery, short_tmp, make_backend(glidein_config))
        stuck = await connect(path)
        await stuck.sock.send(b'{"v":1,"verb":')
        with trio.fail_after(2):
            other = await connect(path)
            assert (await other.ask(b'{"v":1,"verb":"ping"}\n')).ok
        finish(nursery)


async def test_a_client_that_does_not_read_is_dropped_after_the_send_timeout(
        monkeypatch: pytest.MonkeyPatch, short_tmp: Path, glidein_config: Path) -> None:
    """A response bigger than the socket buffers, never read: the connection is closed
    SEND_TIMEOUT after the write blocked, and other clients are served meanwhile."""
    monkeypatch.setattr(control, "SEND_TIMEOUT", 0.5)
    backend = make_backend(glidein_config, metrics=lambda: "x" * (3 * 1024 * 1024))
    async with trio.open_nursery() as nursery:
        path = await serve(nursery, short_tmp, backend)
        reader = await connect(path)
        await reader.sock.send(protocol.encode_request("metrics"))
        await trio.sleep(0.1)
        with trio.fail_after(0.3):
            assert (await (await connect(path)).ask(b'{"v":1,"verb":"ping"}\n')).ok
        await trio.sleep(0.6)  # the server gave up writing: it has closed its side
        received = 0
        with trio.fail_after(5):
            while chunk := await reader.sock.recv(1 << 20):
                received += len(chunk)
        assert 0 < received < 3 * 1024 * 1024
        finish(nursery)


class LongSteps(trio.abc.Instrument):
    """Counts trio task steps that took over 1 ms of CPU (CPU, not wall: a busy machine
    does not count)."""

    def __init__(self) -> None:
        self.count = 0
        self._start: float | None = None  # None: added during a step, which is not timed

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._start = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._start is not None and time.thread_time() - self._start > 0.001:
            self.count += 1


async def test_a_pipelining_client_does_not_hold_the_server(short_tmp: Path,
                                                            glidein_config: Path) -> None:
    """1,500 pings sent in one go are answered a few per task step, so no other client
    waits for the batch: without a checkpoint per answer the server runs for ms at a time
    (until its writes block), some 6 times here."""
    async with trio.open_nursery() as nursery:
        client = await connect(await serve(nursery, short_tmp, make_backend(glidein_config)))
        count = 1500
        steps = LongSteps()
        gc.disable()  # a collection would be a long step of its own
        trio.lowlevel.add_instrument(steps)
        try:
            await client.sock.send(b'{"v":1,"verb":"ping"}\n' * count)
            answered = 0
            with trio.fail_after(30):
                while answered < count:
                    answered += (await client.sock.recv(1 << 20)).count(b"\n")
        finally:
            trio.lowlevel.remove_instrument(steps)
            gc.enable()
        assert steps.count <= 2
        finish(nursery)


async def test_a_value_that_turns_secret_is_withheld(short_tmp: Path,
                                                     glidein_config: Path) -> None:
    """Whether a key may be shown is decided again when the file changes (a new value
    that looks like a token is withheld), not remembered from an earlier answer."""
    async with trio.open_nursery() as nursery:
        client = await connect(await serve(nursery, short_tmp, make_backend(glidein_config)))
        get = protocol.encode_request("get", {"key": "GLIDEIN_Site"})
        assert (await client.ask(get)).ok
        with glidein_config.open("a") as f:
            f.write("GLIDEIN_Site -----BEGIN PRIVATE KEY-----\n")
        answer = await client.ask(get)
        assert answer.error is not None and answer.error.code is protocol.ErrorCode.REFUSED
        finish(nursery)


async def test_the_idle_deadline_follows_the_last_answer(
        monkeypatch: pytest.MonkeyPatch, short_tmp: Path, glidein_config: Path) -> None:
    """A connection busy for longer than the idle timeout is kept, and dropped once it has
    been idle for (within 1/60 of) the idle timeout after its last answer."""
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.6)
    async with trio.open_nursery() as nursery:
        client = await connect(await serve(nursery, short_tmp, make_backend(glidein_config)))
        ping = b'{"v":1,"verb":"ping"}\n'
        for _ in range(10):  # 1 s of use, past the idle timeout
            await trio.sleep(0.1)
            assert (await client.ask(ping)).ok
        last = trio.current_time()
        with trio.fail_after(2):
            assert await client.sock.recv(10) == b""
        assert 0.6 * (1 - control.IDLE_SLACK) - 0.05 <= trio.current_time() - last <= 0.8
        finish(nursery)


async def test_exec_is_refused_unless_enabled(short_tmp: Path, glidein_config: Path) -> None:
    """exec answers 'refused' when the pilot did not enable it."""
    async with trio.open_nursery() as nursery:
        client = await connect(await serve(nursery, short_tmp, make_backend(glidein_config)))
        response = await client.ask(protocol.encode_request("exec", {"argv": ["true"]}))
        assert response.error is not None and response.error.code is protocol.ErrorCode.REFUSED
        finish(nursery)


async def test_exec_gets_the_callers_descriptors(short_tmp: Path, glidein_config: Path) -> None:
    """The three descriptors sent with SCM_RIGHTS reach the backend's exec."""
    seen: list[int] = []

    async def run_exec(args: protocol.ExecArgs, fds: Sequence[int]) -> int:
        os.write(fds[1], f"ran {' '.join(args.argv)}\n".encode())
        seen.extend(fds)
        return 3

    out_read, out_write = os.pipe()
    try:
        async with trio.open_nursery() as nursery:
            backend = make_backend(glidein_config, run_exec=run_exec)
            client = await connect(await serve(nursery, short_tmp, backend))
            data = protocol.encode_request("exec", {"argv": ["echo", "hi"]})
            fds = [0, out_write, 2]
            rights = array.array("i", fds).tobytes()
            await client.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            response = await client.answer()
            assert response.result == {"status": 3}
            assert os.read(out_read, 100) == b"ran echo hi\n"
            finish(nursery)
    finally:
        os.close(out_read)
        os.close(out_write)
    assert len(seen) == 3


@pytest.mark.parametrize("argv", [["get", "GLIDEIN_Site"], ["--json", "status"], ["ping"],
                                  ["mounts"], ["--socket", "/x/y", "env"]])
def test_fast_path_requests_are_protocol_requests(argv: list[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """cvmfsctl's hand-built requests parse exactly as the protocol module builds them."""
    monkeypatch.setenv("CVMFSD_SOCKET", "/run/x.sock")
    simple = ctl.fast_request(argv)
    assert simple is not None
    _path, verb, _as_json, data = simple
    server = protocol.ServerConnection()
    server.receive_data(data)
    parsed = server.next_event()
    assert isinstance(parsed, protocol.Request)
    args = {name: argv[-1] for name in [ctl.FAST_VERBS[verb]] if name}
    assert parsed == protocol.make_request(verb, args or None)


async def test_wait_on_a_repository_not_mounted_answers_at_once(
        short_tmp: Path, glidein_config: Path, tmp_path: Path) -> None:
    """wait on another repository: NOT_FOUND naming ours, at once, not after its timeout;
    on ours, the path is looked up below the repository (never outside /cvmfs)."""
    (tmp_path / "repo.a").mkdir()
    (tmp_path / "repo.a" / "x").touch()
    backend = make_backend(glidein_config, locate=lambda p: tmp_path / p[len("/cvmfs/"):])
    async with trio.open_nursery() as nursery:
        client = await connect(await serve(nursery, short_tmp, backend))
        with trio.fail_after(2):
            other = await client.ask(protocol.encode_request(
                "wait", {"path": "/cvmfs/repo.b/x", "timeout": 600}))
        assert not other.ok
        assert other.error is not None
        assert (other.error.code, other.error.message) == (
            protocol.ErrorCode.NOT_FOUND,
            "repo.b is not mounted by this cvmfsd (its repositories: repo.a)")
        ours = await client.ask(protocol.encode_request("wait", {"path": "/cvmfs/repo.a/x"}))
        assert ours.result == {"path": "/cvmfs/repo.a/x", "exists": True}
        finish(nursery)


@pytest.mark.parametrize("argv", [["wait", "/cvmfs/a.b"], ["exec", "--", "ls"], ["--help"],
                                  ["get"], ["get", "-x"], ["status", "extra"],
                                  ["remount", "repo.a"], ["stop"]])
def test_other_commands_take_the_full_path(argv: list[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything but a simple verb goes through argparse and the protocol module."""
    monkeypatch.setenv("CVMFSD_SOCKET", "/run/x.sock")
    assert ctl.fast_request(argv) is None


@pytest.mark.fuse
def test_status_after_wait_shows_the_revision_wait_saw(short_tmp: Path, dist: Path,
                                                       stratum_dir: Path) -> None:
    """Once wait has seen a path of a new revision, status reports that revision (or later).

    The timer probe is pushed out of the test's reach (--probe-interval 600), so only
    the wait itself can bring the state up to date.
    """
    source = short_tmp / "rev-ttl"
    source.mkdir()
    stratum.publish(stratum_dir, REPO_B, source, ttl=1)  # a new revision shows within ~1 s
    sock = short_tmp / "ctl" / "c.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist), "--repos", REPO_B,
         "--probe-interval", "600", "--socket", str(sock), "--", "sleep", "600"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def repo_b() -> dict[str, str | None]:
            out = subprocess.run([CVMFSCTL, "--socket", str(sock), "--json", "status"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            state: dict[str, str | None] = json.loads(out)["repos"][REPO_B]
            return state

        wait_for(lambda: sock.exists() and repo_b()["state"] == "ok", timeout=60)
        (source / "new").mkdir()
        revision = stratum.publish(stratum_dir, REPO_B, source, ttl=1)
        subprocess.run([CVMFSCTL, "--socket", str(sock), "wait", f"/cvmfs/{REPO_B}/new",
                        "--timeout", "30"], capture_output=True, timeout=60, check=True)
        assert repo_b()["revision"] == str(revision)
    finally:
        process.terminate()
        process.communicate(timeout=60)
