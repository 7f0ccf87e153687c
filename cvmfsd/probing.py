"""Look at a FUSE mount without ever blocking on it: the probe worker and the one-shot probe.

Looking at a FUSE mount can block forever (a stuck cvmfs2 leaves ``stat`` in
D state), so no look is done by cvmfsd itself.  Every look is a request, with a
deadline, to one long-lived child process, the probe worker
(:class:`ProbeWorker`, ``python -I -S probe_child.py --serve``), which probes
each request in a thread of its own and answers with a JSON line.  A request
that misses its deadline makes the repository ``hung`` and is abandoned: its
thread stays stuck in the worker until the FUSE request is answered or aborted
(e.g. cvmfs2 is killed), then its late answer is dropped and the repository is
probed again.  Until then no new request is sent for that repository: at most
one probe is pending per repository, stuck ones included, so stuck threads are
bounded by the number of repositories.  A worker that dies is started again by
the next probe; one that does not even answer a ping (which its reading thread,
never touching FUSE, answers at once) is SIGKILLed and replaced, and handed to
:class:`StuckProbes`, whose system task reaps it whenever the kernel lets it go.
The worker exits on EOF of its stdin, so it does not outlive cvmfsd.

:func:`probe_repo` does one look in a disposable child process instead
(``probe_child.py PATH REPO``), killed and handed to :class:`StuckProbes` when
it misses its deadline: the reference, for tools and tests (it costs a Python
start, ~25 ms of CPU, a look).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import structlog
import trio

from cvmfsd import launch, probe_child
from cvmfsd._selfexec import bundle_path, module_argv

log = structlog.get_logger("cvmfsd.watch")

PROBE_STATES = ("ok", "enotconn", "hung", "absent", "error")
PROBE_DEADLINE = 5.0
REAP_GRACE = 1.0  # bound on reaping a killed child when trio.run ends
# The probe child, run without site-packages for a fast start (~20 ms); from
# the bundle, through its ``-m`` dispatch (probe_child.py is inside the zip).
PROBE_CHILD: tuple[str, ...] = (
    (sys.executable, "-I", "-S", str(Path(probe_child.__file__))) if bundle_path() is None
    else tuple(module_argv("cvmfsd.probe_child", flags=("-I", "-S"))))
# The probe worker: the same file, serving requests until EOF of its stdin.
PROBE_WORKER: tuple[str, ...] = (*PROBE_CHILD, "--serve")
_MAX_OUTPUT = 65536


@dataclass(frozen=True)
class ProbeResult:
    """What one look at a repository found.

    Attributes:
        repo: the repository name.
        state: ``ok``, ``enotconn``, ``hung``, ``absent`` or ``error``.
        revision: the catalog revision (``user.revision``) when ``ok``.
        error: why the state is not ``ok``.
        duration: seconds the probe took (the deadline when ``hung``; 0 when
            decided from the mount table alone).
        attrs: the observation xattrs that could be read (``ok`` only), by
            name without ``user.``; see :data:`cvmfsd.probe_child.OBSERVED`.
        cache: ``(used, limit)`` bytes of the cache, from statfs (``ok`` only).
        finished: when the probe ended (``time.time()``).
    """

    repo: str
    state: str
    revision: str | None = None
    error: str | None = None
    duration: float = 0.0
    attrs: Mapping[str, str] = field(default_factory=dict)
    cache: tuple[int, int] | None = None
    finished: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.state not in PROBE_STATES:
            raise ValueError(f"probe state {self.state!r}: expected one of {PROBE_STATES}")


class StuckProbes:
    """Killed probe processes that have not exited yet, by repository.

    Each adopted process is waited for by a trio system task without a deadline:
    the process must be reaped eventually, but nobody may block on it, and the
    wait must outlive the probe (and the watcher) that gave up on it.  A probe
    worker may be stuck for several repositories, or none.
    """

    def __init__(self, on_reaped: Callable[[str], None] | None = None) -> None:
        self._by_repo: dict[str, int] = {}
        self._changed = trio.Event()
        self.total = 0
        self.on_reaped = on_reaped

    @property
    def count(self) -> int:
        """Children stuck now, all repositories."""
        return sum(self._by_repo.values())

    def pending(self, repo: str) -> int:
        """Children stuck now for ``repo``."""
        return self._by_repo.get(repo, 0)

    def adopt(self, proc: trio.Process, *repos: str) -> None:
        """Take over a process that was sent SIGKILL, stuck for ``repos``; reap it when it exits."""
        for repo in repos:
            self._by_repo[repo] = self._by_repo.get(repo, 0) + 1
        self.total += 1
        trio.lowlevel.spawn_system_task(self._reap, proc, repos,
                                        name=f"cvmfsd.watch.reap[{','.join(repos)}:{proc.pid}]")

    async def wait_clear(self, repo: str) -> None:
        """Return once no child of ``repo`` is stuck."""
        while self.pending(repo):
            await self._changed.wait()

    async def _reap(self, proc: trio.Process, repos: tuple[str, ...]) -> None:
        start = trio.current_time()
        try:
            try:
                await proc.wait()
            except trio.Cancelled:
                # trio.run is ending.  A child that was not stuck in FUSE dies
                # from its SIGKILL at once: reap it; a stuck one is left to init.
                with trio.CancelScope(shield=True), trio.move_on_after(REAP_GRACE):
                    await proc.wait()
                raise
        finally:
            if proc.stdin is not None:
                proc.stdin.close()  # type: ignore[attr-defined]  # FdStream.close is sync
            if proc.stdout is not None:
                proc.stdout.close()  # type: ignore[attr-defined]  # FdStream.close is sync
            for repo in repos:
                self._by_repo[repo] -= 1
                if not self._by_repo[repo]:
                    del self._by_repo[repo]
            self._changed.set()
            self._changed = trio.Event()
        if not repos:
            log.debug("probe process reaped", pid=proc.pid, status=proc.returncode)
            return
        for repo in repos:
            log.info("stuck probe child reaped", repo=repo, pid=proc.pid,
                     stuck_seconds=round(trio.current_time() - start, 3))
            if self.on_reaped is not None:
                self.on_reaped(repo)


async def probe_repo(path: Path, repo: str, *, deadline: float,
                     child: Sequence[str] = PROBE_CHILD,
                     stuck: StuckProbes | None = None) -> ProbeResult:
    """Look at the mount of ``repo`` at ``path`` in a child process, for at most ``deadline`` s.

    The child never outlives the deadline in our eyes: on expiry it is sent
    SIGKILL and handed to ``stuck`` (a private :class:`StuckProbes` if None),
    and the result is ``hung``.  Cancelling the caller does the same.

    Args:
        path: where the repository is seen from this process
            (``/proc/<shim pid>/root/cvmfs/<repo>`` in mode 3).
        repo: the repository name the mount must serve (``user.fqrn``).
        deadline: seconds before the mount counts as hung.
        child: the probe command; ``path`` and ``repo`` are appended.
        stuck: where killed children go to be reaped.

    Returns:
        The result; any failure, including failing to start the child, is a
        state (``error``), never an exception.
    """
    start = trio.current_time()
    try:
        proc = await trio.lowlevel.open_process(
            [*child, str(path), repo], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd="/")
    except OSError as exc:
        return ProbeResult(repo=repo, state="error", error=f"cannot start the probe child: {exc}",
                           duration=trio.current_time() - start)
    stdout = proc.stdout
    if stdout is None:  # pragma: no cover - stdout=PIPE always gives a stream
        raise RuntimeError("probe child without a stdout pipe")
    chunks: list[bytes | bytearray] = []
    try:
        with trio.move_on_after(deadline) as scope:
            size = 0
            while size < _MAX_OUTPUT:
                chunk = await stdout.receive_some()
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            await proc.wait()
    finally:
        if proc.returncode is None:
            launch.SIGNALLED.add(proc.pid)
            proc.kill()
            (stuck if stuck is not None else StuckProbes()).adopt(proc, repo)
        else:
            stdout.close()  # type: ignore[attr-defined]  # FdStream.close is sync
    duration = trio.current_time() - start
    if scope.cancelled_caught:
        return ProbeResult(repo=repo, state="hung", duration=duration,
                           error=f"no answer from {path} within {deadline:g} s "
                                 f"(probe child {proc.pid} killed)")
    return _parse_answer(repo, b"".join(chunks), proc.returncode, duration)


def _parse_answer(repo: str, output: bytes, status: int | None, duration: float) -> ProbeResult:
    text = output.decode(errors="replace").strip()
    try:
        answer = json.loads(text.splitlines()[-1]) if text else None
    except json.JSONDecodeError:
        answer = None
    return _result(repo, answer, duration,
                   f"probe child exited with status {status}: {text[-300:]!r}")


def _result(repo: str, answer: object, duration: float, invalid: str) -> ProbeResult:
    """The result an answer line (decoded) stands for; ``invalid`` is the error if it is none."""
    if (not isinstance(answer, dict) or answer.get("state") not in PROBE_STATES
            or answer["state"] == "hung"):
        return ProbeResult(repo=repo, state="error", duration=duration, error=invalid)
    revision, error = answer.get("revision"), answer.get("error")
    attrs, statfs = answer.get("attrs"), answer.get("statfs")
    cache = None
    if (isinstance(statfs, list) and len(statfs) == 2
            and all(isinstance(v, int) and v >= 0 for v in statfs)):
        cache = (statfs[0], statfs[1])
    return ProbeResult(repo=repo, state=answer["state"], duration=duration,
                       revision=revision if isinstance(revision, str) else None,
                       error=error if isinstance(error, str) else None,
                       attrs={str(k): v for k, v in attrs.items() if isinstance(v, str)}
                       if isinstance(attrs, dict) else {},
                       cache=cache)


# -- the probe worker --------------------------------------------------------------


class _Request:
    """One request to the probe worker, waiting for its answer."""

    __slots__ = ("abandoned", "answer", "done", "failure", "repo", "sent")

    def __init__(self, repo: str | None) -> None:
        self.repo = repo  # None for a ping
        self.done = trio.Event()
        self.answer: object = None
        self.failure: str | None = None  # the worker went away without answering
        self.abandoned = False  # its deadline passed: the answer, if any, is dropped
        self.sent = trio.current_time()


class _Process:
    """One probe worker process and its requests in flight."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.pending: dict[int, _Request] = {}
        self.alive = True
        self.last_answer = trio.current_time()
        self.checking = False
        self.scope = trio.CancelScope()
        self.write_lock = trio.Lock()


