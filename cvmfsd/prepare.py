"""Everything ``cvmfsd run`` decides before its event loop starts.

Configuration and glidein_config -> policy -> host facts -> mode -> launch
plan, and in mode 3 cvmfsexec itself is started here.  This module imports
neither trio nor structlog: ``cvmfsd run`` calls it first, so that the mounts
proceed while those load (start-up is on the critical path of every pilot).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cvmfsd import _prctl, glidein, launch, mode, packed, probe
from cvmfsd._selfexec import cvmfsctl_wrapper
from cvmfsd.config import (
    Config,
    SocketDir,
    bind_socket,
    bind_tcp,
    default_socket_path,
    exported_variables,
    parse_address,
    prepare_socket_dir,
)
from cvmfsd.errors import ConfigError, CvmfsdError
from cvmfsd.janitor import (
    PAYLOAD_TMP_PREFIX,
    Janitor,
    process_start,
    signal_process,
    spawn_janitor,
)
from cvmfsd.launch import Dist, LaunchError, LaunchPlan, Spawned
from cvmfsd.leftovers import (
    DistLock,
    Leftovers,
    Report,
    clean_leftovers,
    find_leftovers,
    lock_dist,
)
from cvmfsd.timeline import mark

FORCED = {"host": mode.Mode.HOST, "3": mode.Mode.MODE3, "2": mode.Mode.MODE2,
          "1": mode.Mode.MODE1}
POLICY_VARIABLES = ("GLIDEIN_USE_CVMFSEXEC", "GLIDEIN_CVMFS", "GLIDEIN_USE_CVMFS",
                    "GLIDEIN_CVMFS_REQUIRE")
CVMFSEXEC_MODES = (mode.Mode.MODE3, mode.Mode.MODE2, mode.Mode.MODE1)
#: What ``--dist`` may name, for error messages.
DIST_FORMS = ("the directory holding cvmfsexec, a self-extracting file made by `makedist -o`, "
              "or GlideinWMS's CVMFSEXEC_DIR of cvmfsexec-<src>-<os><ver>-<arch> such files")


#: What stops a run in order; received before the supervisor runs, it is kept.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class EarlySignals:
    """Keeps the first stop signal until the supervisor takes the signals over.

    Installed before anything is created that would need cleaning up (the
    control socket, cvmfsexec): the supervisor then stops the run in order
    instead of dying of a default disposition.
    """

    def __init__(self) -> None:
        self.signum = 0
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._keep)

    def _keep(self, signum: int, _frame: object) -> None:
        self.signum = self.signum or signum


def _begin_run() -> EarlySignals:
    """From here on cvmfsd keeps stop signals, and an orphan of its tree is its to reap
    (a child subreaper: the supervisor says so if the kernel refuses)."""
    with contextlib.suppress(OSError):
        _prctl.set_child_subreaper(1)
    return EarlySignals()


@dataclass
class Prepared:
    """The decisions made before start-up, and what was started already.

    Attributes:
        launch_error: why the chosen cvmfsexec mode cannot even start (no or a
            broken distribution, one in use by another cvmfsd, cvmfsexec not
            executable); the policy decides what it means.
        dist_lock: our lock on the distribution, held until cvmfsd exits.
        unpacked: the self-extracting file ``--dist`` names, or the one chosen in
            GlideinWMS's CVMFSEXEC_DIR (``dist`` is then its ``.cvmfsexec``).
    """

    config: Config
    values: Mapping[str, str]
    problems: tuple[str, ...]
    facts: probe.HostFacts
    decision: mode.Decision
    payload_tmp: Path
    dist: Dist | None = None
    plan: LaunchPlan | None = None
    spawned: Spawned | None = None
    launch_error: LaunchError | None = None
    socket_path: Path = Path()
    #: the directory cvmfsd made for the control socket (removed at exit), or None
    socket_dir: SocketDir | None = None
    janitor: Janitor | None = None
    dist_lock: DistLock | None = None
    leftovers: Leftovers | None = None
    cleaned: Report | None = None
    unpacked: packed.Unpacked | None = None
    #: the control socket, bound and listening before anything starts (with ``start``)
    listener: socket.socket | None = None
    #: SIGTERM, SIGINT and SIGHUP received before the supervisor takes them over
    signals: EarlySignals | None = None
    #: the glidein_config updates written before the supervisor ran (mode 3)
    recorded: list[dict[str, str]] = field(default_factory=list)
    #: why the janitor cannot report cvmfsd's death, if it cannot
    janitor_problem: str | None = None
    #: /metrics, listening before anything starts (with ``start``), or why not
    metrics_sockets: list[socket.socket] = field(default_factory=list)
    metrics_error: OSError | None = None
    #: when the run began (time.time() and time.monotonic()): the payload may
    #: run well before the supervisor does, and uptime counts from here
    started: tuple[float, float] = field(default_factory=lambda: (time.time(), time.monotonic()))

    @property
    def metrics_address(self) -> str:
        """Where /metrics is served (``HOST:PORT``, ``[V6]:PORT``), or ""."""
        if not self.metrics_sockets:
            return ""
        host, port = self.metrics_sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def early_signal(self) -> int:
        """The first stop signal received before the supervisor ran (0: none)."""
        return self.signals.signum if self.signals is not None else 0

    def payload_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The payload's environment: ours, the exported glidein values, ``extra``."""
        env = dict(self.config.environ)
        env.update(exported_variables(self.values, allow=self.config.allow_keys))
        env["TMPDIR"] = str(self.payload_tmp)
        env["CVMFSD_SOCKET"] = str(self.socket_path)
        ctl = cvmfsctl_path(self.payload_tmp)
        if ctl:
            env["CVMFSCTL"] = ctl
        env.update(extra)
        return env


