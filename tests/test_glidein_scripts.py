"""The GlideinWMS scripts: start cvmfsd for the glidein, report, stop it at exit.

The glidein here is a directory as glidein_startup.sh makes it: glidein_config
with ERROR_GEN_PATH, ADD_CONFIG_LINE_SOURCE, CONDOR_VARS_FILE and WRAPPER_LIST
(glidein_startup.sh:1847-1909), an error_gen that records its calls, and a
stand-in for add_config_line.source with the documented behaviour of
gconfig_add and add_condor_vars_line (drop the key's lines, append one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from cvmfsd import glidein, launch
from cvmfsd.errors import PolicyError
from cvmfsd.glidein import Policy, resolve_policy
from cvmfsd.sim import stratum
from tests.conftest import REPO_A, cvmfs2_pids, mounts_under, wait_for

SCRIPTS = resources.files("cvmfsd.glidein_scripts")
CVMFSD = Path(sys.executable).parent / "cvmfsd"

ADD_CONFIG_LINE = """
gconfig_add() {
    { grep -v "^$1 " "$glidein_config"; echo "$1 $2"; } >"$glidein_config.new"
    mv "$glidein_config.new" "$glidein_config"
}
add_condor_vars_line() {
    { grep -v "^$1\\b" "$condor_vars_file"; echo "$@"; } >"$condor_vars_file.new"
    mv "$condor_vars_file.new" "$condor_vars_file"
}
"""


def script(name: str) -> str:
    return str(SCRIPTS.joinpath(name))


def make_pilot(where: Path, attributes: str, *, cvmfsd: Path = CVMFSD,
               wrapped: bool = True) -> Path:
    """A glidein directory with its glidein_config; returns the glidein_config."""
    error_gen = where / "error_gen"
    error_gen.write_text(f'#!/bin/sh\nprintf "%s|" "$@" >>{where}/error_gen.calls\n'
                         f'echo >>{where}/error_gen.calls\n')
    error_gen.chmod(0o755)
    (where / "add_config_line.source").write_text(ADD_CONFIG_LINE)
    (where / "condor_vars.lst").write_text("GLIDEIN_Site S - + N Y -\n")
    wrappers = ["/g/main/singularity_wrapper.sh"]
    if wrapped:
        wrappers.insert(0, f"{where}/entry/cvmfsd_job_wrapper.sh")
    (where / "wrapper_list.lst").write_text("".join(w + "\n" for w in wrappers))
    config = where / "glidein_config"
    config.write_text(
        f"ERROR_GEN_PATH {error_gen}\nGLIDEIN_WORK_DIR {where}\n"
        f"ADD_CONFIG_LINE_SOURCE {where}/add_config_line.source\n"
        f"CONDOR_VARS_FILE {where}/condor_vars.lst\nWRAPPER_LIST {where}/wrapper_list.lst\n"
        f"CVMFSD_BIN {cvmfsd}\nCVMFSD_SETUP_TIMEOUT 60\n{attributes}")
    return config


def calls(pilot: Path) -> list[list[str]]:
    """error_gen's calls, each as its arguments."""
    path = pilot.parent / "error_gen.calls"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split("|")[:-1] for line in lines]


def setup(pilot: Path) -> subprocess.CompletedProcess[str]:
    """cvmfsd_setup.sh as glidein_startup.sh runs it: relative glidein_config, from its dir."""
    return subprocess.run(["bash", script("cvmfsd_setup.sh"), "glidein_config", "entry"],
                          capture_output=True, text=True, timeout=120, check=False,
                          cwd=pilot.parent, stdin=subprocess.DEVNULL)


def cleanup(pilot: Path) -> subprocess.CompletedProcess[str]:
    """cvmfsd_cleanup.sh as glidein_exit runs it: full path, from the cleanup directory."""
    return subprocess.run(["bash", script("cvmfsd_cleanup.sh"), str(pilot)],
                          capture_output=True, text=True, timeout=120, check=False, cwd="/")


def values(pilot: Path) -> dict[str, str]:
    return dict(glidein.read_glidein_config(pilot).values)


def log_lines(pilot: Path) -> list[str]:
    return (pilot.parent / "cvmfsd.log").read_text().splitlines()


def assert_json_log(pilot: Path) -> None:
    """Every line of cvmfsd's log is a JSON object (--log-format json)."""
    for line in log_lines(pilot):
        assert isinstance(json.loads(line), dict), line


