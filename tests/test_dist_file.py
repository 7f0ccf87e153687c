"""``--dist FILE``: one self-extracting cvmfsexec, as ``makedist -o FILE`` makes it.

What is relied on, from cvmfsexec 4.51's ``makedist`` (58eddfb):

* l.221-234: the file is a bash script (``#!/bin/bash``, l.222), then a line
  ``__TAR_BELOW__`` (l.232), then ``tar -czf`` output (l.234), i.e. gzip data.
  So a file without that line, or without gzip after it, is no such file, and
  is refused before it is run.
* l.223-224: it unpacks into ``.cvmfsexec`` in its own directory (``dirname $0``),
  which must therefore be writable; l.225-230: afresh only when the file is
  newer than that directory (``-nt``); l.231: then it execs the unpacked
  cvmfsexec with its arguments, so ``FILE -v`` unpacks and prints the version.
* l.209,221: ``makedist -s -o`` turns the first ``cvmfsexec`` of each header
  line into ``singcvmfs``: its files unpack into ``.singcvmfs``.

* l.223,225,228-229: the header uses ``$0`` and ``$BASE`` unquoted.

Checked by hand: a file made by the real ``makedist -o`` (from a simulated
distribution) passes :func:`cvmfsd.packed.check_header` and unpacks; copied to a
directory with a space in its name, running it says "cd: too many arguments",
"[: too many arguments" and ends 127 (``/.cvmfsexec/cvmfsexec: No such file``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from cvmfsd import packed
from cvmfsd.config import Config
from cvmfsd.launch import Dist, LaunchError
from cvmfsd.leftovers import LOCK_NAME
from cvmfsd.prepare import prepare
from cvmfsd.sim import makedist
from tests.conftest import REPO_A, assert_nothing_left_under, dist_parent, processes_with_argv
from tests.test_mode import facts

#: What a file that must not be run leaves behind when it is run anyway.
RAN = "ran-it"


@pytest.fixture(name="dist_file")
def _dist_file(dist: Path, short_tmp: Path) -> Iterator[Path]:
    """The ``dist`` fixture packed into ``pilot/cvmfsexec`` (makedist -o).

    At teardown, cvmfs2 processes of the unpacked copy are killed and mounts
    left under it fail the test.
    """
    directory = dist_parent(short_tmp / "pilot")
    directory.mkdir(parents=True, exist_ok=True)
    file = makedist.pack_dist(dist, directory / "cvmfsexec")
    yield file
    assert_nothing_left_under(directory / packed.UNPACKED)


def with_tar(file: Path, header: str, members: dict[str, str]) -> Path:
    """A self-extracting file of our own: the simulated header, another tar."""
    src = file.parent / f"{file.name}.src"
    for name, text in members.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
        (src / name).chmod(0o755)
    tar = subprocess.run(["tar", "-czf", "-", "-C", str(src), *members], capture_output=True,
                         check=True).stdout
    file.write_bytes(header.encode() + tar)
    file.chmod(0o755)
    shutil.rmtree(src)
    return file


def sim_header(file: Path) -> str:
    """The header of a file made by ``cvmfsd sim makedist -o``."""
    data = file.read_bytes()
    return data[: data.index(packed.TAR_MARKER) + len(packed.TAR_MARKER)].decode()


# --- what is not a self-extracting cvmfsexec, told before it runs -------------------------


def not_packed(file: Path, made: Path) -> dict[str, tuple[bytes, str]]:
    """Bad files (contents, what the error says); each leaves RAN beside it if run."""
    ran = f"touch {file.parent / RAN}\n"
    header = sim_header(made).encode()
    return {
        "binary": (b"\x7fELF\x02\x01\x01\x00" + bytes(64),
                   "starts with b'\\x7fELF\\x02\\x01\\x01\\x00', not a script's '#!'"),
        "script": (f"#!/bin/sh\n{ran}echo cvmfsexec\n".encode(),
                   "a script without a line __TAR_BELOW__ in its first 64 KiB"),
        "not-gzip": (f"#!/bin/bash\n{ran}exit 0\n__TAR_BELOW__\nplain text\n".encode(),
                     "what follows its __TAR_BELOW__ line is not gzip data"),
        # makedist:209,221: -s -o rewrites the header's first cvmfsexec per line
        "singcvmfs": (header.replace(b"/.cvmfsexec", b"/.singcvmfs").replace(
            b"#!/bin/bash\n", f"#!/bin/bash\n{ran}".encode(), 1) + made.read_bytes()[
                len(header):], "is a self-extracting singcvmfs (makedist -s -o)"),
    }


@pytest.mark.parametrize("kind", ["binary", "script", "not-gzip", "singcvmfs"])
def test_not_a_self_extracting_cvmfsexec_is_refused_unrun(dist_file: Path, kind: str) -> None:
    """A binary, a random script, a cut file or a singcvmfs: refused, and never run."""
    bad = dist_file.parent / "other"
    content, says = not_packed(bad, dist_file)[kind]
    bad.write_bytes(content)
    bad.chmod(0o755)
    with pytest.raises(LaunchError) as info:
        packed.unpack_file(bad)
    assert f"{bad} is " in str(info.value)
    assert says in str(info.value)
    assert "expected a self-extracting cvmfsexec, as `makedist -o FILE` makes it" in str(
        info.value)
    assert info.value.hint and "makedist -o" in info.value.hint
    assert not (bad.parent / RAN).exists()
    assert not (bad.parent / packed.UNPACKED).exists()


def test_the_distributions_own_cvmfsexec_points_at_its_directory(dist: Path) -> None:
    """--dist DIR/cvmfsexec (the plain script) says to pass DIR instead."""
    with pytest.raises(LaunchError, match="without a line __TAR_BELOW__") as info:
        packed.unpack_file(dist / "cvmfsexec")
    assert info.value.hint == f"this is the distribution's own cvmfsexec: pass --dist {dist}"


def test_a_file_that_is_not_executable(dist_file: Path) -> None:
    """A file without the execute bit: the error says so, the hint how to fix it."""
    dist_file.chmod(0o644)
    with pytest.raises(LaunchError, match="is not executable") as info:
        packed.unpack_file(dist_file)
    assert info.value.hint == f"chmod +x {dist_file}"


def test_a_path_with_spaces_and_an_unquoted_header(dist_file: Path) -> None:
    """makedist's header word-splits ``$0`` (makedist:223,225,228-229): from a path with a
    space it is refused unrun; a header that quotes it (the simulation's) unpacks there."""
    spaced = dist_file.parent / "with space"
    spaced.mkdir()
    quoted = spaced / "quoted"
    shutil.copy2(dist_file, quoted)
    assert packed.unpack_file(quoted).dist == Dist(spaced / ".cvmfsexec")
    shutil.rmtree(spaced / ".cvmfsexec")
    unquoted = spaced / "unquoted"
    data = dist_file.read_bytes()
    unquoted.write_bytes(data.replace(b'packed="$0"', f"touch {spaced / RAN}; packed=$0".encode(),
                                      1))
    unquoted.chmod(0o755)
    with pytest.raises(LaunchError, match=r"its path has white space, and its header uses "
                                          r"\$0 and the directory unquoted"):
        packed.unpack_file(unquoted)
    assert not (spaced / RAN).exists()
    assert not (spaced / ".cvmfsexec").exists()


# --- unpacking --------------------------------------------------------------------------


def test_unpacks_beside_itself_then_reuses_that(dist_file: Path) -> None:
    """First run unpacks into .cvmfsexec beside the file (makedist:223-224); the next
    one leaves it as it is (not newer: makedist:225), without running the file."""
    first = packed.unpack_file(dist_file)
    assert (first.file, first.dist, first.reused) == (
        dist_file, Dist(dist_file.parent / ".cvmfsexec"), False)
    assert first.dist.config_repo() == makedist.DEFAULT_CONFIG_REPO
    stamp = first.dist.root.stat().st_mtime_ns
    (first.dist.root / "left-here").write_text("")
    os.utime(first.dist.root, ns=(stamp, stamp))
    dist_file.chmod(0o755)
    again = packed.unpack_file(dist_file)
    assert (again.dist, again.reused) == (first.dist, True)
    assert (again.dist.root / "left-here").exists()
    assert again.dist.root.stat().st_mtime_ns == stamp


def test_a_newer_file_unpacks_afresh(dist_file: Path) -> None:
    """The file newer than .cvmfsexec: unpacked again, as its header would (makedist:225-229)."""
    first = packed.unpack_file(dist_file)
    (first.dist.root / "left-here").write_text("")
    stamp = first.dist.root.stat().st_mtime + 10
    os.utime(dist_file, (stamp, stamp))
    again = packed.unpack_file(dist_file)
    assert not again.reused
    assert not (again.dist.root / "left-here").exists()


def test_a_copy_in_use_is_not_unpacked_over(dist_file: Path) -> None:
    """A .cvmfsexec whose dist lock a live cvmfsd holds is never deleted for a newer file."""
    first = packed.unpack_file(dist_file)
    fd = os.open(first.dist.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        stamp = first.dist.root.stat().st_mtime + 10
        os.utime(dist_file, (stamp, stamp))
        with pytest.raises(LaunchError,
                           match=r"which another cvmfsd \(or its janitor\) still uses"):
            packed.unpack_file(dist_file)
    finally:
        os.close(fd)
    assert (first.dist.root / "cvmfsexec").exists()


def test_one_unpacking_at_a_time(dist_file: Path) -> None:
    """Another process unpacking the file (it holds the file's lock): waited for, bounded;
    once it is done, the waiter takes what it unpacked."""
    fd = os.open(dist_file, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(LaunchError, match=r"is being unpacked by another process \(it "
                                              r"holds a lock on the file\); waited 0\.3 s"):
            packed.unpack_file(dist_file, timeout=0.3)
        assert not (dist_file.parent / packed.UNPACKED).exists()
        subprocess.run([str(dist_file), "-v"], check=True, capture_output=True)  # "the other"
        releases = threading.Timer(0.3, fcntl.flock, (fd, fcntl.LOCK_UN))
        releases.start()
        assert packed.unpack_file(dist_file, timeout=30).reused
        releases.join()
    finally:
        os.close(fd)


def test_a_read_only_copy_is_used_without_waiting_for_the_lock(dist_file: Path) -> None:
    """Where the directory is read-only to us nothing can be unpacked, so the lock is not
    taken: anyone who can read the file could hold it for good, and every run would wait
    out the unpacking timeout before failing."""
    packed.unpack_file(dist_file)  # unpacked once, as a site would ship it
    fd = os.open(dist_file, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held by "another user", never released
        code = ("import sys; from pathlib import Path; from cvmfsd import packed; "
                "print(packed.unpack_file(Path(sys.argv[1]), timeout=20).reused)")
        started = time.monotonic()
        done = subprocess.run([*read_only(dist_file.parent), sys.executable, "-c", code,
                               str(dist_file)], capture_output=True, text=True, timeout=60,
                              check=False)
        took = time.monotonic() - started
    finally:
        os.close(fd)
    assert (done.returncode, done.stdout) == (0, "True\n"), done.stderr
    assert took < 10, f"waited {took:.1f} s for a lock it did not need"


@pytest.mark.parametrize(("cut", "says"), [
    # nothing unpacked: the header's exec of .cvmfsexec/cvmfsexec fails (makedist:231)
    (100, r"\(`cvmfsexec -v`\) failed with status 127: .*gzip: stdin: unexpected end"),
    # cvmfsexec unpacked, the rest not: -v succeeds, as the header ignores tar's status
    (None, r"\.cvmfsexec is not a cvmfsexec distribution: missing .*dist/usr/bin/cvmfs2.* "
           r"\(unpacked from .*\); `cvmfsexec -v` exited 0, saying: 4\.51 / .*gzip: "),
])
def test_a_cut_file_fails_and_leaves_no_partial_copy(dist_file: Path, cut: int | None,
                                                     says: str) -> None:
    """A file cut short: the error says what running it did, and the partial .cvmfsexec
    (newer than the file, so the header would never unpack again) is gone."""
    data = dist_file.read_bytes()
    head = data.index(packed.TAR_MARKER) + len(packed.TAR_MARKER)
    dist_file.write_bytes(data[: head + cut] if cut is not None else data[: len(data) // 2])
    for _ in range(2):  # and the next try says the same, not "missing cvmfsexec"
        with pytest.raises(LaunchError, match=says):
            packed.unpack_file(dist_file)
        assert not (dist_file.parent / packed.UNPACKED).exists()


def test_what_it_unpacked_is_no_distribution(dist_file: Path) -> None:
    """It ran and succeeded but left no distribution: the error says what is missing."""
    odd = with_tar(dist_file.parent / "odd", sim_header(dist_file),
                   {"cvmfsexec": "#!/bin/sh\necho 4.51\n"})
    with pytest.raises(LaunchError, match=r"\.cvmfsexec is not a cvmfsexec distribution: "
                                          r"missing mountrepo.*\(unpacked from .*/odd\)"):
        packed.unpack_file(odd)
    assert not (odd.parent / packed.UNPACKED).exists()


def hanging(file: Path) -> tuple[Path, list[str]]:
    """A self-extracting file whose unpacking never ends (a pipeline in its cvmfsexec)."""
    stuck = ["sleep", f"3600.{os.getpid()}"]
    return with_tar(file.parent / "slow", sim_header(file),
                    {"cvmfsexec": f"#!/bin/bash\n{' '.join(stuck)} | cat\n"}), stuck


def test_an_unpacking_that_times_out(dist_file: Path) -> None:
    """Killed at the timeout with every process it started; no partial copy is left."""
    slow, stuck = hanging(dist_file)
    with pytest.raises(LaunchError, match=r"unpacking .*/slow \(`slow -v`\) took longer than "
                                          r"0\.5 s; it was killed and the partial") as info:
        packed.unpack_file(slow, timeout=0.5)
    assert info.value.hint and "unpack it beforehand" in info.value.hint
    assert not processes_with_argv(stuck)
    assert not (slow.parent / packed.UNPACKED).exists()


# --- prepare ----------------------------------------------------------------------------


def test_prepare_plans_mode3_on_the_unpacked_file(dist_file: Path, tmp_path: Path) -> None:
    """prepare() with --dist FILE plans mode 3 on FILE's .cvmfsexec."""
    config = Config(payload=("true",), repos=(REPO_A,), dist=dist_file, mode="3",
                    environ={"TMPDIR": str(tmp_path)})
    prepared = prepare(config, facts(), start=False)
    assert prepared.launch_error is None
    assert prepared.unpacked is not None and prepared.unpacked.file == dist_file
    assert prepared.plan is not None
    assert prepared.plan.dist == Dist(dist_file.parent / ".cvmfsexec")


def test_prepare_says_a_missing_dist_does_not_exist(tmp_path: Path) -> None:
    """A --dist that is not there: says so and what it should have been (was: "missing
    cvmfsexec, mountrepo, ..." as if it were a broken directory)."""
    config = Config(payload=("true",), repos=(REPO_A,), dist=tmp_path / "nowhere", mode="3",
                    environ={"TMPDIR": str(tmp_path)})
    prepared = prepare(config, facts(), start=False)
    assert isinstance(prepared.launch_error, LaunchError)
    assert str(prepared.launch_error) == (
        f"the cvmfsexec distribution {tmp_path / 'nowhere'} (--dist) does not exist; expected "
        "the directory holding cvmfsexec, a self-extracting file made by `makedist -o`, or "
        "GlideinWMS's CVMFSEXEC_DIR of cvmfsexec-<src>-<os><ver>-<arch> such files")


def test_no_dist_and_help_say_dir_or_file(tmp_path: Path) -> None:
    """Without --dist, the hint names both forms; so does ``cvmfsd run --help``."""
    config = Config(payload=("true",), repos=(REPO_A,), mode="3",
                    environ={"TMPDIR": str(tmp_path)})
    prepared = prepare(config, facts(), start=False)
    assert isinstance(prepared.launch_error, LaunchError)
    assert prepared.launch_error.hint is not None
    assert prepared.launch_error.hint.startswith("pass --dist DIR or FILE (the directory "
                                                 "holding cvmfsexec, a self-extracting file")
    shown = subprocess.run([sys.executable, "-m", "cvmfsd", "run", "--help"],
                           capture_output=True, text=True, check=True,
                           env={**os.environ, "COLUMNS": "200"}).stdout
    assert "--dist DIR|FILE" in shown
    assert "a self-extracting file made by `makedist -o` (unpacked into .cvmfsexec" in shown


# --- end to end -------------------------------------------------------------------------


def run(dist: Path, policy: str, *, cwd: Path, payload: str, prelude: Sequence[str] = (),
        python: Sequence[str] | None = None) -> tuple[subprocess.CompletedProcess[str], str]:
    """``cvmfsd run --dist DIST --mode 3`` under ``policy``; its result and glidein_config."""
    gconfig = cwd / "glidein_config"
    gconfig.write_text(f"GLIDEIN_CVMFS {policy}\n")
    result = subprocess.run(
        [*prelude, *(python or [sys.executable, "-m", "cvmfsd"]), "run", "--dist", str(dist),
         "--mode", "3", "--glidein-config", str(gconfig), "--repos", REPO_A, "--",
         "sh", "-c", payload],
        capture_output=True, text=True, check=False, timeout=90, stdin=subprocess.DEVNULL,
        cwd=cwd)
    return result, gconfig.read_text()


@pytest.mark.fuse
def test_run_mounts_from_the_file_then_reuses_its_copy(dist_file: Path, short_tmp: Path) -> None:
    """``cvmfsd run --dist FILE`` mounts in mode 3 and runs the payload; a second run
    uses the unpacked copy as it is (nothing unpacked, nothing run but cvmfsexec)."""
    result, _ = run(dist_file, "required", cwd=short_tmp,
                    payload=f"cat /cvmfs/{REPO_A}/hello.txt")
    # --mode 3 and required: cvmfsd fails unless cvmfsexec mounted in mode 3
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "hello from repo.a\n"
    assert "reused=False" in result.stderr
    unpacked = dist_file.parent / packed.UNPACKED
    (unpacked / "left-here").write_text("")
    inode = (unpacked / "cvmfsexec").stat().st_ino
    result, _ = run(dist_file, "required", cwd=short_tmp,
                    payload=f"cat /cvmfs/{REPO_A}/hello.txt")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "hello from repo.a\n"
    assert "reused=True" in result.stderr
    assert (unpacked / "left-here").exists()  # the header's rm -rf did not run
    assert (unpacked / "cvmfsexec").stat().st_ino == inode


def read_only(directory: Path) -> list[str]:
    """A prelude that runs the command with ``directory`` mounted read-only (as root too)."""
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && shift && exec "$@"',
            str(directory), "--"]


BAD_INPUTS = ["not executable", "random script", "read-only directory", "timeout"]


@pytest.mark.fuse
@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_file_under_preferred_runs_the_payload_without_cvmfs(
        dist_file: Path, short_tmp: Path, bad: str) -> None:
    """Each bad input: cvmfsd says what, where and what was expected (log and
    glidein_config), and under ``preferred`` the payload runs without CVMFS."""
    target, python = dist_file, None
    prelude: list[str] = []
    if bad == "not executable":
        dist_file.chmod(0o644)
        says = f"{dist_file} is not executable; a self-extracting cvmfsexec must be"
    elif bad == "random script":
        target = dist_file.parent / "script"
        target.write_text(f"#!/bin/sh\ntouch {target.parent / RAN}\n")
        target.chmod(0o755)
        says = f"{target} is not a self-extracting cvmfsexec: it is a script without a line"
    elif bad == "read-only directory":
        prelude = read_only(dist_file.parent)
        says = (f"cannot unpack {dist_file}: its header unpacks it into "
                f"{dist_file.parent / '.cvmfsexec'} (beside the file), but {dist_file.parent} "
                "is not writable")
    else:
        target, _ = hanging(dist_file)
        python = [sys.executable, "-c", "import sys; from cvmfsd import cli, packed; "
                  "packed.UNPACK_TIMEOUT = 1.0; sys.exit(cli.main())"]
        says = f"unpacking {target} (`slow -v`) took longer than 1 s"
    result, gconfig = run(target, "preferred", cwd=short_tmp, prelude=prelude, python=python,
                          payload="echo payload ran; test ! -e /cvmfs/repo.a")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "payload ran\n"
    assert "continuing without CVMFS" in result.stderr
    assert f"CVMFSD_ERROR {says}" in gconfig, gconfig
    assert "GWMS_CVMFSEXEC_MODE 0\n" in gconfig
    assert "CVMFSD_STATUS=without-cvmfs" in result.stderr
    assert not (target.parent / RAN).exists()
    assert not (target.parent / packed.UNPACKED).exists()
