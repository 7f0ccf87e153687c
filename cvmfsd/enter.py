"""``cvmfsctl enter``: run a command inside cvmfsd's mode-3 namespace by ``setns``.

In mode 3, ``/cvmfs`` exists only in the namespace cvmfsexec made.  ``enter``
joins that namespace from outside and runs the command there as a descendant
of the caller: same cgroup, rlimits, environment, session and terminal, the
payload's uid, the caller's working directory.  In modes 1 and 2, with the
host's ``/cvmfs`` or without CVMFS there is no namespace: the command simply
runs (``exec``), as it would without cvmfsctl.

Like the rest of cvmfsctl's fast path it needs only the standard library (and
ctypes for ``setns`` on Pythons before 3.12 and for ``prctl``).

Theory of operation
===================

*Which namespaces.*  ``unshare -rm -pf`` made an *outer* user namespace (fake
root) that owns the mount and pid namespaces; the payload -- and the shim,
whose host pid cvmfsd's ``status`` reports -- run in a user namespace nested
in it (``unshare -U``).  The kernel lets a process of the same uid join the
outer one (its owner), which gives it every capability there, enough to join
the mount and pid namespaces it owns, and then the nested one, where it has
the payload's uid.  So the order is outer user -> mnt -> pid -> payload user.
All four files are opened first: once the mount namespace is joined,
``/proc`` is the namespace's own and the host pids are gone.  The outer user
namespace is the owner of the mount namespace (ioctl ``NS_GET_USERNS``); on
kernels without that ioctl it is found among the shim's ancestors
(``unshare`` itself).  Each file is checked against the namespace ids in
``status`` (``shim_namespaces``), so a reused pid cannot lead elsewhere; when
cvmfsctl already runs in that mount namespace it just runs the command.

*Processes.*  ``setns(CLONE_NEWPID)`` moves only later children, so cvmfsctl
(P) forks a *keeper* (K) that is in the namespace's pid namespace, and K
forks the command (C)::

    caller -> cvmfsctl (P, host pid ns) -> keeper (K, namespace) -> COMMAND (C)

K is a child subreaper: whatever C leaves behind (even daemonized) is
re-parented to K, not to the namespace's PID 1.  P and K share a pipe; P
writes the numbers of the signals it forwards into it, and its end closes
when P dies however it dies -- SIGKILL included.  K then SIGKILLs C and every
descendant and reaps them: nothing of a hard-killed job stays inside.  C also
has ``PR_SET_PDEATHSIG`` = SIGKILL towards K (set in C, then K's liveness
checked, as K could have died before).  When C exits, K ends what C left
behind too, and exits with C's status (128+N for signal N), which P passes
on.  Because the namespace's pid namespace holds them, C and its
descendants also end when the namespace ends.

*Signals.*  P blocks the forwarded signals (TERM -- also HTCondor's default
``kill_sig`` --, INT, HUP, QUIT, USR1, USR2) and SIGCHLD before forking and
takes them with ``sigwaitinfo``, so none is lost.  A signal the kernel sent
(``si_code`` SI_KERNEL: ^C or a hang-up on the terminal) already reached the
whole foreground process group, C included, and is not sent twice; anything
sent with ``kill`` is forwarded.  K leaves those signals blocked; C gets the
caller's dispositions back (what the caller ignored stays ignored) and its
signal mask.

*Refusals.*  When the kernel refuses a ``setns`` (another user namespace, a
seccomp profile, a chroot...), the error names the namespace and the errno.
Only if cvmfsd allows ``exec`` (``cvmfsd run --allow-exec``) does enter fall
back to running the command through the shim, which is then *not* a
descendant of the caller.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import NamedTuple

# The signals cvmfsctl forwards.  SIGTERM is also HTCondor's soft kill: the
# submit command kill_sig defaults to SIGTERM (condor_submit(1), "kill_sig").
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1), linux/nsfs.h
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SI_KERNEL = 0x80

NOT_READY = 69  # EX_UNAVAILABLE, as the protocol's "unavailable"
REFUSED = 77  # EX_NOPERM, as the protocol's "refused"
CANNOT_RUN = 126
NOT_FOUND = 127
STATUS_TIMEOUT = 30.0

#: Modes in which there is no namespace to enter: the command runs as it is.
DIRECT_MODES = frozenset({"mode1", "mode2", "host", "none"})

#: The caller's dispositions of the forwarded signals (Python keeps SIGINT ignored if it was).
_DISPOSITIONS: Mapping[int, object] = {signum: signal.getsignal(signum) for signum in FORWARDED}

#: Use the C library's setns even where ``os.setns`` exists (Python >= 3.12); for tests.
FORCE_CTYPES = False


class EnterError(Exception):
    """Ends ``cvmfsctl enter`` with a message and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Refused(EnterError):
    """The kernel refused to let this process join (open or setns)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, REFUSED)


class Target(NamedTuple):
    """The namespace to join: the shim's pid and its namespace ids (``mnt:[...]``...)."""

    shim_pid: int
    ids: Mapping[str, str]


