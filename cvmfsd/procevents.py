"""Tell when a process of cvmfsd's tree ends, and how: by events, never by polling.

Theory of operation
-------------------
One of two sources is chosen at start, and the choice and the reason the other
was not taken are logged once and kept in ``source`` and ``rejected``.

* **netlink** -- the kernel's process event connector (``NETLINK_CONNECTOR``,
  group ``CN_IDX_PROC``) multicasts a message for every fork, exec, name change
  and exit of every task on the node.  An exit carries the task's wait status
  (``exit_code``: an exit status, or the signal that killed it and whether it
  dumped core; ``exit_signal`` is only the signal its parent is sent, SIGCHLD).
  Before Linux 6.6 only CAP_NET_ADMIN may listen (``bind: EPERM``).  The kernel
  acknowledges a subscription only from the initial user and pid namespaces
  (elsewhere it ignores it), and names every task by its pid there, which is then
  our own numbering, also for processes inside cvmfsexec's pid namespace.  The
  tree is followed from the events themselves: seeded from /proc (cvmfsd and its
  descendants) once subscribed, a fork whose parent is in the tree adds the
  child, an exit takes it out.  Being in the tree is thus a dict lookup, which
  matters on a busy node where nearly every event is someone else's; for the
  same reason messages are decoded with :mod:`struct` (pyroute2's parser costs
  ~60 times more) and gathered for ``GATHER`` after each wake-up.  If the socket
  overruns (ENOBUFS), events were lost and the tree is read again from /proc.
  Known blind spot: a process whose main thread ends before its other threads
  (or is replaced by an exec from another thread) is reported as ended then.
* **pidfd** -- where the connector is refused.  Only pids registered with
  :meth:`ProcessEvents.watch` are seen, each through a pidfd that becomes
  readable when it exits.  How it ended is known only for our own children
  (``waitid`` with ``WNOWAIT`` leaves the zombie to whoever reaps it); for any
  other process, or a child someone reaped first, it is unknown.

pyroute2 provides the subscription messages, in a disposable child process
(``python -m cvmfsd.procevents --subscribe FD``): importing it would add some
10 MB to cvmfsd's resident memory for good.  The child opens, binds and
subscribes the socket, and hands it over with SCM_RIGHTS, together with the
unsubscribe message for later; the subscription belongs to the socket, not to
the process.  The socket is a plain non-blocking one read with
``trio.lowlevel.wait_readable``.  pyroute2 0.9's
``ProcEventSocket`` is not used for the I/O: it drives a private asyncio loop
that consumes the socket's messages whenever one of its methods runs, and its
``bind`` turns EPERM into ``KeyError('no free address available')``.

Adopted orphans, and what the janitor is told
---------------------------------------------
cvmfsd is a child subreaper: an orphan of its tree becomes its child, and
nothing in cvmfsd waits for it, so once it ends it stays a zombie unless it is
reaped here (:meth:`ProcessEvents.keep`, from cvmfsd's start, whatever the
source and the phase).  The kernel sends SIGCHLD when a child becomes a zombie
(an adopted one too); on each, cvmfsd's zombie children are listed and only
those known to be adopted are reaped, so that the wait status of a child that
cvmfsd started (trio's processes, the session's pidfd waiters, ``Popen``
objects) is never taken from its owner.  A zombie child is known adopted when

* it was seen deeper in the tree (pid and start time) before it became a
  child: a child cvmfsd forks is a child from birth.  With netlink, every fork
  in the tree says where a process was born; with pidfd, cvmfsd looks at its
  tree (``/proc/<pid>/task/*/children``) on each SIGCHLD and every
  ``LOOK_INTERVAL`` seconds;
* or its process group is neither its own nor cvmfsd's: cvmfsd starts its
  children in its own group or in a new session, and never in a third group.

Limit (pidfd only): a process born and orphaned between two looks, that leads
its own group or is in cvmfsd's (``setsid prog &`` in a payload that exits at
once, say), is not known to be adopted and stays a zombie until cvmfsd ends.

The same looks (pidfd) and forks (netlink) tell ``on_appeared`` the processes
of the tree, pid and start time, batched (every ``TELL_INTERVAL`` at most,
``TELL_MAX`` at a time): cvmfsd hands them to its janitor, which kills them if
cvmfsd is SIGKILLed (:mod:`cvmfsd.janitor`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Union

import structlog
import trio

from cvmfsd import janitor, launch
from cvmfsd._selfexec import module_argv
from cvmfsd.janitor import read_proc_file

log = structlog.get_logger("cvmfsd.procevents")

# linux/connector.h, linux/cn_proc.h (stable ABI; pyroute2 has the same values,
# but importing it takes ~0.1 s, so only the subscription does).
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_EVENT_NONE, PROC_EVENT_FORK, PROC_EVENT_EXEC = 0x0, 0x1, 0x2
PROC_EVENT_COMM, PROC_EVENT_EXIT = 0x200, 0x80000000
SO_ATTACH_FILTER = 26  # asm-generic/socket.h (not in Python's socket module)

RECV_SIZE = 4096  # one message is 76 bytes
RCVBUF = 1 << 20  # room for a burst of forks (capped by net.core.rmem_max)
BATCH = 256  # messages handled per wake-up before trio runs other tasks
# After a wake-up, let the next messages gather this long (seconds): a busy node
# forks thousands of times a second, and each wake-up costs ~15 times the handling
# of one message.  The first message of a burst is handled at once.
GATHER = 0.01
SUBSCRIBE_DEADLINE = 10.0  # policy: the subscribing child's start, pyroute2's import
# When namespace PID 1 ends, the kernel SIGKILLs everything left in the namespace:
# a SIGKILL inside it is judged only after this long, and counts as a hard kill only
# if namespace PID 1 is still alive by then.
HOLD = 0.25
# Without fork events (pidfd, or netlink not yet subscribed), the tree is looked at
# on each SIGCHLD and this often (seconds): a look costs ~0.25 ms for a tree of
# 10 processes, ~4.5 ms for 200 (0.45 % of a core at this interval).
LOOK_INTERVAL = 1.0
# The processes of the tree are told to ``on_appeared`` at most this often
# (seconds), at most this many at a time: a fork storm must not flood the janitor.
TELL_INTERVAL = 0.1
TELL_MAX = 512
#: ``CVMFSD_PROCEVENTS_PIDFD=1`` makes cvmfsd use the pidfd source where netlink
#: would serve (tests, and a check of the fallback that EL9 nodes get).
FORCE_PIDFD = "CVMFSD_PROCEVENTS_PIDFD"

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp_ns

PIDFD_LIMITS = ("pidfd: sees only the processes registered with it, and how they ended "
                "only for cvmfsd's own children")


# --- decoding, no I/O --------------------------------------------------------------


@dataclass(frozen=True)
class Ending:
    """How a process ended: an exit status, or a signal (with or without a core dump).

    Neither set means unknown.
    """

    exit_status: int | None = None
    signal: str | None = None
    core: bool = False


UNKNOWN = Ending()


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9; real-time signals as ``SIGRTMIN+n``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN < signum < signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
        return f"SIG{signum}"


def decode_wait_status(status: int) -> Ending:
    """How a process ended, from its wait status (the connector's ``exit_code``)."""
    if os.WIFSIGNALED(status):
        return Ending(signal=signal_name(os.WTERMSIG(status)), core=os.WCOREDUMP(status))
    if os.WIFEXITED(status):
        return Ending(exit_status=os.WEXITSTATUS(status))
    return UNKNOWN


def wait_status_from_siginfo(code: int, status: int) -> int | None:
    """The wait status for a ``waitid`` result (``si_code``, ``si_status``)."""
    if code == os.CLD_EXITED:
        return (status & 0xFF) << 8
    if code == os.CLD_KILLED:
        return status & 0x7F
    if code == os.CLD_DUMPED:
        return (status & 0x7F) | 0x80
    return None  # stopped or continued: not an end


@dataclass(frozen=True)
class Ack:
    """The kernel's answer to a subscription request: our ``ack`` plus one."""

    ack: int
    err: int


@dataclass(frozen=True)
class Fork:
    parent_tgid: int
    child_pid: int
    child_tgid: int


@dataclass(frozen=True)
class Exec:
    pid: int
    tgid: int


@dataclass(frozen=True)
class Comm:
    pid: int
    tgid: int
    comm: str


@dataclass(frozen=True)
class Exit:
    pid: int
    tgid: int
    wait_status: int
    parent_tgid: int  # 0 before Linux 4.18


ProcEvent = Union[Ack, Fork, Exec, Comm, Exit]


def parse_messages(data: bytes) -> list[ProcEvent]:
    """The process events in one datagram from the connector; others are skipped."""
    events: list[ProcEvent] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, offset)[0]
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        event = _parse_one(data[offset + _NLMSGHDR.size: offset + length])
        if event is not None:
            events.append(event)
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return events


