"""What cvmfsd and its repositories report: the Prometheus metric families.

Two kinds of sources feed them (cvmfs-facts.md part B, "Implications"):

* events, counted where they happen through :class:`Metrics`: mount attempts
  and their latency, probes, remounts, hung cvmfs2 killed, control requests,
  processes seen killed, cleanups;
* observations kept as the latest snapshot per repository
  (:class:`RepoObservation`): the raw counters of one ``cvmfs_talk internal
  affairs`` call per cycle (:mod:`cvmfsd.collect`), the xattrs and statfs that
  come back with every mount probe, and ``/proc`` of the repository's cvmfs2.

A scrape never waits for a source: :meth:`Metrics.render` builds the families
from memory.  Each source's age is exported, so a stale number is visible as
stale.  The names, units and labels are documented in grafana/README.md.
"""

from __future__ import annotations

import bisect
import collections
import functools
import math
import os
import platform
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from cvmfsd import __version__, classad, exposition
from cvmfsd.classad import RepoAd
from cvmfsd.config import looks_secret
from cvmfsd.probing import ProbeResult
from cvmfsd.state import DaemonState

#: Repository states, as ``cvmfs_mount_state`` enumerates them.
STATES = ("mounting", "ok", "enotconn", "hung", "absent", "error", "remounting", "failed")
PHASES = ("starting", "mounting", "running", "stopping", "done")
TALK_ERRORS = ("timeout", "refused", "missing", "protocol")
CLEANUPS = ("mount", "process", "swept")
CONTROL_VERBS = ("ping", "status", "get", "env", "config", "mounts", "wait", "exec", "remount",
                 "stop", "metrics", "classad")
MOUNT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0)
#: Pilot identity from glidein_config: label -> the keys that may hold it, in order.  The
#: only glidein values that ever become metric labels (an allow list of identity attributes).
PILOT_KEYS = {"site": ("GLIDEIN_Site",), "entry": ("GLIDEIN_Entry_Name",),
              "glidein_id": ("GLIDEIN_UUID", "GLIDEIN_Name")}

# Raw counters of ``internal affairs`` exported as counters: name, help, source, scale.
_TALK_COUNTERS = (
    ("cvmfs_fetch_requests", "Object requests (cache hits and downloads).",
     "fetch.n_invocations", 1),
    ("cvmfs_fetch_downloads", "Objects downloaded (files, chunks and catalogs).",
     "fetch.n_downloads", 1),
    ("cvmfs_net_rx_bytes", "Bytes downloaded.", "download.sz_transferred_bytes", 1),
    ("cvmfs_net_transfer_time_seconds", "Seconds spent downloading.",
     "download.sz_transfer_time", 1e-3),
    ("cvmfs_net_requests", "Download requests.", "download.n_requests", 1),
    ("cvmfs_net_retries", "Download retries.", "download.n_retries", 1),
    ("cvmfs_net_proxy_failovers", "Proxy failovers.", "download.n_proxy_failover", 1),
    ("cvmfs_net_host_failovers", "Host (stratum 1) failovers.", "download.n_host_failover", 1),
    ("cvmfs_io_errors", "I/O errors (reset by 'cvmfs_talk reset error counters').",
     "cvmfs.n_io_error", 1),
    ("cvmfs_eio", "EIO answers to calling processes.", "eio.total", 1),
    ("cvmfs_fs_opens", "File opens.", "cvmfs.n_fs_open", 1),
    ("cvmfs_fs_opendirs", "Directory opens.", "cvmfs.n_fs_dir_open", 1),
)
# Numeric xattrs exported as gauges: name, help, xattr, scale.
_XATTR_GAUGES = (
    ("cvmfs_repo_revision", "Catalog revision being served.", "revision", 1),
    ("cvmfs_catalog_expiry_seconds", "Seconds until the root catalog's TTL expires.",
     "expires", 60),
    ("cvmfs_catalogs_loaded", "Catalogs loaded now.", "nclg", 1),
    ("cvmfs_open_files", "Files open now.", "usedfd", 1),
    ("cvmfs_open_dirs", "Directories open now.", "useddirp", 1),
    ("cvmfs_open_files_limit", "Files cvmfs2 may keep open.", "maxfd", 1),
)


