"""Tests for the simulated cvmfs2: settings, and real FUSE mounts driven like mountrepo does.

The FUSE tests launch ``python -m cvmfsd.sim.cvmfs2 -o config=F <repo> <mnt>`` for real,
as whatever user runs the tests (root or not: nothing here depends on it), and always
clean up: SIGKILL to the daemon pid they learnt, then ``fusermount3 -u``/``umount``.
Anything that may block on a hung mount runs in a child process, never in pytest.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http.server
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmfsd.loader import LoaderCode
from cvmfsd.sim import stratum
from cvmfsd.sim._settings import SettingsError, make_settings
from cvmfsd.sim.talk import talk

FQRN = "test.sim.example"


# -- pure: settings -------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "cache_dir", "socket"),
    [
        ({}, "/var/lib/cvmfs/shared", "/var/lib/cvmfs/shared/cvmfs_io.test.sim.example"),
        ({"CVMFS_CACHE_BASE": "/c"}, "/c/shared", "/c/shared/cvmfs_io.test.sim.example"),
        (
            {"CVMFS_CACHE_BASE": "/c", "CVMFS_SHARED_CACHE": "no"},
            "/c/test.sim.example",
            "/c/test.sim.example/cvmfs_io.test.sim.example",
        ),
        ({"CVMFS_CACHE_DIR": "/d"}, "/d", "/d/cvmfs_io.test.sim.example"),
        ({"CVMFS_CACHE_DIR": "/d", "CVMFS_WORKSPACE": "/w"}, "/d", "/w/cvmfs_io.test.sim.example"),
        ({"CVMFS_TALK_SOCKET": "/t/sock"}, "/var/lib/cvmfs/shared", "/t/sock"),
    ],
)
def test_paths_follow_the_real_client(config: dict[str, str], cache_dir: str, socket: str) -> None:
    """Cache directory and talk socket are derived as cvmfs_talk's DeterminePaths does."""
    base = {"CVMFS_SERVER_URL": "file:///s/@fqrn@", "CVMFS_HTTP_PROXY": "DIRECT"}
    settings = make_settings({**base, **config}, FQRN, "/mnt")
    assert (str(settings.cache_dir), str(settings.talk_socket)) == (cache_dir, socket)


@pytest.mark.parametrize(
    ("config", "code"),
    [
        ({"CVMFS_HTTP_PROXY": "DIRECT"}, LoaderCode.OPTIONS),
        ({"CVMFS_SERVER_URL": "file:///s"}, LoaderCode.OPTIONS),
        ({"CVMFS_SERVER_URL": "ftp://x/@fqrn@", "CVMFS_HTTP_PROXY": "DIRECT"}, LoaderCode.OPTIONS),
        ({"CVMFS_SERVER_URL": "file:///s", "CVMFS_HTTP_PROXY": "auto"}, LoaderCode.WPAD),
        (
            {"CVMFS_SERVER_URL": "file:///s", "CVMFS_HTTP_PROXY": "D", "CVMFS_NFILES": "x"},
            LoaderCode.OPTIONS,
        ),
    ],
)
def test_bad_settings_carry_loader_codes(config: dict[str, str], code: LoaderCode) -> None:
    """Missing or malformed options map to the real loader's failure codes."""
    with pytest.raises(SettingsError) as info:
        make_settings(config, FQRN, "/mnt")
    assert info.value.code == code


def test_server_urls_substitute_fqrn_and_org() -> None:
    """@fqrn@ and @org@ are replaced in every server URL; maxfd is NFILES - 512."""
    settings = make_settings(
        {
            "CVMFS_SERVER_URL": "http://a/@org@/@fqrn@; file:///s/@fqrn@/",
            "CVMFS_HTTP_PROXY": "auto;DIRECT",
            "CVMFS_NFILES": "4096",
        },
        FQRN,
        "/mnt",
    )
    assert settings.server_urls == ("http://a/test/test.sim.example", "file:///s/test.sim.example")
    assert settings.proxy_groups == (("DIRECT",),)
    assert settings.maxfd == 3584


# -- FUSE: helpers --------------------------------------------------------------

# These mount for real, everywhere: CI makes /dev/fuse usable (.ci/setup), and a
# machine where it is not must fail them loudly rather than skip them.
needs_fuse = pytest.mark.fuse


