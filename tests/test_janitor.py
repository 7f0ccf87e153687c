"""The janitor: clean-up after a SIGKILLed cvmfsd, nothing after a normal close.

A "cvmfsd" here is a helper process (``python -c HELPER``) in its own session
that spawns the janitor, mounts or starts a namespace, reports on stdout and
then waits for a command on stdin.  Tests kill only processes they started (the
helper, and as a last resort the janitor and namespace PID 1 it reported), by pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfsd import glidein, janitor, launch
from cvmfsd.janitor import Janitor, spawn_janitor
from cvmfsd.leftovers import LOCK_NAME
from cvmfsd.sim.makedist import DEFAULT_CONFIG_REPO
from tests.conftest import REPO_A, REPO_B, cvmfs2_pids, mounts_under, reap, wait_for
from tests.livedaemon import talk

HELPER = r"""
import os, signal, subprocess, sys, threading, time
from pathlib import Path
from cvmfsd import launch
from cvmfsd.janitor import spawn_janitor

dist, (what, *how), repos = Path(sys.argv[1]), sys.argv[2].split("+"), sys.argv[3:]
for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: None)  # handlers are not inherited
if "thread" in how:  # spawned from a thread that then ends (PDEATHSIG fires)
    spawned = []
    thread = threading.Thread(target=lambda: spawned.append(spawn_janitor(dist)))
    thread.start()
    thread.join()
    janitor = spawned[0]
else:
    janitor = spawn_janitor(dist)
print("janitor", janitor.pid, flush=True)
if what == "mount":
    for repo in repos:
        subprocess.run([str(dist / "mountrepo"), repo], check=True, stdout=subprocess.DEVNULL)