@dataclass(frozen=True)
class ProcessStats:
    """CPU and memory of one cvmfs2 process, from ``/proc``."""

    user_seconds: float
    system_seconds: float
    rss_bytes: int
    start_time: float | None = None  # epoch seconds


@dataclass
class RepoObservation:
    """The latest snapshot of one repository, each source with its time."""

    counters: Mapping[str, int] | None = None  # talk raw counters; None after a failure
    talked: float | None = None  # time.time() of the last successful talk call
    probe: ProbeResult | None = None
    process: ProcessStats | None = None

    def hit_ratio(self) -> float | None:
        """1 - downloads/requests over the cvmfs2's lifetime (None with no requests)."""
        if self.counters is None:
            return None
        requests = self.counters.get("fetch.n_invocations", 0)
        if requests <= 0:
            return None
        return 1.0 - self.counters.get("fetch.n_downloads", 0) / requests


_Family = TypeVar("_Family", GaugeMetricFamily, CounterMetricFamily, HistogramMetricFamily,
                  InfoMetricFamily)


@dataclass
class _Families:
    """Families under construction, created on first use so each has one HELP/TYPE."""

    items: dict[str, Metric] = field(default_factory=dict)

    def family(self, kind: type[_Family], name: str, text: str,
               labels: Iterable[str]) -> _Family:
        family = self.items.get(name)
        if family is None:
            family = self.items[name] = kind(name, text, labels=list(labels))
        return cast(_Family, family)

    def gauge(self, name: str, text: str, labels: Iterable[str]) -> GaugeMetricFamily:
        return self.family(GaugeMetricFamily, name, text, labels)

    def counter(self, name: str, text: str, labels: Iterable[str]) -> CounterMetricFamily:
        return self.family(CounterMetricFamily, name, text, labels)

    def histogram(self, name: str, text: str, labels: Iterable[str]) -> HistogramMetricFamily:
        return self.family(HistogramMetricFamily, name, text, labels)

    def info(self, name: str, text: str, labels: Iterable[str]) -> InfoMetricFamily:
        return self.family(InfoMetricFamily, name, text, labels)


def pilot_identity(values: Mapping[str, str]) -> dict[str, str]:
    """The pilot's site, entry and id from glidein_config values (empty when unknown).

    Only the identity attributes of :data:`PILOT_KEYS` ever become labels, which
    any local user can read over HTTP, and only values that do not look like a
    secret (:func:`cvmfsd.config.looks_secret`): such a value is left out.
    """
    identity = {}
    for label, keys in PILOT_KEYS.items():
        identity[label] = next((values[k] for k in keys
                                if values.get(k) and not looks_secret(values[k])), "")
    if not identity["glidein_id"]:
        identity["glidein_id"] = f"{socket.gethostname()}-{os.getpid()}"
    return identity


def _number(text: str | None) -> float | None:
    """A finite number from an xattr value (``"n/a"``, ``"never ..."`` -> None)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class Buckets:
    """One histogram's state: counts per bucket (the last is +Inf) and the sum."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self._le = [exposition.go_float(bound) for bound in (*bounds, math.inf)]
        self._labels: tuple[dict[str, str], list[dict[str, str]]] | None = None

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add_to(self, family: HistogramMetricFamily, labels: dict[str, str]) -> None:
        """Append this histogram's samples to ``family`` (as its ``add_metric`` would).

        The label dicts are made once per histogram: a scrape with 20 repositories
        has some 700 bucket samples, and building them dominated its cost.
        """
        if self._labels is None or self._labels[0] != labels:
            self._labels = (labels, [{**labels, "le": le} for le in self._le])
        name, samples, total = family.name, family.samples, 0
        for bucket_labels, count in zip(self._labels[1], self.counts):
            total += count
            samples.append(Sample(f"{name}_bucket", bucket_labels, float(total), None, None))
        samples.append(Sample(f"{name}_count", labels, float(total), None, None))
        samples.append(Sample(f"{name}_sum", labels, self.sum, None, None))


