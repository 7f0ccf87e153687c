"""The in-namespace helper: verify the mounts, report ready, run the payload.

``cvmfsd run`` starts ``<dist>/cvmfsexec REPOS -- python -m cvmfsd.shim ... --
PAYLOAD``.  Inside the namespace the shim

0. unless ``--allow-nesting``, puts cvmfsexec's request FIFO out of the
   payload's reach (:func:`cvmfsd.nesting.keep_from_payload`: the FIFO's name
   removed, a user namespace of its own for itself and the payload, not
   dumpable);
1. checks every repository itself -- a FUSE mount at ``/cvmfs/<repo>`` in
   its own mount table *and* a root that answers with the right ``user.fqrn``
   within a deadline (the rule of :mod:`cvmfsd.mountinfo`) -- because
   cvmfsexec's exit statuses cannot be trusted for that (a failed
   ``$CVMFSMOUNT`` may report 0);
2. tells the supervisor the result over the socket it inherited (the
   supervisor learns the shim's host pid from the kernel, through
   SCM_CREDENTIALS, and from it namespace PID 1: the shim's parent);
3. takes the supervisor's go, which carries the payload's environment (the
   supervisor queues it before the mounts begin, so it is there at once; after
   a failed check the shim passes over it and waits for the ``abort``);
4. serves the supervisor's ``exec`` requests: a command from outside run in
   here, with the caller's own stdin/stdout/stderr passed over the socket;
5. runs the payload with the pilot's own stdout/stderr, HUP/INT/QUIT/TERM back
   to their defaults (namespace PID 1 ignores them, and ignored signals are
   inherited), forwards those signals to it, and reports how it ended.

It imports nothing but the standard library: it starts inside every namespace,
and its start-up is part of cvmfsd's overhead.

Messages are JSON objects, one per line (see :mod:`cvmfsd.launch`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from cvmfsd.mountinfo import Mount, fuse_mounts
from cvmfsd.nesting import NESTING_VARIABLES, REQUEST_TIMEOUT, Nesting, keep_from_payload
from cvmfsd.timeline import mark

FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)
CHECK_TIMEOUT = 10.0


def _fuse_mounts(path: str = "/proc/self/mountinfo") -> dict[str, Mount]:
    """Mount point -> mount, for the FUSE mounts in this namespace."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return fuse_mounts(f.read())


def _check_root(path: str, repo: str, result: dict[str, object]) -> None:
    try:
        os.stat(path)
        fqrn = os.getxattr(path, "user.fqrn").decode()
        revision = os.getxattr(path, "user.revision").decode()
    except OSError as exc:
        result["error"] = f"{path}: {exc.strerror or exc}"
        return
    if fqrn != repo:
        result["error"] = f"{path}: serves {fqrn!r}, expected {repo!r}"
        return
    result.update(ok=True, revision=revision)