class Sim:
    """A stratum, a config file and a mount point in a short temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stratum = root / "s"
        self.src = root / "src"
        self.mnt = root / "mnt"
        self.cache = root / "c"
        self.log = root / "repo.log"
        self.conf = root / "conf"
        self.pids: list[int] = []
        self.helpers: list[int] = []
        (self.src / "sub").mkdir(parents=True)
        self.mnt.mkdir()
        (self.src / "hello.txt").write_text("hello world\n")
        (self.src / "sub" / "data.bin").write_bytes(os.urandom(300_000))
        (self.src / "link").symlink_to("hello.txt")
        self.write_config()

    def write_config(self, **extra: str) -> None:
        """Write the config file the way mountrepo does: plain KEY=VALUE lines."""
        config = {
            "CVMFS_SERVER_URL": f'"file://{self.stratum}/@fqrn@"',
            "CVMFS_HTTP_PROXY": "DIRECT",
            "CVMFS_CACHE_BASE": str(self.cache),
            "CVMFS_USYSLOG": str(self.log),
            "CVMFS_NFILES": "4096",
            **extra,
        }
        self.conf.write_text("".join(f"{k}={v}\n" for k, v in config.items()))

    @property
    def socket(self) -> str:
        return str(self.cache / "shared" / f"cvmfs_io.{FQRN}")

    def publish(self, ttl: int = 240) -> int:
        return stratum.publish(self.stratum, FQRN, self.src, ttl=ttl)

    def mount(self, *prefix: str, options: str = "") -> subprocess.CompletedProcess[str]:
        """Run cvmfs2 like mountrepo; remember the daemon pid when it mounted."""
        argv = [*prefix, sys.executable, "-m", "cvmfsd.sim.cvmfs2"]
        argv += ["-o", f"config={self.conf}{options}", FQRN, str(self.mnt)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode == 0 and "already mounted" not in done.stderr:
            self.pids.append(int(self.talk("pid")))
            # Separate processes upstream: killed at clean-up too (the watchdog
            # would otherwise linger for its 2 s crash handler).
            self.helpers += [int(self.talk("pid watchdog")), int(self.talk("pid cachemgr"))]
        return done

    def talk(self, command: str) -> str:
        return talk(self.socket, command, timeout=10)

    def xattr(self, name: str, path: Path | None = None) -> str:
        return os.getxattr(path or self.mnt, f"user.{name}").decode()

    def counters(self) -> dict[str, int]:
        affairs = self.talk("internal affairs")
        table = affairs.split("Raw Counters:\n", 1)[1].splitlines()
        assert table[0] == "Name|Value|Description"
        return {row.split("|")[0]: int(row.split("|")[1]) for row in table[1:]}

    def mounted(self) -> bool:
        with Path("/proc/self/mountinfo").open() as mountinfo:
            return any(line.split()[4] == str(self.mnt) for line in mountinfo)

    def cleanup(self) -> None:
        for pid in self.pids + self.helpers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _ in range(3):
            if not self.mounted():
                break
            tool = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
            subprocess.run([*tool, str(self.mnt)], capture_output=True, check=False, timeout=10)
            time.sleep(0.1)


@pytest.fixture
def sim() -> Iterator[Sim]:
    """A fresh simulation under /tmp (short paths keep the talk socket under 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="cvs", dir="/tmp"))
    root.chmod(0o700)
    s = Sim(root)
    try:
        yield s
    finally:
        s.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def process_gone(pid: int) -> bool:
    """True once ``pid`` exited (a zombie awaiting its reaper counts as gone)."""
    try:
        with Path(f"/proc/{pid}/stat").open() as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def read_file(path: Path) -> bytes:
    return path.read_bytes()


# -- FUSE: the tests ------------------------------------------------------------


