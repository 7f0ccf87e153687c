"""Process watch: the connector's messages decoded, the tree followed, both sources for real.

The netlink source needs the initial user and pid namespaces, and, before Linux
6.6, CAP_NET_ADMIN; CI runs this file as an unprivileged user and again as root.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import prctl
import pytest
import trio

from cvmfsd import janitor, launch, procevents
from cvmfsd.procevents import (
    UNKNOWN,
    Ack,
    Comm,
    Ending,
    Exec,
    Exit,
    Fork,
    ProcessEnded,
    ProcessEvents,
    decode_wait_status,
    parse_messages,
    wait_status_from_siginfo,
)

# --- decoding ----------------------------------------------------------------------

WAIT_STATUSES = [
    (0, Ending(exit_status=0)),
    (3 << 8, Ending(exit_status=3)),
    (255 << 8, Ending(exit_status=255)),
    (signal.SIGKILL, Ending(signal="SIGKILL")),
    (signal.SIGTERM, Ending(signal="SIGTERM")),
    (signal.SIGABRT | 0x80, Ending(signal="SIGABRT", core=True)),
    (signal.SIGSEGV | 0x80, Ending(signal="SIGSEGV", core=True)),
    (signal.SIGRTMIN + 1, Ending(signal="SIGRTMIN+1")),
    (0x137F, UNKNOWN),  # stopped by SIGSTOP: not an end
]


@pytest.mark.parametrize(("status", "expected"), WAIT_STATUSES)
def test_decode_wait_status(status: int, expected: Ending) -> None:
    """The connector's exit_code is a wait status: an exit status, or a signal and a core flag."""
    assert decode_wait_status(status) == expected


SIGINFOS = [
    (os.CLD_EXITED, 3, 3 << 8),
    (os.CLD_KILLED, signal.SIGKILL, signal.SIGKILL),
    (os.CLD_DUMPED, signal.SIGABRT, signal.SIGABRT | 0x80),
    (os.CLD_STOPPED, signal.SIGSTOP, None),
]


@pytest.mark.parametrize(("code", "status", "expected"), SIGINFOS)
def test_wait_status_from_siginfo(code: int, status: int, expected: int | None) -> None:
    """waitid's si_code and si_status become the same wait status the connector gives."""
    assert wait_status_from_siginfo(code, status) == expected


def message(what: int, data: bytes, *, ack: int = 0, idx: int = 1) -> bytes:
    """One connector datagram: nlmsghdr, cn_msg, proc_event head, event data."""
    event = struct.pack("=IIQ", what, 0, 123) + data
    body = struct.pack("=IIIIHH", idx, 1, 7, ack, len(event), 0) + event
    return struct.pack("=IHHII", 16 + len(body), 3, 0, 7, 0) + body


# A real acknowledgement, as Linux 6.18 sent it (ack = ours + 1, err 0).
REAL_ACK = bytes.fromhex(
    "4c000000030000002b0300000000000001000000010000002b03000001000000280000000000000001000000"
    "a737b0654a080000000000000000000000000000000000000000000000000000")

MESSAGES = [
    (REAL_ACK, [Ack(ack=1, err=0)]),
    (message(0, struct.pack("=I", 1), ack=43), [Ack(ack=43, err=1)]),
    (message(0x1, struct.pack("=4I", 10, 10, 11, 11)),
     [Fork(parent_tgid=10, child_pid=11, child_tgid=11)]),
    (message(0x2, struct.pack("=2I", 11, 11)), [Exec(pid=11, tgid=11)]),
    (message(0x200, struct.pack("=2I16s", 11, 11, b"cvmfs2\0junk")),
     [Comm(pid=11, tgid=11, comm="cvmfs2")]),
    (message(0x80000000, struct.pack("=6I", 11, 11, 9, 17, 10, 10)),
     [Exit(pid=11, tgid=11, wait_status=9, parent_tgid=10)]),
    (message(0x4, struct.pack("=4I", 11, 11, 0, 0)), []),  # uid change: not followed
    (message(0x2, struct.pack("=2I", 11, 11), idx=2), []),  # another connector user
    (message(0x80000000, struct.pack("=2I", 11, 11)), []),  # truncated
    (message(0x2, struct.pack("=2I", 1, 1)) + message(0x2, struct.pack("=2I", 2, 2)),
     [Exec(pid=1, tgid=1), Exec(pid=2, tgid=2)]),
    (b"\x04\x00", []),
]


