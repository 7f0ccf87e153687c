"""A pilot end to end: set-up, jobs through GlideinWMS's composed wrapper, cleanup.

The glidein directory is tests/test_glidein_scripts.py's (glidein_config with
ERROR_GEN_PATH, ADD_CONFIG_LINE_SOURCE, CONDOR_VARS_FILE, WRAPPER_LIST).  The
job wrapper is composed as condor_startup.sh composes it (glideinWMS efdc530,
creation/web_base/condor_startup.sh:151-169 and :464-470): ``#!/bin/sh``, a
header, every file of WRAPPER_LIST in order -- here cvmfsd_job_wrapper.sh, then
a stand-in for the Singularity wrapper that says what it sees -- then
``exec "$@"`` (the default GLIDEIN_WRAPPER_EXEC).  HTCondor runs it as
``condor_job_wrapper.sh JOB ARGS...`` from the job's scratch directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from tests.conftest import REPO_A, cvmfs2_pids, mounts_under, processes_with_argv, reap, wait_for
from tests.test_glidein_scripts import calls, cleanup, make_pilot, setup, values

pytestmark = pytest.mark.fuse

FRAGMENT = resources.files("cvmfsd.glidein_scripts").joinpath("cvmfsd_job_wrapper.sh")
CLASSAD = str(resources.files("cvmfsd.glidein_scripts").joinpath("cvmfsd_classad.sh"))
HEADER = """#!/bin/sh
if [ -n "$BASH_VERSION" ]; then
    set +o posix || echo "WARN: running in POSIX mode"
fi
"""
NEXT = 'echo "singularity wrapper sees: $(ls /cvmfs/repo.a 2>/dev/null | head -n 1) ' \
       '${CVMFS_MOUNT_DIR:+mount dir $CVMFS_MOUNT_DIR}"\n'


def compose(glidein: Path) -> Path:
    """condor_job_wrapper.sh from WRAPPER_LIST, as condor_startup.sh writes it."""
    listed = (glidein / "wrapper_list.lst").read_text().split()
    wrapper = glidein / "condor_job_wrapper.sh"
    wrapper.write_text(HEADER + "".join(Path(f).read_text() for f in listed) + '\nexec "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def make_glidein(where: Path, dist: Path, mode: str, policy: str) -> Path:
    """A glidein whose WRAPPER_LIST names the fragment, then a Singularity stand-in."""
    config = make_pilot(where, f"CVMFSEXEC_DIR {dist}\nGLIDEIN_CVMFS_REPOS {REPO_A}\n"
                               f"GLIDEIN_CVMFS {policy}\nCVMFSD_MODE {mode}\nCVMFSD_GRACE 2\n"
                               "GLIDEIN_Site Pilot Test Site\n")
    entry = where / "entry"
    entry.mkdir()
    (entry / "cvmfsd_job_wrapper.sh").write_text(FRAGMENT.read_text())
    (entry / "singularity_stand_in.sh").write_text(NEXT)
    (where / "wrapper_list.lst").write_text(
        f"{entry}/cvmfsd_job_wrapper.sh\n{entry}/singularity_stand_in.sh\n")
    (where / "execute").mkdir()
    return config


def job_env(glidein: Path) -> dict[str, str]:
    """The job's environment: the starter's, plus what condor_vars publishes to jobs."""
    got = values(glidein / "glidein_config")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVMFS", "_CONDOR"))}
    env.update({k: got[k] for k in ("CVMFSD_SOCKET", "CVMFSCTL") if got.get(k)})
    env["_CONDOR_WRAPPER_ERROR_FILE"] = str(glidein / "execute" / ".job_wrapper_failure")
    return env


@pytest.mark.parametrize("policy", ["required", "preferred"])
@pytest.mark.parametrize("shell", ["dash", "bash"])
@pytest.mark.parametrize("mode", ["3", "1"])
def test_pilot_jobs_see_cvmfs(short_tmp: Path, dist: Path, mode: str, shell: str,
                              policy: str) -> None:
    """set-up -> a job through the wrapper reads /cvmfs and a glidein value, in the
    caller's cgroup and directory -> a SIGKILLed job leaves nothing -> cleanup leaves
    nothing."""
    glidein = short_tmp
    config = make_glidein(glidein, dist, mode, policy)
    done = setup(config)
    assert done.returncode == 0, done.stderr + (glidein / "cvmfsd.log").read_text()
    got = values(config)
    assert (got["CVMFSD_STATUS"], got["GWMS_CVMFSEXEC_MODE"], got["GWMS_IS_CVMFS"]) == (
        "ready", mode, "yes")
    wrapper = compose(glidein)
    execute = glidein / "execute"
    target = f"/cvmfs/{REPO_A}" if mode == "3" else f'"$CVMFS_MOUNT_DIR/{REPO_A}"'
    job = (f'cat {target}/hello.txt; "$CVMFSCTL" get GLIDEIN_Site; pwd; '
           "cat /proc/self/cgroup")
    ran = subprocess.run([shell, str(wrapper), "sh", "-c", job], capture_output=True,
                         text=True, timeout=60, check=False, cwd=execute, env=job_env(glidein))
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    sees = "hello.txt" if mode == "3" else "mount dir " + got["CVMFS_MOUNT_DIR"]
    assert lines[0].startswith("singularity wrapper sees:") and sees in lines[0], lines[0]
    assert lines[1:4] == ["hello from repo.a", "Pilot Test Site", str(execute)]
    assert lines[4:] == Path("/proc/self/cgroup").read_text().splitlines()

    # A hard-killed job wrapper: nothing of the job stays (inside the namespace or not).
    sleeper = ["sleep", "6031"]
    process = subprocess.Popen([shell, str(wrapper), "sh", "-c", "echo started; exec sleep 6031"],
                               stdout=subprocess.PIPE, text=True, cwd=execute,
                               env=job_env(glidein))
    try:
        assert process.stdout is not None
        while (line := process.stdout.readline()) and line != "started\n":
            pass
        assert line == "started\n"
        wait_for(lambda: bool(processes_with_argv(sleeper)), timeout=10)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        wait_for(lambda: not processes_with_argv(sleeper), timeout=5)
    finally:
        reap(process)

    # The startd cron's ClassAd lines.
    ad = subprocess.run(["sh", CLASSAD, str(config)], capture_output=True, text=True,
                        timeout=30, check=True).stdout
    assert "HAS_CVMFS_repo_a = True" in ad and "HAS_CVMFS_CVMFSD = True" in ad, ad

    finished = cleanup(config)
    assert finished.returncode == 0, finished.stderr
    assert calls(config)[-1][:2] == ["-ok", "cvmfsd_cleanup.sh"]
    assert not mounts_under(dist)
    wait_for(lambda: not cvmfs2_pids(dist), timeout=5)
