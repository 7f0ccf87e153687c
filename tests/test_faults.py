"""Fault injection: SIGKILL any process of cvmfsd's tree, at random moments; nothing may leak.

Each trial starts ``cvmfsd run`` on the simulated distribution, kills one
target with SIGKILL during the mounts, while the payload runs, or while
cvmfsd is shutting down, lets cvmfsd finish (or stops it), and then asserts
that no mount under the distribution and no process of the tree remains,
and that cvmfsd's exit status says what happened.  Moments are random, from
a seed printed on failure; trials are repeated.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from cvmfsd import launch
from cvmfsd.sim import stratum
from tests.conftest import REPO_A, REPO_B, cvmfs2_pids, mounts_under, wait_for

pytestmark = pytest.mark.fuse

MARKER = "6173"  # the payload is `sleep 6173`: easy to find, never ours by accident
REPEATS = 2


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def tree(root: int) -> list[int]:
    return [pid for pid in launch.descendants(root) if launch.is_running(pid)]


def leftovers(dist: Path) -> list[str]:
    """Processes of a trial still alive anywhere on the machine, and mounts under dist."""
    found = [f"mount {m}" for m in mounts_under(dist)]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not launch.is_running(int(entry.name)):
            continue
        argv = cmdline(int(entry.name))
        text = " ".join(argv)
        # the trial's own: naming its distribution, or its payload (`sleep MARKER`, also
        # the tail of the shim's command line) -- not other runs on the machine
        if str(dist) in text or MARKER in argv:
            found.append(f"process {entry.name}: {text[:120]}")
    return found


Finder = Callable[[int], "int | None"]


def first(predicate: Callable[[int, list[str]], bool]) -> Finder:
    def find(root: int) -> int | None:
        for pid in tree(root):
            if predicate(pid, cmdline(pid)):
                return pid
        return None
    return find


TARGETS: dict[str, Finder] = {
    "payload": first(lambda pid, argv: argv == ["sleep", MARKER]),
    "shim": first(lambda pid, argv: "cvmfsd.shim" in argv),
    "namespace-init": first(lambda pid, argv: launch.is_namespace_init(pid)),
    "cvmfsexec": first(lambda pid, argv: len(argv) > 1 and argv[1].endswith("/cvmfsexec")),
    "unshare": first(lambda pid, argv: argv[:1] == ["unshare"]),
    "cvmfs2": first(lambda pid, argv: "cvmfsd.sim.cvmfs2" in argv),
    # the one still mounting when the mounts are faulted with a delay on repo.b: a
    # cvmfs2 of a repository already mounted (or the cache manager) may die without
    # failing the others, and the run then goes on, rightly
    "cvmfs2-mounting": first(lambda pid, argv: "cvmfsd.sim.cvmfs2" in argv
                             and argv[-1].endswith(f"/{REPO_B}")),
}
# Killing these ends the payload, so cvmfsd ends by itself; the others need a stop.
ENDS_THE_RUN = {"payload", "shim", "namespace-init", "cvmfsexec", "unshare"}


def start(dist: Path, mode: str) -> subprocess.Popen[str]:
    # required: a failed start ends cvmfsd instead of running the payload
    # without CVMFS (which is what preferred would do, and is tested elsewhere).
    config = dist.parent / "glidein_config"
    config.write_text("GLIDEIN_CVMFS required\n")
    return subprocess.Popen(
        [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist), "--mode", mode,
         "--glidein-config", str(config), "--grace", "1", "--repos", f"{REPO_A},{REPO_B}",
         "--", "sleep", MARKER],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def no_leftovers(dist: Path, err: str) -> None:
    """Wait until nothing of the trial is left; fail with what is, and cvmfsd's log."""
    try:
        wait_for(lambda: not leftovers(dist), timeout=5)
    except pytest.fail.Exception:
        pytest.fail(f"left behind: {leftovers(dist)}\ncvmfsd said:\n{err[-3000:]}")