def verify_repo(repo: str, path: str, mounts: dict[str, Mount],
                timeout: float = CHECK_TIMEOUT) -> dict[str, object]:
    """Check that ``path`` is a CVMFS mount serving ``repo``; return ``{"ok": bool, ...}``.

    ``mounts`` is this namespace's FUSE mounts (:func:`cvmfsd.mountinfo.fuse_mounts`);
    the mount's source is not looked at: real cvmfsexec mounts read
    ``/dev/fuse``, system mounts ``cvmfs2``.  The root is read in a daemon
    thread so that a hung FUSE daemon costs a timeout, not the shim: a thread
    stuck in the kernel cannot be cancelled, but it can be left behind.
    """
    if path not in mounts:
        return {"ok": False, "error": f"{path} is not a FUSE mount in this namespace"}
    result: dict[str, object] = {"ok": False}
    worker = threading.Thread(target=_check_root, args=(path, repo, result), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return {"ok": False, "error": f"{path} did not answer within {timeout:g} s (hung?)"}
    return result


def received_fds(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors that came as SCM_RIGHTS in a recvmsg's ancillary data."""
    found: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            found.extend(memoryview(data)[:usable].cast("i"))
    return found


class Channel:
    """The line-delimited JSON connection to the supervisor.

    Messages may carry file descriptors (SCM_RIGHTS): an ``exec`` request
    brings the caller's stdin, stdout and stderr.  ``send`` may be called
    from several threads.
    """

    MAX_FDS = 3

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._buffer = b""
        self._fds: list[int] = []
        self._lock = threading.Lock()

    def send(self, **message: object) -> None:
        data = json.dumps(message).encode() + b"\n"
        with self._lock:
            self._sock.sendall(data)

    def receive(self) -> tuple[dict[str, object], list[int]]:
        """The next message and the descriptors that came with it (the caller owns them)."""
        space = socket.CMSG_SPACE(self.MAX_FDS * 4)
        while b"\n" not in self._buffer:
            chunk, ancdata, _flags, _addr = self._sock.recvmsg(65536, space)
            self._fds += received_fds(ancdata)
            if not chunk:
                raise ConnectionError("the supervisor closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        fds, self._fds = self._fds, []
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ConnectionError(f"unexpected message from the supervisor: {line!r}")
        return message, fds


def _run_exec(channel: Channel, message: dict[str, object], fds: list[int],
              base_env: dict[str, str]) -> None:
    """Run one ``exec`` request with the caller's descriptors; report its status."""
    request_id = message.get("id")
    argv, cwd, env = message.get("argv"), message.get("cwd"), message.get("env")
    status = 127
    try:
        if not (isinstance(argv, list) and argv and len(fds) == 3):
            raise ValueError("an exec request needs argv and three descriptors")
        merged = dict(base_env)
        if isinstance(env, dict):
            merged.update({str(k): str(v) for k, v in env.items()})
        child = subprocess.Popen(
            [str(a) for a in argv], stdin=fds[0], stdout=fds[1], stderr=fds[2], env=merged,
            cwd=cwd if isinstance(cwd, str) else None, start_new_session=True,
            preexec_fn=_default_signals,  # noqa: PLW1509 - only resets signal dispositions
        )
        for fd in fds:
            os.close(fd)
        fds = []
        status = exit_status(child.wait())
    except (OSError, ValueError) as exc:
        if len(fds) == 3:
            os.write(fds[2], f"cvmfsd: exec failed: {exc}\n".encode())
        status = 126 if not isinstance(exc, FileNotFoundError) else 127
    finally:
        for fd in fds:
            os.close(fd)
    channel.send(event="exec-exited", id=request_id, status=status)


def _remount(channel: Channel, nesting: Nesting, message: dict[str, object]) -> None:
    """Unmount and mount one repository again, then verify it ourselves.

    ``timeout`` in the message (default :data:`cvmfsd.nesting.REQUEST_TIMEOUT`)
    bounds the two requests together: a stuck one is ended (see
    :mod:`cvmfsd.nesting`) and reported.  The answer comes within ``timeout`` +
    :data:`cvmfsd.nesting.UNBLOCK_WAIT` + :data:`CHECK_TIMEOUT` seconds.
    """
    repo = str(message.get("repo"))
    timeout = message.get("timeout")
    limit = float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else REQUEST_TIMEOUT
    deadline = time.monotonic() + limit
    statuses: list[int] = []
    try:
        for command in ("UMOUNTREPO", "MOUNTREPO"):
            statuses.append(nesting.request(command, repo, max(deadline - time.monotonic(), 0.1)))
        result = verify_repo(repo, f"/cvmfs/{repo}", _fuse_mounts())
    except OSError as exc:
        result = {"ok": False, "error": str(exc)}
    channel.send(event="remount-done", id=message.get("id"), statuses=statuses, **result)


def _serve_requests(channel: Channel, base_env: dict[str, str], nesting: Nesting) -> None:
    """Answer the supervisor's requests (exec, remount) until it goes away."""
    while True:
        try:
            message, fds = channel.receive()
        except (ConnectionError, OSError, ValueError):
            return
        event = message.get("event")
        if event == "exec":
            threading.Thread(target=_run_exec, args=(channel, message, fds, base_env),
                             daemon=True).start()
            continue
        for fd in fds:
            os.close(fd)
        if event == "remount":
            threading.Thread(target=_remount, args=(channel, nesting, message),
                             daemon=True).start()


def _default_signals() -> None:
    for signum in FORWARDED:
        signal.signal(signum, signal.SIG_DFL)


def exit_status(returncode: int) -> int:
    """A process's exit status as a shell reports it: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_payload(argv: Sequence[str], env: dict[str, str], stdio: Sequence[int],
                pass_fds: Sequence[int] = ()) -> int:
    """Run the payload with default signal dispositions; forward signals to it."""

    stdin, stdout, stderr = stdio
    try:
        payload = subprocess.Popen(
            list(argv), env=env, stdin=stdin, stdout=stdout, stderr=stderr,
            pass_fds=tuple(pass_fds), preexec_fn=_default_signals,  # noqa: PLW1509 - only resets signal dispositions
        )
    except OSError as exc:
        print(f"cvmfsd shim: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    mark("payload spawned")

    def forward(signum: int, _frame: object) -> None:
        payload.send_signal(signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    return exit_status(payload.wait())


USAGE = ("usage: python -m cvmfsd.shim --channel-fd FD --stdio-fds IN,OUT,ERR "
         "[--repos A,B] [--allow-nesting] -- PAYLOAD...")


class Args:
    """The shim's command line, as :meth:`cvmfsd.launch.LaunchPlan.argv` writes it."""

    def __init__(self, argv: Sequence[str]) -> None:
        """Parse ``argv``; raise ValueError saying what is wrong.

        Parsed by hand: argparse costs some 5 ms of every start, and the shim
        starts on the payload's critical path.
        """
        self.channel_fd = -1
        self.stdio_fds: list[int] = []
        self.repos: list[str] = []
        self.allow_nesting = False
        args = list(argv)
        while args and args[0] != "--":
            option = args.pop(0)
            if option == "--allow-nesting":
                self.allow_nesting = True
                continue
            if option not in ("--channel-fd", "--stdio-fds", "--repos"):
                raise ValueError(f"unknown option {option!r}")
            if not args:
                raise ValueError(f"{option} needs a value")
            value = args.pop(0)
            if option == "--repos":
                self.repos = [r for r in value.split(",") if r]
                continue
            try:
                numbers = [int(fd) for fd in value.split(",")]
            except ValueError:
                raise ValueError(f"{option} {value!r}: expected file descriptor numbers") from None
            if option == "--channel-fd" and len(numbers) == 1:
                self.channel_fd = numbers[0]
            elif option == "--stdio-fds" and len(numbers) == 3:
                self.stdio_fds = numbers
            else:
                raise ValueError(f"{option} {value!r}: expected "
                                 f"{'one number' if option == '--channel-fd' else 'three numbers'}")
        if self.channel_fd < 0 or not self.stdio_fds:
            raise ValueError("--channel-fd and --stdio-fds are required")
        self.payload = args[1:]
        if not self.payload:
            raise ValueError("no payload after --")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cvmfsd.shim``."""
    try:
        args = Args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"cvmfsd shim: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    mark("shim started")
    if not args.allow_nesting:  # first: before any thread, before the payload
        for problem in keep_from_payload(Nesting(dict(os.environ)).fd):
            print(f"cvmfsd shim: {problem}; the payload may reach cvmfsexec's mount requests",
                  file=sys.stderr)
    stdio = args.stdio_fds
    channel = Channel(args.channel_fd)

    mounts = _fuse_mounts()
    checks = {repo: verify_repo(repo, f"/cvmfs/{repo}", mounts) for repo in args.repos}
    channel.send(event="verified", ns_pid=os.getpid(), repos=checks)
    mark("shim verified")
    go, _ = channel.receive()
    verified = all(check.get("ok") for check in checks.values())
    while go.get("event") == "start" and not verified:  # queued before the check: not ours
        go, _ = channel.receive()
    mark("shim told to start")
    if go.get("event") != "start":
        print(f"cvmfsd shim: not starting the payload: {go.get('reason', go)}", file=sys.stderr)
        return 1
    raw_env = go.get("env")
    env = {str(k): str(v) for k, v in raw_env.items()} if isinstance(raw_env, dict) else {}
    nesting = Nesting(dict(os.environ))
    pass_fds: tuple[int, ...] = ()
    if args.allow_nesting and nesting.fd is not None:
        env.update({k: os.environ[k] for k in NESTING_VARIABLES if k in os.environ})
        pass_fds = (nesting.fd,)
    threading.Thread(target=_serve_requests, args=(channel, env, nesting), daemon=True).start()
    status = run_payload(args.payload, env, stdio, pass_fds)
    channel.send(event="exited", status=status)
    return status


if __name__ == "__main__":
    sys.exit(main())
