"""``cvmfsd run`` end to end on the simulated distribution (real namespaces and FUSE)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvmfsd import glidein
from cvmfsd.sim import stratum
from tests.conftest import (
    REPO_A,
    REPO_B,
    cvmfs2_pids,
    mounts_under,
    processes_with_argv,
    reap,
    wait_for,
)

pytestmark = pytest.mark.fuse

CVMFSD = [sys.executable, "-m", "cvmfsd"]


def cvmfsd_run(dist: Path, *args: str, glidein_config: Path | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    extra = ["--glidein-config", str(glidein_config)] if glidein_config else []
    return subprocess.run(
        [*CVMFSD, "run", "--dist", str(dist), *extra, *args], capture_output=True,
        text=True, check=False, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def while_running(gconfig: Path) -> dict[str, str]:
    """What cvmfsd had written to glidein_config before it recorded its end (.history)."""
    values = dict(glidein.read_glidein_config(gconfig).values)
    assert (values["CVMFSD_STATUS"], values["GWMS_IS_CVMFS"], values["CVMFS_MOUNT_DIR"]) == (
        "stopped", "no", ""), "a finished cvmfsd says nothing provides CVMFS any more"
    history = gconfig.with_name(gconfig.name + ".history").read_text().splitlines()
    for line in history:
        _, key, value = (line + " ").split(" ", 2)
        if (key, value) == ("CVMFSD_STATUS", "stopped "):
            break
        values[key] = value[:-1]
    return values


@pytest.fixture(name="gconfig")
def _gconfig(short_tmp: Path) -> Path:
    path = short_tmp / "glidein_config"
    path.write_text("GLIDEIN_Site Some Site With Spaces\nGLIDEIN_CVMFS required\n"
                    "GLIDEIN_TOKEN_SECRET s3cr3t\n")
    return path


def test_payload_reads_cvmfs_and_its_status_is_returned(dist: Path, gconfig: Path) -> None:
    """mode 3: the payload reads /cvmfs, and its exit status becomes cvmfsd's."""
    result = cvmfsd_run(dist, "--repos", f"{REPO_A},{REPO_B}", "--",
                        "sh", "-c", f"cat /cvmfs/{REPO_A}/hello.txt; exit 7",
                        glidein_config=gconfig)
    assert result.returncode == 7, result.stderr
    assert result.stdout == "hello from repo.a\n"  # mount chatter stays out of it
    assert "mounting 2/3: repo.a" in result.stderr
    values = while_running(gconfig)
    assert values["GWMS_IS_CVMFS"] == "yes"
    assert values["GWMS_CVMFSEXEC_MODE"] == "3"
    assert values["HAS_UNPRIVILEGED_USER_NAMESPACES"] == "enabled"
    assert not mounts_under(dist)


@pytest.mark.parametrize("mode", ["3", "1"])
def test_a_healthy_run_logs_no_warning(dist: Path, gconfig: Path, mode: str) -> None:
    """Mount two repositories, read, exit 0: not one log line at warning level or above.

    The end of the namespace (namespace PID 1 exits, the kernel SIGKILLs every
    cvmfs2 in it, the mounts vanish) is the normal end, not a fault.  In mode 1
    the shared cache manager ends by itself moments after the last unmount: the
    final sweep gives it that moment instead of killing it as a leftover.  A
    pipeline of the payload whose writer dies of SIGPIPE (``yes | head``) is the
    payload's own business, not a process killed from outside.
    """
    where = "/cvmfs" if mode == "3" else "$CVMFS_MOUNT_DIR"
    result = cvmfsd_run(dist, "--mode", mode, "--log-format", "json", "--repos",
                        f"{REPO_A},{REPO_B}", "--", "sh", "-c",
                        f"cat {where}/{REPO_A}/hello.txt {where}/{REPO_B}/data.csv; "
                        "sleep 1; yes | head -n 1 >/dev/null", glidein_config=gconfig)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [r.get("status") for r in records if r.get("event") == "done"] == [0]
    loud = [r for r in records if r.get("level") not in ("debug", "info")]
    assert not loud, loud


