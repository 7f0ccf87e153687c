"""Everything ``cvmfsd run`` decides before its event loop starts.

Configuration and glidein_config -> policy -> host facts -> mode -> launch
plan, and in mode 3 cvmfsexec itself is started here.  This module imports
neither trio nor structlog: ``cvmfsd run`` calls it first, so that the mounts
proceed while those load (start-up is on the critical path of every pilot).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cvmfsd import glidein, launch, mode, packed, probe
from cvmfsd._selfexec import cvmfsctl_wrapper
from cvmfsd.config import Config, default_socket_path, exported_variables, prepare_socket_dir
from cvmfsd.errors import ConfigError
from cvmfsd.janitor import PAYLOAD_TMP_PREFIX, Janitor, spawn_janitor
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


@dataclass
class Prepared:
    """The decisions made before start-up, and what was started already.

    Attributes:
        launch_error: why the chosen cvmfsexec mode cannot even start (no or a
            broken distribution, one in use by another cvmfsd, cvmfsexec not
            executable); the policy decides what it means.
        dist_lock: our lock on the distribution, held until cvmfsd exits.
        unpacked: the self-extracting file chosen when ``--dist`` is GlideinWMS's
            CVMFSEXEC_DIR (``dist`` is then its ``.cvmfsexec``).
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
    #: the private directory made for the default socket (removed at exit), or None
    socket_dir: Path | None = None
    janitor: Janitor | None = None
    dist_lock: DistLock | None = None
    leftovers: Leftovers | None = None
    cleaned: Report | None = None
    unpacked: packed.Unpacked | None = None

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
    """The distribution ``--dist`` names: a plain one, or unpacked from a CVMFSEXEC_DIR."""
    config = prepared.config
    if config.dist is None:
        raise LaunchError("no cvmfsexec distribution given",
                          hint="pass --dist DIR (the directory holding cvmfsexec)")
    root = config.dist.absolute()
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
    values: Mapping[str, str] = {}
    problems: tuple[str, ...] = ()
    if config.glidein_config is not None:
        parsed = glidein.read_glidein_config(config.glidein_config)
        values, problems = parsed.values, tuple(str(p) for p in parsed.problems)
    env_policy = {k: config.environ[k] for k in POLICY_VARIABLES if k in config.environ}
    policy = glidein.resolve_policy({**values, **env_policy})
    mark("configuration read")
    facts = facts or probe.probe_host(repos=config.repos, checks=checks)
    mark("probed")
    decision = mode.select_mode(policy, facts, forced=FORCED.get(config.mode))
    payload_tmp = Path(tempfile.mkdtemp(prefix=PAYLOAD_TMP_PREFIX,
                                        dir=config.environ.get("TMPDIR") or None)).absolute()
    try:
        socket_path, socket_dir = _socket_path(config)
    except ConfigError:
        shutil.rmtree(payload_tmp, ignore_errors=True)
        raise
    prepared = Prepared(config, values, problems, facts, decision, payload_tmp,
                        socket_path=socket_path, socket_dir=socket_dir)
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


def _socket_path(config: Config) -> tuple[Path, Path | None]:
    """The control socket's path, and the private directory made for it (None for --socket).

    Everything that can be refused is refused here, before cvmfsexec starts.

    Raises:
        ConfigError: --socket is unusable, or no private directory can be made.
    """
    if config.socket is not None:
        prepare_socket_dir(config.socket)
        return config.socket, None
    path = default_socket_path(config.environ)
    return path, path.parent


def _start_janitor(prepared: Prepared) -> Janitor:
    """The janitor: of the distribution only if we hold it, of the payload in any case."""
    lock = prepared.dist_lock
    dist = prepared.dist if lock is not None else None
    return spawn_janitor(None if dist is None else dist.root, payload_tmp=prepared.payload_tmp,
                         lock_fd=None if lock is None else lock.fd)
