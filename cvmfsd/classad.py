"""ClassAd lines for an HTCondor startd cron: ``cvmfsctl classad``.

Keeps the attribute names pilots already advertise (OSPool's
``advertise-base``; cvmfs-facts.md part B §4) and adds new ones, prefixed the
same way.  ``<x>`` is the repository name with ``.`` and ``-`` turned into
``_``:

=============================  ===============================================
``HAS_CVMFS_<x>``              the repository answers (boolean)
``CVMFS_<x>_REVISION``         catalog revision, -1 if unknown
``CVMFS_<x>_NIOERR``           I/O errors of its cvmfs2, -1 if unknown
``CVMFS_<x>_LAST_IOERR``       seconds since the last I/O error, -1 if none or unknown
``CVMFS_<x>_STATE``            ``"ok"``, ``"hung"``, ``"enotconn"``, ... (new)
``CVMFS_<x>_HIT_RATIO``        lifetime cache hit ratio, 0-1 (new; left out if unknown)
``CVMFS_<x>_MOUNT_SECONDS``    how long the last mount took (new; left out if unknown)
``CVMFSD_MODE``, ``_POLICY``,   how CVMFS is provided, the GLIDEIN_CVMFS policy,
``CVMFSD_PHASE``               the supervisor's phase
=============================  ===============================================

Pure: it formats what it is given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RepoAd:
    """What is advertised about one repository."""

    state: str
    revision: int | None = None
    nioerr: int | None = None
    last_ioerr: float | None = None  # epoch seconds; None or 0 when there was none
    hit_ratio: float | None = None
    mount_seconds: float | None = None


def stem(repo: str) -> str:
    """``atlas.cern.ch`` -> ``atlas_cern_ch``, as OSPool's attribute names spell it."""
    return re.sub(r"[.-]", "_", repo)


def quote(text: str) -> str:
    """A ClassAd string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _real(value: float) -> str:
    return f"{value:.6f}"


def render(repos: Mapping[str, RepoAd], *, mode: str, policy: str, phase: str,
           now: float) -> str:
    """The ``Attr = value`` lines, one attribute per line, repositories in order."""
    lines = [f"CVMFSD_MODE = {quote(mode)}", f"CVMFSD_POLICY = {quote(policy)}",
             f"CVMFSD_PHASE = {quote(phase)}"]
    for repo, ad in repos.items():
        x = stem(repo)
        up = ad.state == "ok"
        lines.append(f"HAS_CVMFS_{x} = {'True' if up else 'False'}")
        lines.append(f"CVMFS_{x}_REVISION = {ad.revision if ad.revision is not None else -1}")
        lines.append(f"CVMFS_{x}_NIOERR = {ad.nioerr if ad.nioerr is not None else -1}")
        since = int(max(0.0, now - ad.last_ioerr)) if ad.last_ioerr else -1
        lines.append(f"CVMFS_{x}_LAST_IOERR = {since}")
        lines.append(f"CVMFS_{x}_STATE = {quote(ad.state)}")
        if ad.hit_ratio is not None:
            lines.append(f"CVMFS_{x}_HIT_RATIO = {_real(ad.hit_ratio)}")
        if ad.mount_seconds is not None:
            lines.append(f"CVMFS_{x}_MOUNT_SECONDS = {_real(ad.mount_seconds)}")
    return "".join(line + "\n" for line in lines)
