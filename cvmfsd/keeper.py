"""Keep the repositories healthy: watch them, remount the crashed, end the hung.

The :class:`~cvmfsd.watch.MountWatcher` says what state each repository is in;
this module decides what to do about it:

* ``enotconn`` (its cvmfs2 died): remount it, at once and then with backoff
  while remounting fails;
* ``absent`` (no FUSE mount at its mount point) while the run is running:
  remount it the same way (in mode 3 the session first binds ``/cvmfs/<repo>``
  again, and keeps a cvmfs2 that still serves: see :mod:`cvmfsd.rebind`).
  While the run ends (``stopping``, ``done``) the namespace and the mounts go
  on purpose: that is reported, quietly, and left;
* ``hung`` (a probe outlived its deadline while cvmfs2 lives): report it, and
  once it has been hung for ``hang_timeout`` seconds, SIGKILL its cvmfs2 -- the
  mount then answers ENOTCONN, which leads to a remount;
* every transition is written to the daemon state (``cvmfsctl status``) and
  logged.

How a remount is done depends on the mode, so it is a callable.

One remount at a time per repository, whoever asks: the keeper's repair and
``cvmfsctl remount`` both hold the repository's claim (:meth:`RepoKeeper.claim`)
while they remount, and what the watcher sees meanwhile (the old mount gone,
the new one not there yet) is the remount's doing, not news.  A user's
remount that finds the claim held is refused at once, naming who holds it,
rather than queued: the remount under way does what was asked (unmount, and
mount the newest revision), a second one right after it would unmount a mount
just verified, and the caller learns the outcome from ``cvmfsctl status``.
The keeper, finding the claim held, waits for it, and does not remount a
repository that the other remount left ok.

Theory of operation: the crash watchdog
---------------------------------------
A crashed cvmfs2's watchdog (cvmfs/cvmfs ae7450ec9, cvmfs/auto_umount.cc)
reads the mount list, sleeps 2 s, and if its mount point was listed and
``opendir`` on it fails with ENOTCONN, lazily unmounts *the path*
(``umount2(MNT_DETACH)``, after ``platform_umount``'s /etc/mtab update, which
waits up to 10 s for a lock where /etc/mtab is a regular file).  It can regain
root only as (fake) root: in mode 3, and in modes 1/2 run by root.  cvmfsd
remounts at once, so usually its new mount is in place before the watchdog
looks, ``opendir`` succeeds and the watchdog leaves it alone; behind a slow
remount the watchdog removes the dead mount first, which the remount copes
with (there is nothing left to unmount).  Only when the new mount arrives
between the watchdog's ``opendir`` and its ``umount2`` does the watchdog
detach the *new* mount.  Waiting for the old watchdog to end before every
remount would close that window, at the price of 2 s (more with a stack
trace) added to every repair; instead the keeper repairs what comes of it:
in modes 1/2 the mount point is the watchdog's and becomes ``absent``, which
is remounted; in mode 3 the watchdog's mount point is
``<dist>/dist/cvmfs/<repo>`` and ``/cvmfs/<repo>`` is a bind of it, which goes
on serving.  After every remount the watcher reports its next look whatever
it finds, so a mount that vanished right after the remount is not mistaken
for one already reported.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import NoReturn

import structlog
import trio

from cvmfsd import launch
from cvmfsd.metrics import Metrics
from cvmfsd.probing import ProbeResult
from cvmfsd.state import DaemonState, RepoState
from cvmfsd.watch import MountWatcher

log = structlog.get_logger("cvmfsd.keeper")

BACKOFF = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # seconds before each remount attempt
#: A repository that needs repair again within this many seconds of a remount goes
#: on where its backoff was: a fault that comes back at once (a mount that keeps
#: vanishing) costs one remount per backoff step, not a remount loop.
SETTLE = 60.0


def _backoff(attempt: int) -> float:
    """Seconds before remount attempt ``attempt`` (from 1): :data:`BACKOFF`, then its last."""
    return BACKOFF[min(attempt - 1, len(BACKOFF) - 1)]


Remount = Callable[[str], Awaitable["str | None"]]  # None, or what went wrong


class RemountBusy(OSError):
    """A remount of the repository is under way already (see :meth:`RepoKeeper.claim`)."""


class RepoKeeper:
    """Watches and repairs the repositories of one running session.

    Args:
        state: where repository states are written.
        remount: unmounts and mounts one repository again; returns None or the problem.
        hang_timeout: seconds a repository may stay hung before its cvmfs2 is killed.
        mountinfo, probe_path, talk_socket, interval, deadline: see MountWatcher.
        metrics: where probes, remounts and kills are counted.
    """

    def __init__(self, state: DaemonState, *, remount: Remount, hang_timeout: float,
                 mountinfo: Callable[[], Path | None],
                 probe_path: Callable[[str], Path | None],
                 talk_socket: Callable[[str], Path | None],
                 interval: float, deadline: float, metrics: Metrics | None = None) -> None:
        self.state = state
        self._remount = remount
        self._hang_timeout = hang_timeout
        self._metrics = metrics
        self.watcher = MountWatcher(
            list(state.repos), mountinfo=mountinfo, probe_path=probe_path,
            on_change=self._on_change, on_probe=metrics.probed if metrics else None,
            talk_socket=talk_socket, interval=interval, deadline=deadline)
        self._nursery: trio.Nursery | None = None
        self._repairing: set[str] = set()
        # One remount at a time per repository: who holds each claim (for the refusal),
        # and what the keeper's repairs wait on for its release.
        self._claimed_by: dict[str, str] = {}
        self._released: dict[str, trio.Event] = {}
        self._last_repair: dict[str, tuple[float, int]] = {}  # when it ended, attempts made
        self.remounts = 0
        self.remount_failures = 0
        self.hung_kills = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> NoReturn:
        """Watch and repair until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.watcher.run)
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    def refresh(self) -> None:
        """The paths changed (e.g. the shim's pid is known now): look again."""
        self.watcher.refresh()

    @contextlib.contextmanager
    def claim(self, repo: str, by: str) -> Iterator[None]:
        """Hold ``repo``'s one remount for ``by`` (who, in words), or refuse at once.

        Raises:
            RemountBusy: another remount of ``repo`` is under way; the message
                names who runs it.
        """
        holder = self._claimed_by.get(repo)
        if holder is not None:
            raise RemountBusy(f"not remounted: {holder} is remounting {repo} right now; "
                              "`cvmfsctl status` shows how it ends")
        self._claimed_by[repo] = by
        try:
            yield
        finally:
            del self._claimed_by[repo]
            released = self._released.pop(repo, None)
            if released is not None:
                released.set()
            # What the next look finds is news: the states meanwhile were the remount's.
            self.watcher.recheck(repo)

    async def _wait_unclaimed(self, repo: str) -> bool:
        """Wait until no remount of ``repo`` is under way; whether one was."""
        waited = False
        while repo in self._claimed_by:
            waited = True
            await self._released.setdefault(repo, trio.Event()).wait()
        return waited

    async def _on_change(self, repo: str, old: str | None, result: ProbeResult) -> None:
        if repo in self._claimed_by:
            return  # a remount is under way (ours or a user's): its outcome decides
        self.state.repos[repo] = RepoState(result.state, result.revision, result.error)
        ending = self.state.phase in ("stopping", "done")  # the namespace goes: no fault
        logger = log.info if result.state == "ok" or ending else log.warning
        logger("repository state", repo=repo, old=old, new=result.state,
               revision=result.revision, error=result.error,
               probe_seconds=round(result.duration, 3), **({"shutdown": True} if ending else {}))
        if self._nursery is None or repo in self._repairing:
            return
        if result.state == "enotconn" or (result.state == "absent"
                                          and self.state.phase == "running"):
            self._repairing.add(repo)
            self._nursery.start_soon(self._remount_with_backoff, repo)
        elif result.state == "hung":
            self._repairing.add(repo)
            self._nursery.start_soon(self._end_hang, repo)

    async def _remount_with_backoff(self, repo: str) -> None:
        ended, made = self._last_repair.get(repo, (-math.inf, 0))
        skip = made if trio.current_time() - ended < SETTLE else 0
        attempt = 0
        try:
            for attempt in itertools.count(1):
                await trio.sleep(_backoff(skip + attempt))
                waited = await self._wait_unclaimed(repo)  # a user's remount ends first
                if self.state.phase in ("stopping", "done"):
                    return
                current = self.state.repos.get(repo)
                if (attempt > 1 or waited) and current is not None and current.state == "ok":
                    # A probe during the backoff, or the user's remount just done, found
                    # it serving: never unmount a repository that probes ok.
                    log.info("repository ok again; no remount", repo=repo, attempt=attempt)
                    return
                with self.claim(repo, "the keeper's repair"):
                    self.state.repos[repo] = RepoState("remounting")
                    log.warning("remounting", repo=repo, attempt=attempt)
                    start = trio.current_time()
                    problem = await self._remount(repo)
                if self._metrics is not None:
                    self._metrics.remounted(repo, ok=problem is None)
                    if problem is None:
                        self._metrics.mounted(repo, trio.current_time() - start)
                    else:
                        self._metrics.mount_failed(repo, "failed")
                if problem is None:
                    self.remounts += 1
                    log.info("remounted", repo=repo, attempt=attempt)
                    self.state.repos[repo] = RepoState("ok")
                    return
                self.remount_failures += 1
                self.state.repos[repo] = RepoState("failed", error=problem)
                log.error("remount failed", repo=repo, attempt=attempt, error=problem,
                          next_try_seconds=_backoff(skip + attempt + 1))
                self.watcher.kick(repo)  # look again during the backoff
        finally:
            self._last_repair[repo] = (trio.current_time(), skip + attempt)
            self._repairing.discard(repo)
            # Whatever the next look finds is news: the state above was ours, not the
            # watcher's (a mount the old watchdog detached is absent again, say).
            self.watcher.recheck(repo)

    async def _end_hang(self, repo: str) -> None:
        try:
            await trio.sleep(self._hang_timeout)
            current = self.state.repos.get(repo)
            pid = self.watcher.daemon_pid(repo)
            if current is None or current.state != "hung" or pid is None:
                return
            log.error("repository hung too long; killing its cvmfs2", repo=repo, pid=pid,
                      hung_seconds=self._hang_timeout)
            if launch.send_signal(pid, signal.SIGKILL):
                self.hung_kills += 1
                if self._metrics is not None:
                    self._metrics.hung_killed(repo)
        finally:
            self._repairing.discard(repo)
