"""The job-wrapper fragment in a wrapper composed as GlideinWMS composes it, under dash and bash.

condor_startup.sh (glideinWMS efdc530, creation/web_base/condor_startup.sh:151-169)
writes ``#!/bin/sh``, a header that leaves bash's POSIX mode, then every file of
WRAPPER_LIST in order, and at the end (:464-470) ``exec $GLIDEIN_WRAPPER_EXEC``
(by default the job's own command line).  Here a stand-in ``cvmfsctl`` records
how it was called and, for ``enter``, runs the rest as the real one would
(minus the namespace): so these tests pin what the fragment does in each mode;
tests/test_pilot.py does it for real.
"""

from __future__ import annotations

import os
import subprocess
from importlib import resources
from pathlib import Path

import pytest

FRAGMENT = resources.files("cvmfsd.glidein_scripts").joinpath("cvmfsd_job_wrapper.sh")
HEADER = """#!/bin/sh
if [ -n "$BASH_VERSION" ]; then
    set +o posix || echo "WARN: running in POSIX mode"
fi
"""
NEXT = ('echo "next fragment: CVMFS_MOUNT_DIR=${CVMFS_MOUNT_DIR-unset} '
        'entered=${CVMFSD_JOB_ENTERED-no}"\n')
SHELLS = ["dash", "bash"]  # .ci/setup installs both; /bin/sh is one of them on a node


def compose(glidein: Path) -> Path:
    """condor_job_wrapper.sh: header, the fragments of WRAPPER_LIST, exec of the job."""
    wrapper = glidein / "condor_job_wrapper.sh"
    wrapper.write_text(HEADER + FRAGMENT.read_text() + NEXT + '\nexec "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture(name="glidein")
def _glidein(tmp_path: Path) -> Path:
    ctl = tmp_path / "cvmfsctl"
    ctl.write_text(f"""#!/bin/sh
echo "cvmfsctl $*" >>{tmp_path}/ctl.calls
[ -e {tmp_path}/ctl.down ] && exit 1
while [ "$1" != enter ] && [ $# -gt 0 ]; do shift; done
[ "$1" = enter ] || exit 0
shift; [ "$1" = -- ] && shift
exec "$@"
""")
    ctl.chmod(0o755)
    return tmp_path


def configure(glidein: Path, **values: str) -> None:
    lines = [f"CVMFSCTL {glidein / 'cvmfsctl'}", f"CVMFSD_SOCKET {glidein / 'sock'}"]
    lines += [f"{k} {v}" for k, v in values.items()]
    (glidein / "glidein_config").write_text("\n".join(lines) + "\n")


def run_job(glidein: Path, shell: str, *job: str) -> subprocess.CompletedProcess[str]:
    wrapper = compose(glidein)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVMFS", "_CONDOR"))}
    env["_CONDOR_WRAPPER_ERROR_FILE"] = str(glidein / "wrapper_error")
    return subprocess.run([shell, str(wrapper), *job], capture_output=True, text=True,
                          timeout=30, check=False, env=env, cwd=glidein)


def ctl_calls(glidein: Path) -> list[str]:
    path = glidein / "ctl.calls"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("shell", SHELLS)
def test_mode3_reexecutes_the_wrapper_inside_once(glidein: Path, shell: str) -> None:
    """Mode 3: cvmfsctl enter runs the whole wrapper again; the second pass goes on."""
    configure(glidein, GWMS_CVMFSEXEC_MODE="3", CVMFSD_STATUS="ready", CVMFSD_POLICY="required")
    done = run_job(glidein, shell, "sh", "-c", 'echo "job args: $0 $1"', "a b", "c")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "next fragment: CVMFS_MOUNT_DIR=unset entered=1\njob args: a b c\n"
    sock, wrapper = glidein / "sock", glidein / "condor_job_wrapper.sh"
    assert ctl_calls(glidein) == [
        f"cvmfsctl --socket {sock} ping",
        f"cvmfsctl --socket {sock} enter -- /bin/sh {wrapper} sh -c echo \"job args: $0 $1\" "
        "a b c",
    ]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("mode", ["1", "2"])
def test_modes_1_2_export_the_mount_dir(glidein: Path, shell: str, mode: str) -> None:
    """Modes 1/2: CVMFS_MOUNT_DIR for the next fragments and the job; no cvmfsctl."""
    mount_dir = glidein / "dist" / "cvmfs"
    mount_dir.mkdir(parents=True)
    configure(glidein, GWMS_CVMFSEXEC_MODE=mode, CVMFSD_STATUS="ready",
              CVMFS_MOUNT_DIR=str(mount_dir), CVMFSD_POLICY="required")
    done = run_job(glidein, shell, "sh", "-c", 'echo "job sees $CVMFS_MOUNT_DIR"')
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"next fragment: CVMFS_MOUNT_DIR={mount_dir} entered=no\n"
                           f"job sees {mount_dir}\n")
    assert ctl_calls(glidein) == []


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("values", [
    {"GWMS_CVMFSEXEC_MODE": "0", "CVMFSD_STATUS": "ready"},  # the host's /cvmfs
    {"GWMS_CVMFSEXEC_MODE": "0", "CVMFSD_STATUS": "without-cvmfs"},
    {},  # no cvmfsd in this glidein
])
def test_host_or_no_cvmfs_does_nothing(glidein: Path, shell: str, values: dict[str, str],
                                       ) -> None:
    """The host's /cvmfs, or no CVMFS: the fragment is silent and changes nothing."""
    configure(glidein, **values)
    done = run_job(glidein, shell, "true")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "next fragment: CVMFS_MOUNT_DIR=unset entered=no\n"
    assert ctl_calls(glidein) == []


