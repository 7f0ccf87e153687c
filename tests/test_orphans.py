"""Orphans, with either process-event source: none stays a zombie, none escapes the janitor.

cvmfsd is a child subreaper.  Each test runs once with the netlink source and
once with the pidfd source (forced with ``CVMFSD_PROCEVENTS_PIDFD=1``), the
one an unprivileged pilot gets before Linux 6.6 (EL9): there cvmfsd has no
fork events and learns its tree by looking at it (issue #14 items 3 and 6).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmfsd import janitor, launch, procevents
from cvmfsd.sim import stratum
from tests.conftest import REPO_A, REPO_B, cvmfs2_pids, mounts_under, reap, wait_for
from tests.test_faults import MARKER, cmdline, first, zombies_of
from tests.test_procevents import connector_allowed

SOURCES = ["pidfd", pytest.param("netlink", marks=pytest.mark.skipif(
    not connector_allowed(), reason="netlink needs root before Linux 6.6"))]


def _env(source: str, **more: str) -> dict[str, str]:
    env = {**os.environ, **more}
    env.pop(procevents.FORCE_PIDFD, None)
    if source == "pidfd":
        env[procevents.FORCE_PIDFD] = "1"
    return env


def _alive_below(pid: int) -> list[str]:
    return [" ".join(cmdline(p)) for p in launch.descendants(pid) if launch.is_running(p)]


# --- item 3: adopted orphans are reaped -----------------------------------------------

@pytest.fixture(name="cvmfsd_runs")
def _cvmfsd_runs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        reap(process)


# The payload leaves orphans that end a moment later: a background job of a shell that
# exits, one of a subshell, one in a session of its own.  cvmfsd (a subreaper) adopts
# them; nothing waits for them.  First a second's wait: the connector's subscription
# comes ~0.2 s after the payload's start (before it, netlink knows no more than pidfd).
ORPHANS = ("sleep 1; sh -c 'sleep 0.3 & exit 0'; (sleep 0.5 &); "
           "setsid -f sleep 0.4; exec sleep " + MARKER)


@pytest.mark.parametrize("source", SOURCES)
def test_the_payloads_orphans_are_reaped(source: str,
                                         cvmfsd_runs: list[subprocess.Popen[str]]) -> None:
    """Orphans of the payload that end are reaped at once: no zombie below cvmfsd, only
    its janitor and the payload left (with the pidfd source, not one that leads a session
    of its own and was never seen deeper in the tree: ``setsid -f`` here)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cvmfsd", "run", "--", "sh", "-c", ORPHANS],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=_env(source, GLIDEIN_CVMFS="never"))
    cvmfsd_runs.append(process)

    def settled() -> bool:
        alive = _alive_below(process.pid)
        zombies = [z for z in zombies_of(process.pid)
                   if source == "netlink" or "(sleep)" not in z or not _leads(z)]
        return (not zombies and len(alive) == 2 and f"sleep {MARKER}" in alive
                and any("cvmfsd.janitor" in a for a in alive))

    time.sleep(1.6)  # every orphan has ended
    _settled_or_fail(process, settled, timeout=5)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert f"source={source}" in err, err[-3000:]


def _settled_or_fail(process: subprocess.Popen[str], settled: Callable[[], bool], *,
                     timeout: float) -> None:
    """Wait until ``settled()``; else fail with the zombies, what is alive, and cvmfsd's log."""
    try:
        wait_for(settled, timeout=timeout)
    except pytest.fail.Exception:
        process.kill()
        pytest.fail(f"zombies {zombies_of(process.pid)}, alive {_alive_below(process.pid)}; "
                    f"cvmfsd said:\n{process.communicate()[1][-3000:]}")


