"""Leftovers of a crashed run: found for this distribution only, and cleaned up.

The first test reads a canned /proc tree; the others make real mounts with the
simulated distribution, kill only the cvmfs2 processes they mounted (by pid),
and leave a second distribution's mount untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfsd import janitor
from cvmfsd.launch import Dist
from cvmfsd.leftovers import (
    LOCK_NAME,
    DistInUse,
    LeftoverMount,
    MountState,
    OrphanProcess,
    clean_leftovers,
    find_leftovers,
    lock_dist,
)
from cvmfsd.sim import makedist, stratum
from tests.conftest import REPO_A, REPO_B, cvmfs2_pids, mounts_under, reap, wait_for


def _proc(root: Path, pid: int, argv: list[str], *, uid: int, state: str = "S",
          start: int = 1000, exe: str = "/usr/bin/python3.11") -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "exe").symlink_to(exe)
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    (d / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nNSpid:\t{pid}\n")
    fields = [state, *["0"] * 18, str(start), "0"]
    (d / "stat").write_text(f"{pid} (odd) name) {' '.join(fields)}\n")


def test_find_leftovers_in_a_canned_proc(tmp_path: Path) -> None:
    """Only this distribution's mounts and our uid's live cvmfs2 of it are reported."""
    root = tmp_path / "d"
    (root / "dist/etc/cvmfs/default.d").mkdir(parents=True)
    (root / "dist/etc/cvmfs/default.d/50.conf").write_text("CVMFS_CONFIG_REPOSITORY=cfg.repo\n")
    mine, other = root / "dist/cvmfs", tmp_path / "d/dist/cvmfsx"
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self/mountinfo").write_text("".join(
        f"{i} 1 0:{i} / {point} rw - fuse cvmfs2 rw\n" for i, point in enumerate([
            mine / "cfg.repo", mine / "repo.a", other / "repo.b", mine / "repo.b"])))
    uid = os.getuid()
    cvmfs2 = ["python", "-m", "cvmfsd.sim.cvmfs2", "-o", "config=c"]
    _proc(proc, 10, [*cvmfs2, "repo.a", str(mine / "repo.a")], uid=uid, start=77)
    _proc(proc, 11, [*cvmfs2, "repo.b", str(other / "repo.b")], uid=uid)
    _proc(proc, 12, [*cvmfs2, "repo.b", str(mine / "repo.b")], uid=uid + 1)
    _proc(proc, 13, [*cvmfs2, "repo.b", str(mine / "repo.b")], uid=uid, state="Z")
    _proc(proc, 14, ["cat", str(mine / "repo.a")], uid=uid)
    # Same uid, an argv that merely looks like cvmfs2's (issue 12): not cvmfs2.
    _proc(proc, 15, ["python", "tool.py", "cvmfsd.sim.cvmfs2", "repo.a", str(mine / "repo.a")],
          uid=uid)
    _proc(proc, 16, [*cvmfs2, "repo.a", str(mine / "repo.a")], uid=uid, exe="/usr/bin/bash")
    _proc(proc, 17, ["cvmfs2", "-o", "c", "repo.a", str(mine / "repo.a")], uid=uid,
          exe="/usr/bin/cvmfs2")
    _proc(proc, 18, [*cvmfs2, "repo.b", str(mine / "repo.a")], uid=uid)
    found = find_leftovers(Dist(root), proc, probe_timeout=None)
    assert found.mounts == tuple(LeftoverMount(mine / name, MountState.UNKNOWN)
                                 for name in ("repo.b", "repo.a", "cfg.repo"))
    assert found.processes == (OrphanProcess(10, 77, mine / "repo.a"),)


@pytest.fixture(name="other_dist")
def _other_dist(short_tmp: Path, stratum_dir: Path) -> Iterator[Path]:
    """A second distribution with repo.a mounted; at teardown it is unmounted."""
    other = makedist.make_dist(short_tmp / "other", stratum=stratum_dir)
    try:
        subprocess.run([str(other / "mountrepo"), REPO_A], check=True, capture_output=True)
        yield other
    finally:
        subprocess.run([str(other / "umountrepo"), REPO_A], capture_output=True, check=False)
        wait_for(lambda: not cvmfs2_pids(other), timeout=5)
        assert not mounts_under(other)


def _cvmfs2_of(dist: Path, repo: str) -> int:
    """The cvmfs2 serving ``repo``: the one holding /dev/fuse, not its watchdog, which
    has the same command line (cvmfs monitor.cc: forked, never exec'd, fds closed)."""
    (pid,) = [pid for pid in cvmfs2_pids(dist)
              if Path(f"/proc/{pid}/cmdline").read_bytes().endswith(f"/{repo}\0".encode())
              and any(str(fd.readlink()) == "/dev/fuse"
                      for fd in Path(f"/proc/{pid}/fd").iterdir())]
    return pid


def _statvfs_errno(path: Path) -> int:
    """statvfs in a child (never here: a mount may hang); its errno, 0 if it worked."""
    code = "import os, sys\ntry: os.statvfs(sys.argv[1])\nexcept OSError as e: sys.exit(e.errno)"
    return subprocess.run([sys.executable, "-c", code, str(path)], check=False,
                          timeout=10).returncode


@pytest.mark.fuse
def test_stale_mount_and_orphan_are_cleaned(dist: Path, other_dist: Path) -> None:
    """A dead cvmfs2's ENOTCONN mount and a live orphan go; another distribution stays."""
    mine = dist / "dist/cvmfs"
    for repo in (REPO_A, REPO_B):
        subprocess.run([str(dist / "mountrepo"), repo], check=True, capture_output=True)
    os.kill(_cvmfs2_of(dist, REPO_A), signal.SIGKILL)
    wait_for(lambda: _statvfs_errno(mine / REPO_A) == errno.ENOTCONN, timeout=5)
    orphan = _cvmfs2_of(dist, REPO_B)

    found = find_leftovers(Dist(dist))
    assert {(m.repo, m.state) for m in found.mounts} == {
        (REPO_A, MountState.ENOTCONN), (REPO_B, MountState.OK)}
    # Besides the orphan: watchdogs (same command line), repo.a's still waiting (the
    # cache manager it started holds its pipe too, see cvmfsd.sim._cachemgr).
    assert (orphan, REPO_B) in [(p.pid, p.repo) for p in found.processes]
    assert {p.repo for p in found.processes} <= {REPO_A, REPO_B}

    report = clean_leftovers(Dist(dist), found)
    assert report.clean, report
    assert (orphan, "SIGTERM") in report.signalled
    assert mine / REPO_A in report.unmounted + report.lazily_unmounted
    assert not mounts_under(dist)
    assert not cvmfs2_pids(dist)
    assert not find_leftovers(Dist(dist))
    # The other distribution's mount and daemon were not touched.
    assert mounts_under(other_dist) == [str(other_dist / "dist/cvmfs" / REPO_A)]
    assert _statvfs_errno(other_dist / "dist/cvmfs" / REPO_A) == 0


@pytest.mark.fuse
def test_hung_mount_is_probed_with_a_deadline(dist: Path, stratum_dir: Path) -> None:
    """A mount whose daemon stalls is reported HUNG within the deadline, then cleaned."""
    subprocess.run([str(dist / "mountrepo"), REPO_A], check=True, capture_output=True)
    try:
        stratum.set_faults(stratum_dir, REPO_A, hang_after=0)
        log = dist / "log" / f"{REPO_A}.log"
        wait_for(lambda: "simulated hang" in log.read_text(), timeout=10)
        found = find_leftovers(Dist(dist), probe_timeout=0.5)
        assert [(m.repo, m.state) for m in found.mounts] == [(REPO_A, MountState.HUNG)]
        report = clean_leftovers(Dist(dist), found)
        assert report.clean, report
        assert not mounts_under(dist)
    finally:
        stratum.set_faults(stratum_dir, REPO_A, hang_after=None)
        for pid in cvmfs2_pids(dist):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- one cvmfsd per distribution -------------------------------------------------------

CVMFSD = [sys.executable, "-m", "cvmfsd"]
_HOLDER = ("import sys, time\nfrom pathlib import Path\nfrom cvmfsd.launch import Dist\n"
           "from cvmfsd.leftovers import lock_dist\nlock = lock_dist(Dist(Path(sys.argv[1])))\n"
           "print('locked', flush=True)\ntime.sleep(600)\n")


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)


