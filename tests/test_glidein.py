"""glidein_config reading, writing, locking and the CVMFS policy."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfsd.errors import ConfigError, PolicyError
from cvmfsd.glidein import (
    MAX_LINE_BYTES,
    Policy,
    failure_updates,
    job_wrapper_listed,
    parse_glidein_config,
    read_glidein_config,
    render_update,
    resolve_policy,
    update_glidein_config,
)

PARSE_CASES = [
    # (file bytes, expected values)
    (b"A 1\nB two words\n", {"A": "1", "B": "two words"}),
    (b"A 1\nA 2\n", {"A": "2"}),
    (b"A  leading and trailing  \n", {"A": " leading and trailing  "}),
    (b"EMPTY\nSPACE \n", {"EMPTY": "", "SPACE": ""}),
    (b"\n   \n# comment\n  # indented comment\nK v\n", {"K": "v"}),
    (b"NO_NEWLINE at end", {"NO_NEWLINE": "at end"}),
    (b"U caf\xc3\xa9 \xe2\x80\xa8 x\n", {"U": "caf\u00e9 \u2028 x"}),
    (b"V a#b\n", {"V": "a#b"}),
]


@pytest.mark.parametrize(("data", "expected"), PARSE_CASES)
def test_parse(data: bytes, expected: dict[str, str]) -> None:
    """Lines parse as GlideinWMS reads them: rest of line, spaces kept, last wins."""
    config = parse_glidein_config(data, where="gc")
    assert expected == dict(config.values)
    assert config.problems == ()


PROBLEM_CASES = [
    # (line, skipped, fragment of the message)
    (b"BAD\0NUL x", True, "NUL"),
    (b"K \xff\xfe", True, "UTF-8"),
    (b"1KEY x", True, "not a valid name"),
    (b"KEY-DASH x", True, "not a valid name"),
    (b"\tKEY x", True, "not a valid name"),
    (b"LONG " + b"x" * MAX_LINE_BYTES, False, "4096-byte limit"),
]


@pytest.mark.parametrize(("line", "skipped", "fragment"), PROBLEM_CASES)
def test_problem_lines(line: bytes, skipped: bool, fragment: str) -> None:
    """A bad line becomes a Problem with its line number; the other lines are kept."""
    config = parse_glidein_config(b"A 1\n" + line + b"\nB 2\n", where="gc")
    (problem,) = config.problems
    assert (2, skipped) == (problem.line, problem.skipped)
    assert fragment in problem.message
    assert str(problem).startswith("gc:2: ")
    assert {"A": "1", "B": "2"}.items() <= config.values.items()
    assert skipped != ("LONG" in config.values)


def test_read_missing_file(tmp_path: Path) -> None:
    """Reading a missing file is a ConfigError naming the path."""
    with pytest.raises(ConfigError, match=r"glidein_config .*nope"):
        read_glidein_config(tmp_path / "nope")


def test_read_a_fifo_fails_at_once(tmp_path: Path) -> None:
    """A FIFO put in glidein_config's place (by a careless or hostile payload of the same
    uid) is a ConfigError at once: reading it used to block until a writer came, and
    cvmfsd reads it on its event loop (every `cvmfsctl get`), which froze for good."""
    fifo = tmp_path / "glidein_config"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            read_glidein_config(fifo)
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)
        else:
            outcome.append(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    if reader.is_alive():  # release the blocked reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=5)
        pytest.fail("reading a FIFO as glidein_config blocked")
    assert isinstance(outcome[0], ConfigError)
    assert str(outcome[0]) == (f"cannot read glidein_config {fifo}: it is a FIFO; "
                               "expected a regular file")


def test_render_update_keeps_everything_else() -> None:
    """Only the updated keys' lines go; bad lines and comments stay byte for byte."""
    data = b"# c\nA 1\nA\nAB 3\nBAD-KEY x\nA 2\nLAST no newline"
    assert render_update(
        data, {"A": "new value"}) == b"# c\nAB 3\nBAD-KEY x\nLAST no newline\nA new value\n"


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\0b", "x" * MAX_LINE_BYTES, "\udc80"])
def test_update_rejects_bad_values(tmp_path: Path, value: str) -> None:
    """Multi-line, NUL, over-long and unencodable values are refused; the file is untouched."""
    config = tmp_path / "glidein_config"
    config.write_bytes(b"A 1\n")
    with pytest.raises(ConfigError, match="cannot write glidein_config K"):
        update_glidein_config(config, {"K": value})
    assert config.read_bytes() == b"A 1\n"
    assert not (tmp_path / "glidein_config.history").exists()


