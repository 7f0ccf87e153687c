"""Host probing on canned trees, cvmfsexec's kernel rule, and one real run."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import pytest

from cvmfsd.probe import HostFacts, cvmfsexec_userfuse, probe_host

DATA = Path(__file__).parent / "data" / "probe"


def _probe(case: str, **kwargs: object) -> HostFacts:
    root = DATA / case
    return probe_host(proc_root=root / "proc", sys_root=root / "sys", etc_root=root / "etc",
                      dev_root=root / "dev", cvmfs_root=root / "cvmfs", run_checks=False,
                      search_path="", **kwargs)  # type: ignore[arg-type]


CASES = [
    # (case, kernel, os id, id_like, version, max userns, userfuse, /dev/fuse, masked /proc)
    ("el9", "5.14.0-362.8.1.el9_3.aarch64", "rocky", ("rhel", "centos", "fedora"), "9.3",
     30000, True, True, False),
    ("el7_old", "3.10.0-957.27.2.el7.x86_64", "centos", ("rhel", "fedora"), "7",
     0, False, False, False),
    ("el78", "3.10.0-1160.el7.x86_64", "rhel", ("fedora",), "7.9", 15000, True, True, False),
    ("docker_masked", "5.15.0-91-generic", "ubuntu", ("debian",), "22.04",
     63000, True, False, True),
    ("host_cvmfs", "6.1.0-18-amd64", "debian", (), "12", 63000, True, False, False),
]


@pytest.mark.parametrize(("case", "expected"), [(c[0], c[1:]) for c in CASES])
def test_canned_trees(case: str, expected: tuple[object, ...]) -> None:
    """Each canned tree yields the facts written in it, each with its evidence."""
    facts = _probe(case)
    assert expected == (
        facts.kernel_release.value, facts.os_id.value, facts.os_id_like.value,
        facts.os_version_id.value, facts.max_user_namespaces.value,
        facts.cvmfsexec_userfuse.value, facts.dev_fuse.value, facts.proc_masked.value)
    assert (facts.userns.value, facts.fuse_in_userns.value) == (None, None)
    assert all(fact.evidence for fact in facts.facts().values())
    assert "osrelease" in facts.kernel_release.evidence


def test_arch_from_proc_or_uname() -> None:
    """The architecture comes from /proc/sys/kernel/arch, else from uname."""
    assert _probe("el9").arch.value == "aarch64"
    assert platform.machine() == _probe("el7_old").arch.value


def test_fuse_group() -> None:
    """A fuse group we are not in is False; no fuse group at all is None."""
    assert _probe("el9").fuse_group.value is False
    assert _probe("el7_old").fuse_group.value is None


def test_masked_proc_evidence() -> None:
    """Masked /proc names the mount points that gave it away."""
    assert "/proc/sys, /proc/driver" in _probe("docker_masked").proc_masked.evidence


def test_host_cvmfs_and_repos() -> None:
    """GlideinWMS's .cvmfsdirtab test finds a host /cvmfs; wanted repos are checked each."""
    facts = _probe("host_cvmfs", repos=("repo.a", "repo.b"))
    assert facts.host_cvmfs.value is True
    assert facts.repos_present.value == ("repo.a",)
    assert "repo.a: present;" in facts.repos_present.evidence
    assert "repo.b: No such file or directory" in facts.repos_present.evidence
    assert facts.repos_wanted == ("repo.a", "repo.b")
    assert _probe("el9").host_cvmfs.value is False


