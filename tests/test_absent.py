"""A repository whose mount vanishes is mounted again (``cvmfsd run`` end to end).

``absent`` (no FUSE mount at the repository's mount point) while the run is
running is repaired like a crash: remounted at once, then with backoff.  Two
ways a mount vanishes are tested: someone lazily unmounts it, and a crashed
cvmfs2's watchdog does, before or after cvmfsd's own remount (see the theory of
operation in :mod:`cvmfsd.keeper` for when the watchdog can reach a new mount).
Each test ends with the repository ok, mounted exactly once at its mount point,
and the payload reading it again.  Runs use the :class:`tests.test_recovery.Cvmfsd`
helper.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from cvmfsd.enter import NS_GET_USERNS
from cvmfsd.keeper import BACKOFF, SETTLE, RemountBusy, RepoKeeper
from cvmfsd.mountinfo import is_fuse, parse_mountinfo
from cvmfsd.probing import ProbeResult
from cvmfsd.sim import _watchdog
from cvmfsd.state import DaemonState, RepoState
from cvmfsd.watch import host_pid
from tests.conftest import REPO_A, cvmfs2_pids, fds_of, wait_for
from tests.livedaemon import talk, talk_socket
from tests.test_recovery import (
    CONTENT,
    Cvmfsd,
    _run,
    ask,
    cvmfsctl_status,
    is_event,
    repo_state,
    wait_exit,
    watched_cvmfs2,
)

__all__ = ["_run"]  # the fixture, re-exported for pytest

ROOT = os.geteuid() == 0
# The crash watchdog can regain root to unmount only as (fake) root (auto_umount.cc:85).
needs_root = [pytest.mark.root,
              pytest.mark.skipif(not ROOT, reason="mode 1's watchdog unmounts only as root")]


class Where:
    """Where a run's repository is mounted and how to reach it from here."""

    def __init__(self, cvmfsd: Cvmfsd, dist: Path, mode: str) -> None:
        _, status = cvmfsctl_status(cvmfsd.socket)
        self.mode = mode
        self.private = str(dist / "dist" / "cvmfs" / REPO_A)  # cvmfs2's (the watchdog's)
        self.shim: int | None = None
        if mode == "3":
            shim = status["shim_pid"]
            assert isinstance(shim, int)
            self.shim = shim
            self.table = Path(f"/proc/{shim}/mountinfo")
            self.point = f"/cvmfs/{REPO_A}"  # the payload's: a bind of the private one
        else:
            self.table = Path("/proc/self/mountinfo")
            self.point = self.private

    def fuse_mounts(self, point: str | None = None) -> int:
        """How many FUSE mounts are at ``point`` (the payload's by default): 1 when whole."""
        wanted = point or self.point
        return sum(1 for m in parse_mountinfo(self.table.read_text())
                   if m.mountpoint == wanted and is_fuse(m.fstype))

    def lazy_unmount(self, point: str | None = None) -> None:
        """``umount -l`` (``fusermount -u -z``) of the payload's mount point, where it is.

        Mode 3: as the namespace's fake root (the user namespace that owns its
        mounts: the shim's own has no capabilities), in its root (cvmfsexec
        pivots) and its pid namespace (umount reads /proc/self/mountinfo).
        """
        if self.shim is None:  # on the host: an ordinary user has fusermount
            tool = ["umount", "-l"] if ROOT else [
                shutil.which("fusermount3") or "fusermount", "-u", "-z"]
            subprocess.run([*tool, point or self.point], check=True, timeout=10)
            return
        ns = f"/proc/{self.shim}/ns"
        with open(f"{ns}/mnt") as mnt:  # noqa: PTH123 - a descriptor for the ioctl
            owner = fcntl.ioctl(mnt.fileno(), NS_GET_USERNS)
        try:
            subprocess.run(
                ["nsenter", "--preserve-credentials", f"--user=/proc/self/fd/{owner}",
                 f"--mount={ns}/mnt",
                 f"--pid={ns}/pid", f"--root=/proc/{self.shim}/root",
                 "umount", "-l", point or self.point], check=True, timeout=10,
                pass_fds=(owner,))
        finally:
            os.close(owner)


def remounts(cvmfsd: Cvmfsd, repo: str) -> float:
    """The ``remounts_total{repo, result="ok"}`` counter, from the metrics verb."""
    _, answer = ask(cvmfsd.socket, "metrics")
    text = answer["text"]
    assert isinstance(text, str)
    for line in text.splitlines():
        name, _, labels = line.partition("{")
        if name.endswith("remounts_total") and f'repo="{repo}"' in labels \
                and 'result="ok"' in labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def settled_ok(cvmfsd: Cvmfsd, where: Where) -> None:
    """Status says ok, the repository is mounted once, and the payload reads it again."""
    wait_for(lambda: repo_state(cvmfsctl_status(cvmfsd.socket)[1], REPO_A) == "ok",
             timeout=10, interval=0.1)
    assert where.fuse_mounts() == 1, where.table.read_text()
    assert cvmfsd.finish() == 0, cvmfsd.log_tail()
    assert (cvmfsd.work / "after").read_text() == CONTENT