def _parse_one(body: bytes) -> ProcEvent | None:
    head = _CN_MSG.size + _EVENT_HEAD.size
    if len(body) < head:
        return None
    idx, val, _seq, ack, _size, _flags = _CN_MSG.unpack_from(body)
    what = _EVENT_HEAD.unpack_from(body, _CN_MSG.size)[0]
    known = _EVENTS.get(what)
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC) or known is None:
        return None
    layout, build = known
    if len(body) < head + layout.size:
        return None
    return build(ack, layout.unpack_from(body, head))


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


# what -> (layout of the event data, how to build the event from (ack, fields))
_EVENTS: dict[int, tuple[struct.Struct, Callable[[int, tuple[Any, ...]], ProcEvent]]] = {
    PROC_EVENT_NONE: (struct.Struct("=I"),  # err
                      lambda ack, f: Ack(ack, f[0])),
    PROC_EVENT_FORK: (struct.Struct("=4I"),  # parent pid, tgid; child pid, tgid
                      lambda _ack, f: Fork(parent_tgid=f[1], child_pid=f[2], child_tgid=f[3])),
    PROC_EVENT_EXEC: (struct.Struct("=2I"),  # pid, tgid
                      lambda _ack, f: Exec(pid=f[0], tgid=f[1])),
    PROC_EVENT_COMM: (struct.Struct("=2I16s"),  # pid, tgid, comm
                      lambda _ack, f: Comm(pid=f[0], tgid=f[1], comm=_cstring(f[2]))),
    PROC_EVENT_EXIT: (struct.Struct("=6I"),  # pid, tgid, exit_code, exit_signal, parent pid, tgid
                      lambda _ack, f: Exit(pid=f[0], tgid=f[1], wait_status=f[2],
                                          parent_tgid=f[5])),
}


