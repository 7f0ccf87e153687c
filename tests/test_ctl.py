"""cvmfsctl against ``cvmfsd run`` on the simulated distribution (real namespaces and FUSE)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfsd import glidein
from cvmfsd.sim import stratum
from tests.conftest import REPO_A, REPO_B, wait_for

pytestmark = pytest.mark.fuse

CVMFSCTL = str(Path(sys.executable).parent / "cvmfsctl")
WEIRD = "two  spaces, 'single' \"double\" $HOME `cmd` \\ back\\slash; ünï"

# The payload: read a value, wait for the test's go, read it again, import the
# environment with eval, and wait for a path of a revision not published yet.
PAYLOAD = f"""
set -u
"$CVMFSCTL" get GLIDEIN_Site > out1
while [ ! -e go ]; do sleep 0.05; done
"$CVMFSCTL" get GLIDEIN_Site > out2
eval "$("$CVMFSCTL" env)"
printf '%s' "$GLIDEIN_Weird" > out3
"$CVMFSCTL" get GLIDEIN_SECRET_TOKEN 2> out4err; echo "$?" > out4
"$CVMFSCTL" wait /cvmfs/{REPO_B}/new/dir --timeout 30 > out5
"""


def written(path: Path) -> bool:
    """Whether the payload has finished writing ``path`` (its lines end in newlines)."""
    return path.exists() and path.read_text().endswith("\n")


@pytest.fixture(name="pilot")
def _pilot(short_tmp: Path, dist: Path,
           stratum_dir: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    # A short catalog TTL on repo.b, so that a later revision shows in seconds
    # (clients look for new revisions when the TTL of the one they have expires).
    source = short_tmp / "rev-ttl"
    source.mkdir()
    (source / "data.csv").write_text("x,y\n")
    stratum.publish(stratum_dir, REPO_B, source, ttl=1)
    config = short_tmp / "glidein_config"
    config.write_text(f"GLIDEIN_Site First Site\nGLIDEIN_Weird {WEIRD}\n"
                      "GLIDEIN_SECRET_TOKEN abc\nGLIDEIN_CVMFS required\n")
    work = short_tmp / "work"
    work.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist), "--glidein-config",
         str(config), "--repos", f"{REPO_A},{REPO_B}", "--allow-exec", "--socket",
         str(short_tmp / "ctl" / "c.sock"), "--", "sh", "-c", PAYLOAD],
        cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    yield work, process
    if process.poll() is None:
        process.terminate()
    process.communicate(timeout=30)


def test_values_follow_glidein_config_and_survive_eval(pilot: tuple[Path, subprocess.Popen[str]],
                                                       short_tmp: Path, stratum_dir: Path) -> None:
    """Inside: get sees later changes; env round-trips exactly; secrets withheld; wait works."""
    work, process = pilot
    wait_for(lambda: written(work / "out1"), timeout=60)
    assert (work / "out1").read_text() == "First Site\n"
    glidein.update_glidein_config(short_tmp / "glidein_config", {"GLIDEIN_Site": "Second Site"})
    (work / "go").touch()
    wait_for(lambda: written(work / "out4"), timeout=30)
    assert (work / "out2").read_text() == "Second Site\n"
    assert (work / "out3").read_text() == WEIRD
    assert (work / "out4").read_text() == "77\n"
    assert "withheld" in (work / "out4err").read_text()
    source = short_tmp / "rev2"
    (source / "new/dir").mkdir(parents=True)
    (source / "data.csv").write_text("x,y\n")
    stratum.publish(stratum_dir, REPO_B, source, ttl=1)
    assert process.wait(timeout=60) == 0, process.communicate()[1]
    assert (work / "out5").read_text() == f"/cvmfs/{REPO_B}/new/dir exists\n"


def test_exec_from_outside(pilot: tuple[Path, subprocess.Popen[str]], short_tmp: Path) -> None:
    """cvmfsctl exec, run outside, reads /cvmfs inside with our stdout and returns the status."""
    socket = str(short_tmp / "ctl" / "c.sock")
    work, _process = pilot
    wait_for(lambda: written(work / "out1"), timeout=60)
    result = subprocess.run([CVMFSCTL, "--socket", socket, "exec", "--", "sh", "-c",
                             f"cat /cvmfs/{REPO_A}/hello.txt; exit 5"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert (result.returncode, result.stdout) == (5, "hello from repo.a\n"), result.stderr
    status = subprocess.run([CVMFSCTL, "--socket", socket, "--json", "status"],
                            capture_output=True, text=True, timeout=30, check=True)
    assert '"mode": "mode3"' in status.stdout
    (work / "go").touch()


def test_exec_refused_when_not_enabled(short_tmp: Path, dist: Path) -> None:
    """Without --allow-exec, cvmfsctl exec is refused (exit 77) and runs nothing."""
    socket = short_tmp / "c2" / "c.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist), "--repos", REPO_A,
         "--socket", str(socket), "--", "sleep", "60"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(socket.exists, timeout=60)
        result = subprocess.run([CVMFSCTL, "--socket", str(socket), "exec", "--", "touch",
                                 str(short_tmp / "ran")], capture_output=True, text=True,
                                timeout=30, check=False)
        assert result.returncode == 77
        assert "exec is disabled" in result.stderr
        assert not (short_tmp / "ran").exists()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_not_running_is_exit_3(short_tmp: Path) -> None:
    """No daemon behind the socket: exit 3 and a message naming the path."""
    result = subprocess.run([CVMFSCTL, "--socket", str(short_tmp / "none.sock"), "ping"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 3
    assert f"no cvmfsd is listening at {short_tmp / 'none.sock'}" in result.stderr


def test_parsing_imports_no_shutil_and_help_keeps_the_terminal_width() -> None:
    """cvmfsctl's parser takes the width as shutil would ($COLUMNS here) without importing
    it: argparse's own formatter does, some 2.7 ms of every cvmfsctl start on 3.9."""
    code = ("import os, sys\n"
            "from cvmfsd import ctl\n"
            "args = ctl.build_parser().parse_args(['get', 'GLIDEIN_Site'])\n"
            "print(args.verb, args.key, 'shutil' in sys.modules)\n"
            "ctl.build_parser().parse_args(['wait', '--help'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"COLUMNS": "50", "PATH": "/usr/bin:/bin"}, check=False)
    out = done.stdout.splitlines()
    assert out[0] == "get GLIDEIN_Site False", done.stderr
    assert max(len(line) for line in out[1:]) <= 48
    assert "  -h, --help" in done.stdout


def test_the_fast_get_imports_no_socket_module(short_tmp: Path) -> None:
    """`cvmfsctl get` answered on its fast path uses the C socket alone: socket.py (with
    selectors and its enums) is some 3 ms of every start on 3.9, which jobs pay per get."""
    with serving_without_cvmfs(short_tmp, "GLIDEIN_Site Fast Site\n") as sock:
        code = ("import sys\nfrom cvmfsd import ctl\n"
                f"status = ctl.main(['--socket', {str(sock)!r}, 'get', 'GLIDEIN_Site'])\n"
                "print(status, 'socket' in sys.modules)\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=30, check=False)
    assert done.stdout == "Fast Site\n0 False\n", done.stderr


@contextlib.contextmanager
def serving_without_cvmfs(short_tmp: Path, glidein_config: str) -> Iterator[Path]:
    """A cvmfsd without CVMFS (GLIDEIN_CVMFS=never) serving its control socket; the socket."""
    config = short_tmp / "glidein_config"
    config.write_text(glidein_config)
    sock = short_tmp / "ctl" / "c.sock"
    cvmfsd = subprocess.Popen(
        [sys.executable, "-m", "cvmfsd", "run", "--glidein-config", str(config),
         "--socket", str(sock), "--", "sleep", "60"],
        env={**os.environ, "GLIDEIN_CVMFS": "never"}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, timeout=30)
        yield sock
    finally:
        cvmfsd.terminate()
        cvmfsd.wait(timeout=30)


@pytest.fixture(name="plain_cvmfsd")
def _plain_cvmfsd(short_tmp: Path) -> Iterator[Path]:
    """A cvmfsd without CVMFS whose glidein_config is over a pipe's 64 KiB; its socket."""
    with serving_without_cvmfs(short_tmp, "GLIDEIN_Site Pipe Site\n" + "".join(
            f"GLIDEIN_Filler_{i} {'x' * 200}\n" for i in range(400))) as sock:
        yield sock


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "full-path"])
@pytest.mark.parametrize("argv", [["env"], ["--json", "config"], ["metrics"], ["ping"],
                                  ["get", "GLIDEIN_Site"]])