def userns_status(facts: probe.HostFacts) -> str:
    """HAS_UNPRIVILEGED_USER_NAMESPACES as GlideinWMS spells it."""
    if facts.userns.value:
        return "enabled"
    if facts.max_user_namespaces.value == 0:
        return "unavailable"
    if facts.userns.value is False:
        return "disabled"
    return "error"


def mounting_updates(prepared: Prepared) -> dict[str, str]:
    """What glidein_config learns as the mounts begin (CVMFSD_METRICS_ADDRESS follows)."""
    return {"HAS_UNPRIVILEGED_USER_NAMESPACES": userns_status(prepared.facts),
            "CVMFSD_PID": str(os.getpid()), "CVMFSD_STATUS": "mounting",
            "CVMFSD_SOCKET": str(prepared.socket_path),
            "CVMFSD_METRICS_ADDRESS": prepared.metrics_address,
            # for the job-wrapper fragment: what to run, what a failure means
            "CVMFSCTL": cvmfsctl_path(prepared.payload_tmp) or "",
            "CVMFSD_POLICY": prepared.decision.policy.policy.value}


def ready_updates(values: Mapping[str, str]) -> dict[str, str]:
    """What glidein_config learns once mode 3 is verified.

    GWMS_IS_CVMFS: /cvmfs exists only inside the namespace.  In a GlideinWMS
    glidein the jobs start under condor_startd, outside it, and reach it only
    through the job-wrapper fragment; elsewhere cvmfsd's payload is what uses
    CVMFS.  So "yes" unless glidein_config lists wrappers without it.
    """
    return {"GWMS_IS_CVMFS": "no" if glidein.job_wrapper_listed(values) is False else "yes",
            "GWMS_CVMFSEXEC_MODE": "3", "CVMFS_MOUNT_DIR": "", "CVMFSD_STATUS": "ready"}


def _record_early(prepared: Prepared, updates: dict[str, str]) -> None:
    """Write ``updates`` to glidein_config before the supervisor runs; it logs them."""
    if prepared.config.glidein_config is not None:
        try:
            glidein.update_glidein_config(prepared.config.glidein_config, updates)
        except CvmfsdError:
            return  # the supervisor writes them, and says what went wrong
    prepared.recorded.append(updates)


def cvmfsctl_path(directory: Path | None = None) -> str | None:
    """The cvmfsctl that belongs to this cvmfsd, for the payload's ``$CVMFSCTL``.

    From the bundle, a script in ``directory`` (the payload's TMPDIR) that runs
    the bundle's cvmfsctl: ``$CVMFSCTL`` must name one file that runs.
    """
    if directory is not None:
        wrapper = cvmfsctl_wrapper(str(directory))
        if wrapper is not None:
            return wrapper
    beside = Path(sys.executable).parent / "cvmfsctl"
    if beside.exists():
        return str(beside)
    return shutil.which("cvmfsctl")


def _find_dist(prepared: Prepared) -> Dist:
    """The distribution ``--dist`` names: a plain one, or unpacked from a self-extracting
    file (``makedist -o``) or from the file a CVMFSEXEC_DIR holds for this node."""
    config = prepared.config
    if config.dist is None:
        raise LaunchError("no cvmfsexec distribution given",
                          hint=f"pass --dist DIR or FILE ({DIST_FORMS})")
    root = config.dist.absolute()
    if not root.exists():
        raise LaunchError(f"the cvmfsexec distribution {root} (--dist) does not exist; "
                          f"expected {DIST_FORMS}",
                          hint="check --dist (cvmfsd_setup.sh passes glidein_config's "
                          "CVMFSEXEC_DIR)" if config.dist.is_absolute() else
                          f"a relative --dist is taken from the working directory, {Path.cwd()}")
    if not root.is_dir():
        prepared.unpacked = packed.unpack_file(root)
        return prepared.unpacked.dist
    if packed.is_packed_dir(root):
        source = config.environ.get("CVMFS_SRC") or prepared.values.get("CVMFS_SRC")
        prepared.unpacked = packed.unpack(root, prepared.facts, source)
        return prepared.unpacked.dist
    dist = Dist(root)
    dist.check()
    return dist


