"""The simulated cvmfs2 against upstream, point by point (issue #10).

Each test names the upstream file and line it pins: cvmfs client at ae7450ec9
(``/work/.mirror/cvmfs+cvmfs``), libfuse tags fuse-3.10.2 / fuse-2.9.9. Tests
that depend on being able to regain root (the watchdog's lazy unmount) check
both outcomes: as (fake) root, as in cvmfsexec mode 3, and as an ordinary
user, as in mode 1 and in CI.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from cvmfsd.sim import _report, _watchdog, stratum
from cvmfsd.sim._settings import make_settings
from cvmfsd.sim._sockets import SUN_PATH_MAX, make_socket
from cvmfsd.sim.cvmfs2 import _talk_socket
from cvmfsd.sim.talk import talk
from tests.conftest import fds_of
from tests.test_sim_cvmfs2 import FQRN, Sim, process_gone, sim, wait_for

__all__ = ["sim"]  # the fixture, re-exported for pytest

ROOT = os.geteuid() == 0
OTHER = "other.sim.example"


def cmdline(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]


def mountinfo_line(path: Path, pid: str = "self") -> str | None:
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        if line.split()[4] == str(path):
            return line
    return None


def workspace(s: Sim) -> Path:
    return s.cache / "shared"


def no_cachemgr(s: Sim) -> None:
    """A private cache (no cache manager), the workspace where ``s.socket`` expects it."""
    s.write_config(CVMFS_SHARED_CACHE="no", CVMFS_WORKSPACE=str(workspace(s)))


def short_links() -> set[str]:
    return {p.name for p in Path("/tmp").glob("cvmfs.*")}  # noqa: S108 - upstream's place


def raw_talk(path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- 1. mount source and type -------------------------------------------------------


@pytest.mark.fuse
def test_mount_reads_fuse_dev_fuse(sim: Sim) -> None:
    """No fsname, no subtype: mountinfo reads ``fuse`` / ``/dev/fuse``.

    cvmfs/loader.cc:1022 (fuse_mount) and :1049 (fuse_session_mount) are called
    directly, never fuse_parse_cmdline; libfuse fuse-3.10.2 lib/mount.c:447-448
    takes the device name when there is neither fsname nor subtype.
    """
    sim.publish()
    assert sim.mount().returncode == 0
    line = mountinfo_line(sim.mnt)
    assert line is not None
    fstype, source = line.split(" - ", 1)[1].split()[:2]
    assert (fstype, source) == ("fuse", "/dev/fuse")
    assert sim.xattr("fqrn") == FQRN  # how a supervisor tells it is this repository


def test_missing_mount_point_is_code_3(tmp_path: Path) -> None:
    """cvmfs/loader.cc:819-823: ``Mount point X does not exist``, kFailPermission (3),
    before ``loading Fuse module`` is printed."""
    missing = tmp_path / "nowhere"
    done = subprocess.run(
        [sys.executable, "-m", "cvmfsd.sim.cvmfs2", "-o", "config=/dev/null", FQRN, str(missing)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr == f"Mount point {missing} does not exist\n"


# -- 2. the talk socket, relative to the workspace ----------------------------------


@pytest.mark.fuse
def test_talk_socket_is_relative_to_the_workspace(sim: Sim) -> None:
    """cvmfs/mountpoint.cc:1886 binds ``./cvmfs_io.<fqrn>``; mountpoint.cc:842-848
    (SetupCwd) changed into the workspace, and util/posix.cc:1702-1728 (Daemonize)
    keeps that working directory. The socket mode is 0660 (talk.cc:86) under the
    loader's umask 007 (loader.cc:621)."""
    sim.publish()
    assert sim.mount().returncode == 0
    pid = sim.pids[0]
    assert Path(f"/proc/{pid}/cwd").resolve() == workspace(sim).resolve()
    sock = workspace(sim) / f"cvmfs_io.{FQRN}"
    assert sock.is_socket()
    assert sock.stat().st_mode & 0o777 == 0o660


