"""Tests for cvmfsd.watch and cvmfsd.probe_child: probe mounts safely, notice changes fast."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from cvmfsd import probe_child, probing, watch
from cvmfsd.probing import ProbeResult, StuckProbes
from cvmfsd.talk import talk
from cvmfsd.watch import MountWatcher
from tests.conftest import REPO_A, REPO_B, cvmfs2_pids, mounts_under

# Real mounts, never skipped: CI makes /dev/fuse usable (.ci/setup).
needs_fuse = pytest.mark.fuse

OK_ANSWER = '{"state": "ok", "revision": "7", "error": null}'


async def eventually(predicate: Callable[[], bool], within: float) -> None:
    """Wait until ``predicate()`` holds; fail after ``within`` seconds."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - polls a statistics snapshot, which has no event
            await trio.sleep(0.01)

# -- pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(("path", "expected"), [
    ("/proc/123/root/cvmfs/repo.a", "/cvmfs/repo.a"),
    ("/proc/self/root/cvmfs/repo.a", "/cvmfs/repo.a"),
    ("/scratch/d/dist/cvmfs/repo.a", "/scratch/d/dist/cvmfs/repo.a"),
    ("/proc/123/cwd/x", "/proc/123/cwd/x"),
])
def test_mountpoint_of(path: str, expected: str) -> None:
    """A probe path through /proc/<pid>/root names the mount point inside that namespace."""
    assert watch.mountpoint_of(Path(path)) == expected


def test_mountpoint_of_resolves_the_directory_not_the_mount(tmp_path: Path) -> None:
    """A distribution reached through a symbolic link: the mount table names the real
    directory, so the mount point does too (else the mount is never found: absent, and
    remounted over and over); the last part, the mount itself, is left alone."""
    real = tmp_path / "real" / "cvmfs"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (real / "repo.a").symlink_to("/nonexistent")  # would be followed if it were resolved
    assert watch.mountpoint_of(tmp_path / "link" / "cvmfs" / "repo.a") == str(real / "repo.a")


def test_fuse_mount_ids() -> None:
    """Only FUSE mounts count, at exactly the repository's mount point."""
    text = (
        "40 1 0:5 / /cvmfs rw - tmpfs tmpfs rw\n"
        "41 40 0:39 / /cvmfs/repo.a ro - fuse cvmfs2 ro\n"
        "42 40 0:40 / /other/cvmfs/repo.b ro - fuse cvmfs2 ro\n"
        "43 41 0:41 / /cvmfs/repo.a ro - fuse.cvmfs2 cvmfs2 ro\n"
    )
    ids = watch.fuse_mount_ids(text, {"repo.a": "/cvmfs/repo.a", "repo.b": "/cvmfs/repo.b"})
    assert ids == {"repo.a": frozenset({41, 43}), "repo.b": frozenset()}


def test_parse_nspid() -> None:
    """The NSpid line lists the pid from the outermost namespace inwards."""
    assert watch.parse_nspid("Name:\tcvmfs2\nNSpid:\t4242\t17\n") == (4242, 17)
    assert watch.parse_nspid("Name:\tx\n") == ()


def test_host_pid_in_our_namespace() -> None:
    """In our own pid namespace the talk socket's pid is already ours."""
    assert watch.host_pid(os.getpid(), None) == os.getpid()
    assert watch.host_pid(os.getpid(), Path("/proc/self")) == os.getpid()


def test_probe_result_validates_state() -> None:
    """Only the five documented states exist."""
    with pytest.raises(ValueError, match="expected one of"):
        ProbeResult(repo="r", state="mounting")


def test_probe_child_on_plain_paths(tmp_path: Path) -> None:
    """A missing path and a directory without CVMFS xattrs are both absent."""
    assert probe_child.probe(str(tmp_path / "nope"), "r")["state"] == "absent"
    found = probe_child.probe(str(tmp_path), "r")
    assert found["state"] == "absent"
    assert "not a CVMFS mount" in str(found["error"])