def prepare(config: Config, facts: probe.HostFacts | None = None, *,
            start: bool = True, checks: probe.Checks | None = None) -> Prepared:
    """Decide how to provide CVMFS and, in mode 3 with ``start``, start cvmfsexec.

    ``checks``: the probe's checks, started earlier for ``config.repos``.

    Raises:
        ConfigError: glidein_config or the policy attributes are unusable.
        HostUnsupported: a forced mode is impossible here.
    """
    started = time.time(), time.monotonic()
    signals = _begin_run() if start else None
    values, problems, policy = _read_policy(config)
    mark("configuration read")
    facts = facts or probe.probe_host(repos=config.repos, checks=checks)
    mark("probed")
    decision = mode.select_mode(policy, facts, forced=FORCED.get(config.mode))
    payload_tmp = Path(tempfile.mkdtemp(prefix=PAYLOAD_TMP_PREFIX,
                                        dir=config.environ.get("TMPDIR") or None)).absolute()
    try:
        socket_path, socket_dir, listener = _control_socket(config, listen=start)
    except ConfigError:
        shutil.rmtree(payload_tmp, ignore_errors=True)
        raise
    prepared = Prepared(config, values, problems, facts, decision, payload_tmp,
                        socket_path=socket_path, socket_dir=socket_dir, listener=listener,
                        signals=signals, started=started)
    if start:
        _bind_metrics(prepared)
    if decision.mode not in CVMFSEXEC_MODES:
        if start:  # the payload runs here: the janitor ends it if cvmfsd is killed
            prepared.janitor = _start_janitor(prepared)
        return prepared
    try:
        if not config.repos:
            # Nothing would be mounted, yet the run would be "ready" and tell the
            # glidein GWMS_IS_CVMFS yes: a failure to provide CVMFS, under the policy.
            raise LaunchError("no repositories given: nothing to mount",
                              hint="pass --repos A,B (GlideinWMS: GLIDEIN_CVMFS_REPOS)")
        prepared.dist = _find_dist(prepared)
        if start:
            # One cvmfsd per distribution (DistInUse otherwise), until we exit.
            prepared.dist_lock = lock_dist(prepared.dist)
            if prepared.dist_lock.exclusive:
                # No live cvmfsd owns what is there: an earlier run that was
                # hard-killed may have left stale mounts and orphan cvmfs2
                # (never another pilot's, never a live run's).
                prepared.leftovers = find_leftovers(prepared.dist)
                if prepared.leftovers:
                    prepared.cleaned = clean_leftovers(prepared.dist, prepared.leftovers)
            mark("locked, leftovers checked")
            # Started before anything mounts: if cvmfsd is SIGKILLed from here
            # on, the janitor ends the namespace or unmounts, holding the lock.
            prepared.janitor = _start_janitor(prepared)
            prepared.dist_lock.record(janitor_pid=prepared.janitor.pid)
            mark("janitor started")
        if decision.mode is mode.Mode.MODE3:
            prepared.plan = LaunchPlan(
                dist=prepared.dist, repos=config.repos, payload=config.payload,
                nonesting=config.nonesting,
                env=prepared.payload_env({"CVMFS_MOUNT_DIR": "", "CVMFSD_PID": str(os.getpid())}))
            if start:
                prepared.spawned = launch.spawn(prepared.plan)
                mark("cvmfsexec spawned")
    except LaunchError as exc:
        prepared.launch_error = exc
        if start and prepared.janitor is None:  # the payload may run without CVMFS
            prepared.janitor = _start_janitor(prepared)
    return prepared


