"""The simulated cvmfsexec scripts against cvmfsexec 4.51 (cvmfs/cvmfsexec 58eddfb), line by line.

Every test names the upstream file and line it pins.  The first group needs no
FUSE: stub commands on PATH record what umountrepo and mountrepo run.  The
second runs the simulated cvmfsexec (mode 3, or mode 2 by its kernel knob) and
talks to its request processor (``proccmd``, cvmfsexec:122-183) the way
``$CVMFSMOUNT`` does.  The last group is the shim's side of that interface
(:mod:`cvmfsd.nesting`): answers that outrun their request, and a stuck
request that must not stall the processor for good.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cvmfsd.nesting import Nesting
from cvmfsd.sim import stratum
from tests.conftest import REPO_A, REPO_B, cvmfs2_pids, wait_for
from tests.livedaemon import talk, talk_socket
from tests.test_recovery import (
    CONTENT,
    Cvmfsd,
    _run,  # noqa: F401 - the `run` fixture
    cvmfsctl_status,
    is_event,
    repo_state,
    wait_exit,
    watched_cvmfs2,
)


def run(argv: list[str], *, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


# -- usage ----------------------------------------------------------------------------

CVMFSEXEC_USAGE = """\
Usage: cvmfsexec [-vN] [-m e2fs_image] [repo ...] -- [command]
       -v:   print current version and exit
       -N:   disable the option of nesting [u]mountrepo commands
       -m:   mount given ext2/3/4 filesystem image at /e2fs