@dataclass
class RepoEvents:
    """What has happened to one repository, counted by the supervisor."""

    attempts: collections.Counter[str] = field(
        default_factory=lambda: collections.Counter({"ok": 0}))
    remounts: collections.Counter[str] = field(
        default_factory=lambda: collections.Counter({"ok": 0, "failed": 0}))
    talk_errors: collections.Counter[str] = field(
        default_factory=lambda: collections.Counter(dict.fromkeys(TALK_ERRORS, 0)))
    hung_kills: int = 0
    probe_timeouts: int = 0
    mount_seconds: Buckets = field(default_factory=lambda: Buckets(MOUNT_BUCKETS))
    probe_seconds: Buckets = field(default_factory=lambda: Buckets(PROBE_BUCKETS))
    last_mount_seconds: float | None = None


class _Snapshot(Collector):
    """Builds cvmfsd's families from memory at each collection of the registry."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # built per scrape: no duplicate check against other collectors

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics.families())


class Metrics:
    """Every metric of one ``cvmfsd run``.

    Args:
        state: the daemon state (modes, phases, repository states).
        pilot: labels of ``cvmfsd_pilot_info`` (see :func:`pilot_identity`).
        process_metrics: include the standard ``process_*`` metrics of cvmfsd.
    """

    def __init__(self, state: DaemonState, *, pilot: Mapping[str, str],
                 process_metrics: bool = True) -> None:
        self.state = state
        self.pilot = dict(pilot)
        self.repos: dict[str, RepoObservation] = {r: RepoObservation() for r in state.repos}
        self.events: dict[str, RepoEvents] = {r: RepoEvents() for r in state.repos}
        self.snapshot_time = time.time()
        self.cleanups: collections.Counter[str] = collections.Counter(dict.fromkeys(CLEANUPS, 0))
        self.control_requests: collections.Counter[str] = collections.Counter(
            dict.fromkeys(CONTROL_VERBS, 0))
        self.collect_seconds = Buckets(PROBE_BUCKETS)
        # processes of the tree seen killed, by signal name (the process watch's count)
        self.killed: Callable[[], Mapping[str, int]] = dict
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Snapshot(self))
        self._process = ProcessCollector(registry=None) if process_metrics else None

    # -- events -------------------------------------------------------------------

    def probed(self, result: ProbeResult) -> None:
        """A mount probe ended (the watcher calls this for every result)."""
        observation = self.repos.get(result.repo)
        if observation is None:
            return
        observation.probe = result
        events = self.events[result.repo]
        if result.duration > 0:
            events.probe_seconds.observe(result.duration)
        if result.state == "hung":
            events.probe_timeouts += 1

    def mounted(self, repo: str, seconds: float) -> None:
        """``repo`` was mounted and verified ``seconds`` after it was asked for."""
        events = self.events.get(repo)
        if events is not None:
            events.attempts["ok"] += 1
            events.mount_seconds.observe(seconds)
            events.last_mount_seconds = seconds

    def mount_failed(self, repo: str, result: str) -> None:
        """A mount of ``repo`` failed; ``result`` names why (a loader code's name, ...)."""
        events = self.events.get(repo)
        if events is not None:
            events.attempts[result] += 1

    def remounted(self, repo: str, *, ok: bool) -> None:
        """An automatic remount of ``repo`` ended."""
        events = self.events.get(repo)
        if events is not None:
            events.remounts["ok" if ok else "failed"] += 1

    def hung_killed(self, repo: str) -> None:
        """The cvmfs2 of hung ``repo`` was killed."""
        events = self.events.get(repo)
        if events is not None:
            events.hung_kills += 1

    def cleaned(self, what: str, count: int = 1) -> None:
        """``count`` leftovers of kind ``what`` (mount, process, swept) were cleaned up."""
        self.cleanups[what] += count

    def requested(self, verb: str) -> None:
        """The control channel answered a ``verb`` request."""
        self.control_requests[verb] += 1

    # -- observations -------------------------------------------------------------

    def talked(self, repo: str, counters: Mapping[str, int] | None, error: str | None) -> None:
        """A collection cycle's talk call for ``repo`` ended: its raw counters, or why not."""
        observation = self.repos.get(repo)
        if observation is None:
            return
        if error is not None:
            self.events[repo].talk_errors[error] += 1
            observation.counters = None
            return
        observation.counters, observation.talked = counters, time.time()

    def collected(self, seconds: float) -> None:
        """A collection cycle ended after ``seconds``."""
        self.collect_seconds.observe(seconds)
        self.snapshot_time = time.time()

    # -- exposition ---------------------------------------------------------------

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition the ``Accept`` header asks for: (body, content type)."""
        _, content_type = choose_encoder(accept)
        openmetrics = content_type.startswith("application/openmetrics-text")
        body = exposition.encode(self.all_families(), openmetrics=openmetrics)
        return body, exposition.OPENMETRICS if openmetrics else exposition.TEXT

    def text(self) -> str:
        """The Prometheus text format (``cvmfsctl metrics``)."""
        return exposition.encode(self.all_families(), openmetrics=False).decode()

    def all_families(self) -> list[Metric]:
        """cvmfsd's families, then the standard process metrics."""
        families = self.families()
        if self._process is not None:
            families.extend(self._process.collect())
        return families

    def classad(self) -> str:
        """ClassAd lines for a startd cron (``cvmfsctl classad``)."""
        ads = {}
        for repo, o in self.repos.items():
            current = self.state.repos.get(repo)
            state = current.state if current else "mounting"
            probe = o.probe if o.probe is not None and o.probe.state == "ok" else None
            attrs = probe.attrs if probe is not None else {}
            revision = _number(probe.revision if probe else current.revision if current else None)
            nioerr = (o.counters.get("cvmfs.n_io_error") if o.counters is not None
                      else _number(attrs.get("nioerr")))
            ads[repo] = RepoAd(
                state=state, revision=None if revision is None else int(revision),
                nioerr=None if nioerr is None else int(nioerr),
                last_ioerr=_number(attrs.get("timestamp_last_ioerr")),
                hit_ratio=o.hit_ratio(),
                mount_seconds=self.events[repo].last_mount_seconds)
        return classad.render(ads, mode=self.state.mode, policy=self.state.policy,
                              phase=self.state.phase, now=time.time())

    def families(self) -> list[Metric]:
        """The snapshot families: supervisor state, then per repository."""
        f = _Families()
        state = self.state
        now = time.time()
        f.info("cvmfsd_build", "cvmfsd's version and Python.", ["version", "python"]
               ).add_metric([], {"version": __version__, "python": platform.python_version()})
        f.info("cvmfsd_pilot", "The pilot this cvmfsd serves.", []
               ).add_metric([], self.pilot)
        f.info("cvmfsd_mode", "How CVMFS is provided, and the GLIDEIN_CVMFS policy.", []
               ).add_metric([], {"mode": state.mode, "policy": state.policy})
        phase = f.gauge("cvmfsd_phase", "1 for the supervisor's current phase.", ["phase"])
        for name in (*PHASES, *(() if state.phase in PHASES else (state.phase,))):
            phase.add_metric([name], float(name == state.phase))
        f.gauge("cvmfsd_payload_running", "1 while the payload runs.", []).add_metric(
            [], float(state.phase in ("running", "stopping") and state.payload_status is None))
        cleanups = f.counter("cvmfsd_cleanups", "Leftovers cleaned up: mounts and processes "
                             "of earlier runs, stragglers of this one.", ["what"])
        for what, count in self.cleanups.items():
            cleanups.add_metric([what], count)
        requests = f.counter("cvmfsd_control_requests", "Control-channel requests, by verb.",
                             ["verb"])
        for verb, count in sorted(self.control_requests.items()):
            requests.add_metric([verb], count)
        self.collect_seconds.add_to(f.histogram(
            "cvmfsd_collect_duration_seconds", "Seconds one collection cycle took.", []), {})
        killed = f.counter("cvmfsd_processes_killed",
                           "Processes of cvmfsd's tree seen to die of a signal, by signal.",
                           ["signal"])
        for name, count in {"SIGKILL": 0, **self.killed()}.items():
            killed.add_metric([name], count)
        f.gauge("cvmfsd_snapshot_timestamp_seconds",
                "When the collection loop last refreshed the observations.", []
                ).add_metric([], self.snapshot_time)
        for repo, observation in self.repos.items():
            repo_state = state.repos.get(repo)
            self._event_families(f, repo, self.events[repo])
            self._repo_families(f, repo, repo_state.state if repo_state else "mounting",
                                observation, now)
        return list(f.items.values())

    @staticmethod
    def _event_families(f: _Families, repo: str, e: RepoEvents) -> None:
        labels = {"repo": repo}
        e.mount_seconds.add_to(f.histogram(
            "cvmfs_mount_setup_duration_seconds",
            "Seconds from a mount request to a verified repository.", ["repo"]), labels)
        attempts = f.counter("cvmfs_mount_attempts",
                             "Mount attempts, by result (ok or the loader code's name).",
                             ["repo", "result"])
        for result, count in e.attempts.items():
            attempts.add_metric([repo, result], count)
        remounts = f.counter("cvmfs_remounts",
                             "Automatic remounts after a crash, a hang or a vanished mount.",
                             ["repo", "result"])
        for result, count in e.remounts.items():
            remounts.add_metric([repo, result], count)
        f.counter("cvmfs_hung_kills", "cvmfs2 processes killed because their repository hung.",
                  ["repo"]).add_metric([repo], e.hung_kills)
        e.probe_seconds.add_to(f.histogram(
            "cvmfs_mount_probe_duration_seconds", "Seconds each mount probe took.", ["repo"]),
            labels)
        f.counter("cvmfs_mount_probe_timeouts", "Mount probes that missed their deadline.",
                  ["repo"]).add_metric([repo], e.probe_timeouts)
        errors = f.counter("cvmfs_talk_errors", "Failed cvmfs_talk calls, by reason.",
                           ["repo", "reason"])
        for reason, count in e.talk_errors.items():
            errors.add_metric([repo, reason], count)

    def _repo_families(self, f: _Families, repo: str, current: str,
                       o: RepoObservation, now: float) -> None:
        f.gauge("cvmfs_mount_up", "1 if the repository answers its probes.", ["repo"]
                ).add_metric([repo], float(current == "ok"))
        family = f.gauge("cvmfs_mount_state", "1 for the repository's current state.",
                         ["repo", "state"])
        for name in (*STATES, *(() if current in STATES else (current,))):
            family.add_metric([repo, name], float(name == current))
        age = f.gauge("cvmfsd_source_age_seconds",
                      "Seconds since each source last delivered data.", ["repo", "source"])
        if o.talked is not None:
            age.add_metric([repo, "talk"], max(0.0, now - o.talked))
        if o.probe is not None:
            age.add_metric([repo, "probe"], max(0.0, now - o.probe.finished))
        if o.counters is not None:
            for name, text, source, scale in _TALK_COUNTERS:
                if source in o.counters:
                    f.counter(name, text, ["repo"]).add_metric(
                        [repo], o.counters[source] * scale)
            ratio = o.hit_ratio()
            if ratio is not None:
                f.gauge("cvmfs_cache_hit_ratio",
                        "1 - downloads/requests over the cvmfs2 process's lifetime.",
                        ["repo"]).add_metric([repo], ratio)
        probe = o.probe
        if probe is not None and probe.state == "ok":
            self._xattr_families(f, repo, probe)
        if o.process is not None and current != "enotconn":
            cpu = f.counter("cvmfs_process_cpu_seconds", "CPU seconds used by cvmfs2.",
                            ["repo", "mode"])
            cpu.add_metric([repo, "user"], o.process.user_seconds)
            cpu.add_metric([repo, "system"], o.process.system_seconds)
            f.gauge("cvmfs_process_resident_memory_bytes", "Resident memory of cvmfs2.",
                    ["repo"]).add_metric([repo], o.process.rss_bytes)
            if o.process.start_time is not None:
                f.gauge("cvmfs_process_start_time_seconds",
                        "When the repository's cvmfs2 started (its cache counters restart then).",
                        ["repo"]).add_metric([repo], o.process.start_time)

    @staticmethod
    def _xattr_families(f: _Families, repo: str, probe: ProbeResult) -> None:
        attrs = probe.attrs
        if probe.revision is not None and "revision" not in attrs:
            attrs = {**attrs, "revision": probe.revision}
        for name, text, xattr, scale in _XATTR_GAUGES:
            value = _number(attrs.get(xattr))
            if value is not None:
                f.gauge(name, text, ["repo"]).add_metric([repo], value * scale)
        if probe.cache is not None:
            f.gauge("cvmfs_cache_cached_bytes", "Bytes in the cache (statfs).", ["repo"]
                    ).add_metric([repo], probe.cache[0])
            f.gauge("cvmfs_cache_limit_bytes", "The cache quota in bytes (statfs).", ["repo"]
                    ).add_metric([repo], probe.cache[1])
        last = _number(attrs.get("timestamp_last_ioerr"))
        if last:
            f.gauge("cvmfs_last_io_error_timestamp_seconds", "When the last I/O error happened.",
                    ["repo"]).add_metric([repo], last)
        timeout = f.gauge("cvmfs_net_timeout_seconds", "Download timeouts, with and without "
                          "a proxy.", ["repo", "path"])
        for path, xattr in (("proxy", "timeout"), ("direct", "timeout_direct")):
            value = _number(attrs.get(xattr))
            if value is not None:
                timeout.add_metric([repo, path], value)
        if "version" in attrs:
            f.info("cvmfs_repo", "The cvmfs2 version serving the repository.", ["repo"]
                   ).add_metric([repo], {"version": attrs["version"]})
        if "host" in attrs:
            f.info("cvmfs_net_active_host", "The stratum 1 in use.", ["repo"]
                   ).add_metric([repo], {"host": attrs["host"]})
        if "proxy" in attrs:
            f.info("cvmfs_net_active_proxy", "The proxy in use (DIRECT for none).", ["repo"]
                   ).add_metric([repo], {"proxy": attrs["proxy"]})


def process_stats(pid: int, proc_root: Path = Path("/proc")) -> ProcessStats | None:
    """CPU seconds and resident bytes of ``pid`` (None if it is gone); touches no FUSE."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
        status = (proc_root / str(pid) / "status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
    ticks = os.sysconf("SC_CLK_TCK")
    rss = next((int(line.split()[1]) * 1024 for line in status.splitlines()
                if line.startswith("VmRSS:")), 0)
    boot = _boot_time(proc_root)
    start = None if boot is None else boot + int(fields[19]) / ticks
    return ProcessStats(int(fields[11]) / ticks, int(fields[12]) / ticks, rss, start)


@functools.cache
def _boot_time(proc_root: Path) -> float | None:
    """The boot time (``btime`` of /proc/stat), read once."""
    try:
        text = (proc_root / "stat").read_text()
    except OSError:
        return None
    return next((float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("btime ")), None)