@pytest.mark.parametrize(("fstype_source", "fqrn", "present", "said"), [
    # A system mount (mount.cvmfs adds fsname=cvmfs2, mount/mount.cvmfs.cc:593) and a
    # cvmfsexec one (no fsname: libfuse names the device, lib/mount.c) count alike.
    ("fuse cvmfs2", "repo.a", True, "present, a FUSE mount (fuse cvmfs2), user.fqrn repo.a"),
    ("fuse /dev/fuse", "repo.a", True, "present, a FUSE mount (fuse /dev/fuse), user.fqrn repo.a"),
    ("fuse.cvmfs2 cvmfs2", "repo.a", True, "present, a FUSE mount (fuse.cvmfs2 cvmfs2)"),
    ("fuse cvmfs2", "repo.b", False, "serves 'repo.b', not repo.a"),
    ("fuse sshfs", None, False, "a FUSE mount that answers no user.fqrn: not CVMFS"),
    ("nfs4 server:/cvmfs/repo.a", None, True, "repo.a: present"),
])
def test_host_repo_is_identified_by_fuse_and_fqrn(
        tmp_path: Path, fstype_source: str, fqrn: str | None, present: bool, said: str) -> None:
    """A host repository is a FUSE mount answering its user.fqrn, whatever the source."""
    repo = tmp_path / "cvmfs" / "repo.a"
    repo.mkdir(parents=True)
    (repo / "f").write_text("x")
    if fqrn:
        os.setxattr(repo, "user.fqrn", fqrn.encode())
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountinfo").write_text(
        f"40 1 0:50 / {tmp_path}/cvmfs rw - autofs systemd-1 rw\n"
        f"41 40 0:51 / {repo} ro - {fstype_source} ro,user_id=0\n")
    facts = probe_host(proc_root=tmp_path, etc_root=tmp_path, dev_root=tmp_path,
                       cvmfs_root=tmp_path / "cvmfs", repos=["repo.a"], run_checks=False)
    assert facts.repos_present.value == (("repo.a",) if present else ())
    assert said in facts.repos_present.evidence
    assert f"{tmp_path}/cvmfs is autofs" in facts.repos_present.evidence


def test_empty_repo_dir_is_not_present(tmp_path: Path) -> None:
    """An empty directory under /cvmfs is not a repository."""
    (tmp_path / "repo.x").mkdir()
    facts = probe_host(proc_root=tmp_path, etc_root=tmp_path, dev_root=tmp_path,
                       cvmfs_root=tmp_path, repos=["repo.x"], run_checks=False)
    assert facts.repos_present.value == ()
    assert "repo.x: empty" in facts.repos_present.evidence


def test_fusermount_setuid(tmp_path: Path) -> None:
    """fusermount counts only when setuid root, or when we are root."""
    fake = tmp_path / "fusermount3"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o4755)
    facts = probe_host(proc_root=tmp_path, etc_root=tmp_path, dev_root=tmp_path,
                       cvmfs_root=tmp_path, run_checks=False, search_path=str(tmp_path))
    assert ((str(fake),) if os.geteuid() == 0 else ()) == facts.fusermount.value
    assert "fusermount: not on PATH" in facts.fusermount.evidence


def test_missing_everything(tmp_path: Path) -> None:
    """An empty tree gives unknowns with evidence, not exceptions."""
    facts = probe_host(proc_root=tmp_path, etc_root=tmp_path, dev_root=tmp_path,
                       cvmfs_root=tmp_path / "cvmfs", run_checks=False, search_path="")
    assert (
        facts.kernel_release.value, facts.os_id.value, facts.cvmfsexec_userfuse.value,
        facts.dev_fuse.value) == (None, None, None, False)
    assert "no kernel release" in facts.cvmfsexec_userfuse.evidence


KERNELS = [
    ("6.18.44-fc-v657", True),
    ("5.14.0-362.el9.x86_64", True),
    ("4.18.0-513.el8.x86_64", True),
    ("4.17.19", False),
    ("3.10.0-1127.el7.x86_64", True),
    ("3.10.0-1126.el7.x86_64", False),
    ("3.10.0", False),
    ("3.11.0-2000", False),
    ("2.6.32-754.el6.x86_64", False),
    ("garbage", None),
]


@pytest.mark.parametrize(("release", "expected"), KERNELS)
def test_cvmfsexec_kernel_rule(release: str, expected: bool | None) -> None:
    """cvmfsexec's mode-3 rule: >4, 4.18+, or 3.10 revision >= 1127."""
    assert expected is cvmfsexec_userfuse(release).value


def test_to_json_and_render() -> None:
    """to_json is JSON-serialisable; render has one line per fact with its evidence."""
    facts = _probe("host_cvmfs", repos=("repo.a",))
    data = json.loads(json.dumps(facts.to_json()))
    assert {"value": ["repo.a"], "evidence": facts.repos_present.evidence} == data[
        "repos_present"]
    assert data["repos_wanted"] == ["repo.a"]
    lines = facts.render().splitlines()
    assert len(facts.facts()) == len(lines)
    assert f"kernel_release: 6.1.0-18-amd64 ({facts.kernel_release.evidence})" == lines[0]