# --- the connector socket ----------------------------------------------------------


class ConnectorUnavailable(Exception):
    """The process event connector cannot be used here; the message says why."""


def _errno_text(step: str, exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{step}: {name} ({exc.strerror})"


def _control(listen: bool, nonce: int) -> bytes:
    """The (un)subscribe message, built by pyroute2."""
    from pyroute2.netlink import NLMSG_DONE
    from pyroute2.netlink.connector import cn_proc

    msg = cn_proc.proc_event_control()
    msg["header"]["type"] = NLMSG_DONE
    msg["idx"], msg["val"] = cn_proc.CN_IDX_PROC, cn_proc.CN_VAL_PROC
    msg["seq"], msg["ack"] = 0, nonce  # the kernel answers ack + 1 (and numbers seq itself)
    msg["len"] = 4  # the payload: one u32, the operation
    msg["action"] = cn_proc.PROC_CN_MCAST_LISTEN if listen else cn_proc.PROC_CN_MCAST_IGNORE
    msg.encode()
    return bytes(msg.data)


@dataclass
class Connector:
    """A socket subscribed to the process events, and how to unsubscribe it."""

    sock: socket.socket
    unsubscribe: bytes


def open_connector(deadline: float = SUBSCRIBE_DEADLINE) -> Connector:
    """Subscribe to the kernel's process events, through a child that imports pyroute2.

    Blocks for the child's start (~0.2 s); run it in a thread.

    Raises:
        ConnectorUnavailable: as :func:`subscribe` says, or the child failed.
    """
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with parent:
        try:
            with child:
                process = subprocess.Popen(
                    [*module_argv("cvmfsd.procevents"), "--subscribe",
                     str(child.fileno())], pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:
            raise ConnectorUnavailable(f"cannot start the subscribing child: {exc}") from None
        parent.settimeout(deadline)
        try:
            data, ancillary, _, _ = parent.recvmsg(65536, socket.CMSG_SPACE(4))
        except OSError as exc:  # a timeout included
            process.kill()
            data, ancillary = b"", []
            problem = f"no answer from the subscribing child: {exc}"
        else:
            problem = ""
        _, err = process.communicate()
    fds = [fd for level, kind, raw in ancillary
           if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
           for fd in struct.unpack(f"{len(raw) // 4}i", raw[:len(raw) - len(raw) % 4])]
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        reason = data.decode(errors="replace") or problem or err.decode(errors="replace")
        raise ConnectorUnavailable(reason.strip() or f"the subscribing child exited "
                                                    f"{process.returncode}")
    sock = socket.socket(fileno=fds[0])
    sock.setblocking(False)
    try:
        attach_thread_filter(sock)
    except OSError as exc:
        log.info("no kernel filter for thread events; they are dropped here", error=str(exc))
    return Connector(sock, data)


def _be(value: int) -> int:
    """``value`` as classic BPF loads the host-order u32 that holds it (big-endian)."""
    return int.from_bytes(struct.pack("=I", value), "big")


# A classic BPF program: drop forks, exits and renames of threads, keep the rest.
# Offsets: nlmsghdr (16) + cn_msg (20) -> proc_event.what at 36, its data at 52:
# pid, tgid (exit, comm); parent pid, tgid, child pid, tgid (fork).
_LD, _TAX, _JEQ_K, _JEQ_X, _RET = 0x20, 0x07, 0x15, 0x1D, 0x06
_THREAD_FILTER = (
    (_LD, 0, 0, 36),
    (_JEQ_K, 6, 0, _be(PROC_EVENT_FORK)),   # -> 8
    (_JEQ_K, 1, 0, _be(PROC_EVENT_EXIT)),   # -> 4
    (_JEQ_K, 0, 8, _be(PROC_EVENT_COMM)),   # -> 4, else keep
    (_LD, 0, 0, 52), (_TAX, 0, 0, 0), (_LD, 0, 0, 56),
    (_JEQ_X, 4, 5, 0),                      # pid == tgid: keep, else drop
    (_LD, 0, 0, 60), (_TAX, 0, 0, 0), (_LD, 0, 0, 64),
    (_JEQ_X, 0, 1, 0),                      # child pid == child tgid: keep, else drop
    (_RET, 0, 0, 0xFFFFFFFF),
    (_RET, 0, 0, 0),
)


def attach_thread_filter(sock: socket.socket) -> None:
    """Have the kernel drop thread-level events before they wake us.

    Every thread of every process on the node is reported (a multithreaded job,
    trio's worker threads in each cvmfs2 renaming themselves); the tree needs
    processes only, and an idle cvmfsd woke some 45 times a second for threads.

    Raises:
        OSError: the kernel refused the filter.
    """
    import ctypes

    class SockFilter(ctypes.Structure):
        _fields_ = (("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                    ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32))

    class SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter)))

    program = (SockFilter * len(_THREAD_FILTER))(*(SockFilter(*op) for op in _THREAD_FILTER))
    fprog = SockFprog(len(_THREAD_FILTER), program)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))  # the kernel copies it


