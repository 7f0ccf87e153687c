"""``--dist`` as GlideinWMS's CVMFSEXEC_DIR: pick this node's self-extracting build, unpack it.

The names are create_cvmfsexec_distros.sh:118-124's (``cvmfsexec-<src>-<os><ver>-<arch>``,
made by ``makedist -o``); the platform is makedist's (l.70-162): os-release
``ID``/``ID_LIKE``, the ``VERSION_ID`` major, ``arch``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfsd import packed, probe
from cvmfsd.config import Config
from cvmfsd.errors import HostUnsupported
from cvmfsd.launch import Dist, LaunchError
from cvmfsd.leftovers import LOCK_NAME
from cvmfsd.mode import select_dist
from cvmfsd.prepare import prepare
from cvmfsd.sim import makedist
from tests.conftest import REPO_A, assert_nothing_left_under, cvmfs2_pids, dist_parent, mounts_under
from tests.test_mode import facts

OS_RELEASE = {
    "rocky9": 'NAME="Rocky Linux"\nID="rocky"\nID_LIKE="rhel centos fedora"\nVERSION_ID="9.3"\n',
    "alma8": 'NAME="AlmaLinux"\nID="almalinux"\nID_LIKE="rhel centos fedora"\nVERSION_ID="8.9"\n',
    "centos7": 'NAME="CentOS Linux"\nID="centos"\nID_LIKE="rhel fedora"\nVERSION_ID="7"\n',
    "debian12": 'NAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n',
    "ubuntu2204": 'NAME="Ubuntu"\nVERSION_ID="22.04"\nID=ubuntu\nID_LIKE=debian\n',
    "sles15": 'NAME="SLES"\nVERSION_ID="15.5"\nID="sles"\nID_LIKE="suse"\n',
    "el10": 'NAME="Red Hat Enterprise Linux"\nID="rhel"\nID_LIKE="centos fedora"\n'
            'VERSION_ID="10.0"\n',
}

#: A factory's CVMFSEXEC_DIR: its default platforms (create_cvmfsexec_distros.sh:14) for
#: osg and default (osg has no EL7: makedist:238-242), two more builds, and other files.
LISTING = [
    *(f"cvmfsexec-{src}-{mt}" for src in ("osg", "default")
      for mt in ("rhel9-x86_64", "rhel8-x86_64", "rhel7-x86_64", "suse15-x86_64",
                 "rhel8-aarch64", "rhel8-ppc64le") if (src, mt) != ("osg", "rhel7-x86_64")),
    "cvmfsexec-default-rhel10-x86_64", "cvmfsexec-default-rhel9-aarch64",
    ".cvmfsexec", "cvmfsexec_osg_rhel9_x86_64.tar.gz", "README",
]


def node(tmp_path: Path, os_name: str, arch: str) -> probe.HostFacts:
    """What probe_host reads on a node with this os-release and architecture."""
    etc, proc = tmp_path / os_name / "etc", tmp_path / os_name / "proc"
    etc.mkdir(parents=True)
    (etc / "os-release").write_text(OS_RELEASE[os_name])
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "sys/kernel/arch").write_text(arch + "\n")
    return probe.probe_host(proc_root=proc, sys_root=tmp_path, etc_root=etc,
                            dev_root=tmp_path, cvmfs_root=tmp_path / "cvmfs", run_checks=False)


PICKS = [
    # (os-release, arch, CVMFS_SRC, chosen file)
    ("rocky9", "x86_64", "osg", "cvmfsexec-osg-rhel9-x86_64"),
    ("rocky9", "x86_64", "OSG", "cvmfsexec-osg-rhel9-x86_64"),  # lowercased, as GWMS does
    ("alma8", "aarch64", "osg", "cvmfsexec-osg-rhel8-aarch64"),
    ("alma8", "x86_64", "default", "cvmfsexec-default-rhel8-x86_64"),
    ("centos7", "x86_64", "default", "cvmfsexec-default-rhel7-x86_64"),
    ("centos7", "x86_64", None, "cvmfsexec-default-rhel7-x86_64"),  # the only EL7 build
    ("debian12", "x86_64", "osg", "cvmfsexec-osg-rhel9-x86_64"),
    ("ubuntu2204", "aarch64", "default", "cvmfsexec-default-rhel9-aarch64"),
    ("ubuntu2204", "aarch64", None, "cvmfsexec-default-rhel9-aarch64"),
    ("sles15", "x86_64", "default", "cvmfsexec-default-suse15-x86_64"),
    ("el10", "x86_64", "default", "cvmfsexec-default-rhel10-x86_64"),
]


@pytest.mark.parametrize(("os_name", "arch", "source", "chosen"), PICKS)
def test_pick(tmp_path: Path, os_name: str, arch: str, source: str | None, chosen: str) -> None:
    """The node's os-release, architecture and CVMFS_SRC choose one file of the listing."""
    choice = packed.pick(LISTING, node(tmp_path, os_name, arch), source, where="CVMFSEXEC_DIR")
    assert chosen == choice.name
    assert choice.machine_type in chosen
    assert choice.why


