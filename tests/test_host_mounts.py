"""Modes 1 and 2 against what the real tools do: deadlines, and nodes with only fusermount3.

cvmfsd runs both modes alike (mountrepo on the host; mode 2 only adds the user
namespace for the payload), and this kernel only allows mode 1 to be forced,
so mode 1 stands for both.

Real ``umountrepo`` runs ``fusermount -u`` (``-uz`` lazily) and never
``fusermount3`` (cvmfs/cvmfsexec 58eddfb, umountrepo:73 and :80); EL9
distributions are built with fuse3 (makedist:423-425), whose packages need
not carry the ``fusermount`` name.  So cvmfsd must unmount what umountrepo
leaves.  A cvmfs2 that finds its workspace locked waits for the lock
(cvmfs/cvmfs ae7450ec9, cvmfs.cc:2233-2241), so every mount needs a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cvmfsd import glidein, session
from cvmfsd.launch import Dist
from cvmfsd.sim import stratum
from tests.conftest import REPO_A, REPO_B, cvmfs2_pids, mounts_under, reap, wait_for

pytestmark = pytest.mark.fuse

CVMFSD = [sys.executable, "-m", "cvmfsd"]
ROOT = os.geteuid() == 0  # as (fake) root umountrepo uses umount(8), not fusermount


@pytest.fixture(name="fusermount3_only")
def _fusermount3_only(short_tmp: Path) -> Iterator[str]:
    """A PATH with every program of this machine but ``fusermount``: an EL9-like node."""
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for entry in Path(directory).iterdir():
            target = bin_dir / entry.name
            if entry.name != "fusermount" and not target.exists() and not target.is_symlink():
                target.symlink_to(entry)
    assert shutil.which("fusermount", path=str(bin_dir)) is None
    assert shutil.which("fusermount3", path=str(bin_dir)) is not None
    yield str(bin_dir)


def run(dist: Path, *args: str, path: str | None = None, gconfig: Path | None = None,
        ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=path or os.environ["PATH"])
    extra = ["--glidein-config", str(gconfig)] if gconfig else []
    return subprocess.run([*CVMFSD, "run", "--dist", str(dist), *extra, *args],
                          capture_output=True, text=True, check=False, timeout=90, env=env,
                          stdin=subprocess.DEVNULL)


def policy(short_tmp: Path, value: str) -> Path:
    path = short_tmp / "glidein_config"
    path.write_text(f"GLIDEIN_CVMFS {value}\n")
    return path


@pytest.mark.parametrize("tools", ["fusermount", "fusermount3 only"])
def test_nothing_stays_mounted_after_a_normal_exit(
        dist: Path, fusermount3_only: str, tools: str) -> None:
    """Whatever fusermount the node has, a clean exit leaves no mount and no cvmfs2."""
    path = fusermount3_only if tools == "fusermount3 only" else None
    result = run(dist, "--mode", "1", "--repos", f"{REPO_A},{REPO_B}", "--", "sh", "-c",
                 f'cat "$CVMFS_MOUNT_DIR/{REPO_A}/hello.txt"', path=path)
    assert (result.returncode, result.stdout) == (0, "hello from repo.a\n"), result.stderr
    assert not mounts_under(dist)
    wait_for(lambda: not cvmfs2_pids(dist), timeout=3)
    # Only an unprivileged umountrepo needs fusermount; then, and only then, it fails.
    expect_takeover = tools == "fusermount3 only" and not ROOT
    assert ("umountrepo failed; cvmfsd unmounts it" in result.stderr) == expect_takeover, \
        result.stderr
    assert "left behind" not in result.stderr


def test_sigkill_of_cvmfsd_with_fusermount3_only(
        dist: Path, short_tmp: Path, fusermount3_only: str) -> None:
    """The janitor unmounts with whatever fusermount there is, after a hard kill."""
    env = dict(os.environ, PATH=fusermount3_only)
    process = subprocess.Popen(
        [*CVMFSD, "run", "--dist", str(dist), "--mode", "1", "--repos", REPO_A, "--",
         "sh", "-c", "echo ready; exec sleep 6023"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        text=True, env=env)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        assert mounts_under(dist), "mounted on the host while the payload runs"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        wait_for(lambda: not mounts_under(dist) and not cvmfs2_pids(dist), timeout=5)
    finally:
        reap(process)


def test_mount_timeout_is_a_failed_mount_under_the_policy(
        dist: Path, short_tmp: Path, stratum_dir: Path) -> None:
    """A mount slower than --mount-timeout: no traceback, the policy decides, nothing left."""
    stratum.set_faults(stratum_dir, REPO_A, mount_delay=6)
    preferred = run(dist, "--mode", "1", "--mount-timeout", "2", "--repos", REPO_A, "--",
                    "sh", "-c", 'echo "payload ran, CVMFS_MOUNT_DIR=$CVMFS_MOUNT_DIR"',
                    gconfig=policy(short_tmp, "preferred"))
    assert "Traceback" not in preferred.stderr
    assert (preferred.returncode, preferred.stdout) == (
        0, "payload ran, CVMFS_MOUNT_DIR=\n"), preferred.stderr
    assert f"mounting {REPO_A}: not mounted within 2 s" in preferred.stderr
    assert not mounts_under(dist)
    wait_for(lambda: not cvmfs2_pids(dist), timeout=3)

    gconfig = policy(short_tmp, "required")
    required = run(dist, "--mode", "1", "--mount-timeout", "2", "--repos", REPO_A, "--",
                   "echo", "payload ran", gconfig=gconfig)
    assert "Traceback" not in required.stderr
    assert (required.returncode, required.stdout) == (69, ""), required.stderr
    assert glidein.read_glidein_config(gconfig).values["GWMS_IS_CVMFS"] == "no"
    assert not mounts_under(dist)
    wait_for(lambda: not cvmfs2_pids(dist), timeout=3)


async def test_a_stopped_mount_clears_the_repository_in_flight(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A stop while mountrepo runs: the mounted repositories are unmounted, and the one in
    flight is cleared too (its loader may mount after mountrepo's group was killed)."""
    unmounted: list[str] = []
    cleared: list[str] = []

    async def mountrepo(_dist: Dist, repo: str) -> subprocess.CompletedProcess[bytes]:
        if repo == REPO_B:
            await trio.sleep_forever()
        return subprocess.CompletedProcess([], 0, b"", b"")

    async def verified(_dist: Dist, _repo: str, *, probe_timeout: float) -> None:
        return None

    async def unmount(_dist: Dist, mounted: list[str]) -> None:
        unmounted.extend(mounted)

    def clear(_dist: Dist, repo: str) -> list[str]:
        cleared.append(repo)
        return []

    monkeypatch.setattr(session, "_run_mountrepo", mountrepo)
    monkeypatch.setattr(session, "verify_host_mount", verified)
    monkeypatch.setattr(session, "unmount_on_host", unmount)
    monkeypatch.setattr(session, "clear_host_repo", clear)
    with trio.move_on_after(0.5) as stopped:
        await session.mount_on_host(Dist(tmp_path), [REPO_A, REPO_B], repo_timeout=60,
                                    on_progress=lambda *_: None, with_config_repo=False)
    assert stopped.cancelled_caught
    assert (unmounted, cleared) == ([REPO_A], [REPO_B])


