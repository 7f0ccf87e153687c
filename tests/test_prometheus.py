"""A real Prometheus (Debian's package) scrapes a real ``cvmfsd run``.

The scene has something for every panel and rule: repo.a gets I/O errors, repo.b hangs,
repo.c crashes and cannot be mounted again (its loader fails), and a second target of
the job is down.  Then:

* ``promtool check metrics`` accepts a scrape of cvmfsd, without a word;
* Prometheus loads grafana/alerts.yml and evaluates every rule without an error;
* every query of every dashboard panel and variable returns data;
* every alert whose condition the scene creates returns data, and every operand of
  every alert (the parts around its thresholds; ``offset`` dropped, as this Prometheus
  is young) returns data.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfsd.loader import LoaderCode
from cvmfsd.sim import stratum
from tests.conftest import REPO_A, REPO_B, reap, wait_for
from tests.dashboard_queries import ALERTS, alert_queries, dashboard_queries, operands
from tests.livedaemon import Daemon, talk, talk_socket

pytestmark = pytest.mark.fuse

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
REPO_C = "repo.c"
# The alerts the scene makes true (the others need hours of history or stale data).
FIRING = ("CvmfsRepositoryHung", "CvmfsIOErrorsRising", "CvmfsRepositoryDown",
          "CvmfsMountFailing", "CvmfsdDown")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Prometheus:
    """A Prometheus server on loopback, scraping the given targets as job ``cvmfsd``."""

    def __init__(self, work: Path, targets: list[str]) -> None:
        for tool in (PROMETHEUS, PROMTOOL):
            if not Path(tool).exists():
                pytest.fail(f"{tool} is missing: install Debian's prometheus (.ci/setup does)")
        work.mkdir()
        config = work / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "cvmfsd",
                                "static_configs": [{"targets": targets}]}],
        }))
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = work / "prometheus.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address={self.url[len('http://'):]}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True)
        wait_for(self._ready, 60, interval=0.2)

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:  # noqa: S310
                return bool(answer.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> object:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(  # noqa: S310 - http on loopback
                f"{self.url}/api/v1/{path}{query}", timeout=30) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[object]:
        data = self.api("query", query=expr)
        assert isinstance(data, dict)
        result = data["result"]
        assert isinstance(result, list)
        return result

    def stop(self) -> None:
        self.process.terminate()
        reap(self.process)


@pytest.fixture(name="scene")
def _scene(dist: Path, stratum_dir: Path, short_tmp: Path) -> Iterator[tuple[Daemon, Prometheus]]:
    src = short_tmp / "src-c"
    src.mkdir()
    (src / "c.txt").write_text("repo.c\n")
    stratum.publish(stratum_dir, REPO_C, src)
    trigger = short_tmp / "trigger"
    later = (f"(while [ ! -e {trigger} ]; do sleep 0.1; done; "
             f"cat /cvmfs/{REPO_A}/hello.txt /cvmfs/{REPO_A}/sub/deeper/file.txt) "
             ">/dev/null 2>&1 &")
    daemon = Daemon(dist, short_tmp, "--hang-timeout", "3600", repos=(REPO_A, REPO_B, REPO_C),
                    script=f"{later} cat /cvmfs/{REPO_A}/hello.txt /cvmfs/{REPO_C}/c.txt "
                           f"/cvmfs/{REPO_B}/data.csv >/dev/null")
    prometheus = None
    try:
        prometheus = Prometheus(short_tmp / "prom", [daemon.address,
                                                     f"127.0.0.1:{_free_port()}"])
        # a few healthy scrapes first, so that rates and increases see the changes
        wait_for(lambda: _scrapes(prometheus) >= 3, 60, interval=0.2)
        daemon.status()  # a control request
        assert talk(talk_socket(dist, REPO_A), "sim eio on") == "OK\n"
        trigger.touch()
        assert talk(talk_socket(dist, REPO_B), "sim hang") == "OK\n"
        stratum.set_faults(stratum_dir, REPO_C, mount_fail=int(LoaderCode.CATALOG))
        assert talk(talk_socket(dist, REPO_C), "sim crash") == "OK\n"
        wait_for(lambda: bool(prometheus.query(
            f'cvmfs_mount_state{{repo="{REPO_B}",state="hung"}} == 1')), 30, interval=0.5)
        wait_for(lambda: bool(prometheus.query(
            f'cvmfs_mount_attempts_total{{repo="{REPO_C}",result!="ok"}} > 0')), 30,
            interval=0.5)
        wait_for(lambda: bool(prometheus.query(
            f'cvmfs_io_errors_total{{repo="{REPO_A}"}} > 0')), 30, interval=0.5)
        time.sleep(3)  # a few more samples after the changes
        yield daemon, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        daemon.stop()
        stratum.set_faults(stratum_dir, REPO_C, mount_fail=None)


def _scrapes(prometheus: Prometheus) -> int:
    result = prometheus.query('count_over_time(up{job="cvmfsd"}[5m])')
    return max((int(float(r["value"][1])) for r in result if isinstance(r, dict)), default=0)


def test_prometheus_sees_every_panel_and_rule(scene: tuple[Daemon, Prometheus]) -> None:
    daemon, prometheus = scene
    _, body = daemon.scrape()
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True,
                          text=True, check=False)
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")

    groups = prometheus.api("rules")
    assert isinstance(groups, dict)
    rules = [rule for group in groups["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == {q.title for q in alert_queries()}
    broken = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not broken, f"rules that Prometheus cannot evaluate: {broken}"

    empty = [str(q) for q in dashboard_queries(rate_interval="1m")
             if not prometheus.query(q.expr)]
    assert not empty, f"queries without data: {empty}"

    for query in alert_queries():
        if query.title in FIRING:
            assert prometheus.query(query.expr), f"{query}: the scene should make it true"
        # an operand looking back (offset 30m) has no data in a young Prometheus:
        # the same operand now must have some
        parts = [re.sub(r"\s+offset\s+\d+[smhdwy]", "", part) for part in operands(query.expr)]
        assert parts, query
        silent = [part for part in parts if not prometheus.query(part)]
        assert not silent, f"{query}: operands without data: {silent}"

    _check_the_scene(prometheus)


def _check_the_scene(prometheus: Prometheus) -> None:
    """The states and counters the scene caused, as Prometheus has them."""

    def value(expr: str) -> float:
        result = prometheus.query(expr)
        assert len(result) == 1, (expr, result)
        sample = result[0]
        assert isinstance(sample, dict)
        return float(sample["value"][1])

    assert value(f'cvmfs_mount_up{{repo="{REPO_A}"}}') == 1
    assert value(f'cvmfs_mount_up{{repo="{REPO_B}"}}') == 0
    assert value(f'cvmfs_mount_up{{repo="{REPO_C}"}}') == 0
    assert value(f'cvmfs_remounts_total{{repo="{REPO_C}",result="failed"}}') >= 1
    assert value(f'cvmfs_mount_probe_timeouts_total{{repo="{REPO_B}"}}') >= 1
    assert value('sum(up{job="cvmfsd"})') == 1  # of two targets
    # repo.c's crash: its watchdog gives the crashed cvmfs2 "the finishing stroke", a
    # SIGKILL (cvmfs/monitor.cc ReportStacktrace), so that is what cvmfsd sees.
    assert value('cvmfsd_processes_killed_total{signal="SIGKILL"}') >= 1