# -- deciding (pure) ---------------------------------------------------------------------

def plan(status: Mapping[str, object], own: Mapping[str, str]) -> Target | None:
    """Where to run, from cvmfsd's ``status`` and this process's namespace ids.

    Returns:
        None to run the command as it is (no namespace, or already in it);
        otherwise the namespace to join.

    Raises:
        EnterError: cvmfsd has no namespace to enter yet, or not any more (69).
    """
    mode, phase = status.get("mode"), status.get("phase")
    if mode in DIRECT_MODES:
        return None
    if mode != "mode3":
        raise EnterError(f"cvmfsd is not ready: it has not chosen a mode yet (mode {mode}, "
                         f"phase {phase})", NOT_READY)
    shim, ids = status.get("shim_pid"), status.get("shim_namespaces")
    if not isinstance(shim, int) or not isinstance(ids, dict) or not all(
            isinstance(ids.get(kind), str) for kind in ("mnt", "pid", "user")):
        if phase in ("starting", "mounting"):
            why = f"the namespace is not ready yet (phase {phase})"
        else:
            why = f"the namespace is gone (phase {phase})"
        raise EnterError(f"cvmfsd is in mode 3 but {why}", NOT_READY)
    if own.get("mnt") == ids["mnt"]:
        return None  # already inside
    return Target(shim, {kind: str(ids[kind]) for kind in ("mnt", "pid", "user")})


def exit_status(wait_status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for signal N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


_WHY = {
    errno.EPERM: "the kernel lets only processes of cvmfsd's own uid that are in the host's "
                 "user namespace (not in another one), not chrooted and not under a seccomp "
                 "profile that forbids setns (containers) join it",
    errno.EACCES: "the kernel lets only processes of cvmfsd's own uid that are in the host's "
                  "user namespace (not in another one) open it",
    errno.EINVAL: "joining a user namespace needs a single-threaded process",
    errno.ENOSYS: "this kernel (or a seccomp filter) does not provide setns",
}


# -- the C library -----------------------------------------------------------------------

def _libc() -> Callable[..., int]:
    """``libc.prctl``/``libc.setns`` style caller that raises OSError on -1."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def call(name: str, *args: int) -> int:
        result = int(getattr(libc, name)(*args))
        if result == -1:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return result

    return call


def setns_function() -> Callable[[int, int], None]:
    """``os.setns`` where Python has it (3.12+), else the C library's, through ctypes."""
    if hasattr(os, "setns") and not FORCE_CTYPES:
        native: Callable[[int, int], None] = os.setns
        return native
    libc = _libc()

    def setns(fd: int, nstype: int) -> None:
        libc("setns", fd, nstype)

    return setns


# -- joining -----------------------------------------------------------------------------

def own_namespaces() -> dict[str, str]:
    """This process's namespace ids, or what could be read of them."""
    own = {}
    for kind in ("mnt", "pid", "user"):
        with contextlib.suppress(OSError):
            own[kind] = os.readlink(f"/proc/self/ns/{kind}")
    return own


def _ns_inode(ns_id: str) -> int:
    """``mnt:[4026531841]`` -> 4026531841."""
    return int(ns_id[ns_id.index("[") + 1:-1])


def _open_ns(path: str, what: str, expected: str | None) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise EnterError(f"the namespace is gone: {path} does not exist", NOT_READY) from None
    except OSError as exc:
        raise Refused(f"cannot open the namespace's {what} ({path}): {exc.strerror} "
                      f"({_errno_name(exc.errno or 0)}); {_WHY.get(exc.errno or 0, '')}"
                      .rstrip("; ")) from None
    if expected is not None and os.fstat(fd).st_ino != _ns_inode(expected):
        os.close(fd)
        raise EnterError(f"{path} is not cvmfsd's namespace any more (expected {expected}): "
                         "the shim has exited", NOT_READY)
    return fd


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _outer_user_ns(mnt_fd: int, target: Target) -> int:
    """A descriptor of the user namespace that owns the mount namespace.

    ``NS_GET_USERNS`` on the mount namespace (Linux 4.9+); else the first
    ancestor of the shim that is in the namespace's mount namespace but not in
    the payload's user namespace (``unshare -rm`` itself).
    """
    import fcntl

    try:
        return int(fcntl.ioctl(mnt_fd, NS_GET_USERNS))
    except OSError:
        pass
    pid: int | None = target.shim_pid
    for _ in range(16):
        pid = _parent(pid) if pid is not None else None
        if pid is None or pid <= 1:
            break
        try:
            user = os.readlink(f"/proc/{pid}/ns/user")
            mnt = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            break
        if mnt == target.ids["mnt"] and user != target.ids["user"]:
            return _open_ns(f"/proc/{pid}/ns/user", "outer user namespace", user)
    raise Refused(f"cannot find the user namespace that owns {target.ids['mnt']}: "
                  "NS_GET_USERNS failed and no ancestor of the shim is in it")


def join(target: Target, own: Mapping[str, str]) -> None:
    """Open every namespace file, then join: outer user -> mnt -> pid -> payload user.

    Raises:
        Refused: the kernel refused to open or join one; the message names it.
        EnterError: the namespace is gone (69).
    """
    base = f"/proc/{target.shim_pid}/ns"
    mnt = _open_ns(f"{base}/mnt", "mount namespace", target.ids["mnt"])
    fds = [mnt]
    try:
        pid = _open_ns(f"{base}/pid", "pid namespace", target.ids["pid"])
        fds.append(pid)
        user = _open_ns(f"{base}/user", "payload's user namespace", target.ids["user"])
        fds.append(user)
        outer = _outer_user_ns(mnt, target)
        fds.append(outer)
        outer_id = f"user:[{os.fstat(outer).st_ino}]"
        steps = [(outer, "user", CLONE_NEWUSER, "outer user namespace", outer_id),
                 (mnt, "mnt", CLONE_NEWNS, "mount namespace", target.ids["mnt"]),
                 (pid, "pid", CLONE_NEWPID, "pid namespace", target.ids["pid"]),
                 (user, "user", CLONE_NEWUSER, "payload's user namespace", target.ids["user"])]
        setns = setns_function()
        current = dict(own)
        for fd, kind, nstype, what, ns_id in steps:
            if ns_id == current.get(kind):
                continue  # already there (e.g. no pid namespace: masked /proc)
            try:
                setns(fd, nstype)
            except OSError as exc:
                code = exc.errno or 0
                raise Refused(f"the kernel refused to join the namespace's {what} ({ns_id}): "
                              f"setns: {os.strerror(code)} ({_errno_name(code)}); "
                              f"{_WHY.get(code, 'see setns(2)')}") from None
            current[kind] = ns_id
    finally:
        for fd in fds:
            os.close(fd)


# -- running -----------------------------------------------------------------------------

def _exec(argv: Sequence[str], dispositions: Mapping[int, object],
          mask: AbstractSet[int]) -> None:
    """Replace this process with the command, with the caller's signal state; never returns."""
    for signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)  # Python ignores the first two
    for signum in FORWARDED:
        ignored = dispositions.get(signum) == signal.SIG_IGN
        signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        os.execvp(argv[0], list(argv))  # noqa: S606 - the caller's own command, as given
    except OSError as exc:
        os.write(2, f"cvmfsctl: enter: cannot run {argv[0]!r}: {exc.strerror}\n".encode())
        os._exit(NOT_FOUND if isinstance(exc, FileNotFoundError) else CANNOT_RUN)