@pytest.mark.parametrize("shell", SHELLS)
def test_cvmfsd_gone_fails_the_job_under_required(glidein: Path, shell: str) -> None:
    """Mode 3, cvmfsd not answering, required: a clear line, the wrapper error file, rc 1."""
    (glidein / "ctl.down").touch()
    configure(glidein, GWMS_CVMFSEXEC_MODE="3", CVMFSD_STATUS="ready", CVMFSD_POLICY="required")
    done = run_job(glidein, shell, "echo", "job ran")
    assert done.returncode == 1
    assert "job ran" not in done.stdout
    assert "cvmfsd does not answer" in done.stderr
    assert "GLIDEIN_CVMFS is required" in (glidein / "wrapper_error").read_text()


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("policy", ["preferred", "optional"])
def test_cvmfsd_gone_runs_the_job_otherwise(glidein: Path, shell: str, policy: str) -> None:
    """Mode 3, cvmfsd not answering, not required: a clear line, then the job runs."""
    (glidein / "ctl.down").touch()
    configure(glidein, GWMS_CVMFSEXEC_MODE="3", CVMFSD_STATUS="ready", CVMFSD_POLICY=policy)
    done = run_job(glidein, shell, "echo", "job ran")
    assert (done.returncode, done.stdout.splitlines()[-1]) == (0, "job ran")
    assert "running without /cvmfs: cvmfsd does not answer" in done.stderr
    assert not (glidein / "wrapper_error").exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_not_ready_in_mode_1_under_required_fails(glidein: Path, shell: str) -> None:
    """Modes 1/2 with cvmfsd failed (the janitor's mark) under required: the job fails."""
    configure(glidein, GWMS_CVMFSEXEC_MODE="1", CVMFSD_STATUS="failed",
              CVMFS_MOUNT_DIR="/nonexistent", CVMFSD_POLICY="required")
    done = run_job(glidein, shell, "echo", "job ran")
    assert done.returncode == 1
    assert "cvmfsd status 'failed'" in done.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_fragment_leaves_no_names_behind(glidein: Path, shell: str) -> None:
    """The fragment shares the wrapper's shell: none of its variables or functions remain."""
    configure(glidein, GWMS_CVMFSEXEC_MODE="0", CVMFSD_STATUS="ready")
    wrapper = compose(glidein)
    text = wrapper.read_text().replace(
        NEXT, 'set | grep -c "^cvmfsd_w" || true\ncommand -v cvmfsd_w_get || echo no-func\n')
    wrapper.write_text(text)
    done = subprocess.run([shell, str(wrapper), "true"], capture_output=True, text=True,
                          timeout=30, check=False, cwd=glidein)
    assert done.stdout.split() == ["0", "no-func"], done.stdout