"""


@pytest.mark.parametrize(("argv", "stderr"), [
    (["cvmfsexec", "repo.a"], CVMFSEXEC_USAGE),  # cvmfsexec:14-21,107-109: no "--"
    (["cvmfsexec", "-x", "--"], CVMFSEXEC_USAGE),  # cvmfsexec:90-91
    (["mountrepo"], "Usage: mountrepo repo.name\n"),  # mountrepo:10-18
    (["mountrepo", "a.b", "c.d"], "Usage: mountrepo repo.name\n"),
    (["umountrepo", "-z"], "Usage: umountrepo [-z] {repo.name|-a}\n"),  # umountrepo:8-22
])
def test_usage(dist: Path, argv: list[str], stderr: str) -> None:
    """Usage texts go to stderr, exit 1 (getopts adds its own line before cvmfsexec's)."""
    result = run([str(dist / argv[0]), *argv[1:]], env=dict(os.environ))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.endswith(stderr)


# -- umountrepo ---------------------------------------------------------------------

TOOLS = ("bash", "dirname", "rmdir", "mount", "grep", "awk", "cat", "sed", "cut", "find", "tail",
         "mktemp", "rm", "mkdir")


def stub_path(bin_dir: Path, log: Path, *, uid: int, stubs: tuple[str, ...]) -> dict[str, str]:
    """An environment whose PATH has only the tools the scripts use, plus recording stubs.

    ``id -u`` answers ``uid``; every command in ``stubs`` appends its name and
    arguments to ``log`` and succeeds.
    """
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    (bin_dir / "id").write_text(f"#!/bin/bash\necho {uid}\n")
    for name in stubs:
        (bin_dir / name).write_text(f'#!/bin/bash\necho "{name} $*" >>{log}\n')
    for path in bin_dir.iterdir():
        if not path.is_symlink():
            path.chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": "/"}


def test_umountrepo_never_calls_fusermount3(dist: Path, tmp_path: Path) -> None:
    """umountrepo:73,80: an unprivileged unmount is `fusermount -u`, by that name only.

    With only fusermount3 on PATH (an EL9 node without the compatibility link)
    the unmount cannot happen: bash reports `fusermount: command not found` and,
    the exit status being the last command's (umountrepo:82, rmdir of the
    directory that is still there), nothing else tells.
    """
    log = tmp_path / "calls"
    env = stub_path(tmp_path / "bin", log, uid=1000, stubs=("fusermount3",))
    (dist / f"dist/cvmfs/{REPO_A}").mkdir(parents=True)
    result = run([str(dist / "umountrepo"), REPO_A], env=env)
    assert result.stdout == f"Unmounting {dist}/dist/cvmfs/{REPO_A}\n"
    assert "fusermount: command not found" in result.stderr
    assert not log.exists(), "fusermount3 must never be called"
    assert result.returncode == 0  # rmdir of the (unmounted, empty) directory succeeded


@pytest.mark.parametrize(("uid", "case"), [
    # umountrepo:76-82: fusermount -u as a user, umount as (fake) root, then rmdir
    (1000, (["repo.a"], "Unmounting", ["fusermount -u {mnt}"])),
    (0, (["repo.a"], "Unmounting", ["umount {mnt}"])),
    # umountrepo:68-74: -z is lazy, and no rmdir follows
    (1000, (["-z", "repo.a"], "Lazily unmounting", ["fusermount -uz {mnt}"])),
    (0, (["-z", "repo.a"], "Lazily unmounting", ["umount -l {mnt}"])),
])
def test_umountrepo_commands(dist: Path, tmp_path: Path, uid: int,
                             case: tuple[list[str], str, list[str]]) -> None:
    """umountrepo:60-83: who unmounts how, by `id -u`; the exit status is the last command's."""
    args, said, calls = case
    log = tmp_path / "calls"
    env = stub_path(tmp_path / "bin", log, uid=uid, stubs=("fusermount", "fusermount3", "umount"))
    mnt = dist / f"dist/cvmfs/{REPO_A}"
    mnt.mkdir(parents=True)
    result = run([str(dist / "umountrepo"), *args], env=env)
    assert result.stdout == f"{said} {mnt}\n", result.stderr
    assert log.read_text().splitlines() == [c.format(mnt=mnt) for c in calls]
    assert mnt.exists() == ("-z" in args)
    assert result.returncode == 0


# -- mountrepo ----------------------------------------------------------------------

STUB_CVMFS2 = """#!/bin/bash
# records how mountrepo runs cvmfs2, then fails with loader code 7
config=${2#config=}
{
    echo "argv: $*"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "CVMFS_LIBRARY_PATH=$CVMFS_LIBRARY_PATH"
    echo "--- config"
    cat "${config%%,*}"
} >"$(dirname "$0")/../../../calls"
exit 7
"""


@pytest.fixture(name="stub_dist")
def _stub_dist(dist: Path) -> Path:
    """``dist`` with a cvmfs2 that records its command line, environment and config file."""
    cvmfs2 = dist / "dist/usr/bin/cvmfs2"
    cvmfs2.write_text(STUB_CVMFS2)
    cvmfs2.chmod(0o755)
    return dist


def mount_stub(dist: Path, repo: str = REPO_A) -> tuple[subprocess.CompletedProcess[str], str]:
    result = run([str(dist / "mountrepo"), repo])
    return result, (dist / "calls").read_text()


def config_of(calls: str) -> list[str]:
    return calls.split("--- config\n", 1)[1].splitlines()


def test_mountrepo_makes_its_directories_and_runs_cvmfs2(stub_dist: Path) -> None:
    """mountrepo:102-108,141-158: log/, dist/var/run/cvmfs and dist/cvmfs/<repo> are made
    by mountrepo (no rpm has them); cvmfs2 runs as `cvmfs2 -o config=FILE REPO DIST/cvmfs/REPO`
    with the el6 fallback library path, and mountrepo exits with cvmfs2's status."""
    dist = stub_dist
    for made in ("log", "dist/var/run/cvmfs", "dist/cvmfs"):
        assert not (dist / made).exists(), f"makedist made {made}"
    result, calls = mount_stub(dist)
    assert result.returncode == 7
    for made in ("log", "dist/var/run/cvmfs", f"dist/cvmfs/{REPO_A}"):
        assert (dist / made).is_dir(), made
    argv, ld_path, lib_path = calls.splitlines()[:3]
    assert argv.startswith("argv: -o config=")
    assert argv.endswith(f" {REPO_A} {dist}/dist/cvmfs/{REPO_A}")
    # mountrepo:150-156: no libfuse.so.2 in usr/lib64, so dist/lib64 is added
    assert ld_path == f"LD_LIBRARY_PATH={dist}/dist/usr/lib64:{dist}/dist/lib64"
    assert lib_path == f"CVMFS_LIBRARY_PATH={dist}/dist/usr/lib64"
    config = config_of(calls)
    assert f"CVMFS_USYSLOG={dist}/log/{REPO_A}.log" in config  # mountrepo:105-108
    assert any(line.startswith("CVMFS_NFILES=") for line in config)  # mountrepo:102-104
    assert config[-1] == f"CVMFS_AUTHZ_CVMFS_DIST={dist}/dist"  # mountrepo:132


def test_mountrepo_leaves_log_to_default_local(stub_dist: Path) -> None:
    """mountrepo:105-108: with CVMFS_USYSLOG in default.local, no log/ and no default."""
    local = stub_dist / "dist/etc/cvmfs/default.local"
    local.write_text(local.read_text() + "CVMFS_USYSLOG=/var/log/x.log\n")
    _, calls = mount_stub(stub_dist)
    assert not (stub_dist / "log").exists()
    config = config_of(calls)
    # relocated like every /var path (mountrepo:73)
    assert [c for c in config if c.startswith("CVMFS_USYSLOG=")] == [
        f"CVMFS_USYSLOG={stub_dist}/dist/var/log/x.log"]


def test_mountrepo_reads_lines_as_bash_read_does(stub_dist: Path) -> None:
    """mountrepo:53-63: `while read LINE` -- a last line without a newline is dropped,
    leading blanks go, and `. FILE` / `source FILE` lines are replaced by FILE's lines,
    relative to the including file's directory (relocate's cd, mountrepo:70)."""
    config_d = stub_dist / "dist/etc/cvmfs/config.d"
    (config_d / "common.inc").write_text("FROM_INCLUDE=yes\n")
    (config_d / f"{REPO_A}.conf").write_text(
        "   INDENTED=1\n. common.inc\nsource ./common.inc\nLAST_LINE=lost")
    _, calls = mount_stub(stub_dist)
    config = config_of(calls)
    assert "INDENTED=1" in config
    assert config.count("FROM_INCLUDE=yes") == 2
    assert not any(line.startswith("LAST_LINE") for line in config)


def test_mountrepo_takes_every_config_repository_line(stub_dist: Path) -> None:
    """mountrepo:84 reads CVMFS_CONFIG_REPOSITORY from every line of every default.d/*.conf
    (cvmfsexec:114 takes the last one only).  With two such lines the name is two lines, no
    repository equals it (mountrepo:95), so even the configuration repository named last
    reads its own etc/cvmfs/default.conf -- through the relative second word of the
    unquoted path (mountrepo:96)."""
    dist = stub_dist
    default_d = dist / "dist/etc/cvmfs/default.d"
    conf = next(default_d.glob("*.conf"))
    config_repo = conf.read_text().split("CVMFS_CONFIG_REPOSITORY=")[1].split()[0]
    own = dist / f"dist/cvmfs/{config_repo}/etc/cvmfs"
    own.mkdir(parents=True)  # stands for the mounted configuration repository
    (own / "default.conf").write_text("FROM_CONFIG_REPO=yes\n")
    _, calls = mount_stub(dist, config_repo)
    assert "FROM_CONFIG_REPO=yes" not in config_of(calls)  # one line: not its own files
    (default_d / "10-other.conf").write_text("CVMFS_CONFIG_REPOSITORY=other.example.org\n")
    _, calls = mount_stub(dist, config_repo)
    assert "FROM_CONFIG_REPO=yes" in config_of(calls)


# -- cvmfsexec's request processor (mode 3 unless said) ------------------------------

def cvmfsexec(dist: Path, *args: str, timeout: float = 60,
              **env: str) -> subprocess.CompletedProcess[str]:
    return run([str(dist / "cvmfsexec"), *args], env={**os.environ, **env}, timeout=timeout)


def mounted_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("CernVM-FS: mounted")]