# -- probe_repo with fake children ------------------------------------------------------


def fake_child(code: str) -> tuple[str, ...]:
    """A probe command running ``code``; the path and repository arrive as sys.argv[1:]."""
    return (sys.executable, "-c", code)


def fake_worker(body: str) -> tuple[str, ...]:
    """A probe worker: the real ``--serve`` loop, with ``probe`` replaced by the function
    ``body`` defines (``def probe(path, repo): ...`` returning the answer dict)."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(Path(probe_child.__file__).parent)!r})\n"
        "import probe_child\n"
        f"{body}\n"
        "probe_child.probe = probe\n"
        "probe_child.main(['--serve'])\n"
    )
    return (sys.executable, "-I", "-S", "-c", code)


def test_probe_worker_protocol(tmp_path: Path) -> None:
    """The real worker answers pings, probes and bad lines by id, and exits 0 at EOF."""
    with subprocess.Popen([*probing.PROBE_WORKER], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.write('{"id": 1, "ping": true}\n')
            proc.stdin.write(json.dumps({"id": 2, "path": str(tmp_path / "nope"), "repo": "r"})
                             + "\n")
            proc.stdin.write("not json\n")
            proc.stdin.flush()
            answers = [json.loads(proc.stdout.readline()) for _ in range(3)]
            by_id = {a["id"]: a for a in answers}
            assert by_id[1] == {"id": 1, "pong": True}
            assert by_id[2]["state"] == "absent"
            assert "ENOENT" in by_id[2]["error"]
            assert "bad request" in by_id[None]["error"]
            proc.stdin.close()
            assert proc.wait(timeout=10) == 0
        finally:
            proc.kill()


async def test_probe_repo_real_child_absent(tmp_path: Path) -> None:
    """The real child, started without site-packages, reports an unmounted path as absent."""
    result = await probing.probe_repo(tmp_path / "missing", "r", deadline=10)
    assert result.state == "absent"
    assert "ENOENT" in str(result.error)


async def test_probe_repo_parses_answer(tmp_path: Path) -> None:
    """An answer line becomes a result; garbage becomes an error naming the exit status."""
    ok = await probing.probe_repo(tmp_path, "r", deadline=10,
                                child=fake_child(f"print({OK_ANSWER!r})"))
    assert (ok.state, ok.revision, ok.error) == ("ok", "7", None)
    bad = await probing.probe_repo(tmp_path, "r", deadline=10,
                                 child=fake_child("print('boom'); raise SystemExit(3)"))
    assert bad.state == "error"
    assert "status 3" in str(bad.error)


async def test_probe_repo_hung_with_fake_child(autojump_clock: trio.testing.MockClock,
                                               tmp_path: Path) -> None:
    """A child that never answers is hung after exactly the deadline, then killed and reaped."""
    stuck = StuckProbes()
    start = trio.current_time()
    result = await probing.probe_repo(tmp_path, "r", deadline=5, stuck=stuck,
                                    child=fake_child("import time; time.sleep(600)"))
    assert trio.current_time() - start == 5
    assert result.state == "hung"
    assert result.duration == 5
    assert stuck.total == 1
    autojump_clock.autojump_threshold = math.inf  # from here on, wait for a real exit
    autojump_clock.rate = 1.0
    with trio.fail_after(30):
        await stuck.wait_clear("r")
    assert stuck.count == 0


async def test_at_most_one_probe_pending_per_repo(tmp_path: Path) -> None:
    """Kicks during a probe coalesce into one follow-up probe; two probes never overlap."""
    lock = tmp_path / "lock"
    code = (
        "import json, os, time\n"
        "def probe(path, repo):\n"
        f"    fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)\n"
        "    time.sleep(0.3)\n"
        f"    os.unlink({str(lock)!r})\n"
        f"    return json.loads({OK_ANSWER!r})\n"
    )
    changes: list[tuple[str, str | None, ProbeResult]] = []

    async def on_change(repo: str, old: str | None, new: ProbeResult) -> None:
        changes.append((repo, old, new))

    watcher = MountWatcher(["r"], mountinfo=lambda: None, probe_path=lambda _: tmp_path,
                           on_change=on_change, interval=3600, deadline=10,
                           child=fake_worker(code))
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        await eventually(lambda: bool(changes), 10)
        for _ in range(3):  # each round: a probe runs, and ten kicks arrive meanwhile
            watcher.kick("r")
            await trio.sleep(0.05)
            for _ in range(10):
                watcher.kick("r")
                await trio.sleep(0.01)
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert [(c[1], c[2].state) for c in changes] == [(None, "ok")]  # no overlap error
    stats = watcher.statistics()
    assert 4 <= stats.probes <= 7
    assert stats.workers == 1  # every probe went through one worker process


async def _open_watcher(nursery: trio.Nursery, repos: list[str], paths: dict[str, Path],
                        child: tuple[str, ...], deadline: float,
                        ) -> tuple[MountWatcher, list[tuple[str, str | None, ProbeResult]]]:
    changes: list[tuple[str, str | None, ProbeResult]] = []

    async def on_change(repo: str, old: str | None, new: ProbeResult) -> None:
        changes.append((repo, old, new))

    watcher = MountWatcher(repos, mountinfo=lambda: None, probe_path=paths.get,
                           on_change=on_change, interval=3600, deadline=deadline, child=child)
    await nursery.start(watcher.run)
    return watcher, changes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_worker_killed_from_outside_is_restarted(tmp_path: Path) -> None:
    """A worker SIGKILLed by someone else is started again by the next probe, which
    finds the same state (no spurious error); the watcher's end kills the new one."""
    async with trio.open_nursery() as nursery:
        watcher, changes = await _open_watcher(nursery, ["r"], {"r": tmp_path / "missing"},
                                               probing.PROBE_WORKER, deadline=10)
        await eventually(lambda: len(changes) == 1, 10)
        first = watcher.probe_worker_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: watcher.probe_worker_pid() is None, 5)  # EOF seen, reaped
        probes = watcher.statistics().probes
        watcher.kick("r")
        await eventually(lambda: watcher.statistics().probes > probes
                         and watcher.results()["r"].finished > changes[0][2].finished, 10)
        second = watcher.probe_worker_pid()
        assert second not in (None, first)
        stats = watcher.statistics()
        assert (stats.workers, stats.stuck, stats.timeouts) == (2, 0, 0)
        assert [(c[1], c[2].state) for c in changes] == [(None, "absent")]
        nursery.cancel_scope.cancel()
    assert second is not None
    await eventually(lambda: not _alive(second), 5)


