"""``cvmfsd run``: from configuration to the payload's exit status.

The steps follow the data: configuration and glidein_config -> policy -> host
probe -> mode decision -> launch -> supervise -> report.  This module owns the
session's nursery and the one task that receives SIGTERM, SIGINT and SIGHUP.

Exit statuses: the payload's own status when it ran; 69 (EX_UNAVAILABLE) when
CVMFS could not be provided and the policy says that fails the pilot; 2 for a
bad command line; 1 for any other cvmfsd error.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import structlog
import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from cvmfsd import glidein, launch, mode, probe, session
from cvmfsd.config import Config, exported_variables
from cvmfsd.errors import ConfigError, CvmfsdError
from cvmfsd.launch import Dist, LaunchError

log = structlog.get_logger("cvmfsd.daemon")

FORCED = {"host": mode.Mode.HOST, "3": mode.Mode.MODE3, "2": mode.Mode.MODE2,
          "1": mode.Mode.MODE1}


def progress(index: int, total: int, repo: str) -> None:
    """Print a progress line for a pilot's log (stderr; stdout is the payload's)."""
    print(f"cvmfsd: mounting {index}/{total}: {repo}", file=sys.stderr, flush=True)


def userns_status(facts: probe.HostFacts) -> str:
    """HAS_UNPRIVILEGED_USER_NAMESPACES as GlideinWMS spells it."""
    if facts.userns.value:
        return "enabled"
    if facts.max_user_namespaces.value == 0:
        return "unavailable"
    if facts.userns.value is False:
        return "disabled"
    return "error"


class Supervisor:
    """One ``cvmfsd run``: decides, launches, supervises and reports."""

    def __init__(self, config: Config, facts: probe.HostFacts | None = None) -> None:
        self.config = config
        self.facts = facts
        self.values: Mapping[str, str] = {}
        if config.glidein_config is not None:
            parsed = glidein.read_glidein_config(config.glidein_config)
            for problem in parsed.problems:
                log.warning("glidein_config", problem=str(problem))
            self.values = parsed.values
        self.payload_tmp = Path(tempfile.mkdtemp(
            prefix="cvmfsd-payload-", dir=config.environ.get("TMPDIR") or None))

    async def record(self, **updates: str) -> None:
        """Write attributes back to glidein_config (if there is one) and log them."""
        log.info("glidein_config update", **updates)
        if self.config.glidein_config is not None:
            await trio.to_thread.run_sync(
                glidein.update_glidein_config, self.config.glidein_config, updates)

    def payload_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The payload's environment: ours, the exported glidein values, ``extra``."""
        env = dict(self.config.environ)
        env.update(exported_variables(self.values, allow=self.config.allow_keys))
        env["TMPDIR"] = str(self.payload_tmp)
        env.update(extra)
        return env

    def decide(self) -> tuple[mode.Decision, probe.HostFacts]:
        """Resolve the policy, probe the node and choose a mode."""
        policy = glidein.resolve_policy({**self.values, **_policy_env(self.config.environ)})
        facts = self.facts or probe.probe_host(repos=self.config.repos)
        forced = FORCED.get(self.config.mode)
        decision = mode.select_mode(policy, facts, forced=forced)
        for line in decision.explain().splitlines():
            log.info("mode decision", detail=line)
        return decision, facts

    async def run(self) -> int:
        try:
            return await self._run()
        finally:
            shutil.rmtree(self.payload_tmp, ignore_errors=True)

    async def _run(self) -> int:
        decision, facts = await trio.to_thread.run_sync(self.decide)
        await self.record(HAS_UNPRIVILEGED_USER_NAMESPACES=userns_status(facts),
                          CVMFSD_PID=str(os.getpid()), CVMFSD_STATUS="mounting")
        chosen = decision.mode
        if chosen in (mode.Mode.MODE3, mode.Mode.MODE2, mode.Mode.MODE1):
            try:
                return await self._run_with_dist(decision)
            except LaunchError as exc:
                if decision.policy.failure_is_fatal:
                    log.error("cannot provide CVMFS", error=str(exc), repo=exc.repo,
                              policy=decision.policy.policy.value, log_tail=list(exc.log_tail))
                    await self.record(GWMS_IS_CVMFS="no", CVMFSD_STATUS="failed")
                    raise
                log.warning("continuing without CVMFS", error=str(exc),
                            policy=decision.policy.policy.value,
                            log_tail=list(exc.log_tail))
                chosen = mode.Mode.NONE
        if chosen is mode.Mode.NONE and decision.fatal:
            await self.record(GWMS_IS_CVMFS="no", CVMFSD_STATUS="failed")
            raise LaunchError(f"no way to provide CVMFS here: {decision.reason}",
                              hint="run 'cvmfsd probe' for the evidence")
        is_cvmfs = "yes" if chosen is mode.Mode.HOST else "no"
        if chosen is mode.Mode.NONE:
            log.warning("running the payload without CVMFS",
                        policy=decision.policy.policy.value)
        await self.record(GWMS_IS_CVMFS=is_cvmfs, GWMS_CVMFSEXEC_MODE="0",
                          CVMFSD_STATUS="ready" if is_cvmfs == "yes" else "without-cvmfs",
                          CVMFS_MOUNT_DIR="")
        return await self._run_direct(self.payload_env({}))

    def _dist(self) -> Dist:
        if self.config.dist is None:
            raise ConfigError("no cvmfsexec distribution given",
                              hint="pass --dist DIR (the directory holding cvmfsexec)")
        dist = Dist(self.config.dist.absolute())
        dist.check()
        return dist

    async def _run_with_dist(self, decision: mode.Decision) -> int:
        dist = self._dist()
        number = str(decision.mode.cvmfsexec_mode)
        if decision.mode is mode.Mode.MODE3:
            return await self._run_mode3(dist)
        # Modes 1 and 2: cvmfsd mounts on the host itself and unmounts after.
        mounted = await session.mount_on_host(
            dist, self.config.repos, repo_timeout=self.config.mount_timeout,
            on_progress=progress)
        try:
            await self.record(GWMS_IS_CVMFS="yes", GWMS_CVMFSEXEC_MODE=number,
                              CVMFSD_STATUS="ready",
                              CVMFS_MOUNT_DIR=str(dist.mount_dir))
            env = self.payload_env({"CVMFS_MOUNT_DIR": str(dist.mount_dir)})
            return await self._run_direct(env)
        finally:
            with trio.CancelScope(shield=True):
                await session.unmount_on_host(dist, mounted)

    async def _run_mode3(self, dist: Dist) -> int:
        plan = launch.LaunchPlan(
            dist=dist, repos=self.config.repos, payload=self.config.payload,
            nonesting=self.config.nonesting, env=self.payload_env({"CVMFS_MOUNT_DIR": ""}))

        async def ready(info: session.ReadyInfo) -> None:
            await self.record(GWMS_IS_CVMFS="yes", GWMS_CVMFSEXEC_MODE="3", CVMFS_MOUNT_DIR="",
                              CVMFSD_STATUS="ready")
            print("cvmfsd: ready: " + ", ".join(
                f"{repo} r{check.get('revision')}" for repo, check in info.repos.items()),
                file=sys.stderr, flush=True)

        runner = session.Mode3Session(plan, grace=self.config.grace,
                                      mount_timeout=self.config.mount_timeout,
                                      on_ready=ready, on_progress=progress)
        failure: LaunchError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_relay_signals, runner.send_event.send)
            try:
                outcome = await runner.run()
            except LaunchError as exc:
                failure = exc  # re-raised below, outside the nursery's exception group
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        log.info("done", status=outcome.status, reason=outcome.reason, stopped=outcome.stopped)
        return outcome.status

    async def _run_direct(self, env: Mapping[str, str]) -> int:
        send, receive = trio.open_memory_channel[session.Stop](1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_relay_signals, send.send)
            outcome = await session.run_direct(self.config.payload, env,
                                               grace=self.config.grace, stops=receive)
            nursery.cancel_scope.cancel()
        return outcome.status


def _policy_env(environ: Mapping[str, str]) -> dict[str, str]:
    names = ("GLIDEIN_USE_CVMFSEXEC", "GLIDEIN_CVMFS", "GLIDEIN_USE_CVMFS",
             "GLIDEIN_CVMFS_REQUIRE")
    return {name: environ[name] for name in names if name in environ}


async def _relay_signals(send: Callable[[session.Stop], Awaitable[None]]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal received", signal=signal.Signals(signum).name)
            await send(session.Stop(f"received {signal.Signals(signum).name}"))


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def run(config: Config, *, facts: probe.HostFacts | None = None) -> int:
    """Run the supervisor to completion; return cvmfsd's exit status.

    Raises:
        CvmfsdError: the one deliberate error that ended the run, unwrapped from
            the exception groups trio's nurseries put around it.
    """
    try:
        return trio.run(Supervisor(config, facts).run)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        deliberate = [e for e in leaves if isinstance(e, CvmfsdError)]
        if len(deliberate) == 1 and all(
                isinstance(e, (CvmfsdError, KeyboardInterrupt)) for e in leaves):
            raise deliberate[0] from None
        raise
