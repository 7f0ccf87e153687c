"""GlideinWMS's ``CVMFSEXEC_DIR``: pick this node's self-extracting cvmfsexec and unpack it.

GlideinWMS does not ship distribution directories.  Its factory runs
``makedist -o`` once per source and machine type and names each file
``cvmfsexec-<src>-<os><ver>-<arch>`` (create_cvmfsexec_distros.sh:118-124); the
glidein unpacks the tarballs into the directory that glidein_config's
``CVMFSEXEC_DIR`` names (``cvmfsexec``, cgWConsts.py:24-25).  Run once, such a
file unpacks itself into ``.cvmfsexec`` beside it (makedist:221-231), and only
then does ``$CVMFSEXEC_DIR/.cvmfsexec`` hold the usual distribution
(cvmfs_helper_funcs.sh:244,251; cvmfs_umount.sh:77).

Theory of operation: :func:`pick` (pure) names the file for this node from
the directory's listing, the host facts and ``CVMFS_SRC``; :func:`unpack` runs
that file once as GlideinWMS does, with ``-v`` instead of a mount, so the
file's own header unpacks it (afresh only when the file is newer than
``.cvmfsexec``) and cvmfsexec merely prints its version.  An unpacked
``.cvmfsexec`` of the same build that is not older than the file is used as it is.

The platform follows makedist's own mapping (os-release ``ID``/``ID_LIKE``, the
``VERSION_ID`` major, ``arch``; Debian 11 -> rhel8, Debian 12/13 and Ubuntu
22/24 -> rhel9, SUSE -> suse<N>), see :func:`cvmfsd.mode.select_dist`.  For EL
nodes that is the name GlideinWMS's cvmfsexec_platform_select.sh (l.50-63) and
cvmfs_setup.sh (l.60-65) form too; for SUSE, Debian and Ubuntu GlideinWMS forms
``non-rhel<N>``, which no factory builds.  Every failure is a
:class:`~cvmfsd.launch.LaunchError`, so the GLIDEIN_CVMFS policy decides.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cvmfsd.errors import ConfigError, HostUnsupported
from cvmfsd.launch import Dist, LaunchError
from cvmfsd.leftovers import LOCK_NAME
from cvmfsd.mode import SOURCES, select_dist
from cvmfsd.probe import HostFacts

#: Where a self-extracting file unpacks, beside itself (makedist:224).
UNPACKED = ".cvmfsexec"
#: How long running the file once (unpacking a real distribution) may take.
UNPACK_TIMEOUT = 300.0
_NAME = re.compile(r"^cvmfsexec-(?P<source>[a-z]+)-(?P<machine_type>[a-z]+[0-9]+-[a-z0-9_]+)$")


@dataclass(frozen=True)
class Choice:
    """The self-extracting file chosen for this node, and why."""

    name: str
    machine_type: str
    why: str


@dataclass(frozen=True)
class Unpacked:
    """A chosen file and the distribution it unpacked into."""

    file: Path
    dist: Dist
    reused: bool
    why: str


def packed_names(names: Iterable[str]) -> list[str]:
    """The names that are GlideinWMS's self-extracting cvmfsexec builds, sorted."""
    return sorted(n for n in names if _NAME.match(n))


def pick(names: Iterable[str], facts: HostFacts, source: str | None, *, where: str) -> Choice:
    """Choose the build for this node among the file names ``names`` (in ``where``).

    ``source`` is ``CVMFS_SRC`` (lowercased, as cvmfsexec_platform_select.sh:39
    does); without one, the node's machine type must be unique among ``names``.

    Raises:
        LaunchError: nothing fits, or several do; the message lists what was found.
    """
    builds = packed_names(names)
    found = ", ".join(builds) or "no cvmfsexec-<src>-<os><ver>-<arch> files"
    source = (source or "").strip().lower() or None
    if source is not None and source not in SOURCES:
        raise LaunchError(f"CVMFS_SRC {source!r} is not a cvmfsexec source; expected one of "
                          f"{'|'.join(SOURCES)} (found in {where}: {found})")
    try:
        wanted = select_dist(facts, source or "default")
    except (HostUnsupported, ConfigError) as exc:
        raise LaunchError(f"no cvmfsexec build in {where} can fit this node: {exc}; "
                          f"found {found}", hint=exc.hint) from None
    if source is not None:
        candidates = [wanted.name] if wanted.name in builds else []
        expected = wanted.name
    else:
        candidates = [n for n in builds if n.endswith(f"-{wanted.machine_type}")]
        expected = f"cvmfsexec-<src>-{wanted.machine_type}"
    if len(candidates) == 1:
        return Choice(candidates[0], wanted.machine_type,
                      f"{wanted.why}; CVMFS_SRC {source or 'unset'}")
    if candidates:
        raise LaunchError(f"several cvmfsexec builds in {where} fit this node ({wanted.why}): "
                          f"{', '.join(candidates)}",
                          hint="set CVMFS_SRC (osg, egi or default) to choose the source")
    raise LaunchError(
        f"no cvmfsexec build for this node in {where}: expected {expected} ({wanted.why}); "
        f"found {found}",
        hint="the factory builds them with create_cvmfsexec_distros.sh SOURCES PLATFORMS; "
             "add this platform or run the glidein elsewhere")