@pytest.mark.fuse
def test_deep_workspace_mounts_and_talks_through_a_short_path(sim: Sim) -> None:
    """A workspace whose absolute socket path exceeds sun_path (108 bytes) still
    mounts: the bind is relative (mountpoint.cc:1886). A client connects through
    a short path, here /proc/self/fd/<dirfd>/cvmfs_io.<fqrn>."""
    sim.publish()
    deep = sim.root / ("d" * 60) / ("e" * 60)
    sim.write_config(CVMFS_CACHE_BASE=str(deep))
    absolute = deep / "shared" / f"cvmfs_io.{FQRN}"
    assert len(str(absolute)) >= SUN_PATH_MAX
    argv = [sys.executable, "-m", "cvmfsd.sim.cvmfs2", "-o", f"config={sim.conf}", FQRN,
            str(sim.mnt)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert absolute.is_socket()
    dirfd = os.open(absolute.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        short = f"/proc/self/fd/{dirfd}/cvmfs_io.{FQRN}"
        sim.pids.append(int(talk(short, "pid")))
        sim.helpers += [int(talk(short, "pid watchdog")), int(talk(short, "pid cachemgr"))]
        assert talk(short, "mountpoint") == f"{sim.mnt}\n"
    finally:
        os.close(dirfd)


def test_make_socket_binds_long_paths_through_a_temporary_link(tmp_path: Path) -> None:
    """util/posix.cc:296-318 and :331-340: a path of sizeof(sun_path) bytes or more is
    bound through /tmp/cvmfs.XXXXXX/l -> its directory; the link and the directory
    are removed right after the bind (posix.cc:368-369)."""
    deep = tmp_path / ("x" * 100)
    deep.mkdir()
    path = str(deep / "cvmfs_io.some.repo")
    assert len(path) >= SUN_PATH_MAX
    before = short_links()
    sock = make_socket(path, 0o660)
    try:
        assert Path(path).is_socket()
        assert short_links() == before
        sock.listen(1)
        dirfd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(f"/proc/self/fd/{dirfd}/cvmfs_io.some.repo")
        finally:
            os.close(dirfd)
    finally:
        sock.close()
    # A left-over socket file is unlinked and bound again (posix.cc:353-356).
    make_socket(path, 0o660).close()


# -- 3. talk limits -----------------------------------------------------------------


@pytest.mark.fuse
def test_talk_reads_one_command_of_at_most_512_bytes(sim: Sim) -> None:
    """talk.h:42 kMaxCommandSize = 512; talk.cc:202-209 does one recv of that size,
    drops one trailing NUL and trims nothing else; the rest is never read."""
    sim.write_config(CVMFS_DEBUGLOG=str(sim.root / "debug.log"))
    sim.publish()
    assert sim.mount().returncode == 0
    assert raw_talk(sim.socket, b"pid\0") == f"{sim.pids[0]}\n".encode()
    assert raw_talk(sim.socket, b"pid\n") == b"unknown command\n"
    # The 96 bytes never read make the kernel reset the connection when cvmfs2 closes
    # it, which may come before its answer is read: either is upstream's behaviour.
    try:
        long_answer: bytes | None = raw_talk(sim.socket, b"revision" + b"x" * 600)
    except ConnectionResetError:
        long_answer = None
    assert long_answer in (b"unknown command\n", None)
    assert "(length 512)" in (sim.root / "debug.log").read_text()


def test_talk_listen_backlog_is_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """talk.cc:89: listen(socket_fd_, 1). Linux queues backlog + 1 connections on a unix
    socket; the next non-blocking connect fails with EAGAIN."""
    monkeypatch.chdir(tmp_path)
    settings = make_settings(
        {"CVMFS_SERVER_URL": "file:///s/@fqrn@", "CVMFS_HTTP_PROXY": "DIRECT",
         "CVMFS_WORKSPACE": str(tmp_path)}, FQRN, "/mnt")
    assert settings.talk_bind == f"./cvmfs_io.{FQRN}"
    server = _talk_socket(settings)
    clients = []
    try:
        for _ in range(10):
            client = socket.socket(socket.AF_UNIX)
            client.setblocking(False)
            clients.append(client)
            try:
                client.connect(str(tmp_path / f"cvmfs_io.{FQRN}"))
            except BlockingIOError:
                break
        assert len(clients) == 3  # two queued, the third refused
    finally:
        for client in clients:
            client.close()
        server.close()


# -- 4. double mount and waiting for the workspace lock -----------------------------


@pytest.mark.fuse
def test_double_mount_exits_0(sim: Sim) -> None:
    """loader.cc:985-990: kFailDoubleMount prints "\\nCernVM-FS: repository X already
    mounted on Y" on stderr and returns 0; cvmfs.cc:2233-2245 decides it from the
    workspace lock and the user.fqrn xattr of the mount point."""
    sim.publish()
    assert sim.mount().returncode == 0
    again = sim.mount()
    assert (again.returncode, again.stdout) == (0, "CernVM-FS: loading Fuse module... ")
    assert again.stderr == f"\nCernVM-FS: repository {FQRN} already mounted on {sim.mnt}\n"
    assert sim.talk("pid") == f"{sim.pids[0]}\n"  # the first daemon serves on


@pytest.mark.fuse
def test_locked_workspace_without_a_mount_waits(sim: Sim) -> None:
    """cvmfs.cc:2236-2241 (user.fqrn unreadable: "another cvmfs process is still in
    shutdown procedure") sets wait_workspace, and mountpoint.cc:519-527 then blocks in
    LockFile (util/posix.cc:982-1000) with no deadline."""
    sim.publish()
    assert sim.mount().returncode == 0
    other = sim.root / "mnt2"
    other.mkdir()
    argv = [sys.executable, "-m", "cvmfsd.sim.cvmfs2", "-o", f"config={sim.conf}", FQRN,
            str(other)]
    waiting = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=2)
        assert "another process holds" in sim.log.read_text()
        os.kill(sim.pids[0], signal.SIGTERM)  # the first one unmounts and goes
        out, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 0, err
        assert out.endswith(f"CernVM-FS: mounted cvmfs on {other}\n")
        sim.pids.append(int(sim.talk("pid")))
        sim.helpers.append(int(sim.talk("pid watchdog")))
        sim.helpers.append(int(sim.talk("pid cachemgr")))
        assert sim.talk("mountpoint") == f"{other}\n"
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
        for pid in sim.pids[1:]:
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: all(process_gone(p) for p in sim.pids), 10, "cvmfs2 to exit")
        subprocess.run(["fusermount3", "-u", str(other)], capture_output=True, check=False)