def test_the_final_sweep_lets_a_cache_manager_end(tmp_path: Path) -> None:
    """A cvmfs2 helper of the distribution (the shared cache manager, which ends once its
    last client has gone, moments after the last unmount) still running when the final
    sweep comes is given that moment: it ends by itself, nothing is killed or counted.
    (The slow side forced: a fake cvmfs2 of the distribution that takes 0.4 s.)"""
    from cvmfsd import daemon

    binary = tmp_path / "d" / "dist" / "usr" / "bin" / "cvmfs2"
    binary.parent.mkdir(parents=True)
    sleep = shutil.which("sleep")
    assert sleep is not None
    binary.symlink_to(sleep)
    manager = subprocess.Popen(["bash", "-c", f'exec -a cvmfs2 "{binary}" 0.4'])
    try:
        wait_for(lambda: Path(f"/proc/{manager.pid}/cmdline").read_bytes() == b"cvmfs2\x000.4\x00")
        assert daemon._sweep_descendants(dist=tmp_path / "d") == 0
        assert manager.wait(timeout=5) == 0  # ended by itself, not by SIGKILL
    finally:
        manager.kill()
        manager.wait()


def test_a_taken_metrics_port_costs_the_metrics_not_cvmfs(dist: Path, gconfig: Path) -> None:
    """--metrics-address on a port another process holds: CVMFS and the payload go on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = cvmfsd_run(dist, "--metrics-address", f"127.0.0.1:{port}", "--repos", REPO_A,
                            "--", "cat", f"/cvmfs/{REPO_A}/hello.txt", glidein_config=gconfig)
    assert (result.returncode, result.stdout) == (0, "hello from repo.a\n"), result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot serve /metrics; going on without it" in result.stderr
    assert "Address already in use" in result.stderr
    values = while_running(gconfig)
    assert (values["GWMS_IS_CVMFS"], values["CVMFSD_METRICS_ADDRESS"]) == ("yes", "")


@pytest.mark.parametrize(("policy", "status"), [("required", 69), ("preferred", 0)])
def test_no_repositories_is_no_cvmfs(dist: Path, short_tmp: Path, policy: str,
                                     status: int) -> None:
    """No --repos: nothing to mount is a failure to provide CVMFS, never "ready"."""
    config = short_tmp / "glidein_config"
    config.write_text(f"GLIDEIN_CVMFS {policy}\n")
    result = cvmfsd_run(dist, "--", "echo", "payload ran", glidein_config=config)
    assert result.returncode == status, result.stderr
    assert "no repositories given: nothing to mount" in result.stderr
    assert result.stdout == ("payload ran\n" if status == 0 else "")
    values = glidein.read_glidein_config(config).values
    assert values["GWMS_IS_CVMFS"] == "no"


def test_payload_environment(dist: Path, gconfig: Path, short_tmp: Path) -> None:
    """Glidein values reach the payload intact, secrets do not, and TMPDIR is its own."""
    script = 'printf "%s|%s|%s|%s\\n" "$GLIDEIN_Site" "${GLIDEIN_TOKEN_SECRET-unset}" ' \
             '"$TMPDIR" "$(trap -p TERM)"'
    result = cvmfsd_run(dist, "--repos", REPO_A, "--", "sh", "-c", script,
                        glidein_config=gconfig)
    site, secret, tmpdir, trap = result.stdout.rstrip("\n").split("|")
    assert (site, secret, trap) == ("Some Site With Spaces", "unset", "")
    assert Path(tmpdir).name.startswith("cvmfsd-payload-")
    assert not Path(tmpdir).exists(), "the payload's TMPDIR is removed at the end"


def test_required_mount_failure_names_the_loader_code(dist: Path, gconfig: Path,
                                                      stratum_dir: Path) -> None:
    """required: a failed mount fails cvmfsd (69), naming the loader code."""
    stratum.set_faults(stratum_dir, REPO_B, mount_fail=23)
    result = cvmfsd_run(dist, "--repos", f"{REPO_A},{REPO_B}", "--", "echo", "payload ran",
                        glidein_config=gconfig)
    assert result.returncode == 69
    assert "payload ran" not in result.stdout
    assert "mounting repo.b failed: wpad (23)" in result.stderr
    assert glidein.read_glidein_config(gconfig).values["GWMS_IS_CVMFS"] == "no"


def test_preferred_mount_failure_runs_the_payload_without_cvmfs(
        dist: Path, gconfig: Path, stratum_dir: Path) -> None:
    """preferred: the payload runs anyway, and GWMS_IS_CVMFS says no."""
    with gconfig.open("a") as f:
        f.write("GLIDEIN_CVMFS PREFERRED\n")  # the last occurrence wins, any case
    stratum.set_faults(stratum_dir, REPO_B, mount_fail=16)
    result = cvmfsd_run(dist, "--repos", REPO_B, "--", "sh", "-c",
                        f"test -e /cvmfs/{REPO_B} || echo no-cvmfs", glidein_config=gconfig)
    assert (result.returncode, result.stdout) == (0, "no-cvmfs\n"), result.stderr
    assert "continuing without CVMFS" in result.stderr
    assert glidein.read_glidein_config(gconfig).values["GWMS_IS_CVMFS"] == "no"


def test_mode1_mounts_on_the_host_and_unmounts(dist: Path, gconfig: Path) -> None:
    """--mode 1: mountrepo on the host, CVMFS_MOUNT_DIR for the payload, unmounted after."""
    result = cvmfsd_run(dist, "--mode", "1", "--repos", REPO_A, "--", "sh", "-c",
                        f'cat "$CVMFS_MOUNT_DIR/{REPO_A}/hello.txt"', glidein_config=gconfig)
    assert (result.returncode, result.stdout) == (0, "hello from repo.a\n"), result.stderr
    values = while_running(gconfig)
    assert values["CVMFS_MOUNT_DIR"] == str(dist / "dist/cvmfs")
    assert values["GWMS_CVMFSEXEC_MODE"] == "1"
    assert not mounts_under(dist)
    wait_for(lambda: not cvmfs2_pids(dist))


@pytest.mark.parametrize("mode", ["3", "1"])
def test_sigterm_stops_everything_within_the_grace(dist: Path, mode: str) -> None:
    """SIGTERM mid-payload: payload stopped, no mount and no process left in grace + 1 s."""
    grace = 2.0
    process = subprocess.Popen(
        [*CVMFSD, "run", "--dist", str(dist), "--mode", mode, "--grace", str(grace),
         "--repos", REPO_A, "--", "sh", "-c", "trap '' TERM; echo started; sleep 6017"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "started\n"
        process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        status = process.wait(timeout=grace + 10)
        elapsed = time.monotonic() - start
        assert status != 0
        assert elapsed < grace + 1, f"took {elapsed:.2f} s"
        wait_for(lambda: not cvmfs2_pids(dist), timeout=1)
        assert not mounts_under(dist)
        assert not processes_with_argv(["sleep", "6017"]), "the payload's child survived"
    finally:
        reap(process)


def test_bad_repository_name_is_a_usage_error(dist: Path) -> None:
    """A repository name that could become a path is refused before anything runs."""
    result = cvmfsd_run(dist, "--repos", "../../etc", "--", "true")
    assert result.returncode == 2
    assert "invalid repository name '../../etc'" in result.stderr


def test_missing_payload_is_a_usage_error(dist: Path) -> None:
    """cvmfsd run without a payload says what it expected."""
    result = cvmfsd_run(dist, "--repos", REPO_A)
    assert result.returncode == 2
    assert "no payload given" in result.stderr


def test_probe_json_reports_userns_and_fuse() -> None:
    """cvmfsd probe --json shows user namespaces and FUSE usable here, with evidence."""
    result = subprocess.run([*CVMFSD, "probe", "--json"], capture_output=True, text=True,
                            check=True, timeout=60)
    facts = json.loads(result.stdout)
    for name in ("userns", "fuse_in_userns"):
        assert facts[name]["value"] is True, facts[name]
        assert facts[name]["evidence"]
    assert os.access("/dev/fuse", os.R_OK | os.W_OK) == facts["dev_fuse"]["value"]


@pytest.mark.parametrize("mode", ["3", "1"])
def test_sigterm_while_starting_stops_in_order(dist: Path, short_tmp: Path, mode: str) -> None:
    """SIGTERM as soon as the control socket exists (mounts not done): an orderly stop."""
    sock = short_tmp / "sock" / "s"
    process = subprocess.Popen(
        [*CVMFSD, "run", "--dist", str(dist), "--mode", mode, "--socket", str(sock),
         "--repos", f"{REPO_A},{REPO_B}", "--", "sleep", "6019"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        wait_for(sock.exists, timeout=30, interval=0.005)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
        assert process.returncode not in (-signal.SIGTERM, 0), err
        assert "signal received" in err
        assert "Traceback" not in err
        wait_for(lambda: not cvmfs2_pids(dist), timeout=2)
        assert not mounts_under(dist)
        assert not processes_with_argv(["sleep", "6019"])
    finally:
        reap(process)


def _timeline_has(path: Path, pid: int, phase: str) -> bool:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return False
    return any(line.split(" ", 2)[1:] == [str(pid), phase] for line in lines)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_payload_starts_without_waiting_for_the_supervisor(dist: Path, short_tmp: Path) -> None:
    """mode 3: the payload's go is queued before the mounts (cvmfsd.launch), so the payload
    starts as the shim's check passes, even with cvmfsd stopped from cvmfsexec's start on;
    cvmfsd, continued, supervises the rest of the run as always."""
    timeline, marker = short_tmp / "timeline", short_tmp / "payload-ran"
    process = subprocess.Popen(
        [*CVMFSD, "run", "--dist", str(dist), "--repos", REPO_A, "--",
         "sh", "-c", f"cat /cvmfs/{REPO_A}/hello.txt > {marker}"],
        env={**os.environ, "CVMFSD_TIMELINE": str(timeline)}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _timeline_has(timeline, process.pid, "cvmfsexec spawned"), timeout=30,
                 interval=0.001)
        process.send_signal(signal.SIGSTOP)
        wait_for(marker.exists, timeout=30)
        assert _state(process.pid) == "T"  # the payload ran while cvmfsd was stopped
        assert not _timeline_has(timeline, process.pid, "daemon imported")
        process.send_signal(signal.SIGCONT)
        _, err = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
        reap(process)
    assert process.returncode == 0, err
    assert marker.read_text() == "hello from repo.a\n"
    assert not mounts_under(dist)


def test_a_failed_check_never_starts_the_payload(dist: Path, stratum_dir: Path,
                                                 short_tmp: Path) -> None:
    """mode 3: the go queued before the mounts is passed over when the shim's check fails
    (cvmfs2 crashed at once: ENOTCONN); under `required` nothing runs, cvmfsd exits 69."""
    marker = short_tmp / "payload-ran"
    stratum.set_faults(stratum_dir, REPO_B, crash_after=0)
    result = subprocess.run(
        [*CVMFSD, "run", "--dist", str(dist), "--repos", f"{REPO_A},{REPO_B}", "--",
         "touch", str(marker)],
        env={**os.environ, "GLIDEIN_CVMFS": "required"}, capture_output=True, text=True,
        timeout=90, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 69, result.stderr
    assert "repository failed verification" in result.stderr
    assert not marker.exists()
    assert not mounts_under(dist)


def test_uptime_counts_from_cvmfsds_start_not_the_supervisors(dist: Path) -> None:
    """The payload runs before the supervisor starts (mode 3), so uptime cannot count from
    the supervisor: after the payload has slept a second, it must be over a second."""
    script = 'sleep 1 && "$CVMFSCTL" --json status'
    result = cvmfsd_run(dist, "--repos", REPO_A, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["uptime_seconds"] > 1.0
    assert status["started"] < time.time() - 1.0


def test_relative_paths_are_named_whole(dist: Path, short_tmp: Path) -> None:
    """--glidein-config and --socket given relative to cvmfsd's directory work from any other
    (the payload's CVMFSD_SOCKET) and are named whole in messages."""
    (short_tmp / "gc").write_text("GLIDEIN_Site Here\n")
    script = 'cd / && echo "$CVMFSD_SOCKET" && "$CVMFSCTL" get GLIDEIN_Site'
    argv = [*CVMFSD, "run", "--dist", str(dist), "--repos", REPO_A, "--glidein-config", "gc",
            "--socket", "s/c.sock", "--", "sh", "-c", script]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60,
                            stdin=subprocess.DEVNULL, cwd=short_tmp)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(short_tmp / "s" / "c.sock"), "Here"]
    (short_tmp / "gc").unlink()
    (short_tmp / "gc").mkdir()
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60,
                            stdin=subprocess.DEVNULL, cwd=short_tmp)
    assert result.returncode != 0
    assert f"cannot read glidein_config {short_tmp / 'gc'}:" in result.stderr


