"""Exports for pilots behind NAT: a node-exporter textfile and a Pushgateway.

* The textfile (``--metrics-textfile PATH.prom``) is rewritten atomically
  (a temporary file, then a rename) after every collection cycle and removed
  at exit.  It holds the ``cvmfs_*`` and ``cvmfsd_*`` families only -- the
  node exporter has ``process_*`` metrics of its own, and a second family of
  the same name would make it reject the file -- and every sample carries a
  ``pilot`` label, as several pilots on one node each write a file.
* The Pushgateway (``--pushgateway URL``) gets the whole registry after
  every cycle, grouped by ``job="cvmfsd"`` and ``instance=<pilot id>``; the
  group is deleted at exit, because a Pushgateway never forgets a series
  (prometheus.io, "When to use the Pushgateway").

Both run in a worker thread with a deadline, so a slow disk or gateway delays
the next cycle at most, never a scrape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog
import trio
from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import Metric
from prometheus_client.exposition import delete_from_gateway, push_to_gateway
from prometheus_client.registry import Collector

from cvmfsd.metrics import Metrics

log = structlog.get_logger("cvmfsd.exports")

PUSH_DEADLINE = 5.0  # policy: seconds a push or delete may take
JOB = "cvmfsd"


class _Labelled(Collector):
    """The cvmfs*/cvmfsd* families of a registry, each sample with extra labels."""

    def __init__(self, source: CollectorRegistry, labels: dict[str, str]) -> None:
        self.source = source
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            if not family.name.startswith("cvmfs"):
                continue
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                copy.add_sample(sample.name, {**sample.labels, **self.labels}, sample.value,
                                sample.timestamp, sample.exemplar)
            yield copy


class _Export:
    """Runs one export in a worker thread; logs the first failure and the recovery only."""

    _failing = False

    async def _run(self, work: Callable[[], None], failed: str, recovered: str,
                   **context: str) -> None:
        try:
            await trio.to_thread.run_sync(work)
        except OSError as exc:
            if not self._failing:
                log.warning(failed, error=str(exc), **context)
            self._failing = True
            return
        if self._failing:
            log.info(recovered, **context)
        self._failing = False


class Textfile(_Export):
    """The node exporter's textfile for one pilot."""

    def __init__(self, metrics: Metrics, path: Path, *, pilot: str) -> None:
        self.path = path
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Labelled(metrics.registry, {"pilot": pilot}))

    async def __call__(self) -> None:
        await self._run(lambda: write_to_textfile(str(self.path), self.registry),
                        "cannot write the metrics textfile", "metrics textfile written again",
                        path=str(self.path))

    def remove(self) -> None:
        """Remove the file: the pilot is gone, and so are its numbers."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Pushgateway(_Export):
    """Pushes to one Pushgateway group; deletes the group at the end."""

    def __init__(self, metrics: Metrics, url: str, *, pilot: str) -> None:
        self.url = url
        self.registry = metrics.registry
        self.grouping = {"instance": pilot}

    async def __call__(self) -> None:
        await self._run(self._push, "cannot push metrics", "pushing metrics again",
                        url=self.url)

    def _push(self) -> None:
        push_to_gateway(self.url, job=JOB, registry=self.registry, grouping_key=self.grouping,
                        timeout=PUSH_DEADLINE)

    async def delete(self) -> None:
        """Delete this pilot's group from the gateway (logged, never raised)."""
        with trio.move_on_after(PUSH_DEADLINE) as scope:
            try:
                await trio.to_thread.run_sync(lambda: delete_from_gateway(
                    self.url, job=JOB, grouping_key=self.grouping, timeout=PUSH_DEADLINE),
                    abandon_on_cancel=True)
            except OSError as exc:
                log.warning("cannot delete this pilot's metrics from the pushgateway",
                            url=self.url, error=str(exc))
                return
        if scope.cancelled_caught:
            log.warning("the pushgateway did not answer the deletion in time; the pilot's "
                        "group stays there", url=self.url, deadline_seconds=PUSH_DEADLINE)
            return
        log.info("pushgateway group deleted", url=self.url, **self.grouping)