elif what == "namespace":
    ns = subprocess.Popen([str(dist / "cvmfsexec"), *repos, "--", "sleep", "600"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    print("cvmfsexec", ns.pid, flush=True)

    def runs_sleep(pid):
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")
        except OSError:
            return False

    deadline = time.monotonic() + 30
    while True:
        kids = launch.descendants(ns.pid)
        inits = [p for p in kids if launch.is_namespace_init(p)]
        if inits and any(runs_sleep(p) for p in kids):
            break
        assert time.monotonic() < deadline and ns.poll() is None, "no namespace"
        time.sleep(0.02)
    janitor.set_namespace_init(inits[0])
    print("init", inits[0], flush=True)
if "fork" in how:  # a child forked without exec keeps the pipe open after we die
    child = os.fork()
    if child == 0:
        time.sleep(600)
        os._exit(0)
    print("forked", child, flush=True)
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "close":
        print("closed", janitor.close(), flush=True)
time.sleep(600)
"""


class Helper:
    """The helper process and what it reported."""

    def __init__(self, dist: Path, what: str, *repos: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HELPER, str(dist), what, *repos], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.reported: dict[str, int] = {}

    def read_until(self, word: str) -> None:
        """Read the helper's lines up to the one starting with ``word``."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            key, _, value = line.strip().partition(" ")
            self.reported[key] = int(value) if value.lstrip("-").isdigit() else 0
            if key == word:
                return
        pytest.fail(f"the helper exited ({self.process.wait()}) before saying {word!r}")

    def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        """SIGKILL the helper (a "cvmfsd" killed outright) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


def _alive(pid: int, marker: bytes) -> bool:
    """Whether ``pid`` runs and its command line holds ``marker`` (no zombie, no stranger)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker in cmdline and janitor.process_start(pid) is not None


def _sigkill_if(pid: int | None, marker: bytes) -> None:
    if pid is not None and _alive(pid, marker):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(name="helpers")
def _helpers(dist: Path) -> Iterator[list[Helper]]:
    """Started helpers; at teardown they, their janitors and namespaces are SIGKILLed.

    Mounts left behind are the ``dist`` fixture's to report and remove.
    """
    started: list[Helper] = []
    yield started
    for helper in started:
        helper.kill()
        cvmfsexec = helper.reported.get("cvmfsexec")
        inits = [] if cvmfsexec is None else [
            pid for pid in launch.descendants(cvmfsexec) if launch.is_namespace_init(pid)]
        for init in inits:
            os.kill(init, signal.SIGKILL)  # bash as namespace PID 1, under our cvmfsexec
        _sigkill_if(helper.reported.get("janitor"), b"cvmfsd.janitor")
        _sigkill_if(helper.reported.get("forked"), b"spawn_janitor")
        for init in inits:
            wait_for(lambda pid=init: janitor.process_start(pid) is None, timeout=5)


def _log(dist: Path) -> str:
    path = dist / "log" / "janitor.log"
    return path.read_text() if path.exists() else ""


# --- pure parts --------------------------------------------------------------------


def test_dist_mounts_order_and_boundary() -> None:
    """Newest first, config repo last; a sibling whose path shares the prefix is not ours.

    Only FUSE mounts count, whatever their source: cvmfsexec's read ``fuse /dev/fuse``.
    """
    dirs = janitor.mount_dirs("/d")
    text = "\n".join(
        f"{i} 1 0:{i} / {point} rw - {kind} rw" for i, (point, kind) in enumerate([
            ("/d/dist/cvmfs/config.repo", "fuse /dev/fuse"), ("/d/dist/cvmfs/a", "fuse cvmfs2"),
            ("/d/dist/cvmfsx/b", "fuse /dev/fuse"), ("/d/dist/cvmfs", "fuse /dev/fuse"),
            ("/d/dist/cvmfs/sp\\040ace", "fuse.cvmfs2 cvmfs2"), ("/e/dist/cvmfs/c", "fuse x"),
            ("/d/dist/cvmfs/bound", "ext4 /dev/sda1"),
        ]))
    assert janitor.dist_mounts(text, dirs, "config.repo") == [
        "/d/dist/cvmfs/sp ace", "/d/dist/cvmfs/a", "/d/dist/cvmfs/config.repo"]


@pytest.mark.parametrize(("argv", "expected"), [
    (["/d/dist/usr/bin/cvmfs2", "-o", "config=x", "r.a", "/d/dist/cvmfs/r.a"], "/d/dist/cvmfs/r.a"),
    (["python", "-m", "cvmfsd.sim.cvmfs2", "-o", "c", "r.a", "/d/dist/cvmfs/r.a/"],
     "/d/dist/cvmfs/r.a"),
    (["cvmfs2", "-o", "c", "r.a", "/d/dist/cvmfsx/r.a"], None),
    (["cvmfs2", "-o", "c", "r.a", "/d/dist/cvmfs/r.a/sub"], None),
    (["ls", "-l", "/d/dist/cvmfs/r.a"], None),
    (["cvmfs2", "/d/dist/cvmfs/r.a"], None),
    (["python", "x.py", "cvmfsd.sim.cvmfs2", "r.a", "/d/dist/cvmfs/r.a"], None),
    (["sh", "cvmfsd.sim.cvmfs2", "-o", "r.a", "/d/dist/cvmfs/r.a"], None),
    (["python", "-m", "cvmfsd.sim.cvmfs2", "-o", "c", "r.b", "/d/dist/cvmfs/r.a"], None),
])
def test_cvmfs2_mountpoint(argv: list[str], expected: str | None) -> None:
    """Only a cvmfs2 command line whose last argument is right below dist/cvmfs counts."""
    assert janitor.cvmfs2_mountpoint(argv, janitor.mount_dirs("/d")) == expected


@pytest.mark.parametrize(("argv", "exe", "expected"), [
    (["/d/dist/usr/bin/cvmfs2", "-o", "c", "r.a", "/d/dist/cvmfs/r.a"], "/d/dist/usr/bin/cvmfs2",
     "/d/dist/cvmfs/r.a"),
    (["/home/u/cvmfs2", "-o", "c", "r.a", "/d/dist/cvmfs/r.a"], "/home/u/cvmfs2", None),
    (["python", "-m", "cvmfsd.sim.cvmfs2", "-o", "c", "r.a", "/d/dist/cvmfs/r.a"],
     "/usr/bin/python3.12", "/d/dist/cvmfs/r.a"),
    (["python", "-m", "cvmfsd.sim.cvmfs2", "-o", "c", "r.a", "/d/dist/cvmfs/r.a"],
     "/usr/bin/bash", None),
])
def test_cvmfs2_mountpoint_checks_the_executable(argv: list[str], exe: str,
                                                 expected: str | None) -> None:
    """A same-uid process named like cvmfs2 must also run cvmfs2 (issue 12)."""
    assert janitor.cvmfs2_mountpoint(argv, janitor.mount_dirs("/d"), exe) == expected


def test_signal_process_refuses_a_different_start_time() -> None:
    """A pid whose start time differs from the recorded one (pid reuse) is not signalled."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        start = janitor.process_start(child.pid)
        assert start is not None
        assert not janitor.signal_process((child.pid, start + 1), signal.SIGKILL, lambda _: True)
        assert not janitor.signal_process((child.pid, start), signal.SIGKILL, lambda _: False)
        assert child.poll() is None
        assert janitor.signal_process((child.pid, start), signal.SIGKILL, lambda _: True)
        assert child.wait(5) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()


def test_set_namespace_init_refuses_other_processes(tmp_path: Path) -> None:
    """Only PID 1 of a pid namespace may be named; the janitor exits at close."""
    (tmp_path / "dist/etc/cvmfs").mkdir(parents=True)
    jan = spawn_janitor(tmp_path)
    try:
        with pytest.raises(ValueError, match="not PID 1"):
            jan.set_namespace_init(os.getpid())
    finally:
        assert jan.close() == 0
    assert not (tmp_path / "log" / "janitor.log").exists()


# --- real processes and mounts ------------------------------------------------------


@pytest.mark.fuse
def test_sigkill_of_cvmfsd_unmounts_within_a_second(dist: Path, helpers: list[Helper]) -> None:
    """Mode 1: when "cvmfsd" is SIGKILLed, every mount of the distribution is gone within 1 s."""
    helper = Helper(dist, "mount", DEFAULT_CONFIG_REPO, REPO_A, REPO_B)
    helpers.append(helper)
    helper.read_until("ready")
    assert len(mounts_under(dist)) == 3
    helper.kill()
    killed = time.monotonic()
    wait_for(lambda: not mounts_under(dist), timeout=1.0, interval=0.005)
    latency = time.monotonic() - killed
    wait_for(lambda: not cvmfs2_pids(dist), timeout=5)
    wait_for(lambda: not _alive(helper.reported["janitor"], b"cvmfsd.janitor"), timeout=5)
    log = _log(dist)
    assert "clean-up complete" in log, log
    # The configuration repository goes last.
    unmounted = [line.rsplit("/", 1)[1] for line in log.splitlines() if " unmounted " in line]
    assert unmounted[-1] == DEFAULT_CONFIG_REPO, log
    assert latency < 1.0


@pytest.mark.fuse
def test_sigkill_of_cvmfsd_ends_the_namespace(dist: Path, helpers: list[Helper]) -> None:
    """Mode 3: when "cvmfsd" is SIGKILLed, the janitor SIGKILLs namespace PID 1."""
    helper = Helper(dist, "namespace", REPO_A)
    helpers.append(helper)
    helper.read_until("ready")
    init = helper.reported["init"]
    assert cvmfs2_pids(dist)
    helper.kill()
    wait_for(lambda: janitor.process_start(init) is None, timeout=2)
    wait_for(lambda: not cvmfs2_pids(dist), timeout=5)
    wait_for(lambda: not _alive(helper.reported["janitor"], b"cvmfsd.janitor"), timeout=5)
    assert f"killed namespace PID 1 (pid {init})" in _log(dist)


@pytest.mark.fuse
@pytest.mark.fuse
def test_a_mount_busy_for_a_moment_is_unmounted_not_killed(dist: Path) -> None:
    """A mount held busy for 0.1 s (a probe's last look): unmounted cleanly within ~0.3 s,
    its cvmfs2 not signalled (before: a second's wait, then SIGTERM and a lazy unmount)."""
    subprocess.run([str(dist / "mountrepo"), REPO_A], check=True, capture_output=True,
                   timeout=60)
    point = dist / "dist" / "cvmfs" / REPO_A
    holder = subprocess.Popen(["sh", "-c", "sleep 0.1"], cwd=point, text=True)  # cwd: the mount
    logged: list[str] = []
    try:
        start = time.monotonic()
        assert janitor.clean_up(str(dist), log=logged.append)
        elapsed = time.monotonic() - start
    finally:
        reap(holder)
    assert f"unmounted {point}" in logged, logged
    assert not any("sent SIG" in line or "lazily" in line for line in logged), logged
    assert elapsed < 0.9, f"took {elapsed:.2f} s"
    assert not mounts_under(dist)


@pytest.mark.fuse
def test_sigterm_goes_to_the_daemon_not_its_watchdog(dist: Path) -> None:
    """stop_cvmfs2 on a serving repository: SIGTERM to the daemon (it holds /dev/fuse)
    only, never to its watchdog (same command line), which would make it abort (cvmfs
    monitor.cc); the watchdog leaves by itself or takes the SIGKILL after the grace."""
    subprocess.run([str(dist / "mountrepo"), REPO_A], check=True, capture_output=True,
                   timeout=60)
    point = str(dist / "dist" / "cvmfs" / REPO_A)
    socket_path = dist / "dist/var/lib/cvmfs/shared" / f"cvmfs_io.{REPO_A}"
    daemon = int(talk(socket_path, "pid"))
    watchdog = int(talk(socket_path, "pid watchdog"))
    dirs = janitor.mount_dirs(str(dist))
    procs = [p for p in janitor.find_cvmfs2(dirs) if p[2] == point]
    assert {p[0] for p in procs} >= {daemon, watchdog}
    signals: list[tuple[int, str]] = []
    try:
        janitor.stop_cvmfs2(procs, dirs, exit_grace=0.1, term_grace=3.0,
                            on_signal=lambda proc, sig: signals.append((proc[0], sig.name)))
    finally:
        janitor.unmount(point, lazy=True)
    assert (daemon, "SIGTERM") in signals
    assert (watchdog, "SIGTERM") not in signals, signals


def test_close_leaves_everything_alone(dist: Path) -> None:
    """After a normal close the janitor exits at once, touching nothing and writing no log."""
    jan: Janitor = spawn_janitor(dist)
    try:
        subprocess.run([str(dist / "mountrepo"), REPO_A], check=True, capture_output=True)
        time.sleep(0.2)  # let the janitor start and read nothing
        started = time.monotonic()
        assert jan.close() == 0
        assert time.monotonic() - started < 1.0
        assert mounts_under(dist) == [str(dist / "dist/cvmfs" / REPO_A)]
        assert cvmfs2_pids(dist)
        assert _log(dist) == ""
    finally:
        if jan.process.poll() is None:
            jan.process.kill()
            jan.process.wait()
        subprocess.run([str(dist / "umountrepo"), REPO_A], capture_output=True, check=False)
    wait_for(lambda: not cvmfs2_pids(dist), timeout=5)


@pytest.mark.fuse
def test_group_signals_do_not_stop_the_janitor(dist: Path, helpers: list[Helper]) -> None:
    """HUP/INT/QUIT/TERM to the process group, even while it starts, leave the janitor be."""
    helper = Helper(dist, "idle")
    helpers.append(helper)
    helper.read_until("janitor")  # the janitor is still starting: the signals stay pending
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        os.killpg(helper.process.pid, sig)
    helper.read_until("ready")
    subprocess.run([str(dist / "mountrepo"), REPO_A], check=True, capture_output=True)
    os.killpg(helper.process.pid, signal.SIGINT)
    time.sleep(0.3)
    assert _alive(helper.reported["janitor"], b"cvmfsd.janitor")
    assert mounts_under(dist)
    helper.tell("close")
    helper.read_until("closed")
    assert helper.reported["closed"] == 0
    assert mounts_under(dist) == [str(dist / "dist/cvmfs" / REPO_A)]
    subprocess.run([str(dist / "umountrepo"), REPO_A], capture_output=True, check=True)
    wait_for(lambda: not cvmfs2_pids(dist), timeout=5)


@pytest.mark.fuse
def test_parent_death_signal_when_the_pipe_stays_open(dist: Path, helpers: list[Helper]) -> None:
    """A child forked without exec holds the pipe: PR_SET_PDEATHSIG still starts the clean-up."""
    helper = Helper(dist, "mount+fork", REPO_A)
    helpers.append(helper)
    helper.read_until("ready")
    assert _alive(helper.reported["forked"], b"spawn_janitor")
    helper.kill()
    wait_for(lambda: not mounts_under(dist), timeout=1.0, interval=0.005)
    wait_for(lambda: not cvmfs2_pids(dist), timeout=5)
    assert "is no longer our parent" in _log(dist)


@pytest.mark.fuse
def test_spawning_thread_exit_is_not_cvmfsd_exit(dist: Path, helpers: list[Helper]) -> None:
    """Spawned from a thread that ends, the janitor stays until cvmfsd itself ends."""
    helper = Helper(dist, "mount+thread", REPO_A)
    helpers.append(helper)
    helper.read_until("ready")
    time.sleep(0.3)
    assert _alive(helper.reported["janitor"], b"cvmfsd.janitor")
    assert mounts_under(dist)
    assert _log(dist) == ""
    helper.kill()
    wait_for(lambda: not mounts_under(dist), timeout=1.0, interval=0.005)
    wait_for(lambda: not cvmfs2_pids(dist), timeout=5)


def _canned(root: Path, pid: int, *, sid: int, env: dict[str, str], uid: int | None = None,
            state: str = "S") -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    uid = os.getuid() if uid is None else uid
    (d / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    fields = [state, "1", str(sid), str(sid), *["0"] * 15, str(1000 + pid), "0"]
    (d / "stat").write_text(f"{pid} (a) b) {' '.join(fields)}\n")
    (d / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))


def test_find_payload_by_its_tmpdir_and_its_session(tmp_path: Path) -> None:
    """Marked processes and the sessions they lead; never strangers, zombies or our session."""
    tmp = "/scratch/cvmfsd-payload-x1"
    mine = os.getsid(0)
    _canned(tmp_path, 100, sid=100, env={"TMPDIR": tmp})  # the payload, leading its session
    _canned(tmp_path, 101, sid=100, env={"TMPDIR": "/elsewhere"})  # its child, TMPDIR changed
    _canned(tmp_path, 102, sid=102, env={"X": "1", "TMPDIR": tmp})  # a child in a new session
    _canned(tmp_path, 103, sid=102, env={})  # ... and its child
    _canned(tmp_path, 104, sid=104, env={"TMPDIR": tmp + "2"})  # another run's payload
    _canned(tmp_path, 105, sid=100, env={"TMPDIR": tmp}, uid=os.getuid() + 1)  # another user
    _canned(tmp_path, 106, sid=100, env={"TMPDIR": tmp}, state="Z")  # a zombie
    _canned(tmp_path, 107, sid=mine, env={"TMPDIR": tmp})  # marked, in the pilot's session
    _canned(tmp_path, 108, sid=mine, env={})  # the pilot's other processes
    _canned(tmp_path, 109, sid=109, env={"TMPDIR=" + tmp: "x"})  # no exact entry
    found = janitor.find_payload(tmp, str(tmp_path))
    assert sorted(found) == [(100, 1100), (101, 1101), (102, 1102), (103, 1103), (107, 1107)]


def test_commands_keep_the_tree_and_drop_what_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tree`` lines add (pid, start) pairs; a bad one is logged; ended ones are dropped
    once the tree has doubled, so a fork storm does not grow the janitor for good."""
    monkeypatch.setattr(janitor, "TREE_PRUNE_AT", 4)
    logged: list[str] = []
    commands = janitor._Commands(logged.append)
    me, start = os.getpid(), janitor.process_start(os.getpid())
    commands.feed(b"tree 4000001 7 4000002 8\ntree 1 2 3\n")
    assert commands.tree == {4000001: 7, 4000002: 8}
    assert logged == ["ignoring unknown command b'tree 1 2 3' from cvmfsd"]
    commands.feed(f"tree {me} {start} 4000003 9\n".encode())  # 4 held: pruned
    assert commands.tree == {me: start}
    commands.feed(b"tree 4000004 1 4000005 1\n")
    assert len(commands.tree) == 3  # below the floor again: kept


def test_end_payload_kills_what_cvmfsd_told_and_its_descendants(tmp_path: Path) -> None:
    """A process cvmfsd told of, in a session of its own without the payload's TMPDIR,
    dies with what it forked since; a stranger, or a told pid with another start time,
    is left alone."""
    escaped = subprocess.Popen(["sh", "-c", "sleep 6031 & echo $!; exec sleep 6032"],
                               stdout=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "TMPDIR": "/"})
    stranger = subprocess.Popen(["sleep", "6033"], text=True)
    try:
        assert escaped.stdout is not None
        child = int(escaped.stdout.readline())
        wait_for(lambda: all(Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")
                             for pid in (escaped.pid, child)))
        told = [(escaped.pid, janitor.process_start(escaped.pid) or 0),
                (stranger.pid, (janitor.process_start(stranger.pid) or 0) + 1)]
        assert janitor.end_payload(str(tmp_path / "no-such-tmp"), tree=told) == []
        assert escaped.wait(5) == -signal.SIGKILL
        wait_for(lambda: janitor.process_start(child) is None)
        assert stranger.poll() is None
    finally:
        for process in (escaped, stranger):
            reap(process)


def test_telling_processes_never_blocks_cvmfsd(dist: Path) -> None:
    """A janitor that does not read: tree lines stop short of filling the pipe, so
    cvmfsd never blocks on them and there is still room for ``done``."""
    handle = spawn_janitor(dist)
    try:
        os.kill(handle.pid, signal.SIGSTOP)
        told = [handle.tell_processes([(4000000 + i, i) for i in range(janitor.TREE_LINE)])
                for _ in range(100)]
        assert told[0] == janitor.TREE_LINE and told[-1] == 0
        os.kill(handle.pid, signal.SIGCONT)
        assert handle.close() == 0  # done got through; nothing was cleaned
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.pid, signal.SIGCONT)
        handle.close(timeout=5)


def test_payload_tmp_is_removed_only_if_cvmfsd_named_it(tmp_path: Path) -> None:
    """A directory not named as cvmfsd names its payload's TMPDIR is left alone."""
    other = tmp_path / "keep"
    (other / "sub").mkdir(parents=True)
    assert not janitor.remove_payload_tmp(str(other))
    assert not janitor.remove_payload_tmp(janitor.PAYLOAD_TMP_PREFIX + "relative")
    assert (other / "sub").is_dir()
    ours = tmp_path / (janitor.PAYLOAD_TMP_PREFIX + "abc")
    (ours / "sub").mkdir(parents=True)
    (ours / "sub" / "f").write_text("x")
    (ours / "link").symlink_to(other)
    assert janitor.remove_payload_tmp(str(ours))
    assert not ours.exists()
    assert (other / "sub").is_dir()  # a symlink inside is removed, never followed


# --- cvmfsd run, SIGKILLed -------------------------------------------------------------

CVMFSD = [sys.executable, "-m", "cvmfsd"]
# Moves to a process group of its own and drops the payload's TMPDIR, then sleeps:
# only its session says it is the payload's.
_ESCAPE = ("import os; os.setpgid(0, 0); os.environ['TMPDIR'] = '/'; "
           "os.execvp('sleep', ['sleep', '6013'])")
PAYLOAD = (f"sleep 6012 & a=$!; {sys.executable} -c \"{_ESCAPE}\" & b=$!; "
           'echo started $$ $a $b "$TMPDIR"; exec sleep 6011')


def _cvmfsd_run(dist: Path | None, *args: str, policy: str = "required") -> subprocess.Popen[str]:
    where = [] if dist is None else ["--dist", str(dist)]
    return subprocess.Popen([*CVMFSD, "run", *where, *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "GLIDEIN_CVMFS": policy})


def _sleeps(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\x00601")
    except OSError:
        return False


class Run:
    """A ``cvmfsd run`` whose payload is :data:`PAYLOAD`, and what it reported."""

    def __init__(self, dist: Path | None, *args: str, policy: str = "required") -> None:
        self.process = _cvmfsd_run(dist, *args, "--", "sh", "-c", PAYLOAD, policy=policy)
        assert self.process.stdout is not None
        words = self.process.stdout.readline().split()
        assert words[:1] == ["started"], self.process.communicate()
        self.payload = [int(w) for w in words[1:4]]
        self.tmp = Path(words[4])
        wait_for(lambda: all(_sleeps(pid) for pid in self.payload))  # _ESCAPE has run

    def payload_gone(self) -> bool:
        return all(janitor.process_start(pid) is None for pid in self.payload)

    def reap(self) -> None:
        """SIGKILL cvmfsd and what is left of its payload (by pid), and wait for cvmfsd."""
        for pid in self.payload:
            if _sleeps(pid):
                os.kill(pid, signal.SIGKILL)
        reap(self.process)


def _killed(log: str) -> set[int]:
    """The pids the janitor's log says it SIGKILLed as the payload."""
    found = re.search(r"killed the payload: SIGSTOP, SIGKILL to pids \[([\d, ]*)\]", log)
    assert found is not None, log
    return {int(pid) for pid in found[1].split(", ") if pid}


@pytest.fixture(name="runs")
def _runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        run.reap()


@pytest.mark.fuse
def test_sigkilled_run_mode1_leaves_no_payload_mount_or_tmpdir(
        dist: Path, runs: list[Run]) -> None:
    """Mode 1, cvmfsd SIGKILLed: payload (all its session), mounts and TMPDIR gone within 1 s."""
    run = Run(dist, "--mode", "1", "--repos", REPO_A)
    runs.append(run)
    assert mounts_under(dist)
    assert run.tmp.name.startswith(janitor.PAYLOAD_TMP_PREFIX) and run.tmp.is_dir()
    cleaner = int((dist / LOCK_NAME).read_text().split()[4])
    run.process.kill()
    killed = time.monotonic()
    wait_for(lambda: run.payload_gone() and not mounts_under(dist) and not run.tmp.exists(),
             timeout=1.0, interval=0.005)
    latency = time.monotonic() - killed
    wait_for(lambda: not _alive(cleaner, b"cvmfsd.janitor"), timeout=5)
    log = _log(dist)
    assert "clean-up complete" in log, log
    assert set(run.payload) <= _killed(log), log  # with what else was left of the tree
    assert f"removed the payload's TMPDIR {run.tmp}" in log, log
    assert not cvmfs2_pids(dist)
    assert latency < 1.0


def test_sigkilled_run_without_cvmfs_leaves_no_payload_or_tmpdir(runs: list[Run]) -> None:
    """No distribution (policy never): the janitor still ends the payload and its TMPDIR."""
    run = Run(None, policy="never")
    runs.append(run)
    run.process.kill()
    wait_for(lambda: run.payload_gone() and not run.tmp.exists(), timeout=1.0, interval=0.005)


def _locked(path: Path) -> bool:
    """Whether someone holds the flock of ``path`` (tried, and given back at once)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.fuse
def test_janitor_holds_the_distribution_until_it_is_clean(dist: Path, runs: list[Run]) -> None:
    """After cvmfsd's SIGKILL the lock stays taken by its janitor, recorded or not.

    The janitor is held stopped; its record is erased (cvmfsd killed before it
    could write it): a new run fails clearly and touches nothing, and the
    distribution is free once the janitor has cleaned it.
    """
    run = Run(dist, "--mode", "1", "--repos", REPO_A)
    runs.append(run)
    lock = dist / LOCK_NAME
    cleaner = int(lock.read_text().split()[4])
    daemons = {pid: janitor.process_start(pid) for pid in cvmfs2_pids(dist)}
    os.kill(cleaner, signal.SIGSTOP)  # our cvmfsd's janitor, by pid
    try:
        run.process.kill()
        run.process.wait()
        assert _locked(lock)
        lock.write_text("")
        second = _cvmfsd_run(dist, "--mode", "1", "--repos", REPO_A, "--", "echo", "ran")
        out, err = second.communicate(timeout=30)
        assert second.returncode == 69, err
        assert "ran" not in out
        assert f"cvmfsd: error: distribution {dist} is in use" in err
        assert {pid: janitor.process_start(pid) for pid in cvmfs2_pids(dist)} == daemons
        assert mounts_under(dist) and not run.payload_gone()
    finally:
        os.kill(cleaner, signal.SIGCONT)
    wait_for(lambda: not _alive(cleaner, b"cvmfsd.janitor"), timeout=5)
    assert not _locked(lock)
    assert run.payload_gone() and not mounts_under(dist) and not run.tmp.exists()
    assert not cvmfs2_pids(dist)


@pytest.mark.fuse
def test_sigkilled_run_marks_glidein_config_and_removes_its_socket(
        dist: Path, runs: list[Run], short_tmp: Path) -> None:
    """cvmfsd SIGKILLed: glidein_config says failed, no CVMFS, and why; no stale socket."""
    config, sock = short_tmp / "glidein_config", short_tmp / "s" / "ctl.sock"
    sock.parent.mkdir(mode=0o700)
    config.write_text("GLIDEIN_Site X\n")
    run = Run(dist, "--mode", "1", "--repos", REPO_A, "--glidein-config", str(config),
              "--socket", str(sock))
    runs.append(run)
    values = glidein.read_glidein_config(config).values
    assert (values["CVMFSD_STATUS"], sock.is_socket()) == ("ready", True)
    pid = run.process.pid
    run.process.kill()
    wait_for(lambda: glidein.read_glidein_config(config).get("CVMFSD_STATUS") == "failed",
             timeout=10)
    values = glidein.read_glidein_config(config).values
    assert values["GWMS_IS_CVMFS"] == "no"
    assert values["CVMFSD_ERROR"].startswith(f"cvmfsd (pid {pid}) ended without stopping CVMFS")
    assert "nothing left" in values["CVMFSD_ERROR"]
    assert values["CVMFSD_FAILURE"] == "WN_Resource"
    assert "SIGKILL" in values["CVMFSD_HINT"]
    assert not sock.exists()
    assert "removed the control socket" in _log(dist)


def test_report_death_leaves_another_cvmfsd_alone(tmp_path: Path) -> None:
    """A glidein_config that names a later cvmfsd is not marked; the socket goes only if one."""
    config = tmp_path / "glidein_config"
    config.write_text("CVMFSD_PID 4242\nCVMFSD_STATUS ready\n")
    said: list[str] = []
    commands = janitor._Commands(said.append)
    commands.feed(f"glidein-config {config}\nsocket {tmp_path}/file\n".encode())
    assert (commands.glidein_config, commands.socket) == (str(config), f"{tmp_path}/file")
    assert not janitor.report_death(4141, "closed its pipe", True, commands, said.append)
    assert glidein.read_glidein_config(config).get("CVMFSD_STATUS") == "ready"
    assert janitor.report_death(4242, "closed its pipe", True, commands, said.append)
    assert glidein.read_glidein_config(config).get("CVMFSD_STATUS") == "failed"
    (tmp_path / "file").write_text("not a socket")
    janitor.remove_socket(commands.socket, said.append)
    assert (tmp_path / "file").exists()