@pytest.fixture(name="pilot")
def _pilot(short_tmp: Path, dist: Path) -> Path:
    return make_pilot(short_tmp, f"CVMFSEXEC_DIR {dist}\nGLIDEIN_CVMFS_REPOS {REPO_A}\n"
                      "GLIDEIN_USE_CVMFS 1\nGLIDEIN_CVMFS_REQUIRE preferred\nCVMFSD_GRACE 7\n"
                      f"CVMFSD_METRICS_TEXTFILE {short_tmp}/cvmfsd.prom\n")


def _holder(pid: int) -> bool:
    try:
        return b"\0cvmfsd-namespace-holder" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.fuse
@pytest.mark.parametrize("what", ["directory", "missing", "none"])
def test_cleanup_without_a_glidein_config_says_so(tmp_path: Path, what: str) -> None:
    """Given the glidein's directory, a missing file or nothing, cleanup cannot know whether
    a cvmfsd runs: an error naming what it got, not "nothing to stop"."""
    given = {"directory": [str(tmp_path)], "missing": [str(tmp_path / "gone")], "none": []}[what]
    result = subprocess.run(["bash", script("cvmfsd_cleanup.sh"), *given], capture_output=True,
                            text=True, timeout=60, check=False, cwd="/")
    assert result.returncode == 1
    shown = given[0] if given else "(no argument)"
    assert result.stderr == (f"cvmfsd_cleanup.sh: {shown} is not a readable glidein_config; "
                             "expected the file glidein_exit passes as the first argument\n")


