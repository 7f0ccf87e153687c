"""Metrics of a real ``cvmfsd run`` on the simulated distribution (namespaces, FUSE, talk).

The exported counters must equal what the repository itself says (its talk
socket and its xattrs); a hung repository must not slow scrapes or
``cvmfsctl status``; the textfile, the Pushgateway group and the ClassAd lines
must be what the real consumers accept.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import classad2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cvmfsd.collect import parse_raw_counters
from tests.conftest import REPO_A, REPO_B, reap, wait_for
from tests.livedaemon import Daemon, talk, talk_socket

pytestmark = pytest.mark.fuse

CVMFSCTL = str(Path(sys.executable).parent / "cvmfsctl")
PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"


@pytest.fixture(name="daemon")
def _daemon(dist: Path, short_tmp: Path) -> Iterator[Daemon]:
    daemon = Daemon(dist, short_tmp)
    yield daemon
    daemon.stop()


def test_exported_counters_equal_the_repositorys_own(daemon: Daemon, dist: Path) -> None:
    reads_done = daemon.marker.stat().st_mtime

    def collected_after_reads() -> bool:
        samples = daemon.samples()
        now = time.time()
        ages = [samples.get(("cvmfsd_source_age_seconds",
                             frozenset({("repo", r), ("source", s)})))
                for r in (REPO_A, REPO_B) for s in ("talk", "probe")]
        return all(age is not None and now - age > reads_done + 0.05 for age in ages)

    wait_for(collected_after_reads, 20, interval=0.1)
    samples = daemon.samples()
    shim = daemon.status()["shim_pid"]
    for repo in (REPO_A, REPO_B):
        labels = frozenset({("repo", repo)})
        counters = parse_raw_counters(talk(talk_socket(dist, repo), "internal affairs"))
        mount = f"/proc/{shim}/root/cvmfs/{repo}"
        requests = samples["cvmfs_fetch_requests_total", labels]
        downloads = samples["cvmfs_fetch_downloads_total", labels]
        assert requests == counters["fetch.n_invocations"] > 0
        assert downloads == counters["fetch.n_downloads"]
        assert downloads == int(os.getxattr(mount, "user.ndownload"))
        assert samples["cvmfs_net_rx_bytes_total", labels] == \
            counters["download.sz_transferred_bytes"]
        ratio = samples["cvmfs_cache_hit_ratio", labels]
        assert f"{100 * ratio:.3f}" == os.getxattr(mount, "user.hitrate").decode()
        assert samples["cvmfs_repo_revision", labels] == \
            int(os.getxattr(mount, "user.revision"))
        assert samples["cvmfs_mount_up", labels] == 1
        assert samples["cvmfs_mount_attempts_total", labels | {("result", "ok")}] == 1
        assert samples["cvmfs_mount_setup_duration_seconds_count", labels] == 1
    assert samples["cvmfsd_pilot_info", frozenset(
        {("site", "Test_Site"), ("entry", "Test_Entry"), ("glidein_id", "1234-abcd")})] == 1
    assert samples["cvmfsd_mode_info", frozenset({("mode", "mode3"), ("policy", "preferred")})
                   ] == 1
    assert daemon.status()["metrics_address"] == daemon.address


def test_a_hung_repository_never_slows_a_scrape_or_status(daemon: Daemon, dist: Path) -> None:
    assert talk(talk_socket(dist, REPO_B), "sim hang") == "OK\n"
    hung = frozenset({("repo", REPO_B), ("state", "hung")})
    slowest = 0.0
    deadline = time.monotonic() + 20
    while True:
        took, body = daemon.scrape()
        start = time.monotonic()
        status = daemon.status()
        slowest = max(slowest, took, time.monotonic() - start)
        samples = {(s.name, frozenset(s.labels.items())): s.value
                   for f in text_string_to_metric_families(body) for s in f.samples}
        if samples.get(("cvmfs_mount_state", hung)) == 1:
            break
        assert time.monotonic() < deadline, "the repository never became hung"
        time.sleep(0.1)
    repos = status["repos"]
    assert isinstance(repos, dict)
    assert samples["cvmfs_mount_probe_timeouts_total", frozenset({("repo", REPO_B)})] >= 1
    assert samples["cvmfs_mount_up", frozenset({("repo", REPO_A)})] == 1
    for _ in range(10):  # and it stays fast while hung
        took, _body = daemon.scrape()
        slowest = max(slowest, took)
    assert slowest < 0.5, f"a scrape or status took {slowest:.3f} s with {REPO_B} hung"


def test_classad_parses_with_htcondor(daemon: Daemon) -> None:
    def classad() -> classad2.ClassAd:
        return classad2.parseOne(subprocess.run(
            [CVMFSCTL, "--socket", str(daemon.socket), "classad"],
            capture_output=True, text=True, check=True, timeout=30).stdout)

    # The payload may run before cvmfsd's first collection (the go is queued before the
    # mounts): until then the counters are unknown (-1), as they should be.
    wait_for(lambda: classad()[f"CVMFS_{REPO_B.replace('.', '_')}_NIOERR"] != -1, 30)
    ad = classad()
    for repo in (REPO_A, REPO_B):
        x = repo.replace(".", "_").replace("-", "_")
        assert ad[f"HAS_CVMFS_{x}"] is True
        assert ad[f"CVMFS_{x}_REVISION"] >= 1
        assert ad[f"CVMFS_{x}_NIOERR"] == 0
        assert ad[f"CVMFS_{x}_LAST_IOERR"] == -1
    assert ad["CVMFSD_MODE"] == "mode3"
    metrics = subprocess.run([CVMFSCTL, "--socket", str(daemon.socket), "metrics"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    assert "# TYPE cvmfs_mount_up gauge" in metrics


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_textfile_and_pushgateway_follow_the_pilot(dist: Path, short_tmp: Path) -> None:
    if not Path(PUSHGATEWAY).exists():
        pytest.fail(f"{PUSHGATEWAY} is missing: install Debian's prometheus-pushgateway "
                    "(.ci/setup does)")
    port = _free_port()
    gateway = subprocess.Popen(
        [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        text=True)
    textdir = short_tmp / "textfile"
    textdir.mkdir()
    textfile = textdir / "cvmfsd.prom"
    try:
        def pushed() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=5) as answer:
                    return str(answer.read().decode())
            except OSError:
                return ""

        wait_for(lambda: "pushgateway_build_info" in pushed(), 20)
        daemon = Daemon(dist, short_tmp, "--metrics-textfile", str(textfile),
                        "--pushgateway", f"http://127.0.0.1:{port}")
        try:
            series = f'cvmfs_mount_up{{instance="1234-abcd",job="cvmfsd",repo="{REPO_A}"}} 1'
            wait_for(lambda: series in pushed(), 20)
            wait_for(lambda: f'pilot="1234-abcd",repo="{REPO_A}"' in textfile.read_text(), 20)
            assert not [line for line in textfile.read_text().splitlines()
                        if line.startswith("process_")]
        finally:
            log = daemon.stop()
        assert daemon.process.returncode in (0, 143), log  # the payload's status (SIGTERM)
        assert "cvmfs_mount_up{" not in pushed(), "the pilot's group outlived it"
        assert not textfile.exists(), "the textfile outlived the pilot"
    finally:
        gateway.terminate()
        reap(gateway)