def test_real_host() -> None:
    """A real probe of this machine runs its checks and explains each result."""
    facts = probe_host(timeout=10.0)
    assert os.uname().release == facts.kernel_release.value
    assert "unshare -rm true" in facts.userns.evidence
    assert facts.userns.value is not None
    assert "FUSE mount check" in facts.fuse_in_userns.evidence
    if facts.fuse_in_userns.value:
        assert facts.userns.value is True
    json.dumps(facts.to_json())


def test_child_timeout_is_reported() -> None:
    """A child that outlives its deadline is killed (with its group) and reported."""
    from cvmfsd.probe import _Child

    ran = _Child([sys.executable, "-c", "import time; time.sleep(30)"], 0.2).result()
    assert (ran.status, ran.what) == (None, "timed out after 0.2 s")
    assert "cannot run" in _Child(["/nonexistent/cvmfsd-test"], 1.0).result().what


def test_child_deadline_counts_from_its_start() -> None:
    """A check started early (as `cvmfsd run` does) has spent its time by the collection."""
    import time

    from cvmfsd.probe import _Child

    child = _Child([sys.executable, "-c", "import time; time.sleep(30)"], 0.5)
    time.sleep(0.5)
    began = time.monotonic()
    assert child.result().status is None
    assert time.monotonic() - began < 0.4  # not another 0.5 s


def test_checks_cancelled_leave_no_child(tmp_path: Path) -> None:
    """Checks given up before collection end their children (and their groups)."""
    from cvmfsd.probe import Checks

    checks = Checks(repos=["repo.a"], cvmfs_root=tmp_path, proc_root=tmp_path)
    children = [c.proc for c in (checks.userns, checks.fuse) if c is not None and c.proc]
    assert len(children) == 2
    checks.cancel()
    assert all(proc.poll() is not None for proc in children)


def test_repos_looked_at_in_process_where_nothing_is_mounted(tmp_path: Path) -> None:
    """No mount at or below the root (most nodes that need cvmfsd): no child for /cvmfs."""
    from cvmfsd.probe import Checks

    (tmp_path / "cvmfs" / "repo.a").mkdir(parents=True)
    (tmp_path / "cvmfs" / "repo.a" / "f").write_text("x")
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountinfo").write_text(
        f"40 1 0:50 / {tmp_path}/cvmfs-other rw - tmpfs tmpfs rw\n")
    checks = Checks(repos=["repo.a"], cvmfs_root=tmp_path / "cvmfs", proc_root=tmp_path,
                    run_checks=False)
    assert checks.look is None
    facts = probe_host(proc_root=tmp_path, etc_root=tmp_path, dev_root=tmp_path, checks=checks)
    assert facts.repos_present.value == ("repo.a",)
    assert f"nothing mounted at or below {tmp_path}/cvmfs: looked in-process" in (
        facts.repos_present.evidence)
    assert "repo.a: present" in facts.repos_present.evidence
    # Something mounted there: the look goes to a child, which may hang alone.
    (tmp_path / "self" / "mountinfo").write_text(
        f"40 1 0:50 / {tmp_path}/cvmfs/repo.a rw - fuse /dev/fuse rw\n")
    checks = Checks(repos=["repo.a"], cvmfs_root=tmp_path / "cvmfs", proc_root=tmp_path,
                    run_checks=False)
    assert checks.look is not None
    checks.cancel()


@pytest.mark.parametrize(("output", "status", "value", "said"), [
    ("1|mount|0\n", 0, True, "mounted and unmounted FUSE"),
    ("0|open /dev/fuse|ENOENT\n", 0, False, "open /dev/fuse failed: ENOENT"),
    ("0|mount|EPERM\n", 0, False, "mount failed: EPERM"),
    ("unshare: unshare failed: Operation not permitted\n", 1, False,
     "exit 1: 'unshare: unshare failed: Operation not permitted'"),
    ("", None, None, "timed out after 5 s"),
])
def test_fuse_check_output(output: str, status: int | None, value: bool | None,
                           said: str) -> None:
    """The FUSE check's last line (ok|step|errno) or, failing that, how the child ended."""
    from cvmfsd.probe import _fuse_in_userns, _Ran

    what = "timed out after 5 s" if status is None else f"exit {status}"
    fact = _fuse_in_userns(_Ran(status, output, what))
    assert fact.value is value
    assert said in fact.evidence
