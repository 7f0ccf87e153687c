"""``cvmfsd run``: supervise what :mod:`cvmfsd.prepare` decided, and report.

Data flow: prepare (configuration, policy, probe, mode, cvmfsexec started) ->
this module (mount progress, glidein_config write-back, the payload, signals,
shutdown).  It owns the session's nursery and the one task that receives
SIGTERM, SIGINT and SIGHUP.

Exit statuses: the payload's own status when it ran; 69 (EX_UNAVAILABLE) when
CVMFS could not be provided and the policy says that fails the pilot; 2 for a
bad command line; 1 for any other cvmfsd error.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import structlog
import trio

from cvmfsd import (
    budget,
    control,
    glidein,
    janitor,
    launch,
    mode,
    mountinfo,
    protocol,
    session,
    talk,
)
from cvmfsd.collect import Collection
from cvmfsd.config import (
    EXPORT_MAX_TOTAL,
    EXPORT_MAX_VARIABLE,
    Config,
    exported_variables,
    oversized_variables,
    parse_address,
)
from cvmfsd.errors import CvmfsdError
from cvmfsd.exports import Pushgateway, Textfile
from cvmfsd.httpd import serve_metrics
from cvmfsd.janitor import process_start, signal_process
from cvmfsd.keeper import RepoKeeper
from cvmfsd.launch import LaunchError
from cvmfsd.loader import LoaderCode
from cvmfsd.metrics import Metrics, pilot_identity
from cvmfsd.prepare import Prepared, mounting_updates, prepare, ready_updates
from cvmfsd.procevents import ProcessEnded, ProcessEvents
from cvmfsd.shim import exit_status
from cvmfsd.state import DaemonState, LiveConfig, RepoState
from cvmfsd.timeline import mark

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

log = structlog.get_logger("cvmfsd.daemon")


def attempt_result(exc: LaunchError) -> str:
    """``cvmfs_mount_attempts_total``'s result label for a failed mount."""
    if exc.code is not None:
        try:
            return LoaderCode(exc.code).name.lower()
        except ValueError:
            return f"exit_{exc.code}"
    return "timeout" if "timed out" in str(exc) or "within" in str(exc) else "failed"


def _log_killed(ended: ProcessEnded) -> None:
    """Log a process of the tree that a signal killed, not by cvmfsd's doing.

    A warning, but for SIGPIPE: the kernel's answer to a write into a pipe whose
    reader has gone (a payload's ``cmd | head``), which the process brought on
    itself; it is still counted, by signal (``cvmfsd_processes_killed_total``).
    """
    logger = log.info if ended.ending.signal == "SIGPIPE" else log.warning
    logger("process killed by a signal", pid=ended.pid, comm=ended.comm,
           signal=ended.ending.signal, core=ended.ending.core)