_LOCKER = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
           "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(600)\n")


def _sleeper(marker: str, seconds: float) -> subprocess.Popen[str]:
    """A process whose command line holds ``marker`` (posing as a janitor)."""
    return _start([sys.executable, "-c", f"import time; time.sleep({seconds})", marker])


def test_second_lock_is_refused_naming_the_owner(dist: Path) -> None:
    """A distribution locked by a live cvmfsd cannot be locked again; its pid is named."""
    holder = _start([sys.executable, "-c", _HOLDER, str(dist)])
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(DistInUse) as caught:
            lock_dist(Dist(dist))
        assert caught.value.owner == holder.pid
        assert str(caught.value) == (f"distribution {dist} is in use by cvmfsd pid {holder.pid}; "
                                     "expected one cvmfsd per distribution")
        assert caught.value.hint is not None
        assert f"stop the other one (pid {holder.pid})" in caught.value.hint
        assert caught.value.exit_status == 69  # a launch error: the policy decides
    finally:
        reap(holder)
    lock = lock_dist(Dist(dist))  # the owner's death released it
    try:
        assert lock.exclusive
        assert (dist / LOCK_NAME).read_text() == (
            f"cvmfsd {os.getpid()} {janitor.process_start(os.getpid())}\n")
    finally:
        lock.release()