# -- 5. the watchdog ----------------------------------------------------------------


@pytest.mark.fuse
def test_watchdog_is_a_separate_forked_process(sim: Sim) -> None:
    """monitor.cc:390-445 (Watchdog::Fork): fork, fork again, Daemonize, close every
    descriptor but its pipes; no exec, so the same command line. talk.cc:675-677
    answers ``pid watchdog`` with it."""
    sim.publish()
    assert sim.mount().returncode == 0
    main, dog = sim.pids[0], int(sim.talk("pid watchdog"))
    assert dog != main
    assert cmdline(dog) == cmdline(main)
    assert "/dev/fuse" in fds_of(main)
    held = fds_of(dog)
    assert "/dev/fuse" not in held
    assert not any(f.endswith(f"lock.{FQRN}") or f.startswith("socket:") for f in held)
    assert os.getsid(dog) not in (os.getsid(main), os.getsid(0))
    assert int(Path(f"/proc/{dog}/stat").read_text().rsplit(")", 1)[1].split()[1]) != main


@pytest.mark.fuse
def test_crash_reports_kills_and_unmounts_only_as_root(sim: Sim) -> None:
    """A crash signal: monitor.cc SendTrace (~300-345) tells the watchdog, which
    SIGKILLs cvmfs2 (ReportStacktrace ~262-285), logs to <workspace>/stacktrace.<fqrn>
    (cvmfs.cc:2442-2443) and runs auto_umount.cc UmountOnCrash: 2 s, still listed in
    /proc/mounts, opendir fails with ENOTCONN, then SwitchCredentials(0, ...) and a
    lazy umount. An ordinary user cannot regain root: the mount stays ENOTCONN."""
    no_cachemgr(sim)  # so the watchdog's pipe has no other holder
    sim.publish()
    assert sim.mount().returncode == 0
    main, dog = sim.pids[0], int(sim.talk("pid watchdog"))
    crashed = time.monotonic()
    assert sim.talk("sim crash") == "OK\n"
    wait_for(lambda: process_gone(main), 10, "the watchdog to kill cvmfs2")
    with pytest.raises(OSError) as info:
        sim.mnt.stat()
    # The first request after the daemon is gone may read ECONNABORTED, later ones ENOTCONN.
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    wait_for(lambda: process_gone(dog), 10, "the watchdog to finish")
    assert time.monotonic() - crashed >= 2.0
    report = (workspace(sim) / f"stacktrace.{FQRN}").read_text()
    assert f"Signal: 6, errno: 0, version: 2.13.3, PID: {main}" in report
    log = sim.log.read_text()
    if ROOT:
        assert f"crash cleanup handler unmounted stalled {sim.mnt}" in log
        assert mountinfo_line(sim.mnt) is None
    else:
        assert "crash cleanup handler: failed to re-gain root privileges" in log
        with pytest.raises(OSError) as info:
            sim.mnt.stat()
        assert info.value.errno == errno.ENOTCONN


