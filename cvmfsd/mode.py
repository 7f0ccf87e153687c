"""Decide how to provide CVMFS on this node, and which cvmfsexec build to use.

Pure: everything here works on a :class:`~cvmfsd.probe.HostFacts` and a
:class:`~cvmfsd.glidein.PolicyDecision`.  Theory of operation: :data:`TABLE` lists
the ways to get CVMFS, best first, each with a check that returns None when the
facts allow it and otherwise says why not.  :func:`select_mode` walks the whole
table, so the :class:`Decision` explains the winner *and* every other mode.
The cvmfsexec modes are those of cvmfs-facts.md part A §1.1.  cvmfsexec itself
chooses mode 3 or 2 from ``uname -r`` alone, so the kernel rule gates both,
whatever our own FUSE check found.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from cvmfsd.errors import ConfigError, HostUnsupported
from cvmfsd.glidein import PolicyDecision
from cvmfsd.probe import Fact, HostFacts


class Mode(enum.Enum):
    """A way to provide CVMFS."""

    HOST = "host"  # the node already has the repositories under /cvmfs
    MODE3 = "mode3"  # cvmfsexec, FUSE mounts inside a user namespace
    MODE2 = "mode2"  # cvmfsexec, fusermount mounts on the host, then a user namespace
    MODE1 = "mode1"  # mountrepo with fusermount, mounts on the host
    MODE4 = "mode4"  # singcvmfs (apptainer --fusemount): recognised, never launched
    NONE = "none"  # no CVMFS

    @property
    def cvmfsexec_mode(self) -> int | None:
        """The number GlideinWMS writes as GWMS_CVMFSEXEC_MODE, or None."""
        return {Mode.MODE1: 1, Mode.MODE2: 2, Mode.MODE3: 3, Mode.MODE4: 4}.get(self)


@dataclass(frozen=True)
class Rejected:
    """A mode that was not chosen, and why."""

    mode: Mode
    reason: str


@dataclass(frozen=True)
class Decision:
    """The chosen mode, why, and why every other mode was not chosen."""

    mode: Mode
    reason: str
    rejected: tuple[Rejected, ...]
    policy: PolicyDecision
    notes: tuple[str, ...] = ()

    @property
    def fatal(self) -> bool:
        """True when there is no CVMFS and the policy says that fails the glidein."""
        return self.mode is Mode.NONE and self.policy.failure_is_fatal

    def explain(self) -> str:
        """Several lines for a log or ``cvmfsd probe``: winner, rejections, notes."""
        lines = [f"chosen: {self.mode.value}: {self.reason}"]
        lines += [f"not {r.mode.value}: {r.reason}" for r in self.rejected]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _unless(fact: Fact[bool | None], what: str) -> str | None:
    """None if *fact* is True, else a reason naming *what* and the evidence."""
    if fact.value is True:
        return None
    state = "unknown" if fact.value is None else "no"
    return f"{what}: {state} ({fact.evidence})"


def _host(f: HostFacts) -> str | None:
    if not f.repos_wanted:
        return _unless(f.host_cvmfs, "a host /cvmfs")
    missing = [r for r in f.repos_wanted if r not in f.repos_present.value]
    if missing:
        return f"host /cvmfs lacks {', '.join(missing)} ({f.repos_present.evidence})"
    return None


def _mode3(f: HostFacts) -> str | None:
    why = _unless(f.userns, "unprivileged user namespaces") or _unless(
        f.fuse_in_userns, "FUSE mounts inside a user namespace")
    if why:
        return why
    if f.cvmfsexec_userfuse.value is not True:
        return (f"FUSE works in a user namespace, but cvmfsexec decides from the kernel "
                f"release alone and would run mode 2 ({f.cvmfsexec_userfuse.evidence})")
    return None


def _mode2(f: HostFacts) -> str | None:
    why = _unless(f.userns, "unprivileged user namespaces")
    if why:
        return why
    if f.cvmfsexec_userfuse.value is not False:
        return f"cvmfsexec runs mode 3 on this kernel ({f.cvmfsexec_userfuse.evidence})"
    return None if f.fusermount.value else f"no usable fusermount ({f.fusermount.evidence})"


def _mode1(f: HostFacts) -> str | None:
    if not f.fusermount.value:
        return f"no usable fusermount ({f.fusermount.evidence})"
    return _unless(f.dev_fuse, "/dev/fuse usable")


def _mode4(f: HostFacts) -> str | None:
    return f"not supported for launch ({f.container_runtime.evidence})"


Check = Callable[[HostFacts], Optional[str]]

#: (mode, check returning None when usable or why not, what choosing it means), best first.
TABLE: tuple[tuple[Mode, Check, str], ...] = (
    (Mode.HOST, _host, "the host's /cvmfs already has what is wanted"),
    (Mode.MODE3, _mode3, "user namespaces and FUSE inside them work, and cvmfsexec agrees"),
    (Mode.MODE2, _mode2,
     "user namespaces and fusermount work, on a kernel cvmfsexec runs mode 2 on"),
    (Mode.MODE1, _mode1, "fusermount and /dev/fuse work (mounts are visible node-wide)"),
    (Mode.MODE4, _mode4, "apptainer/singularity can mount CVMFS"),
)


def select_mode(policy: PolicyDecision, facts: HostFacts, *,
                forced: Mode | None = None) -> Decision:
    """Choose the best usable mode (or *forced*) and explain every other one.

    Raises:
        HostUnsupported: *forced* names a mode these facts rule out.
    """
    notes = []
    if facts.fuse_in_userns.value is True and facts.cvmfsexec_userfuse.value is False:
        notes.append("FUSE works inside a user namespace, but cvmfsexec picks mode 2 from "
                     "`uname -r` alone, so it will not use mode 3 here")
    if not policy.use_cvmfs:
        if forced not in (None, Mode.NONE):
            notes.append(f"forced mode {forced.value} ignored: the policy is never")
        why = f"policy is never ({policy.source})"
        return Decision(Mode.NONE, why, tuple(Rejected(m, why) for m, _, _ in TABLE),
                        policy, tuple(notes))
    checked = [(mode, check(facts), meaning) for mode, check, meaning in TABLE]
    if forced is not None and forced is not Mode.NONE:
        reason = next(r for m, r, _ in checked if m is forced)
        if reason is not None:
            raise HostUnsupported(f"mode {forced.value} was forced but cannot work here: {reason}",
                                  hint="drop the forced mode to let cvmfsd choose")
    usable = [(m, meaning) for m, r, meaning in checked if r is None]
    if forced is Mode.NONE:
        winner, why = Mode.NONE, "forced: do not provide CVMFS"
    elif forced is not None:
        winner, why = forced, f"forced, and {dict(usable)[forced]}"
    elif usable:
        winner, why = usable[0]
    else:
        winner, why = Mode.NONE, ("no mode is usable on this node; the policy makes that "
                                  f"{'fatal' if policy.failure_is_fatal else 'not fatal'}")
    rejected = [Rejected(m, r if r is not None else f"usable, but {winner.value} comes first")
                for m, r, _ in checked if m is not winner]
    if winner is not Mode.NONE:
        rejected.append(Rejected(Mode.NONE, f"{winner.value} is usable"))
    return Decision(winner, why, tuple(rejected), policy, tuple(notes))


SOURCES = ("osg", "egi", "default", "none")
#: makedist's SUPPORTEDTYPES (cvmfsexec 4.51).
MACHINE_TYPES = frozenset({
    "rhel7-x86_64", "rhel8-aarch64", "rhel8-ppc64le", "rhel8-x86_64", "rhel9-aarch64",
    "rhel9-ppc64le", "rhel9-x86_64", "rhel10-x86_64", "suse15-aarch64", "suse15-x86_64",
})
_EL_IDS = frozenset({"rhel", "centos", "rocky", "almalinux", "ol", "scientific"})
_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64",
           "ppc64le": "ppc64le"}
# Debian and Ubuntu run the rhel builds (cvmfsexec README, makedist).
_FOREIGN = {("debian", 11): 8, ("debian", 12): 9, ("debian", 13): 9,
            ("ubuntu", 22): 9, ("ubuntu", 24): 9}


@dataclass(frozen=True)
class DistName:
    """A cvmfsexec build, named ``cvmfsexec-<source>-<os><version>-<arch>``."""

    source: str
    os: str
    version: int
    arch: str
    why: str = ""

    @property
    def machine_type(self) -> str:
        """makedist's machine type, e.g. ``rhel9-x86_64``."""
        return f"{self.os}{self.version}-{self.arch}"

    @property
    def name(self) -> str:
        """The distribution's file or directory name."""
        return f"cvmfsexec-{self.source}-{self.machine_type}"

    def __str__(self) -> str:
        return self.name