def wait_for_shim(prepared: Prepared) -> None:
    """Mode 3: block until the shim has checked the mounts, showing the progress.

    The shim starts the payload by itself once its check passes (see
    :mod:`cvmfsd.launch`), so ``cvmfsd run`` imports the rest of itself only
    after this: the imports no longer take CPU from cvmfs2 as it mounts.  A
    stop signal (:class:`EarlySignals`) ends the wait; the supervisor then
    stops the run in order.
    """
    spawned, plan = prepared.spawned, prepared.plan
    if spawned is None or plan is None or prepared.early_signal:
        return
    order = launch.mount_order(plan.dist, plan.repos)
    as_json = prepared.config.log_format == "json"

    def show(index: int) -> None:
        spawned.shown.add((index, order[index - 1]))
        launch.progress(index, len(order), order[index - 1], as_json=as_json)

    def on_line(_stream: str, text: str) -> None:
        event = launch.parse_mount_line(text, plan.dist)
        index = launch.next_mount(order, event.repo) if event and event.ok else None
        if index is not None:
            show(index)

    _record_early(prepared, mounting_updates(prepared))
    show(1)
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = signal.set_wakeup_fd(wake_write)
    try:
        launch.wait_for_shim(spawned, until=spawned.started + prepared.config.mount_timeout,
                             wake_fd=wake_read, on_line=on_line)
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_read)
        os.close(wake_write)
    if spawned.exited_early:
        _end_orphaned_namespace()
    if spawned.checks_passed():
        # The payload runs: the glidein may go on now (cvmfsd_setup.sh waits for this).
        _record_early(prepared, ready_updates(prepared.values))


def _end_orphaned_namespace() -> None:
    """cvmfsexec ended before the shim spoke (killed mid-mount, say): SIGKILL the
    namespace it leaves behind, before the shim can start the payload in it.

    Its mount attempt has failed (the policy decides, and a kill is tried once
    more under ``preferred``); a namespace left to go on would mount and run the
    payload with nothing of cvmfsexec's to unmount after it.
    """
    for pid in launch.descendants(os.getpid()):
        start = process_start(pid)
        if start is not None and launch.is_namespace_init(pid):
            signal_process((pid, start), signal.SIGKILL, launch.is_namespace_init)


def _read_policy(
        config: Config) -> tuple[Mapping[str, str], tuple[str, ...], glidein.PolicyDecision]:
    """glidein_config's values, its bad lines, and the GLIDEIN_CVMFS policy (the
    environment's attributes win over glidein_config's)."""
    values: Mapping[str, str] = {}
    problems: tuple[str, ...] = ()
    if config.glidein_config is not None:
        parsed = glidein.read_glidein_config(config.glidein_config)
        values, problems = parsed.values, tuple(str(p) for p in parsed.problems)
    env_policy = {k: config.environ[k] for k in POLICY_VARIABLES if k in config.environ}
    return values, problems, glidein.resolve_policy({**values, **env_policy})


def _bind_metrics(prepared: Prepared) -> None:
    """/metrics, bound before anything starts: its address goes to glidein_config
    with the rest.  A port another process holds is a metrics problem, never a
    reason to deny the pilot CVMFS: the supervisor says so and serves the rest."""
    address = parse_address(prepared.config.metrics_address)
    if address is not None:
        try:
            prepared.metrics_sockets = bind_tcp(*address)
        except OSError as exc:
            prepared.metrics_error = exc


def _control_socket(config: Config, *,
                    listen: bool) -> tuple[Path, SocketDir | None, socket.socket | None]:
    """The control socket's path, the directory made for it (None for a --socket
    whose directory existed), and with ``listen`` the socket bound there.

    Everything that can be refused is refused here, before cvmfsexec starts.

    Raises:
        ConfigError: --socket is unusable, no private directory can be made, or
            the socket cannot be bound.
    """
    if config.socket is not None:
        path = config.socket
        made = prepare_socket_dir(path)
        directory = SocketDir(path.parent, private=False) if made else None
    else:
        path = default_socket_path(config.environ)
        directory = SocketDir(path.parent, private=True)
    if not listen:
        return path, directory, None
    try:
        return path, directory, bind_socket(path)
    except ConfigError:
        if directory is not None:
            directory.remove()
        raise


def _start_janitor(prepared: Prepared) -> Janitor:
    """The janitor: of the distribution only if we hold it, of the payload in any case.

    It is told at once to mark glidein_config failed and remove the control
    socket if cvmfsd dies: glidein_config may say ``ready`` before the event
    loop runs (mode 3), and a SIGKILL from then on must be reported.
    """
    lock = prepared.dist_lock
    dist = prepared.dist if lock is not None else None
    janitor = spawn_janitor(None if dist is None else dist.root,
                            payload_tmp=prepared.payload_tmp,
                            lock_fd=None if lock is None else lock.fd)
    try:
        janitor.set_reporting(glidein_config=prepared.config.glidein_config,
                              socket=prepared.socket_path)
    except (ValueError, CvmfsdError) as exc:
        prepared.janitor_problem = str(exc)  # the supervisor says so
    return janitor