def test_setup_then_cleanup(pilot: Path, dist: Path) -> None:
    """Mode 3 with the fragment listed: ready, published to jobs, -ok; cleanup stops it all."""
    done = setup(pilot)
    assert done.returncode == 0, done.stderr + "\n".join(log_lines(pilot))
    got = values(pilot)
    assert (got["CVMFSD_STATUS"], got["GWMS_CVMFSEXEC_MODE"], got["GWMS_IS_CVMFS"],
            got["CVMFS_MOUNT_DIR"], got["CVMFSD_POLICY"]) == ("ready", "3", "yes", "", "required")
    pid = int(got["CVMFSD_PID"])
    assert calls(pilot)[-1] == ["-ok", "cvmfsd_setup.sh", "msg",
                                f"CVMFS ready (cvmfsexec mode 3), cvmfsd pid {pid}",
                                "cvmfsd_pid", str(pid), "mode", "3"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    for flag, value in ((b"--grace", b"7"), (b"--glidein-config", str(pilot).encode()),
                        (b"--metrics-textfile", f"{pilot.parent}/cvmfsd.prom".encode())):
        assert cmdline[cmdline.index(flag) + 1] == value
    wait_for((pilot.parent / "cvmfsd.prom").exists)
    condor_vars = (pilot.parent / "condor_vars.lst").read_text().splitlines()
    for name in ("CVMFSD_SOCKET", "CVMFSCTL", "CVMFS_MOUNT_DIR"):
        assert f"{name} S - + N N +" in condor_vars
    assert got["CVMFSD_LOG"] == f"{pilot.parent}/cvmfsd.log"
    assert any(_holder(p) for p in launch.descendants(pid)), "the payload is the named holder"
    assert cvmfs2_pids(dist), "the namespace holds the mounts while the glidein runs"

    ended = cleanup(pilot)
    assert (ended.returncode, ended.stderr) == (0, ""), ended.stderr
    assert calls(pilot)[-1] == ["-ok", "cvmfsd_cleanup.sh", "msg",
                                f"cvmfsd (pid {pid}) stopped (status stopped)"]
    wait_for(lambda: not cvmfs2_pids(dist))
    assert not mounts_under(dist)
    assert (values(pilot)["GWMS_IS_CVMFS"], Path(got["CVMFSD_SOCKET"]).exists()) == ("no", False)
    assert_json_log(pilot)


@pytest.mark.fuse
@pytest.mark.parametrize("policy", ["required", "preferred"])
def test_mode3_without_the_fragment_is_not_cvmfs_for_jobs(short_tmp: Path, dist: Path,
                                                          policy: str) -> None:
    """Mode 3, fragment not in WRAPPER_LIST: GWMS_IS_CVMFS no; required fails, preferred goes on."""
    pilot = make_pilot(short_tmp, f"CVMFSEXEC_DIR {dist}\nGLIDEIN_CVMFS_REPOS {REPO_A}\n"
                       f"GLIDEIN_CVMFS {policy}\n", wrapped=False)
    done = setup(pilot)
    got = values(pilot)
    assert got["GWMS_IS_CVMFS"] == "no"
    last = calls(pilot)[-1]
    if policy == "required":
        assert done.returncode == 1
        assert last[:3] == ["-error", "cvmfsd_setup.sh", "Config"]
        assert "cvmfsd_job_wrapper.sh is not in WRAPPER_LIST" in last[3]
        assert got["CVMFSD_STATUS"] == "stopped"
        wait_for(lambda: not cvmfs2_pids(dist))
    else:
        assert done.returncode == 0, done.stderr
        assert last[3].startswith("continuing without CVMFS for the jobs")
        assert cleanup(pilot).returncode == 0
        wait_for(lambda: not cvmfs2_pids(dist))


@pytest.mark.fuse
def test_setup_reports_a_required_failure(short_tmp: Path, dist: Path,
                                          stratum_dir: Path) -> None:
    """A mount failure under required: error_gen gets cvmfsd's message and hint, not JSON."""
    pilot = make_pilot(short_tmp, f"CVMFSEXEC_DIR {dist}\nGLIDEIN_CVMFS_REPOS {REPO_A}\n"
                       "GLIDEIN_CVMFS required\n")
    stratum.set_faults(stratum_dir, REPO_A, mount_fail=9)
    done = setup(pilot)
    assert done.returncode == 1
    kind, name, category, detail, *_ = calls(pilot)[-1]
    assert (kind, name, category) == ("-error", "cvmfsd_setup.sh", "WN_Resource")
    assert detail.startswith("cvmfsd could not provide CVMFS (exit 69): ")
    assert "cache_dir (9)" in detail
    assert "{" not in detail, "the human message, not a JSON log line"
    got = values(pilot)
    assert (got["CVMFSD_STATUS"], got["GWMS_IS_CVMFS"]) == ("failed", "no")
    assert got["CVMFSD_ERROR"] in detail
    assert f"log: {pilot.parent}/cvmfsd.log" in detail
    assert_json_log(pilot)
    ended = cleanup(pilot)  # glidein_exit runs it after a failed set-up too
    assert ended.returncode == 1
    assert calls(pilot)[-1][3].startswith(f"cvmfsd (pid {got['CVMFSD_PID']}) failed during")


def test_an_error_before_the_daemon_reaches_error_gen_and_the_log_is_json(short_tmp: Path) -> None:
    """A distribution that is not one: cvmfsd's error and hint reach error_gen; JSON lines."""
    pilot = make_pilot(short_tmp, f"CVMFSEXEC_DIR {short_tmp}/nothing\n"
                       f"GLIDEIN_CVMFS_REPOS {REPO_A}\nGLIDEIN_CVMFS required\nCVMFSD_MODE 3\n")
    done = setup(pilot)
    assert done.returncode == 1, done.stderr
    detail = calls(pilot)[-1][3]
    got = values(pilot)
    assert got["CVMFSD_STATUS"] == "failed" and got["CVMFSD_ERROR"]
    assert f"{got['CVMFSD_ERROR']}; hint: {got['CVMFSD_HINT']}" in detail
    assert_json_log(pilot)
    assert json.loads(log_lines(pilot)[-1])["error"] == got["CVMFSD_ERROR"]


def test_empty_repository_list_is_an_error(short_tmp: Path) -> None:
    """No repository: a Config error naming GLIDEIN_CVMFS_REPOS; cvmfsd is not started."""
    pilot = make_pilot(short_tmp, "GLIDEIN_CVMFS_REPOS  : \nGLIDEIN_USE_CVMFS 1\n")
    done = setup(pilot)
    assert done.returncode == 1
    assert calls(pilot)[-1] == ["-error", "cvmfsd_setup.sh", "Config",
                                "GLIDEIN_CVMFS_REPOS is empty: no CVMFS repository to provide",
                                "attribute", "GLIDEIN_CVMFS_REPOS"]
    assert "CVMFSD_PID" not in values(pilot)


GATE_CASES = [
    {},
    {"GLIDEIN_USE_CVMFS": "1"},
    {"GLIDEIN_USE_CVMFS": "1", "GLIDEIN_CVMFS_REQUIRE": "never"},
    {"GLIDEIN_USE_CVMFS": "1", "GLIDEIN_CVMFS_REQUIRE": "NEVER"},
    {"GLIDEIN_USE_CVMFS": "0"},
    {"GLIDEIN_USE_CVMFS": "0", "GLIDEIN_CVMFS_REQUIRE": "Preferred"},
    {"GLIDEIN_USE_CVMFS": "0", "GLIDEIN_CVMFS_REQUIRE": "never"},
    {"GLIDEIN_USE_CVMFS": "", "GLIDEIN_CVMFS_REQUIRE": "required"},
    {"GLIDEIN_USE_CVMFS": "yes"},
    {"GLIDEIN_USE_CVMFS": "0", "GLIDEIN_CVMFS_REQUIRE": "always"},
    {"GLIDEIN_USE_CVMFSEXEC": "1", "GLIDEIN_USE_CVMFS": "1"},
    {"GLIDEIN_USE_CVMFSEXEC": "0", "GLIDEIN_CVMFS": "required"},
    {"GLIDEIN_CVMFS": "never"},
    {"GLIDEIN_CVMFS": "maybe"},
]


@pytest.mark.parametrize("attributes", GATE_CASES, ids=lambda a: ",".join(
    f"{k}={v}" for k, v in a.items()) or "none")
def test_policy_gate_agrees_with_cvmfsd(short_tmp: Path, attributes: dict[str, str]) -> None:
    """The script starts cvmfsd exactly when cvmfsd would try; skips are -ok, bad values errors."""
    fake = short_tmp / "fake-cvmfsd"
    fake.write_text(f"#!/bin/sh\ntouch {short_tmp}/started\nexit 3\n")
    fake.chmod(0o755)
    lines = "".join(f"{k} {v}\n" for k, v in attributes.items())
    pilot = make_pilot(short_tmp, f"GLIDEIN_CVMFS_REPOS {REPO_A}\n{lines}", cvmfsd=fake)
    done = setup(pilot)
    started = (short_tmp / "started").exists()
    last = calls(pilot)[-1]
    try:
        decision = resolve_policy(attributes)
    except PolicyError:
        assert (done.returncode, started, last[2]) == (1, False, "Config"), last
        return
    if decision.policy is Policy.NEVER or not attributes:
        assert (done.returncode, started, last[0]) == (0, False, "-ok"), done.stderr
        assert "not started" in last[3]
    else:
        assert started and done.returncode == 1, done.stderr


@pytest.mark.fuse
def test_sigkilled_cvmfsd_is_reported_by_cleanup(pilot: Path, dist: Path) -> None:
    """cvmfsd SIGKILLed: its janitor marks glidein_config; cleanup reports an error, quietly."""
    assert setup(pilot).returncode == 0
    got = values(pilot)
    pid = int(got["CVMFSD_PID"])
    os.kill(pid, signal.SIGKILL)  # our cvmfsd, by pid
    wait_for(lambda: values(pilot).get("CVMFSD_STATUS") == "failed", timeout=10)
    wait_for(lambda: not cvmfs2_pids(dist))
    after = values(pilot)
    assert after["GWMS_IS_CVMFS"] == "no"
    assert not Path(got["CVMFSD_SOCKET"]).exists()
    ended = cleanup(pilot)
    assert (ended.returncode, ended.stderr.count("\n")) == (1, 1), ended.stderr
    kind, name, category, detail, *_ = calls(pilot)[-1]
    assert (kind, name, category) == ("-error", "cvmfsd_cleanup.sh", "WN_Resource")
    assert detail.startswith(f"cvmfsd (pid {pid}) failed during the glidein: cvmfsd (pid {pid}) "
                             "ended without stopping CVMFS")


def test_cleanup_without_cvmfsd(short_tmp: Path) -> None:
    """Never started: -ok.  Gone with a stale 'ready' (janitor killed too): -error, no noise."""
    pilot = make_pilot(short_tmp, "")
    done = cleanup(pilot)
    assert (done.returncode, calls(pilot)[-1][:2]) == (0, ["-ok", "cvmfsd_cleanup.sh"])
    with pilot.open("a") as config:
        config.write("CVMFSD_PID 999999999\nCVMFSD_STATUS ready\n")
    done = cleanup(pilot)
    assert done.returncode == 1
    assert done.stderr.startswith("cvmfsd_cleanup.sh: cvmfsd (pid 999999999) is gone but left "
                                  "CVMFSD_STATUS 'ready'"), done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.fuse
def test_mode1_publishes_the_mount_directory(short_tmp: Path, dist: Path) -> None:
    """Mode 1: the jobs see CVMFS at CVMFS_MOUNT_DIR (no fragment needed); cleanup unmounts."""
    pilot = make_pilot(short_tmp, f"CVMFSEXEC_DIR {dist}\nGLIDEIN_CVMFS_REPOS {REPO_A}\n"
                       "GLIDEIN_CVMFS required\nCVMFSD_MODE 1\n", wrapped=False)
    done = setup(pilot)
    assert done.returncode == 0, done.stderr + "\n".join(log_lines(pilot))
    got = values(pilot)
    assert (got["GWMS_CVMFSEXEC_MODE"], got["GWMS_IS_CVMFS"], got["CVMFS_MOUNT_DIR"]) == (
        "1", "yes", str(dist / "dist/cvmfs"))
    assert (dist / "dist/cvmfs" / REPO_A / "hello.txt").read_text() == "hello from repo.a\n"
    assert cleanup(pilot).returncode == 0
    assert not mounts_under(dist)
    assert_json_log(pilot)