def is_packed_dir(directory: Path) -> bool:
    """Whether ``directory`` is a CVMFSEXEC_DIR: no cvmfsexec, but cvmfsexec-* files."""
    if (directory / "cvmfsexec").exists() or not directory.is_dir():
        return False
    try:
        with os.scandir(directory) as entries:
            return any(e.is_file() for e in entries if _NAME.match(e.name))
    except OSError:
        return False


def unpack(directory: Path, facts: HostFacts, source: str | None, *,
           timeout: float = UNPACK_TIMEOUT) -> Unpacked:
    """Pick this node's file in ``directory``, unpack it into ``.cvmfsexec``, return that.

    Raises:
        LaunchError: nothing fits, the file cannot run or unpack, or ``.cvmfsexec``
            holds another build or is in use while it would have to be replaced.
    """
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if e.is_file()]
    except OSError as exc:
        raise LaunchError(f"cannot list CVMFSEXEC_DIR {directory}: {exc.strerror}") from None
    choice = pick(names, facts, source, where=str(directory))
    file, dist = directory / choice.name, Dist(directory / UNPACKED)
    why = f"{choice.name} ({choice.why})"
    if not os.access(file, os.X_OK):
        raise LaunchError(f"{file} is not executable; a self-extracting cvmfsexec must be",
                          hint=f"chmod +x {file}")
    if _up_to_date(file, dist.root):
        _check(dist, choice)
        return Unpacked(file, dist, True, why)
    if _in_use(dist.root):
        raise LaunchError(f"{file} is newer than {dist.root}, which another cvmfsd (or its "
                          "janitor) still uses; unpacking would delete it under that run",
                          hint="wait for the other run to end, or use another CVMFSEXEC_DIR")
    try:
        ran = subprocess.run([str(file), "-v"], stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"unpacking {file} took longer than {timeout:g} s") from None
    except OSError as exc:
        raise LaunchError(f"cannot run {file} to unpack it: {exc.strerror}") from None
    if ran.returncode != 0:
        tail = (ran.stderr or ran.stdout).strip().splitlines()[-5:]
        raise LaunchError(f"unpacking {file} (`{choice.name} -v`) failed with status "
                          f"{ran.returncode}" + (f": {' / '.join(tail)}" if tail else ""))
    _check(dist, choice)
    return Unpacked(file, dist, False, why)


def _up_to_date(file: Path, unpacked: Path) -> bool:
    """The header's rule (makedist:225): unpack again when the file is newer."""
    try:
        return unpacked.stat().st_mtime_ns >= file.stat().st_mtime_ns
    except OSError:
        return False


def _in_use(unpacked: Path) -> bool:
    try:
        fd = os.open(unpacked / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _check(dist: Dist, choice: Choice) -> None:
    dist.check()
    try:
        text = (dist.root / "dist/.cvmfsexecdist").read_text(errors="replace")
    except OSError:
        text = ""
    machtype = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                     if line.startswith("machtype:")), None)
    if machtype is not None and machtype != choice.machine_type:
        raise LaunchError(
            f"{dist.root} holds a {machtype} build, not {choice.machine_type} "
            f"({choice.name}); it was unpacked from another file and is newer than this one",
            hint=f"remove {dist.root} (nothing may be mounted from it) so that "
                 f"{choice.name} unpacks afresh")