NO_PICKS = [
    # (os-release, arch, CVMFS_SRC, what the error says besides the listing)
    ("centos7", "x86_64", "osg", "OSG needs EL 8"),
    ("el10", "aarch64", "default", "no rhel10-aarch64 build"),
    ("ubuntu2204", "aarch64", "osg", "expected cvmfsexec-osg-rhel9-aarch64 (ubuntu 22 uses"),
    ("sles15", "aarch64", None, "expected cvmfsexec-<src>-suse15-aarch64"),
    ("rocky9", "x86_64", None, "several cvmfsexec builds"),
    ("rocky9", "x86_64", "cern", "CVMFS_SRC 'cern' is not a cvmfsexec source"),
]


@pytest.mark.parametrize(("os_name", "arch", "source", "says"), NO_PICKS)
def test_no_pick_is_a_launch_error_that_lists_what_was_found(
        tmp_path: Path, os_name: str, arch: str, source: str | None, says: str) -> None:
    """Nothing (or more than one) fits: a LaunchError naming the place, the wish and the files."""
    with pytest.raises(LaunchError) as info:
        packed.pick(LISTING, node(tmp_path, os_name, arch), source, where="/g/cvmfsexec")
    message = str(info.value)
    assert says in message
    assert "/g/cvmfsexec" in message
    if "several" not in message:
        assert "cvmfsexec-osg-rhel9-x86_64, " in message  # what was found
    assert ".tar.gz" not in message and "README" not in message


def test_empty_directory_says_so() -> None:
    """A directory without builds says that none were found."""
    with pytest.raises(LaunchError, match="found no cvmfsexec-<src>-<os><ver>-<arch> files"):
        packed.pick(["README"], facts(), "osg", where="here")


# --- unpacking (no FUSE) ------------------------------------------------------------------


def make_packed_dir(parent: Path, stratum_dir: Path, builds: dict[str, str]) -> Path:
    """A CVMFSEXEC_DIR with one self-extracting simulated build per name (-> config repo)."""
    directory = parent / "cvmfsexec"
    directory.mkdir()
    for name, config_repo in builds.items():
        machtype = name.split("-", 2)[2]
        made = makedist.make_dist(parent / f"made-{name}", stratum=stratum_dir,
                                  config_repo=config_repo, machtype=machtype)
        makedist.pack_dist(made, directory / name)
        makedist.remove_dist(made)
    return directory


DECOY_CONFIG = "config-decoy.cvmfsd.test"


@pytest.fixture(name="cvmfsexec_dir")
def _cvmfsexec_dir(short_tmp: Path, stratum_dir: Path) -> Iterator[Path]:
    """rhel9-x86_64 builds for osg (the real one) and default (a decoy), and an aarch64 decoy.

    At teardown, cvmfs2 processes of the unpacked distribution are killed and
    mounts left under it fail the test.
    """
    base = short_tmp / "glide"  # beside the ``dist`` fixture's, which may be as deep
    base.mkdir()
    directory = make_packed_dir(dist_parent(base), stratum_dir, {
        "cvmfsexec-osg-rhel9-x86_64": makedist.DEFAULT_CONFIG_REPO,
        "cvmfsexec-default-rhel9-x86_64": DECOY_CONFIG,
        "cvmfsexec-osg-rhel9-aarch64": DECOY_CONFIG,
    })
    yield directory
    assert_nothing_left_under(directory / packed.UNPACKED)


