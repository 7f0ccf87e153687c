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
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfsd.launch import Dist
from cvmfsd.leftovers import (
    LeftoverMount,
    MountState,
    OrphanProcess,
    clean_leftovers,
    find_leftovers,
)
from cvmfsd.sim import makedist, stratum
from tests.conftest import REPO_A, REPO_B, cvmfs2_pids, mounts_under, wait_for


def _proc(root: Path, pid: int, argv: list[str], *, uid: int, state: str = "S",
          start: int = 1000) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
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
    (pid,) = [pid for pid in cvmfs2_pids(dist)
              if Path(f"/proc/{pid}/cmdline").read_bytes().endswith(f"/{repo}\0".encode())]
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
    assert [(p.pid, p.repo) for p in found.processes] == [(orphan, REPO_B)]

    report = clean_leftovers(Dist(dist), found)
    assert report.clean, report
    assert report.signalled[0] == (orphan, "SIGTERM")
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