async def test_one_hung_repo_does_not_block_the_others(tmp_path: Path) -> None:
    """A probe stuck in one repository (a thread of the worker) leaves the other
    repositories probed by the same worker; the hung one is not probed again."""
    code = (
        "import time\n"
        "def probe(path, repo):\n"
        "    if repo == 'h':\n"
        "        time.sleep(600)\n"
        "    return {'state': 'ok', 'revision': '3', 'error': None}\n"
    )
    async with trio.open_nursery() as nursery:
        watcher, changes = await _open_watcher(nursery, ["h", "o"],
                                               {"h": tmp_path, "o": tmp_path},
                                               fake_worker(code), deadline=0.5)
        await eventually(lambda: {c[0]: c[2].state for c in changes} == {"h": "hung", "o": "ok"},
                         10)
        pid = watcher.probe_worker_pid()
        for _ in range(3):
            before = watcher.results()["o"].finished
            watcher.kick("o")
            watcher.kick("h")
            await eventually(lambda b=before: watcher.results()["o"].finished > b, 5)  # type: ignore[misc]
        stats = watcher.statistics()
        assert (stats.workers, stats.timeouts, stats.stuck) == (1, 1, 1)
        assert stats.skipped >= 1
        assert watcher.probe_worker_pid() == pid
        nursery.cancel_scope.cancel()