@pytest.mark.parametrize(("data", "expected"), MESSAGES)
def test_parse_messages(data: bytes, expected: list[procevents.ProcEvent]) -> None:
    """Datagrams decode to the events the tree needs; anything else is skipped."""
    assert parse_messages(data) == expected


def test_constants_match_pyroute2() -> None:
    """The kernel ABI values kept here (to spare the import) are pyroute2's."""
    from pyroute2.netlink.connector import cn_proc

    assert (procevents.CN_IDX_PROC, procevents.CN_VAL_PROC) == (cn_proc.CN_IDX_PROC,
                                                                cn_proc.CN_VAL_PROC)
    assert [procevents.PROC_EVENT_NONE, procevents.PROC_EVENT_FORK, procevents.PROC_EVENT_EXEC,
            procevents.PROC_EVENT_COMM, procevents.PROC_EVENT_EXIT] == [
        cn_proc.PROC_EVENT_NONE, cn_proc.PROC_EVENT_FORK, cn_proc.PROC_EVENT_EXEC,
        cn_proc.PROC_EVENT_COMM, cn_proc.PROC_EVENT_EXIT]


# --- following the tree ------------------------------------------------------------


def test_the_tree_is_followed_through_forks_and_exits() -> None:
    """Forks from the tree join it, threads and strangers do not, and only its ends count."""
    ended: list[ProcessEnded] = []
    events = ProcessEvents(on_ended=ended.append)
    events.processes = {100: "cvmfsd"}
    feed: list[procevents.ProcEvent] = [
        Fork(parent_tgid=100, child_pid=101, child_tgid=101),  # our child
        Fork(parent_tgid=101, child_pid=102, child_tgid=102),  # our grandchild
        Fork(parent_tgid=101, child_pid=103, child_tgid=101),  # a thread of the child
        Fork(parent_tgid=500, child_pid=501, child_tgid=501),  # someone else's
        Comm(pid=102, tgid=102, comm="cvmfs2"),
        Exit(pid=103, tgid=101, wait_status=0, parent_tgid=100),  # the thread ends
        Exit(pid=501, tgid=501, wait_status=9, parent_tgid=500),
        Exit(pid=102, tgid=102, wait_status=9, parent_tgid=1),  # reparented, then killed
        Exit(pid=104, tgid=104, wait_status=3 << 8, parent_tgid=101),  # forked before we looked
    ]
    for event in feed:
        events.feed(event)
    assert ended == [
        ProcessEnded(102, Ending(signal="SIGKILL"), "cvmfs2", "netlink"),
        ProcessEnded(104, Ending(exit_status=3), None, "netlink"),
    ]
    assert events.processes == {100: "cvmfsd", 101: "cvmfsd"}
    assert events.killed == {"SIGKILL": 1}


async def test_what_dies_with_namespace_pid_1_is_not_a_hard_kill() -> None:
    """SIGKILLs inside the namespace are held; the end of its PID 1 says they were the
    kernel emptying it, and only PID 1's own kill counts; held too long, they count."""
    ended: list[ProcessEnded] = []
    events = ProcessEvents(on_ended=ended.append)
    events.processes = {100: "cvmfsd", 200: "bash"}
    events.namespace_init(200)
    for event in (Fork(parent_tgid=200, child_pid=201, child_tgid=201),   # cvmfs2
                  Fork(parent_tgid=201, child_pid=202, child_tgid=202),   # its child
                  Exit(pid=202, tgid=202, wait_status=9, parent_tgid=201),
                  Exit(pid=201, tgid=201, wait_status=9, parent_tgid=200)):
        events.feed(event)
    assert ended == []  # held
    events.feed(Exit(pid=200, tgid=200, wait_status=9, parent_tgid=100))  # PID 1 killed
    assert [(e.pid, e.by_cvmfsd) for e in ended] == [(202, True), (201, True), (200, False)]
    assert events.killed == {"SIGKILL": 1}

    ended.clear()
    events.processes.update({300: "bash", 301: "cvmfs2"})
    events.namespace_init(300)
    events.feed(Fork(parent_tgid=300, child_pid=301, child_tgid=301))
    events.feed(Exit(pid=301, tgid=301, wait_status=9, parent_tgid=300))
    events._judge_held(trio.current_time() + procevents.HOLD)  # PID 1 lives on
    assert [(e.pid, e.by_cvmfsd) for e in ended] == [(301, False)]
    assert events.killed == {"SIGKILL": 2}


