"""The descriptor budget and input bounds (issue 12, items 1, 3 and 10), acted out.

Each test does what a hostile party can do: another local user floods /metrics
with connections or oversized heads; the payload (the pilot's own uid,
untrusted) floods the control socket, sends descriptors without a request, or
trickles bytes.  cvmfsd must go on serving the pilot.  Loopback only; every
test is bounded by a ``fail_after`` or a subprocess timeout.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfsd import ctl

CVMFSD = [sys.executable, "-m", "cvmfsd"]
CVMFSCTL = str(Path(sys.executable).parent / "cvmfsctl")


# -- item 10: small things ------------------------------------------------------------

@pytest.mark.parametrize("repos", ["../etc", "repo.a,../../x", "/etc", "a b"])
def test_probe_validates_repos_like_run(repos: str) -> None:
    """``cvmfsd probe --repos ../etc`` is refused with exit 2 and a message, as ``run`` is."""
    result = subprocess.run([*CVMFSD, "probe", "--repos", repos], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "--repos: invalid repository name" in result.stderr
    assert "Traceback" not in result.stderr
    assert "repos_present" not in result.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root connects whatever the socket's mode")
def test_cvmfsctl_on_a_socket_it_may_not_open(tmp_path: Path) -> None:
    """EACCES connecting: a clear error and exit 77, no traceback (as the CI user)."""
    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        path.chmod(0)
        for argv in (["ping"], ["wait", "/cvmfs/repo.a", "--timeout", "1"]):
            result = subprocess.run([CVMFSCTL, "--socket", str(path), *argv],
                                    capture_output=True, text=True, timeout=30, check=False)
            assert result.returncode == 77
            assert result.stderr == (f"cvmfsctl: cannot connect to cvmfsd at {path}: Permission "
                                     "denied (the socket serves only the uid that runs cvmfsd)\n")


@pytest.mark.parametrize(("code", "status", "message"), [
    (errno.EACCES, 77, "cannot connect to cvmfsd at S: Permission denied"),
    (errno.ENOBUFS, 69, "cannot talk to cvmfsd at S: No buffer space available"),
    (errno.ENOTSOCK, 69, "cannot talk to cvmfsd at S: Socket operation on non-socket"),
])
def test_cvmfsctl_reports_os_errors_without_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        code: int, status: int, message: str) -> None:
    """Any OSError while connecting ends cvmfsctl with one line and an exit status."""
    def refuse(self: socket.socket, address: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert ctl.main(["--socket", "S", "ping"]) == status
    err = capsys.readouterr().err
    assert err.startswith(f"cvmfsctl: {message}")
    assert err.count("\n") == 1