async def test_probe_now_waits_for_a_probe_that_began_after_it(tmp_path: Path) -> None:
    """probe_now() returns once a probe begun after the call is applied, not the one under
    way, which looked before the change its caller saw; and at once once the watcher ends."""
    code = (
        "import os, time\n"
        "def probe(path, repo):\n"
        "    revision = open(os.path.join(path, 'revision')).read()\n"
        "    open(os.path.join(path, 'started'), 'a').write('x')\n"
        "    time.sleep(0.3)\n"
        "    return {'state': 'ok', 'revision': revision, 'error': None}\n"
    )
    (tmp_path / "revision").write_text("1")
    async with trio.open_nursery() as nursery:
        watcher, changes = await _open_watcher(nursery, ["r"], {"r": tmp_path},
                                               fake_worker(code), deadline=10)
        await eventually(lambda: len(changes) == 1, 10)
        watcher.kick("r")
        await eventually(lambda: (tmp_path / "started").read_text() == "xx", 5)
        (tmp_path / "revision").write_text("2")  # after the running probe read it
        with trio.fail_after(5):
            await watcher.probe_now("r")
        assert watcher.results()["r"].revision == "2"
        assert [c[2].revision for c in changes] == ["1", "2"]
        nursery.cancel_scope.cancel()
    with trio.fail_after(1):
        await watcher.probe_now("r")  # nothing would ever probe: no wait


async def test_worker_that_answers_nothing_is_replaced(tmp_path: Path) -> None:
    """A worker that no longer answers anything (here SIGSTOPped) fails its ping after a
    missed deadline: it is killed, reaped, and a new worker probes again."""
    async with trio.open_nursery() as nursery:
        watcher, changes = await _open_watcher(nursery, ["r"], {"r": tmp_path / "missing"},
                                               probing.PROBE_WORKER, deadline=0.5)
        await eventually(lambda: len(changes) == 1, 10)
        first = watcher.probe_worker_pid()
        assert first is not None
        os.kill(first, signal.SIGSTOP)
        watcher.kick("r")
        await eventually(lambda: [c[2].state for c in changes] == ["absent", "hung", "absent"],
                         10)
        stats = watcher.statistics()
        assert (stats.workers, stats.timeouts, stats.stuck) == (2, 1, 0)
        assert watcher.probe_worker_pid() not in (None, first)
        assert not _alive(first)
        nursery.cancel_scope.cancel()


# -- real FUSE mounts -------------------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(name="mounted")
def _mounted(dist: Path) -> Iterator[Path]:
    """repo.a and repo.b mounted on the host (mode 1) from ``dist``; unmounted afterwards."""
    try:
        for repo in (REPO_A, REPO_B):
            done = _run(str(dist / "mountrepo"), repo)
            assert done.returncode == 0, done.stdout + done.stderr
        yield dist
    finally:
        for pid in cvmfs2_pids(dist):  # only ours: they serve this distribution
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _run(str(dist / "umountrepo"), "-a")
        for point in mounts_under(dist):
            _run("fusermount3", "-u", "-z", point)


class Harness:
    """A MountWatcher on a mode-1 distribution whose state changes arrive on a channel."""

    def __init__(self, dist: Path, *, deadline: float = 5.0) -> None:
        self.dist = dist
        self.send, self.changes = trio.open_memory_channel[ProbeResult](100)
        self.watcher = MountWatcher(
            [REPO_A, REPO_B],
            mountinfo=lambda: Path("/proc/self/mountinfo"),
            probe_path=lambda repo: dist / "dist" / "cvmfs" / repo,
            talk_socket=self.socket,
            on_change=self._on_change,
            interval=3600,  # the timer never fires here: only events make probes
            deadline=deadline,
        )

    def socket(self, repo: str) -> Path:
        return self.dist / "dist" / "var" / "lib" / "cvmfs" / "shared" / f"cvmfs_io.{repo}"

    async def _on_change(self, repo: str, old: str | None, new: ProbeResult) -> None:
        if repo == REPO_A:
            await self.send.send(new)

    async def next_state(self, within: float) -> ProbeResult:
        with trio.fail_after(within):
            return await self.changes.receive()

    async def watching_daemon(self) -> None:
        await eventually(lambda: self.watcher.statistics().watched_daemons == 2, 10)


