"""``cvmfsctl``: the client of a running cvmfsd's control channel.

Its start-up is a target (at most 2.5x ``python -c pass``): pilots and jobs
run it often, e.g. ``$(cvmfsctl get KEY)`` in scripts.  So the simple verbs
(``get KEY``, ``ping``, ``status``, ...) take a fast path that needs only
os, sys, socket and json: the request is the protocol's JSON built by hand,
and a successful answer is read with ``json.loads``.  Everything else --
``--help``, ``exec``, ``wait``, any error answer -- goes through argparse and
the sans-IO :mod:`cvmfsd.protocol`, which stays the one definition of the
protocol (a test checks that the fast path's requests parse there
identically).  The socket is ``--socket`` or ``$CVMFSD_SOCKET`` (exported
inside the namespace).

Exit statuses: 0 success; 2 bad command line; 3 no cvmfsd is listening there;
124 no answer in time; 141 the reader of stdout went away (as for a tool killed by
SIGPIPE), 74 stdout cannot be written (a full disk); otherwise the status that
goes with the daemon's error code (see :mod:`cvmfsd.protocol`: 1 not found,
77 refused, 69 unavailable, ...); for ``exec`` and ``enter``, the command's own
exit status.  ``enter`` (:mod:`cvmfsd.enter`) has a fast path of its own: it
joins the namespace with setns instead of asking cvmfsd to run the command.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: they cost more than the whole fast path
    import argparse
    import socket

    from cvmfsd import protocol

NOT_RUNNING = 3
NO_ANSWER = 124
READER_GONE = 141  # 128 + SIGPIPE: what a C tool killed by it returns (`cvmfsctl env | head -1`)
CANNOT_WRITE = 74  # EX_IOERR
CLIENT_TIMEOUT = 30.0


class CtlError(Exception):
    """Ends cvmfsctl with a message and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def call(path: str, verb: str, args: dict[str, object] | None = None, *,
         timeout: float | None = CLIENT_TIMEOUT, fds: Sequence[int] = ()) -> protocol.Response:
    """Send one request to the cvmfsd at ``path`` and return its response."""
    import array
    import socket

    from cvmfsd import protocol
    from cvmfsd.errors import LocalProtocolError, RemoteProtocolError

    try:
        data = protocol.encode_request(verb, args)
    except LocalProtocolError as exc:
        raise CtlError(str(exc), 2) from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            _connect(sock, path, timeout)
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
        except PermissionError as exc:
            raise CtlError(f"cannot connect to cvmfsd at {path}: {exc.strerror} (the socket "
                           "serves only the uid that runs cvmfsd)",
                           protocol.ErrorCode.REFUSED.exit_status) from None
        except OSError as exc:
            raise CtlError(f"cannot talk to cvmfsd at {path}: {exc.strerror or exc}",
                           protocol.ErrorCode.UNAVAILABLE.exit_status) from None
        except RemoteProtocolError as exc:
            raise CtlError(str(exc), protocol.ErrorCode.INTERNAL.exit_status) from None


