"""Hostile neighbours and a hostile payload (issue 12), acted out as they would do it.

Each test does what the hostile party can do: another local user plants names
in the shared ``/tmp`` before the pilot starts or symlinks around its
glidein_config; the payload (the pilot's own uid, untrusted) writes to
descriptors of its ancestors through ``/proc``.  SECURITY.md names them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_A, mounts_under

CVMFSD = [sys.executable, "-m", "cvmfsd"]


def cvmfsd_run(dist: Path, *args: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CVMFSD, "run", "--dist", str(dist), *args], capture_output=True, text=True,
        check=False, timeout=timeout, stdin=subprocess.DEVNULL, env=env,
    )


def _dead_socket(path: Path) -> bool:
    """Whether ``path`` is a unix socket that nobody listens on."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


@pytest.fixture(name="planted")
def _planted(request: pytest.FixtureRequest) -> Iterator[Path]:
    """``/tmp/cvmfsd-<uid>``, the name cvmfsd once used, planted as a neighbour would."""
    path = Path(f"/tmp/cvmfsd-{os.getuid()}")  # noqa: S108 - the point of the test
    if path.is_dir() and not path.is_symlink() and all(map(_dead_socket, path.iterdir())):
        shutil.rmtree(path)  # left by cvmfsd runs before issue 12
    if os.path.lexists(path):
        pytest.skip(f"{path} exists already")
    if request.param == "symlink":
        path.symlink_to("/")
    else:
        path.mkdir(mode=0o755)  # someone else's (readable by all): cvmfsd refused it
        path.chmod(0o755)
    try:
        yield path
    finally:
        if path.is_symlink():
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.fuse
@pytest.mark.parametrize("planted", ["directory", "symlink"], indirect=True)
def test_a_planted_socket_directory_does_not_deny_the_run(dist: Path, planted: Path) -> None:
    """A neighbour's /tmp/cvmfsd-<uid> (directory or symlink): the run still provides CVMFS."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    script = (f'cat /cvmfs/{REPO_A}/hello.txt && echo "$CVMFSD_SOCKET" && '
              '"$CVMFSCTL" ping >/dev/null && echo pong')
    result = cvmfsd_run(dist, "--repos", REPO_A, "--", "sh", "-c", script, env=env)
    assert result.returncode == 0, result.stderr
    hello, sock, pong = result.stdout.splitlines()
    assert (hello, pong) == ("hello from repo.a", "pong")
    directory = Path(sock).parent
    assert directory.parent == Path("/tmp")  # noqa: S108 - where the default socket goes
    assert directory.name.startswith(f"cvmfsd-{os.getuid()}-"), "a name no neighbour can guess"
    assert not directory.exists(), "the private directory is removed at the end"
    assert not mounts_under(dist)


def test_an_unusable_socket_is_refused_before_cvmfsexec_starts(dist: Path,
                                                              short_tmp: Path) -> None:
    """--socket in a directory that is not private: refused before anything is started."""
    shared = short_tmp / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    result = cvmfsd_run(dist, "--repos", REPO_A, "--mode", "3", "--socket",
                        str(shared / "s.sock"), "--", "true")
    assert result.returncode != 0
    assert "must be a directory owned by uid" in result.stderr
    assert "mounting" not in result.stderr, "cvmfsexec never started"
    assert not mounts_under(dist)


def test_a_socket_under_a_missing_directory_is_refused_and_nothing_made(
        dist: Path, short_tmp: Path) -> None:
    """--socket two levels under nothing: refused up front; no chain of directories made."""
    result = cvmfsd_run(dist, "--repos", REPO_A, "--mode", "3", "--socket",
                        str(short_tmp / "missing" / "deeper" / "s.sock"), "--", "true")
    assert result.returncode != 0
    assert f"{short_tmp / 'missing'} does not exist" in result.stderr
    assert "mounting" not in result.stderr, "cvmfsexec never started"
    assert not (short_tmp / "missing").exists()


@pytest.mark.fuse
def test_the_socket_directory_cvmfsd_made_goes_at_the_end(dist: Path, short_tmp: Path) -> None:
    """--socket in a directory that cvmfsd had to make: made 0700, served, removed at the end."""
    socket_path = short_tmp / "made" / "s.sock"
    script = ('stat -c %a "$(dirname "$CVMFSD_SOCKET")" && "$CVMFSCTL" ping >/dev/null '
              '&& echo pong')
    result = cvmfsd_run(dist, "--repos", REPO_A, "--socket", str(socket_path), "--",
                        "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["700", "pong"]
    assert not socket_path.parent.exists(), "made by cvmfsd, so removed by it"
    assert short_tmp.is_dir(), "the existing parent stays"


@pytest.mark.fuse
def test_a_made_socket_directory_another_run_uses_stays(dist: Path, short_tmp: Path) -> None:
    """--socket in a directory cvmfsd made, where another run of the same user has put its
    socket meanwhile: only our socket goes; the directory and the other socket stay."""
    socket_path = short_tmp / "shared" / "a.sock"
    other = socket_path.with_name("b.sock")
    script = f'"$CVMFSCTL" ping >/dev/null && touch {other}'
    result = cvmfsd_run(dist, "--repos", REPO_A, "--socket", str(socket_path), "--",
                        "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert other.exists(), "another run's socket is never removed"
    assert not socket_path.exists()


JWT = ("eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJwaWxvdCIsImV4cCI6MTcwMDAwMDAwMH0."
       "c2lnbmF0dXJlLWJ5dGVz")
PEM_LINE = "-----BEGIN CERTIFICATE-----MIIEowIBAAKCAQEA-----END CERTIFICATE-----"
SECRETS = {"GLIDEIN_PRIVKEY": "s3cr3t-1", "GLIDEIN_APIKEY": "s3cr3t-2",
           "GLIDEIN_OAUTH_BEARER": "s3cr3t-3", "GLIDEIN_PWD": "s3cr3t-4",
           "GLIDEIN_X509_PROXY": PEM_LINE, "GLIDEIN_Collector_Pass": "s3cr3t-5",
           "GLIDEIN_HMAC": "s3cr3t-6", "GLIDEIN_SESSION_ID": "s3cr3t-7",
           "GLIDEIN_SIGNATURE": "s3cr3t-8", "X509_USER_PROXY": "/s3cr3t/x509up_u1",
           "GLIDEIN_Note": JWT, "GLIDEIN_Site": JWT}


@pytest.mark.fuse
def test_secrets_by_name_and_value_reach_no_reader(dist: Path, short_tmp: Path) -> None:
    """The payload asks for every secret through env, get and config, and reads the metrics
    any local user could read: no secret value anywhere; GLIDEIN_Auth_Method is served."""
    gconfig = short_tmp / "glidein_config"
    gconfig.write_text("".join(f"{k} {v}\n" for k, v in SECRETS.items())
                       + "GLIDEIN_Auth_Method GSI\nGLIDEIN_Entry_Name Entry_1\n")
    gets = " ".join(f'"$CVMFSCTL" get {k} 2>&1;' for k in [*SECRETS, "GLIDEIN_Auth_Method"])
    script = f'env; {gets} "$CVMFSCTL" config; "$CVMFSCTL" env; "$CVMFSCTL" metrics'
    result = cvmfsd_run(dist, "--repos", REPO_A, "--glidein-config", str(gconfig), "--",
                        "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for key, value in SECRETS.items():
        assert value not in out, f"{key}'s value reached the payload or the metrics"
    assert out.count("looks like a secret") == len(SECRETS)
    assert "GSI" in out, "GLIDEIN_Auth_Method is no secret"
    assert 'entry="Entry_1"' in out and 'site=""' in out


@pytest.mark.fuse
def test_start_up_cleanup_spares_a_process_that_only_looks_like_cvmfs2(
        dist: Path, short_tmp: Path) -> None:
    """A same-uid process whose argv mentions cvmfsd.sim.cvmfs2 and a mount point of the
    distribution survives cvmfsd's start-up cleanup (only real cvmfs2 are leftovers)."""
    tool = short_tmp / "tool.py"
    tool.write_text("import time\ntime.sleep(120)\n")
    point = dist / "dist" / "cvmfs" / "X"
    bystander = subprocess.Popen([sys.executable, str(tool), "cvmfsd.sim.cvmfs2", "X",
                                  str(point)])
    try:
        result = cvmfsd_run(dist, "--repos", REPO_A, "--", "true")
        assert result.returncode == 0, result.stderr
        assert bystander.poll() is None, "an unrelated process was killed as a leftover"
    finally:
        bystander.kill()
        bystander.wait()


