"""Run a launch plan under trio: mount, run the payload, stop, clean up.

Every source of news -- cvmfsexec's output lines, the shim's messages, the
exit of cvmfsexec, a stop request -- becomes an event on one memory channel,
and one loop (:meth:`Mode3Session._run`) reacts to them in order.  The state
is therefore only ever changed in one place.

Stopping mode 3: SIGTERM to the shim, which forwards it to the payload; after
the grace period, SIGKILL to namespace PID 1 (it ignores HUP/INT/QUIT/TERM),
which makes the kernel kill everything in the namespace, every cvmfs2
included.  Killing cvmfsexec or unshare instead would leave the namespace
running.
"""

from __future__ import annotations

import array
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import structlog
import trio

from cvmfsd import launch
from cvmfsd.launch import Dist, LaunchError, LaunchPlan
from cvmfsd.mountinfo import Mount, fuse_mounts, parse_mountinfo
from cvmfsd.shim import exit_status
from cvmfsd.timeline import mark

log = structlog.get_logger("cvmfsd.session")

KILL_WAIT = 5.0  # seconds to wait for cvmfsexec after SIGKILL of namespace PID 1
DRAIN_WAIT = 1.0  # after cvmfsexec's exit, for what it and the shim said before it
REMOUNT_SLACK = 15.0  # beyond the mount timeout, for the shim's unmount and its check
_CRED = launch.CRED


@dataclass(frozen=True)
class Line:
    stream: str
    text: str
    at: float = field(default_factory=time.monotonic)  # when it was read


@dataclass(frozen=True)
class Message:
    body: Mapping[str, object]
    pid: int | None


@dataclass(frozen=True)
class Exited:
    status: int


@dataclass(frozen=True)
class Stop:
    """A request to end the run: a signal to cvmfsd, or ``cvmfsctl stop`` (as SIGTERM).

    ``signum`` decides the exit status of a run stopped before its payload ran:
    128 + ``signum``, in every mode, as a shell reports a command a signal ended.
    """

    reason: str
    signum: int = signal.SIGTERM


Event = Union[Line, Message, Exited, Stop]
ReadyCallback = Callable[["ReadyInfo"], Awaitable[None]]


@dataclass(frozen=True)
class ReadyInfo:
    """What is known once every repository is verified."""

    repos: Mapping[str, Mapping[str, object]]
    shim_pid: int | None = None
    ns_init_pid: int | None = None


@dataclass
class Outcome:
    """How a session ended: the exit status cvmfsd should return, and why."""

    status: int
    reason: str
    stopped: bool = False
    details: dict[str, object] = field(default_factory=dict)


def _kill(pid: int | None, signum: int, what: str) -> None:
    if pid is None or not launch.send_signal(pid, signum):
        return
    log.info("signal sent", target=what, pid=pid, signal=signal.Signals(signum).name)


def _kill_group(pgid: int, signum: int, what: str, *, quiet: bool = False) -> None:
    if not launch.send_signal(pgid, signum, group=True):
        return
    if not quiet:
        log.info("signal sent", target=what, pgid=pgid, signal=signal.Signals(signum).name)