# --- both sources for real ---------------------------------------------------------


class Ends:
    """Collects the ends a ProcessEvents reports, and waits for one."""

    def __init__(self) -> None:
        self.ended: list[ProcessEnded] = []
        self.killed: list[ProcessEnded] = []
        self._changed = trio.Event()

    def __call__(self, ended: ProcessEnded) -> None:
        self.ended.append(ended)
        self._changed.set()
        self._changed = trio.Event()

    async def of(self, pid: int) -> ProcessEnded:
        with trio.fail_after(5):
            while True:
                for ended in self.ended:
                    if ended.pid == pid:
                        return ended
                await self._changed.wait()


@pytest.fixture(name="subreaper")
def _subreaper() -> Iterator[None]:
    """This test process adopts the orphans of its tree, as cvmfsd does."""
    before = prctl.get_child_subreaper()
    prctl.set_child_subreaper(1)
    yield
    prctl.set_child_subreaper(before)


def _execed(pid: int, comm: str) -> None:
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/comm").read_text().strip() != comm:
        assert time.monotonic() < deadline, f"{pid} never ran {comm}"
        time.sleep(0.001)


async def execed(pid: int, comm: str) -> None:
    """Wait until process ``pid`` runs ``comm`` (a fresh child may not have exec'd yet)."""
    await trio.to_thread.run_sync(_execed, pid, comm)


async def orphan() -> int:
    """A ``sleep`` whose parent shell has exited: it is reparented to us (a subreaper)."""
    shell = await trio.run_process(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
                                   capture_stdout=True)
    pid = int(shell.stdout)
    assert launch.parent_pid(pid) == os.getpid()
    return pid


def _gone(pid: int) -> None:
    deadline = time.monotonic() + 2
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"{pid} was not reaped (a zombie is left)"
        time.sleep(0.005)


async def reaped(pid: int) -> None:
    """Wait until ``pid`` is gone from /proc: not even a zombie is left."""
    await trio.to_thread.run_sync(_gone, pid)


def kernel_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", platform.release())
    assert match is not None
    return int(match[1]), int(match[2])


def connector_allowed() -> bool:
    """Before Linux 6.6, only CAP_NET_ADMIN could join the connector's process group."""
    return os.geteuid() == 0 or kernel_version() >= (6, 6)