def test_is_packed_dir(cvmfsexec_dir: Path, dist: Path, tmp_path: Path) -> None:
    """A CVMFSEXEC_DIR is told from a plain distribution and from an empty directory."""
    assert packed.is_packed_dir(cvmfsexec_dir)
    assert not packed.is_packed_dir(dist)
    assert not packed.is_packed_dir(tmp_path)
    assert not packed.is_packed_dir(tmp_path / "missing")


def test_unpack_then_reuse(cvmfsexec_dir: Path) -> None:
    """The chosen file unpacks into .cvmfsexec beside it; a second run reuses that."""
    first = packed.unpack(cvmfsexec_dir, facts(), "osg")
    assert (first.file.name, first.reused) == ("cvmfsexec-osg-rhel9-x86_64", False)
    assert first.dist == Dist(cvmfsexec_dir / ".cvmfsexec")
    assert first.dist.config_repo() == makedist.DEFAULT_CONFIG_REPO
    marker = first.dist.root / "left-here"
    marker.write_text("")
    again = packed.unpack(cvmfsexec_dir, facts(), "osg")
    assert (again.dist, again.reused) == (first.dist, True)
    assert marker.exists()


def test_a_newer_file_unpacks_again(cvmfsexec_dir: Path) -> None:
    """As the file's header does (makedist:225): newer than .cvmfsexec -> unpacked afresh."""
    first = packed.unpack(cvmfsexec_dir, facts(), "osg")
    (first.dist.root / "left-here").write_text("")
    stamp = first.dist.root.stat().st_mtime + 10
    os.utime(first.file, (stamp, stamp))
    again = packed.unpack(cvmfsexec_dir, facts(), "osg")
    assert not again.reused
    assert not (again.dist.root / "left-here").exists()


def test_another_build_unpacked_there_is_refused(cvmfsexec_dir: Path) -> None:
    """A .cvmfsexec of another machine type that the file would not replace is an error."""
    arm = cvmfsexec_dir / "cvmfsexec-osg-rhel9-aarch64"
    assert subprocess.run([str(arm), "-v"], capture_output=True, check=False).returncode == 0
    with pytest.raises(LaunchError, match="holds a rhel9-aarch64 build, not rhel9-x86_64"):
        packed.unpack(cvmfsexec_dir, facts(), "osg")


