"""Watch the mounted repositories: tell ok, dead, hung and missing mounts apart, quickly.

Theory of operation
-------------------
Every look at a mount goes through :mod:`cvmfsd.probing` (a probe worker with
deadlines; a hung look never blocks cvmfsd).

:class:`MountWatcher` probes each repository on a timer (15 s) and, without
waiting for the timer, when one of three events says something changed:

* **The mount table changed.**  ``/proc/<pid>/mountinfo`` reports a change of
  its mount namespace as POLLPRI|POLLERR, while POLLIN is always set.  trio's
  ``wait_readable`` waits for EPOLLIN, which would fire at once, forever; so
  the file is registered for EPOLLPRI alone in a private epoll instance, and
  trio waits for *that* epoll fd to become readable (nested epoll).  The
  kernel consumes a mountinfo change when it polls the file, so after a
  wake-up the private instance may return no event at all: any wake-up just
  means "re-read the table".  A repository whose FUSE mount ids changed
  (mounted, unmounted, remounted) is probed at once; one with no FUSE mount at
  its mount point is ``absent`` without touching FUSE.

* **cvmfs2 died.**  A crash leaves the mount table alone and the mount
  answers ENOTCONN, so the table is no help.  After each probe of a mounted
  repository, the watcher asks the talk socket (which never touches FUSE) for
  ``pid``, maps that pid into our pid namespace (in mode 3 cvmfs2 lives in
  cvmfsexec's pid namespace; see :func:`host_pid`) and waits on a pidfd, which
  becomes readable when the process exits.  Callers that know the pid can
  call :meth:`MountWatcher.watch_daemon` instead.

* **A stuck probe was released.**  The abandoned request's late answer came
  (or a killed probe process was reaped): the FUSE request it was stuck in has
  been answered or aborted, so the mount has changed state.

Idle, every task sleeps in the kernel (epoll) until an event or its timer.
"""

from __future__ import annotations

import os
import select
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import structlog
import trio

from cvmfsd.mountinfo import is_fuse, parse_mountinfo
from cvmfsd.probing import PROBE_DEADLINE, PROBE_WORKER, ProbeResult, ProbeWorker, StuckProbes
from cvmfsd.talk import talk

log = structlog.get_logger("cvmfsd.watch")

PROBE_INTERVAL = 15.0
TALK_PID_DEADLINE = 2.0  # policy: the talk socket answers at once unless cvmfs2 is busy

OnChange = Callable[[str, "str | None", "ProbeResult"], Awaitable[None]]


@dataclass(frozen=True)
class WatchStatistics:
    """A snapshot of :class:`MountWatcher` counters."""

    probes: int  # probe requests sent
    timeouts: int  # probes that missed their deadline (state hung)
    stuck: int  # abandoned probes not released yet (threads, killed processes)
    skipped: int  # probes not started because the repository's last probe is stuck
    table_events: int  # mount-table change notifications
    daemon_deaths: int  # watched cvmfs2 processes seen to exit
    watched_daemons: int  # cvmfs2 processes watched now
    table_source: str  # "epoll" (events), "timer" (no events available) or "none"
    workers: int = 0  # probe worker processes started
    released: int = 0  # abandoned probes whose late answer came (and was dropped)


# -- pure helpers ------------------------------------------------------------------


def mountpoint_of(path: Path, proc_root: Path = Path("/proc")) -> str:
    """The mount point, as the watched table names it, of a probe path.

    ``/proc/<pid>/root/cvmfs/x`` is ``/cvmfs/x`` in ``/proc/<pid>/mountinfo``;
    any other path is its own mount point, its directory's symbolic links
    resolved as the mount table has them (the last part is not looked at: it
    is the FUSE mount, which may hang).
    """
    try:
        rel = path.relative_to(proc_root).parts
    except ValueError:
        return os.path.join(os.path.realpath(path.parent), path.name)  # noqa: PTH118
    if len(rel) >= 2 and rel[1] == "root" and (rel[0].isdigit() or rel[0] == "self"):
        return "/" + "/".join(rel[2:])
    return str(path)