class _Child:
    """A process started outside trio, waited for without blocking the loop.

    A pidfd becomes readable when the process exits (Linux >= 5.3); older
    kernels fall back to a worker thread blocked in waitpid.  Every caller of
    :meth:`wait` waits in its own task, on its own pidfd: a shielded clean-up
    must learn of the exit even after the session's other tasks were cancelled
    (waiting for an event that a cancelled task would have set cost a full
    ``KILL_WAIT``).
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.returncode: int | None = None

    async def wait(self) -> int:
        """The exit status (negative for a signal), once the process has exited."""
        if self.returncode is None:
            try:
                pidfd = os.pidfd_open(self.pid)
            except (AttributeError, OSError):  # no pidfds, or already reaped by another waiter
                code = await trio.to_thread.run_sync(self.popen.wait, abandon_on_cancel=True)
            else:
                try:
                    await trio.lowlevel.wait_readable(pidfd)
                finally:
                    os.close(pidfd)
                code = self.popen.wait()  # the waiters that woke first may have reaped it
            self.returncode = code
        return self.returncode


class Mode3Session:
    """cvmfsexec in mode 3 with the shim and the payload inside.

    Args:
        plan: what to run.
        grace: seconds the payload gets between SIGTERM and SIGKILL.
        mount_timeout: seconds allowed from start until every repository is verified.
        on_ready: awaited once, when every repository is verified.
        on_progress: called with (index, total, repo, at) as each mount starts,
            ``at`` the :func:`time.monotonic` moment it did.
        on_ns_init: called with namespace PID 1's pid once it is known.
        on_payload_exited: called when the shim reports the payload's end: the
            namespace ends next, and what it takes with it is expected.
    """

    def __init__(self, plan: LaunchPlan, *, grace: float, mount_timeout: float,
                 on_ready: ReadyCallback,
                 on_progress: Callable[[int, int, str, float], None],
                 on_ns_init: Callable[[int], None] = lambda pid: None,
                 on_payload_exited: Callable[[], None] = lambda: None) -> None:
        self.plan = plan
        self.grace = grace
        self.mount_timeout = mount_timeout
        self.on_ready = on_ready
        self.on_progress = on_progress
        self.on_ns_init = on_ns_init
        self.on_payload_exited = on_payload_exited
        self.order = launch.mount_order(plan.dist, plan.repos)
        self.send_event, self._events = trio.open_memory_channel[Event](256)
        self.process: _Child | None = None
        self.shim_pid: int | None = None
        self.ns_init_pid: int | None = None
        self._channel: trio.socket.SocketType | None = None
        self._output: list[str] = []
        self._failed_repo: str | None = None
        self._payload_status: int | None = None
        self._stopping = False
        self._stop_signum: int = signal.SIGTERM  # the signal behind the stop, once stopping
        self._ended_namespace = False  # we killed it ourselves: its death is no fault
        self._ready = False
        self._mount_deadline = math.inf  # set once cvmfsexec has started
        self._pumps = 0  # open pumps of cvmfsexec's output and of the shim's channel
        self._drained = trio.Event()
        self._send_lock = trio.Lock()
        self._pending: dict[int, trio.Event] = {}
        self._answers: dict[int, Mapping[str, object]] = {}
        self._request_ids = iter(range(1, 2**62))

    # --- plumbing -------------------------------------------------------------
    async def _pump_lines(self, stream: trio.abc.ReceiveStream, name: str,
                          buffer: bytes = b"") -> None:
        """Lines of ``stream``, ``buffer`` (an unterminated line read earlier) first."""
        async with self._pumping():
            async for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    await self.send_event.send(Line(name, line.decode(errors="replace")))
            if buffer:
                await self.send_event.send(Line(name, buffer.decode(errors="replace")))

    @contextlib.asynccontextmanager
    async def _pumping(self) -> AsyncIterator[None]:
        """Count a pump as open while it runs; the last one to end sets ``_drained``."""
        self._pumps += 1
        try:
            yield
        finally:
            self._pumps -= 1
            if not self._pumps:
                self._drained.set()

    async def _pump_channel(self, sock: trio.socket.SocketType, buffer: bytes = b"",
                            pid: int | None = None) -> None:
        """The shim's messages; ``buffer`` (read earlier, from shim ``pid``) first."""
        async with self._pumping():
            await self._pump_channel_messages(sock, buffer, pid)

    async def _pump_channel_messages(self, sock: trio.socket.SocketType, buffer: bytes,
                                     pid: int | None) -> None:
        while True:
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    body = json.loads(line)
                except ValueError:
                    log.warning("unreadable message from the shim", line=line[:200])
                    continue
                if isinstance(body, dict):
                    await self.send_event.send(Message(body, pid))
            try:
                data, ancdata, _flags, _addr = await sock.recvmsg(
                    65536, socket.CMSG_SPACE(_CRED.size))
            except OSError as exc:
                # ECONNRESET: the shim died with a request of ours unread (a
                # remount racing the namespace's end).  Its exit follows.
                log.info("the shim's channel is gone", error=str(exc))
                return
            if not data:
                return
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _CRED.unpack(payload[: _CRED.size])[0]
            buffer += data

    async def _send_start_rest(self, rest: bytes) -> None:
        """The part of the queued ``start`` the socket buffer did not take (a large environment)."""
        if self._channel is None:
            raise RuntimeError("the shim channel is not open")  # a bug, not a user error
        with contextlib.suppress(OSError):  # the shim is gone: its exit follows
            async with self._send_lock:
                while rest:
                    rest = rest[await self._channel.send(rest):]

    async def _wait_exit(self, process: _Child) -> None:
        status = await process.wait()
        # What cvmfsexec and the shim said before it ended comes first: with the
        # payload's start queued, a short payload may be over (verified, run,
        # exited) before this session even began.  Every holder of the pipes and
        # of the channel has ended with the namespace; the bound is for safety.
        with trio.move_on_after(DRAIN_WAIT):
            await self._drained.wait()
        await self.send_event.send(Exited(status))

    async def _send(self, fds: Sequence[int] = (), **body: object) -> None:
        """Send the shim one message.

        Raises:
            LaunchError: the shim is gone (EPIPE, ECONNRESET); its exit follows.
        """
        if self._channel is None:
            raise RuntimeError("the shim channel is not open")  # a bug, not a user error
        data = json.dumps(body).encode() + b"\n"
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            async with self._send_lock:
                sent = await self._channel.sendmsg([data], ancdata if fds else [])
                while sent < len(data):
                    sent += await self._channel.send(data[sent:])
        except OSError as exc:
            raise LaunchError(f"the shim is gone ({exc.strerror or exc}): "
                              f"cannot send it {body.get('event')}") from None

    async def _ask_shim(self, event: str, fds: Sequence[int] = (),
                        **body: object) -> Mapping[str, object]:
        """Send the shim a request and wait for its answer (matched by id)."""
        if not self._ready or self._stopping:
            raise LaunchError(f"the namespace is not ready for {event}")
        request_id = next(self._request_ids)
        done = self._pending[request_id] = trio.Event()
        try:
            await self._send(fds, event=event, id=request_id, **body)
        except LaunchError:
            self._pending.pop(request_id, None)
            raise
        try:
            await done.wait()
        finally:  # cancelled (a caller's deadline): a late answer is dropped
            self._pending.pop(request_id, None)
        answer = self._answers.pop(request_id, None)
        if answer is None:
            raise LaunchError(f"the namespace ended before the shim answered {event}")
        return answer

    async def exec_in_namespace(self, argv: Sequence[str], fds: Sequence[int], *,
                                cwd: str | None = None,
                                env: Mapping[str, str] | None = None) -> int:
        """Run ``argv`` inside the namespace with ``fds`` as its stdin/stdout/stderr.

        The shim runs it and reports its exit status; the descriptors travel
        over the channel (SCM_RIGHTS) and the caller keeps its own copies.

        Raises:
            LaunchError: the namespace is not ready, or it ended first.
        """
        answer = await self._ask_shim("exec", fds, argv=list(argv), cwd=cwd,
                                      env=dict(env or {}))
        status = answer.get("status")
        return status if isinstance(status, int) else 1

    async def remount(self, repo: str) -> Mapping[str, object]:
        """Unmount and mount ``repo`` again inside the namespace; the shim's verification.

        Bounded by the mount timeout (plus the shim's own check): a remount
        goes through cvmfsexec's one request processor, and a cvmfs2 waiting
        for a locked workspace would hold it for good.

        Raises:
            LaunchError: the namespace is not ready, it ended first, or the
                shim did not answer in time.
        """
        limit = self.mount_timeout + REMOUNT_SLACK
        with trio.move_on_after(limit):
            if await self._restore_bind(repo) and await self._serves(repo):
                # Its cvmfs2 serves on: never unmount a repository that works.
                log.info("the repository serves again at its path; not remounted", repo=repo)
                return {"ok": True, "rebound": True}
            return await self._ask_shim("remount", repo=repo, timeout=self.mount_timeout)
        raise LaunchError(f"remounting {repo}: no answer from the namespace within {limit:g} s")

    def _table(self) -> str | None:
        """The namespace's mount table (procfs: never blocks), or None once it is gone."""
        try:
            return Path(f"/proc/{self.shim_pid}/mountinfo").read_text(errors="surrogateescape")
        except OSError:
            return None

    async def _serves(self, repo: str) -> bool:
        """Whether ``/cvmfs/<repo>`` in the namespace is a CVMFS mount serving ``repo`` now."""
        from cvmfsd.shim import CHECK_TIMEOUT, verify_repo

        mount = fuse_mounts(self._table() or "").get(f"/cvmfs/{repo}")
        if mount is None:
            return False
        path = f"/proc/{self.shim_pid}/root/cvmfs/{repo}"  # the same mount, seen from here
        result = await trio.to_thread.run_sync(verify_repo, repo, path, {path: mount},
                                               CHECK_TIMEOUT, abandon_on_cancel=True)
        return bool(result.get("ok"))

    async def _restore_bind(self, repo: str) -> bool:
        """Bind ``/cvmfs/<repo>`` again if it has no mount in the namespace (:mod:`cvmfsd.rebind`).

        Without it cvmfsexec's UMOUNTREPO fails and its MOUNTREPO does nothing,
        for good.  A failure is logged; the remount then says what is wrong.

        Returns:
            Whether it bound one.
        """
        from cvmfsd._selfexec import module_argv

        shim = self.shim_pid
        target = f"/cvmfs/{repo}"
        if shim is None:
            return False
        table = self._table()
        if table is None or any(m.mountpoint == target for m in parse_mountinfo(table)):
            return False  # mounted; or the namespace is ending, which the remount says
        source = str(self.plan.dist.mount_dir / repo)
        log.info("no mount at the repository's path in the namespace; binding it again",
                 repo=repo, path=target, source=source)
        result = await trio.run_process(
            [*module_argv("cvmfsd.rebind"), str(shim), source, target],
            check=False, capture_stdout=True, capture_stderr=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            log.warning("cannot bind the repository again", repo=repo, path=target,
                        status=result.returncode,
                        error=result.stderr.decode(errors="replace").strip())
        return result.returncode == 0

    # --- the session ------------------------------------------------------------
    async def run(self, spawned: launch.Spawned | None = None) -> Outcome:
        """React to cvmfsexec's events until it has exited; return the outcome.

        Args:
            spawned: cvmfsexec already started by :func:`launch.spawn`; by
                default it is started here.
        """
        if spawned is None:
            spawned = launch.spawn(self.plan)
        log.info("cvmfsexec started", pid=spawned.process.pid, argv=spawned.process.args)
        self.process = _Child(spawned.process)
        self._channel = trio.socket.from_stdlib_socket(spawned.channel)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._record_ns_init)
            if spawned.start_rest:
                nursery.start_soon(self._send_start_rest, spawned.start_rest)
            for name, pipe in (("stdout", spawned.process.stdout),
                               ("stderr", spawned.process.stderr)):
                if pipe is not None:
                    stream = trio.lowlevel.FdStream(os.dup(pipe.fileno()))
                    pipe.close()
                    nursery.start_soon(self._pump_lines, stream, name,
                                       spawned.early_partial.get(name, b""))
            nursery.start_soon(self._pump_channel, self._channel, spawned.early_channel,
                               spawned.early_pid)
            nursery.start_soon(self._wait_exit, self.process)
            self.on_progress(1, len(self.order), self.order[0], spawned.started)
            for at, name, text in spawned.early_lines:  # read before the session began
                self._on_line(Line(name, text, at))
            # The mount timeout counts from cvmfsexec's start, not from this session's.
            self._mount_deadline = trio.current_time() + self.mount_timeout - (
                time.monotonic() - spawned.started)
            # A LaunchError leaves the nursery by itself, not wrapped in an
            # exception group, so that callers can apply the policy to it.
            failure: LaunchError | None = None
            try:
                outcome = await self._run(nursery)
            except LaunchError as exc:
                failure = exc
            finally:
                with trio.CancelScope(shield=True):
                    await self._ensure_gone()
            nursery.cancel_scope.cancel()
        self._channel.close()
        if failure is not None:
            raise failure
        return outcome

    async def _run(self, nursery: trio.Nursery) -> Outcome:
        ready = False
        mount_deadline = self._mount_deadline
        kill_deadline: float | None = None
        while True:
            deadline = kill_deadline if kill_deadline is not None else (
                mount_deadline if not ready else float("inf"))
            with trio.move_on_at(deadline) as scope:
                event = await self._events.receive()
            if scope.cancelled_caught:
                if kill_deadline is not None:
                    self._kill_namespace("grace period over")
                    kill_deadline = trio.current_time() + KILL_WAIT
                    continue
                log.error("mount timeout", seconds=self.mount_timeout)
                self._failed_repo = self._failed_repo or "timeout"
                self._kill_namespace("repositories not ready in time")
                kill_deadline = trio.current_time() + KILL_WAIT
                continue
            if isinstance(event, Line):
                self._on_line(event)
            elif isinstance(event, Message):
                ready = await self._on_message(event) or ready
            elif isinstance(event, Stop):
                if not self._stopping:
                    self._stop_signum = event.signum
                    kill_deadline = self._begin_stop(event.reason)
            else:
                return self._finish(event.status, ready)

    def _on_line(self, line: Line) -> None:
        self._output.append(line.text)
        del self._output[:-50]
        parsed = launch.parse_mount_line(line.text, self.plan.dist)
        if parsed is None:
            log.debug("cvmfsexec", stream=line.stream, line=line.text)
        elif parsed.ok:
            log.info("mounted", repo=parsed.repo)
            index = launch.next_mount(self.order, parsed.repo)
            if index is not None and not self._ready:
                self.on_progress(index, len(self.order), self.order[index - 1], line.at)
        else:
            self._failed_repo = parsed.repo

    async def _on_message(self, message: Message) -> bool:
        body = message.body
        if body.get("event") == "verified" and self._stopping:
            # Sent before the stop reached the namespace, which is ending: never ready.
            log.info("verification received while stopping; ignored")
            return False
        if body.get("event") == "verified":
            mark("verification received")
            self.shim_pid = message.pid
            if message.pid is not None:
                parent = launch.parent_pid(message.pid)
                if parent is not None and launch.is_namespace_init(parent):
                    self.ns_init_pid = parent
            repos = body.get("repos")
            checks = repos if isinstance(repos, dict) else {}
            bad = {r: c.get("error") for r, c in checks.items()
                   if not (isinstance(c, dict) and c.get("ok"))}
            if bad:
                self._failed_repo = next(iter(bad))
                log.error("repository failed verification", problems=bad)
                await self._send(event="abort", reason=f"verification failed: {bad}")
                return False
            log.info("repositories verified", shim_pid=self.shim_pid,
                     ns_init_pid=self.ns_init_pid, repos=checks)
            # The payload went first: its start was queued before the mounts
            # (launch.spawn), and the shim took it as its check passed.
            self._ready = True
            await self.on_ready(ReadyInfo(checks, self.shim_pid, self.ns_init_pid))
            return True
        if body.get("event") in ("exec-exited", "remount-done"):
            request_id = body.get("id")
            if isinstance(request_id, int) and request_id in self._pending:
                self._answers[request_id] = body
                self._pending.pop(request_id).set()
            return False
        if body.get("event") == "exited":
            status = body.get("status")
            self._payload_status = status if isinstance(status, int) else None
            log.info("payload exited", status=self._payload_status)
            self.on_payload_exited()
        return False

    def _begin_stop(self, reason: str) -> float:
        self._stopping = True
        log.info("stopping", reason=reason, grace=self.grace)
        if self.shim_pid is not None:
            _kill(self.shim_pid, signal.SIGTERM, "shim (forwards to the payload)")
            return trio.current_time() + self.grace
        self._kill_namespace(reason, fault=False)  # nothing runs in it yet but mounts
        return trio.current_time() + KILL_WAIT

    async def _record_ns_init(self) -> None:
        """Learn namespace PID 1 as soon as it exists, not only once the shim reports.

        If cvmfsexec or unshare is killed during the mounts, the namespace
        lives on without them; knowing PID 1 is what lets us end it.  The
        search is bounded: PID 1 appears within milliseconds of the start.
        """
        with trio.move_on_after(self.mount_timeout):
            delay = 0.005
            while self._find_ns_init() is None:
                if self.process is None or self.process.returncode is not None:
                    return
                await trio.sleep(delay)
                delay = min(delay * 2, 0.2)
            log.debug("namespace PID 1 found", ns_init_pid=self.ns_init_pid)
            if self._ended_namespace:
                return  # found by the stop that killed it: nothing left to guard
            if self.ns_init_pid is not None:
                self.on_ns_init(self.ns_init_pid)

    def _find_ns_init(self) -> int | None:
        if self.ns_init_pid is None and self.process is not None:
            for pid in launch.descendants(self.process.pid):
                if launch.is_namespace_init(pid):
                    self.ns_init_pid = pid
                    break
        return self.ns_init_pid

    def _kill_namespace(self, reason: str, *, fault: bool = True) -> None:
        """SIGKILL namespace PID 1 (or, before there is one, cvmfsexec's tree).

        A warning when something went wrong (``fault``); an info line when it is
        how a stop ends a namespace that runs no payload yet.
        """
        self._ended_namespace = True
        pid = self._find_ns_init()
        (log.warning if fault else log.info)("ending the namespace", reason=reason,
                                             ns_init_pid=pid)
        if pid is not None:
            _kill(pid, signal.SIGKILL, "namespace PID 1")
        elif self.process is not None:
            # No pid namespace yet (or none at all): end the whole tree we know.
            for child in reversed(launch.descendants(self.process.pid)):
                _kill(child, signal.SIGKILL, "cvmfsexec descendant")
            _kill(self.process.pid, signal.SIGKILL, "cvmfsexec")

    async def _ensure_gone(self) -> None:
        # cvmfsexec (or its unshare) can die while the namespace lives on:
        # killing those leaves PID 1 running, so it is ended here in any case.
        init = self.ns_init_pid
        if init is not None and launch.is_namespace_init(init):
            _kill(init, signal.SIGKILL, "namespace PID 1 (outliving cvmfsexec)")
        if self.process is None or self.process.returncode is not None:
            return
        self._kill_namespace("supervisor leaving")
        with trio.move_on_after(KILL_WAIT):
            await self.process.wait()

    def _finish(self, status: int, ready: bool) -> Outcome:
        self._ready = False
        for done in self._pending.values():
            done.set()  # no answer: the callers learn the namespace is gone
        self._pending.clear()
        raw, status = status, exit_status(status)
        if self._payload_status is not None:
            return Outcome(self._payload_status, "payload exited", stopped=self._stopping)
        if self._stopping and ready:
            # The payload ran, and never reported its end: the namespace's SIGKILL
            # ended it (it outlived the grace), as a process group's does in modes 1/2.
            return Outcome(128 + signal.SIGKILL, "payload killed", stopped=True)
        if self._stopping:
            # Stopped before the payload ran: what cvmfsexec's end says is no news.
            return Outcome(128 + self._stop_signum, "stopped before the payload started",
                           stopped=True)
        if not ready or self._failed_repo is not None:
            failed = self._failed_repo if self._failed_repo != "timeout" else None
            raise launch.mount_failure(self.plan.dist, failed, raw, self._output,
                                       killed_by_us=self._ended_namespace)
        return Outcome(status, "cvmfsexec exited")