@pytest.mark.fuse
def test_processor_answers(dist: Path) -> None:
    """cvmfsexec:122-183 (proccmd), as $CVMFSMOUNT/$CVMFSUMOUNT see it:

    * MOUNTREPO of a repository on the command line is already mounted: nothing is done,
      the answer is 0 (cvmfsexec:131-133; the list starts as the command line's, :287);
    * the answer on the wait FIFO is the number alone on one line (cvmfsexec:181);
    * UMOUNTREPO of a repository not mounted: `<repo> not mounted`, 1 (cvmfsexec:168-170);
    * an unknown command: `Unrecognized command X`, 1 (cvmfsexec:177-178);
    * inside cvmfsexec umountrepo refuses -z and -a (umountrepo:30-37), exit 1.
    """
    script = textwrap.dedent(f"""\
        $CVMFSMOUNT {REPO_A}; echo "again=$?"
        echo "MOUNTREPO {REPO_A}" >&$CVMFSEXEC_CMDFD
        od -An -c <$CVMFSEXEC_WAITFIFO | tr -d ' '
        $CVMFSUMOUNT {REPO_B}; echo "umount-b=$?"
        echo "FROB x" >&$CVMFSEXEC_CMDFD; read answer <$CVMFSEXEC_WAITFIFO; echo "frob=$answer"
        $CVMFSUMOUNT -z {REPO_A}; echo "lazy=$?"
        $CVMFSUMOUNT -a; echo "all=$?"
        cat /cvmfs/{REPO_A}/hello.txt
        """)
    result = cvmfsexec(dist, REPO_A, "--", "bash", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("CernVM-FS")]
    assert lines == ["again=0", "0\\n", "umount-b=1", "frob=1", "lazy=1", "all=1",
                     "hello from repo.a"]
    assert len(mounted_lines(result.stdout)) == 2  # the configuration repository and repo.a
    assert f"{REPO_B} not mounted\n" in result.stderr
    assert "Unrecognized command FROB\n" in result.stderr
    assert "umountrepo: lazy umount not supported within cvmfsexec\n" in result.stderr
    assert "umountrepo: umount within cvmfsexec only works with one repo\n" in result.stderr