def _platform(facts: HostFacts) -> tuple[str, int, str]:
    os_id = (facts.os_id.value or "").lower()
    ids = {os_id, *(i.lower() for i in facts.os_id_like.value)}
    said = f"{facts.os_id.evidence}, {facts.os_id_like.evidence}, {facts.os_version_id.evidence}"
    match = re.match(r"\d+", facts.os_version_id.value or "")
    if not match:
        raise HostUnsupported(f"no OS major version in os-release ({said})")
    version = int(match[0])
    if ids & _EL_IDS:
        return "rhel", version, f"{os_id} {version} is EL{version}"
    if "suse" in ids or os_id.startswith(("sles", "opensuse")):
        return "suse", version, f"{os_id} {version} is SUSE {version}"
    for family in ("ubuntu", "debian"):  # ubuntu first: its ID_LIKE is debian
        if family in ids:
            el = _FOREIGN.get((family, version))
            if el is None:
                raise HostUnsupported(f"{family} {version} has no cvmfsexec build; supported: "
                                      "debian 11-13, ubuntu 22 and 24 ({said})")
            return "rhel", el, f"{family} {version} uses the rhel{el} build"
    raise HostUnsupported(f"operating system {os_id or '(unknown)'} has no cvmfsexec build; "
                          f"expected an EL rebuild, SUSE, Debian or Ubuntu ({said})")