def test_a_large_environment_reaches_the_payload(dist: Path) -> None:
    """The queued go carries the payload's environment; what the socket buffer does not
    take at once (here 3 x 100 KiB, beyond a unix socket's default buffer) follows."""
    big = {f"CVMFSD_TEST_BIG_{i}": str(i) * 100_000 for i in range(3)}
    result = subprocess.run(
        [*CVMFSD, "run", "--dist", str(dist), "--repos", REPO_A, "--", "sh", "-c",
         'printf "%s %s\\n" "${#CVMFSD_TEST_BIG_2}" "$(cat /cvmfs/repo.a/hello.txt)"'],
        env={**os.environ, **big}, capture_output=True, text=True, timeout=90,
        stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "100000 hello from repo.a\n"


# Mode 3 with cvmfsctl stop is left out: until the shim's check, cvmfsd waits before its
# event loop (cvmfsd.prepare.wait_for_shim), woken by signals only, so the request is
# answered once the mounts are done.
@pytest.mark.parametrize("case", ["1 signal", "1 cvmfsctl", "3 signal"])
def test_a_stop_during_the_mounts_acts_at_once(dist: Path, stratum_dir: Path, gconfig: Path,
                                               short_tmp: Path, case: str) -> None:
    """A stop (SIGTERM or cvmfsctl stop) while a repository is slow to mount ends the run at
    once in every mode: never 'ready', nothing left mounted or running, no warning, and
    128 + SIGTERM as the status (the payload never ran)."""
    mode, how = case.split()
    stratum.set_faults(stratum_dir, REPO_B, mount_delay=15.0)
    sock = short_tmp / "sock" / "s"
    process = subprocess.Popen(
        [*CVMFSD, "run", "--dist", str(dist), "--mode", mode, "--socket", str(sock),
         "--log-format", "json", "--glidein-config", str(gconfig),
         "--repos", f"{REPO_A},{REPO_B}", "--", "sleep", "6023"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        wait_for(sock.exists, timeout=30, interval=0.005)
        time.sleep(2.0)  # the config repository and REPO_A are mounted; REPO_B is on its way
        if how == "signal":
            process.send_signal(signal.SIGTERM)
        else:
            cvmfsctl = str(Path(sys.executable).parent / "cvmfsctl")
            subprocess.run([cvmfsctl, "--socket", str(sock), "stop"], check=True, timeout=10,
                           capture_output=True)
        start = time.monotonic()
        _, err = process.communicate(timeout=30)
        elapsed = time.monotonic() - start
        assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
        assert elapsed < 4, f"took {elapsed:.2f} s to act on the stop"
        records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        loud = [r for r in records if r.get("level") not in ("debug", "info")]
        assert not loud, loud
        history = gconfig.with_name(gconfig.name + ".history").read_text()
        assert "CVMFSD_STATUS ready" not in history, history
        assert "GWMS_IS_CVMFS yes" not in history, history
        assert glidein.read_glidein_config(gconfig).values["CVMFSD_STATUS"] == "stopped"
        wait_for(lambda: not cvmfs2_pids(dist), timeout=5)
        assert not mounts_under(dist)
        assert not processes_with_argv(["sleep", "6023"])
    finally:
        reap(process)


def test_a_stop_during_a_remount_leaves_no_mount(dist: Path, stratum_dir: Path, gconfig: Path,
                                                 short_tmp: Path) -> None:
    """Mode 1: SIGTERM while a cvmfsctl remount's mount is in flight ends the remount at
    once, which says so, and nothing stays mounted or running."""
    sock = short_tmp / "sock" / "s"
    cvmfsctl = str(Path(sys.executable).parent / "cvmfsctl")
    process = subprocess.Popen(
        [*CVMFSD, "run", "--dist", str(dist), "--mode", "1", "--socket", str(sock),
         "--glidein-config", str(gconfig), "--repos", f"{REPO_A},{REPO_B}", "--",
         "sleep", "6025"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    remount = None
    try:
        history = gconfig.with_name(gconfig.name + ".history")
        wait_for(lambda: history.exists() and "CVMFSD_STATUS ready" in history.read_text(),
                 timeout=30)
        stratum.set_faults(stratum_dir, REPO_A, mount_delay=15.0)
        remount = subprocess.Popen([cvmfsctl, "--socket", str(sock), "remount", REPO_A],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def remounting() -> bool:
            status = subprocess.run([cvmfsctl, "--socket", str(sock), "--json", "status"],
                                    capture_output=True, text=True, timeout=10, check=True)
            return bool(json.loads(status.stdout)["repos"][REPO_A]["state"] == "remounting")

        wait_for(remounting, timeout=10)
        time.sleep(1.0)  # umountrepo is done, mountrepo runs: its loader waits out the delay
        process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        _, err = process.communicate(timeout=30)
        elapsed = time.monotonic() - start
        assert process.returncode == 128 + signal.SIGTERM, err[-3000:]  # the payload's
        assert elapsed < 4, f"took {elapsed:.2f} s to act on the stop"
        _, answer = remount.communicate(timeout=10)
        assert remount.returncode != 0
        # cvmfsctl's fast path sends a request again when the answer is an error
        # (cvmfsd.ctl._fast): that second one finds cvmfsd stopping, and says so too.
        assert "not remounted" in answer and "stopping" in answer, answer + err[-4000:]
        wait_for(lambda: not cvmfs2_pids(dist), timeout=5)
        assert not mounts_under(dist)
    finally:
        if remount is not None:
            reap(remount)
        reap(process)
