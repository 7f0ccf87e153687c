"""cvmfsctl enter: joining cvmfsd's mode-3 namespace by setns (real namespaces, simulated CVMFS)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfsd import ctl, enter
from tests.conftest import REPO_A, wait_for

CVMFSCTL = str(Path(sys.executable).parent / "cvmfsctl")
# cvmfsctl with the C library's setns forced, as on Pythons before 3.12.
FORCED_CTYPES = [sys.executable, "-c", "import sys; from cvmfsd import ctl, enter; "
                 "enter.FORCE_CTYPES = True; sys.exit(ctl.main(sys.argv[1:]))"]


def python_with_setns() -> str | None:
    """An interpreter with ``os.setns`` (3.12+): this one, $CVMFSD_TEST_PYTHON_SETNS, or on PATH."""
    if hasattr(os, "setns"):
        return sys.executable
    for candidate in (os.environ.get("CVMFSD_TEST_PYTHON_SETNS"), shutil.which("python3.13"),
                      shutil.which("python3.12")):
        if candidate and subprocess.run(
                [candidate, "-c", "import os, sys; sys.exit(not hasattr(os, 'setns'))"],
                capture_output=True, check=False).returncode == 0:
            return candidate
    return None


NATIVE = python_with_setns()
# cvmfsctl on an interpreter with os.setns, from this source tree (stdlib only on this path).
WITH_OS_SETNS = [NATIVE or "", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
                 "from cvmfsd import ctl, enter; assert not enter.FORCE_CTYPES; "
                 "sys.exit(ctl.main(sys.argv[1:]))", str(Path(enter.__file__).parents[1])]
BACKENDS = [
    pytest.param([CVMFSCTL], id="default"),
    pytest.param(FORCED_CTYPES, id="ctypes"),
    pytest.param(WITH_OS_SETNS, id="os.setns", marks=pytest.mark.skipif(
        NATIVE is None, reason="no Python >= 3.12 (os.setns) found")),
]


class Daemon:
    """A ``cvmfsd run`` in mode 3 whose payload sleeps; its socket and status."""

    def __init__(self, process: subprocess.Popen[str], socket: Path) -> None:
        self.process = process
        self.socket = str(socket)

    def status(self) -> dict[str, object]:
        out = subprocess.run([CVMFSCTL, "--socket", self.socket, "--json", "status"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        result = json.loads(out)
        assert isinstance(result, dict)
        return result

    def ready(self) -> bool:
        return Path(self.socket).exists() and self.status().get("phase") == "running"


def start_daemon(short_tmp: Path, dist: Path, name: str, *extra: str,
                 payload: tuple[str, ...] = ("sleep", "600")) -> Daemon:
    socket = short_tmp / name / "c.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist), "--repos", REPO_A,
         "--socket", str(socket), *extra, "--", *payload],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    daemon = Daemon(process, socket)
    wait_for(lambda: process.poll() is not None or daemon.ready(), timeout=60)
    assert process.poll() is None, process.communicate()[1]
    return daemon


def stop_daemon(daemon: Daemon) -> None:
    if daemon.process.poll() is None:
        daemon.process.terminate()
    daemon.process.communicate(timeout=60)


@pytest.fixture(name="daemon")
def _daemon(short_tmp: Path, dist: Path) -> Iterator[Daemon]:
    daemon = start_daemon(short_tmp, dist, "ctl")
    yield daemon
    stop_daemon(daemon)


def pids_with(marker: str, program: str | None = None) -> list[int]:
    """Host pids of processes with ``marker`` as an argument (and ``program`` as argv[0])."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        args = argv.split("\0")
        if marker in args and program in (None, args[0]):
            found.append(int(entry.name))
    return found


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


@pytest.mark.fuse
@pytest.mark.parametrize("cvmfsctl", BACKENDS)
def test_from_outside_sees_cvmfs_in_callers_directory_and_cgroup(
        daemon: Daemon, short_tmp: Path, cvmfsctl: list[str]) -> None:
    """The command reads /cvmfs, runs in the caller's directory and cgroup, as the payload's uid."""
    work = short_tmp / "work dir"
    work.mkdir()
    status = daemon.status()
    spaces = status["shim_namespaces"]
    assert isinstance(spaces, dict)
    result = subprocess.run(
        [*cvmfsctl, "--socket", daemon.socket, "enter", "--", "sh", "-c",
         f"cat /cvmfs/{REPO_A}/hello.txt; pwd; cat /proc/self/cgroup; id -u; "
         "readlink /proc/self/ns/pid /proc/self/ns/user; echo \"$ENTER_TEST\""],
        cwd=work, capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "ENTER_TEST": "kept"})
    assert result.returncode == 0, result.stderr
    cgroup = Path("/proc/self/cgroup").read_text()
    assert result.stdout == (f"hello from repo.a\n{work}\n{cgroup}{os.getuid()}\n"
                             f"{spaces['pid']}\n{spaces['user']}\nkept\n")
    assert result.stderr == ""