def run_here(argv: Sequence[str]) -> int:
    """Run the command in place of cvmfsctl (there is no namespace to enter)."""
    _exec(argv, _DISPOSITIONS, signal.pthread_sigmask(signal.SIG_BLOCK, []))
    return CANNOT_RUN  # not reached


def _children() -> list[int]:
    """This process's children (the keeper is single-threaded)."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children", "rb") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:  # kernels without CONFIG_PROC_CHILDREN
        me, found = os.getpid(), []
        for name in os.listdir("/proc"):
            if name.isdigit() and _parent(int(name)) == me:
                found.append(int(name))
        return found


def end_descendants() -> None:
    """SIGKILL and reap every descendant of this process (a child subreaper).

    Killing a process re-parents its children to us, so this repeats until
    nothing is left to wait for.
    """
    while True:
        for pid in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _reap(child: int) -> int | None:
    """Reap whatever has exited; C's exit status once it has."""
    status = None
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == child:
            status = exit_status(wait_status)


def keep(reader: int, argv: Sequence[str], mask: AbstractSet[int]) -> int:
    """The keeper (K): run C, forward what P sends, end everything when C or P ends."""
    libc = _libc()
    libc("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
    keeper = os.getpid()
    child = os.fork()
    if child == 0:
        libc("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != keeper:
            os._exit(128 + signal.SIGKILL)  # the keeper died before the line above
        signal.set_wakeup_fd(-1)
        _exec(argv, _DISPOSITIONS, mask)
    status = None
    while status is None:
        ready = select.select([reader, wake_read], [], [])[0]
        if wake_read in ready:
            os.read(wake_read, 4096)
            status = _reap(child)
        if reader in ready and status is None:
            data = os.read(reader, 64)
            if not data:  # P is gone (SIGKILL?): nothing of the command may stay
                end_descendants()
                return 128 + signal.SIGKILL
            for signum in data:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signum)
    end_descendants()
    return status


def supervise(argv: Sequence[str]) -> int:
    """P: fork the keeper into the joined pid namespace, forward signals, return C's status."""
    watched = {*FORWARDED, signal.SIGCHLD}
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # ignored, the keeper would not be waitable
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    reader, writer = os.pipe()
    keeper = os.fork()
    if keeper == 0:
        status = CANNOT_RUN
        try:
            os.close(writer)
            status = keep(reader, argv, mask)
        except BaseException as exc:  # a forked child must never return into cvmfsctl
            os.write(2, f"cvmfsctl: enter: keeper failed: {exc!r}\n".encode())
        os._exit(status)
    os.close(reader)
    while True:
        info = signal.sigwaitinfo(watched)
        if info.si_signo == signal.SIGCHLD:
            done, wait_status = os.waitpid(keeper, os.WNOHANG)
            if done:
                os.close(writer)
                return exit_status(wait_status)
        elif info.si_code != SI_KERNEL:
            with contextlib.suppress(OSError):  # the keeper is exiting; SIGCHLD follows
                os.write(writer, bytes([info.si_signo]))


# -- the verb ----------------------------------------------------------------------------

def _status(path: str) -> dict[str, object]:
    """cvmfsd's ``status`` result; errors as cvmfsctl reports them."""
    request = b'{"v":1,"verb":"status"}\n'
    answer = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(STATUS_TIMEOUT)
            sock.connect(path)
            sock.sendall(request)
            while not answer.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        response = json.loads(answer)
        if (isinstance(response, dict) and response.get("ok") is True
                and isinstance(response.get("result"), dict)):
            result: dict[str, object] = response["result"]
            return result
    except (OSError, ValueError):
        pass
    from cvmfsd import ctl  # the full client explains what went wrong

    response_obj = ctl.call(path, "status")
    if response_obj.error is not None:
        raise EnterError(f"status: {response_obj.error.message}",
                         response_obj.error.code.exit_status)
    if not isinstance(response_obj.result, dict):
        raise EnterError("status: cvmfsd answered without a status", 70)
    return response_obj.result


def _fallback(path: str, argv: Sequence[str], cwd: str) -> int:
    """Run the command through the shim, if cvmfsd allows exec (77 if it does not)."""
    from cvmfsd import ctl

    env = {k: v for k, v in os.environ.items()
           if "\0" not in k + v and not any("\ud800" <= c <= "\udfff" for c in k + v)}
    response = ctl.call(path, "exec", {"argv": list(argv), "cwd": cwd, "env": env},
                        timeout=None, fds=(0, 1, 2))
    if response.error is not None:
        raise EnterError(f"exec through the shim is not possible either: "
                         f"{response.error.message}", response.error.code.exit_status)
    status = response.result.get("status") if isinstance(response.result, dict) else None
    return status if isinstance(status, int) else 1


def enter(path: str, argv: Sequence[str]) -> int:
    """Run ``argv`` inside the namespace of the cvmfsd at ``path``; return its exit status.

    Raises:
        EnterError: with the message and exit status cvmfsctl ends with.
        cvmfsd.ctl.CtlError: cvmfsd did not answer (3, 124...).
    """
    own = own_namespaces()
    target = plan(_status(path), own)
    if target is None:
        return run_here(argv)
    try:
        cwd = os.getcwd()
    except OSError as exc:
        raise EnterError(f"cannot tell the current directory: {exc.strerror}",
                         CANNOT_RUN) from None
    try:
        join(target, own)
    except Refused as exc:
        print(f"cvmfsctl: enter: {exc}", file=sys.stderr)
        print("cvmfsctl: enter: trying exec through cvmfsd's shim instead (the command will "
              "not be a descendant of this process)", file=sys.stderr)
        return _fallback(path, argv, cwd)
    try:
        os.chdir(cwd)  # the mount switch went to /; the same path exists inside
    except OSError as exc:
        raise EnterError(f"cannot change to {cwd} inside the namespace: {exc.strerror}",
                         CANNOT_RUN) from None
    return supervise(argv)


def main(path: str | None, argv: Sequence[str]) -> int:
    """``cvmfsctl [--socket PATH] enter [--] COMMAND...``; returns the exit status."""
    from cvmfsd.ctl import CtlError

    try:
        if not argv:
            raise EnterError("enter needs a command: cvmfsctl enter [--] COMMAND [ARGS...]", 2)
        if not path:
            raise EnterError("no socket: set CVMFSD_SOCKET (cvmfsd exports it to its payload) "
                             "or pass --socket", 2)
        return enter(path, argv)
    except (EnterError, CtlError) as exc:
        print(f"cvmfsctl: enter: {exc}", file=sys.stderr)
        return exc.status