def test_update_rejects_bad_key(tmp_path: Path) -> None:
    """A key that is not a name is refused."""
    config = tmp_path / "glidein_config"
    config.write_bytes(b"")
    with pytest.raises(ConfigError, match="expected"):
        update_glidein_config(config, {"A B": "x"})


def test_update_missing_file(tmp_path: Path) -> None:
    """Updating a glidein_config that does not exist is a ConfigError."""
    with pytest.raises(ConfigError, match="no such file"):
        update_glidein_config(tmp_path / "glidein_config", {"A": "1"})


def test_update_history_mode_and_lock_cleanup(tmp_path: Path) -> None:
    """An update logs to .history, keeps the mode and leaves no lock or temp file."""
    config = tmp_path / "glidein_config"
    config.write_bytes(b"A 1\nB 2\n")
    config.chmod(0o640)
    update_glidein_config(config, {"A": "x y", "C": ""})
    assert config.read_bytes() == b"B 2\nA x y\nC \n"
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    history = (tmp_path / "glidein_config.history").read_text()
    assert f"CVMFSD{os.getpid()} A x y\nCVMFSD{os.getpid()} C \n" == history
    assert sorted(
        p.name for p in tmp_path.iterdir()) == ["glidein_config", "glidein_config.history"]


def test_lock_waits_for_live_holder(tmp_path: Path) -> None:
    """A lock held by a live process makes the writer wait, then time out."""
    config = tmp_path / "glidein_config"
    config.write_bytes(b"")
    (tmp_path / "glidein_config.lock").symlink_to("glidein_config")
    (tmp_path / "glidein_config.pid").write_text(f"{os.getppid()}\n")
    with pytest.raises(ConfigError, match=f"held by pid {os.getppid()}"):
        update_glidein_config(config, {"A": "1"}, lock_timeout=0.2, stale_after=10)


def test_lock_released_by_holder(tmp_path: Path) -> None:
    """A writer gets the lock as soon as the holder releases it."""
    config = tmp_path / "glidein_config"
    config.write_bytes(b"")
    lock = tmp_path / "glidein_config.lock"
    lock.symlink_to("glidein_config")
    (tmp_path / "glidein_config.pid").write_text(f"{os.getppid()}\n")
    timer = threading.Timer(0.2, lock.unlink)
    timer.start()
    update_glidein_config(config, {"A": "1"}, lock_timeout=5, stale_after=10)
    timer.join()
    assert config.read_bytes() == b"A 1\n"