def test_the_final_sweep_checks_the_start_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """_sweep_descendants signals a process only if it is still the one it found: a pid
    whose start time changed in between (reused) is left alone."""
    from cvmfsd import daemon, janitor

    child = subprocess.Popen(["sleep", "60"])
    try:
        real = janitor.process_start(child.pid)
        assert real is not None
        # As if the pid had been reused between the listing and the signal.
        monkeypatch.setattr(daemon, "process_start", lambda pid: real + 1)
        daemon._sweep_descendants()
        assert child.poll() is None
        monkeypatch.setattr(daemon, "process_start", janitor.process_start)
        daemon._sweep_descendants()
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("plant", ["symlink", "fifo", "readonly-symlink"])
def test_companion_files_planted_around_glidein_config(short_tmp: Path, plant: str) -> None:
    """In a shared sticky directory, symlinks (or FIFOs) at <gc>.pid, <gc>.history and
    <gc>.deleteme: no file of the planter's choosing is written, the update is made,
    and no lock is left behind."""
    from cvmfsd import glidein

    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    gconfig = shared / "glidein_config"
    gconfig.write_text("GLIDEIN_Site S\n")
    victims = {}
    for suffix in (".pid", ".history", ".deleteme"):
        planted = shared / f"glidein_config{suffix}"
        if plant == "fifo":
            os.mkfifo(planted)
            continue
        victim = short_tmp / f"victim{suffix}"
        victim.write_text("precious\n")
        if plant == "readonly-symlink":
            victim.chmod(0o444)
        victims[victim] = victim.read_text()
        planted.symlink_to(victim)
    glidein.update_glidein_config(gconfig, {"CVMFSD_STATUS": "ready"}, lock_timeout=5)
    assert glidein.read_glidein_config(gconfig).values["CVMFSD_STATUS"] == "ready"
    for victim, text in victims.items():
        assert victim.read_text() == text, f"{victim} was written through a planted symlink"
    assert not os.path.lexists(shared / "glidein_config.lock"), "a stale lock was left"
    history = shared / "glidein_config.history"
    if not os.path.lexists(history):  # the planted one was removable: none written
        return
    assert history.is_symlink() or not history.is_file() or "CVMFSD_STATUS" in \
        history.read_text()