@pytest.mark.fuse
def test_sigkill_is_unexpected_termination(sim: Sim) -> None:
    """monitor.cc:612-617: end of file on the watchdog pipe is "watchdog: unexpected
    termination" and runs the crash handler as well."""
    no_cachemgr(sim)
    sim.publish()
    assert sim.mount().returncode == 0
    dog = int(sim.talk("pid watchdog"))
    os.kill(sim.pids[0], signal.SIGKILL)
    wait_for(lambda: process_gone(dog), 10, "the watchdog to finish")
    log = sim.log.read_text()
    assert "watchdog: unexpected termination" in log
    assert ("unmounted stalled" in log) == ROOT


@pytest.mark.fuse
def test_fake_root_watchdog_unmounts_in_its_namespace(sim: Sim) -> None:
    """As in cvmfsexec mode 3 (``unshare -rm``: uid 0 of a user namespace owning the
    mount namespace), the crash handler's lazy unmount succeeds (auto_umount.cc:84-98)."""
    no_cachemgr(sim)
    sim.publish()
    script = '"$@" >/dev/null && echo $$ && exec sleep 60'
    argv = ["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m",
            "cvmfsd.sim.cvmfs2", "-o", f"config={sim.conf}", FQRN, str(sim.mnt)]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        ns_pid = holder.stdout.readline().strip()
        assert ns_pid, "cvmfs2 did not mount in the namespace"
        line = mountinfo_line(sim.mnt, ns_pid)
        assert line is not None and " - fuse /dev/fuse " in line
        main = int(sim.talk("pid"))
        sim.helpers.append(int(sim.talk("pid watchdog")))
        assert sim.talk("sim crash") == "OK\n"
        wait_for(lambda: process_gone(main), 10, "the crash")
        wait_for(lambda: mountinfo_line(sim.mnt, ns_pid) is None, 10, "the lazy unmount")
        assert f"crash cleanup handler unmounted stalled {sim.mnt}" in sim.log.read_text()
    finally:
        holder.kill()
        holder.communicate()