async def test_netlink_reports_sigkill_of_a_child_and_an_orphan(subreaper: None) -> None:
    """Through the connector: SIGKILL of a child and of an adopted orphan, and an exit status."""
    if not connector_allowed():
        with pytest.raises(procevents.ConnectorUnavailable, match=r"^bind: EPERM "):
            procevents.open_connector()
        return
    ends = Ends()
    events = ProcessEvents(on_ended=ends, on_killed=ends.killed.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(events.run)
        assert (events.source, events.rejected) == ("netlink", procevents.PIDFD_LIMITS)
        assert os.getpid() in events.processes

        child = await trio.lowlevel.open_process(["sleep", "60"])
        await execed(child.pid, "sleep")  # killed before its exec, it would still be python
        os.kill(child.pid, signal.SIGKILL)
        assert await ends.of(child.pid) == ProcessEnded(
            child.pid, Ending(signal="SIGKILL"), "sleep", "netlink")
        await child.wait()

        grandchild = await orphan()
        await execed(grandchild, "sleep")
        os.kill(grandchild, signal.SIGKILL)
        assert await ends.of(grandchild) == ProcessEnded(
            grandchild, Ending(signal="SIGKILL"), "sleep", "netlink")
        # An adopted orphan: nothing of ours waits for it, so the process watch reaps it
        # (a subreaper that did not would keep its zombie for the rest of the run).
        await reaped(grandchild)

        exited = await trio.lowlevel.open_process(["sh", "-c", "exit 3"])
        assert (await ends.of(exited.pid)).ending == Ending(exit_status=3)
        await exited.wait()
        nursery.cancel_scope.cancel()
    assert events.killed == {"SIGKILL": 2}
    assert [e.pid for e in ends.killed] == [child.pid, grandchild]


async def test_netlink_reaps_adopted_orphans_not_our_own_children(subreaper: None) -> None:
    """An orphan that exits by itself is reaped; a child of ours is left for its owner."""
    if not connector_allowed():
        return  # test_netlink_reports_sigkill_of_a_child_and_an_orphan checks the refusal
    events = ProcessEvents(use_netlink=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(events.keep)
        await nursery.start(events.run)
        shell = await trio.run_process(["sh", "-c", "sleep 0.2 >/dev/null 2>&1 & echo $!"],
                                       capture_stdout=True)
        adopted = int(shell.stdout)
        assert launch.parent_pid(adopted) == os.getpid()
        own = await trio.lowlevel.open_process(["sh", "-c", "exit 4"])
        await reaped(adopted)  # exits after 0.2 s; nobody else would wait for it
        await trio.sleep(0.2)
        assert await own.wait() == 4  # our own child's status was left to us
        nursery.cancel_scope.cancel()


def sources() -> list[object]:
    """Both sources; netlink only where the kernel lets this user listen."""
    return ["pidfd", pytest.param("netlink", marks=pytest.mark.skipif(
        not connector_allowed(), reason="netlink needs root before Linux 6.6"))]


async def _forced(source: str, events: ProcessEvents) -> None:
    assert events.source == source, events.rejected


@pytest.mark.parametrize("source", sources())
async def test_adopted_orphans_are_reaped_and_our_children_left_to_us(
        subreaper: None, source: str) -> None:
    """Reaped once ended: an orphan seen deeper in the tree before it was adopted, and
    one whose process group is neither its own nor ours; never a child we started
    (in our group, in a session of its own, or a Popen waited for late)."""
    events = ProcessEvents(use_netlink=source == "netlink")
    async with trio.open_nursery() as nursery:
        await nursery.start(events.keep)
        await nursery.start(events.run)
        await _forced(source, events)
        # Like the payload's: started in a session of its own, its orphan is in its group.
        shell = await trio.run_process(["sh", "-c", "sleep 0.3 >/dev/null 2>&1 & echo $!"],
                                       capture_stdout=True, start_new_session=True)
        other_group = int(shell.stdout)
        # In our group (like cvmfsexec's unshare): known adopted only if seen deeper first.
        parent = await trio.lowlevel.open_process(
            ["sh", "-c", "sleep 0.5 >/dev/null 2>&1 & echo $!; read _ || :"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert parent.stdin is not None and parent.stdout is not None
        seen_deeper = int(await parent.stdout.receive_some())
        await trio.run_process(["true"])  # its SIGCHLD: cvmfsd looks at its tree (pidfd)
        await trio.sleep(0.1)
        await parent.stdin.aclose()  # the shell ends: its sleep becomes our child
        assert await parent.wait() == 0
        late = subprocess.Popen(["sh", "-c", "exit 6"])  # noqa: ASYNC220 - waited late, as the janitor is
        same_group = await trio.lowlevel.open_process(["sh", "-c", "exit 4"])
        own_session = await trio.lowlevel.open_process(["sh", "-c", "exit 5"],
                                                       start_new_session=True)
        await reaped(other_group)
        await reaped(seen_deeper)
        assert await same_group.wait() == 4
        assert await own_session.wait() == 5
        assert late.wait() == 6
        await parent.stdout.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("source", sources())
async def test_the_tree_is_told_pid_and_start_time(source: str) -> None:
    """on_appeared hears of the tree's processes with their start times, each once."""
    appeared: list[tuple[int, int]] = []
    told = trio.Event()

    def on_appeared(batch: list[tuple[int, int]]) -> None:
        nonlocal told
        appeared.extend(batch)
        told.set()
        told = trio.Event()

    events = ProcessEvents(use_netlink=source == "netlink", on_appeared=on_appeared)
    async with trio.open_nursery() as nursery:
        await nursery.start(events.keep)
        await nursery.start(events.run)
        await _forced(source, events)
        shell = await trio.lowlevel.open_process(
            ["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE)
        assert shell.stdout is not None
        sleeper = int(await shell.stdout.receive_some())
        wanted = {(pid, janitor.process_start(pid)) for pid in (shell.pid, sleeper)}
        with trio.fail_after(procevents.LOOK_INTERVAL + 2):
            while not wanted <= set(appeared):
                await told.wait()
        os.kill(sleeper, signal.SIGKILL)
        await shell.wait()
        await shell.stdout.aclose()
        nursery.cancel_scope.cancel()
    assert len(appeared) == len(set(appeared))


def fake_proc(root: Path, tree: dict[int, list[int]]) -> Path:
    """A /proc with ``tree`` (pid -> children), every process alive, started at tick 1000 + pid."""
    leaves: dict[int, list[int]] = {kid: [] for kids in tree.values() for kid in kids}
    for pid, kids in {**leaves, **tree}.items():
        (root / str(pid) / "task" / str(pid)).mkdir(parents=True, exist_ok=True)
        (root / str(pid) / "task" / str(pid) / "children").write_text(
            "".join(f"{kid} " for kid in kids))
        (root / str(pid) / "stat").write_text(
            f"{pid} (x) S 1 {pid} {pid} " + "0 " * 15 + f"{1000 + pid} 0 0\n")
    return root


async def test_a_fork_storm_is_told_in_bounded_batches(tmp_path: Path,
                                                       autojump_clock: trio.abc.Clock) -> None:
    """Thousands of new processes: TELL_MAX at a time, TELL_INTERVAL apart, all of them."""
    me = os.getpid()
    proc = fake_proc(tmp_path, {me: [100], 100: list(range(1000, 2200))})
    calls: list[tuple[float, int]] = []
    told: list[tuple[int, int]] = []

    def on_appeared(batch: list[tuple[int, int]]) -> None:
        calls.append((trio.current_time(), len(batch)))
        told.extend(batch)

    events = ProcessEvents(use_netlink=False, on_appeared=on_appeared, proc_root=proc)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(events.keep)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    interval, most = procevents.TELL_INTERVAL, procevents.TELL_MAX
    assert [(round(at - start, 6), n) for at, n in calls] == [
        (0, most), (interval, most), (2 * interval, 1201 - 2 * most)]
    assert sorted(told) == [(pid, 1000 + pid) for pid in (100, *range(1000, 2200))]


THREADED = "import threading\nfor _ in range(5):\n t = threading.Thread(target=min, args=[0])\n" \
    " t.start(); t.join()"


def test_the_kernel_drops_thread_events_before_they_wake_us() -> None:
    """Unfiltered, a threaded child is a dozen events; filtered, its fork, exec and exit."""
    if not connector_allowed():
        return  # test_netlink_reports_sigkill_of_a_child_and_an_orphan checks the refusal
    raw, _ = procevents.subscribe()
    connector = procevents.open_connector()
    try:
        child = subprocess.Popen([sys.executable, "-c", THREADED])
        child.wait()
        time.sleep(0.3)
        seen = {}
        for name, sock in (("raw", raw), ("filtered", connector.sock)):
            events: list[procevents.ProcEvent] = []
            while True:
                try:
                    events += procevents.parse_messages(sock.recv(65536))
                except BlockingIOError:
                    break
            seen[name] = [
                (type(e).__name__, e.pid if isinstance(e, (Exit, Exec)) else e.child_pid)
                for e in events
                if (isinstance(e, (Exit, Exec)) and e.tgid == child.pid)
                or (isinstance(e, Fork) and e.child_tgid == child.pid)]
        threads = [event for event in seen["raw"] if event[1] != child.pid]
        assert len(threads) >= 10, seen["raw"]  # 5 forks and 5 exits of threads
        assert seen["filtered"] == [("Fork", child.pid), ("Exec", child.pid),
                                    ("Exit", child.pid)]
    finally:
        raw.close()
        procevents.close_connector(connector)


async def test_pidfd_fallback_knows_how_its_children_ended() -> None:
    """Forced fallback: registered pids are seen end; how, only for our own children."""
    ends = Ends()
    events = ProcessEvents(on_ended=ends, use_netlink=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(events.run)
        assert (events.source, events.rejected) == ("pidfd", "netlink: not tried "
                                                    "(use_netlink=False)")
        killed = await trio.lowlevel.open_process(["sleep", "60"])
        await execed(killed.pid, "sleep")  # watched before its exec, its comm would be ours
        events.watch(killed.pid)
        exited = await trio.lowlevel.open_process(["sh", "-c", "exit 3"])
        events.watch(exited.pid)
        shell = await trio.lowlevel.open_process(
            ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!; wait"], stdout=subprocess.PIPE)
        assert shell.stdout is not None
        not_ours = int(await shell.stdout.receive_some())
        events.watch(not_ours)

        os.kill(killed.pid, signal.SIGKILL)
        assert await ends.of(killed.pid) == ProcessEnded(
            killed.pid, Ending(signal="SIGKILL"), "sleep", "pidfd")
        assert (await ends.of(exited.pid)).ending == Ending(exit_status=3)
        os.kill(not_ours, signal.SIGKILL)
        assert (await ends.of(not_ours)).ending == UNKNOWN  # its parent, not we, may wait
        # waitid(WNOWAIT) left our children for their owner to reap
        assert await killed.wait() == -signal.SIGKILL
        assert await exited.wait() == 3
        await shell.wait()
        await shell.stdout.aclose()
        nursery.cancel_scope.cancel()
    assert events.killed == {"SIGKILL": 1}
    assert events.processes == {}


@pytest.mark.parametrize("use_netlink", [True, False])
async def test_cvmfsds_own_kills_are_not_counted_as_hard_kills(use_netlink: bool) -> None:
    """A kill sent through launch.send_signal, or while expected() is true, is ours."""
    ends = Ends()
    ending_the_tree = False
    events = ProcessEvents(on_ended=ends, use_netlink=use_netlink,
                           expected=lambda: ending_the_tree)
    async with trio.open_nursery() as nursery:
        await nursery.start(events.run)
        ours = await trio.lowlevel.open_process(["sleep", "60"])
        theirs = await trio.lowlevel.open_process(["sleep", "60"])
        late = await trio.lowlevel.open_process(["sleep", "60"])
        for process in (ours, theirs, late):
            events.watch(process.pid)
        assert launch.send_signal(ours.pid, signal.SIGKILL)
        assert (await ends.of(ours.pid)).by_cvmfsd
        os.kill(theirs.pid, signal.SIGKILL)
        assert not (await ends.of(theirs.pid)).by_cvmfsd
        ending_the_tree = True
        os.kill(late.pid, signal.SIGKILL)
        assert (await ends.of(late.pid)).by_cvmfsd
        for process in (ours, theirs, late):
            await process.wait()
        nursery.cancel_scope.cancel()
    assert events.killed == {"SIGKILL": 1}
    assert ours.pid not in launch.SIGNALLED


FALLBACK_IN_USERNS = """
import trio
from cvmfsd.log import configure_logging
from cvmfsd.procevents import ProcessEvents

async def main():
    events = ProcessEvents()
    async with trio.open_nursery() as nursery:
        await nursery.start(events.run)
        print(events.source, events.rejected, sep="\\n")
        nursery.cancel_scope.cancel()

configure_logging()  # to stderr
trio.run(main)
"""


def test_the_connector_is_refused_in_a_user_namespace() -> None:
    """In a user namespace the kernel ignores the subscription: the pidfd source says why."""
    result = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c",
                             FALLBACK_IN_USERNS], capture_output=True, text=True, check=False,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "pidfd", "netlink: the kernel ignored the subscription: cvmfsd is not in the initial "
        "user and pid namespaces"]