def test_lock_is_not_inherited_by_children(dist: Path) -> None:
    """A child started while the lock is held does not keep it after cvmfsd lets go."""
    lock = lock_dist(Dist(dist))
    child = _sleeper("child", 600)
    try:
        with pytest.raises(DistInUse, match="is in use"):
            lock_dist(Dist(dist))
        lock.release()
        again = lock_dist(Dist(dist))
        assert again.exclusive
        again.release()
    finally:
        lock.release()
        reap(child)


def test_new_owner_waits_for_the_janitor_of_a_dead_one(dist: Path) -> None:
    """The lock of a killed cvmfsd's janitor is waited for; one kept too long is an error."""
    dead = _sleeper("cvmfsd", 0)
    dead.wait()
    # A janitor holds the lock it inherited from cvmfsd until it has cleaned up.
    cleaning = _start([sys.executable, "-c", _LOCKER, str(dist / LOCK_NAME), "cvmfsd.janitor"])
    try:
        assert cleaning.stdout is not None
        assert cleaning.stdout.readline() == "locked\n"
        (dist / LOCK_NAME).write_text(
            f"cvmfsd {dead.pid} 1\njanitor {cleaning.pid} "
            f"{janitor.process_start(cleaning.pid)}\n")
        with pytest.raises(DistInUse, match=f"still being cleaned up by the janitor "
                                            f"\\(pid {cleaning.pid}\\) of cvmfsd pid {dead.pid}"):
            lock_dist(Dist(dist), janitor_wait=1.5)  # longer than for an unrecorded holder
        threading.Timer(0.3, cleaning.kill).start()
        started = time.monotonic()
        lock = lock_dist(Dist(dist), janitor_wait=30)
        try:
            assert cleaning.poll() is not None  # it returned only once the janitor was gone
            assert 0.25 < time.monotonic() - started < 10
            assert lock.exclusive
        finally:
            lock.release()
    finally:
        reap(dead)
        reap(cleaning)


def test_lock_of_a_dead_owner_with_no_janitor_is_an_error(dist: Path) -> None:
    """A lock still held after its owner died, by no recorded janitor, fails in about 1 s."""
    dead = _sleeper("cvmfsd", 0)
    dead.wait()
    holder = _start([sys.executable, "-c", _LOCKER, str(dist / LOCK_NAME), "stray"])
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        (dist / LOCK_NAME).write_text(f"cvmfsd {dead.pid} 1\n")
        started = time.monotonic()
        with pytest.raises(DistInUse, match=f"though the cvmfsd that took it \\(pid {dead.pid}\\) "
                                            "has exited") as caught:
            lock_dist(Dist(dist))
        assert 0.9 < time.monotonic() - started < 5
        assert caught.value.hint is not None
        assert f"fuser {dist / LOCK_NAME}" in caught.value.hint
    finally:
        reap(dead)
        reap(holder)


