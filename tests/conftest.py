"""Shared fixtures: a simulated stratum and distribution, and process/mount probes.

Tests marked ``fuse`` mount for real (user namespaces and /dev/fuse).  They run
as whatever user pytest runs as; CI runs the whole suite as an unprivileged
user, so nothing here may depend on being root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfsd import mountinfo as mountinfo_mod
from cvmfsd.sim import makedist, stratum

REPO_A = "repo.a"
REPO_B = "repo.b"


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture(name="short_tmp")
def _short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path.

    Unix sockets the tests create (control sockets) must have paths under 108
    bytes; pytest's tmp_path is too deep for that.  Distributions go below
    :func:`dist_parent`, which may be deep on purpose.
    """
    path = Path(tempfile.mkdtemp(prefix="cvs", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="stratum_dir")
def _stratum_dir(short_tmp: Path) -> Path:
    """A stratum with repo.a (a file and a directory) and repo.b (a data file)."""
    root = short_tmp / "st"
    src = short_tmp / "src"
    stratum.publish(root, REPO_A, _write_tree(src / "a", {
        "hello.txt": "hello from repo.a\n",
        "sub/deeper/file.txt": "deep\n",
    }))
    stratum.publish(root, REPO_B, _write_tree(src / "b", {
        "data.csv": "x,y\n1,2\n",
    }))
    return root


#: ``CVMFSD_TEST_DEEP=1`` places every distribution as deep as a glidein would
#: (``$_CONDOR_SCRATCH_DIR/glide_XXXXXX/...``, glidein_startup.sh:1698,1717), so
#: that its talk sockets' paths are over 140 bytes: longer than ``sun_path``.
DEEP = os.environ.get("CVMFSD_TEST_DEEP") == "1"


def dist_parent(base: Path) -> Path:
    """Where a test's distribution goes: ``base``, or a glidein-deep directory below it."""
    if not DEEP:
        return base
    deep = base / "var/lib/condor/execute/dir_4242" / "glide_Xq3Tz9" / "main" / (
        "cvmfsexec-osg-rhel9-x86_64-" + "p" * 24)
    deep.mkdir(parents=True)
    assert len(str(deep / "d/dist/var/lib/cvmfs/shared/cvmfs_io.repo.a")) > 140
    return deep


@pytest.fixture(name="dist")
def _dist(short_tmp: Path, stratum_dir: Path) -> Iterator[Path]:
    """A simulated cvmfsexec distribution on ``stratum_dir`` (see :data:`DEEP`).

    At teardown, every cvmfs2 of this distribution still alive is killed (by
    pid) and every mount left under it is reported as a test failure.
    """
    target = makedist.make_dist(dist_parent(short_tmp) / "d", stratum=stratum_dir)
    yield target
    leftovers = lasting_cvmfs2_pids(target)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    mounts = mounts_under(target)
    for mnt in mounts:
        os.system(f"fusermount3 -u -z '{mnt}' 2>/dev/null")  # noqa: S605 - test clean-up
    assert not leftovers, f"cvmfs2 processes left behind: {leftovers}"
    assert not mounts, f"mounts left behind: {mounts}"


def mounts_under(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Mount points at or below ``path`` in a mountinfo file."""
    return [m.mountpoint for m in mountinfo_mod.mounts_under(mountinfo.read_text(), str(path))]


#: cvmfs2 ends moments after its unmount, and the shared cache manager once its last
#: client has gone (cvmfsd's own final sweep waits for that too): a leftover is one
#: still there after this long.
CVMFS2_END_GRACE = 2.0


def lasting_cvmfs2_pids(dist: Path, grace: float = CVMFS2_END_GRACE) -> list[int]:
    """The cvmfs2 processes of ``dist`` still alive ``grace`` s from now (or none sooner)."""
    deadline = time.monotonic() + grace
    while (pids := cvmfs2_pids(dist)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def assert_nothing_left_under(dist: Path) -> None:
    """No cvmfs2 of ``dist`` runs and nothing is mounted under it; what runs is killed first."""
    leftovers = lasting_cvmfs2_pids(dist)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"cvmfs2 processes left behind: {leftovers}"
    assert not mounts_under(dist), "mounts left behind"


def fds_of(pid: int) -> list[str]:
    """What process ``pid``'s descriptors name (those it closes meanwhile left out)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found.append(str(fd.readlink()))
        except OSError:
            continue
    return found


def reap(process: subprocess.Popen[str]) -> None:
    """Kill a test's process if it still runs (by pid), wait for it, close its pipes."""
    if process.poll() is None:
        process.kill()
        process.wait()
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def cvmfs2_pids(dist: Path) -> list[int]:
    """Pids of simulated cvmfs2 processes serving mounts of ``dist``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if "cvmfsd.sim.cvmfs2" in text and any(a.startswith(str(dist)) for a in text):
            pids.append(int(entry.name))
    return pids


def processes_with_argv(argv: list[str]) -> list[int]:
    """Pids of our processes whose command line is exactly ``argv``."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == wanted:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``predicate()`` until it is true; fail the test after ``timeout`` s."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)