def subscribe() -> tuple[socket.socket, bytes]:
    """Subscribe to the kernel's process events; with the unsubscribe message.

    Returns:
        The subscribed, non-blocking socket, and the message that unsubscribes it.

    Raises:
        ConnectorUnavailable: pyroute2 is missing, the kernel refused (e.g.
            ``bind: EPERM`` for an unprivileged user before Linux 6.6), or
            ignored the request (not in the initial user and pid namespaces).
    """
    try:
        from pyroute2.netlink import NETLINK_CONNECTOR
    except ImportError as exc:
        raise ConnectorUnavailable(f"pyroute2 cannot be imported: {exc}") from None
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    except OSError as exc:
        raise ConnectorUnavailable(_errno_text("socket", exc)) from None
    step = "bind"
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, CN_IDX_PROC))
        sock.setblocking(False)
        step = "subscribe"
        nonce = secrets.randbits(31)
        sock.send(_control(True, nonce))
        # The kernel answers while send() runs.  No answer means it ignored the
        # request, which it does outside the initial user and pid namespaces.
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    continue
                raise
            for event in parse_messages(data):
                if isinstance(event, Ack) and event.ack == nonce + 1:
                    if event.err:
                        raise OSError(event.err, os.strerror(event.err))
                    return sock, _control(False, 0)
    except OSError as exc:
        sock.close()
        raise ConnectorUnavailable(_errno_text(step, exc)) from None
    sock.close()
    raise ConnectorUnavailable("the kernel ignored the subscription: cvmfsd is not in "
                               "the initial user and pid namespaces")