def finish(process: subprocess.Popen[str], *, stop: bool) -> tuple[int, str]:
    if stop:
        process.send_signal(signal.SIGTERM)
    try:
        _out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        try:
            _out, err = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            err = "(stderr still held open by a leftover process)"
        pytest.fail(f"cvmfsd did not finish: {err[-2000:]}")
    return process.returncode, err


def wait_target(process: subprocess.Popen[str], name: str) -> int:
    found: list[int] = []

    def look() -> bool:
        pid = TARGETS[name](process.pid)
        found[:] = [pid] if pid else []
        return bool(found)

    wait_for(look, timeout=30, interval=0.005)
    return found[0]


def ready(dist: Path) -> bool:
    return (len(cvmfs2_pids(dist)) >= 3 and TARGETS["payload"](0) is None) or False


@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_kill_while_the_payload_runs(dist: Path, target: str, repeat: int) -> None:
    """Mode 3, payload running: any SIGKILL leaves nothing behind; the status says so."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    process = start(dist, "3")
    wait_target(process, "payload")
    time.sleep(rng.uniform(0, 0.3))
    os.kill(wait_target(process, target), signal.SIGKILL)
    status, err = finish(process, stop=target not in ENDS_THE_RUN)
    no_leftovers(dist, err)
    assert status != 0, f"seed {seed}: {err[-2000:]}"
    if target == "payload":
        assert status == 128 + signal.SIGKILL, f"seed {seed}"
        assert "payload exited" in err and "status=137" in err


@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize("target", ["cvmfsexec", "unshare", "namespace-init", "cvmfs2-mounting"])
def test_kill_during_the_mounts(dist: Path, stratum_dir: Path, target: str, repeat: int) -> None:
    """Mode 3, while repositories are mounting: cvmfsd fails cleanly, nothing leaks."""
    stratum.set_faults(stratum_dir, REPO_B, mount_delay=1.0)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    process = start(dist, "3")
    time.sleep(rng.uniform(0, 0.4))
    # A target can end by itself just as it is found (the cvmfs2 loader exits
    # once its daemon runs): look again until a kill lands.
    for _ in range(50):
        try:
            os.kill(wait_target(process, target), signal.SIGKILL)
            break
        except ProcessLookupError:
            continue
    status, err = finish(process, stop=False)
    no_leftovers(dist, err)
    assert status != 0, f"seed {seed}: {err[-2000:]}"
    assert "payload exited" not in err, f"seed {seed}"


def zombies_of(pid: int) -> list[str]:
    """The zombie children of ``pid``, with their names."""
    found = []
    for child in launch.descendants(pid):
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            continue
        if launch.parent_pid(child) == pid and stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
            found.append(f"{child} ({stat[stat.find('(') + 1:stat.rfind(')')]})")
    return found


def kill_in_tree(process: subprocess.Popen[str], target: str,
                 spare: Sequence[str] = ()) -> list[str]:
    """SIGKILL the first ``target`` below cvmfsd whose command line is not ``spare``;
    the command line it had.

    ``unshare`` means cvmfsexec's own, not the probe's ``unshare -rm python -c``;
    ``cvmfsexec`` a child of cvmfsd's, not one of its subshells (same command line),
    which a killed attempt leaves to cvmfsd (a subreaper), and which may fork more.
    An attempt's command lines differ from the last one's (the shim's descriptors).
    """
    find = first(lambda pid, argv: argv != list(spare) and (
        argv[:1] == ["unshare"] and any("ns-root" in a for a in argv) if target == "unshare"
        else len(argv) > 1 and argv[1].endswith("/cvmfsexec")
        and launch.parent_pid(pid) == process.pid))
    victim: list[int] = []
    said: list[str] = []

    def seen() -> bool:
        pid = find(process.pid)
        victim[:] = [pid] if pid else []
        said[:] = cmdline(pid) if pid else []
        return bool(victim and said)

    wait_for(seen, timeout=30, interval=0.005)
    os.kill(victim[0], signal.SIGKILL)
    return said


def start_preferred(dist: Path) -> subprocess.Popen[str]:
    config = dist.parent / "glidein_config"
    config.write_text("GLIDEIN_CVMFS preferred\n")
    return subprocess.Popen(
        [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist), "--mode", "3",
         "--glidein-config", str(config), "--grace", "1", "--repos", f"{REPO_A},{REPO_B}",
         "--", "sleep", MARKER],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def payload_started(process: subprocess.Popen[str]) -> None:
    try:
        wait_for(lambda: TARGETS["payload"](process.pid) is not None, timeout=30)
    except pytest.fail.Exception:
        process.kill()
        pytest.fail(f"the payload did not start: {process.communicate()[1][-3000:]}")


@pytest.mark.parametrize("target", ["cvmfsexec", "unshare"])
def test_a_killed_mount_attempt_is_tried_once_more(dist: Path, stratum_dir: Path,
                                                   target: str) -> None:
    """cvmfsexec (or its unshare) SIGKILLed while mounting: tried once more, and the
    payload gets CVMFS; what was adopted is reaped (no zombie), one cvmfsexec left."""
    stratum.set_faults(stratum_dir, REPO_B, mount_delay=1.0)
    process = start_preferred(dist)
    try:
        kill_in_tree(process, target)
        payload_started(process)
        wait_for(lambda: not zombies_of(process.pid), timeout=5)
        names = [" ".join(cmdline(pid)) for pid in tree(process.pid)]
        assert len([n for n in names if "/cvmfsexec " in n]) == 1, names
    finally:
        _status, err = finish(process, stop=True)
    assert "the mount attempt was killed; trying once more" in err, err[-3000:]
    assert "ready: repo.a" in err and "continuing without CVMFS" not in err
    no_leftovers(dist, err)


def test_killed_twice_under_preferred_goes_on_without_cvmfs(dist: Path,
                                                           stratum_dir: Path) -> None:
    """The second attempt killed too: the payload runs without CVMFS, nothing is left."""
    stratum.set_faults(stratum_dir, REPO_B, mount_delay=1.0)
    process = start_preferred(dist)
    try:
        killed = kill_in_tree(process, "cvmfsexec")
        # the retry's cvmfsexec: not one of the first attempt's subshells (same argv)
        kill_in_tree(process, "cvmfsexec", spare=killed)
        payload_started(process)
        names = [" ".join(cmdline(pid)) for pid in tree(process.pid)]
        assert not [n for n in names
                    if "/cvmfsexec " in n or n.startswith("unshare -rm -pf")], names
    finally:
        _status, err = finish(process, stop=True)
    assert err.count("trying once more") == 1
    assert "continuing without CVMFS" in err
    no_leftovers(dist, err)


@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize("target", ["payload", "namespace-init", "cvmfs2"])
def test_kill_during_shutdown(dist: Path, target: str, repeat: int) -> None:
    """Mode 3, just after SIGTERM to cvmfsd: a kill in the middle of the stop leaks nothing."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    process = start(dist, "3")
    pid = wait_target(process, "payload") if target == "payload" else None
    pid = pid or wait_target(process, target)
    wait_target(process, "payload")
    process.send_signal(signal.SIGTERM)
    time.sleep(rng.uniform(0, 0.2))
    with contextlib.suppress(ProcessLookupError):  # the stop may have been quicker
        os.kill(pid, signal.SIGKILL)
    status, err = finish(process, stop=False)
    no_leftovers(dist, err)
    assert status != 0, f"seed {seed}: {err[-2000:]}"


@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize("target", ["payload", "cvmfs2"])
def test_mode1_kills(dist: Path, target: str, repeat: int) -> None:
    """Mode 1: killing the payload or a cvmfs2 leaves no host mount behind."""
    process = start(dist, "1")
    wait_target(process, "payload")
    os.kill(wait_target(process, target), signal.SIGKILL)
    status, err = finish(process, stop=target != "payload")
    no_leftovers(dist, err)
    assert status != 0 if target == "payload" else status in (0, 128 + signal.SIGTERM), err