class Supervisor:
    """One ``cvmfsd run``: launches what was prepared, supervises and reports."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.config = prepared.config
        self.state = DaemonState(
            mode=prepared.decision.mode.value, policy=prepared.decision.policy.policy.value,
            dist=str(prepared.dist.root) if prepared.dist else None,
            repos={repo: RepoState() for repo in self.config.repos},
            payload=self.config.payload, started=prepared.started[0],
            started_monotonic=prepared.started[1])
        self._exec: Callable[[protocol.ExecArgs, Sequence[int]], Awaitable[int]] | None = None
        self._provided: str | None = None  # how /cvmfs is reached: mode3, host, dist, None
        self.keeper: RepoKeeper | None = None
        # remounts a repository; returns None or what went wrong
        self._remount_hook: Callable[[str], Awaitable[str | None]] | None = None
        self.pilot = pilot_identity(prepared.values)
        self.metrics = Metrics(self.state, pilot=self.pilot)
        # when each repository's mount began (time.monotonic(): it may have begun
        # before the event loop, see cvmfsd.launch), and the progress lines shown
        self._mount_started: dict[str, float] = {}
        self._shown = prepared.spawned.shown if prepared.spawned else set()
        self.collection: Collection | None = None
        self._stop_target: Callable[[session.Stop], Awaitable[None]] | None = None
        self._settled = trio.Event()  # mounted (or running without cvmfsexec)
        # The control channel answers once this is set: at once, except when the
        # payload ran before the event loop (mode 3, see cvmfsd.launch): then once
        # the session has taken in what the payload already knows.
        self._accepting = trio.Event()
        spawned = prepared.spawned
        if spawned is None or spawned.verified is None:
            self._accepting.set()
        self._first_stop: session.Stop | None = None
        # mode 3: repositories whose last repair bound /cvmfs/<repo> again and kept
        # the cvmfs2 serving it, instead of remounting (see Mode3Session.remount)
        self._rebound: set[str] = set()
        if prepared.early_signal:  # received while cvmfsd started: stop as soon as it can
            name = signal.Signals(prepared.early_signal).name
            log.info("signal received", signal=name)
            self._first_stop = session.Stop(f"received {name}", prepared.early_signal)
            self.state.phase = "stopping"
        self._textfile: Textfile | None = None
        # A process killed while cvmfsd ends its tree is cvmfsd's doing, not a hard kill.
        self.procevents = ProcessEvents(
            on_killed=_log_killed, expected=lambda: self.state.phase in ("stopping", "done"),
            on_appeared=self._tell_janitor)
        self.metrics.killed = lambda: self.procevents.killed
        self._janitor_told = prepared.janitor is not None  # False once it cannot be told

    def _tell_janitor(self, processes: list[tuple[int, int]]) -> None:
        """The janitor kills these if cvmfsd dies: the payload's, even out of its session."""
        janitor = self.prepared.janitor
        if janitor is None or not self._janitor_told:
            return
        try:
            janitor.tell_processes(processes)
        except CvmfsdError as exc:
            self._janitor_told = False
            log.warning("the janitor cannot be told the payload's processes", error=str(exc))

    def _keeper(self, mountinfo: Callable[[], Path | None],
                probe_path: Callable[[str], Path | None]) -> RepoKeeper:
        dist = self.prepared.dist

        async def remount(repo: str) -> str | None:
            if self._remount_hook is None:
                return "no way to remount in this mode"
            return await self._remount_hook(repo)

        self.keeper = RepoKeeper(
            self.state, remount=remount, hang_timeout=self.config.hang_timeout,
            mountinfo=mountinfo, probe_path=probe_path,
            talk_socket=lambda repo: dist.talk_socket(repo) if dist else None,
            interval=self.config.probe_interval, deadline=self.config.probe_deadline,
            metrics=self.metrics)
        return self.keeper

    # --- mount progress, for the people watching and for the metrics ----------------
    def _progress(self, index: int, total: int, repo: str, at: float | None = None) -> None:
        self._mount_started[repo] = time.monotonic() if at is None else at
        if (index, repo) not in self._shown:  # cvmfsd.launch.wait_for_shim may have shown it
            self._shown.add((index, repo))
            launch.progress(index, total, repo, as_json=self.config.log_format == "json")

    def _mounted(self, repos: Sequence[str]) -> None:
        now = time.monotonic()
        for repo in repos:
            started = self._mount_started.pop(repo, None)
            if repo in self.state.repos and started is not None:
                self.metrics.mounted(repo, now - started)

    async def _watch_processes(self) -> None:
        """The process watch, from the moment the mounts are done.

        Subscribing costs ~0.2 s of CPU (a child imports pyroute2); on a 2-core
        node that slowed the mounts, which every pilot waits for.  Until then the
        session sees its own processes end (pidfds).
        """
        await self._settled.wait()
        await self.procevents.run()

    def _settle(self) -> None:
        """The repositories are mounted: collect, watch processes, and settle the heap."""
        self._settled.set()
        if self.collection is not None:
            self.collection.kick()
        # What exists now (modules, the loop, the services) lives as long as cvmfsd:
        # keep it out of the cyclic GC, whose full collections otherwise stall the event
        # loop for tens of ms (and a scrape with it) every few seconds.
        gc.freeze()

    def _mount_failed(self, exc: LaunchError) -> None:
        if exc.repo in self.state.repos:
            self.metrics.mount_failed(exc.repo, attempt_result(exc))

    # --- the control channel's view ------------------------------------------------
    def backend(self) -> control.Backend:
        """What the control verbs act on."""
        allow = self.config.allow_keys
        return control.Backend(
            state=self.state, config=LiveConfig(self.config.glidein_config, allow=allow),
            export=lambda values: exported_variables(values, allow=allow),
            locate=self._locate, mounts=self._mounts, remount=self._remount,
            stop=self._request_stop, run_exec=self._run_exec if self.config.allow_exec else None,
            metrics=self.metrics.text, classad=self.metrics.classad,
            on_request=self.metrics.requested, probe_now=self._probe_now)

    async def _probe_now(self, repo: str) -> None:
        if self.keeper is not None:
            await self.keeper.watcher.probe_now(repo)

    def _locate(self, path: str) -> Path | None:
        relative = path[len("/cvmfs/"):].lstrip("/")  # never an absolute join
        if self._provided == "mode3" and self.state.shim_pid is not None:
            return Path(f"/proc/{self.state.shim_pid}/root/cvmfs") / relative
        if self._provided == "dist" and self.prepared.dist is not None:
            return self.prepared.dist.mount_dir / relative
        if self._provided == "host":
            return Path(path)
        return None

    def _mounts(self) -> list[dict[str, str]]:
        if self._provided == "mode3" and self.state.shim_pid is not None:
            table, prefix = f"/proc/{self.state.shim_pid}/mountinfo", "/cvmfs"
        elif self._provided == "dist" and self.prepared.dist is not None:
            table, prefix = "/proc/self/mountinfo", str(self.prepared.dist.mount_dir)
        elif self._provided == "host":
            table, prefix = "/proc/self/mountinfo", "/cvmfs"
        else:
            return []
        try:
            text = Path(table).read_text(errors="replace")
        except OSError:
            return []
        return [{"mountpoint": m.mountpoint, "source": m.source, "fstype": m.fstype}
                for m in mountinfo.mounts_under(text, prefix)]

    async def _remount(self, repo: str) -> str:
        """Unmount and mount ``repo`` again, then verify it; say how it went.

        One remount of a repository at a time (see :mod:`cvmfsd.keeper`): while
        another runs, this is refused at once, with who runs it.
        """
        hook = self._remount_hook
        if self.prepared.dist is None or hook is None:
            raise OSError(f"{repo} is not mounted by this cvmfsd")
        if self.state.phase != "running":
            raise OSError(f"not remounted: cvmfsd is {self.state.phase}")
        if self.keeper is None:  # modes 1/2, between "running" and the keeper's start
            raise OSError("not remounted: cvmfsd is starting its watch; try again in a moment")
        with self.keeper.claim(repo, "a cvmfsctl remount"):
            return await self._remount_claimed(repo, hook)

    async def _remount_claimed(self, repo: str,
                               hook: Callable[[str], Awaitable[str | None]]) -> str:
        before = await self._ask_cvmfs2(repo, "pid", deadline=2.0)
        serving = self.state.repos[repo]
        self.state.repos[repo] = RepoState("remounting")
        self._rebound.discard(repo)
        problem = await hook(repo)
        if problem is None and repo in self._rebound:
            # Mode 3: /cvmfs/<repo> had lost its bind; bound again, its cvmfs2
            # serves on, and a repository that works is never unmounted.
            self._rebound.discard(repo)
            revision = await self._ask_cvmfs2(repo, "revision")
            self.state.repos[repo] = RepoState("ok", revision)
            return (f"bound again at /cvmfs/{repo}, where its mount had gone; cvmfs2 "
                    f"pid {before or '?'} serves it, revision {revision} (not remounted)")
        if (problem is None and before is not None
                and await self._ask_cvmfs2(repo, "pid", deadline=2.0) == before):
            # cvmfsexec answers a MOUNTREPO of a repository it still lists with 0,
            # and the old mount verifies: nothing was replaced (an open file or a
            # working directory kept the bind at /cvmfs busy, so UMOUNTREPO failed).
            problem = (f"cvmfs2 pid {before} still serves it: the old mount could not be "
                       "unmounted (busy: an open file or a working directory in it?)")
            self.state.repos[repo] = serving  # as it was, revision included
            raise OSError(f"not remounted: {problem}")
        if problem:
            self.state.repos[repo] = RepoState("failed", error=problem)
            raise OSError(f"remount failed: {problem}")
        revision = await self._ask_cvmfs2(repo, "revision")
        self.state.repos[repo] = RepoState("ok", revision)
        return f"remounted, revision {revision}"

    async def _ask_cvmfs2(self, repo: str, command: str, *,
                          deadline: float = talk.TALK_TIMEOUT) -> str | None:
        """What ``repo``'s cvmfs2 answers ``command`` on its talk socket (``pid``: in its own
        pid namespace), or None if it does not answer."""
        dist = self.prepared.dist
        if dist is None:
            return None
        try:
            return (await talk.talk(dist.talk_socket(repo), command,
                                    deadline=deadline)).strip() or None
        except (OSError, TimeoutError, ValueError):
            return None

    async def _request_stop(self) -> None:
        await self._stop_run(session.Stop("cvmfsctl stop"))

    async def _run_exec(self, args: protocol.ExecArgs, fds: Sequence[int]) -> int:
        if self._exec is None:
            raise LaunchError("CVMFS is not ready yet; try again once `cvmfsctl status` says "
                              "running")
        return await self._exec(args, fds)

    async def _exec_here(self, args: protocol.ExecArgs, fds: Sequence[int]) -> int:
        env = self.prepared.payload_env(dict(args.env or {}))
        try:
            result = await trio.run_process(list(args.argv), stdin=fds[0], stdout=fds[1],
                                            stderr=fds[2], cwd=args.cwd, env=env, check=False)
        except OSError as exc:
            os.write(fds[2], f"cvmfsd: exec failed: {exc.strerror}\n".encode())
            return 127 if isinstance(exc, FileNotFoundError) else 126
        return exit_status(result.returncode)

    async def record(self, **updates: str) -> None:
        """Write attributes back to glidein_config (if there is one) and log them."""
        log.info("glidein_config update", **updates)
        if self.config.glidein_config is not None:
            await trio.to_thread.run_sync(
                glidein.update_glidein_config, self.config.glidein_config, updates)

    async def _record_stopped(self) -> None:
        """cvmfsd ends in order: nothing provides CVMFS any more."""
        try:
            await self.record(CVMFSD_STATUS="stopped", GWMS_IS_CVMFS="no", CVMFS_MOUNT_DIR="")
        except CvmfsdError as exc:  # the run itself went well: say so, do not fail it
            log.warning("cannot record the end in glidein_config", error=str(exc))

    async def run(self) -> int:
        """Supervise to the end; the payload's directory is removed whatever happens."""
        mark("event loop started")
        _become_subreaper()
        self._arm_janitor_report()
        try:
            async with trio.open_nursery() as nursery:
                # First: from here on SIGTERM, SIGINT and SIGHUP stop the run in order.
                await nursery.start(self._receive_signals)
                # Adopted orphans are reaped, and the janitor told the tree, from now on;
                # those adopted before the event loop are known as such.
                spawned, janitor = self.prepared.spawned, self.prepared.janitor
                self.procevents.adopted_all_but(
                    [p.pid for p in (spawned.process if spawned else None, janitor) if p])
                await nursery.start(self.procevents.keep)
                path = await nursery.start(partial(
                    control.serve_control, self.prepared.socket_path, self.backend(),
                    listener=self.prepared.listener, accepting=self._accepting))
                self.state.socket = str(path)
                nursery.start_soon(self._watch_processes)
                pushgateway = await self._start_metrics(nursery)
                mark("control and metrics served")
                try:
                    status = await self._run()
                    await self._record_stopped()
                finally:
                    self.state.phase = "done"
                    nursery.cancel_scope.cancel()
                    with trio.CancelScope(shield=True):
                        if pushgateway is not None:
                            await pushgateway.delete()
            return status
        finally:
            if self._textfile is not None:
                self._textfile.remove()
            janitor = self.prepared.janitor
            dist = self.prepared.dist
            self.metrics.cleaned("swept", _sweep_descendants(
                keep=[janitor.pid] if janitor else [], dist=dist.root if dist else None))
            if janitor is not None:
                # Our own teardown ran: the janitor has nothing to do.
                await trio.to_thread.run_sync(janitor.close)
            shutil.rmtree(self.prepared.payload_tmp, ignore_errors=True)
            if self.prepared.socket_dir is not None:  # made for the socket
                self.prepared.socket_dir.remove()

    def _arm_janitor_report(self) -> None:
        """If cvmfsd dies, the janitor marks glidein_config failed and removes the socket
        (armed by :func:`cvmfsd.prepare.prepare` as it started the janitor)."""
        if self.prepared.janitor_problem is not None:
            log.warning("the janitor cannot report cvmfsd's death",
                        error=self.prepared.janitor_problem)

    async def _start_metrics(self, nursery: trio.Nursery) -> Pushgateway | None:
        """Serve /metrics (if asked) and start the collection loop and its exporters."""
        config, metrics = self.config, self.metrics
        address = parse_address(config.metrics_address)
        if address is not None:
            # A port another process holds is a metrics problem, never a reason to
            # deny the pilot CVMFS: say so, and serve the rest (cvmfsctl metrics,
            # the textfile, the Pushgateway).
            try:
                if self.prepared.metrics_error is not None:
                    raise self.prepared.metrics_error
                host, port = await nursery.start(partial(
                    serve_metrics, *address, metrics.render,
                    sockets=self.prepared.metrics_sockets))
            except OSError as exc:
                log.warning("cannot serve /metrics; going on without it",
                            address=config.metrics_address, error=exc.strerror or str(exc),
                            hint="choose another --metrics-address, or 127.0.0.1:0 for any "
                                 "free port; cvmfsctl metrics still answers")
            else:
                self.state.metrics_address = (f"[{host}]:{port}" if ":" in host
                                              else f"{host}:{port}")
        exporters: list[Callable[[], Awaitable[None]]] = []
        pilot = self.pilot["glidein_id"]
        if config.metrics_textfile is not None:
            self._textfile = Textfile(metrics, config.metrics_textfile, pilot=pilot)
            exporters.append(self._textfile)
        pushgateway = None
        if config.pushgateway is not None:
            pushgateway = Pushgateway(metrics, config.pushgateway, pilot=pilot)
            exporters.append(pushgateway)
        dist = self.prepared.dist

        def daemon_pid(repo: str) -> int | None:
            return self.keeper.watcher.daemon_pid(repo) if self.keeper is not None else None

        self.collection = Collection(
            metrics, talk_socket=lambda repo: dist.talk_socket(repo) if dist else None,
            daemon_pid=daemon_pid, interval=config.metrics_interval, exporters=exporters)
        nursery.start_soon(self.collection.run)
        return pushgateway

    # --- signals -------------------------------------------------------------------
    async def _receive_signals(self, *, task_status: trio.TaskStatus[None]
                               = trio.TASK_STATUS_IGNORED) -> None:
        """Turn SIGTERM, SIGINT and SIGHUP into a stop of the session under way."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                log.info("signal received", signal=name)
                await self._stop_run(session.Stop(f"received {name}", signum))

    async def _stop_run(self, stop: session.Stop) -> None:
        """Stop what runs now: the mounts of modes 1/2, the mode-3 session, or the payload.

        A stop that comes when there is nothing to stop yet (while the control
        server or the process watch start) is kept, and what starts next is
        stopped at once (:meth:`_stop_with`); the first stop kept decides the
        exit status of a run stopped before its payload ran.
        """
        if self.state.phase == "done":
            return
        self.state.phase = "stopping"
        if self._first_stop is None:
            self._first_stop = stop
        if self._stop_target is not None:
            await self._stop_target(stop)

    def _stopped(self) -> bool:
        """Whether a stop has come (a method: mypy keeps an attribute's narrowing across awaits)."""
        return self._first_stop is not None

    async def _stop_with(self, target: Callable[[session.Stop], Awaitable[None]]) -> None:
        """Signals stop ``target`` from now on (at once if one came already)."""
        self._stop_target = target
        if self._first_stop is not None:
            await target(self._first_stop)

    def _report_leftovers(self) -> None:
        leftovers, cleaned = self.prepared.leftovers, self.prepared.cleaned
        if not leftovers:
            return
        if cleaned is not None:
            self.metrics.cleaned("mount", len(cleaned.unmounted) + len(cleaned.lazily_unmounted))
            self.metrics.cleaned("process", len(cleaned.signalled))
        log.warning("cleaned up after an earlier run of this distribution",
                    mounts=[str(m.mountpoint) for m in leftovers.mounts],
                    processes=[p.pid for p in leftovers.processes],
                    clean=cleaned.clean if cleaned else None)

    def _report_glidein_config(self) -> None:
        """Bad lines, and (in one warning) the values too big to be exported."""
        for problem in self.prepared.problems:
            log.warning("glidein_config", problem=problem)
        oversized = oversized_variables(self.prepared.values, allow=self.config.allow_keys)
        if oversized:
            log.warning("glidein_config values too big for the environment: not exported; "
                        "the payload can read them with cvmfsctl get", keys=oversized,
                        limits=f"{EXPORT_MAX_VARIABLE} bytes each, {EXPORT_MAX_TOTAL} in all")

    async def _report_start(self) -> None:
        """What was decided and found before the event loop, in the log and glidein_config."""
        prepared = self.prepared
        self._report_glidein_config()
        self._report_leftovers()
        for line in prepared.decision.explain().splitlines():
            log.info("mode decision", detail=line)
        if prepared.unpacked is not None:
            unpacked = prepared.unpacked
            log.info("cvmfsexec build", file=str(unpacked.file), dist=str(unpacked.dist.root),
                     reused=unpacked.reused, why=unpacked.why)
        for updates in prepared.recorded:  # written while cvmfsd started (mode 3)
            log.info("glidein_config update", before_supervisor=True, **updates)
        if not prepared.recorded:
            await self.record(**mounting_updates(prepared))

    async def _run(self) -> int:
        prepared = self.prepared
        decision = prepared.decision
        self.state.phase = "mounting"
        await self._report_start()
        chosen = decision.mode
        if chosen in (mode.Mode.MODE3, mode.Mode.MODE2, mode.Mode.MODE1):
            try:
                return await self._run_with_dist_once_more(decision)
            except LaunchError as exc:
                self._mount_failed(exc)
                if decision.policy.failure_is_fatal:
                    log.error("cannot provide CVMFS", error=str(exc), repo=exc.repo,
                              policy=decision.policy.policy.value, log_tail=list(exc.log_tail))
                    await self.record(**glidein.failure_updates(str(exc), exc.hint))
                    raise
                log.warning("continuing without CVMFS", error=str(exc),
                            policy=decision.policy.policy.value,
                            log_tail=list(exc.log_tail))
                why = glidein.failure_updates(str(exc), exc.hint)
                await self.record(CVMFSD_ERROR=why["CVMFSD_ERROR"], CVMFSD_HINT=why["CVMFSD_HINT"])
                for repo, repo_state in self.state.repos.items():
                    if repo_state.state != "ok":
                        self.state.repos[repo] = RepoState("failed", error=str(exc))
                chosen = mode.Mode.NONE
        if chosen is mode.Mode.NONE and decision.fatal:
            error = LaunchError(f"no way to provide CVMFS here: {decision.reason}",
                                hint="run 'cvmfsd probe' for the evidence")
            await self.record(**glidein.failure_updates(str(error), error.hint))
            raise error
        is_cvmfs = "yes" if chosen is mode.Mode.HOST else "no"
        if chosen is mode.Mode.NONE:
            log.warning("running the payload without CVMFS",
                        policy=decision.policy.policy.value)
        self.state.mode = chosen.value
        if chosen is mode.Mode.HOST:
            self._provided = "host"
            for repo_state in self.state.repos.values():
                repo_state.state = "ok"
        self._exec = self._exec_here
        self.state.phase = "running"
        self._settle()
        await self.record(GWMS_IS_CVMFS=is_cvmfs, GWMS_CVMFSEXEC_MODE="0",
                          CVMFSD_STATUS="ready" if is_cvmfs == "yes" else "without-cvmfs",
                          CVMFS_MOUNT_DIR="")
        return await self._run_direct(prepared.payload_env({}))

    async def _run_with_dist_once_more(self, decision: mode.Decision) -> int:
        """:meth:`_run_with_dist`, under a policy that can go on without CVMFS tried once
        more if the attempt was killed by a signal.

        A SIGKILL of cvmfsexec, unshare or mountrepo from outside is transient
        (an OOM kill, a careless pkill): under ``preferred`` it should not cost
        the pilot CVMFS for its whole life.  A failure with a loader code, a
        timeout, or anything cvmfsd ended itself is not retried; under
        ``required`` a failure ends the glidein as before.
        """
        try:
            return await self._run_with_dist(decision)
        except LaunchError as exc:
            if (exc.signal is None or decision.policy.failure_is_fatal
                    or self.state.phase != "mounting"):
                raise
            self._mount_failed(exc)
            log.warning("the mount attempt was killed; trying once more", error=str(exc))
            if decision.mode is mode.Mode.MODE3 and self.prepared.plan is not None:
                self.prepared.spawned = launch.spawn(self.prepared.plan)
            return await self._run_with_dist(decision)

    async def _run_with_dist(self, decision: mode.Decision) -> int:
        prepared = self.prepared
        if prepared.launch_error is not None:
            raise prepared.launch_error
        dist = prepared.dist
        if dist is None:
            raise LaunchError("no cvmfsexec distribution")  # prepare() sets one or an error
        if decision.mode is mode.Mode.MODE3:
            return await self._run_mode3()
        # Modes 1 and 2: cvmfsd mounts on the host itself and unmounts after.
        mounted = await self._mount_on_host(dist)
        if mounted is None:
            return self._stopped_early() or 128 + signal.SIGTERM
        self._mounted(self.config.repos)
        self._provided = "dist"
        # The remounts under way, each with its cancel scope: a stop cancels them
        # before the final unmount, which would otherwise race a mount coming back.
        remounts: dict[trio.CancelScope, trio.Event] = {}

        async def remount_on_host(repo: str) -> str | None:
            done = trio.Event()
            with trio.CancelScope() as scope:
                remounts[scope] = done
                try:
                    if self.state.phase != "running":
                        return f"cvmfsd is {self.state.phase}: not remounted"
                    await session.unmount_on_host(dist, [repo])
                    await session.mount_on_host(
                        dist, [repo], repo_timeout=self.config.mount_timeout,
                        with_config_repo=False, on_progress=partial(
                            launch.progress, as_json=self.config.log_format == "json"))
                except LaunchError as exc:
                    return str(exc)
                finally:
                    del remounts[scope]
                    done.set()
            if scope.cancelled_caught:  # mount_on_host left nothing behind
                return "cvmfsd is stopping: not remounted"
            return None

        self._remount_hook = remount_on_host
        for repo in self.config.repos:
            self.state.repos[repo] = RepoState("ok")
        self._settle()
        self._exec = self._exec_here
        self.state.phase = "running"
        try:
            await self.record(GWMS_IS_CVMFS="yes", CVMFSD_STATUS="ready",
                              GWMS_CVMFSEXEC_MODE=str(decision.mode.cvmfsexec_mode),
                              CVMFS_MOUNT_DIR=str(dist.mount_dir))
            env = prepared.payload_env({"CVMFS_MOUNT_DIR": str(dist.mount_dir)})
            keeper = self._keeper(lambda: Path("/proc/self/mountinfo"),
                                  lambda repo: dist.mount_dir / repo)
            async with trio.open_nursery() as nursery:
                await nursery.start(keeper.run)
                status = await self._run_direct(env)
                nursery.cancel_scope.cancel()
            return status
        finally:
            self._provided = None
            with trio.CancelScope(shield=True):
                for scope, done in list(remounts.items()):
                    scope.cancel()
                    await done.wait()  # its own clean-up is shielded and bounded
                await session.unmount_on_host(dist, mounted)

    async def _mount_on_host(self, dist: launch.Dist) -> list[str] | None:
        """Modes 1/2: mount every repository on the host; None if a stop came first.

        A stop (signal or ``cvmfsctl stop``) during the mounts cancels them at
        once; :func:`session.mount_on_host` then leaves nothing mounted, the
        repository in flight included.
        """
        if self._first_stop is not None:
            return None
        mounted: list[str] | None = None
        with trio.CancelScope() as scope:

            async def stop(request: session.Stop) -> None:
                log.info("stopping the mounts", reason=request.reason)
                scope.cancel()

            await self._stop_with(stop)
            try:
                mounted = await session.mount_on_host(
                    dist, self.config.repos, repo_timeout=self.config.mount_timeout,
                    on_progress=self._progress)
            finally:
                self._stop_target = None
        if mounted is not None and self._stopped():
            # The stop came after the last mount's last checkpoint, so the cancel
            # found nothing left to cancel: take the mounts down as it would have.
            with trio.CancelScope(shield=True):
                await session.unmount_on_host(dist, mounted)
            return None
        return mounted

    def _payload_exited(self) -> None:
        """The payload is done: the namespace ends now, and that is no fault."""
        if self.state.phase == "running":
            self.state.phase = "stopping"

    def _jobs_enter(self) -> bool:
        """Mode 3: whether the glidein's jobs will see /cvmfs (see :func:`ready_updates`)."""
        listed = glidein.job_wrapper_listed(self.prepared.values)
        if listed is False:
            log.warning("jobs will not see /cvmfs: the job-wrapper fragment is not in "
                        "WRAPPER_LIST", wrapper=glidein.JOB_WRAPPER,
                        wrapper_list=self.prepared.values.get("WRAPPER_LIST"),
                        hint=f"list {glidein.JOB_WRAPPER} as a wrapper file fetched before "
                        "cvmfsd_setup.sh runs")
        return listed is not False

    async def _announce_ready(self, info: session.ReadyInfo) -> None:
        """Mode 3 is verified: glidein_config (unless written already), and the log."""
        self._jobs_enter()  # says so if they will not
        if not any(u.get("CVMFSD_STATUS") == "ready" for u in self.prepared.recorded):
            await self.record(**ready_updates(self.prepared.values))
        revisions = {repo: check.get("revision") for repo, check in info.repos.items()}
        if self.config.log_format == "json":
            log.info("ready", revisions=revisions)
        else:
            print("cvmfsd: ready: " + ", ".join(
                f"{repo} r{revision}" for repo, revision in revisions.items()),
                file=sys.stderr, flush=True)

    def _on_ns_init(self, pid: int) -> None:
        """Namespace PID 1 exists: watch it, and have the janitor guard it."""
        self.procevents.namespace_init(pid)
        janitor = self.prepared.janitor
        if janitor is not None:
            try:
                janitor.set_namespace_init(pid)
            except (ValueError, CvmfsdError) as exc:
                log.warning("the janitor cannot guard the namespace", error=str(exc))

    async def _run_mode3(self) -> int:
        plan = self.prepared.plan
        if plan is None:
            raise LaunchError("no launch plan for mode 3")  # prepare() makes one or an error

        async def ready(info: session.ReadyInfo) -> None:
            self.state.shim_pid, self.state.ns_init_pid = info.shim_pid, info.ns_init_pid
            if info.shim_pid is not None:
                self.procevents.watch(info.shim_pid)
            for repo, check in info.repos.items():
                revision = check.get("revision")
                self.state.repos[repo] = RepoState(
                    "ok", str(revision) if revision is not None else None)
            self._provided, self._exec, self.state.phase = "mode3", runner_exec, "running"
            self._mounted(list(info.repos))
            keeper.refresh()
            self._settle()
            self._accepting.set()
            await self._announce_ready(info)

        runner = session.Mode3Session(plan, grace=self.config.grace,
                                      mount_timeout=self.config.mount_timeout,
                                      on_ready=ready, on_progress=self._progress,
                                      on_ns_init=self._on_ns_init,
                                      on_payload_exited=self._payload_exited)

        async def runner_exec(args: protocol.ExecArgs, fds: Sequence[int]) -> int:
            return await runner.exec_in_namespace(args.argv, fds, cwd=args.cwd, env=args.env)

        async def remount_in_namespace(repo: str) -> str | None:
            try:
                answer = await runner.remount(repo)
            except LaunchError as exc:  # the namespace is ending: nothing to remount in
                return str(exc)
            if answer.get("rebound"):
                self._rebound.add(repo)  # for _remount_claimed's answer
            return None if answer.get("ok") else str(answer.get("error"))

        self._remount_hook = remount_in_namespace
        def shim_path(relative: str) -> Path | None:
            shim = self.state.shim_pid if self._provided == "mode3" else None
            return Path(f"/proc/{shim}/{relative}") if shim else None

        keeper = self._keeper(lambda: shim_path("mountinfo"),
                              lambda repo: shim_path(f"root/cvmfs/{repo}"))
        failure: LaunchError | None = None
        async with trio.open_nursery() as nursery:
            await self._stop_with(runner.send_event.send)
            await nursery.start(keeper.run)
            try:
                outcome = await runner.run(self.prepared.spawned)
            except LaunchError as exc:
                failure = exc  # re-raised below, outside the nursery's exception group
            finally:
                self._stop_target = None
                self._accepting.set()  # whatever became of the session
            nursery.cancel_scope.cancel()
        self._provided, self._exec = None, None
        if failure is not None:
            raise failure
        self.state.payload_status = outcome.status
        log.info("done", status=outcome.status, reason=outcome.reason, stopped=outcome.stopped)
        return outcome.status

    def _stopped_early(self) -> int | None:
        """If a stop came before the payload started: log it, and the exit status (128 + N)."""
        stop = self._first_stop
        if stop is None:
            return None
        log.info("stopped before the payload started", reason=stop.reason)
        return 128 + stop.signum

    async def _run_direct(self, env: Mapping[str, str]) -> int:
        send, receive = trio.open_memory_channel[session.Stop](1)

        async def stop(request: session.Stop) -> None:
            with contextlib.suppress(trio.WouldBlock):  # one stop is enough
                send.send_nowait(request)

        early = self._stopped_early()
        if early is not None:
            return early
        await self._stop_with(stop)
        try:
            outcome = await session.run_direct(self.config.payload, env,
                                               grace=self.config.grace, stops=receive)
        finally:
            self._stop_target = None
        self.state.payload_status = outcome.status
        log.info("done", status=outcome.status, reason=outcome.reason, stopped=outcome.stopped)
        return outcome.status


def _become_subreaper() -> None:
    """Adopt every orphan of our process tree, so that none escapes the final sweep."""
    try:
        from cvmfsd import _prctl

        _prctl.set_child_subreaper(1)
    except OSError as exc:  # pragma: no cover - Linux >= 3.4 has it
        log.warning("cannot become a child subreaper; orphans may escape", error=str(exc))


#: cvmfsd's own helpers, which may still be starting when a short run ends (the
#: process-watch subscription) or outlive a probe: ending them is no leftover.
_OWN_HELPERS = (b"-m cvmfsd.procevents --subscribe ", b"probe_child.py --serve",
                b"-m cvmfsd.probe_child --serve")  # the last one: from the bundle


#: How long the final sweep lets the distribution's cvmfs2 processes end by themselves.
CVMFS2_END_WAIT = 1.0


def _let_cvmfs2_end(dist: Path, timeout: float = CVMFS2_END_WAIT) -> None:
    """Wait up to ``timeout`` s until no descendant is a cvmfs2 of ``dist`` (or its helper).

    In modes 1 and 2 a cvmfs2 ends moments after its unmount, and the shared
    cache manager (``cvmfs2 __cachemgr__``) once its last client has gone: not
    leftovers, only not gone yet when the sweep comes.  One still there after
    ``timeout`` (its mount could not be unmounted, say) is swept as a leftover.
    """
    dirs = janitor.mount_dirs(str(dist))
    deadline = time.monotonic() + timeout
    while any(launch.is_running(pid) and janitor.is_cvmfs2_process(pid, dirs)
              for pid in launch.descendants(os.getpid())):
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)  # each look walks /proc: not too often on a busy node


