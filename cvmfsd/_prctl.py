"""The few ``prctl(2)`` calls cvmfsd makes, with or without python-prctl.

python-prctl is a compiled extension: a pilot's node has no compiler and the
one-file bundle carries no compiled code, so where it is missing the same calls
go to the C library through :mod:`ctypes`.  python-prctl stays the first choice
where it is installed (it is what the installed package was tested with).

Each function raises :class:`OSError` (with the C library's errno) on failure.
"""

from __future__ import annotations

import os
from typing import Any, Callable

__all__ = ["BACKEND", "get_child_subreaper", "set_child_subreaper", "set_pdeathsig"]

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def _libc_prctl() -> Callable[..., int]:
    import ctypes

    function = ctypes.CDLL(None, use_errno=True).prctl
    function.restype = ctypes.c_int

    def call(option: int, arg2: Any = 0) -> int:
        # prctl(2) takes unsigned longs after the option; pass all four so that
        # the kernel never reads stack garbage for the unused ones.
        result = int(function(ctypes.c_int(option), ctypes.c_ulong(arg2) if isinstance(arg2, int)
                              else arg2, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)))
        if result == -1:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return result

    return call


def _load(force_ctypes: bool = False) -> tuple[str, Any]:
    """Which implementation serves: ``("python-prctl", module)`` or ``("ctypes", call)``."""
    if not force_ctypes and not os.environ.get("CVMFSD_PRCTL_CTYPES"):
        try:
            import prctl
        except ImportError:
            pass
        else:
            return "python-prctl", prctl
    return "ctypes", _libc_prctl()


#: "python-prctl" or "ctypes"; CVMFSD_PRCTL_CTYPES=1 forces the latter (tests).
BACKEND, _impl = _load()


def use(backend: str) -> None:
    """Switch to ``"ctypes"`` or ``"python-prctl"`` (tests force the fallback with it)."""
    global BACKEND, _impl
    if backend not in ("ctypes", "python-prctl"):
        raise ValueError(f"unknown prctl backend {backend!r}: expected 'ctypes' or 'python-prctl'")
    BACKEND, _impl = _load(force_ctypes=backend == "ctypes")
    if backend != BACKEND:
        raise ImportError("python-prctl is not installed")


def set_child_subreaper(flag: int) -> None:
    """PR_SET_CHILD_SUBREAPER: adopt the orphans of our process tree (``flag`` 1) or not (0)."""
    if BACKEND == "ctypes":
        _impl(PR_SET_CHILD_SUBREAPER, int(flag))
    else:
        _impl.set_child_subreaper(int(flag))


def get_child_subreaper() -> int:
    """PR_GET_CHILD_SUBREAPER: 1 if this process is a child subreaper, else 0."""
    if BACKEND != "ctypes":
        return int(_impl.get_child_subreaper())
    import ctypes

    value = ctypes.c_int(0)
    _impl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value))
    return int(value.value)


def set_pdeathsig(signum: int) -> None:
    """PR_SET_PDEATHSIG: the signal this process gets when its parent thread ends (0: none)."""
    if BACKEND == "ctypes":
        _impl(PR_SET_PDEATHSIG, int(signum))
    else:
        _impl.set_pdeathsig(int(signum))


def get_pdeathsig() -> int:
    """PR_GET_PDEATHSIG: the parent-death signal set for this process (0: none)."""
    if BACKEND != "ctypes":
        return int(_impl.get_pdeathsig())
    import ctypes

    value = ctypes.c_int(0)
    _impl(PR_GET_PDEATHSIG, ctypes.byref(value))
    return int(value.value)
