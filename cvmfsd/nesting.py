"""cvmfsexec's mount-request interface, as the shim uses it to remount in mode 3.

cvmfsexec 4.51 gives the command it runs two things (cvmfsexec:52,365-366):
``CVMFSEXEC_CMDFD``, a descriptor on a FIFO read by *one* request processor
(a background subshell of the fake-root stage, cvmfsexec:284-319), and
``CVMFSEXEC_WAITFIFO``, a second FIFO on which that processor answers every
``MOUNTREPO``/``UMOUNTREPO`` request with one line, the status number
(``echo "$RET" >$CVMFSEXEC_WAITFIFO``, cvmfsexec:180-182).  Its own clients
(``$CVMFSMOUNT``, mountrepo:32-37) open the wait FIFO for reading once per
request.  Two things follow, and both are handled here:

* **The answer can outrun the request.**  Opening a FIFO for reading returns
  at once while a writer still has it open: a client that has read one answer
  and re-opens the FIFO for the next request before the processor's ``echo``
  has closed its end reads end-of-file -- an empty answer -- while the
  processor has not even started on the request.  The processor's real answer
  then waits for the next reader, and from then on every answer belongs to the
  request before (seen in CI: every remount "failed" 0.4 s before cvmfs2
  mounted, and the next remount unmounted that good mount).  So the FIFO is
  opened read-write here, once, and kept: a reader that is also a writer never
  reads end-of-file, the processor's ``echo`` never waits for a reader, and
  each request takes exactly the next line.
* **One stuck request stalls them all.**  The processor does one request at a
  time; a cvmfs2 that waits for a locked workspace (cvmfs.cc:2233-2241) or a
  hung mount stalls it, and with it every later request.  So every request
  has a deadline.  When it passes, the processor's current work -- every
  descendant of the processor, e.g. ``mountrepo`` and its cvmfs2 -- is
  SIGKILLed; the processor then carries on and answers, and the next request
  works.  The shim may do this: it is in the same pid namespace, the
  processor's processes run as the same user on the host (fake root of the
  outer user namespace is the real uid), and the kernel checks a signal's
  sender and target by those host ids.  The processor is the shim's sibling
  (both are children of the fake-root stage: namespace PID 1, or its shell
  when there is no pid namespace), a ``bash`` in another user namespace.

Standard library only: the shim imports this in every namespace start-up.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import threading
import time

NESTING_VARIABLES = ("CVMFSEXEC_CMDFD", "CVMFSEXEC_WAITFIFO", "CVMFSMOUNT", "CVMFSUMOUNT")

#: Deadline of one request, by default (cvmfsd's default ``--mount-timeout``).
REQUEST_TIMEOUT = 300.0
#: How long the processor may take to answer once its stuck work is killed
#: (milliseconds in practice: a mkdir and a bind mount).
UNBLOCK_WAIT = 3.0
#: How many times the processor's work is looked for again (children forked meanwhile).
KILL_ROUNDS = 5


PR_SET_DUMPABLE = 4
CLONE_NEWUSER = 0x10000000


def keep_from_payload(cmdfd: int | None, proc: str = "/proc") -> list[str]:
    """Put cvmfsexec's request interface out of the payload's reach; what could not be done.

    Without ``--allow-nesting`` the payload must not reach the command FIFO
    (issue 12), which three things still held open or named after the shim
    closed it for the payload: the FIFO's path (in the payload's TMPDIR),
    namespace PID 1 (cvmfsexec's bash, which keeps ``CVMFSEXEC_CMDFD``), and
    the shim itself.  The kernel lets a process open ``/proc/<pid>/fd/<n>`` only
    with ptrace read access to ``pid`` (proc_fd_access_allowed): the same uid,
    and then either a *dumpable* target in the opener's own user namespace
    whose permitted capabilities are a subset of the opener's, or
    CAP_SYS_PTRACE over the target's namespace (ptrace.c
    __ptrace_may_access, commoncap.c cap_ptrace_access_check).  So, called by
    the shim before any thread and before the payload exists:

    1. the FIFO's name is removed (the processor and PID 1 opened it at start
       and never again; cvmfsexec's exit removes the directory anyway);
    2. the shim moves into a user namespace of its own (its uid and gid mapped
       to themselves), which the payload and every later child inherit: they
       have no capability over the namespace of PID 1 or of the request
       processor, so those are out of reach;
    3. the shim makes itself not dumpable (after writing its maps: that
       makes its /proc files root's).  The shim also holds every capability
       in its new namespace, which its payload never has.

    cvmfsd, outside, keeps its access: it owns the outer user namespace, so it
    has every capability in all the namespaces nested in it.  ``cvmfsctl
    enter`` joins the shim's user namespace, so jobs are confined as the
    payload is.
    """
    import ctypes  # only here: every other start-up of the shim stays light

    problems = []
    if cmdfd is not None:
        try:
            path = os.readlink(f"{proc}/self/fd/{cmdfd}")
            held, named = os.fstat(cmdfd), os.lstat(path)
            if stat.S_ISFIFO(named.st_mode) and (held.st_dev, held.st_ino) == (
                    named.st_dev, named.st_ino):
                os.unlink(path)
        except OSError as exc:
            problems.append(f"cannot remove the command FIFO's name: {exc.strerror}")
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER) != 0:
        code = ctypes.get_errno()
        problems.append(f"cannot make a user namespace for the payload: {os.strerror(code)}")
    else:
        try:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                               ("gid_map", f"{gid} {gid} 1")):
                with open(f"{proc}/self/{name}", "w") as f:
                    f.write(text)
        except OSError as exc:
            problems.append(f"cannot map the payload's user namespace: {exc.strerror}")
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        problems.append(f"cannot make the shim not dumpable: {os.strerror(ctypes.get_errno())}")
    return problems


class NestingTimeout(OSError):
    """cvmfsexec's request processor did not answer within the deadline."""


class Nesting:
    """cvmfsexec's mount-request interface (what ``$CVMFSMOUNT`` uses), kept by the shim.

    cvmfsd starts cvmfsexec without ``-N`` so that the shim can unmount and
    mount a repository again after a crash; the payload only sees the interface
    when the pilot allows nesting.  cvmfsexec answers every request on one
    shared FIFO, so requests are serialised here (a payload that uses
    ``$CVMFSMOUNT`` at the same moment can still take the shim's answer, or
    the shim its: that is cvmfsexec's design).
    """

    def __init__(self, environ: dict[str, str]) -> None:
        fd = environ.get("CVMFSEXEC_CMDFD", "")
        self.fd = int(fd) if fd.isdigit() else None
        self.fifo = environ.get("CVMFSEXEC_WAITFIFO")
        self.lock = threading.Lock()
        self._answers: int | None = None  # the wait FIFO, read-write
        self._buffer = b""
        self._owed = 0  # answers still to come for requests that timed out

    def request(self, command: str, repo: str, timeout: float = REQUEST_TIMEOUT) -> int:
        """Send ``MOUNTREPO``/``UMOUNTREPO`` for ``repo``; cvmfsexec's status (not trustworthy).

        Raises:
            NestingTimeout: no answer within ``timeout`` seconds (the
                processor's stuck work was killed; the next request can work),
                or the processor is still stuck in an earlier request.
            OSError: the interface is not there, or the processor is gone.
        """
        if self.fd is None or not self.fifo:
            raise OSError("cvmfsexec's request interface is not available (started with -N?)")
        with self.lock:
            if self._answers is None:
                self._answers = os.open(self.fifo, os.O_RDWR | os.O_CLOEXEC)
            answers = self._answers
            self._settle(answers)
            os.write(self.fd, f"{command} {repo}\n".encode())
            line = self._next_line(answers, time.monotonic() + timeout)
            if line is None:
                ended = unblock_processor()
                late = self._next_line(answers, time.monotonic() + UNBLOCK_WAIT)
                if late is None:
                    self._owed += 1
                what = ", ".join(ended) if ended else "nothing (no work of it found)"
                raise NestingTimeout(
                    f"cvmfsexec did not answer {command} {repo} within {timeout:.3g} s; "
                    f"ended its request processor's work: {what}"
                    + ("" if late is None else f"; it then answered {late or '?'}"))
        return int(line) if line.lstrip("-").isdigit() else 1

    def _settle(self, answers: int) -> None:
        """Take the answers still owed to requests that timed out, or raise."""
        if not self._owed:
            return
        for attempt in range(2):
            while self._owed:
                wait = 0.0 if attempt == 0 else UNBLOCK_WAIT
                if self._next_line(answers, time.monotonic() + wait) is None:
                    break
                self._owed -= 1
            if not self._owed:
                return
            if attempt == 0:
                unblock_processor()
        raise NestingTimeout(
            "cvmfsexec's request processor is still stuck in an earlier request")

    def _next_line(self, answers: int, deadline: float) -> str | None:
        """The next answer line on ``answers``, or None at the deadline."""
        poller = select.poll()
        poller.register(answers, select.POLLIN)
        while b"\n" not in self._buffer:
            left = max(0.0, deadline - time.monotonic())
            if not poller.poll(left * 1000):
                if time.monotonic() >= deadline:
                    return None
                continue
            # Never end-of-file: this descriptor is a writer too.
            self._buffer += os.read(answers, 4096)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("ascii", "replace").strip()


def _process_table(proc: str) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command name) of every process visible in ``proc``."""
    table = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", "rb") as f:
                line = f.read().decode("utf-8", "replace")
        except OSError:
            continue  # gone
        comm = line[line.find("(") + 1:line.rfind(")")]
        fields = line[line.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1].isdigit():
            table[int(entry)] = (int(fields[1]), comm)
    return table


def _user_namespace(proc: str, pid: int | str) -> str | None:
    """The user namespace of ``pid``; None when the kernel does not say (another namespace)."""
    try:
        return os.readlink(f"{proc}/{pid}/ns/user")
    except OSError:
        return None


def _descendants(table: dict[int, tuple[int, str]], roots: set[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [child for root in roots for child in children.get(root, [])]
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def processors(table: dict[int, tuple[int, str]], proc: str = "/proc") -> set[int]:
    """cvmfsexec's request processor (a set: empty, or one pid, in practice).

    It is a sibling of this process: a ``bash`` with the same parent, in
    another user namespace (orphans of the payload that the parent adopts are
    in ours).
    """
    me, parent = os.getpid(), os.getppid()
    mine = _user_namespace(proc, "self")
    return {pid for pid, (ppid, comm) in table.items()
            if ppid == parent and pid != me and comm == "bash"
            and _user_namespace(proc, pid) != mine}


def unblock_processor(proc: str = "/proc") -> list[str]:
    """SIGKILL what cvmfsexec's request processor is running now; what was killed.

    Its current work is every descendant of the processor (e.g. ``mountrepo``
    and its cvmfs2).  They are stopped first, then whatever they forked
    meanwhile, so that no child escapes to namespace PID 1, and then killed.
    What the processor starts after that (its next step) is left alone.
    """
    table = _process_table(proc)
    found = _descendants(table, processors(table, proc))
    stopped: dict[int, str] = {}
    for _ in range(KILL_ROUNDS):
        new = [pid for pid in found if pid not in stopped]
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:
                continue  # gone already
            stopped[pid] = table[pid][1]
        table = _process_table(proc)
        found = _descendants(table, set(stopped))
    ended = []
    for pid, name in stopped.items():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
        ended.append(f"{name}[{pid}]")
    return ended