def fuse_mount_ids(text: str, mountpoints: Mapping[str, str]) -> dict[str, frozenset[int]]:
    """For each repository, the ids of the FUSE mounts at its mount point in a mountinfo text.

    An empty set means "not mounted"; a changed set means mounted, unmounted
    or remounted since the last look.
    """
    ids: dict[str, set[int]] = {}
    for m in parse_mountinfo(text):
        if is_fuse(m.fstype):
            ids.setdefault(m.mountpoint, set()).add(m.mount_id)
    return {repo: frozenset(ids.get(point, ())) for repo, point in mountpoints.items()}


def parse_nspid(status_text: str) -> tuple[int, ...]:
    """The ``NSpid:`` line of ``/proc/<pid>/status``: the pid in each nested namespace."""
    for line in status_text.splitlines():
        if line.startswith("NSpid:"):
            return tuple(int(x) for x in line.split()[1:])
    return ()


def host_pid(ns_pid: int, ref: Path | None, proc_root: Path = Path("/proc")) -> int | None:
    """Our pid for the process that is ``ns_pid`` in the pid namespace of process ``ref``.

    cvmfs2 answers the talk command ``pid`` with its pid in its own namespace
    (cvmfsexec's, in mode 3).  ``ref`` is ``/proc/<pid>`` of any process in that
    namespace (the shim) or None for ours.  Outside our namespace this scans
    ``/proc/*/status`` for the ``NSpid`` whose last entry is ``ns_pid`` and
    whose ``ns/pid`` link matches ``ref``'s: neither read touches FUSE.

    Returns:
        The pid, or None when no such process is visible (it exited, or /proc
        is masked).
    """
    try:
        own = (proc_root / "self" / "ns" / "pid").readlink()
        target = (ref / "ns" / "pid").readlink() if ref is not None else own
    except OSError:
        return None
    if target == own:
        return ns_pid if (proc_root / str(ns_pid)).exists() else None
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            nspid = parse_nspid((entry / "status").read_text())
            if (len(nspid) > 1 and nspid[-1] == ns_pid
                    and (entry / "ns" / "pid").readlink() == target):
                return int(entry.name)
        except (OSError, ValueError):
            continue
    return None


# -- the watcher ---------------------------------------------------------------------


class _Table:
    """An open mountinfo file and, if the kernel allows, an epoll fd that wakes on changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.epoll: select.epoll | None = select.epoll()
        try:
            self.epoll.register(self.fd, select.EPOLLPRI)
        except OSError:  # not a /proc mount table (EPERM for a plain file): timer only
            self.epoll.close()
            self.epoll = None

    def read(self) -> str:
        """The whole table now (procfs: never blocks, never touches FUSE)."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self.fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def close(self) -> None:
        if self.epoll is not None:
            self.epoll.close()
        os.close(self.fd)