def select_dist(facts: HostFacts, src: str) -> DistName:
    """Name the cvmfsexec build for this node and config source *src*.

    Raises:
        ConfigError: *src* is not one of :data:`SOURCES`.
        HostUnsupported: no build exists for this OS, version, architecture and source.
    """
    if src not in SOURCES:
        raise ConfigError(f"cvmfsexec source {src!r} is not valid; expected one of "
                          f"{'|'.join(SOURCES)}")
    os_name, version, why = _platform(facts)
    arch = _ARCHES.get(facts.arch.value)
    dist = DistName(src, os_name, version, arch or facts.arch.value, why)
    if arch is None or dist.machine_type not in MACHINE_TYPES:
        raise HostUnsupported(f"cvmfsexec has no {dist.machine_type} build ({why}); "
                              f"makedist supports {' '.join(sorted(MACHINE_TYPES))}")
    if src == "osg" and os_name == "rhel" and version < 8:
        raise HostUnsupported(f"the osg source has no {dist.machine_type} build: OSG needs "
                              "EL 8 or newer", hint="use the default or egi source")
    if src == "egi" and not (os_name == "suse" or version == 9):
        raise HostUnsupported(f"the egi source has no {dist.machine_type} build: EGI has "
                              "rhel9 and suse only", hint="use the default or osg source")
    return dist


DistLike = Union[DistName, str]


def find_dist(search_dirs: Iterable[Path | str],
              name: DistLike | Sequence[DistLike]) -> Path:
    """Find a distribution called *name* (or the first of several) in *search_dirs*.

    A distribution is an executable self-extracting file (``makedist -o``) or a
    directory holding ``cvmfsexec`` (plain ``makedist``); the path returned is
    that file or directory.

    Raises:
        ConfigError: nothing fits; the message names every name and directory tried.
    """
    names = [str(name)] if isinstance(name, (DistName, str)) else [str(n) for n in name]
    dirs = [Path(d) for d in search_dirs]
    broken = []
    for directory in dirs:
        for dist in names:
            path = directory / dist
            if path.is_file() and os.access(path, os.X_OK):
                return path
            if path.is_dir() and (path / "cvmfsexec").is_file():
                return path
            if path.exists():
                broken.append(f"{path} is neither an executable file nor a directory "
                              "with cvmfsexec")
    raise ConfigError(
        f"no cvmfsexec distribution found: looked for {', '.join(names) or '(no names)'} in "
        f"{', '.join(map(str, dirs)) or '(no directories)'}" + "".join(f"; {b}" for b in broken),
        hint="make one with `makedist -m <machine type> <source>` (and `makedist -o` for a "
             "single file)",
    )