@pytest.mark.fuse
@needs_fuse
def test_mount_read_and_cache_counters(sim: Sim) -> None:
    """Mount as mountrepo does; first read downloads, second read hits; talk agrees with xattrs."""
    sim.publish()
    done = sim.mount()
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"CernVM-FS: loading Fuse module... done\nCernVM-FS: mounted cvmfs on {sim.mnt}\n"
    )
    line = next(
        x
        for x in Path("/proc/self/mountinfo").read_text().splitlines()
        if x.split()[4] == str(sim.mnt)
    )
    # No fsname/subtype: loader.cc:1022/1049 mount directly, libfuse
    # (fuse-3.10.2 lib/mount.c:447-448) then uses the device as the source.
    assert " - fuse /dev/fuse " in line and "allow_other" not in line
    assert line.split()[5].startswith("ro,")
    assert sorted(p.name for p in sim.mnt.iterdir()) == ["hello.txt", "link", "sub"]
    assert str((sim.mnt / "link").readlink()) == "hello.txt"
    assert sim.xattr("ndownload") == "1"  # the root catalog
    assert read_file(sim.mnt / "hello.txt") == b"hello world\n"
    assert sim.xattr("ndownload") == "2"
    assert sim.xattr("hitrate") == "0.000"
    assert read_file(sim.mnt / "hello.txt") == b"hello world\n"
    assert sim.xattr("ndownload") == "2"
    assert float(sim.xattr("hitrate")) == pytest.approx(100 / 3, abs=0.001)
    assert (sim.mnt / "sub" / "data.bin").stat().st_size == 300_000
    read_file(sim.mnt / "sub" / "data.bin")
    counters = sim.counters()
    assert counters["fetch.n_downloads"] == int(sim.xattr("ndownload")) == 3
    assert counters["fetch.n_invocations"] == 4
    assert counters["cvmfs.n_fs_open"] == int(sim.xattr("nopen")) == 3
    assert counters["download.sz_transferred_bytes"] // 1024 == int(sim.xattr("rx")) >= 293
    assert counters["catalog_revision"] == int(sim.xattr("revision")) == 1
    assert sim.xattr("pid") == sim.talk("pid").strip() == str(sim.pids[0])
    assert sim.xattr("fqrn") == FQRN
    assert sim.xattr("maxfd") == "3584"
    assert sim.xattr("proxy") == "DIRECT"
    assert sim.xattr("host") == f"file://{sim.stratum}/{FQRN}"
    assert sim.xattr("nioerr") == "0"
    assert sim.xattr("root_hash") == stratum.read_manifest(sim.stratum, FQRN).root_hash
    assert int(sim.xattr("expires")) in (3, 4)  # 240 s TTL, truncated to minutes
    with pytest.raises(OSError) as info:
        os.getxattr(sim.mnt, "user.nonsense")
    assert info.value.errno == errno.ENODATA
    assert stat.S_IMODE(Path(sim.socket).stat().st_mode) == 0o660
    assert sim.talk("revision") == "1\n"
    assert sim.talk("mountpoint") == f"{sim.mnt}\n"
    assert sim.talk("version") == "2.13.3 (CernVM-FS Fuse Module)\n2.13.3 (Loader)\n"
    assert sim.talk("no such command") == "unknown command\n"
    assert sim.talk("cache size").startswith("Current cache size is 0MB (3")
    assert "CVMFS_HTTP_PROXY=DIRECT    # from " in sim.talk("parameters")
    assert sim.talk("timeout info") == "Timeout with proxy: 5s\nTimeout without proxy: 10s\n"
    assert "mounted cvmfs on" in sim.log.read_text()
    with pytest.raises(OSError) as info:
        (sim.mnt / "new").write_text("x")
    assert info.value.errno in (errno.EROFS, errno.EACCES)


@pytest.mark.fuse
@needs_fuse
def test_cache_survives_remount_and_double_mount_refused(sim: Sim) -> None:
    """Mounting again where it is mounted exits 0; after a clean unmount the cache hits.

    cvmfs/loader.cc:985-990 and cvmfs/cvmfs.cc:2233-2248 (more in test_fidelity_cvmfs2).
    """
    sim.publish()
    assert sim.mount().returncode == 0
    read_file(sim.mnt / "hello.txt")
    second = sim.mount()
    assert second.returncode == 0
    assert second.stderr == f"\nCernVM-FS: repository {FQRN} already mounted on {sim.mnt}\n"
    pid = sim.pids[0]
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: process_gone(pid), 10, "cvmfs2 to exit on SIGTERM")
    assert not sim.mounted()
    assert not Path(sim.socket).exists()
    assert sim.mount().returncode == 0
    assert read_file(sim.mnt / "hello.txt") == b"hello world\n"
    assert sim.xattr("ndownload") == "0"
    assert sim.xattr("hitrate") == "100.000"