class _Repo:
    """The watcher's bookkeeping for one repository."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.kick = trio.Event()
        self.result: ProbeResult | None = None
        self.mount_ids: frozenset[int] | None = None  # None: no mount table read yet
        self.mountpoint: str | None = None
        self.pid: int | None = None
        self.pid_set = trio.Event()
        self.pid_scope: trio.CancelScope | None = None
        self.report_next = False  # report the next result even if unchanged
        self.checks_begun = 0  # checks started (each applies its result before the next)
        self.checks_done = 0  # the number of the last check whose result is applied
        self.checked = trio.lowlevel.ParkingLot()  # unparked when a check is done


class MountWatcher:
    """Probe every repository on a timer and whenever an event says it may have changed.

    Args:
        repos: the repositories to watch.
        mountinfo: gives the mount table that shows the repositories
            (``/proc/self/mountinfo``, or ``/proc/<shim pid>/mountinfo`` in
            mode 3); None while not known.  Its ``/proc/<pid>`` also names
            the pid namespace cvmfs2 runs in.
        probe_path: gives where a repository is seen from this process
            (``<dist>/dist/cvmfs/<repo>``, ``/proc/<shim pid>/root/cvmfs/<repo>``);
            None while not known.
        on_change: awaited with ``(repo, old_state, result)`` on every state
            transition (``old_state`` is None the first time) and when the
            revision of an ``ok`` repository changes.
        on_probe: called with every result, changed or not (the metrics).
        talk_socket: gives a repository's cvmfs_talk socket, to learn the
            cvmfs2 pid and watch it die; None disables that.
        interval: seconds between timer probes of a repository.
        deadline: seconds before a probe counts as hung.
        child: the probe worker command (tests pass a fake that speaks the
            protocol of :mod:`cvmfsd.probe_child` ``--serve``).
        proc_root: where /proc is.

    Call :meth:`refresh` when what the callables return may have changed (for
    example once the shim pid is known).
    """

    def __init__(self, repos: Iterable[str], *,
                 mountinfo: Callable[[], Path | None],
                 probe_path: Callable[[str], Path | None],
                 on_change: OnChange,
                 on_probe: Callable[[ProbeResult], None] | None = None,
                 talk_socket: Callable[[str], Path | None] | None = None,
                 interval: float = PROBE_INTERVAL, deadline: float = PROBE_DEADLINE,
                 child: Sequence[str] = PROBE_WORKER, proc_root: Path = Path("/proc")) -> None:
        self._repos = {name: _Repo(name) for name in repos}
        self._mountinfo = mountinfo
        self._probe_path = probe_path
        self._on_change = on_change
        self._on_probe = on_probe
        self._talk_socket = talk_socket
        self._interval = interval
        self._deadline = deadline
        self._proc_root = proc_root
        self._stuck = StuckProbes(on_reaped=self.kick)
        self._worker = ProbeWorker(child, self._stuck, on_released=self.kick,
                                   ping_deadline=deadline)
        self._table: _Table | None = None
        self._table_scope: trio.CancelScope | None = None
        self._probes = self._timeouts = self._skipped = 0
        self._table_events = self._daemon_deaths = 0
        self._running = False

    # -- public -------------------------------------------------------------------

    def results(self) -> dict[str, ProbeResult]:
        """The latest result of every repository probed so far."""
        return {name: r.result for name, r in self._repos.items() if r.result is not None}

    def kick(self, repo: str) -> None:
        """Probe ``repo`` now (or right after its running probe; requests coalesce)."""
        r = self._repos.get(repo)
        if r is not None:
            r.kick.set()

    def recheck(self, repo: str) -> None:
        """Probe ``repo`` now and report the result to ``on_change`` even if unchanged.

        For a caller that set the repository's state itself (a remount): the
        watcher's last result may be stale, and the same result again is news.
        """
        r = self._repos.get(repo)
        if r is not None:
            r.report_next = True
            r.kick.set()

    async def probe_now(self, repo: str) -> None:
        """Return once a check of ``repo`` that began after this call has been applied.

        What a client saw of a repository (``cvmfsctl wait`` found a path of a
        new revision) is then in the state before it is told: a check that
        began earlier may have looked before the change.  Checks of a
        repository run one after the other, so "began after" is "the one after
        the check under way, if any".  Bounded by the probe's own deadline.
        """
        r = self._repos.get(repo)
        if r is None:
            return
        wanted = r.checks_begun + 1
        r.kick.set()
        while self._running and r.checks_done < wanted:
            await r.checked.park()

    def refresh(self) -> None:
        """Re-ask the callables: re-open the mount table and probe every repository."""
        if self._table_scope is not None:
            self._table_scope.cancel()
        for r in self._repos.values():
            r.kick.set()

    def watch_daemon(self, repo: str, pid: int) -> None:
        """Probe ``repo`` as soon as process ``pid`` (its cvmfs2, in our pid namespace) exits."""
        r = self._repos[repo]
        if r.pid == pid:
            return
        r.pid = pid
        if r.pid_scope is not None:
            r.pid_scope.cancel()
        r.pid_set.set()

    def daemon_pid(self, repo: str) -> int | None:
        """The pid (in our pid namespace) of the cvmfs2 serving ``repo``, if known."""
        r = self._repos.get(repo)
        return None if r is None else r.pid

    def probe_worker_pid(self) -> int | None:
        """The pid of the probe worker process, if one is running."""
        return self._worker.pid

    def statistics(self) -> WatchStatistics:
        """A snapshot of the counters."""
        table = self._table
        source = "none" if table is None else "epoll" if table.epoll is not None else "timer"
        return WatchStatistics(
            probes=self._probes, timeouts=self._timeouts,
            stuck=self._stuck.count + self._worker.abandoned(),
            skipped=self._skipped, table_events=self._table_events,
            daemon_deaths=self._daemon_deaths, table_source=source,
            watched_daemons=sum(r.pid_scope is not None for r in self._repos.values()),
            workers=self._worker.starts, released=self._worker.released)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> NoReturn:
        """Serve until cancelled; ready once the mount table (if known) has been read."""
        try:
            self._running = True
            async with trio.open_nursery() as nursery:
                await nursery.start(self._worker.run)
                await nursery.start(self._watch_table)
                for r in self._repos.values():
                    r.kick.set()
                    nursery.start_soon(self._repo_loop, r, name=f"cvmfsd.watch.repo[{r.name}]")
                    nursery.start_soon(self._daemon_loop, r,
                                       name=f"cvmfsd.watch.daemon[{r.name}]")
                task_status.started()
        finally:
            self._running = False
            for r in self._repos.values():
                r.checked.unpark_all()  # no check will come: probe_now() returns
            if self._table is not None:
                self._table.close()
                self._table = None
        raise AssertionError("the watcher's tasks never return")  # pragma: no cover

    # -- the mount table ----------------------------------------------------------

    async def _watch_table(self, *, task_status: trio.TaskStatus[None]) -> NoReturn:
        started = False
        while True:
            self._open_table(self._mountinfo())
            if self._table is not None:
                self._apply_table(self._table.read())
            else:
                for r in self._repos.values():
                    r.mount_ids = None  # unknown: probes decide alone
            if not started:
                task_status.started()
                started = True
            with trio.CancelScope() as self._table_scope:
                table = self._table
                if table is not None and table.epoll is not None:
                    await trio.lowlevel.wait_readable(table.epoll.fileno())
                    table.epoll.poll(0)  # drain; the wake-up itself is the news
                    self._table_events += 1
                else:
                    await trio.sleep(self._interval)
            self._table_scope = None

    def _open_table(self, path: Path | None) -> None:
        if self._table is not None and self._table.path == path:
            return
        if self._table is not None:
            self._table.close()
            self._table = None
        if path is None:
            return
        try:
            self._table = _Table(path)
        except FileNotFoundError:
            # /proc/<pid>/mountinfo of a process that has ended: the namespace
            # is over (a short payload may end before the supervisor has looked).
            log.info("the mount table is gone with its process", path=str(path))
        except OSError as exc:
            log.warning("cannot open the mount table", path=str(path), error=str(exc))

    def _apply_table(self, text: str) -> None:
        points: dict[str, str] = {}
        for r in self._repos.values():
            path = self._probe_path(r.name)
            r.mountpoint = None if path is None else mountpoint_of(path, self._proc_root)
            if r.mountpoint is not None:
                points[r.name] = r.mountpoint
        ids = fuse_mount_ids(text, points)
        for r in self._repos.values():
            new = ids.get(r.name)
            if new != r.mount_ids:
                if r.mount_ids is not None:
                    log.info("mount table changed", repo=r.name, mount_ids=sorted(new or ()))
                r.mount_ids = new
                r.kick.set()

    # -- probing ------------------------------------------------------------------

    async def _repo_loop(self, r: _Repo) -> NoReturn:
        while True:
            with trio.move_on_after(self._interval):
                await r.kick.wait()
            r.kick = trio.Event()
            r.checks_begun += 1
            number = r.checks_begun
            try:
                await self._check(r)
            finally:
                r.checks_done = number
                r.checked.unpark_all()

    async def _check(self, r: _Repo) -> None:
        path = self._probe_path(r.name)
        if path is None:
            return
        table = self._table.path if self._table is not None else None
        if r.mount_ids is not None and not r.mount_ids:
            await self._set(r, ProbeResult(repo=r.name, state="absent",
                                           error=f"no FUSE mount at {r.mountpoint} in {table}"))
            return
        if self._stuck.pending(r.name) or self._worker.abandoned(r.name):
            self._skipped += 1  # still hung: its probe is stuck; its release kicks us
            return
        self._probes += 1
        result = await self._worker.probe(path, r.name, deadline=self._deadline)
        if result.state == "hung":
            self._timeouts += 1
        await self._set(r, result)
        if result.state in ("ok", "hung") and r.pid is None and self._talk_socket is not None:
            await self._discover_daemon(r, self._talk_socket(r.name))

    async def _set(self, r: _Repo, result: ProbeResult) -> None:
        old = r.result
        r.result = result
        if self._on_probe is not None:
            self._on_probe(result)
        report, r.report_next = r.report_next, False
        if (not report and old is not None and old.state == result.state
                and old.revision == result.revision):
            return
        old_state = None if old is None else old.state
        # on_change reports it (and says what is done about it); this is detail.
        log.debug("repository state", repo=r.name, old=old_state, state=result.state,
                  revision=result.revision, error=result.error,
                  duration=round(result.duration, 3))
        await self._on_change(r.name, old_state, result)

    # -- cvmfs2 liveness ----------------------------------------------------------

    async def _discover_daemon(self, r: _Repo, sock: Path | None) -> None:
        if sock is None:
            return
        try:
            answer = await talk(sock, "pid", deadline=TALK_PID_DEADLINE)
            ns_pid = int(answer.split()[0])
        except (OSError, TimeoutError, ValueError, IndexError) as exc:
            log.debug("no cvmfs2 pid from the talk socket", repo=r.name, error=str(exc))
            return
        table = self._table.path if self._table is not None else None
        ref = table.parent if table is not None and table.name == "mountinfo" else None
        if ref is not None and ref.parent != self._proc_root:
            ref = None
        pid = await trio.to_thread.run_sync(host_pid, ns_pid, ref, self._proc_root)
        if pid is None:
            log.info("cvmfs2 pid not visible", repo=r.name, ns_pid=ns_pid)
            return
        log.info("watching cvmfs2", repo=r.name, pid=pid, ns_pid=ns_pid)
        self.watch_daemon(r.name, pid)

    async def _daemon_loop(self, r: _Repo) -> NoReturn:
        while True:
            await r.pid_set.wait()
            r.pid_set = trio.Event()
            pid = r.pid
            if pid is None:
                continue
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._daemon_died(r, pid)
                continue
            except (OSError, AttributeError) as exc:  # no pidfds (Linux < 5.3): timer only
                log.info("cannot watch cvmfs2", repo=r.name, pid=pid, error=str(exc))
                continue
            try:
                with trio.CancelScope() as r.pid_scope:
                    if r.pid_set.is_set():  # replaced while we were opening the pidfd
                        continue
                    await trio.lowlevel.wait_readable(fd)
                    self._daemon_died(r, pid)
            finally:
                r.pid_scope = None
                os.close(fd)

    def _daemon_died(self, r: _Repo, pid: int) -> None:
        if r.pid != pid:
            return
        r.pid = None
        self._daemon_deaths += 1
        log.info("cvmfs2 exited", repo=r.name, pid=pid)
        r.kick.set()
