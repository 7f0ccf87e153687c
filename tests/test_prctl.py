"""cvmfsd._prctl: the same prctl(2) calls through python-prctl and through ctypes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from cvmfsd import _prctl


@pytest.fixture(name="backend", params=["ctypes", "python-prctl"])
def _backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each backend in turn; python-prctl only where it is installed."""
    before = _prctl.BACKEND
    try:
        _prctl.use(request.param)
    except ImportError:
        _prctl.use(before)
        pytest.skip("python-prctl is not installed")
    try:
        yield request.param
    finally:
        _prctl.use(before)


def _in_child(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (prctl settings are per process); its stdout."""
    ran = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, check=True, timeout=30, env={**os.environ, **env})
    return ran.stdout.strip()


def test_subreaper_set_and_read_back(backend: str) -> None:
    """PR_SET_CHILD_SUBREAPER then PR_GET_CHILD_SUBREAPER, in a child process."""
    out = _in_child(f"""
        from cvmfsd import _prctl
        _prctl.use({backend!r})
        before = _prctl.get_child_subreaper()
        _prctl.set_child_subreaper(1)
        print(_prctl.BACKEND, before, _prctl.get_child_subreaper())
    """)
    assert out == f"{backend} 0 1"


def test_pdeathsig_set_and_read_back(backend: str) -> None:
    """PR_SET_PDEATHSIG then PR_GET_PDEATHSIG, in a child process."""
    out = _in_child(f"""
        import signal
        from cvmfsd import _prctl
        _prctl.use({backend!r})
        _prctl.set_pdeathsig(signal.SIGUSR1)
        print(_prctl.get_pdeathsig())
    """)
    assert out == str(int(signal.SIGUSR1))


def test_environment_forces_ctypes() -> None:
    """CVMFSD_PRCTL_CTYPES=1 selects the ctypes path at import, python-prctl or not."""
    out = _in_child("from cvmfsd import _prctl; print(_prctl.BACKEND)", CVMFSD_PRCTL_CTYPES="1")
    assert out == "ctypes"


def test_without_python_prctl_ctypes_serves() -> None:
    """With ``prctl`` unimportable (as in the bundle), the ctypes path is chosen by itself."""
    out = _in_child("""
        import sys
        sys.modules["prctl"] = None  # import prctl -> ImportError
        from cvmfsd import _prctl
        _prctl.set_child_subreaper(1)
        print(_prctl.BACKEND, _prctl.get_child_subreaper())
    """)
    assert out == "ctypes 1"


def test_errors_carry_errno() -> None:
    """A bad argument is an OSError with the C library's errno (EINVAL), not -1."""
    before = _prctl.BACKEND
    _prctl.use("ctypes")
    try:
        with pytest.raises(OSError, match="Invalid argument") as caught:
            _prctl.set_pdeathsig(1000)
        assert caught.value.errno == 22
    finally:
        _prctl.use(before)


def test_unknown_backend_is_refused() -> None:
    """A misspelt backend fails fast with what was expected."""
    with pytest.raises(ValueError, match="expected 'ctypes' or 'python-prctl'"):
        _prctl.use("cffi")


def test_janitor_arms_parent_death_without_python_prctl() -> None:
    """The janitor's PR_SET_PDEATHSIG works through ctypes (the bundle's case)."""
    out = _in_child("""
        import sys
        sys.modules["prctl"] = None
        from cvmfsd import _prctl, janitor
        janitor._arm_parent_death()
        print(_prctl.BACKEND, _prctl.get_pdeathsig() == janitor.PDEATH_SIGNAL)
    """)
    assert out == "ctypes True"