def close_connector(connector: Connector) -> None:
    """Unsubscribe (kernels before 6.6 count listeners until told) and close."""
    with contextlib.suppress(OSError):
        connector.sock.send(connector.unsubscribe)
    connector.sock.close()


def _subscribe_main(fd: int) -> int:
    """The child: subscribe, send the socket and the unsubscribe message over ``fd``."""
    with socket.socket(fileno=fd) as channel:
        try:
            sock, unsubscribe = subscribe()
        except ConnectorUnavailable as exc:
            channel.send(str(exc).encode())
            return 1
        with sock:
            channel.sendmsg([unsubscribe], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             struct.pack("i", sock.fileno()))])
    return 0


# --- the tree in /proc -------------------------------------------------------------

#: A process as the janitor names it: (pid, start time in clock ticks after boot).
Ident = tuple[int, int]


@dataclass(frozen=True)
class Stat:
    """What ``/proc/<pid>/stat`` says of a process (zombies included)."""

    state: str
    ppid: int
    pgid: int
    start: int


def read_stat(pid: int, proc_root: Path = Path("/proc")) -> Stat | None:
    """``pid``'s state, parent, process group and start time; None if it is gone."""
    raw = read_proc_file(f"{proc_root}/{pid}/stat")
    # comm, in parentheses, may hold anything: the fields follow the last ')'.
    fields = raw.rpartition(b")")[2].split() if raw else []
    if len(fields) < 20:
        return None
    return Stat(fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19]))


def children(pid: int, proc_root: Path = Path("/proc")) -> set[int]:
    """The children of ``pid`` (of all its threads), zombies included."""
    return set(janitor.children(pid, str(proc_root)))


def look_at_tree(root: int, proc_root: Path = Path("/proc"),
                 ) -> tuple[dict[int, Stat], dict[int, Stat]]:
    """``root``'s children, and its deeper descendants, each with its :class:`Stat`."""
    direct: dict[int, Stat] = {}
    deep: dict[int, Stat] = {}
    level, into = children(root, proc_root), direct
    while level:
        below: set[int] = set()
        for pid in level:
            stat = read_stat(pid, proc_root)
            if stat is not None and pid not in direct and pid not in deep:
                into[pid] = stat
                below |= children(pid, proc_root)
        level, into = below, deep
    return direct, deep


# --- the service -------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessEnded:
    """A process of cvmfsd's tree ended."""

    pid: int
    ending: Ending
    comm: str | None
    source: str
    # cvmfsd signalled it (or its parent), was ending the tree, or the namespace it was in
    # ended (the kernel kills what is left in a pid namespace when its PID 1 exits)
    by_cvmfsd: bool = False


