"""``cvmfsctl``: the client of a running cvmfsd's control channel.

Its start-up stays light -- only the standard library and the sans-IO
:mod:`cvmfsd.protocol`; no trio, pyroute2 or prometheus -- because pilots and
jobs run it often.  It finds the socket in ``--socket`` or ``$CVMFSD_SOCKET``
(exported inside the namespace).

Exit statuses: 0 success; 2 bad command line; 3 no cvmfsd is listening there;
124 no answer in time; otherwise the status that goes with the daemon's error
code (see :mod:`cvmfsd.protocol`: 1 not found, 77 refused, 69 unavailable,
...); for ``exec``, the command's own exit status.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence

from cvmfsd import protocol
from cvmfsd.errors import LocalProtocolError, RemoteProtocolError

NOT_RUNNING = 3
NO_ANSWER = 124
CLIENT_TIMEOUT = 30.0


class CtlError(Exception):
    """Ends cvmfsctl with a message and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def call(path: str, verb: str, args: dict[str, object] | None = None, *,
         timeout: float | None = CLIENT_TIMEOUT, fds: Sequence[int] = ()) -> protocol.Response:
    """Send one request to the cvmfsd at ``path`` and return its response."""
    try:
        data = protocol.encode_request(verb, args)
    except LocalProtocolError as exc:
        raise CtlError(str(exc), 2) from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = sock.sendmsg([data], ancdata if fds else [])
            sock.sendall(data[sent:])
            client = protocol.ClientConnection()
            while True:
                event = client.next_event()
                if isinstance(event, protocol.Response):
                    return event
                if event is protocol.EOF:
                    raise CtlError(f"cvmfsd at {path} closed the connection without answering",
                                   protocol.ErrorCode.INTERNAL.exit_status)
                client.receive_data(sock.recv(65536))
        except socket.timeout:
            raise CtlError(f"no answer from cvmfsd at {path} within {timeout:g} s",
                           NO_ANSWER) from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise CtlError(f"no cvmfsd is listening at {path}", NOT_RUNNING) from None
        except RemoteProtocolError as exc:
            raise CtlError(str(exc), protocol.ErrorCode.INTERNAL.exit_status) from None


def _status_lines(result: dict[str, object]) -> str:
    lines = [f"{key}: {result.get(key)}" for key in
             ("mode", "policy", "phase", "socket", "metrics_address", "uptime_seconds")]
    repos = result.get("repos")
    for name, repo in (repos.items() if isinstance(repos, dict) else ()):
        if isinstance(repo, dict):
            error = f" ({repo.get('error')})" if repo.get("error") else ""
            lines.append(f"repo {name}: {repo.get('state')}, revision {repo.get('revision')}"
                         f"{error}")
    payload = result.get("payload")
    if isinstance(payload, dict):
        argv = payload.get("argv")
        status = payload.get("status")
        state = "running" if status is None else f"exited {status}"
        lines.append(f"payload: {' '.join(map(str, argv or []))} ({state})")
    return "\n".join(lines)


_HUMAN: dict[str, Callable[[dict[str, object]], str]] = {
    "ping": lambda r: f"cvmfsd {r.get('version')} is alive (protocol {r.get('protocol')})",
    "get": lambda r: str(r.get("value", "")),
    "env": lambda r: str(r.get("shell", "")).rstrip("\n"),
    "config": lambda r: "\n".join(f"{k} {v}" for k, v in r.items()),
    "status": _status_lines,
    "wait": lambda r: f"{r.get('path')} exists",
    "remount": lambda r: f"{r.get('repo')}: {r.get('answer')}".rstrip(),
    "stop": lambda r: "cvmfsd is stopping",
}


def _human(verb: str, result: object) -> str:
    """How a person reads ``result``; ``--json`` shows it raw."""
    if not isinstance(result, dict) or verb not in _HUMAN:
        return json.dumps(result, indent=2)
    return _HUMAN[verb](result)


def _mounts_human(result: object) -> str:
    if not isinstance(result, list):
        return json.dumps(result)
    return "\n".join(f"{m.get('mountpoint')} {m.get('source')} {m.get('fstype')}"
                     for m in result if isinstance(m, dict))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cvmfsctl``."""
    parser = argparse.ArgumentParser(prog="cvmfsctl", description="Talk to a running cvmfsd.")
    parser.add_argument("--socket", help="control socket (default: $CVMFSD_SOCKET)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON result")
    parser.add_argument("--version", action="version", version=_version())
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    for name, text in (("ping", "is cvmfsd alive?"), ("status", "mode, repositories, payload"),
                       ("env", "glidein variables as `export K='v'` lines, for eval"),
                       ("config", "every visible glidein_config value"),
                       ("mounts", "what is mounted where, inside the namespace"),
                       ("stop", "stop the payload and cvmfsd")):
        verbs.add_parser(name, help=text)
    get = verbs.add_parser("get", help="one glidein_config value")
    get.add_argument("key")
    wait = verbs.add_parser("wait", help="wait until a path under /cvmfs exists")
    wait.add_argument("path")
    wait.add_argument("--timeout", type=float, default=protocol.DEFAULT_WAIT_TIMEOUT,
                      help="seconds (default: %(default)g)")
    remount = verbs.add_parser("remount", help="reload a repository")
    remount.add_argument("repo")
    run = verbs.add_parser("exec", help="run a command inside the namespace, with our stdio")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    return parser


def _version() -> str:
    from cvmfsd import __version__

    return f"cvmfsctl {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cvmfsctl`` and return its exit status."""
    args = build_parser().parse_args(argv)
    path = args.socket or os.environ.get("CVMFSD_SOCKET")
    if not path:
        print("cvmfsctl: no socket: set CVMFSD_SOCKET (cvmfsd exports it to its payload) or "
              "pass --socket", file=sys.stderr)
        return 2
    request: dict[str, object] = {}
    timeout: float | None = CLIENT_TIMEOUT
    fds: Sequence[int] = ()
    if args.verb == "get":
        request = {"key": args.key}
    elif args.verb == "wait":
        request = {"path": args.path, "timeout": args.timeout}
        timeout = args.timeout + CLIENT_TIMEOUT
    elif args.verb == "remount":
        request = {"repo": args.repo}
    elif args.verb == "exec":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            print("cvmfsctl: exec needs a command: cvmfsctl exec -- COMMAND [ARGS...]",
                  file=sys.stderr)
            return 2
        request = {"argv": command, "cwd": os.getcwd()}
        timeout, fds = None, (0, 1, 2)
    try:
        response = call(path, args.verb, request or None, timeout=timeout, fds=fds)
    except CtlError as exc:
        print(f"cvmfsctl: {exc}", file=sys.stderr)
        return exc.status
    if not response.ok:
        assert response.error is not None  # noqa: S101 - Response guarantees it
        print(f"cvmfsctl: {args.verb}: {response.error.message}", file=sys.stderr)
        return response.error.code.exit_status
    if args.verb == "exec" and isinstance(response.result, dict):
        status = response.result.get("status")
        return status if isinstance(status, int) else 1
    if args.json:
        print(json.dumps(response.result, indent=2, sort_keys=True))
    elif args.verb == "mounts":
        print(_mounts_human(response.result))
    else:
        print(_human(args.verb, response.result))
    return 0