@contextlib.asynccontextmanager
async def open_harness(dist: Path, *, deadline: float = 5.0) -> AsyncIterator[Harness]:
    h = Harness(dist, deadline=deadline)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.watcher.run)
        yield h
        nursery.cancel_scope.cancel()


@pytest.mark.fuse
@needs_fuse
async def test_ok_with_revision_and_daemon_watched(mounted: Path) -> None:
    """A healthy mount is ok with its revision, and its cvmfs2 is watched through a pidfd."""
    async with open_harness(mounted) as h:
        first = await h.next_state(10)
        assert (first.state, first.revision, first.error) == ("ok", "1", None)
        await h.watching_daemon()
        stats = h.watcher.statistics()
        assert stats.table_source == "epoll"
        assert stats.timeouts == stats.stuck == 0


@pytest.mark.fuse
@needs_fuse
async def test_crash_is_enotconn_within_a_second(mounted: Path) -> None:
    """'sim crash' does not change the mount table, yet ENOTCONN is reported within 1 s."""
    async with open_harness(mounted) as h:
        assert (await h.next_state(10)).state == "ok"
        await h.watching_daemon()
        start = trio.current_time()
        assert await talk(h.socket(REPO_A), "sim crash") == "OK\n"
        crashed = await h.next_state(5)
        latency = trio.current_time() - start
        assert crashed.state == "enotconn", crashed
        assert "ENOTCONN" in str(crashed.error)
        assert latency < 1.0
        assert h.watcher.statistics().daemon_deaths == 1
        assert h.watcher.results()[REPO_B].state == "ok"


@pytest.mark.fuse
@needs_fuse
async def test_hang_is_hung_then_kill_is_enotconn(mounted: Path) -> None:
    """A hung mount is hung after the deadline, with one stuck child and no pile-up; the
    watcher stays responsive; killing cvmfs2 turns it into enotconn and frees the child."""
    async with open_harness(mounted, deadline=1.0) as h:
        assert (await h.next_state(10)).state == "ok"
        await h.watching_daemon()
        assert await talk(h.socket(REPO_A), "sim hang") == "OK\n"
        start = trio.current_time()
        h.watcher.kick(REPO_A)
        hung = await h.next_state(5)
        assert hung.state == "hung"
        assert 1.0 <= trio.current_time() - start < 2.0
        stats = h.watcher.statistics()
        assert (stats.timeouts, stats.stuck) == (1, 1)
        probes = stats.probes
        with trio.fail_after(2):  # responsive: kicks are answered without new children
            for _ in range(5):
                h.watcher.kick(REPO_A)
                await trio.sleep(0.05)
            assert h.watcher.results()[REPO_A].state == "hung"
            assert await talk(h.socket(REPO_A), "revision") == "1\n"  # talk never touches FUSE
        stats = h.watcher.statistics()
        assert stats.probes == probes
        assert stats.skipped >= 1
        pid = int(await talk(h.socket(REPO_A), "pid"))  # mode 1: our pid namespace
        assert pid in cvmfs2_pids(mounted)
        start = trio.current_time()
        os.kill(pid, signal.SIGKILL)
        dead = await h.next_state(5)
        assert dead.state == "enotconn"
        assert trio.current_time() - start < 1.0
        await eventually(lambda: h.watcher.statistics().stuck == 0, 5)