def test_a_reader_gone_is_no_traceback(plain_cvmfsd: Path, argv: list[str], fast: bool) -> None:
    """`cvmfsctl env | head -1`: the reader has gone when cvmfsctl writes.  It exits
    quietly with 141 (128 + SIGPIPE, as a C tool killed by it), on the fast path and
    the full one (``--socket=PATH`` is argparse's) alike; it used to end in a
    BrokenPipeError traceback, status 1."""
    where = ["--socket", str(plain_cvmfsd)] if fast else [f"--socket={plain_cvmfsd}"]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write: EPIPE every time
    try:
        done = subprocess.run([CVMFSCTL, *where, *argv], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=30, check=False)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_a_full_disk_is_a_clear_error(plain_cvmfsd: Path) -> None:
    """`cvmfsctl env > file` on a full disk: a message saying what could not be written
    and why, and 74 (EX_IOERR), not an OSError traceback."""
    with open("/dev/full", "w") as full:  # noqa: PTH123 - a device, not a path to handle
        done = subprocess.run([CVMFSCTL, "--socket", str(plain_cvmfsd), "env"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=30, check=False)
        slow = subprocess.run([CVMFSCTL, f"--socket={plain_cvmfsd}", "env"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=30, check=False)
    assert (slow.returncode, slow.stderr) == (done.returncode, done.stderr)
    assert done.returncode == 74
    assert done.stderr == ("cvmfsctl: env: cannot write the answer to standard output: "
                           "No space left on device\n")


def test_a_closed_stdout_is_quiet(plain_cvmfsd: Path) -> None:
    """`cvmfsctl remount REPO >&-`: no stdout at all; the answer goes nowhere, status 0."""
    done = subprocess.run(["sh", "-c", '"$0" --socket "$1" env >&-', CVMFSCTL,
                           str(plain_cvmfsd)], capture_output=True, text=True, timeout=30,
                          check=False)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize(("argv", "answer"), [
    (["remount", "repo.a"], b'{"v":1,"id":null,"ok":false,"error":{"code":"unavailable",'
                            b'"message":"not remounted: busy"}}\n'),
    (["stop"], b'{"v":1,"id":null,"ok":false,"error":{"code":"internal","message":"x"}}\n'),
    (["remount", "repo.a"], b""),  # closed without an answer
])
def test_a_verb_that_acts_is_sent_once_whatever_the_answer(
        short_tmp: Path, argv: list[str], answer: bytes) -> None:
    """remount and stop act: cvmfsctl sends them once, even when the answer is an error or
    none (its fast path used to fall back to the full client, which sent them again)."""
    path = short_tmp / "fake.sock"
    received: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)
        listener.settimeout(0.1)

        def serve() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not finished.is_set():
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                with conn:
                    conn.settimeout(5)
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    received.append(data)
                    conn.sendall(answer)

        finished = threading.Event()
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            done = subprocess.run([CVMFSCTL, "--socket", str(path), *argv],
                                  capture_output=True, text=True, timeout=60, check=False)
        finally:
            finished.set()
            server.join(timeout=30)
    assert done.returncode != 0, done.stdout
    assert len(received) == 1, received