class ProbeWorker:
    """The long-lived probe worker process: cheap probes, each with a deadline.

    :meth:`probe` sends a request and waits for its answer at most the
    deadline; a missed deadline means ``hung`` and abandons the request (see
    the module's docstring).  The process is started by the first probe (and
    again after it died), runs :meth:`run`'s nursery's reader task, and is
    killed when :meth:`run` is cancelled.

    Args:
        command: the worker command (tests pass a fake speaking the protocol).
        stuck: where killed workers go to be reaped.
        on_released: called with the repository whose abandoned probe was released.
        ping_deadline: seconds the worker has to answer a liveness ping.
    """

    def __init__(self, command: Sequence[str], stuck: StuckProbes,
                 on_released: Callable[[str], None] | None = None,
                 ping_deadline: float = PROBE_DEADLINE) -> None:
        self._command = tuple(command)
        self._stuck = stuck
        self._on_released = on_released
        self._ping_deadline = ping_deadline
        self._nursery: trio.Nursery | None = None
        self._current: _Process | None = None
        self._start_lock = trio.Lock()
        self._next_id = 0
        self.starts = 0  # processes started
        self.released = 0  # late answers of abandoned requests, dropped

    @property
    def pid(self) -> int | None:
        """The worker's pid, if one is running."""
        return None if self._current is None else self._current.proc.pid

    def abandoned(self, repo: str | None = None) -> int:
        """Abandoned requests (of ``repo``, or all) still stuck in the running worker."""
        cur = self._current
        if cur is None:
            return 0
        return sum(req.abandoned and req.repo is not None and repo in (None, req.repo)
                   for req in cur.pending.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> NoReturn:
        """Host the reader tasks until cancelled; then kill the worker."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            if self._current is not None:
                self._retire(self._current, "was stopped with the watcher", level="debug")
        raise AssertionError("sleep_forever never returns")  # pragma: no cover

    async def probe(self, path: Path, repo: str, *, deadline: float) -> ProbeResult:
        """Look at the mount of ``repo`` at ``path`` through the worker, for at most ``deadline`` s.

        A worker that dies under a request is started again, and the request
        sent again once, within the same deadline.

        Returns:
            The result; any failure is a state (``hung``, ``error``), never an exception.
        """
        start = trio.current_time()
        failure = "no attempt"
        with trio.move_on_after(deadline) as scope:
            for _attempt in range(2):
                try:
                    cur = await self._start()
                except OSError as exc:
                    return ProbeResult(repo=repo, state="error",
                                       error=f"cannot start the probe worker: {exc}",
                                       duration=trio.current_time() - start)
                req = await self._send(cur, {"path": str(path), "repo": repo}, repo)
                if req.answer is not None:
                    return _result(repo, req.answer, trio.current_time() - start,
                                   f"bad answer from the probe worker: {req.answer!r:.300}")
                failure = req.failure or "no answer"
        duration = trio.current_time() - start
        if scope.cancelled_caught:
            return ProbeResult(repo=repo, state="hung", duration=duration,
                               error=f"no answer from {path} within {deadline:g} s "
                                     f"(probe worker {self.pid})")
        return ProbeResult(repo=repo, state="error", duration=duration, error=failure)

    # -- internals ----------------------------------------------------------------

    def _stopped(self) -> bool:
        return self._nursery is None

    async def _start(self) -> _Process:
        async with self._start_lock:
            cur = self._current
            if cur is not None and cur.alive:
                return cur
            if self._nursery is None:
                raise OSError("the probe worker is not running (the watcher stopped)")
            proc = await trio.lowlevel.open_process(
                self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, cwd="/")
            cur = _Process(proc)
            try:
                if self._stopped():  # the watcher stopped while the process started
                    raise RuntimeError("the watcher stopped")
                # A nursery that is closing refuses new tasks (RuntimeError) too.
                self._nursery.start_soon(self._read, cur,
                                         name=f"cvmfsd.watch.worker[{proc.pid}]")
            except RuntimeError:
                launch.SIGNALLED.add(proc.pid)
                proc.kill()
                self._stuck.adopt(proc)
                raise OSError("the probe worker is stopping") from None
            self._current = cur
            self.starts += 1
            (log.info if self.starts > 1 else log.debug)(
                "probe worker started", pid=proc.pid, starts=self.starts)
            return cur

    async def _send(self, cur: _Process, request: dict[str, object],
                    repo: str | None) -> _Request:
        """Send ``request``; return once answered, failed, or (cancelled) abandoned."""
        rid = self._next_id
        self._next_id += 1
        req = cur.pending[rid] = _Request(repo)
        line = (json.dumps({"id": rid, **request}) + "\n").encode()
        stdin = cur.proc.stdin
        try:
            try:
                if stdin is None:  # pragma: no cover - stdin=PIPE always gives a stream
                    raise trio.BrokenResourceError("no stdin pipe")
                async with cur.write_lock:
                    await stdin.send_all(line)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._retire(cur, f"cannot be written to ({exc!r})")
            except BaseException as exc:
                # half a line was written; cancelled, it is cvmfsd stopping: no fault
                self._retire(cur, "was interrupted in the middle of a request",
                             level="info" if isinstance(exc, trio.Cancelled) else "warning")
                raise
            await req.done.wait()
        finally:
            if not req.done.is_set():
                req.abandoned = True  # stays in cur.pending: the repository's stuck probe
                if cur.alive and req.repo is not None and self._nursery is not None:
                    with contextlib.suppress(RuntimeError):  # the watcher is stopping
                        self._nursery.start_soon(self._check_alive, cur, req.sent)
            else:
                cur.pending.pop(rid, None)
        return req

    async def _check_alive(self, cur: _Process, since: float) -> None:
        """After a missed deadline: replace the worker unless it still answers something."""
        if cur.checking or cur.last_answer > since:
            return
        cur.checking = True
        try:
            with trio.move_on_after(self._ping_deadline):
                req = await self._send(cur, {"ping": True}, None)
                if req.answer is not None or not cur.alive:
                    return
            if cur.alive and cur.last_answer <= since:
                log.warning("probe worker does not answer a ping; replacing it",
                            pid=cur.proc.pid, ping_deadline=self._ping_deadline)
                self._retire(cur, "did not answer a ping")
        finally:
            cur.checking = False

    async def _read(self, cur: _Process) -> None:
        stdout = cur.proc.stdout
        if stdout is None:  # pragma: no cover - stdout=PIPE always gives a stream
            raise RuntimeError("probe worker without a stdout pipe")
        reason = "exited"
        buf = b""
        with cur.scope:
            try:
                while chunk := await stdout.receive_some(_MAX_OUTPUT):
                    *lines, buf = (buf + chunk).split(b"\n")
                    for line in lines:
                        self._dispatch(cur, line)
                    if len(buf) > _MAX_OUTPUT:
                        reason = f"wrote a line longer than {_MAX_OUTPUT} bytes"
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                reason = f"cannot be read from ({exc!r})"
            self._retire(cur, reason)

    def _dispatch(self, cur: _Process, line: bytes) -> None:
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        rid = answer.get("id") if isinstance(answer, dict) else None
        req = cur.pending.get(rid) if isinstance(rid, int) else None
        if not isinstance(answer, dict) or not isinstance(rid, int) or req is None:
            log.warning("probe worker output", pid=cur.proc.pid,
                        line=line.decode(errors="replace")[:300])
            return
        cur.last_answer = trio.current_time()
        if req.abandoned:
            del cur.pending[rid]
            if req.repo is None:  # a late pong
                return
            self.released += 1
            # The event of a reaped stuck child, which it replaces (logs are matched on it).
            log.info("stuck probe child reaped", repo=req.repo, pid=cur.proc.pid,
                     stuck_seconds=round(trio.current_time() - req.sent, 3),
                     released="probe thread of the worker; its late answer is dropped",
                     late_state=answer.get("state"))
            if req.repo is not None and self._on_released is not None:
                self._on_released(req.repo)
            return
        req.answer = answer
        req.done.set()

    def _retire(self, cur: _Process, reason: str, *, level: str = "warning") -> None:
        """Kill a worker (unless it exited), fail its requests, adopt it for reaping."""
        if not cur.alive:
            return
        cur.alive = False
        if self._current is cur:
            self._current = None
        cur.scope.cancel()
        proc = cur.proc
        stuck = sorted({req.repo for req in cur.pending.values()
                        if req.abandoned and req.repo is not None})
        for req in cur.pending.values():
            if not req.done.is_set():
                req.failure = f"the probe worker {proc.pid} {reason}"
                req.done.set()
        cur.pending.clear()
        if proc.poll() is None:
            launch.SIGNALLED.add(proc.pid)
            proc.kill()
        getattr(log, level)("probe worker ended", reason=reason, pid=proc.pid,
                            status=proc.returncode, stuck=stuck)
        self._stuck.adopt(proc, *stuck)