@pytest.mark.fuse
def test_processor_mode2_records_a_failed_mount(dist: Path, stratum_dir: Path) -> None:
    """cvmfsexec:136-146: `RET=$?` then `if [ $? == 0 ]` tests the assignment, so a failed
    mountrepo is recorded as mounted.  In mode 2 (no bind) the answer is mountrepo's code,
    and a later UMOUNTREPO of that repository is not refused as `not mounted`."""
    stratum.set_faults(stratum_dir, REPO_B, mount_fail=16)
    script = f'$CVMFSMOUNT {REPO_B}; echo "mount=$?"; $CVMFSUMOUNT {REPO_B}; echo "umount=$?"'
    result = cvmfsexec(dist, "--", "bash", "-c", script,
                       CVMFSEXEC_SIM_UNAME_R="3.10.0-957.el7.x86_64")
    assert result.returncode == 0, result.stderr
    assert "mount=16" in result.stdout
    assert f"{REPO_B} not mounted\n" not in result.stderr  # fusermount says its own
    assert f"Unmounting {dist}/dist/cvmfs/{REPO_B}" in result.stdout


# -- the shim's side of the interface (cvmfsd.nesting) --------------------------------

FAKE_PROCESSOR = """
# the pattern of proccmd (cvmfsexec:181) -- `echo "$RET" >$CVMFSEXEC_WAITFIFO` -- with
# the processor descheduled between the write and the close for $3 seconds
n=0
while read -r cmd arg; do
    n=$((n + 1))
    { echo "$n"; sleep "$3"; } >"$2"
done <"$1"
"""


def test_answers_never_outrun_their_request(tmp_path: Path) -> None:
    """Issue #14 item 0: a client that reopens the wait FIFO for its next request while
    the processor still holds it open after the last answer reads end-of-file, and every
    answer after that is the previous request's.  Nesting takes each request's own."""
    cmd, wait = tmp_path / "cmd", tmp_path / "wait"
    os.mkfifo(cmd)
    os.mkfifo(wait)
    processor = subprocess.Popen(["bash", "-c", FAKE_PROCESSOR, "p", str(cmd), str(wait), "0.3"])
    try:
        cmd_fd = os.open(cmd, os.O_WRONLY)
        nesting = Nesting({"CVMFSEXEC_CMDFD": str(cmd_fd), "CVMFSEXEC_WAITFIFO": str(wait)})
        answers = [nesting.request("MOUNTREPO", f"r{i}", timeout=10) for i in range(1, 4)]
        assert answers == [1, 2, 3]
        os.close(cmd_fd)
        assert processor.wait(timeout=10) == 0
    finally:
        if processor.poll() is None:
            processor.kill()
            processor.wait()


