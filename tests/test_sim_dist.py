"""The simulated distribution's layout and the scripts' command-line contract.

These need no FUSE: they check what cvmfsexec 4.51, mountrepo and umountrepo
print and return for bad or informational invocations.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cvmfsd.sim import makedist


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env},
    )


def test_layout_matches_a_real_distribution(dist: Path) -> None:
    """makedist creates every path a real cvmfsexec distribution has."""
    for rel in (
        "cvmfsexec",
        "mountrepo",
        "umountrepo",
        "dist/usr/bin/cvmfs2",
        "dist/etc/cvmfs/default.conf",
        "dist/etc/cvmfs/default.local",
        "dist/.cvmfsexecdist",
        "dist/var/lib/cvmfs",
    ):
        assert (dist / rel).exists(), rel
    # dist/cvmfs/<repo> and log/ are mountrepo's (tests/test_fidelity_scripts.py)
    conf = "".join(p.read_text() for p in (dist / "dist/etc/cvmfs/default.d").glob("*.conf"))
    assert f"CVMFS_CONFIG_REPOSITORY={makedist.DEFAULT_CONFIG_REPO}\n" in conf
    assert (dist / "dist/.cvmfsexecdist").read_text().startswith("disttype: standard\n")
    for script in ("cvmfsexec", "mountrepo", "umountrepo", "dist/usr/bin/cvmfs2"):
        assert os.access(dist / script, os.X_OK), script


def test_makedist_refuses_an_existing_directory(dist: Path, stratum_dir: Path) -> None:
    """Like the real makedist, an existing target is an error, not an overwrite."""
    with pytest.raises(makedist.DistError, match="already exists"):
        makedist.make_dist(dist, stratum=stratum_dir)


def test_makedist_rejects_a_bad_config_repository_name(tmp_path: Path, stratum_dir: Path) -> None:
    """A repository name that could become a path or shell word is refused."""
    with pytest.raises(makedist.DistError, match="invalid repository name"):
        makedist.make_dist(tmp_path / "d", stratum=stratum_dir, config_repo="../etc")


def test_version(dist: Path) -> None:
    """cvmfsexec -v prints the cvmfsexec version it imitates."""
    result = run([str(dist / "cvmfsexec"), "-v"])
    assert (result.returncode, result.stdout) == (0, "4.51\n")


@pytest.mark.parametrize("args", [["repo.a"], [], ["-N", "repo.a"], ["-x", "--"]])
def test_cvmfsexec_usage(dist: Path, args: list[str]) -> None:
    """Without '--', or with an unknown option, the usage goes to stderr, exit 1."""
    result = run([str(dist / "cvmfsexec"), *args])
    assert result.returncode == 1
    assert result.stderr.splitlines()[-4].startswith("Usage: cvmfsexec [-vN]")
    assert result.stdout == ""


@pytest.mark.parametrize("args", [[], ["a.b", "c.d"]])
def test_mountrepo_usage(dist: Path, args: list[str]) -> None:
    """mountrepo takes exactly one repository."""
    result = run([str(dist / "mountrepo"), *args])
    assert (result.returncode, result.stderr) == (1, "Usage: mountrepo repo.name\n")


@pytest.mark.parametrize("args", [[], ["-z"], ["a.b", "c.d"]])
def test_umountrepo_usage(dist: Path, args: list[str]) -> None:
    """umountrepo takes -z and exactly one repository or -a."""
    result = run([str(dist / "umountrepo"), *args])
    assert (result.returncode, result.stderr) == (1, "Usage: umountrepo [-z] {repo.name|-a}\n")


def test_mountrepo_needs_a_cvmfs_dist(dist: Path) -> None:
    """Without dist/usr/bin/cvmfs2 mountrepo says what it expected."""
    (dist / "dist/usr/bin/cvmfs2").unlink()
    result = run([str(dist / "mountrepo"), "repo.a"])
    assert result.returncode == 1
    assert result.stderr == f"{dist}/dist should be rpm2cpio of cvmfs rpm\n"


@pytest.mark.parametrize("script", ["mountrepo", "umountrepo"])
def test_nested_request_needs_the_interface(dist: Path, script: str) -> None:
    """Inside cvmfsexec, [u]mountrepo must be called through $CVMFS[U]MOUNT."""
    result = run(
        [str(dist / script), "repo.a"], CVMFSEXEC_CMDFD="9", CVMFSEXEC_WAITFIFO="/nonexistent"
    )
    assert result.returncode == 1
    assert "only works through $CVMFS" in result.stderr
