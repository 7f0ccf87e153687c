"""The simulated cvmfsexec end to end: real namespaces, real FUSE mounts.

These are the acceptance checks of the simulated distribution: what a pilot
sees inside, how the namespace ends, and how mount failures are reported.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from cvmfsd import launch
from cvmfsd.sim import stratum
from tests.conftest import REPO_A, REPO_B, cvmfs2_pids, mounts_under, reap, wait_for

pytestmark = pytest.mark.fuse

XATTRS = "getfattr --only-values -n user.{name} /cvmfs/{repo}; echo"


def cvmfsexec(dist: Path, *args: str, timeout: float = 60,
              **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(dist / "cvmfsexec"), *args], capture_output=True, text=True, check=False,
        timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, **env},
    )


def payload_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """stdout without the mount chatter of mountrepo."""
    return [line for line in result.stdout.splitlines() if not line.startswith("CernVM-FS:")]


def test_files_and_hit_rate_inside(dist: Path) -> None:
    """A file of repo.a is readable and repo.b answers user.hitrate, as the real one."""
    script = f"cat /cvmfs/{REPO_A}/hello.txt; " + XATTRS.format(name="hitrate", repo=REPO_B)
    result = cvmfsexec(dist, REPO_A, REPO_B, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = payload_lines(result)
    assert lines[0] == "hello from repo.a"
    assert re.fullmatch(r"\d+\.\d+", lines[1]), lines


def test_second_read_hits_the_cache(dist: Path) -> None:
    """Reading a file again counts an invocation but no download."""
    counters = "; ".join(XATTRS.format(name=n, repo=REPO_A) for n in ("ndownload", "nopen"))
    read = f"cat /cvmfs/{REPO_A}/hello.txt >/dev/null"
    script = f"{read}; {counters}; {read}; {counters}"
    result = cvmfsexec(dist, REPO_A, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    downloads1, opens1, downloads2, opens2 = map(int, payload_lines(result))
    assert downloads2 == downloads1
    assert opens2 == opens1 + 1


def test_talk_counters_agree_with_xattrs(dist: Path) -> None:
    """internal affairs on the talk socket reports the numbers the xattrs derive from."""
    socket = dist / f"dist/var/lib/cvmfs/shared/cvmfs_io.{REPO_B}"
    talk = f"{dist}/dist/usr/bin/cvmfs_talk -p {socket} 'internal affairs'"
    script = (f"cat /cvmfs/{REPO_B}/data.csv >/dev/null; cat /cvmfs/{REPO_B}/data.csv >/dev/null; "
              + XATTRS.format(name="ndownload", repo=REPO_B) + "; "
              + XATTRS.format(name="hitrate", repo=REPO_B) + f"; {talk}")
    result = cvmfsexec(dist, REPO_B, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = payload_lines(result)
    ndownload, hitrate = int(lines[0]), float(lines[1])
    raw = dict(line.split("|")[:2] for line in lines[2:] if line.count("|") >= 2)
    invocations, downloads = int(raw["fetch.n_invocations"]), int(raw["fetch.n_downloads"])
    assert downloads == ndownload
    assert hitrate == pytest.approx(100 * (1 - downloads / invocations), abs=0.001)


def test_payload_runs_as_the_real_uid_with_the_host_visible(dist: Path) -> None:
    """The payload is not root inside, and the host's files are there."""
    result = cvmfsexec(dist, "--", "sh", "-c", f"id -u; test -d {dist} && echo host-visible")
    assert payload_lines(result) == [str(os.getuid()), "host-visible"]