class ProcessEvents:
    """Sees every process of cvmfsd's tree end, and how; reaps the orphans it adopts.

    Args:
        on_ended: called for each process of the tree that ended.
        on_killed: then called too if a signal killed it, and not by cvmfsd's doing:
            cvmfsd did not signal it or its parent (:data:`cvmfsd.launch.SIGNALLED`)
            and ``expected()`` is false.
        expected: true while cvmfsd is ending its tree itself (its kills cascade).
        on_appeared: called with processes of the tree (pid, start time) as they
            are first seen, in batches (see the module docstring).
        use_netlink: False skips the connector (tests force the fallback so); by
            default it is tried unless ``CVMFSD_PROCEVENTS_PIDFD`` is set.
        proc_root: where /proc is.

    Attributes:
        source: ``netlink`` or ``pidfd`` once running.
        rejected: why the other source is not used.
        killed: per signal name, how many processes of the tree it killed (not
            counting cvmfsd's own kills).
        processes: the known processes of the tree, pid -> comm (None if unknown).
    """

    def __init__(self, *, on_ended: Callable[[ProcessEnded], None] = lambda ended: None,
                 on_killed: Callable[[ProcessEnded], None] = lambda ended: None,
                 expected: Callable[[], bool] = lambda: False,
                 on_appeared: Callable[[list[Ident]], None] | None = None,
                 use_netlink: bool | None = None, proc_root: Path = Path("/proc")) -> None:
        self.source: str | None = None
        self.rejected: str | None = None
        self.killed: Counter[str] = Counter()
        self.processes: dict[int, str | None] = {}
        self._on_ended = on_ended
        self._on_killed = on_killed
        self._expected = expected
        self._on_appeared = on_appeared
        if use_netlink is None:
            use_netlink = not os.environ.get(FORCE_PIDFD)
            self._not_tried = f"not tried ({FORCE_PIDFD} is set)"
        else:
            self._not_tried = "not tried (use_netlink=False)"
        self._use_netlink = use_netlink
        self._proc_root = proc_root
        self._send_pid, self._new_pids = trio.open_memory_channel[int](float("inf"))
        self._ns_init: int | None = None
        self._in_ns: set[int] = set()  # the namespace's processes (netlink only)
        self._held: list[tuple[float, ProcessEnded]] = []  # (judge at, SIGKILLed in the ns)
        # Evidence that a child of ours was adopted, not forked by us (module docstring):
        self._deep: dict[int, int] = {}  # seen deeper in the tree: pid -> start time
        self._born_deep: set[int] = set()  # netlink: forked by a descendant, still alive
        self._adopted: set[int] = set()  # netlink: ended as our child, born deeper
        # What on_appeared was told (pid -> start), and what it is still to be told
        # (start None: a fork the connector reported, read from /proc when told).
        self._told: dict[int, int] = {}
        self._to_tell: dict[int, int | None] = {}
        self._next_tell = -math.inf

    def namespace_init(self, pid: int) -> None:
        """``pid`` is namespace PID 1: what dies with it is not a hard kill."""
        self.watch(pid)
        self._ns_init = pid
        self._in_ns = set(launch.descendants(pid, self._proc_root))
        # Its parent (unshare) is deeper than a child now: if cvmfsexec is killed,
        # it is an orphan of ours, known as one (without fork events, only so).
        self._look()

    def adopted_all_but(self, own: Iterable[int]) -> None:
        """Every child of ours now but ``own`` was adopted: known orphans, reaped once ended.

        For the start of the event loop, when cvmfsd has started nothing but its
        janitor and cvmfsexec (:mod:`cvmfsd.prepare`), and may have adopted what a
        cvmfsexec killed meanwhile left (its subshells, its unshare), unseen by any look.
        """
        for pid in children(os.getpid(), self._proc_root) - set(own):
            stat = read_stat(pid, self._proc_root)
            if stat is not None:
                self._deep[pid] = stat.start

    def watch(self, pid: int) -> None:
        """Make sure the end of ``pid``, a process of the tree, is seen."""
        self.processes[pid] = self._comm(pid)
        if self.source != "netlink":
            self._send_pid.send_nowait(pid)

    async def keep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                   ) -> NoReturn:
        """Reap adopted orphans and tell ``on_appeared`` the tree, until cancelled.

        Started with cvmfsd, before :meth:`run` (which the daemon defers until the
        mounts are done): on each SIGCHLD the zombie children known to be adopted
        are reaped; without the connector's fork events, the tree is also looked at
        then and every ``LOOK_INTERVAL`` seconds.
        """
        with trio.open_signal_receiver(signal.SIGCHLD) as sigchld:
            self._look()
            task_status.started()
            next_look = trio.current_time() + LOOK_INTERVAL
            while True:
                wake = next_look if self.source != "netlink" else math.inf
                if self._to_tell:
                    wake = min(wake, self._next_tell)
                signalled = False
                with trio.move_on_at(wake):
                    await sigchld.__anext__()
                    signalled = True
                if self.source == "netlink":
                    self._reap_zombies()
                    self._tell()
                elif signalled or trio.current_time() >= next_look:
                    self._look()
                    next_look = trio.current_time() + LOOK_INTERVAL
                else:
                    self._tell()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> NoReturn:
        """Report ends until cancelled."""
        connector = None
        reason = self._not_tried
        if self._use_netlink:
            try:
                # Abandoned if cvmfsd ends meanwhile: its exit must not wait for the
                # subscribing child, and the socket it would bring dies with us.
                connector = await trio.to_thread.run_sync(open_connector,
                                                          abandon_on_cancel=True)
            except ConnectorUnavailable as exc:
                reason = str(exc)
        if connector is None:
            self.source, self.rejected = "pidfd", f"netlink: {reason}"
            log.info("process events", source=self.source, rejected=self.rejected)
            async with trio.open_nursery() as nursery:
                task_status.started()
                async for pid in self._new_pids:
                    nursery.start_soon(self._wait_pidfd, pid)
            raise AssertionError("unreachable")  # pragma: no cover - we keep a sender
        try:
            self.source, self.rejected = "netlink", PIDFD_LIMITS
            self._read_tree()
            log.info("process events", source=self.source, rejected=self.rejected,
                     processes=len(self.processes))
            task_status.started()
            await self._read_connector(connector.sock)
        finally:
            close_connector(connector)

    # --- netlink ---
    async def _read_connector(self, sock: socket.socket) -> NoReturn:
        while True:
            wake = self._held[0][0] if self._held else math.inf
            if self._to_tell:
                wake = min(wake, self._next_tell)
            with trio.move_on_at(wake):
                await trio.lowlevel.wait_readable(sock)
            for _ in range(BATCH):
                try:
                    data = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    log.warning("process events were lost; reading the tree from /proc")
                    self._read_tree()
                    continue
                for event in parse_messages(data):
                    self.feed(event)
            self._judge_held(trio.current_time())
            if self._adopted:  # it may have become a zombie before its event was read
                self._reap_zombies()
            self._tell()
            await trio.sleep(GATHER)

    def feed(self, event: ProcEvent) -> None:
        """Follow the tree through one connector event, and report an end in it."""
        tree = self.processes
        if isinstance(event, Fork):
            self._forked(event)
        elif isinstance(event, Exec):
            if event.pid in tree:
                tree[event.pid] = self._comm(event.pid)
        elif isinstance(event, Comm):
            if event.pid == event.tgid and event.pid in tree:
                tree[event.pid] = event.comm
        elif isinstance(event, Exit) and event.pid == event.tgid and (
                event.pid in tree or event.parent_tgid in tree):
            comm = tree.pop(event.pid, None)
            if event.parent_tgid == os.getpid() and event.pid in self._born_deep:
                self._adopted.add(event.pid)  # an orphan: nothing of ours waits for it
            self._born_deep.discard(event.pid)
            self._to_tell.pop(event.pid, None)
            self._told.pop(event.pid, None)
            ours = event.pid in launch.SIGNALLED or event.parent_tgid in launch.SIGNALLED
            ended = ProcessEnded(event.pid, decode_wait_status(event.wait_status), comm,
                                 "netlink", ours)
            in_ns = event.pid in self._in_ns or event.parent_tgid == self._ns_init
            self._in_ns.discard(event.pid)
            if event.pid == self._ns_init:
                self._namespace_ended()
            elif in_ns and ended.ending.signal == "SIGKILL" and not ours:
                self._held.append((trio.current_time() + HOLD, ended))
                return
            self._ended(ended)

    def _forked(self, event: Fork) -> None:
        tree = self.processes
        if event.child_pid == event.child_tgid and event.parent_tgid in tree:
            tree[event.child_pid] = tree[event.parent_tgid]
            self._to_tell[event.child_pid] = None
            if event.parent_tgid == os.getpid():
                self._born_deep.discard(event.child_pid)
            else:  # if it is ever our child, it was adopted
                self._born_deep.add(event.child_pid)
        if event.parent_tgid == self._ns_init or event.parent_tgid in self._in_ns:
            self._in_ns.add(event.child_tgid)

    def _namespace_ended(self) -> None:
        """Namespace PID 1 ended: the SIGKILLs held were the kernel emptying the namespace."""
        for _, ended in self._held:
            self._ended(dataclasses.replace(ended, by_cvmfsd=True))
        self._held.clear()
        self._ns_init, self._in_ns = None, set()

    def _judge_held(self, now: float) -> None:
        """SIGKILLs held long enough while namespace PID 1 lives on were hard kills."""
        while self._held and self._held[0][0] <= now:
            self._ended(self._held.pop(0)[1])

    def _read_tree(self) -> None:
        me = os.getpid()
        known = self.processes
        self.processes = {pid: known.get(pid) or self._comm(pid)
                          for pid in (me, *launch.descendants(me, self._proc_root))}
        self._look()  # forks before the subscription (or lost) left no event

    # --- adopted orphans, and the tree told ---
    def _look(self) -> None:
        """Look at the tree: who is deeper than a child, what is new; reap, tell."""
        direct, deep = look_at_tree(os.getpid(), self._proc_root)
        self._deep = {pid: stat.start for pid, stat in deep.items()} | {
            pid: start for pid, start in self._deep.items()
            if pid in direct and direct[pid].start == start}
        self._reap_zombies()
        seen = direct | deep
        self._told = {pid: start for pid, start in self._told.items()
                      if pid in seen and seen[pid].start == start}
        for pid, stat in seen.items():
            if stat.state not in ("Z", "X") and self._told.get(pid) != stat.start:
                self._to_tell[pid] = stat.start
        self._tell()

    def _reap_zombies(self) -> None:
        """Reap the zombie children known to be adopted (WNOHANG: never blocks)."""
        me, group = os.getpid(), os.getpgrp()
        kids = children(me, self._proc_root)
        self._adopted &= kids
        for pid in kids:
            stat = read_stat(pid, self._proc_root)
            if stat is None or stat.state != "Z" or stat.ppid != me:
                continue
            if not (pid in self._adopted or self._deep.get(pid) == stat.start
                    or stat.pgid not in (pid, group)):
                continue  # maybe ours: its owner reaps it
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not a child (any more)
                done = 0
            self._adopted.discard(pid)
            self._deep.pop(pid, None)
            if done:
                log.debug("reaped an adopted orphan", pid=pid)

    def _tell(self) -> None:
        """Tell ``on_appeared`` what it was not told yet (at most ``TELL_MAX``, and not
        before ``TELL_INTERVAL`` has passed since the last time)."""
        if self._on_appeared is None:
            self._to_tell.clear()
            return
        now = trio.current_time()
        if not self._to_tell or now < self._next_tell:
            return
        batch: list[Ident] = []
        for pid in list(self._to_tell)[:TELL_MAX]:
            start = self._to_tell.pop(pid)
            if start is None:  # a fork the connector reported: still a process of the tree?
                stat = read_stat(pid, self._proc_root)
                if stat is None or stat.state in ("Z", "X") or stat.ppid not in self.processes:
                    continue
                start = stat.start
            if self._told.get(pid) != start:
                self._told[pid] = start
                batch.append((pid, start))
        if batch:
            self._next_tell = now + TELL_INTERVAL
            self._on_appeared(batch)

    # --- pidfd ---
    async def _wait_pidfd(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._ended(ProcessEnded(pid, UNKNOWN, self.processes.pop(pid, None), "pidfd"))
            return
        except OSError as exc:  # no pidfds before Linux 5.3
            log.warning("cannot watch a process", pid=pid, error=str(exc))
            return
        try:
            await trio.lowlevel.wait_readable(fd)
            ending = _child_ending(fd)
        finally:
            os.close(fd)
        self._ended(ProcessEnded(pid, ending, self.processes.pop(pid, None), "pidfd",
                                 pid in launch.SIGNALLED))

    # --- both ---
    def _ended(self, ended: ProcessEnded) -> None:
        launch.SIGNALLED.discard(ended.pid)
        if not ended.by_cvmfsd and self._expected():
            ended = dataclasses.replace(ended, by_cvmfsd=True)
        self._on_ended(ended)
        if ended.ending.signal is not None and not ended.by_cvmfsd:
            self.killed[ended.ending.signal] += 1
            self._on_killed(ended)

    def _comm(self, pid: int) -> str | None:
        try:
            return (self._proc_root / str(pid) / "comm").read_text().rstrip("\n")
        except OSError:
            return None


def _child_ending(pidfd: int) -> Ending:
    """How the exited process behind ``pidfd`` ended, if it is our child; it stays unreaped."""
    try:
        info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    except OSError:  # ECHILD: not our child, or someone reaped it first
        return UNKNOWN
    if info is None:
        return UNKNOWN
    status = wait_status_from_siginfo(info.si_code, info.si_status)
    return UNKNOWN if status is None else decode_wait_status(status)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--subscribe" or not sys.argv[2].isdigit():
        sys.stderr.write("usage: python -m cvmfsd.procevents --subscribe FD\n")
        sys.exit(2)
    sys.exit(_subscribe_main(int(sys.argv[2])))