async def test_a_stop_after_the_last_mounts_last_checkpoint_still_unmounts(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A stop that lands as mount_on_host returns (its cancel finds no checkpoint left):
    the mounts are taken down and no "ready" follows, as for a stop a moment earlier."""
    from cvmfsd.config import Config
    from cvmfsd.daemon import Supervisor
    from cvmfsd.prepare import prepare
    from tests.test_mode import facts

    config = Config(payload=("true",), repos=(REPO_A,), dist=tmp_path, mode="1",
                    environ={"TMPDIR": str(tmp_path)})
    supervisor = Supervisor(prepare(config, facts(), start=False))
    unmounted: list[str] = []

    async def mounted_then_stopped(_dist: Dist, repos: list[str], **_: object) -> list[str]:
        await supervisor._stop_run(session.Stop("received SIGTERM"))  # no checkpoint after
        return list(repos)

    async def unmount(_dist: Dist, mounted: list[str]) -> None:
        unmounted.extend(mounted)

    monkeypatch.setattr(session, "mount_on_host", mounted_then_stopped)
    monkeypatch.setattr(session, "unmount_on_host", unmount)
    assert await supervisor._mount_on_host(Dist(tmp_path)) is None
    assert unmounted == [REPO_A]
    assert supervisor.state.phase == "stopping"
