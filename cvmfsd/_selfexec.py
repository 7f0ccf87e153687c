"""How cvmfsd starts its own helpers, installed or from the one-file bundle.

cvmfsd runs parts of itself in other processes: the janitor, the process-event
subscriber, the probe worker and the shim inside the namespace.  Installed, they
are ``python -m cvmfsd.X`` (or ``python -I -S .../probe_child.py``).  From the
bundle (``python cvmfsd.pyz ...``) there is no cvmfsd on the interpreter's path,
so the same modules run as ``python -I [-S] cvmfsd.pyz -m cvmfsd.X``: the bundle's
``__main__`` dispatches ``-m`` like the interpreter does.  ``-I`` keeps them as
isolated as the bundle itself (no PYTHONPATH, no user site under the home).

Stdlib only, and nothing imported at module level but os and sys: the janitor
and the probe worker import it at start-up.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["bundle_path", "cvmfsctl_wrapper", "module_argv"]


def bundle_path() -> str | None:
    """The bundle file this cvmfsd runs from, or None when it is installed."""
    info = sys.modules.get("_cvmfsd_bundle")
    if info is not None and getattr(info, "BUNDLE", None):
        return str(info.BUNDLE)  # run from the bundle, perhaps unpacked under $CVMFSD_CACHE
    import cvmfsd

    root = os.path.dirname(os.path.dirname(os.path.abspath(cvmfsd.__file__)))
    return root if os.path.isfile(root) else None


def module_argv(module: str, *, python: str | None = None, flags: Sequence[str] = (),
                bundle: str | None = None) -> list[str]:
    """The command line that runs ``python -m module`` from wherever cvmfsd lives.

    Args:
        module: a module of cvmfsd (``"cvmfsd.janitor"``).
        python: the interpreter; ``sys.executable`` by default.
        flags: interpreter flags (``("-I", "-S")``), kept in both cases.
        bundle: the bundle file; :func:`bundle_path` by default.
    """
    python = python or sys.executable
    bundle = bundle or bundle_path()
    if bundle is None:
        return [python, *flags, "-m", module]
    return [python, *dict.fromkeys(["-I", *flags]), bundle, "-m", module]


def cvmfsctl_wrapper(directory: str, *, python: str | None = None,
                     bundle: str | None = None) -> str | None:
    """Write ``directory/cvmfsctl``, a script running cvmfsctl from the bundle; its path.

    ``$CVMFSCTL`` must name one file that runs (the job wrapper and the
    payload run ``"$CVMFSCTL" get KEY``), and a bundle is one file for two
    commands: the script is that file.  None when not running from a bundle
    or the script cannot be written.
    """
    import shlex

    bundle = bundle or bundle_path()
    if bundle is None:
        return None
    python = python or sys.executable
    path = os.path.join(directory, "cvmfsctl")
    # The jobs run it too, without cvmfsd's environment: keep its unpacked copy.
    cache = os.environ.get("CVMFSD_CACHE")
    cache_line = f"CVMFSD_CACHE={shlex.quote(cache)}; export CVMFSD_CACHE\n" if cache else ""
    text = (f"#!/bin/sh\n# cvmfsctl from the cvmfsd bundle {bundle}\n{cache_line}"
            f"exec {shlex.quote(python)} -I {shlex.quote(bundle)} cvmfsctl \"$@\"\n")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o755)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError:
        return None
    return path
