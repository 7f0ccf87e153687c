"""Tests for the metric families, their exposition, the ClassAd lines and /metrics over HTTP."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import classad2
import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from cvmfsd import classad, httpd, protocol
from cvmfsd.collect import parse_raw_counters
from cvmfsd.config import Config, parse_address, pushgateway_url
from cvmfsd.errors import UsageError
from cvmfsd.exports import Pushgateway, Textfile
from cvmfsd.metrics import (
    CONTROL_VERBS,
    Metrics,
    ProcessStats,
    pilot_identity,
    process_stats,
)
from cvmfsd.probing import ProbeResult
from cvmfsd.state import DaemonState, RepoState

PROMTOOL = "/usr/bin/promtool"

AFFAIRS = """Inode Generation:
  init-catalog-revision: 7  current-catalog-revision: 7  incarnation: 0  inode generation: 0
Cache Mode: read-write
Drainout Mode: false
Maintenance Mode: false

Latency distribution of system calls:
lookup
|-----------|

Raw Counters:
Name|Value|Description
cvmfs.n_io_error|2|overall number of I/O errors
download.sz_transfer_time|1500|Transfer time (milliseconds)
download.sz_transferred_bytes|4096|Number of transferred bytes
fetch.n_downloads|3|overall number of downloaded files (incl. catalogs, chunks)
fetch.n_invocations|12|overall number of object requests (hits + downloads)
"""


def _metrics(states: dict[str, str] | None = None) -> Metrics:
    states = states or {"atlas.cern.ch": "ok", "cms.cern.ch": "hung"}
    state = DaemonState(mode="mode3", policy="required", phase="running",
                        repos={r: RepoState(s) for r, s in states.items()})
    return Metrics(state, pilot={"site": "Site_A", "entry": "E", "glidein_id": "g-1"},
                   process_metrics=False)


def _observe(metrics: Metrics, repo: str = "atlas.cern.ch") -> None:
    metrics.talked(repo, parse_raw_counters(AFFAIRS), None)
    metrics.probed(ProbeResult(
        repo=repo, state="ok", revision="7", duration=0.004, cache=(1000, 4000),
        attrs={"hitrate": "75.000", "nioerr": "2", "timestamp_last_ioerr": "1700000000",
               "host": "http://s1.example.org/cvmfs/atlas.cern.ch", "proxy": "DIRECT",
               "version": "2.13.2.0", "expires": "3", "nclg": "4", "usedfd": "1",
               "useddirp": "0", "maxfd": "4096", "timeout": "5", "timeout_direct": "10"}))
    metrics.repos[repo].process = ProcessStats(1.5, 0.5, 30 << 20)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_raw_counters_are_parsed_from_internal_affairs() -> None:
    counters = parse_raw_counters(AFFAIRS)
    assert counters["fetch.n_invocations"] == 12
    assert counters["download.sz_transfer_time"] == 1500
    assert "Name" not in counters
    with pytest.raises(ValueError, match="Raw Counters"):
        parse_raw_counters("Inode Generation:\n")


def test_families_use_base_units_and_the_documented_names() -> None:
    metrics = _metrics()
    _observe(metrics)
    samples = _samples(metrics.text())
    atlas = frozenset({("repo", "atlas.cern.ch")})
    assert samples["cvmfs_fetch_requests_total", atlas] == 12
    assert samples["cvmfs_fetch_downloads_total", atlas] == 3
    assert samples["cvmfs_cache_hit_ratio", atlas] == pytest.approx(0.75)
    assert samples["cvmfs_net_transfer_time_seconds_total", atlas] == pytest.approx(1.5)
    assert samples["cvmfs_catalog_expiry_seconds", atlas] == 180  # minutes -> seconds
    assert samples["cvmfs_cache_limit_bytes", atlas] == 4000
    assert samples["cvmfs_last_io_error_timestamp_seconds", atlas] == 1700000000
    assert samples["cvmfs_process_resident_memory_bytes", atlas] == 30 << 20
    assert samples["cvmfs_net_timeout_seconds", atlas | {("path", "direct")}] == 10
    assert samples["cvmfs_net_active_proxy_info", atlas | {("proxy", "DIRECT")}] == 1
    assert samples["cvmfs_mount_up", atlas] == 1
    cms = frozenset({("repo", "cms.cern.ch")})
    assert samples["cvmfs_mount_up", cms] == 0
    assert samples["cvmfs_mount_state", cms | {("state", "hung")}] == 1
    assert samples["cvmfs_mount_state", cms | {("state", "ok")}] == 0
    # a repository that did not answer its talk socket has no cvmfs2 numbers
    assert ("cvmfs_fetch_requests_total", cms) not in samples
    assert samples["cvmfsd_pilot_info", frozenset(
        {("site", "Site_A"), ("entry", "E"), ("glidein_id", "g-1")})] == 1


def test_every_family_has_one_help_and_type_and_promtool_agrees() -> None:
    metrics = _metrics()
    _observe(metrics)
    _observe(metrics, "cms.cern.ch")
    metrics.mounted("atlas.cern.ch", 1.25)
    metrics.mount_failed("cms.cern.ch", "catalog")
    text = metrics.text()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    assert not [line for line in text.splitlines() if "_created" in line]
    if not Path(PROMTOOL).exists():
        pytest.fail(f"{PROMTOOL} is missing: install Debian's prometheus package (.ci/setup)")
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                          text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout + lint.stderr == ""


def test_openmetrics_is_served_when_asked_for() -> None:
    metrics = _metrics()
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert b"# TYPE cvmfsd_build info" in body
    body, content_type = metrics.render("text/plain")
    assert content_type.startswith("text/plain; version=0.0.4")


def test_talk_failures_are_counted_by_reason_and_drop_the_numbers() -> None:
    metrics = _metrics()
    _observe(metrics)
    metrics.talked("atlas.cern.ch", None, "timeout")
    samples = _samples(metrics.text())
    atlas = frozenset({("repo", "atlas.cern.ch")})
    assert samples["cvmfs_talk_errors_total", atlas | {("reason", "timeout")}] == 1
    assert ("cvmfs_fetch_requests_total", atlas) not in samples


def test_probe_timeouts_and_durations_are_counted() -> None:
    metrics = _metrics()
    metrics.probed(ProbeResult(repo="cms.cern.ch", state="hung", duration=5.0))
    metrics.probed(ProbeResult(repo="cms.cern.ch", state="ok", duration=0.01))
    samples = _samples(metrics.text())
    cms = frozenset({("repo", "cms.cern.ch")})
    assert samples["cvmfs_mount_probe_timeouts_total", cms] == 1
    assert samples["cvmfs_mount_probe_duration_seconds_count", cms] == 2


def test_pilot_identity_falls_back_to_host_and_pid() -> None:
    identity = pilot_identity({"GLIDEIN_Site": "S", "GLIDEIN_Name": "gfactory"})
    assert identity == {"site": "S", "entry": "", "glidein_id": "gfactory"}
    assert pilot_identity({})["glidein_id"].endswith(f"-{__import__('os').getpid()}")


def test_pilot_identity_never_labels_a_secret_looking_value() -> None:
    """A JWT placed in GLIDEIN_Site is not served as a label to every local user."""
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJwaWxvdC0xMjM0NSJ9.c2lnbmF0dXJl"
    identity = pilot_identity({"GLIDEIN_Site": jwt, "GLIDEIN_Entry_Name": "E",
                               "GLIDEIN_Name": "g", "GLIDEIN_Other": "x"})
    assert identity == {"site": "", "entry": "E", "glidein_id": "g"}


def test_process_stats_of_ourselves_and_of_a_gone_pid(tmp_path: Path) -> None:
    stats = process_stats(__import__("os").getpid())
    assert stats is not None and stats.rss_bytes > 1 << 20
    assert stats.start_time is not None
    assert time.time() - 3600 < stats.start_time <= time.time()
    assert process_stats(1 << 30) is None


# -- ClassAd -----------------------------------------------------------------------


def test_classad_keeps_the_ospool_names_and_parses_with_htcondor() -> None:
    metrics = _metrics({"atlas.cern.ch": "ok", "cms-ib.cern.ch": "enotconn"})
    _observe(metrics)
    metrics.mounted("atlas.cern.ch", 0.5)
    text = metrics.classad()
    ad = classad2.parseOne(text)
    assert ad["HAS_CVMFS_atlas_cern_ch"] is True
    assert ad["CVMFS_atlas_cern_ch_REVISION"] == 7
    assert ad["CVMFS_atlas_cern_ch_NIOERR"] == 2
    assert ad["CVMFS_atlas_cern_ch_LAST_IOERR"] > 0
    assert ad["CVMFS_atlas_cern_ch_HIT_RATIO"] == pytest.approx(0.75)
    assert ad["CVMFS_atlas_cern_ch_MOUNT_SECONDS"] == pytest.approx(0.5)
    assert ad["HAS_CVMFS_cms_ib_cern_ch"] is False
    assert ad["CVMFS_cms_ib_cern_ch_NIOERR"] == -1
    assert ad["CVMFS_cms_ib_cern_ch_STATE"] == "enotconn"
    assert "CVMFS_cms_ib_cern_ch_HIT_RATIO" not in ad
    assert ad["CVMFSD_MODE"] == "mode3"
    assert len(text.splitlines()) == len(ad)  # one attribute per line, none lost


def test_classad_strings_are_quoted() -> None:
    assert classad.quote('a"b\\c') == '"a\\"b\\\\c"'
    literal = classad.quote('a"b')
    assert classad2.parseOne(f"X = {literal}\n")["X"] == 'a"b'
    assert classad.stem("oasis.opensciencegrid.org") == "oasis_opensciencegrid_org"


# -- configuration -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9868", ("127.0.0.1", 9868)), ("[::1]:0", ("::1", 0)),
    ("0.0.0.0:80", ("0.0.0.0", 80)), ("none", None)])  # noqa: S104
def test_metrics_address(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9868", ":9868", "host:", "host:http", "host:70000",
                                  "[::1:9", ""])
def test_bad_metrics_address_says_what_is_expected(text: str) -> None:
    with pytest.raises(UsageError, match="expected HOST:PORT"):
        parse_address(text)


def test_pushgateway_and_textfile_are_checked(tmp_path: Path) -> None:
    assert pushgateway_url("http://gw:9091/") == "http://gw:9091"
    with pytest.raises(UsageError, match="expected a URL"):
        pushgateway_url("gw:9091")
    with pytest.raises(UsageError, match=r"must end in \.prom"):
        Config(payload=("true",), metrics_textfile=tmp_path / "cvmfsd.txt")
    with pytest.raises(UsageError, match="is not a directory"):
        Config(payload=("true",), metrics_textfile=tmp_path / "nope" / "cvmfsd.prom")
    with pytest.raises(UsageError, match="metrics-interval"):
        Config(payload=("true",), metrics_interval=0)


# -- the textfile --------------------------------------------------------------------


async def test_textfile_is_labelled_by_pilot_and_has_no_process_metrics(
        tmp_path: Path) -> None:
    state = DaemonState(mode="mode3", repos={"atlas.cern.ch": RepoState("ok")})
    metrics = Metrics(state, pilot={"site": "", "entry": "", "glidein_id": "g-7"})
    _observe(metrics)
    path = tmp_path / "cvmfsd.prom"
    textfile = Textfile(metrics, path, pilot="g-7")
    await textfile()
    await trio.to_thread.run_sync(_check_textfile, path)
    textfile.remove()
    assert not await trio.Path(path).exists()


def _check_textfile(path: Path) -> None:
    text = path.read_text()
    # the node exporter has process_* of its own: a second family would be rejected
    assert not [line for line in text.splitlines() if line.startswith(("process_", "python_"))]
    samples = _samples(text)
    assert samples and all(dict(labels).get("pilot") == "g-7" for _, labels in samples)
    assert [p.name for p in path.parent.iterdir()] == ["cvmfsd.prom"]  # no temporary left
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                          text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr


# -- HTTP ------------------------------------------------------------------------------


def test_request_heads_are_parsed_strictly() -> None:
    method, path, version, headers = httpd.parse_head(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain")
    assert (method, path, version, headers["accept"]) == ("GET", "/metrics", "HTTP/1.1",
                                                          "text/plain")
    for bad in (b"GET /metrics", b"GET /metrics SPDY/3", b"GET / HTTP/1.1\r\nno colon"):
        with pytest.raises(httpd.BadRequest):
            httpd.parse_head(bad)


async def _exchange(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        chunks = []
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    return b"".join(chunks)


async def test_http_server_answers_keeps_alive_and_refuses_nonsense() -> None:
    metrics = _metrics()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(httpd.serve_metrics, "127.0.0.1", 0, metrics.render)
        assert host == "127.0.0.1"
        two = await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"HEAD /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert two.count(b"HTTP/1.1 200 OK") == 2
        assert b"cvmfs_mount_up" in two and two.rstrip().endswith(b"Connection: close")
        assert (await _exchange(port, b"GET /nope HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _exchange(port, b"POST /metrics HTTP/1.0\r\n\r\n")
                ).startswith(b"HTTP/1.1 405")
        assert (await _exchange(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (httpd.MAX_HEAD + 10)
        assert (await _exchange(port, huge)).startswith(b"HTTP/1.1 431")
        om = await _exchange(port, b"GET /metrics HTTP/1.0\r\n"
                                   b"Accept: application/openmetrics-text;version=1.0.0\r\n\r\n")
        assert b"application/openmetrics-text" in om and om.endswith(b"# EOF\n")
        nursery.cancel_scope.cancel()


async def test_http_server_reports_the_bound_port_of_port_zero() -> None:
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(httpd.serve_metrics, "127.0.0.1", 0, _metrics().render)
        assert port > 0
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        nursery.cancel_scope.cancel()



def test_fast_encoder_writes_what_prometheus_client_writes() -> None:
    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    from cvmfsd import exposition

    metrics = _metrics({"atlas.cern.ch": "ok", 'we"ird\\repo': "hung"})
    _observe(metrics)
    metrics.mounted("atlas.cern.ch", 0.3)
    metrics.probed(ProbeResult(repo="atlas.cern.ch", state="ok", duration=1e-4))
    metrics.requested("status")
    families = metrics.all_families()  # one snapshot: ages change with time

    class Fixed(Collector):
        def collect(self) -> Iterator[Metric]:
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    assert exposition.encode(families, openmetrics=False) == generate_latest(registry)
    assert exposition.encode(families, openmetrics=True) == generate_openmetrics(registry)  # type: ignore[no-untyped-call]


def test_every_control_verb_has_a_series_from_the_start() -> None:
    assert set(CONTROL_VERBS) == {verb.value for verb in protocol.Verb}
    samples = _samples(_metrics().text())
    assert all(samples["cvmfsd_control_requests_total", frozenset({("verb", verb)})] == 0
               for verb in CONTROL_VERBS)


async def test_an_unreachable_pushgateway_costs_a_warning_not_the_pilot() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        gateway = Pushgateway(_metrics(), f"http://127.0.0.1:{port}", pilot="g-1")
        start = trio.current_time()
        await gateway()
        assert gateway._failing
        await gateway.delete()
        assert trio.current_time() - start < 5