@pytest.mark.fuse
@pytest.mark.parametrize(("mode", "both"), [("3", False), ("3", True), ("1", False)])
def test_lazily_unmounted_repository_is_repaired(
        run: Callable[..., Cvmfsd], dist: Path, mode: str, both: bool) -> None:
    """``umount -l /cvmfs/repo.a`` in the namespace (mode 3) or of the mount on the host
    (mode 1) while the payload runs: absent, repaired within a few seconds, status ok,
    the repair counted in the metrics, mounted once, and the payload reads it again.

    Mode 3 needs the bind back first: cvmfsexec's UMOUNTREPO fails without a mount at
    /cvmfs/<repo> and its MOUNTREPO of a repository it lists does nothing (cvmfsexec
    4.51, cvmfsexec:132-133 and 150-161).  With only the bind gone, cvmfs2 serves on
    through the new bind and is kept (never unmount a repository that works); with
    its own mount at dist/cvmfs/<repo> gone too (``both``), cvmfs2 ends and the
    remount, finding nothing to unmount there, mounts a new one.  Mode 1: the detached
    mount's cvmfs2 ends, and the remount finds nothing to unmount."""
    cvmfsd = run(mode=mode)
    cvmfsd.wait_started()
    pid = watched_cvmfs2(cvmfsd, REPO_A)
    where = Where(cvmfsd, dist, mode)
    assert where.fuse_mounts() == 1
    before = remounts(cvmfsd, REPO_A)
    start = time.monotonic()
    if both:
        where.lazy_unmount(where.private)
    where.lazy_unmount()
    seen, record = cvmfsd.wait_log(is_event("repository state", REPO_A, new="absent"),
                                   after=start)
    assert record["level"] == "warning"
    done, _ = cvmfsd.wait_log(is_event("remounted", REPO_A), after=seen, timeout=30)
    assert done - start < 5.0, f"repaired {done - start:.2f} s after the unmount"
    assert remounts(cvmfsd, REPO_A) == before + 1
    # What the repair itself passes through (a bind, an unmount) is no news.
    told = [r for when, r in cvmfsd.records if when >= start and r.get("level") == "warning"
            and r.get("event") == "repository state"]
    assert told == [record], told
    kept = mode == "3" and not both
    assert kept == any(r.get("event") == "the repository serves again at its path; not "
                       "remounted" for _, r in cvmfsd.records)
    if kept:
        assert pid in cvmfs2_pids(dist)
    else:
        assert watched_cvmfs2(cvmfsd, REPO_A, after=seen) != pid
    settled_ok(cvmfsd, where)


def crash(cvmfsd: Cvmfsd, dist: Path, where: Where) -> tuple[int, float]:
    """Crash repo.a's cvmfs2 with cvmfsd stopped; its watchdog's pid and the crash's time."""
    pid = watched_cvmfs2(cvmfsd, REPO_A)
    ns_pid = int(talk(talk_socket(dist, REPO_A), "pid watchdog"))  # in cvmfs2's pid namespace
    dog = host_pid(ns_pid, None if where.shim is None else Path(f"/proc/{where.shim}"))
    assert dog is not None
    pidfd = os.pidfd_open(pid)
    cvmfsd.process.send_signal(signal.SIGSTOP)
    try:
        assert talk(talk_socket(dist, REPO_A), "sim crash") == "OK\n"
        return dog, wait_exit(pid, timeout=10, fd=pidfd)
    except BaseException:
        cvmfsd.process.send_signal(signal.SIGCONT)
        raise


def watchdog_said(dist: Path) -> str:
    return (dist / "log" / f"{REPO_A}.log").read_text()