async def run_direct(argv: Sequence[str], env: Mapping[str, str], *, grace: float,
                     stops: trio.MemoryReceiveChannel[Stop]) -> Outcome:
    """Run the payload in this namespace (host /cvmfs, modes 1/2, or no CVMFS)."""
    try:
        # Its own process group, so that stopping it reaches its children too.
        process = await trio.lowlevel.open_process(list(argv), env=dict(env),
                                                   start_new_session=True)
    except OSError as exc:
        raise LaunchError(f"cannot run the payload {argv[0]!r}: {exc.strerror}") from None
    stopped = False
    async with trio.open_nursery() as nursery:

        async def stop_on_request() -> None:
            nonlocal stopped
            stop = await stops.receive()
            stopped = True
            log.info("stopping", reason=stop.reason, grace=grace)
            _kill_group(process.pid, signal.SIGTERM, "payload")
            await trio.sleep(grace)
            _kill_group(process.pid, signal.SIGKILL, "payload")

        nursery.start_soon(stop_on_request)
        status = await process.wait()
        # Whatever the payload left running in its group goes with it.
        _kill_group(process.pid, signal.SIGKILL, "payload's leftovers", quiet=True)
        nursery.cancel_scope.cancel()
    return Outcome(exit_status(status), "payload exited", stopped=stopped)