def _start_preferred(dist: Path, stratum_dir: Path, *payload: str,
                     env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``cvmfsd run`` in mode 3 under preferred, repo.b's mount 1 s long (a window to kill
    in); its glidein_config is ``dist.parent / "glidein_config"``."""
    stratum.set_faults(stratum_dir, REPO_B, mount_delay=1.0)
    config = dist.parent / "glidein_config"
    config.write_text("GLIDEIN_CVMFS preferred\n")
    return subprocess.Popen(
        [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist), "--mode", "3",
         "--glidein-config", str(config), "--grace", "1", "--repos", f"{REPO_A},{REPO_B}",
         "--", *payload],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=env)


def _leads(zombie: str) -> bool:
    """Whether the zombie named ``"PID (comm)"`` leads its own process group."""
    stat = procevents.read_stat(int(zombie.split(maxsplit=1)[0]))
    return stat is not None and stat.pgid == int(zombie.split(maxsplit=1)[0])


def _kill_cvmfsexec_after_its_namespace(process: subprocess.Popen[str],
                                        spare: list[int]) -> list[int]:
    """Once namespace PID 1 exists below cvmfsexec, and cvmfsd had time to learn it
    (its search backs off to 0.2 s), SIGKILL that cvmfsexec (none of ``spare``); its
    pid and those of its descendants then (its subshells have its command line)."""
    found: list[int] = []

    def cvmfsexec_with_namespace() -> bool:
        find = first(lambda pid, argv: pid not in spare and len(argv) > 1
                     and argv[1].endswith("/cvmfsexec")
                     and launch.parent_pid(pid) == process.pid)  # not one of its subshells
        pid = find(process.pid)
        found[:] = [pid] if pid and any(
            launch.is_namespace_init(p) for p in launch.descendants(pid)) else []
        return bool(found)

    wait_for(cvmfsexec_with_namespace, timeout=30, interval=0.005)
    time.sleep(0.4)  # repo.b takes 1 s: still mounting
    below = launch.descendants(found[0])
    os.kill(found[0], signal.SIGKILL)
    return [found[0], *below]


@pytest.mark.fuse
@pytest.mark.parametrize("source", SOURCES)
def test_a_mount_killed_twice_leaves_no_zombie(dist: Path, stratum_dir: Path, source: str,
                                               cvmfsd_runs: list[subprocess.Popen[str]],
                                               ) -> None:
    """Under preferred, cvmfsexec SIGKILLed mid-mount (its unshare adopted by cvmfsd), and
    its retry too: the payload runs without CVMFS, and below cvmfsd only its janitor and
    the payload remain, no zombie (issue #14 item 3, its check)."""
    process = _start_preferred(dist, stratum_dir, "sleep", MARKER, env=_env(source))
    cvmfsd_runs.append(process)
    config = dist.parent / "glidein_config"
    # Killed while cvmfsd waits for the shim before its event loop (cvmfsd.prepare):
    # the namespace it leaves is ended there, its unshare adopted and reaped.
    wait_for(lambda: "CVMFSD_STATUS mounting" in config.read_text(), timeout=30)
    _kill_cvmfsexec_after_its_namespace(
        process, _kill_cvmfsexec_after_its_namespace(process, []))

    def only_janitor_and_payload() -> bool:
        alive = _alive_below(process.pid)
        return (not zombies_of(process.pid) and len(alive) == 2
                and f"sleep {MARKER}" in alive and any("cvmfsd.janitor" in a for a in alive))

    _settled_or_fail(process, only_janitor_and_payload, timeout=10)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert "continuing without CVMFS" in err and f"source={source}" in err, err[-3000:]
    assert not mounts_under(dist) and not cvmfs2_pids(dist)


@pytest.mark.fuse
def test_a_mount_killed_once_after_its_namespace_is_tried_once_more(
        dist: Path, stratum_dir: Path, cvmfsd_runs: list[subprocess.Popen[str]]) -> None:
    """cvmfsexec SIGKILLed mid-mount once its namespace exists, while cvmfsd waits for the
    shim before its event loop: the namespace left behind is ended before it can run the
    payload, the attempt is tried once more (issue #14 item 4), and the payload gets
    CVMFS from the second one; no zombie."""
    process = _start_preferred(dist, stratum_dir, "sh", "-c",
                               f"cat /cvmfs/{REPO_B}/data.csv >/dev/null && exec sleep {MARKER}")
    cvmfsd_runs.append(process)
    config = dist.parent / "glidein_config"
    wait_for(lambda: "CVMFSD_STATUS mounting" in config.read_text(), timeout=30)
    _kill_cvmfsexec_after_its_namespace(process, [])
    wait_for(lambda: f"sleep {MARKER}" in _alive_below(process.pid)  # after its cat
             and not zombies_of(process.pid), timeout=30)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert err.count("trying once more") == 1, err[-3000:]
    assert "continuing without CVMFS" not in err, err[-3000:]
    assert not mounts_under(dist) and not cvmfs2_pids(dist)


# --- item 6: the janitor knows the payload by what cvmfsd sees --------------------------

# Out of the payload's session and TMPDIR, double-forked: setsid -f forks a shell in a
# new session with TMPDIR=/, which forks the sleeper and exits.  Neither the marker nor
# a session led by a marked process reaches the sleeper.
ESCAPE = ('env TMPDIR=/ setsid -f sh -c \'sleep 6021 & echo "$!" > "$0"\' "$PIDFILE"; '
          "exec sleep 6020")


def _sleeper(pidfile: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(pidfile.read_text())
    return None


@pytest.mark.fuse
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("mode", ["1", "none"])
def test_an_escaped_payload_process_dies_with_a_sigkilled_cvmfsd(
        short_tmp: Path, stratum_dir: Path, mode: str, source: str,
        cvmfsd_runs: list[subprocess.Popen[str]]) -> None:
    """cvmfsd SIGKILLed: a process the payload double-forked into a new session with
    another TMPDIR is killed by the janitor all the same (mode 1; and with no
    distribution, as with the host's /cvmfs)."""
    from cvmfsd.sim import makedist

    pidfile = short_tmp / "sleeper.pid"
    if mode == "1":
        dist = makedist.make_dist(short_tmp / "d", stratum=stratum_dir)
        where = ["--dist", str(dist), "--mode", "1", "--repos", REPO_A]
        policy = "required"
    else:
        dist, where, policy = None, [], "never"
    process = subprocess.Popen(
        [sys.executable, "-m", "cvmfsd", "run", *where, "--", "sh", "-c", ESCAPE],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=_env(source, GLIDEIN_CVMFS=policy, PIDFILE=str(pidfile)))
    cvmfsd_runs.append(process)
    sleeper = None
    try:
        wait_for(lambda: _sleeper(pidfile) is not None
                 and launch.parent_pid(_sleeper(pidfile) or 0) == process.pid, timeout=30)
        sleeper = _sleeper(pidfile)
        assert sleeper is not None
        start = janitor.process_start(sleeper)
        time.sleep(0.5)  # cvmfsd tells its janitor within TELL_INTERVAL (0.1 s)
        process.kill()
        process.wait()
        wait_for(lambda: janitor.process_start(sleeper) != start, timeout=5)
        if dist is not None:
            janitor_log = dist / "log" / "janitor.log"
            wait_for(lambda: "clean-up complete" in janitor_log.read_text(), timeout=10)
            log = janitor_log.read_text()
            killed = re.search(r"killed the payload: SIGSTOP, SIGKILL to pids \[([\d, ]*)\]", log)
            assert killed is not None and str(sleeper) in killed[1].split(", "), log
            wait_for(lambda: not mounts_under(dist) and not cvmfs2_pids(dist), timeout=5)
    finally:
        if sleeper is not None and (janitor.process_start(sleeper) or 0) > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(sleeper, signal.SIGKILL)