def _sweep_descendants(keep: Sequence[int] = (), dist: Path | None = None) -> int:
    """SIGKILL whatever is still running below us when we are done.

    As a child subreaper, cvmfsd inherits the orphans of its tree (a cvmfs2
    that lost its parent, a payload's daemonised child), so this is the last
    word on "no process left behind".  The cvmfs2 processes of ``dist`` first
    get a moment to end by themselves (:func:`_let_cvmfs2_end`).  Returns how
    many it killed.
    """
    if dist is not None:
        _let_cvmfs2_end(dist)
    killed = 0
    # Each one as it was when found (pid and start time), as the janitor does:
    # a pid that ends and is reused meanwhile by another process is not signalled.
    found = [(pid, process_start(pid)) for pid in launch.descendants(os.getpid())]
    for pid, start in reversed(found):
        if pid in keep or start is None or not launch.is_running(pid):
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            argv = b""
        if not signal_process((pid, start), signal.SIGKILL, lambda _: True):
            continue
        if not argv or any(helper in argv for helper in _OWN_HELPERS):
            # no command line: it was already exiting (its memory is gone)
            log.info("ended by the final sweep", pid=pid, argv=argv.decode(errors="replace")[:200])
            continue
        killed += 1
        log.warning("leftover process killed", pid=pid, argv=argv.decode(errors="replace")[:200])
    return killed


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def run(config: Config, *, prepared: Prepared | None = None) -> int:
    """Run the supervisor to completion; return cvmfsd's exit status.

    Raises:
        CvmfsdError: the one deliberate error that ended the run, unwrapped from
            the exception groups trio's nurseries put around it.
    """
    prepared = prepared or prepare(config)
    # After prepare: cvmfsexec and the payload keep the limit they were given.
    budget.raise_nofile_limit()
    try:
        return trio.run(Supervisor(prepared).run)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        deliberate = [e for e in leaves if isinstance(e, CvmfsdError)]
        if len(deliberate) == 1 and all(
                isinstance(e, (CvmfsdError, KeyboardInterrupt)) for e in leaves):
            raise deliberate[0] from None
        raise
