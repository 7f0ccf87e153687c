"""The ``cvmfsd`` command line: parses arguments and maps errors to exit statuses.

Sub-commands:

* ``cvmfsd sim makedist|publish|fault`` manage the simulated CVMFS distribution
  and stratum (see :mod:`cvmfsd.sim`);
* ``cvmfsd demo`` builds a simulated distribution and runs cvmfsexec on it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cvmfsd import __version__
from cvmfsd.errors import CvmfsdError, SimError, UsageError

if TYPE_CHECKING:
    from cvmfsd.probe import Checks

Handler = Callable[[argparse.Namespace], int]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < 10**6:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds from 0 to 999999")
    return value


def _loader_code(text: str) -> int | None:
    if text == "none":
        return None
    from cvmfsd.loader import LoaderCode

    try:
        return int(LoaderCode(int(text)))
    except ValueError:
        pass
    try:
        return int(LoaderCode[text.upper()])
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a cvmfs2 loader code: expected 1-25, a name such as "
            "'catalog' or 'wpad', or 'none'"
        ) from None


def _cmd_makedist(args: argparse.Namespace) -> int:
    from cvmfsd.sim.makedist import DistError, make_dist, pack_dist

    try:
        if args.output is None or not args.dir.exists():
            if args.stratum is None:
                raise SimError(f"sim makedist: --stratum is required to make {args.dir}")
            target = make_dist(args.dir, stratum=args.stratum, config_repo=args.config_repo,
                               server_url=args.server_url, proxy=args.proxy,
                               machtype=args.machtype)
            print(f"made simulated cvmfsexec distribution {target}")
        if args.output is not None:  # makedist -o: DIR is where the distribution was made
            print(f"packed {pack_dist(args.dir, args.output)} (self-extracting)")
    except DistError as exc:
        raise SimError(str(exc)) from None
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from cvmfsd.sim import stratum

    try:
        revision = stratum.publish(args.stratum, args.repo, args.source, ttl=args.ttl)
    except stratum.StratumError as exc:
        raise SimError(str(exc)) from None
    print(f"published {args.repo} revision {revision}")
    return 0


def _cmd_fault(args: argparse.Namespace) -> int:
    from cvmfsd.sim import stratum

    knobs: dict[str, object] = {}
    if args.clear:
        knobs = dict.fromkeys(("mount_fail", "mount_delay", "crash_after", "hang_after", "eio"))
    for name in ("mount_fail", "mount_delay", "crash_after", "hang_after"):
        value = getattr(args, name)
        if value is not None:
            knobs[name] = None if value == "none" else value
    if args.eio_all:
        knobs["eio"] = "*"
    elif args.eio:
        knobs["eio"] = list(args.eio)
    if not knobs:
        raise UsageError("cvmfsd sim fault: no knob given; see 'cvmfsd sim fault --help'")
    try:
        faults = stratum.set_faults(args.stratum, args.repo, **knobs)
    except stratum.StratumError as exc:
        raise SimError(str(exc)) from None
    print(f"{args.repo}: {faults}")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    import json

    from cvmfsd import probe
    from cvmfsd.errors import UsageError
    from cvmfsd.names import repo_name_problem

    for repo in args.repos:  # as `cvmfsd run` checks them: a name never becomes a path
        problem = repo_name_problem(repo)
        if problem:
            raise UsageError(f"--repos: {problem}")
    facts = probe.probe_host(repos=args.repos)
    if args.json:
        print(json.dumps(facts.to_json(), indent=2, sort_keys=True))
    else:
        print(facts.render())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    # The probe's checks in child processes first: they run while the rest of
    # cvmfsd loads (start-up is on the critical path of every pilot).
    from cvmfsd.probe import Checks

    checks = Checks(repos=args.repos)
    try:
        return _run_checked(args, checks)
    finally:
        checks.cancel()  # if the run failed before the probe collected them


def _run_checked(args: argparse.Namespace, checks: Checks) -> int:
    from cvmfsd.config import Config

    payload = list(args.payload)
    if payload and payload[0] == "--":
        payload = payload[1:]
    # Paths as the payload and every message must name them: from any directory.
    gconfig, socket_path = (None if p is None else p.absolute()
                            for p in (args.glidein_config, args.socket))
    config = Config(
        payload=tuple(payload), repos=args.repos, dist=args.dist,
        glidein_config=gconfig, mode=args.mode, grace=args.grace,
        mount_timeout=args.mount_timeout, log_format=args.log_format,
        nonesting=not args.allow_nesting, allow_keys=tuple(args.allow_key or ()),
        socket=socket_path, allow_exec=args.allow_exec, probe_interval=args.probe_interval,
        probe_deadline=args.probe_deadline, hang_timeout=args.hang_timeout,
        metrics_address=args.metrics_address, metrics_interval=args.metrics_interval,
        metrics_textfile=args.metrics_textfile, pushgateway=args.pushgateway,
    )
    # Decide and, in mode 3, start cvmfsexec and wait for the shim's check of the
    # mounts before importing trio and structlog: the payload starts without
    # waiting for them, and they take no CPU from the mounts (start-up is on the
    # critical path of every pilot).
    from cvmfsd.prepare import prepare, wait_for_shim
    from cvmfsd.timeline import mark

    mark("prepare imported")
    prepared = prepare(config, checks=checks)
    try:
        wait_for_shim(prepared)
        mark("shim spoke")
        from cvmfsd import daemon
        from cvmfsd.log import configure_logging

        mark("daemon imported")
        configure_logging(config.log_format, level=args.log_level)
    except BaseException:
        if prepared.spawned is not None:
            prepared.spawned.process.kill()  # nothing would supervise it
        raise
    return daemon.run(config, prepared=prepared)


def _repos(text: str) -> tuple[str, ...]:
    from cvmfsd.config import split_repos

    return split_repos(text)


def _cmd_demo(args: argparse.Namespace) -> int:
    from cvmfsd.sim.demo import run_demo

    return run_demo(args.workdir, keep=args.keep)


def _add_run_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run", help="provide CVMFS and run the payload where it is",
        description="Probe the node, provide CVMFS the best way it allows (cvmfsexec mode 3, "
        "mode 1/2, or the host's /cvmfs), run PAYLOAD there, and clean up.")
    run.add_argument("--repos", type=_repos, default=(), metavar="A,B",
                     help="repositories to mount (commas or colons)")
    run.add_argument("--dist", type=Path, metavar="DIR|FILE",
                     help="cvmfsexec distribution: the directory holding cvmfsexec, a "
                          "self-extracting file made by `makedist -o` (unpacked into "
                          ".cvmfsexec beside it), or GlideinWMS's CVMFSEXEC_DIR of such files")
    run.add_argument("--glidein-config", type=Path, metavar="FILE",
                     help="GlideinWMS glidein_config to read the policy from and write back to")
    run.add_argument("--mode", default="auto", choices=("auto", "host", "3", "2", "1"),
                     help="force a mode instead of choosing one (default: %(default)s)")
    run.add_argument("--grace", type=_seconds, default=30.0, metavar="S",
                     help="seconds between SIGTERM and SIGKILL at shutdown (default: %(default)s)")
    run.add_argument("--mount-timeout", type=_seconds, default=300.0, metavar="S",
                     help="seconds allowed for mounting (default: %(default)s)")
    run.add_argument("--probe-interval", type=_seconds, default=15.0, metavar="S",
                     help="seconds between health probes of a repository (default: %(default)s)")
    run.add_argument("--probe-deadline", type=_seconds, default=5.0, metavar="S",
                     help="seconds before a probe counts as hung (default: %(default)s)")
    run.add_argument("--hang-timeout", type=_seconds, default=120.0, metavar="S",
                     help="seconds a repository may stay hung before its cvmfs2 is killed "
                     "and it is remounted (default: %(default)s)")
    run.add_argument("--allow-nesting", action="store_true",
                     help="let the payload use $CVMFSMOUNT (cvmfsexec without -N)")
    run.add_argument("--socket", type=Path, metavar="PATH",
                     help="control socket (default: control.sock in a new private directory "
                     "in $XDG_RUNTIME_DIR or /tmp)")
    run.add_argument("--allow-exec", action="store_true",
                     help="let `cvmfsctl exec` run commands inside the namespace")
    run.add_argument("--allow-key", action="append", metavar="KEY",
                     help="export this secret-looking glidein_config key anyway")
    run.add_argument("--metrics-address", default="127.0.0.1:0", metavar="HOST:PORT",
                     help="serve /metrics here; port 0 picks a free one, written to "
                          "glidein_config as CVMFSD_METRICS_ADDRESS; 'none' disables "
                          "(default: %(default)s)")
    run.add_argument("--metrics-interval", type=_seconds, default=15.0, metavar="S",
                     help="seconds between metric collections (default: %(default)g)")
    run.add_argument("--metrics-textfile", type=Path, metavar="FILE.prom",
                     help="also write the metrics to this node-exporter textfile")
    run.add_argument("--pushgateway", metavar="URL",
                     help="also push the metrics to this Pushgateway; deleted at exit")
    run.add_argument("--log-format", default="console", choices=("console", "json"))
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    run.add_argument("payload", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    run.set_defaults(handler=_cmd_run)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cvmfsd``, each sub-command bound to its handler."""
    parser = argparse.ArgumentParser(
        prog="cvmfsd", description="Provide CVMFS to a grid pilot without root."
    )
    parser.add_argument("--version", action="version", version=f"cvmfsd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run cvmfsexec on a simulated distribution")
    demo.add_argument("--workdir", type=Path, help="where to build it (default: a temp dir)")
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    demo.set_defaults(handler=_cmd_demo)

    _add_run_parser(commands)

    probe = commands.add_parser("probe", help="report what this node allows, with evidence")
    probe.add_argument("--json", action="store_true", help="machine-readable output")
    probe.add_argument("--repos", type=_repos, default=(), metavar="A,B",
                       help="repositories to look for under the host's /cvmfs")
    probe.set_defaults(handler=_cmd_probe)

    sim = commands.add_parser("sim", help="the simulated CVMFS distribution and stratum")
    simc = sim.add_subparsers(dest="sim_command", required=True, metavar="SIM_COMMAND")

    mk = simc.add_parser("makedist", help="create a simulated cvmfsexec distribution")
    mk.add_argument("dir", type=Path, help="directory to create (must not exist, unless -o "
                    "packs an existing one)")
    mk.add_argument("--stratum", type=Path, help="the stratum to serve from (required to make DIR)")
    mk.add_argument("-m", "--machtype", default="rhel9-x86_64",
                    help="machine type recorded in dist/.cvmfsexecdist (default: %(default)s)")
    mk.add_argument("-o", "--output", type=Path, metavar="FILE",
                    help="also pack DIR into the self-extracting FILE, as makedist -o does")
    mk.add_argument("--config-repo", default="config-sim.cvmfsd.test",
                    help="CVMFS_CONFIG_REPOSITORY (default: %(default)s)")
    mk.add_argument("--server-url", help="CVMFS_SERVER_URL (default: file://STRATUM/@fqrn@)")
    mk.add_argument("--proxy", default="DIRECT", help="CVMFS_HTTP_PROXY (default: %(default)s)")
    mk.set_defaults(handler=_cmd_makedist)

    pub = simc.add_parser("publish", help="publish a directory tree as a new revision")
    pub.add_argument("stratum", type=Path)
    pub.add_argument("repo", help="repository name, e.g. software.example.org")
    pub.add_argument("source", type=Path, help="directory whose contents become the repository")
    pub.add_argument("--ttl", type=int, default=240,
                     help="root catalog TTL in seconds (default: %(default)s)")
    pub.set_defaults(handler=_cmd_publish)

    fault = simc.add_parser("fault", help="set fault knobs of a repository in the stratum")
    fault.add_argument("stratum", type=Path)
    fault.add_argument("repo")
    fault.add_argument("--mount-fail", type=_loader_code, metavar="CODE",
                       help="cvmfs2 fails to mount with this loader code ('none' clears)")
    for knob, text in (("--mount-delay", "seconds before the mount completes"),
                       ("--crash-after", "seconds after mounting, cvmfs2 crashes (ENOTCONN)"),
                       ("--hang-after", "seconds after mounting, FUSE requests stall")):
        fault.add_argument(knob, type=_seconds, metavar="S", help=text)
    fault.add_argument("--eio", action="append", metavar="PATH",
                       help="reads of this repository path fail with EIO (repeatable)")
    fault.add_argument("--eio-all", action="store_true", help="every read fails with EIO")
    fault.add_argument("--clear", action="store_true", help="clear every knob first")
    fault.set_defaults(handler=_cmd_fault)
    return parser


def _report_error(args: argparse.Namespace, exc: CvmfsdError) -> None:
    """The error that ends cvmfsd: on stderr in the log's format, and for ``run`` in glidein_config.

    A glidein's set-up script reports CVMFSD_ERROR and CVMFSD_HINT to error_gen,
    whatever stage failed (the daemon records its own failures; this covers
    the ones before it starts, e.g. a bad policy attribute).
    """
    import os

    from cvmfsd.errors import ConfigError
    from cvmfsd.log import print_error

    config = getattr(args, "glidein_config", None)
    if args.command == "run" and config is not None:
        from cvmfsd.glidein import record_failure

        record_failure(config, str(exc), exc.hint, pid=os.getpid(),
                       category="Config" if isinstance(exc, ConfigError) else "WN_Resource")
    print_error(str(exc), exc.hint, getattr(args, "log_format", "console"),
                exit_status=exc.exit_status)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cvmfsd`` and return its exit status."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CvmfsdError as exc:
        _report_error(args, exc)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