@pytest.mark.fuse
@pytest.mark.parametrize(("script", "expected"), [
    ("exit 0", 0), ("exit 7", 7), ("kill -TERM $$", 128 + signal.SIGTERM),
    ("kill -KILL $$", 128 + signal.SIGKILL)])
def test_exit_status(daemon: Daemon, script: str, expected: int) -> None:
    """cvmfsctl exits with the command's status, 128+N when a signal N ended it."""
    result = subprocess.run([CVMFSCTL, "--socket", daemon.socket, "enter", "sh", "-c", script],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == expected, result.stderr


@pytest.mark.fuse
def test_caller_ignoring_sigchld(daemon: Daemon) -> None:
    """A caller that ignores SIGCHLD (inherited by cvmfsctl) still gets the status."""
    ignoring = ("import os, signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_IGN); "
                "os.execv(sys.argv[1], sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", ignoring, CVMFSCTL,
                             "--socket", daemon.socket, "enter", "--", "sh", "-c", "exit 9"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 9, result.stderr


@pytest.mark.fuse
def test_command_not_found(daemon: Daemon) -> None:
    """A command that does not exist inside: 127 and a message naming it."""
    result = subprocess.run([CVMFSCTL, "--socket", daemon.socket, "enter", "--",
                             "no-such-command-here"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 127
    assert "cannot run 'no-such-command-here'" in result.stderr


# The command: say which signal arrived, then exit with a status that names it.
TRAPS = "; ".join(f"trap 'echo got {name}; exit {number}' {name}" for name, number in
                  (("TERM", 11), ("INT", 12), ("HUP", 13), ("QUIT", 14), ("USR1", 15),
                   ("USR2", 16)))


@pytest.mark.fuse
@pytest.mark.parametrize(("signum", "status"), [
    (signal.SIGTERM, 11), (signal.SIGINT, 12), (signal.SIGHUP, 13), (signal.SIGQUIT, 14),
    (signal.SIGUSR1, 15), (signal.SIGUSR2, 16)])
def test_signals_are_forwarded(daemon: Daemon, signum: int, status: int) -> None:
    """TERM (HTCondor's kill_sig), INT, HUP, QUIT, USR1, USR2 to cvmfsctl reach the command once."""
    marker = f"enter-signal-{os.getpid()}-{signum}"
    process = subprocess.Popen(
        [CVMFSCTL, "--socket", daemon.socket, "enter", "--", "sh", "-c",
         f"{TRAPS}; echo ready; sleep 60 & wait; echo 'no signal'", marker],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        # (until `sleep` is exec'd, its forked shell has the same command line)
        wait_for(lambda: len(pids_with(marker, "sh")) == 1, timeout=10)
        shell = pids_with(marker, "sh")
        assert process.pid in ancestors(shell[0])  # a descendant of cvmfsctl
        process.send_signal(signum)
        out, err = process.communicate(timeout=30)
        name = signal.Signals(signum).name[3:]
        assert (process.returncode, out) == (status, f"got {name}\n"), err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.fuse
def test_sigkill_of_cvmfsctl_leaves_nothing_inside(daemon: Daemon) -> None:
    """SIGKILL of cvmfsctl ends the command and all it started, even a new session."""
    marker = f"enter-kill-{os.getpid()}"
    script = ("sleep 3001 & sleep 3002 & setsid sleep 3003 & "
              "sh -c 'sleep 3004 & wait' & echo ready; wait")
    process = subprocess.Popen(
        [CVMFSCTL, "--socket", daemon.socket, "enter", "--", "sh", "-c", script, marker],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        sleepers = [f"{n}" for n in range(3001, 3005)]
        wait_for(lambda: all(pids_with(n) for n in sleepers), timeout=10)
        process.kill()
        process.communicate(timeout=30)
        wait_for(lambda: not pids_with(marker) and not any(pids_with(n) for n in sleepers),
                 timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert daemon.status()["phase"] == "running"  # the namespace itself lives on


@pytest.mark.fuse
def test_leftovers_end_with_the_command(daemon: Daemon) -> None:
    """What the command leaves running inside is ended when it exits."""
    result = subprocess.run([CVMFSCTL, "--socket", daemon.socket, "enter", "--", "sh", "-c",
                             "setsid sleep 3011 & exit 4"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 4, result.stderr
    wait_for(lambda: not pids_with("3011"), timeout=10)


@pytest.mark.fuse
def test_command_ends_with_the_namespace(daemon: Daemon) -> None:
    """The command is in the namespace's pid namespace: when cvmfsd stops, it is killed."""
    process = subprocess.Popen(
        [CVMFSCTL, "--socket", daemon.socket, "enter", "--", "sh", "-c",
         "echo ready; exec sleep 3021"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        subprocess.run([CVMFSCTL, "--socket", daemon.socket, "stop"], capture_output=True,
                       timeout=30, check=True)
        assert process.wait(timeout=60) == 128 + signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert not pids_with("3021")


@pytest.mark.fuse
def test_refused_setns_names_the_namespace_and_errno(daemon: Daemon) -> None:
    """From another user namespace the kernel refuses: a clear error, exit 77, nothing run.

    (Opening the namespace files is already refused there, with EACCES.)
    """
    result = subprocess.run(["unshare", "-r", CVMFSCTL, "--socket", daemon.socket, "enter",
                             "--", "echo", "ran"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 77
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert "cannot open the namespace's mount namespace" in lines[0]
    assert "Permission denied (EACCES)" in lines[0]
    assert "not in another one" in lines[0]
    assert "exec is disabled" in lines[-1]


@pytest.mark.fuse
def test_refused_setns_falls_back_to_exec_where_allowed(short_tmp: Path, dist: Path) -> None:
    """With --allow-exec, a refused setns runs the command through the shim.

    There, already inside the namespace, enter just runs the command.
    """
    daemon = start_daemon(short_tmp, dist, "ax", "--allow-exec")
    try:
        result = subprocess.run(["unshare", "-r", CVMFSCTL, "--socket", daemon.socket, "enter",
                                 "--", "sh", "-c", f"cat /cvmfs/{REPO_A}/hello.txt; exit 3"],
                                cwd=short_tmp, capture_output=True, text=True, timeout=30,
                                check=False)
        assert (result.returncode, result.stdout) == (3, "hello from repo.a\n"), result.stderr
        assert "EACCES" in result.stderr
        assert "trying exec through cvmfsd's shim" in result.stderr
        # Already inside (a command run through the shim): enter just runs the command.
        inside = subprocess.run([CVMFSCTL, "--socket", daemon.socket, "exec", "--", CVMFSCTL,
                                 "--socket", daemon.socket, "enter", "--", "sh", "-c",
                                 f"cat /cvmfs/{REPO_A}/hello.txt; exit 5"],
                                capture_output=True, text=True, timeout=30, check=False)
        assert (inside.returncode, inside.stdout) == (5, "hello from repo.a\n"), inside.stderr
    finally:
        stop_daemon(daemon)


@pytest.mark.fuse
@pytest.mark.parametrize("cvmfsctl", BACKENDS)
def test_refused_setns_in_a_threaded_process(daemon: Daemon, cvmfsctl: list[str]) -> None:
    """Joining a user namespace needs a single thread: EINVAL, named, exit 77."""
    start = ("import threading, time; "
             "threading.Thread(target=time.sleep, args=(5,), daemon=True).start(); ")
    if len(cvmfsctl) == 1:  # the installed script: the same, from this interpreter
        cvmfsctl = [sys.executable, "-c", "import sys; from cvmfsd import ctl; "
                    "sys.exit(ctl.main(sys.argv[1:]))"]
    interpreter, flag, code, *rest = cvmfsctl
    result = subprocess.run([interpreter, flag, start + code, *rest, "--socket", daemon.socket,
                             "enter", "--", "echo", "ran"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 77
    assert "outer user namespace" in result.stderr
    assert "(EINVAL)" in result.stderr
    assert "single-threaded" in result.stderr


def test_without_a_namespace_the_command_just_runs(short_tmp: Path) -> None:
    """Under the `never` policy (no CVMFS, no namespace): the command runs as it is."""
    config = short_tmp / "glidein_config"
    config.write_text("GLIDEIN_CVMFS never\n")
    socket = short_tmp / "nv" / "c.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "cvmfsd", "run", "--glidein-config", str(config), "--socket",
         str(socket), "--", "sleep", "600"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(socket.exists, timeout=60)
        result = subprocess.run([CVMFSCTL, "--socket", str(socket), "enter", "--", "sh", "-c",
                                 "readlink /proc/self/ns/mnt; exit 6"],
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 6, result.stderr
        assert result.stdout == str(Path("/proc/self/ns/mnt").readlink()) + "\n"
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_not_running_is_exit_3(short_tmp: Path) -> None:
    """No cvmfsd behind the socket: exit 3, nothing run."""
    result = subprocess.run([CVMFSCTL, "--socket", str(short_tmp / "none.sock"), "enter", "--",
                             "touch", str(short_tmp / "ran")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 3
    assert "no cvmfsd is listening" in result.stderr
    assert not (short_tmp / "ran").exists()


# -- pure parts --------------------------------------------------------------------------

IDS = {"mnt": "mnt:[4026532001]", "pid": "pid:[4026532002]", "user": "user:[4026532003]"}
OWN = {"mnt": "mnt:[4026531841]", "pid": "pid:[4026531836]", "user": "user:[4026531837]"}


@pytest.mark.parametrize(("status", "own", "expected"), [
    ({"mode": "mode3", "phase": "running", "shim_pid": 42, "shim_namespaces": IDS}, OWN,
     enter.Target(42, IDS)),
    ({"mode": "mode3", "phase": "running", "shim_pid": 42, "shim_namespaces": IDS}, IDS, None),
    ({"mode": "mode1", "phase": "running"}, OWN, None),
    ({"mode": "mode2", "phase": "mounting"}, OWN, None),
    ({"mode": "host", "phase": "running"}, OWN, None),
    ({"mode": "none", "phase": "running"}, OWN, None),
])
def test_plan(status: dict[str, object], own: dict[str, str],
              expected: enter.Target | None) -> None:
    """Mode 3 with a live shim: join it (unless inside already); other modes: just run."""
    assert enter.plan(status, own) == expected


@pytest.mark.parametrize(("status", "message"), [
    ({"mode": "deciding", "phase": "starting"}, "has not chosen a mode yet"),
    ({"mode": "mode3", "phase": "mounting", "shim_pid": None}, "not ready yet (phase mounting)"),
    ({"mode": "mode3", "phase": "stopping", "shim_pid": 42, "shim_namespaces": None},
     "the namespace is gone (phase stopping)"),
])
def test_plan_not_ready(status: dict[str, object], message: str) -> None:
    """No namespace to enter yet, or not any more: exit 69 (unavailable) and why."""
    with pytest.raises(enter.EnterError, match=re.escape(message)) as caught:
        enter.plan(status, OWN)
    assert caught.value.status == 69


@pytest.mark.parametrize(("argv", "expected"), [
    (["enter", "--", "ls", "-l"], ("/env.sock", ["ls", "-l"])),
    (["enter", "ls", "-l"], ("/env.sock", ["ls", "-l"])),
    (["--socket", "/x.sock", "enter", "--", "--weird"], ("/x.sock", ["--weird"])),
    (["--json", "enter", "--", "true"], ("/env.sock", ["true"])),
    (["enter", "--help"], None),
    (["enter"], None),
    (["exec", "--", "ls"], None),
    (["--bogus", "enter", "ls"], None),
])
def test_enter_request(argv: list[str], expected: tuple[str, list[str]] | None,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path takes `[--socket S] enter [--] COMMAND`; the rest goes to argparse."""
    monkeypatch.setenv("CVMFSD_SOCKET", "/env.sock")
    assert ctl.enter_request(argv) == expected


def test_help_says_what_happens_without_a_namespace() -> None:
    """`cvmfsctl enter --help` documents the modes without a namespace and the statuses."""
    result = subprocess.run([CVMFSCTL, "enter", "--help"], capture_output=True, text=True,
                            timeout=30, check=True)
    assert "Modes 1 and 2" in result.stdout
    assert "simply runs" in result.stdout
    assert "77 setns refused" in result.stdout


def test_no_command_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cvmfsctl enter` without a command: exit 2."""
    monkeypatch.setenv("CVMFSD_SOCKET", "/nonexistent.sock")
    assert ctl.main(["enter"]) == 2
    assert ctl.main(["enter", "--"]) == 2


def test_exit_status_of_a_wait_status() -> None:
    """Wait statuses read as a shell reads them."""
    assert enter.exit_status(7 << 8) == 7
    assert enter.exit_status(signal.SIGTERM) == 128 + signal.SIGTERM


def test_ctypes_setns_reports_errno() -> None:
    """The C library's setns raises OSError with errno, as os.setns does."""
    fd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    try:
        old, enter.FORCE_CTYPES = enter.FORCE_CTYPES, True
        try:
            setns = enter.setns_function()
        finally:
            enter.FORCE_CTYPES = old
        with pytest.raises(OSError) as caught:
            setns(fd, enter.CLONE_NEWPID)  # a mount namespace file is not a pid namespace
        assert caught.value.errno == 22  # EINVAL
    finally:
        os.close(fd)

