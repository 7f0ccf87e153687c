"""The GlideinWMS custom scripts: start cvmfsd for the pilot, report, stop it."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from cvmfsd import glidein
from cvmfsd.sim import stratum
from tests.conftest import REPO_A, cvmfs2_pids, mounts_under, wait_for

pytestmark = pytest.mark.fuse

SCRIPTS = resources.files("cvmfsd.glidein_scripts")


def script(name: str) -> str:
    return str(SCRIPTS.joinpath(name))


@pytest.fixture(name="pilot")
def _pilot(short_tmp: Path, dist: Path) -> Path:
    """A glidein_config as a pilot would have it, with a recording error_gen."""
    error_gen = short_tmp / "error_gen"
    error_gen.write_text(f'#!/bin/sh\necho "$@" >>{short_tmp}/error_gen.calls\n')
    error_gen.chmod(0o755)
    config = short_tmp / "glidein_config"
    cvmfsd = Path(sys.executable).parent / "cvmfsd"
    config.write_text(
        f"ERROR_GEN_PATH {error_gen}\nGLIDEIN_WORK_DIR {short_tmp}\nCVMFSD_BIN {cvmfsd}\n"
        f"CVMFSEXEC_DIR {dist}\nGLIDEIN_CVMFS_REPOS {REPO_A}\nGLIDEIN_CVMFS required\n"
        "CVMFSD_SETUP_TIMEOUT 60\n")
    return config


def calls(pilot: Path) -> list[str]:
    path = pilot.parent / "error_gen.calls"
    return path.read_text().splitlines() if path.exists() else []


def test_setup_then_cleanup(pilot: Path, dist: Path) -> None:
    """setup reports -ok once CVMFS is ready; cleanup stops cvmfsd and the mounts go."""
    setup = subprocess.run([script("cvmfsd_setup.sh"), str(pilot), "entry"],
                           capture_output=True, text=True, timeout=90, check=False)
    assert setup.returncode == 0, setup.stderr + (pilot.parent / "cvmfsd.log").read_text()
    assert calls(pilot)[-1].startswith("-ok cvmfsd_setup.sh cvmfsd_pid ")
    values = glidein.read_glidein_config(pilot).values
    assert (values["CVMFSD_STATUS"], values["GWMS_CVMFSEXEC_MODE"]) == ("ready", "3")
    assert cvmfs2_pids(dist), "the namespace holds the mounts while the pilot runs"

    cleanup = subprocess.run([script("cvmfsd_cleanup.sh"), str(pilot)], capture_output=True,
                             text=True, timeout=90, check=False)
    assert cleanup.returncode == 0, cleanup.stderr
    assert calls(pilot)[-1] == "-ok cvmfsd_cleanup.sh"
    wait_for(lambda: not cvmfs2_pids(dist))
    assert not mounts_under(dist)


def test_setup_reports_a_required_failure(pilot: Path, stratum_dir: Path) -> None:
    """A mount failure under 'required' is an error_gen -error of category WN_Resource."""
    stratum.set_faults(stratum_dir, REPO_A, mount_fail=9)
    setup = subprocess.run([script("cvmfsd_setup.sh"), str(pilot), "entry"],
                           capture_output=True, text=True, timeout=90, check=False)
    assert setup.returncode == 1
    last = calls(pilot)[-1]
    assert last.startswith("-error cvmfsd_setup.sh WN_Resource cvmfsd could not provide CVMFS")
    assert "cache_dir (9)" in last
    assert glidein.read_glidein_config(pilot).values["CVMFSD_STATUS"] == "failed"