async def _run_mountrepo(dist: Dist, repo: str) -> subprocess.CompletedProcess[bytes]:
    """``mountrepo REPO`` in a process group of its own.

    A cvmfs2 that waits for a locked workspace waits for good (cvmfs.cc
    ``InitSystemFs``), so the caller bounds this; cancelled, it ends the whole
    group (mountrepo and the loader under it) with SIGKILL, and what that may
    leave is for :func:`clear_host_repo`.
    """
    async def kill_group(process: trio.Process) -> None:
        launch.send_signal(process.pid, signal.SIGKILL, group=True)

    return await trio.run_process(
        [str(dist.root / "mountrepo"), repo], check=False, capture_stdout=True,
        capture_stderr=True, stdin=subprocess.DEVNULL, start_new_session=True,
        deliver_cancel=kill_group)


def clear_host_repo(dist: Dist, repo: str) -> list[str]:
    """Leave no cvmfs2 and no mount of ``repo`` under ``dist/cvmfs``; what could not go.

    For a mount that missed its deadline (its loader may have mounted, or
    daemonised, after mountrepo was killed) and for what ``umountrepo`` could
    not unmount.  Blocking: run it in a thread.  The cvmfs2 processes go first,
    so that a lazy unmount is only ever done on a mount no cvmfs2 serves (cvmfs
    PR #1281: a lazily unmounted repository whose cvmfs2 lives on holds its
    lock, and the next mount of it hangs).
    """
    from cvmfsd import janitor

    dirs = janitor.mount_dirs(str(dist.root))
    points = {f"{d}/{repo}" for d in dirs}

    def mounted() -> list[str]:
        return [p for p in janitor.dist_mounts(janitor.read_mountinfo(), dirs) if p in points]

    for point in mounted():  # a live cvmfs2 exits by itself once unmounted
        janitor.unmount(point, lazy=False)
    procs = [p for p in janitor.find_cvmfs2(dirs) if p[2] in points]
    left = [f"cvmfs2 pid {pid}" for pid, _, _ in janitor.stop_cvmfs2(
        procs, dirs, exit_grace=janitor.EXIT_GRACE, term_grace=janitor.TERM_GRACE)]
    for point in mounted():
        if not (janitor.unmount(point, lazy=False)
                or (not left and janitor.unmount(point, lazy=True))):
            left.append(point)
    return left