@pytest.mark.fuse
@needs_fuse
def test_new_revision_appears(sim: Sim) -> None:
    """A new revision is served after the TTL, and at once on talk 'remount sync'."""
    sim.publish(ttl=1)
    assert sim.mount().returncode == 0
    ino = (sim.mnt / "hello.txt").stat().st_ino
    (sim.src / "newdir").mkdir()
    assert sim.publish(ttl=1) == 2
    wait_for((sim.mnt / "newdir").is_dir, 10, "revision 2 to appear")
    assert sim.xattr("revision") == "2"
    assert (sim.mnt / "hello.txt").stat().st_ino == ino
    assert "using revision 2" in sim.log.read_text()
    stratum.publish(sim.stratum, FQRN, sim.src, ttl=3600)
    assert sim.talk("remount sync") in ("New revision applied\n", "Catalog up to date\n")
    assert sim.talk("revision") == "3\n"
    assert sim.talk("remount") == "Catalog up to date\n"


@pytest.mark.fuse
@needs_fuse
@pytest.mark.parametrize(
    ("faults", "config", "code", "message"),
    [
        ({"mount_fail": 17, "mount_delay": 0.5}, {}, 17, "(17 - maintenance mode)"),
        (
            {},
            {"CVMFS_SERVER_URL": "file:///nonexistent/@fqrn@"},
            16,
            "Failed to initialize root file catalog (16 - file catalog failure)",
        ),
        ({}, {"CVMFS_CACHE_BASE": "/dev/null/cache"}, 9, "(9 - cache directory/plugin problem)"),
        ({}, {"CVMFS_SERVER_URL": ""}, 2, "CVMFS_SERVER_URL required"),
        ({}, {"CVMFS_HTTP_PROXY": "auto"}, 23, "proxy"),
    ],
)
def test_mount_failures_exit_with_loader_codes(
    sim: Sim, faults: dict[str, object], config: dict[str, str], code: int, message: str
) -> None:
    """Each failure prints one reason on stderr, exits with its loader code and mounts nothing."""
    sim.publish()
    stratum.set_faults(sim.stratum, FQRN, **faults)
    sim.write_config(**config)
    started = time.monotonic()
    done = sim.mount()
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert not sim.mounted()
    if faults.get("mount_delay"):
        assert time.monotonic() - started >= 0.5


@pytest.mark.fuse
@needs_fuse
def test_crash_leaves_enotconn(sim: Sim) -> None:
    """A crash kills the daemon without a core file; the mount answers ENOTCONN.

    Its watchdog waits 2 s before it looks at the mount (cvmfs/auto_umount.cc), so
    right after the crash the mount answers ENOTCONN whoever runs it; what the
    watchdog does next is pinned in test_fidelity_cvmfs2.
    """
    sim.publish()
    assert sim.mount().returncode == 0
    list(sim.mnt.iterdir())
    stratum.set_faults(sim.stratum, FQRN, crash_after=0.5)
    wait_for(lambda: process_gone(sim.pids[0]), 10, "the simulated crash")
    with pytest.raises(OSError) as info:
        (sim.mnt / "hello.txt").stat()
    assert info.value.errno == errno.ENOTCONN
    assert "simulated crash" in sim.log.read_text()
    assert not list(Path("/").glob(f"core*{sim.pids[0]}*"))


@pytest.mark.fuse
@needs_fuse
def test_sim_crash_on_command(sim: Sim) -> None:
    """The simulation-only talk command 'sim crash' answers OK and then aborts."""
    sim.publish()
    assert sim.mount().returncode == 0
    assert sim.talk("sim crash") == "OK\n"
    wait_for(lambda: process_gone(sim.pids[0]), 10, "the simulated crash")
    with pytest.raises(OSError) as info:
        list(sim.mnt.iterdir())
    assert info.value.errno == errno.ENOTCONN


@pytest.mark.fuse
@needs_fuse
def test_hang_stalls_fuse_while_talk_answers(sim: Sim) -> None:
    """Under the hang fault a stat stalls, talk still answers, and SIGKILL leaves ENOTCONN."""
    sim.publish()
    assert sim.mount().returncode == 0
    stratum.set_faults(sim.stratum, FQRN, hang_after=0)
    wait_for(lambda: "simulated hang" in sim.log.read_text(), 10, "the hang to start")
    # Only a child touches the hung mount: it may sit in D state until the daemon dies.
    probe = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.stat({str(sim.mnt / 'never-looked-up')!r})"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            probe.wait(timeout=1.5)
        assert sim.talk("pid") == f"{sim.pids[0]}\n"
        os.kill(sim.pids[0], signal.SIGKILL)
        assert probe.wait(timeout=10) != 0
    finally:
        probe.kill()
        probe.wait(timeout=10)
    with pytest.raises(OSError) as info:
        sim.mnt.stat()
    assert info.value.errno == errno.ENOTCONN


