"""Self-extracting cvmfsexec files (``makedist -o``): check one, unpack it once, use that.

``--dist`` may name such a file itself, as cvmfsexec's README tells sites to
ship one, or GlideinWMS's ``CVMFSEXEC_DIR`` of them.  GlideinWMS does not ship
distribution directories: its factory runs ``makedist -o`` once per source and
machine type and names each file ``cvmfsexec-<src>-<os><ver>-<arch>``
(create_cvmfsexec_distros.sh:118-124); the glidein unpacks the tarballs into
the directory that glidein_config's ``CVMFSEXEC_DIR`` names (``cvmfsexec``,
cgWConsts.py:24-25).  Run once, such a file unpacks itself into ``.cvmfsexec``
beside it (makedist:221-231), and only then does ``.cvmfsexec`` hold the usual
distribution (cvmfs_helper_funcs.sh:244,251; cvmfs_umount.sh:77).

Theory of operation: :func:`pick` (pure) names the file for this node from a
CVMFSEXEC_DIR's listing, the host facts and ``CVMFS_SRC``; :func:`unpack`
hands that file, and :func:`unpack_file` the file ``--dist`` names, to one
routine.  It reads the file's head first (:func:`check_header`): makedist's
header is a bash script with a line ``__TAR_BELOW__`` before the gzipped tar,
so a random script or binary is refused without being run.  Then, holding a
lock on the file so that two cvmfsd never unpack it at once, it does what the
header would: an unpacked ``.cvmfsexec`` not older than the file is used as it
is (makedist:225); otherwise, unless another cvmfsd holds that copy (its dist
lock), it runs the file once with ``-v`` instead of a mount, as GlideinWMS
does, so the header unpacks afresh and cvmfsexec merely prints its version.
The run is bounded, in a process group of its own so that a timeout ends the
header's ``tail | tar`` too.  A run that fails or times out leaves a partial
``.cvmfsexec`` newer than the file, which the header would take as unpacked
forever: it is removed, so the next try unpacks again.

The platform follows makedist's own mapping (os-release ``ID``/``ID_LIKE``, the
``VERSION_ID`` major, ``arch``; Debian 11 -> rhel8, Debian 12/13 and Ubuntu
22/24 -> rhel9, SUSE -> suse<N>), see :func:`cvmfsd.mode.select_dist`.  For EL
nodes that is the name GlideinWMS's cvmfsexec_platform_select.sh (l.50-63) and
cvmfs_setup.sh (l.60-65) form too; for SUSE, Debian and Ubuntu GlideinWMS forms
``non-rhel<N>``, which no factory builds.  Every failure is a
:class:`~cvmfsd.launch.LaunchError`, so the GLIDEIN_CVMFS policy decides.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from cvmfsd.errors import ConfigError, HostUnsupported
from cvmfsd.launch import Dist, LaunchError
from cvmfsd.leftovers import LOCK_NAME, NO_FLOCK
from cvmfsd.mode import SOURCES, select_dist
from cvmfsd.probe import HostFacts

#: Where a self-extracting file unpacks, beside itself (makedist:224).
UNPACKED = ".cvmfsexec"
#: How long running the file once (unpacking a real distribution) may take.
UNPACK_TIMEOUT = 300.0
#: The line after which makedist -o's file holds its gzipped tar (makedist:228,232,234).
TAR_MARKER = b"\n__TAR_BELOW__\n"
#: How much of a file is read to find that line (makedist's header is ~330 bytes).
HEADER_LIMIT = 64 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
#: ``$0`` in a header other than inside double quotes (word-split by bash).
_UNQUOTED_SELF = re.compile(rb'(?<!")\$0\b')
_NAME = re.compile(r"^cvmfsexec-(?P<source>[a-z]+)-(?P<machine_type>[a-z]+[0-9]+-[a-z0-9_]+)$")


@dataclass(frozen=True)
class Choice:
    """The self-extracting file chosen for this node, and why."""

    name: str
    machine_type: str
    why: str


@dataclass(frozen=True)
class Unpacked:
    """A self-extracting file and the distribution it unpacked into."""

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


def check_header(file: Path) -> None:
    """Raise :class:`LaunchError` unless ``file`` begins as ``makedist -o`` writes one.

    That is (makedist:221-234): a script (``#!/bin/bash``), a line
    ``__TAR_BELOW__``, then gzip data (``tar -czf``), and the script unpacks
    into ``.cvmfsexec``; ``makedist -s -o`` makes a singcvmfs file instead,
    whose header says ``.singcvmfs`` (its sed turns the first ``cvmfsexec`` of
    each header line into ``singcvmfs``, makedist:209,221).  makedist's header
    uses ``$0`` unquoted, so it cannot run from a path with white space.
    """
    try:
        with file.open("rb") as opened:
            head = opened.read(HEADER_LIMIT)
    except OSError as exc:
        raise LaunchError(f"cannot read {file}: {exc.strerror}") from None
    what = "expected a self-extracting cvmfsexec, as `makedist -o FILE` makes it"
    hint = ("pass --dist the file `makedist -o` wrote, the directory where makedist made "
            "the distribution, or GlideinWMS's CVMFSEXEC_DIR")
    if file.name == "cvmfsexec" and (file.parent / "dist/.cvmfsexecdist").exists():
        hint = f"this is the distribution's own cvmfsexec: pass --dist {file.parent}"
    if not head.startswith(b"#!"):
        raise LaunchError(f"{file} is not a self-extracting cvmfsexec: it starts with "
                          f"{head[:8]!r}, not a script's '#!'; {what}", hint=hint)
    script, marker, tar = head.partition(TAR_MARKER)
    if not marker:
        raise LaunchError(f"{file} is not a self-extracting cvmfsexec: it is a script without "
                          f"a line __TAR_BELOW__ in its first {HEADER_LIMIT // 1024} KiB; {what}",
                          hint=hint)
    if not tar.startswith(_GZIP_MAGIC):
        raise LaunchError(f"{file} is not a self-extracting cvmfsexec: what follows its "
                          f"__TAR_BELOW__ line is not gzip data (starts with {tar[:8]!r}); "
                          f"{what}; was it cut short or altered?", hint=hint)
    if f"/{UNPACKED}".encode() not in script:
        singcvmfs = b"/.singcvmfs" in script
        raise LaunchError(
            f"{file} is a self-extracting " + ("singcvmfs (makedist -s -o)" if singcvmfs
                                               else f"file that does not unpack into {UNPACKED}")
            + f"; {what}", hint=hint)
    if _UNQUOTED_SELF.search(script) and any(c.isspace() for c in str(file.absolute())):
        raise LaunchError(
            f"cannot unpack {file}: its path has white space, and its header uses $0 and the "
            "directory unquoted (as makedist -o writes it, makedist:223-231), so it would "
            "neither find itself nor unpack",
            hint="copy the file to a path without spaces and pass that to --dist")


def unpack(directory: Path, facts: HostFacts, source: str | None, *,
           timeout: float | None = None) -> Unpacked:
    """Pick this node's file in ``directory``, unpack it into ``.cvmfsexec``, return that.

    Raises:
        LaunchError: nothing fits, or :func:`unpack_file` fails; also when
            ``.cvmfsexec`` holds another machine type's build that the chosen
            file would not replace.
    """
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if e.is_file()]
    except OSError as exc:
        raise LaunchError(f"cannot list CVMFSEXEC_DIR {directory}: {exc.strerror}") from None
    choice = pick(names, facts, source, where=str(directory))
    return unpack_file(directory / choice.name, why=f"{choice.name} ({choice.why})",
                       machine_type=choice.machine_type, timeout=timeout)


def unpack_file(file: Path, *, why: str = "the self-extracting file --dist names",
                machine_type: str | None = None, timeout: float | None = None) -> Unpacked:
    """Unpack the self-extracting ``file`` into ``.cvmfsexec`` beside it (if need be).

    Args:
        file: made by ``makedist -o``; run as given (its header unpacks beside
            ``$0``, makedist:223).
        why: how ``file`` was chosen, for the log.
        machine_type: the build ``.cvmfsexec`` must hold, if known (a reused
            copy may come from another file in the same directory).
        timeout: how long the unpacking run may take (default
            :data:`UNPACK_TIMEOUT`); it also bounds the wait for another
            cvmfsd unpacking the same file.

    Raises:
        LaunchError: ``file`` is not executable or not a self-extracting
            cvmfsexec, its directory is not writable when it must unpack,
            ``.cvmfsexec`` is in use while it would have to be replaced, the
            run fails or times out, or what it unpacked is no distribution.
    """
    timeout = UNPACK_TIMEOUT if timeout is None else timeout
    dist = Dist(file.parent / UNPACKED)
    if not os.access(file, os.X_OK):
        raise LaunchError(f"{file} is not executable; a self-extracting cvmfsexec must be",
                          hint=f"chmod +x {file}")
    check_header(file)
    # Where we cannot write, we cannot unpack either: use what is there without the
    # lock, which anyone who can read the file could hold for good.
    writable = os.access(file.parent, os.W_OK | os.X_OK)
    with _unpacking(file, timeout) if writable else nullcontext():
        if _up_to_date(file, dist.root):
            _check(dist, file, machine_type)
            return Unpacked(file, dist, True, why)
        if _in_use(dist.root):
            raise LaunchError(f"{file} is newer than {dist.root}, which another cvmfsd (or its "
                              "janitor) still uses; unpacking would delete it under that run",
                              hint="wait for the other run to end, or use another copy of "
                                   "the file in a directory of its own")
        if not writable:
            raise LaunchError(
                f"cannot unpack {file}: its header unpacks it into {dist.root} "
                f"(beside the file), but {file.parent} is not writable"
                + (f" and {dist.root} is older than the file" if dist.root.exists() else ""),
                hint=f"copy {file.name} into a writable directory (e.g. the glidein's work "
                     f"directory) and pass that copy to --dist, or have {file.parent}'s owner "
                     f"run `{file} -v` once")
        said = _run(file, dist, timeout)
        try:
            _check(dist, file, machine_type)
        except LaunchError as exc:
            shutil.rmtree(dist.root, ignore_errors=True)
            raise LaunchError(f"{exc}; `{file.name} -v` exited 0"
                              + (f", saying: {said}" if said else ""), hint=exc.hint) from None
    return Unpacked(file, dist, False, why)


@contextmanager
def _unpacking(file: Path, wait: float) -> Iterator[None]:
    """Hold an exclusive flock on ``file`` itself: one cvmfsd unpacks it at a time
    (the others wait, at most ``wait`` s, then find it unpacked).

    The file is only read (a running header opens it too), so the lock works
    where the file is read-only to us; where flock is not supported, nothing is
    held (as the header itself, which takes no lock).  NFS emulates flock with
    byte-range locks and refuses an exclusive one on a file opened read-only
    (EBADF, flock(2)): there too nothing is held.
    """
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LaunchError(f"cannot open {file}: {exc.strerror}") from None
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LaunchError(
                        f"{file} is being unpacked by another process (it holds a lock on "
                        f"the file); waited {wait:g} s",
                        hint=f"see who holds it (fuser {file}), or try again") from None
                time.sleep(0.05)
            except OSError as exc:
                if exc.errno not in (*NO_FLOCK, errno.EBADF):
                    raise LaunchError(f"cannot lock {file}: {exc.strerror}") from None
                break
        yield
    finally:
        os.close(fd)


def _run(file: Path, dist: Dist, timeout: float) -> str:
    """Run ``file -v`` once and return the last lines it wrote (`` / ``-joined).

    Raises:
        LaunchError: it could not run, failed or timed out (the partial ``dist`` is removed).
    """
    try:
        child = subprocess.Popen([str(file), "-v"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 errors="replace", start_new_session=True)
    except OSError as exc:
        raise LaunchError(f"cannot run {file} to unpack it: {exc.strerror}") from None
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the header's tail and tar with it
        child.communicate()
        shutil.rmtree(dist.root, ignore_errors=True)
        raise LaunchError(f"unpacking {file} (`{file.name} -v`) took longer than {timeout:g} s;"
                          f" it was killed and the partial {dist.root} removed",
                          hint="is the file system slow or full? unpack it beforehand "
                               f"(`{file} -v`), or copy it to local disk") from None
    said = _shortened(" / ".join(line for line in f"{out}\n{err}".splitlines() if line.strip()))
    if child.returncode == 0:
        return said
    shutil.rmtree(dist.root, ignore_errors=True)
    status = (f"was killed by signal {-child.returncode}" if child.returncode < 0
              else f"failed with status {child.returncode}")
    raise LaunchError(f"unpacking {file} (`{file.name} -v`) {status}"
                      + (f": {said}" if said else ""))


def _shortened(said: str, limit: int = 400) -> str:
    """``said`` within about ``limit`` characters: its start (the cause, e.g. gzip's
    complaint) and its end (the outcome), whatever the length of the paths between."""
    if len(said) <= limit:
        return said
    return f"{said[:limit // 3]} ... {said[-(limit - limit // 3):]}"


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


def _check(dist: Dist, file: Path, machine_type: str | None) -> None:
    try:
        dist.check()
    except LaunchError as exc:
        raise LaunchError(f"{exc} (unpacked from {file})",
                          hint=f"is {file} a cvmfsexec made by makedist -o? remove "
                               f"{dist.root} (nothing may be mounted from it) so that it "
                               "unpacks afresh") from None
    if machine_type is None:
        return
    try:
        text = (dist.root / "dist/.cvmfsexecdist").read_text(errors="replace")
    except OSError:
        text = ""
    machtype = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                     if line.startswith("machtype:")), None)
    if machtype is not None and machtype != machine_type:
        raise LaunchError(
            f"{dist.root} holds a {machtype} build, not {machine_type} "
            f"({file.name}); it was unpacked from another file and is newer than this one",
            hint=f"remove {dist.root} (nothing may be mounted from it) so that "
                 f"{file.name} unpacks afresh")
