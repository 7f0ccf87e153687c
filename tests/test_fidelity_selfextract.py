"""``cvmfsd sim makedist -o`` behaves as cvmfsexec 4.51's ``makedist -o`` (58eddfb).

What is pinned, each from the upstream ``makedist``:

* l.198-219: ``-o`` takes exactly one file; without ``dist/.cvmfsexecdist`` it prints
  "Must be run from where cvmfs distribution was made by makedist (without -s)"
  and exits 1.
* l.221-232: the file is a bash header followed, after the line ``__TAR_BELOW__``,
  by a gzipped tar.  The header sets ``BASE`` to ``.cvmfsexec`` in the file's own
  directory (``cd `dirname $0```, so not the working directory), and unpacks into it
  only when the file is newer than that directory (``[ $0 -nt $BASE ]``, which is
  also true when the directory is missing): ``rm -rf``, ``mkdir``, then ``tar -xzf``
  of what follows the marker.  Then ``exec $BASE/cvmfsexec "$@"``: every run execs
  the unpacked cvmfsexec with all the file's arguments.
* l.234: the tar holds ``cvmfsexec mountrepo umountrepo dist`` with the contents
  of ``dist/var/run/cvmfs`` and ``dist/var/lib/cvmfs`` left out (the directories
  themselves stay).
* l.235: the file is made executable.

GlideinWMS runs such a file once before using ``.cvmfsexec/mountrepo``
(cvmfs_helper_funcs.sh:244,251) and unmounts with ``.cvmfsexec/umountrepo``
(cvmfs_umount.sh:77).  Checked by hand: the real makedist -o, run on a simulated
distribution, packs the same members, and its file unpacks and runs the same.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cvmfsd.sim import makedist


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60,
                          cwd=cwd, stdin=subprocess.DEVNULL)


@pytest.fixture(name="packed")
def _packed(dist: Path, short_tmp: Path) -> Path:
    """The ``dist`` fixture with cache and run-time files, packed into a CVMFSEXEC_DIR."""
    for junk in ("dist/var/lib/cvmfs/shared/cvmfs_io.repo.a", "dist/var/run/cvmfs/x.pid"):
        (dist / junk).parent.mkdir(parents=True, exist_ok=True)
        (dist / junk).write_text("not packed\n")
    directory = short_tmp / "cvmfsexec"
    directory.mkdir()
    return makedist.pack_dist(dist, directory / "cvmfsexec-osg-rhel9-x86_64")


def tar_members(packed: Path) -> list[str]:
    data = packed.read_bytes()
    header, sep, payload = data.partition(f"\n{makedist.TAR_MARKER}\n".encode())
    assert sep, "no __TAR_BELOW__ line"
    assert header.startswith(b"#!/bin/bash\n")
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
        return tar.getnames()


def test_file_is_a_bash_header_then_the_tar(packed: Path) -> None:
    """l.221-235: executable, bash, the marker line, then the tools and dist/ in a tgz."""
    assert os.access(packed, os.X_OK)
    names = tar_members(packed)
    assert {"cvmfsexec", "mountrepo", "umountrepo", "dist", "dist/.cvmfsexecdist",
            "dist/usr/bin/cvmfs2", "dist/etc/cvmfs/default.conf"} <= set(names)
    assert {n.split("/")[0] for n in names} == {"cvmfsexec", "mountrepo", "umountrepo", "dist"}


def test_cache_and_run_time_state_are_not_packed(packed: Path) -> None:
    """l.234: dist/var/lib/cvmfs and dist/var/run/cvmfs are packed empty."""
    names = tar_members(packed)
    assert "dist/var/lib/cvmfs" in names
    assert "dist/var/run/cvmfs" in names
    assert not [n for n in names if n.startswith(("dist/var/lib/cvmfs/", "dist/var/run/cvmfs/"))]


def test_run_unpacks_beside_itself_and_execs_cvmfsexec(packed: Path, short_tmp: Path) -> None:
    """l.223-231: unpacks into .cvmfsexec next to the file, whatever the cwd, then execs it."""
    elsewhere = short_tmp / "elsewhere"
    elsewhere.mkdir()
    result = run([str(packed), "-v"], cwd=elsewhere)
    assert (result.returncode, result.stdout) == (0, "4.51\n"), result.stderr
    unpacked = packed.parent / makedist.UNPACKED
    for rel in ("cvmfsexec", "mountrepo", "umountrepo", "dist/usr/bin/cvmfs2"):
        assert os.access(unpacked / rel, os.X_OK), rel
    assert not list(elsewhere.iterdir())
    assert not (unpacked / "dist/var/lib/cvmfs/shared").exists()


def test_arguments_reach_cvmfsexec(packed: Path) -> None:
    """l.231: ``exec .cvmfsexec/cvmfsexec "$@"``: no '--' gives cvmfsexec's own usage, exit 1."""
    result = run([str(packed), "repo.a"], cwd=packed.parent)
    assert result.returncode == 1
    assert "Usage: cvmfsexec [-vN]" in result.stderr