def _connect(sock: socket.socket, path: str, timeout: float | None) -> None:
    """Connect, waiting while the server's backlog is full (a unix socket's connect then
    fails with EAGAIN at once instead of waiting out the timeout)."""
    import socket
    import time

    end = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
        except BlockingIOError:
            if end is not None and time.monotonic() > end:
                raise socket.timeout from None
            time.sleep(0.005)
        else:
            return


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
    "metrics": lambda r: str(r.get("text", "")).rstrip("\n"),
    "classad": lambda r: str(r.get("text", "")).rstrip("\n"),
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


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` finds it ($COLUMNS, stdout, 80)."""
    with contextlib.suppress(ValueError):
        if int(os.environ.get("COLUMNS", "")) > 0:
            return int(os.environ["COLUMNS"])
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80
    except (ValueError, OSError):  # not a terminal, or closed
        return 80


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cvmfsctl``.

    Its help formatters take the terminal's width without importing shutil,
    which argparse's do as each argument is added: some 2.7 ms (with bz2 and
    lzma) of every ``cvmfsctl`` start, which jobs pay for every ``get``.
    """
    import argparse

    from cvmfsd import protocol

    def quick(base: type[argparse.HelpFormatter]) -> type[argparse.HelpFormatter]:
        class Formatter(base):  # type: ignore[valid-type,misc]
            def __init__(self, prog: str, indent_increment: int = 2,
                         max_help_position: int = 24, width: int | None = None) -> None:
                super().__init__(prog, indent_increment, max_help_position,
                                 _columns() - 2 if width is None else width)
        return Formatter

    class Parser(argparse.ArgumentParser):  # its sub-command parsers are Parsers too
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("formatter_class", quick(argparse.HelpFormatter))
            super().__init__(*args, **kwargs)

    parser = Parser(prog="cvmfsctl", description="Talk to a running cvmfsd.")
    parser.add_argument("--socket", help="control socket (default: $CVMFSD_SOCKET)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON result")
    parser.add_argument("--version", action="version", version=_version())
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    for name, text in (("ping", "is cvmfsd alive?"), ("status", "mode, repositories, payload"),
                       ("env", "glidein variables as `export K='v'` lines, for eval"),
                       ("config", "every visible glidein_config value"),
                       ("mounts", "what is mounted where, inside the namespace"),
                       ("metrics", "the Prometheus metrics, in the text format"),
                       ("classad", "ClassAd lines for an HTCondor startd cron"),
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
    enter = verbs.add_parser(
        "enter", help="run a command in cvmfsd's namespace as our own child (setns)",
        formatter_class=quick(argparse.RawDescriptionHelpFormatter), description=ENTER_HELP)
    enter.add_argument("argv", nargs=argparse.REMAINDER, metavar="[--] COMMAND [ARGS...]")
    return parser


ENTER_HELP = """\
Run COMMAND where the payload runs, with /cvmfs.

Mode 3: COMMAND joins cvmfsd's namespace (setns; no --allow-exec needed, the
kernel admits only processes of cvmfsd's own uid) and stays a descendant of
cvmfsctl: same cgroup, limits, environment, session, terminal and working
directory, the payload's uid.  It is in the namespace's pid namespace, so it
ends when the namespace ends.  TERM (HTCondor's soft kill), INT, HUP, QUIT,
USR1 and USR2 sent to cvmfsctl are passed on; if cvmfsctl is killed, even
with SIGKILL, COMMAND and everything it started are killed; when COMMAND
exits, what it left running inside is killed.  If the kernel refuses setns,
the error names the namespace and why; then, only if cvmfsd runs with
--allow-exec, COMMAND runs through cvmfsd's shim instead.

Modes 1 and 2, the host's /cvmfs, or no CVMFS: there is no namespace, and
COMMAND simply runs in place of cvmfsctl (in modes 1 and 2 the repositories
are under CVMFS_MOUNT_DIR, see `cvmfsctl get CVMFS_MOUNT_DIR`).

Exit status: COMMAND's (128+N if a signal N ended it); 69 cvmfsd not ready
or its namespace gone; 77 setns refused (and no exec fallback); 126/127
COMMAND cannot run / not found; 3 no cvmfsd at the socket.
"""


def _version() -> str:
    from cvmfsd import __version__

    return f"cvmfsctl {__version__}"


# verb -> the name of its one argument (None: takes none); the fast path's verbs.
# Only questions, which may be asked twice: on anything but a plain answer the
# full client sends the request again and explains what went wrong, and a second
# remount or stop would act again (remount and stop take the full path).
FAST_VERBS = {"ping": None, "status": None, "env": None, "config": None, "mounts": None,
              "metrics": None, "classad": None, "get": "key"}


def _leading_options(argv: Sequence[str]) -> tuple[list[str], str | None, bool] | None:
    """(the rest, --socket or $CVMFSD_SOCKET, --json) after the global options; None if
    there is another option (argparse's business)."""
    rest, path, as_json = list(argv), os.environ.get("CVMFSD_SOCKET"), False
    while rest and rest[0].startswith("-"):
        if rest[0] == "--json":
            as_json = True
            del rest[0]
        elif rest[0] == "--socket" and len(rest) > 1:
            path = rest[1]
            del rest[:2]
        else:
            return None
    return rest, path, as_json


def fast_request(argv: Sequence[str]) -> tuple[str, str, bool, bytes] | None:
    """(socket, verb, --json, request bytes) if ``argv`` is simple enough, else None."""
    leading = _leading_options(argv)
    if leading is None:
        return None
    rest, path, as_json = leading
    if not rest or rest[0] not in FAST_VERBS or not path:
        return None
    verb, params = rest[0], rest[1:]
    name = FAST_VERBS[verb]
    if len(params) != (1 if name else 0) or any(p.startswith("-") for p in params):
        return None
    request: dict[str, object] = {"v": 1, "verb": verb}
    if name:
        request["args"] = {name: params[0]}
    return path, verb, as_json, json.dumps(request, separators=(",", ":")).encode() + b"\n"


def _fast(argv: Sequence[str]) -> int | None:
    """Run a simple command without argparse or the protocol module; None: not handled."""
    simple = fast_request(argv)
    if simple is None:
        return None
    path, verb, as_json, data = simple
    # The C socket alone: socket.py brings selectors and builds its enums, some 3 ms
    # of every start on Python 3.9, for nothing this path uses.
    import _socket

    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(CLIENT_TIMEOUT)
            sock.connect(path)
            sock.sendall(data)
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    return None  # let the full client explain
                answer += chunk
        finally:
            sock.close()
        response = json.loads(answer)
    except (OSError, ValueError):
        return None  # the full client retries and reports it properly
    if not (isinstance(response, dict) and response.get("ok") is True and "result" in response
            and response.get("v") == 1):
        return None
    result = response["result"]
    if as_json:
        text = json.dumps(result, indent=2, sort_keys=True)
    else:
        text = _mounts_human(result) if verb == "mounts" else _human(verb, result)
    return _output(verb, text)


def _output(verb: str, text: str) -> int:
    """Write the answer to stdout (one write, flushed here); cvmfsctl's exit status.

    Python ignores SIGPIPE, so a reader that went away (``cvmfsctl env | head -1``)
    is an EPIPE, and a full disk an ENOSPC: neither is a traceback.  The first ends
    quietly as a C tool killed by SIGPIPE would; the second says what failed.
    Either way stdout is pointed at /dev/null, so that the interpreter's own flush
    at exit does not fail again.  A stdout closed from the start (``>&-``) is
    None, and the answer goes nowhere, as print() would have it.
    """
    if sys.stdout is None:
        return 0
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except OSError as exc:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        if isinstance(exc, BrokenPipeError):
            return READER_GONE
        print(f"cvmfsctl: {verb}: cannot write the answer to standard output: {exc.strerror}",
              file=sys.stderr)
        return CANNOT_WRITE
    return 0


def _request(args: argparse.Namespace) -> tuple[dict[str, object], float | None, tuple[int, ...]]:
    """The verb's arguments, the client-side timeout, and the descriptors to pass."""
    if args.verb == "get":
        return {"key": args.key}, CLIENT_TIMEOUT, ()
    if args.verb == "wait":
        return {"path": args.path, "timeout": args.timeout}, args.timeout + CLIENT_TIMEOUT, ()
    if args.verb == "remount":
        return {"repo": args.repo}, CLIENT_TIMEOUT, ()
    if args.verb == "exec":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            raise CtlError("exec needs a command: cvmfsctl exec -- COMMAND [ARGS...]", 2)
        return {"argv": command, "cwd": os.getcwd()}, None, (0, 1, 2)
    return {}, CLIENT_TIMEOUT, ()


def _print(args: argparse.Namespace, result: object) -> int:
    if args.verb == "exec" and isinstance(result, dict):
        status = result.get("status")
        return status if isinstance(status, int) else 1
    if args.json:
        return _output(args.verb, json.dumps(result, indent=2, sort_keys=True))
    if args.verb == "mounts":
        return _output(args.verb, _mounts_human(result))
    return _output(args.verb, _human(args.verb, result))


def enter_request(argv: Sequence[str]) -> tuple[str | None, list[str]] | None:
    """(socket, command) for ``[--socket S] enter [--] COMMAND...``; None: not that simple."""
    leading = _leading_options(argv)
    if leading is None:
        return None
    rest, path, _ = leading
    if rest[:1] != ["enter"]:
        return None
    command = rest[1:]
    if command[:1] == ["--"]:
        command = command[1:]
    elif not command or command[0].startswith("-"):
        return None  # --help, or a mistake: argparse explains
    return path, command


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cvmfsctl`` and return its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    entering = enter_request(argv)
    if entering is not None:
        from cvmfsd import enter

        return enter.main(*entering)
    status = _fast(argv)
    if status is not None:
        return status
    args = build_parser().parse_args(argv)
    if args.verb == "enter":
        from cvmfsd import enter

        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        return enter.main(args.socket or os.environ.get("CVMFSD_SOCKET"), command)
    try:
        path = args.socket or os.environ.get("CVMFSD_SOCKET")
        if not path:
            raise CtlError("no socket: set CVMFSD_SOCKET (cvmfsd exports it to its payload) "
                           "or pass --socket", 2)
        request, timeout, fds = _request(args)
        response = call(path, args.verb, request or None, timeout=timeout, fds=fds)
    except CtlError as exc:
        print(f"cvmfsctl: {exc}", file=sys.stderr)
        return exc.status
    if response.error is not None:
        print(f"cvmfsctl: {args.verb}: {response.error.message}", file=sys.stderr)
        return response.error.code.exit_status
    return _print(args, response.result)