@pytest.mark.fuse
@pytest.mark.parametrize("mode", ["3", pytest.param("1", marks=needs_root)])
def test_watchdog_unmount_after_the_remount(
        run: Callable[..., Cvmfsd], dist: Path, mode: str, short_tmp: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The crashed cvmfs2's watchdog finds its mount point ENOTCONN (auto_umount.cc:76-77)
    while cvmfsd is held up, then waits for the mtab lock (platform_linux.h:63-85) while
    cvmfsd remounts, then detaches whatever is at its mount point (:131): the new mount.
    Mode 1: that is the repository's mount point, absent, remounted again.  Mode 3: the
    watchdog's is dist/cvmfs/<repo>, and /cvmfs/<repo>, a bind of the new mount, serves
    on.  Either way: ok, mounted once."""
    mtab = short_tmp / "mtab"
    mtab.write_text("")
    monkeypatch.setenv(_watchdog.PATH_MOUNTED_ENV, str(mtab))
    lock = os.open(f"{mtab}.cvmfslock", os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        cvmfsd = run(mode=mode)
        cvmfsd.wait_started()
        where = Where(cvmfsd, dist, mode)
        dog, crashed = crash(cvmfsd, dist, where)
        try:
            wait_for(lambda: f"{mtab}.cvmfslock" in fds_of(dog), timeout=10, interval=0.05)
        finally:
            cvmfsd.process.send_signal(signal.SIGCONT)
        cvmfsd.wait_log(is_event("remounted", REPO_A), after=crashed, timeout=30)
        assert where.fuse_mounts() == 1
    finally:
        os.close(lock)  # the watchdog takes it within a second and unmounts
    released = time.monotonic()
    wait_exit(dog, timeout=10)
    assert f"crash cleanup handler unmounted stalled {where.private}" in watchdog_said(dist)
    if mode == "1":
        seen, _ = cvmfsd.wait_log(is_event("repository state", REPO_A, new="absent"),
                                  after=released)
        cvmfsd.wait_log(is_event("remounted", REPO_A), after=seen, timeout=30)
    else:
        assert where.fuse_mounts(where.private) == 0  # detached; the bind serves on
    settled_ok(cvmfsd, where)


@pytest.mark.fuse
@pytest.mark.parametrize("mode", ["3", pytest.param("1", marks=needs_root)])
def test_watchdog_unmount_before_the_remount(
        run: Callable[..., Cvmfsd], dist: Path, mode: str) -> None:
    """cvmfsd held up past the watchdog's 2 s (auto_umount.cc:52): the watchdog detaches
    the dead mount first (:90-91), and the remount finds nothing to unmount there (mode 1:
    the repository's mount point is gone; mode 3: dist/cvmfs/<repo> is, the bind stays
    ENOTCONN); ok, mounted once."""
    cvmfsd = run(mode=mode)
    cvmfsd.wait_started()
    where = Where(cvmfsd, dist, mode)
    dog, crashed = crash(cvmfsd, dist, where)
    try:
        wait_exit(dog, timeout=10)
    finally:
        cvmfsd.process.send_signal(signal.SIGCONT)
    assert f"crash cleanup handler unmounted stalled {where.private}" in watchdog_said(dist)
    assert where.fuse_mounts(where.private) == 0
    cvmfsd.wait_log(is_event("remounted", REPO_A), after=crashed, timeout=30)
    settled_ok(cvmfsd, where)


@pytest.mark.fuse
@pytest.mark.parametrize("mode", ["3", "1"])
def test_a_clean_exit_logs_no_warning(run: Callable[..., Cvmfsd], mode: str) -> None:
    """The payload reads and exits 0: the mounts that go with the run's end (the namespace
    ends, or cvmfsd unmounts) are neither a warning about a repository nor remounted.
    (Mode 1 warns of a cache manager left after the unmounts: another matter, not
    checked here.)"""
    cvmfsd = run(mode=mode)
    cvmfsd.wait_started()
    assert cvmfsd.finish() == 0, cvmfsd.log_tail()
    cvmfsd.close()
    loud = [r for _, r in cvmfsd.records if r.get("level") not in ("debug", "info")
            and (mode == "3" or "repo" in r)]
    assert not loud, loud
    assert not [r for _, r in cvmfsd.records if r.get("event") == "remounting"]


# -- the keeper's decisions, without mounts ------------------------------------------


def new_keeper(state: DaemonState, calls: list[float]) -> RepoKeeper:
    async def remount(repo: str) -> str | None:
        calls.append(trio.current_time())
        return None

    return RepoKeeper(state, remount=remount, hang_timeout=1.0, mountinfo=lambda: None,
                      probe_path=lambda repo: None, talk_socket=lambda repo: None,
                      interval=15.0, deadline=5.0)


ABSENT = ProbeResult(repo=REPO_A, state="absent", error="no FUSE mount at /cvmfs/repo.a")


async def test_absent_is_remounted_at_once_only_while_running(
        autojump_clock: trio.abc.Clock) -> None:
    """absent while running: remounted at once; while stopping: an info line, no remount."""
    state = DaemonState(phase="running", repos={REPO_A: RepoState("ok")})
    calls: list[float] = []
    keeper = new_keeper(state, calls)
    async with trio.open_nursery() as nursery:
        keeper._nursery = nursery
        await keeper._on_change(REPO_A, "ok", ABSENT)
        await trio.sleep(1)
        assert calls == [0.0]
        assert state.repos[REPO_A].state == "ok"
        state.phase = "stopping"
        with structlog.testing.capture_logs() as logs:
            await keeper._on_change(REPO_A, "ok", ABSENT)
        await trio.sleep(600)
        assert calls == [0.0]
        assert [(e["event"], e["log_level"]) for e in logs] == [("repository state", "info")]
        nursery.cancel_scope.cancel()


async def test_a_mount_that_vanishes_again_goes_on_with_the_backoff(
        autojump_clock: trio.abc.Clock) -> None:
    """Absent again right after a remount (SETTLE): the next remount waits the next step
    of the backoff, not none -- a mount that keeps vanishing is no remount loop; once
    settled, a new fault is remounted at once again."""
    state = DaemonState(phase="running", repos={REPO_A: RepoState("ok")})
    calls: list[float] = []
    keeper = new_keeper(state, calls)
    async with trio.open_nursery() as nursery:
        keeper._nursery = nursery
        for _ in range(4):
            await keeper._on_change(REPO_A, "ok", ABSENT)
            await trio.sleep(BACKOFF[3])  # past this repair's wait
            await trio.testing.wait_all_tasks_blocked()
            assert not keeper._repairing
        starts = [i * BACKOFF[3] for i in range(4)]  # when each fault came
        assert [c - t for c, t in zip(calls, starts)] == [0.0, BACKOFF[1], BACKOFF[2], BACKOFF[3]]
        await trio.sleep(SETTLE)
        start = trio.current_time()
        await keeper._on_change(REPO_A, "ok", ABSENT)
        await trio.sleep(0.5)
        assert calls[-1] == start
        nursery.cancel_scope.cancel()


async def test_one_remount_at_a_time_whoever_asks(autojump_clock: trio.abc.Clock) -> None:
    """While a user's remount holds repo.a: what the watcher sees is no news, a second
    claim is refused naming the holder, and a repair of the keeper's waits for it, then
    leaves alone the repository it left ok."""
    state = DaemonState(phase="running", repos={REPO_A: RepoState("ok")})
    calls: list[float] = []
    keeper = new_keeper(state, calls)
    async with trio.open_nursery() as nursery:
        keeper._nursery = nursery
        with keeper.claim(REPO_A, "a cvmfsctl remount"):
            busy = re.escape(f"a cvmfsctl remount is remounting {REPO_A} right now")
            with pytest.raises(RemountBusy, match=busy), keeper.claim(REPO_A, "another one"):
                pass
            with structlog.testing.capture_logs() as logs:
                await keeper._on_change(REPO_A, "ok", ABSENT)
            assert (logs, state.repos[REPO_A].state, keeper._repairing) == ([], "ok", set())
            nursery.start_soon(keeper._remount_with_backoff, REPO_A)
            await trio.sleep(60)
            assert calls == []  # waiting for the user's remount
        await trio.sleep(1)
        assert calls == []  # the user's remount left it ok
        with keeper.claim(REPO_A, "a cvmfsctl remount"):  # free again
            pass
        nursery.cancel_scope.cancel()



async def test_a_user_remount_that_the_rebind_repairs_says_so(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``cvmfsctl remount`` of a repository whose /cvmfs/<repo> had lost its bind: the rebind
    repairs it and the same cvmfs2 serves on; the answer says so, and is no "busy" failure."""
    from cvmfsd import daemon, talk
    from cvmfsd.config import Config
    from cvmfsd.launch import Dist
    from cvmfsd.prepare import prepare
    from tests.test_mode import facts

    config = Config(payload=("true",), repos=(REPO_A,), dist=tmp_path, mode="3",
                    environ={"TMPDIR": str(tmp_path)})
    supervisor = daemon.Supervisor(prepare(config, facts(), start=False))

    async def talked(socket: object, command: str, **_: object) -> str:
        return {"pid": "42\n", "revision": "7\n"}[command]  # the same cvmfs2 throughout

    async def rebound(repo: str) -> None:
        supervisor._rebound.add(repo)  # what the mode-3 hook records after a rebind

    monkeypatch.setattr(talk, "talk", talked)
    supervisor.prepared.dist = Dist(tmp_path)  # where the talk sockets would be
    answer = await supervisor._remount_claimed(REPO_A, rebound)
    assert answer == (f"bound again at /cvmfs/{REPO_A}, where its mount had gone; cvmfs2 pid "
                      "42 serves it, revision 7 (not remounted)")
    assert (supervisor.state.repos[REPO_A].state,
            supervisor.state.repos[REPO_A].revision) == ("ok", "7")