@pytest.mark.fuse
def test_big_values_cost_their_export_not_the_pilot(dist: Path, short_tmp: Path) -> None:
    """A 1 MiB glidein value at start: cvmfsexec and the payload still start (no E2BIG),
    the value is left to cvmfsctl get, with one warning; three more 1 MiB values added
    later: cvmfsctl env still works, and config says clearly that it is too big."""
    gconfig = short_tmp / "glidein_config"
    big = "x" * (1 << 20)
    gconfig.write_text(f"GLIDEIN_Site S\nGLIDEIN_Big {big}\n")
    script = (
        'echo "big:${#GLIDEIN_Big} site:$GLIDEIN_Site"; '
        '"$CVMFSCTL" get GLIDEIN_Big | wc -c; '
        f'for n in 1 2 3; do printf "GLIDEIN_Later$n %s\\n" "$(head -c {1 << 20} /dev/zero '
        f'| tr "\\0" y)" >> {gconfig}; done; '
        'out=$("$CVMFSCTL" env); echo "env:$?"; eval "$out"; echo "later:${#GLIDEIN_Later1}"; '
        '"$CVMFSCTL" config >/dev/null 2>"$TMPDIR/err"; echo "config:$?"; cat "$TMPDIR/err"')
    result = cvmfsd_run(dist, "--repos", REPO_A, "--glidein-config", str(gconfig), "--",
                        "sh", "-c", script)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[:4] == ["big:0 site:S", str((1 << 20) + 1), "env:0", "later:0"], lines
    assert lines[4] == "config:65" and "ask for less" in result.stdout
    assert result.stderr.count("too big for the environment") == 1


#: The payload's attack on cvmfsexec's request FIFO: through /proc, every descriptor of
#: every process it can see that is the command FIFO, and the FIFO's name in its TMPDIR.
ATTACK = r"""
for p in /proc/[0-9]*; do
    [ "${p#/proc/}" = $$ ] && continue
    for f in "$p"/fd/*; do
        case $(readlink "$f" 2>/dev/null) in
        *cmd1*) timeout 2 sh -c 'echo "MOUNTREPO repo.b" >"$1"' - "$f" 2>/dev/null &&
                echo "wrote $f" ;;
        esac
    done
done
for f in "$TMPDIR"/*/cmd1; do
    [ -p "$f" ] && timeout 2 sh -c 'echo "MOUNTREPO repo.b" >"$1"' - "$f" && echo "wrote $f"
done
for n in $(seq 0 40); do  # blindly: opening (for writing) is what the kernel must refuse
    for f in "/proc/1/fd/$n" "/proc/$PPID/fd/$n"; do
        [ -e "$f" ] && timeout 2 sh -c 'exec 3>>"$1"' - "$f" 2>/dev/null && echo "opened $f"
    done
done
sleep 1.5
[ -e /cvmfs/repo.b/data.csv ] && echo "repo.b mounted"
exit 0
"""


@pytest.mark.fuse
@pytest.mark.parametrize("allow", [False, True])
def test_the_payload_cannot_reach_the_mount_requests(dist: Path, allow: bool) -> None:
    """Without --allow-nesting, the payload writing MOUNTREPO to cvmfsexec's command FIFO
    (through /proc/<pid>/fd of namespace PID 1 or the shim, or by name) gets nothing
    mounted; with it, the same attack works (so the test does attack)."""
    extra = ["--allow-nesting"] if allow else []
    result = cvmfsd_run(dist, "--repos", REPO_A, *extra, "--", "bash", "-c", ATTACK)
    assert result.returncode == 0, result.stderr
    if allow:
        assert "repo.b mounted" in result.stdout, result.stdout
        return
    assert result.stdout == "", result.stdout
    assert "cvmfsd shim:" not in result.stderr, result.stderr