async def mount_on_host(dist: Dist, repos: Sequence[str], *, repo_timeout: float,
                        on_progress: Callable[[int, int, str], None],
                        with_config_repo: bool = True) -> list[str]:
    """Modes 1 and 2: mountrepo each repository in turn and verify it.

    Each repository has ``repo_timeout`` seconds to be mounted and verified;
    missing it is a failed mount like any other (a :class:`LaunchError`, so
    the GLIDEIN_CVMFS policy decides), and leaves nothing behind.  Cancelled
    (a stop), it leaves nothing behind either: what was mounted is unmounted,
    and the repository in flight cleared, since its loader may mount (or its
    cvmfs2 daemonise) after mountrepo's group was killed.

    Returns:
        The repositories mounted, config repository first.

    Raises:
        LaunchError: a mount failed; whatever was mounted is unmounted again.
    """
    order = launch.mount_order(dist, repos) if with_config_repo else list(repos)
    mounted: list[str] = []
    in_flight: str | None = None  # mountrepo runs for it, or has just been killed
    try:
        for index, repo in enumerate(order, 1):
            on_progress(index, len(order), repo)
            deadline = trio.current_time() + repo_timeout
            result = None
            in_flight = repo
            with trio.move_on_at(deadline):
                result = await _run_mountrepo(dist, repo)
            if result is None:
                with trio.CancelScope(shield=True):
                    left = await trio.to_thread.run_sync(clear_host_repo, dist, repo)
                in_flight = None
                raise LaunchError(
                    f"mounting {repo}: not mounted within {repo_timeout:g} s"
                    + (f" (left behind: {', '.join(left)})" if left else ""),
                    repo=repo, log_tail=launch.log_tail(dist.log_file(repo)),
                    hint="raise --mount-timeout, or see " + str(dist.log_file(repo)))
            output = (result.stdout + result.stderr).decode(errors="replace").splitlines()
            if result.returncode != 0:
                raise launch.mount_failure(dist, repo, result.returncode, output)
            mounted.append(repo)
            in_flight = None  # umountrepo's from now on, with the others
            problem = await verify_host_mount(
                dist, repo, probe_timeout=max(deadline - trio.current_time(), 0.1))
            if problem:
                raise LaunchError(f"mounting {repo}: {problem}", repo=repo)
            log.info("mounted", repo=repo)
    except BaseException:
        with trio.CancelScope(shield=True):
            await unmount_on_host(dist, mounted)
            if in_flight is not None:
                left = await trio.to_thread.run_sync(clear_host_repo, dist, in_flight)
                if left:
                    log.error("left behind after an interrupted mount", repo=in_flight,
                              left=left)
        raise
    return mounted