@pytest.mark.fuse
@needs_fuse
async def test_unmount_is_absent_and_remount_ok(mounted: Path) -> None:
    """Unmounting and remounting are seen through the mount table, without the timer."""
    async with open_harness(mounted) as h:
        assert (await h.next_state(10)).state == "ok"
        start = trio.current_time()
        done = await trio.run_process([str(mounted / "umountrepo"), REPO_A],
                                      capture_stdout=True, check=False)
        assert done.returncode == 0
        gone = await h.next_state(2)
        assert gone.state == "absent"
        assert "no FUSE mount" in str(gone.error)
        assert trio.current_time() - start < 1.0
        assert h.watcher.statistics().table_events >= 1
        done = await trio.run_process([str(mounted / "mountrepo"), REPO_A],
                                      capture_stdout=True, check=False)
        assert done.returncode == 0
        back = await h.next_state(5)
        assert (back.state, back.revision) == ("ok", "1")


@pytest.mark.fuse
async def test_host_pid_across_a_pid_namespace() -> None:
    """A pid answered inside another pid namespace (mode 3) maps to ours through NSpid."""
    argv = ["unshare", "-rpf", "sh", "-c", "sleep 60 & echo $! $$; wait"]
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    host_sh = None
    try:
        with trio.fail_after(10):
            line = await proc.stdout.receive_some()
        if not line:
            pytest.fail("`unshare -rpf` printed nothing: unprivileged user and pid "
                        "namespaces must work here (cvmfsexec mode 3 needs them)")
        ns_sleep, ns_sh = (int(x) for x in line.split())
        assert ns_sh == 1
        # unshare -f stays in our namespace; its child, sh, is pid 1 of the new one.
        children = f"/proc/{proc.pid}/task/{proc.pid}/children"
        (host_sh,) = (int(x) for x in (await trio.Path(children).read_text()).split())
        assert host_sh is not None
        host_sleep = await trio.to_thread.run_sync(watch.host_pid, ns_sleep,
                                                   Path(f"/proc/{host_sh}"))
        assert host_sleep is not None
        assert host_sleep not in (ns_sleep, host_sh)
        status = await trio.Path(f"/proc/{host_sleep}/status").read_text()
        assert watch.parse_nspid(status) == (host_sleep, ns_sleep)
    finally:
        if host_sh is not None:  # pid 1 of the namespace: the kernel then kills sleep
            with contextlib.suppress(ProcessLookupError):
                os.kill(host_sh, signal.SIGKILL)
        proc.kill()
        await proc.wait()
        await proc.stdout.aclose()


@pytest.mark.fuse
@needs_fuse
async def test_hung_repo_beside_a_healthy_one_then_released(mounted: Path) -> None:
    """With repo.a hung, repo.b keeps being probed ok by the same worker; killing repo.a's
    cvmfs2 releases the stuck thread (its late answer dropped) and repo.a is enotconn."""
    async with open_harness(mounted, deadline=1.0) as h:
        assert (await h.next_state(10)).state == "ok"
        await h.watching_daemon()
        worker = h.watcher.probe_worker_pid()
        assert worker is not None
        assert await talk(h.socket(REPO_A), "sim hang") == "OK\n"
        h.watcher.kick(REPO_A)
        assert (await h.next_state(5)).state == "hung"
        for _ in range(3):
            before = h.watcher.results()[REPO_B].finished
            h.watcher.kick(REPO_B)
            await eventually(lambda b=before: h.watcher.results()[REPO_B].finished > b,  # type: ignore[misc]
                             2)
            assert h.watcher.results()[REPO_B].state == "ok"
        stats = h.watcher.statistics()
        assert (stats.workers, stats.stuck, stats.released) == (1, 1, 0)
        pid = int(await talk(h.socket(REPO_A), "pid"))
        os.kill(pid, signal.SIGKILL)
        assert (await h.next_state(5)).state == "enotconn"
        await eventually(lambda: h.watcher.statistics().released == 1, 5)
        stats = h.watcher.statistics()
        assert (stats.workers, stats.stuck, stats.timeouts) == (1, 0, 1)
        assert h.watcher.probe_worker_pid() == worker
        assert h.watcher.results()[REPO_B].state == "ok"
