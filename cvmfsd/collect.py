"""The collection loop: refresh the metrics' observations on a timer, then export.

Per cycle and repository: one ``cvmfs_talk internal affairs`` call with a
deadline (its ``Raw Counters`` table), and ``/proc`` of the repository's
cvmfs2 (CPU, memory).  Both touch no FUSE, so a hung repository costs at most
the talk deadline and never blocks a scrape, which serves the last snapshot.
The calls of one cycle run side by side: cvmfs2 answers one talk command at a
time, but each repository has its own cvmfs2.

After each cycle the exporters run (textfile, pushgateway), each bounded too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NoReturn

import structlog
import trio

from cvmfsd.metrics import Metrics, process_stats
from cvmfsd.talk import talk

log = structlog.get_logger("cvmfsd.collect")

COLLECT_INTERVAL = 15.0
TALK_DEADLINE = 3.0  # policy: cvmfs2 answers at once unless it is busy or stuck
# Repository states in which a cvmfs2 should be there to answer its talk socket.
_TALKING = frozenset({"ok", "hung", "error"})

Export = Callable[[], Awaitable[None]]


def parse_raw_counters(answer: str) -> dict[str, int]:
    """The ``Raw Counters:`` table of an ``internal affairs`` answer, by name.

    Rows are ``Name|Value|Description``; the header row, rows whose value is
    not an integer and everything before the table are skipped.

    Raises:
        ValueError: the answer has no ``Raw Counters:`` table.
    """
    _, found, table = answer.partition("Raw Counters:")
    if not found:
        raise ValueError("no 'Raw Counters:' section in the internal affairs answer")
    counters = {}
    for line in table.splitlines():
        name, sep, rest = line.partition("|")
        if not sep:
            continue
        value = rest.split("|", 1)[0].strip()
        try:
            counters[name.strip()] = int(value)
        except ValueError:
            continue  # the header row
    return counters


def _talk_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, ValueError):
        return "protocol"
    return "refused"


class Collection:
    """Refreshes ``metrics`` every ``interval`` seconds and runs the exporters.

    Args:
        metrics: where observations go.
        talk_socket: a repository's talk socket (None when there is none, e.g.
            the host's own /cvmfs).
        daemon_pid: the pid, in our namespace, of a repository's cvmfs2, if known.
        interval: seconds between cycles.
        exporters: awaited after each cycle, in order.
    """

    def __init__(self, metrics: Metrics, *, talk_socket: Callable[[str], Path | None],
                 daemon_pid: Callable[[str], int | None],
                 interval: float = COLLECT_INTERVAL, exporters: Sequence[Export] = ()) -> None:
        self.metrics = metrics
        self._talk_socket = talk_socket
        self._daemon_pid = daemon_pid
        self._interval = interval
        self._exporters = tuple(exporters)
        self._kick = trio.Event()

    def kick(self) -> None:
        """Start the next cycle now (e.g. once the repositories are mounted)."""
        self._kick.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> NoReturn:
        """Collect and export until cancelled; ready after the first cycle."""
        await self.cycle()
        task_status.started()
        while True:
            with trio.move_on_after(self._interval):
                await self._kick.wait()
            self._kick = trio.Event()
            await self.cycle()

    async def cycle(self) -> None:
        """One collection cycle, then the exporters."""
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for repo in self.metrics.repos:
                nursery.start_soon(self._talk, repo)
        for repo, observation in self.metrics.repos.items():
            pid = self._daemon_pid(repo)
            observation.process = process_stats(pid) if pid is not None else None
        self.metrics.collected(trio.current_time() - start)
        for export in self._exporters:
            await export()

    async def _talk(self, repo: str) -> None:
        path = self._talk_socket(repo)
        if path is None or self.metrics.state.repos[repo].state not in _TALKING:
            self.metrics.repos[repo].counters = None  # no cvmfs2 now: its counters are gone
            return
        try:
            counters = parse_raw_counters(
                await talk(path, "internal affairs", deadline=TALK_DEADLINE))
        except (OSError, TimeoutError, ValueError) as exc:
            reason = _talk_error(exc)
            log.debug("talk failed", repo=repo, reason=reason, error=str(exc))
            self.metrics.talked(repo, None, reason)
            return
        self.metrics.talked(repo, counters, None)