def _host_fuse_mounts() -> dict[str, Mount]:
    return fuse_mounts(Path("/proc/self/mountinfo").read_text(errors="surrogateescape"))


async def verify_host_mount(dist: Dist, repo: str, *, probe_timeout: float) -> str | None:
    """None if ``dist/cvmfs/<repo>`` is a CVMFS mount serving ``repo``, else the problem."""
    from cvmfsd import shim

    path = str(dist.mount_dir / repo)
    mounts = _host_fuse_mounts()
    if path not in mounts:
        return f"{path} is not a FUSE mount after mountrepo reported success"
    result = await trio.to_thread.run_sync(
        shim.verify_repo, repo, path, mounts, probe_timeout,
        abandon_on_cancel=True)
    return None if result.get("ok") else str(result.get("error"))


async def unmount_on_host(dist: Dist, mounted: Sequence[str]) -> None:
    """umountrepo each repository, newest first (the config repository last); then the rest.

    Real ``umountrepo`` calls ``fusermount`` only, never ``fusermount3``
    (cvmfsexec umountrepo:73,80), and EL9 distributions are built with fuse3:
    on a node with only ``fusermount3`` it unmounts nothing.  So whatever it
    leaves mounted (or serving), cvmfsd ends and unmounts itself
    (:func:`clear_host_repo`, which uses fusermount3 where there is one).
    """
    for repo in reversed(mounted):
        with trio.move_on_after(KILL_WAIT * 2):
            result = await trio.run_process(
                [str(dist.root / "umountrepo"), repo], check=False, capture_stdout=True,
                capture_stderr=True, stdin=subprocess.DEVNULL)
            if result.returncode:
                log.info("umountrepo failed; cvmfsd unmounts it", repo=repo,
                         status=result.returncode,
                         output=result.stderr.decode(errors="replace").strip())
        mounts = _host_fuse_mounts()
        if any(str(d / repo) in mounts for d in (dist.mount_dir, dist.mount_dir.resolve())):
            left = await trio.to_thread.run_sync(clear_host_repo, dist, repo)
            if left:
                log.error("left behind after unmounting", repo=repo, left=left)