def test_nesting_interface_and_its_flaw(dist: Path, stratum_dir: Path) -> None:
    """$CVMFSMOUNT mounts more; a failed one still answers 0, as cvmfsexec 4.51 does."""
    stratum.set_faults(stratum_dir, REPO_B, mount_fail=16)
    script = f'$CVMFSMOUNT {REPO_A}; echo "a=$?"; $CVMFSMOUNT {REPO_B}; echo "b=$?"; ' \
             f"cat /cvmfs/{REPO_A}/hello.txt"
    result = cvmfsexec(dist, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    # cvmfs2 leaves "loading Fuse module... " unterminated when it fails, so
    # the payload's next words land on that line, as with the real loader.
    assert re.search(r"^a=0$.*b=0$.*^hello from repo.a$", result.stdout, re.M | re.S)
    assert "(16 - " in result.stderr


def test_no_nesting_hides_the_interface(dist: Path) -> None:
    """With -N the payload gets no CVMFSMOUNT, CVMFSEXEC_CMDFD or CVMFSEXEC_WAITFIFO."""
    script = 'echo "[$CVMFSMOUNT][$CVMFSEXEC_CMDFD][$CVMFSEXEC_WAITFIFO]"'
    result = cvmfsexec(dist, "-N", "--", "sh", "-c", script)
    assert payload_lines(result) == ["[][][]"]


def test_tmpdir_is_replaced(dist: Path, short_tmp: Path) -> None:
    """An exported TMPDIR is replaced by cvmfsexec's FIFO directory (a real pitfall)."""
    result = cvmfsexec(dist, "--", "sh", "-c", 'echo "$TMPDIR"', TMPDIR=str(short_tmp))
    (tmpdir,) = payload_lines(result)
    assert Path(tmpdir).parent == short_tmp
    assert not Path(tmpdir).exists(), "cvmfsexec removes it at exit"


def test_mount_failure_reports_the_loader_code(dist: Path, stratum_dir: Path) -> None:
    """A repository that fails with code 15 fails cvmfsexec with 15 and its message."""
    stratum.set_faults(stratum_dir, REPO_B, mount_fail=15)
    result = cvmfsexec(dist, REPO_A, REPO_B, "--", "true")
    assert result.returncode == 15
    assert result.stdout.endswith(f"... mountrepo {REPO_B} failed\n")


def test_mountrepo_exits_with_the_loader_code(dist: Path, stratum_dir: Path) -> None:
    """mountrepo on its own (mode 1) passes cvmfs2's loader code through."""
    stratum.set_faults(stratum_dir, REPO_A, mount_fail=23)
    result = subprocess.run([str(dist / "mountrepo"), REPO_A], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 23
    assert not mounts_under(dist)


def test_mode1_mount_and_unmount(dist: Path) -> None:
    """mountrepo mounts on the host at dist/cvmfs/<repo>; umountrepo -a removes it all."""
    result = subprocess.run([str(dist / "mountrepo"), REPO_A], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "CernVM-FS: loading Fuse module... done",
        f"CernVM-FS: mounted cvmfs on {dist}/dist/cvmfs/{REPO_A}",
    ]
    assert (dist / f"dist/cvmfs/{REPO_A}/hello.txt").read_text() == "hello from repo.a\n"
    result = subprocess.run([str(dist / "umountrepo"), "-a"], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.stdout == f"Unmounting {dist}/dist/cvmfs/{REPO_A}\n", result.stderr
    assert not mounts_under(dist)
    wait_for(lambda: not cvmfs2_pids(dist))


def test_mode2_mounts_on_the_host_and_cleans_up(dist: Path) -> None:
    """On an 'old kernel' the mounts are made outside the namespace and removed at the end."""
    script = f"cat /cvmfs/{REPO_A}/hello.txt; grep -c ' {dist}/dist/cvmfs/' /proc/self/mountinfo"
    result = cvmfsexec(dist, REPO_A, "--", "sh", "-c", script,
                       CVMFSEXEC_SIM_UNAME_R="3.10.0-957.el7.x86_64")
    assert result.returncode == 0, result.stderr
    assert payload_lines(result)[0] == "hello from repo.a"
    wait_for(lambda: not mounts_under(dist) and not cvmfs2_pids(dist))


def _namespace_init(process: subprocess.Popen[str]) -> int:
    found: list[int] = []

    def look() -> bool:
        found[:] = [p for p in launch.descendants(process.pid) if launch.is_namespace_init(p)]
        return bool(found)

    wait_for(look)
    return found[0]


def test_pid1_ignores_sigterm_and_sigkill_ends_everything(dist: Path) -> None:
    """Namespace PID 1 shrugs off SIGTERM; SIGKILL of it leaves no mount and no cvmfs2."""
    process = subprocess.Popen(
        [str(dist / "cvmfsexec"), REPO_A, REPO_B, "--", "sh", "-c", "echo ready; exec sleep 600"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        while process.stdout.readline().strip() != "ready":
            assert process.poll() is None, "cvmfsexec ended early"
        init = _namespace_init(process)
        # config repo, repo.a, repo.b, each with its watchdog: forked, not exec'd, so
        # with the same command line (cvmfs monitor.cc Watchdog::Fork).
        assert len(cvmfs2_pids(dist)) == 6
        os.kill(init, signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.5)
        os.kill(init, signal.SIGKILL)
        # util-linux unshare cannot re-raise SIGKILL and exits 1 ("sigprocmask
        # unblock failed"), with the real cvmfsexec as with this one.
        assert process.wait(timeout=10) != 0
        wait_for(lambda: not cvmfs2_pids(dist))
        assert not mounts_under(dist)
    finally:
        reap(process)