def test_in_use_is_not_unpacked_over(cvmfsexec_dir: Path) -> None:
    """A .cvmfsexec locked by a live cvmfsd is not deleted by unpacking a newer file."""
    first = packed.unpack(cvmfsexec_dir, facts(), "osg")
    fd = os.open(first.dist.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        stamp = first.dist.root.stat().st_mtime + 10
        os.utime(first.file, (stamp, stamp))
        with pytest.raises(LaunchError, match="another cvmfsd"):
            packed.unpack(cvmfsexec_dir, facts(), "osg")
    finally:
        os.close(fd)
    assert (first.dist.root / "cvmfsexec").exists()


def test_a_chosen_file_that_fails_or_cannot_run(cvmfsexec_dir: Path) -> None:
    """The chosen file goes through the checks of ``--dist FILE`` (tests/test_dist_file.py):
    cut short, it fails with its status and output; a script that is no self-extracting
    cvmfsexec is refused without being run; without the execute bit, the fix is named."""
    bad = cvmfsexec_dir / "cvmfsexec-osg-rhel9-x86_64"
    data = bad.read_bytes()
    bad.write_bytes(data[: data.index(packed.TAR_MARKER) + len(packed.TAR_MARKER) + 100])
    with pytest.raises(LaunchError, match="failed with status 127: gzip: stdin: unexpected end"):
        packed.unpack(cvmfsexec_dir, facts(), "osg")
    bad.write_text(f"#!/bin/sh\ntouch {cvmfsexec_dir / 'ran'}\n")
    with pytest.raises(LaunchError, match="is not a self-extracting cvmfsexec: it is a script"):
        packed.unpack(cvmfsexec_dir, facts(), "osg")
    assert not (cvmfsexec_dir / "ran").exists()
    bad.chmod(0o644)
    with pytest.raises(LaunchError, match="is not executable") as info:
        packed.unpack(cvmfsexec_dir, facts(), "osg")
    assert info.value.hint == f"chmod +x {bad}"


def test_prepare_uses_the_unpacked_build(cvmfsexec_dir: Path, tmp_path: Path) -> None:
    """prepare() with --dist CVMFSEXEC_DIR and CVMFS_SRC from the environment plans mode 3 on it."""
    config = Config(payload=("true",), repos=(REPO_A,), dist=cvmfsexec_dir, mode="3",
                    environ={"TMPDIR": str(tmp_path), "CVMFS_SRC": "osg"})
    prepared = prepare(config, facts(), start=False)
    assert prepared.launch_error is None
    assert prepared.dist == Dist(cvmfsexec_dir / ".cvmfsexec")
    assert prepared.unpacked is not None
    assert prepared.plan is not None
    assert prepared.plan.dist.root == cvmfsexec_dir / ".cvmfsexec"


def test_prepare_reports_no_fit_as_a_launch_error(cvmfsexec_dir: Path, tmp_path: Path) -> None:
    """No build for this node: the policy decides (launch_error), the message lists the files."""
    config = Config(payload=("true",), repos=(REPO_A,), dist=cvmfsexec_dir, mode="3",
                    environ={"TMPDIR": str(tmp_path), "CVMFS_SRC": "default"})
    prepared = prepare(config, facts(arch="ppc64le"), start=False)
    assert isinstance(prepared.launch_error, LaunchError)
    assert "expected cvmfsexec-default-rhel9-ppc64le" in str(prepared.launch_error)
    assert "cvmfsexec-osg-rhel9-aarch64" in str(prepared.launch_error)
    assert prepared.dist is None


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.fuse
def test_run_picks_unpacks_and_uses_the_right_build(stratum_dir: Path, short_tmp: Path) -> None:
    """``cvmfsd run --dist CVMFSEXEC_DIR``: this node's osg build, unpacked, mounts in mode 3."""
    try:
        wanted = select_dist(probe.probe_host(run_checks=False), "osg")
    except HostUnsupported as exc:
        pytest.skip(f"this node has no cvmfsexec build: {exc}")
    other_arch = "aarch64" if wanted.arch != "aarch64" else "x86_64"
    directory = make_packed_dir(dist_parent(short_tmp), stratum_dir, {
        wanted.name: makedist.DEFAULT_CONFIG_REPO,
        f"cvmfsexec-default-{wanted.machine_type}": DECOY_CONFIG,
        f"cvmfsexec-osg-{wanted.os}{wanted.version}-{other_arch}": DECOY_CONFIG,
    })
    gconfig = short_tmp / "glidein_config"
    gconfig.write_text(f"GLIDEIN_CVMFS required\nCVMFS_SRC osg\nCVMFSEXEC_DIR {directory}\n")
    unpacked = directory / packed.UNPACKED
    try:
        result = subprocess.run(
            [sys.executable, "-m", "cvmfsd", "run", "--dist", str(directory), "--mode", "3",
             "--glidein-config", str(gconfig), "--repos", REPO_A, "--",
             "sh", "-c", f"cat /cvmfs/{REPO_A}/hello.txt"],
            capture_output=True, text=True, check=False, timeout=60, stdin=subprocess.DEVNULL)
        # --mode 3 is forced: cvmfsd fails (required) unless cvmfsexec mounted in mode 3
        assert result.returncode == 0, result.stderr
        assert result.stdout == "hello from repo.a\n"
        assert "cvmfsexec build" in result.stderr and wanted.name in result.stderr
        assert Dist(unpacked).config_repo() == makedist.DEFAULT_CONFIG_REPO  # not a decoy
        assert f"machtype: {wanted.machine_type}\n" in (
            unpacked / "dist/.cvmfsexecdist").read_text()
    finally:
        leftovers = cvmfs2_pids(unpacked)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"cvmfs2 processes left behind: {leftovers}"
    assert not mounts_under(unpacked)
