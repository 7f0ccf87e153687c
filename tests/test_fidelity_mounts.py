"""How a CVMFS mount looks in mountinfo, as upstream makes it, and how cvmfsd recognises it.

Upstream facts (facts only; read at cvmfs/cvmfsexec 58eddfb = 4.51,
cvmfs/cvmfs ae7450ec9, libfuse fuse-3.10.2):

* cvmfsexec's mountrepo runs ``cvmfs2 -o config=FILE[,debug] REPO DIST/cvmfs/REPO``,
  no ``fsname`` (mountrepo:158).
* The loader mounts with ``fuse_mount`` / ``fuse_session_mount`` directly
  (cvmfs/loader.cc:1022, :1049), never through ``fuse_parse_cmdline``, so no
  default ``subtype`` is added either.
* libfuse names the mount's source ``fsname``, else ``subtype``, else the
  device, ``/dev/fuse`` (lib/mount.c:448, with devname at :388).
* Only ``mount.cvmfs`` (system mounts: autofs, /etc/fstab) adds
  ``fsname=cvmfs2`` (mount/mount.cvmfs.cc:593).
* GlideinWMS's own check of a mode-1 mount is ``findmnt -t fuse -S /dev/fuse``
  (glideinWMS/glideinwms 0270c6b, creation/web_base/cvmfs_setup.sh:79; :93 at efdc530).

So the source tells nothing; cvmfsd recognises a repository by its mount
point, a FUSE fstype and the ``user.fqrn`` xattr (cvmfsd.mountinfo).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfsd import janitor, mountinfo, shim
from tests.conftest import REPO_A

# Lines as the kernel writes them (proc(5)); the first three are each way a
# cvmfs2 mount can read, the others are not FUSE.
CVMFSEXEC = "101 99 0:61 / /d/dist/cvmfs/repo.a rw,nosuid,nodev,relatime - fuse /dev/fuse " \
            "rw,user_id=1000,group_id=1000"
SYSTEM = "102 40 0:62 / /cvmfs/repo.a ro,nosuid,nodev,relatime shared:5 - fuse cvmfs2 " \
         "ro,user_id=0,group_id=0,default_permissions,allow_other"
SUBTYPE = "103 40 0:63 / /cvmfs/repo.b ro - fuse.cvmfs2 cvmfs2 ro,user_id=0,group_id=0"
AUTOFS = "40 1 0:50 / /cvmfs rw,relatime shared:4 - autofs systemd-1 rw,fd=48,pgrp=1"
BIND = "104 1 8:1 /srv/cvmfs/repo.c /cvmfs/repo.c ro - ext4 /dev/sda1 ro"
TABLE = "\n".join([AUTOFS, CVMFSEXEC, SYSTEM, SUBTYPE, BIND])


def test_every_upstream_form_of_a_cvmfs2_mount_is_fuse() -> None:
    """fuse /dev/fuse (cvmfsexec), fuse cvmfs2 (mount.cvmfs), fuse.cvmfs2 (a subtype): all FUSE."""
    found = mountinfo.fuse_mounts(TABLE)
    assert {point: (m.fstype, m.source) for point, m in found.items()} == {
        "/d/dist/cvmfs/repo.a": ("fuse", "/dev/fuse"),
        "/cvmfs/repo.a": ("fuse", "cvmfs2"),
        "/cvmfs/repo.b": ("fuse.cvmfs2", "cvmfs2"),
    }


def test_janitor_unmounts_cvmfsexec_mounts_whatever_their_source() -> None:
    """The janitor's list of mounts to clean takes the /dev/fuse mount, not a bind of ext4."""
    text = "\n".join([CVMFSEXEC, BIND.replace("/cvmfs/repo.c", "/d/dist/cvmfs/repo.c")])
    assert janitor.dist_mounts(text, ("/d/dist/cvmfs",)) == ["/d/dist/cvmfs/repo.a"]


def test_shim_accepts_a_dev_fuse_mount_that_answers_its_fqrn(tmp_path: Path) -> None:
    """verify_repo judges the table entry's fstype and the root's user.fqrn, not the source."""
    root = tmp_path / "repo.a"
    root.mkdir()
    os.setxattr(root, "user.fqrn", b"repo.a")
    os.setxattr(root, "user.revision", b"7")
    line = CVMFSEXEC.replace("/d/dist/cvmfs/repo.a", str(root))
    mounts = mountinfo.fuse_mounts(line)
    assert shim.verify_repo("repo.a", str(root), mounts) == {"ok": True, "revision": "7"}
    wrong = shim.verify_repo("repo.b", str(root), mounts)
    assert wrong == {"ok": False, "error": f"{root}: serves 'repo.a', expected 'repo.b'"}
    not_fuse = mountinfo.fuse_mounts(BIND.replace("/cvmfs/repo.c", str(root)))
    assert shim.verify_repo("repo.a", str(root), not_fuse)["error"] == (
        f"{root} is not a FUSE mount in this namespace")


@pytest.mark.fuse
def test_the_simulated_mountrepo_mounts_as_cvmfsexec_does(dist: Path) -> None:
    """The simulation's mountrepo mount reads ``fuse /dev/fuse``, as a real cvmfsexec one."""
    subprocess.run([str(dist / "mountrepo"), REPO_A], check=True, capture_output=True,
                   timeout=60)
    point = str(dist / "dist" / "cvmfs" / REPO_A)
    try:
        mount = mountinfo.fuse_mounts(Path("/proc/self/mountinfo").read_text())[point]
        assert (mount.fstype, mount.source) == ("fuse", "/dev/fuse")
        assert shim.verify_repo(REPO_A, point, {point: mount})["ok"] is True
        # A second mountrepo of the mounted repository: the loader says so on stderr
        # and exits 0 (cvmfs/loader.cc:985-990), so mountrepo does too (its status is
        # cvmfs2's, mountrepo:158).
        again = subprocess.run([str(dist / "mountrepo"), REPO_A], capture_output=True,
                               text=True, timeout=60, check=False)
        assert again.returncode == 0, again.stderr
        assert again.stderr.endswith(
            f"\nCernVM-FS: repository {REPO_A} already mounted on {point}\n")
    finally:
        subprocess.run([str(dist / "umountrepo"), REPO_A], check=False, capture_output=True,
                       timeout=60)
        if point in mountinfo.fuse_mounts(Path("/proc/self/mountinfo").read_text()):
            janitor.unmount(point, lazy=False)


@pytest.mark.fuse
def test_inside_the_namespace_the_repository_reads_fuse_dev_fuse(dist: Path) -> None:
    """Mode 3: in the payload's mount table /cvmfs/<repo> is ``fuse /dev/fuse`` (the bind
    of cvmfsexec's mount), and cvmfsd verified it: the payload ran, and reads the file."""
    payload = (f"grep ' /cvmfs/{REPO_A} ' /proc/self/mountinfo; "
               f"cat /cvmfs/{REPO_A}/hello.txt")
    done = subprocess.run([sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist),
                           "--mode", "3", "--repos", REPO_A, "--", "sh", "-c", payload],
                          capture_output=True, text=True, timeout=90, check=False,
                          stdin=subprocess.DEVNULL, env={**os.environ, "GLIDEIN_CVMFS": "required"})
    assert done.returncode == 0, done.stderr
    line, content = done.stdout.splitlines()
    mount = mountinfo.parse_mountinfo(line)[0]
    assert (mount.mountpoint, mount.fstype, mount.source) == (f"/cvmfs/{REPO_A}", "fuse",
                                                               "/dev/fuse")
    assert content == "hello from repo.a"