@pytest.mark.fuse
@needs_fuse
def test_eio_counts_io_errors(sim: Sim) -> None:
    """Reads of an eio path fail with EIO and bump nioerr, eio.total and the timestamp."""
    sim.publish()
    assert sim.mount().returncode == 0
    assert sim.xattr("timestamp_last_ioerr") == "0"
    stratum.set_faults(sim.stratum, FQRN, eio=["hello.txt"])
    time.sleep(1.5)  # the daemon polls its fault knobs once a second
    with pytest.raises(OSError) as info:
        read_file(sim.mnt / "hello.txt")
    assert info.value.errno == errno.EIO
    assert read_file(sim.mnt / "sub" / "data.bin")
    nioerr = int(sim.xattr("nioerr"))
    assert nioerr >= 1
    assert sim.counters()["eio.total"] == nioerr
    assert abs(int(sim.xattr("timestamp_last_ioerr")) - time.time()) < 10
    assert sim.talk("reset error counters") == "OK\n"
    assert sim.xattr("nioerr") == "0"
    assert sim.talk("sim eio on") == "OK\n"
    with pytest.raises(OSError):
        read_file(sim.mnt / "sub" / "data.bin")
    assert sim.talk("sim eio off") == "OK\n"
    assert read_file(sim.mnt / "sub" / "data.bin")


@pytest.mark.fuse
@needs_fuse
def test_external_unmount_stops_daemon(sim: Sim) -> None:
    """Unmounting from outside makes cvmfs2 exit and remove its talk socket."""
    sim.publish()
    assert sim.mount().returncode == 0
    subprocess.run(["fusermount3", "-u", str(sim.mnt)], check=True, timeout=10)
    wait_for(lambda: process_gone(sim.pids[0]), 10, "cvmfs2 to exit after unmount")
    assert not Path(sim.socket).exists()
    assert "unmounted" in sim.log.read_text()


@pytest.mark.fuse
@needs_fuse
def test_userns_mount_readable_through_proc_root(sim: Sim) -> None:
    """Mounted as fake root in 'unshare -rm' (mode 3), the mount is readable by the same
    user from the initial namespace through /proc/<pid>/root, because there is no
    allow_other and the kernel compares the real uid."""
    sim.publish()
    done = sim.mount("unshare", "-rm", options=",debug")
    assert done.returncode == 0, done.stderr
    sim.conf.unlink()  # mountrepo deletes the config file as soon as cvmfs2 returns
    assert not sim.mounted()  # not in our mount namespace
    inside = Path(f"/proc/{sim.pids[0]}/root") / str(sim.mnt).lstrip("/")
    assert read_file(inside / "hello.txt") == b"hello world\n"
    assert os.getxattr(inside, "user.ndownload") == b"2"
    assert "downloaded" in sim.log.read_text()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.fuse
@needs_fuse
def test_http_server_with_host_failover(sim: Sim) -> None:
    """Objects come over HTTP; a dead first host is failed over and counted."""
    sim.publish()
    handler = functools.partial(_QuietHandler, directory=str(sim.stratum))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = server.server_address[1]
            urls = f'"http://127.0.0.1:1/@fqrn@;http://127.0.0.1:{port}/@fqrn@"'
            sim.write_config(CVMFS_SERVER_URL=urls, CVMFS_TIMEOUT_DIRECT="3")
            assert sim.mount().returncode == 0
            assert read_file(sim.mnt / "hello.txt") == b"hello world\n"
            assert sim.xattr("host") == f"http://127.0.0.1:{port}/{FQRN}"
            assert sim.xattr("timeout_direct") == "3"
            assert sim.counters()["download.n_host_failover"] >= 1
            assert "Active host 1: http://127.0.0.1:" in sim.talk("host info")
            assert "[0] DIRECT" in sim.talk("proxy info")
        finally:
            sim.cleanup()
            server.shutdown()
            thread.join(timeout=10)
