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
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfsd import janitor, launch, procevents
from tests.conftest import REPO_A, cvmfs2_pids, mounts_under, reap, wait_for
from tests.test_faults import MARKER, cmdline, zombies_of
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
    try:
        wait_for(settled, timeout=5)
    except pytest.fail.Exception:
        process.kill()
        pytest.fail(f"zombies {zombies_of(process.pid)}, alive {_alive_below(process.pid)}; "
                    f"cvmfsd said:\n{process.communicate()[1][-3000:]}")
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert f"source={source}" in err, err[-3000:]


def _leads(zombie: str) -> bool:
    """Whether the zombie named ``"PID (comm)"`` leads its own process group."""
    stat = procevents.read_stat(int(zombie.split(maxsplit=1)[0]))
    return stat is not None and stat.pgid == int(zombie.split(maxsplit=1)[0])


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