def test_lock_of_dead_holder_is_broken(tmp_path: Path) -> None:
    """A lock whose holder process is gone is broken after stale_after seconds."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          check=True, capture_output=True, text=True).stdout.strip()
    config = tmp_path / "glidein_config"
    config.write_bytes(b"")
    (tmp_path / "glidein_config.lock").symlink_to("glidein_config")
    (tmp_path / "glidein_config.pid").write_text(dead + "\n")
    start = time.monotonic()
    update_glidein_config(config, {"A": "1"}, lock_timeout=5, stale_after=0.2)
    assert 0.2 <= time.monotonic() - start < 5
    assert config.read_bytes() == b"A 1\n"


def test_lock_without_pid_file_is_broken_when_old(tmp_path: Path) -> None:
    """A lock with no pid file, older than stale_after, is broken."""
    config = tmp_path / "glidein_config"
    config.write_bytes(b"")
    lock = tmp_path / "glidein_config.lock"
    lock.symlink_to("glidein_config")
    os.utime(lock, (time.time() - 100, time.time() - 100), follow_symlinks=False)
    update_glidein_config(config, {"A": "1"}, lock_timeout=1, stale_after=60)
    assert config.read_bytes() == b"A 1\n"


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """Writers in parallel processes each keep their key (the lock serialises them)."""
    config = tmp_path / "glidein_config"
    config.write_bytes(b"")
    code = ("import sys; from cvmfsd.glidein import update_glidein_config as u\n"
            "for i in range(10): u(sys.argv[1], {f'K{sys.argv[2]}_{i}': 'v w'})")
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(config), str(n)], cwd=root)
             for n in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    values = read_glidein_config(config).values
    assert {f"K{n}_{i}" for n in range(4) for i in range(10)} == set(values)


_values = st.text(st.characters(codec="utf-8", blacklist_characters="\n\r\0"),
                  max_size=200)
_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True)


@settings(max_examples=50, deadline=None)
@given(initial=st.dictionaries(_keys, _values, max_size=5),
       updates=st.dictionaries(_keys, _values, max_size=8))
def test_round_trip(tmp_path_factory: pytest.TempPathFactory, initial: dict[str, str],
                    updates: dict[str, str]) -> None:
    """Any valid keys with single-line values, written then read, give the same mapping."""
    config = tmp_path_factory.mktemp("rt") / "glidein_config"
    config.write_bytes(b"".join(f"{k} {v}\n".encode() for k, v in initial.items()))
    update_glidein_config(config, updates)
    assert {**initial, **updates} == dict(read_glidein_config(config).values)


POLICY_CASES = [
    # (attributes, policy, words expected in source)
    ({}, Policy.PREFERRED, "no CVMFS policy attribute"),
    # GlideinWMS's own switch: cvmfsd stands aside when it is on, ignores it otherwise
    ({"GLIDEIN_USE_CVMFSEXEC": "1", "GLIDEIN_CVMFS": "REQUIRED"}, Policy.NEVER, "stands aside"),
    ({"GLIDEIN_USE_CVMFSEXEC": "01", "GLIDEIN_USE_CVMFS": "1"}, Policy.NEVER, "own"),
    ({"GLIDEIN_USE_CVMFSEXEC": "0", "GLIDEIN_CVMFS": "required"}, Policy.REQUIRED, "decides"),
    ({"GLIDEIN_USE_CVMFSEXEC": "true", "GLIDEIN_CVMFS": "Optional"}, Policy.OPTIONAL, "optional"),
    ({"GLIDEIN_CVMFS": "never"}, Policy.NEVER, "GLIDEIN_CVMFS decides"),
    # PR #631's pair
    ({"GLIDEIN_USE_CVMFS": "1"}, Policy.REQUIRED, "VO mandates"),
    ({"GLIDEIN_USE_CVMFS": "1", "GLIDEIN_CVMFS_REQUIRE": "preferred"}, Policy.REQUIRED, "VO"),
    ({"GLIDEIN_USE_CVMFS": "1", "GLIDEIN_CVMFS_REQUIRE": "NEVER"}, Policy.NEVER, "forbids"),
    ({"GLIDEIN_USE_CVMFS": "0", "GLIDEIN_CVMFS_REQUIRE": "REQUIRED"}, Policy.REQUIRED, "Factory"),
    ({"GLIDEIN_USE_CVMFS": "0", "GLIDEIN_CVMFS_REQUIRE": "Preferred"}, Policy.PREFERRED, "Factory"),
    ({"GLIDEIN_USE_CVMFS": "0", "GLIDEIN_CVMFS_REQUIRE": "never"}, Policy.NEVER, "skipped"),
    ({"GLIDEIN_USE_CVMFS": "0"}, Policy.NEVER, "not requested"),
    ({"GLIDEIN_USE_CVMFS": "", "GLIDEIN_CVMFS_REQUIRE": "required"}, Policy.NEVER, "Frontend"),
    ({"GLIDEIN_CVMFS_REQUIRE": "always"}, Policy.NEVER, "not requested"),  # #631: not read
    ({"GLIDEIN_USE_CVMFS": " 0 ", "GLIDEIN_CVMFS_REQUIRE": "optional", "GLIDEIN_CVMFS": "never"},
     Policy.OPTIONAL, "Factory"),
]


@pytest.mark.parametrize(("values", "policy", "fragment"), POLICY_CASES)
def test_resolve_policy(values: dict[str, str], policy: Policy, fragment: str) -> None:
    """GlideinWMS's own switch first, then #631's pair, then GLIDEIN_CVMFS; any case."""
    decision = resolve_policy(values)
    assert policy is decision.policy
    assert fragment in decision.source
    assert (policy is not Policy.NEVER) == decision.use_cvmfs
    assert (policy is Policy.REQUIRED) == decision.failure_is_fatal


POLICY_ERRORS = [
    ({"GLIDEIN_USE_CVMFS": "yes"}, "GLIDEIN_USE_CVMFS='yes'.*expected 0 or 1"),
    ({"GLIDEIN_USE_CVMFS": "0", "GLIDEIN_CVMFS_REQUIRE": "always"},
     "GLIDEIN_CVMFS_REQUIRE='always'.*required\\|"),
    ({"GLIDEIN_CVMFS": "maybe"}, "GLIDEIN_CVMFS='maybe'"),
]


@pytest.mark.parametrize(("values", "pattern"), POLICY_ERRORS)
def test_resolve_policy_errors(values: dict[str, str], pattern: str) -> None:
    """Invalid values raise PolicyError naming the attribute, value and accepted values."""
    with pytest.raises(PolicyError, match=pattern):
        resolve_policy(values)


def test_job_wrapper_listed(tmp_path: Path) -> None:
    """WRAPPER_LIST names a file of fetched wrapper paths; the fragment is found by name."""
    listing = tmp_path / "wrapper_list.lst"
    assert job_wrapper_listed({}) is None  # not a GlideinWMS glidein
    assert job_wrapper_listed({"WRAPPER_LIST": str(listing)}) is False  # no file yet
    listing.write_text("/g/main/singularity_wrapper.sh\n")
    assert job_wrapper_listed({"WRAPPER_LIST": str(listing)}) is False
    listing.write_text("/g/entry/cvmfsd_job_wrapper.sh\n/g/client/singularity_wrapper.sh\n")
    assert job_wrapper_listed({"WRAPPER_LIST": str(listing)}) is True
    listing.write_text("/g/entry/old_cvmfsd_job_wrapper.sh\n")
    assert job_wrapper_listed({"WRAPPER_LIST": str(listing)}) is False


def test_failure_updates_are_single_bounded_lines(tmp_path: Path) -> None:
    """A multi-line, long error becomes glidein_config lines that can be written."""
    updates = failure_updates("mount failed:\n" + "x" * 5000, "look at\nthe log",
                              category="Config")
    assert updates["CVMFSD_STATUS"] == "failed"
    assert updates["GWMS_IS_CVMFS"] == "no"
    assert updates["CVMFSD_HINT"] == "look at the log"
    assert updates["CVMFSD_FAILURE"] == "Config"
    assert len(updates["CVMFSD_ERROR"]) == 1000
    assert updates["CVMFSD_ERROR"].startswith("mount failed: xxx")
    config = tmp_path / "glidein_config"
    config.write_text("")
    update_glidein_config(config, updates)
    assert dict(read_glidein_config(config).values) == updates