@pytest.mark.fuse
def test_watchdog_gone_aborts_cvmfs2(sim: Sim) -> None:
    """monitor.cc:568-590 (MainWatchdogListener): the watchdog's pipe hangs up ->
    "watchdog disappeared" and PANIC, i.e. abort; the watchdog exits on SIGTERM
    (monitor.cc:58-62, 296-302)."""
    sim.publish()
    assert sim.mount().returncode == 0
    dog = int(sim.talk("pid watchdog"))
    os.kill(dog, signal.SIGTERM)
    wait_for(lambda: process_gone(sim.pids[0]), 10, "cvmfs2 to abort")
    log = sim.log.read_text()
    assert "watchdog: received unexpected signal 15" in log
    assert "watchdog disappeared" in log
    with pytest.raises(OSError) as info:
        sim.mnt.stat()
    # Linux answers the first request after the daemon is gone ECONNABORTED, later ones
    # ENOTCONN: both mean "no daemon".
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def test_crash_handler_checks_the_mount_list_read_before_its_sleep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto_umount.cc:44 reads the mount list, :52 sleeps 2 s, :56-62 look for the mount
    point in *that* list (no second read), and :76-77 then opendir it: a mount point
    unmounted during the sleep is looked at anyway (here a plain directory: "seems not
    to be stalled (0)"), never reported "not mounted"."""
    point = tmp_path / "mnt"
    point.mkdir()
    reads = iter([[str(point)], []])  # listed before the sleep, gone after it
    monkeypatch.setattr(_watchdog, "mount_list", lambda path="/proc/mounts": next(reads))
    said: list[str] = []
    log = SimpleNamespace(info=said.append)
    outcome = _watchdog.umount_on_crash(str(point), log, delay=0)  # type: ignore[arg-type]
    assert outcome == f"crash cleanup handler: {point} seems not to be stalled (0)"
    assert said == [outcome]


def test_platform_umount_updates_a_regular_mtab_under_its_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """util/platform_linux.h:63 (a regular /etc/mtab), :66-85 (``<mtab>.cvmfslock``,
    flock tried once and then once a second while ``timeout`` counts down from 10; a lock
    still held fails the unmount), :87-125 (the mtab rewritten without the mount point,
    through ``<mtab>.cvmfstmp``), then :131 umount2 -- so a held lock delays the unmount
    by up to 10 s after the crash handler's opendir."""
    import fcntl

    mtab = tmp_path / "mtab"
    point = tmp_path / "mnt"
    point.mkdir()
    other = "fuse /other fuse rw 0 0\n"
    mtab.write_text(f"fuse {point} fuse rw 0 0\n{other}")
    monkeypatch.setattr(_watchdog, "MTAB_LOCK_TRIES", 1)
    holder = os.open(f"{mtab}.cvmfslock", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        start = time.monotonic()
        assert not _watchdog.platform_umount(str(point), lazy=True, path_mounted=str(mtab))
        assert time.monotonic() - start >= 1.0  # one more try, 1 s later
        assert str(point) in mtab.read_text()  # not touched without the lock
    finally:
        os.close(holder)
    # Unlocked: the entry goes; the umount2 of a directory that is no mount then fails.
    assert not _watchdog.platform_umount(str(point), lazy=True, path_mounted=str(mtab))
    assert mtab.read_text() == other
    assert not Path(f"{mtab}.cvmfstmp").exists()


@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="regaining root (the lazy unmount) needs (fake) root")
def test_crash_handler_unmounts_whatever_is_on_top_after_its_opendir(
        sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto_umount.cc:76-77 opendir finds ENOTCONN, :91 platform_umount -> umount2 of the
    *path* (platform_linux.h:131): with the mtab lock held between the two, a new mount
    put at the mount point meanwhile is the one detached (the old watchdog can unmount
    a remount).  Here the new mount is a bind of a directory at the same path."""
    import fcntl

    no_cachemgr(sim)
    mtab = sim.root / "mtab"
    mtab.write_text("")
    monkeypatch.setenv(_watchdog.PATH_MOUNTED_ENV, str(mtab))
    holder = os.open(f"{mtab}.cvmfslock", os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        sim.publish()
        assert sim.mount().returncode == 0
        main, dog = sim.pids[0], int(sim.talk("pid watchdog"))
        os.kill(main, signal.SIGKILL)
        wait_for(lambda: process_gone(main), 10, "cvmfs2 to die")
        # The handler has looked (2 s) and waits for the lock: the dead mount goes,
        # and a new one takes the mount point.
        wait_for(lambda: f"{mtab}.cvmfslock" in fds_of(dog), 10, "the handler to wait for the lock")
        subprocess.run(["umount", str(sim.mnt)], check=True)
        other = sim.root / "other"
        other.mkdir()
        (other / "marker").write_text("new")
        subprocess.run(["mount", "--bind", str(other), str(sim.mnt)], check=True)
    finally:
        os.close(holder)  # the handler takes the lock within a second and unmounts
    wait_for(lambda: process_gone(dog), 10, "the watchdog to finish")
    assert not (sim.mnt / "marker").exists(), "the new mount was detached"
    assert f"crash cleanup handler unmounted stalled {sim.mnt}" in sim.log.read_text()


# -- 6. the shared cache manager ----------------------------------------------------


@pytest.fixture
def two(sim: Sim) -> Iterator[tuple[Sim, Path]]:
    """``sim`` plus a second repository on the same cache, mounted at ``<root>/mnt2``."""
    sim.publish()
    stratum.publish(sim.stratum, OTHER, sim.src)
    mnt2 = sim.root / "mnt2"
    mnt2.mkdir()
    yield sim, mnt2
    subprocess.run(["fusermount3", "-u", "-z", str(mnt2)], capture_output=True, check=False)


def mount_other(s: Sim, mnt2: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cvmfsd.sim.cvmfs2", "-o", f"config={s.conf}", OTHER, str(mnt2)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.fuse
def test_cachemgr_is_shared_and_leaves_with_its_last_client(two: tuple[Sim, Path]) -> None:
    """quota_posix.cc:369-381: ``<argv0> __cachemgr__ <cache[:workspace]> <boot fd>
    <handshake fd> <limit> <limit/2> 1 <syslog level> <facility> <debuglog>:<usyslog>``,
    started by the first client (ExecAsDaemon, util/posix.cc), in the workspace, cache
    "." (mountpoint.cc:361-363); quota_posix.cc:1190 serves until end of file on its
    FIFO, i.e. until the last client is gone. talk.cc:671-674 answers its pid."""
    s, mnt2 = two
    assert s.mount().returncode == 0
    mgr = int(s.talk("pid cachemgr"))
    argv = cmdline(mgr)
    assert argv[:4] == [sys.executable, "-m", "cvmfsd.sim.cvmfs2", "__cachemgr__"]
    assert argv[4] == "."
    assert argv[7:] == [str(4000 * 2**20), str(2000 * 2**20), "1", "3", "-1", f":{s.log}"]
    assert Path(f"/proc/{mgr}/cwd").resolve() == workspace(s).resolve()
    # [inferred] no O_CLOEXEC upstream, and ExecAsDaemon closes nothing: it holds the
    # first client's workspace lock.
    # Upstream the manager probably inherits the starter's workspace lock (inferred:
    # ExecAsDaemon closes nothing); the simulation does not pass it on (_cachemgr).
    assert not any(f.endswith(f"/lock.{FQRN}") for f in fds_of(mgr))
    assert mount_other(s, mnt2).returncode == 0
    other = talk(str(workspace(s) / f"cvmfs_io.{OTHER}"), "pid").strip()
    assert talk(str(workspace(s) / f"cvmfs_io.{OTHER}"), "pid cachemgr") == f"{mgr}\n"
    os.kill(s.pids[0], signal.SIGTERM)
    wait_for(lambda: process_gone(s.pids[0]), 10, "the first client to exit")
    time.sleep(0.5)
    assert not process_gone(mgr)  # the other client still uses it
    os.kill(int(other), signal.SIGTERM)
    wait_for(lambda: process_gone(mgr), 10, "the cache manager to leave with its last client")
    assert not (workspace(s) / "cachemgr").exists()


# -- 7. expires ---------------------------------------------------------------------


@pytest.mark.parametrize(("left", "shown"), [(250, "4"), (30, "0"), (-30, "0"), (-90, "-1"),
                                             (-3700, "-61")])
def test_expires_is_truncated_minutes_and_may_be_negative(left: float, shown: str) -> None:
    """cvmfs.cc:2158-2175 (ExpiresMagicXattr): (catalogs_valid_until - now) / 60 in C
    integer division; catalogs_valid_until is renewed only by a finished check
    (fuse_remount.cc:108-120), so it lies in the past while a check is under way."""
    fake = SimpleNamespace(expires_in=lambda: left)
    assert _report.xattr(fake, "expires") == shown  # type: ignore[arg-type]