def _cvmfsd_run(dist: Path, *args: str, policy: str = "required") -> subprocess.Popen[str]:
    env = {**os.environ, "GLIDEIN_CVMFS": policy}
    return subprocess.Popen([*CVMFSD, "run", "--dist", str(dist), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _identities(pids: list[int]) -> dict[int, int | None]:
    return {pid: janitor.process_start(pid) for pid in pids}


@pytest.mark.fuse
def test_second_run_on_a_busy_distribution_leaves_the_first_alone(
        dist: Path, short_tmp: Path) -> None:
    """A second cvmfsd run fails early (69, the owner named); the first one is not touched."""
    go = short_tmp / "go"
    first = _cvmfsd_run(dist, "--repos", REPO_A, "--", "sh", "-c",
                        f"echo started; while [ ! -e {go} ]; do sleep 0.05; done; "
                        f"cat /cvmfs/{REPO_A}/hello.txt")
    try:
        assert first.stdout is not None
        assert first.stdout.readline() == "started\n"
        daemons = _identities(cvmfs2_pids(dist))
        assert daemons
        second = _cvmfsd_run(dist, "--repos", REPO_A, "--", "echo", "second payload ran")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 69, err
        assert "second payload ran" not in out
        assert (f"cvmfsd: error: distribution {dist} is in use by cvmfsd pid {first.pid}; "
                "expected one cvmfsd per distribution") in err
        assert "cleaned up after an earlier run" not in err
        assert _identities(list(daemons)) == daemons  # every cvmfs2 of the first run lives
        go.touch()
        out, err = first.communicate(timeout=60)
        assert (first.returncode, out) == (0, "hello from repo.a\n"), err
        assert "enotconn" not in err
    finally:
        reap(first)
    wait_for(lambda: not cvmfs2_pids(dist))


@pytest.mark.fuse
@pytest.mark.parametrize("mode", ["3", "1"])
def test_after_sigkill_the_janitor_cleans_and_a_new_run_takes_the_dist(
        dist: Path, mode: str) -> None:
    """A SIGKILLed run's janitor finishes its clean-up before a new run takes the dist.

    The janitor is held stopped for a while: the new run must wait for it, not
    clean up alongside it (and have its own mounts taken by it).
    """
    first = _cvmfsd_run(dist, "--mode", mode, "--repos", REPO_A, "--", "sh", "-c",
                        "echo started $$; exec sleep 6011")
    cleaner, second, payload = None, None, 0
    try:
        assert first.stdout is not None
        word, payload_pid = first.stdout.readline().split()
        assert word == "started"
        payload = int(payload_pid) if mode == "1" else 0  # in mode 3, a pid of the namespace
        holders = (dist / LOCK_NAME).read_text().split()
        assert holders[:2] == ["cvmfsd", str(first.pid)]
        cleaner = int(holders[4])
        os.kill(cleaner, signal.SIGSTOP)  # our cvmfsd's janitor, by pid
        first.kill()
        first.wait()
        second = _cvmfsd_run(dist, "--mode", mode, "--repos", REPO_A, "--", "sh", "-c",
                             f'cat "${{CVMFS_MOUNT_DIR:-/cvmfs}}/{REPO_A}/hello.txt"')
        with contextlib.suppress(subprocess.TimeoutExpired):
            second.wait(timeout=2)
        assert second.poll() is None, "the new run did not wait for the janitor"
        assert cvmfs2_pids(dist), "nothing was cleaned while the janitor was stopped"
        os.kill(cleaner, signal.SIGCONT)
        out, err = second.communicate(timeout=90)
        assert (second.returncode, out) == (0, "hello from repo.a\n"), err
        assert "cleaned up after an earlier run" not in err  # the janitor had done it
        assert janitor.process_start(cleaner) is None
        assert "clean-up complete" in (dist / "log" / "janitor.log").read_text()
        assert not payload or janitor.process_start(payload) is None
    finally:
        if cleaner is not None and janitor.process_start(cleaner) is not None:
            os.kill(cleaner, signal.SIGCONT)
        # Mode 1's payload runs on the host: the janitor has killed it (or we do).
        with contextlib.suppress(OSError):
            if payload and Path(f"/proc/{payload}/cmdline").read_bytes() == b"sleep\x006011\x00":
                os.kill(payload, signal.SIGKILL)
        reap(first)
        if second is not None:
            reap(second)
    assert not mounts_under(dist)
    wait_for(lambda: not cvmfs2_pids(dist))