REMOUNT_PAYLOAD = """
import json, sys, time
from cvmfsd import shim
from cvmfsd.sim import stratum

class Channel:
    def send(self, **message):
        print(json.dumps(message), flush=True)

nesting = shim.Nesting(dict(__import__("os").environ))
start = time.monotonic()
shim._remount(Channel(), nesting, {"id": 1, "repo": sys.argv[2], "timeout": 1.5})
print(json.dumps({"stalled_for": time.monotonic() - start}), flush=True)
stratum.set_faults(sys.argv[1], sys.argv[2], mount_delay=None)
shim._remount(Channel(), nesting, {"id": 2, "repo": sys.argv[2], "timeout": 60})
print(open(f"/cvmfs/{sys.argv[2]}/data.csv").read(), end="", flush=True)
"""


@pytest.mark.fuse
def test_stalled_remount_is_ended_and_the_next_one_works(dist: Path, stratum_dir: Path) -> None:
    """A remount whose cvmfs2 never finishes (it stands for one waiting for a locked
    workspace, cvmfs.cc:2233-2241) stalls cvmfsexec's one request processor: the shim
    gives up after the request's deadline, kills the processor's current work
    (mountrepo and its cvmfs2), and the next remount of the repository works."""
    stratum.set_faults(stratum_dir, REPO_B, mount_delay=600)
    result = cvmfsexec(dist, REPO_A, "--", sys.executable, "-c", REMOUNT_PAYLOAD,
                       str(stratum_dir), REPO_B, timeout=120)
    assert result.returncode == 0, result.stderr
    # cvmfs2 leaves "loading Fuse module... " unterminated when it is killed
    messages = [json.loads(line[line.index('{"'):]) for line in result.stdout.splitlines()
                if '{"' in line]
    stalled, timing, working = messages
    assert stalled["ok"] is False and stalled["id"] == 1
    assert "did not answer MOUNTREPO repo.b within 1.5 s" in stalled["error"]
    assert "mountrepo[" in stalled["error"], stalled["error"]
    assert timing["stalled_for"] < 10
    assert working == {"event": "remount-done", "id": 2, "statuses": [0, 0], "ok": True,
                       "revision": working.get("revision")}, working
    assert result.stdout.endswith("x,y\n1,2\n")
    wait_for(lambda: not cvmfs2_pids(dist))



@pytest.mark.fuse
def test_remount_after_a_crash_with_a_slow_processor(
        run: Callable[..., Cvmfsd], dist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #14 item 0 end to end: the simulated processor keeps the wait FIFO open
    0.3 s after each answer (CVMFSEXEC_SIM_ANSWER_HOLD).  Before the fix every remount
    read an answer that was not its own: it failed before cvmfs2 had mounted, and the
    next one unmounted the good mount.  Now the first remount works and the repository
    stays mounted."""
    monkeypatch.setenv("CVMFSEXEC_SIM_ANSWER_HOLD", "0.3")
    cvmfsd = run(mode="3")
    cvmfsd.wait_started()
    pid = watched_cvmfs2(cvmfsd, REPO_A)
    pidfd = os.pidfd_open(pid)
    assert talk(talk_socket(dist, REPO_A), "sim crash") == "OK\n"
    crashed = wait_exit(pid, timeout=10, fd=pidfd)
    done, _ = cvmfsd.wait_log(is_event("remounted", REPO_A), after=crashed, timeout=30)
    wait_for(lambda: repo_state(cvmfsctl_status(cvmfsd.socket)[1], REPO_A) == "ok",
             timeout=10, interval=0.1)
    time.sleep(1.0)  # longer than the hold: a late unmount would show by now
    events = [r for _, r in cvmfsd.records if r.get("repo") == REPO_A]
    assert not [r for r in events if r.get("event") == "remount failed"], events
    assert not [r for when, r in cvmfsd.records if when > done and r.get("repo") == REPO_A
                and r.get("event") == "repository state" and r.get("new") != "ok"], events
    assert cvmfsd.finish() == 0, cvmfsd.log_tail()
    assert (cvmfsd.work / "after").read_text() == CONTENT