def test_unpacks_again_only_when_the_file_is_newer(packed: Path) -> None:
    """l.225-227: an unpacked directory newer than the file is reused; an older one is replaced."""
    unpacked = packed.parent / makedist.UNPACKED
    assert run([str(packed), "-v"], cwd=packed.parent).returncode == 0
    marker = unpacked / "left-here"
    marker.write_text("")
    assert run([str(packed), "-v"], cwd=packed.parent).returncode == 0
    assert marker.exists(), "a newer .cvmfsexec was unpacked again"
    stamp = unpacked.stat().st_mtime
    os.utime(packed, (stamp + 10, stamp + 10))
    assert run([str(packed), "-v"], cwd=packed.parent).returncode == 0
    assert not marker.exists(), "an older .cvmfsexec was not replaced"


def test_refuses_what_makedist_did_not_make(short_tmp: Path) -> None:
    """l.212-214: without dist/.cvmfsexecdist, the real message and no file."""
    with pytest.raises(makedist.DistError, match="Must be run from where cvmfs distribution "
                       r"was made by makedist \(without -s\)"):
        makedist.pack_dist(short_tmp, short_tmp / "out")
    assert not (short_tmp / "out").exists()


def test_an_output_that_cannot_be_written_is_an_error_not_a_traceback(
        stratum_dir: Path, short_tmp: Path) -> None:
    """``-o`` into a directory that does not exist: makedist writes FILE by redirection
    (makedist:221 ``>$2``, :234 ``>>"$2"``), which then fails, and it ends with chmod's
    failure (:235-236, status 1); the simulation fails too, with a DistError naming the
    file and why instead of the shell's messages."""
    dist = short_tmp / "dist"
    makedist.make_dist(dist, stratum=stratum_dir)
    with pytest.raises(makedist.DistError, match=r"cannot write the self-extracting file .*"
                       "No such file or directory; expected a writable file in an existing"):
        makedist.pack_dist(dist, short_tmp / "no" / "such" / "file")


def test_cli_makes_and_packs(stratum_dir: Path, short_tmp: Path) -> None:
    """``cvmfsd sim makedist DIR -m TYPE -o FILE`` makes DIR, then packs it into FILE."""
    target, out = short_tmp / "d8", short_tmp / "cvmfsexec-default-rhel8-aarch64"
    result = run([sys.executable, "-m", "cvmfsd", "sim", "makedist", str(target), "--stratum",
                  str(stratum_dir), "-m", "rhel8-aarch64", "-o", str(out)], cwd=short_tmp)
    assert result.returncode == 0, result.stderr
    assert "machtype: rhel8-aarch64\n" in (target / "dist/.cvmfsexecdist").read_text()
    assert "dist/.cvmfsexecdist" in tar_members(out)
    again = run([sys.executable, "-m", "cvmfsd", "sim", "makedist", str(target), "-o",
                 str(short_tmp / "again")], cwd=short_tmp)
    assert again.returncode == 0, again.stderr  # an existing DIR is packed as it is
