"""Find out what this node allows: the only module that reads host capabilities.

Every fact is a :class:`Fact`: a value and the evidence it came from, so a
report can say *why* cvmfsd believes the node can or cannot do something.  Facts
come from files under injectable roots (``proc_root``, ``etc_root``, ...), so
tests run on canned trees, and, when ``run_checks`` is set, from doing the real
thing in a child process with a deadline: creating a user namespace, mounting
FUSE inside one.  Anything that may touch a FUSE file system (``/cvmfs``) is
also done in a child with a deadline, because a stuck FUSE daemon makes even
``stat`` hang in D state (cvmfs-facts.md part B §6).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar, Union

from cvmfsd.mountinfo import Mount, is_fuse, parse_mountinfo

T_co = TypeVar("T_co", covariant=True)
JsonValue = Union[str, int, bool, None, list[str]]

GWMS_PROBE_REPO = "oasis.opensciencegrid.org"  # GlideinWMS's test for a host /cvmfs


@dataclass(frozen=True)
class Fact(Generic[T_co]):
    """A value and how it was found (``"read /proc/sys/...: 96365"``)."""

    value: T_co
    evidence: str


@dataclass(frozen=True)
class HostFacts:
    """What :func:`probe_host` found.  A value of None means "could not tell"."""

    kernel_release: Fact[str | None]
    os_id: Fact[str | None]
    os_id_like: Fact[tuple[str, ...]]
    os_version_id: Fact[str | None]
    arch: Fact[str]
    max_user_namespaces: Fact[int | None]
    userns: Fact[bool | None]  # `unshare -rm true` works
    fuse_in_userns: Fact[bool | None]  # a FUSE mount(2) inside `unshare -rm` works
    cvmfsexec_userfuse: Fact[bool | None]  # cvmfsexec's kernel rule says mode 3
    dev_fuse: Fact[bool]  # /dev/fuse opens read-write for us
    fusermount: Fact[tuple[str, ...]]  # usable fusermount programs (setuid root, or we are root)
    fuse_group: Fact[bool | None]  # we are in group fuse (None: no such group)
    proc_masked: Fact[bool]  # docker/k8s masked /proc: cvmfsexec skips its pid namespace
    container_runtime: Fact[str | None]  # apptainer/singularity for mode 4
    host_cvmfs: Fact[bool]  # GlideinWMS's test for an existing /cvmfs
    repos_present: Fact[tuple[str, ...]]  # the wanted repos found under cvmfs_root
    repos_wanted: tuple[str, ...] = ()

    def facts(self) -> dict[str, Fact[object]]:
        """Every fact by name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "repos_wanted"}

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict: ``{name: {"value": ..., "evidence": ...}, "repos_wanted": [...]}``."""
        out: dict[str, object] = {
            name: {"value": _jsonable(fact.value), "evidence": fact.evidence}
            for name, fact in self.facts().items()
        }
        out["repos_wanted"] = list(self.repos_wanted)
        return out

    def render(self) -> str:
        """One line per fact, ``name: value (evidence)``, for humans."""
        lines = []
        for name, fact in self.facts().items():
            value = _jsonable(fact.value)
            shown = " ".join(value) or "(none)" if isinstance(value, list) else str(value)
            lines.append(f"{name}: {shown} ({fact.evidence})")
        return "\n".join(lines)


def _jsonable(value: object) -> JsonValue:
    if isinstance(value, tuple):
        return [str(v) for v in value]
    assert value is None or isinstance(value, (str, int, bool))  # noqa: S101 - Fact invariant
    return value


def cvmfsexec_userfuse(release: str) -> Fact[bool | None]:
    """Apply cvmfsexec's own rule (it reads ``uname -r`` only) for mode 3 vs mode 2.

    USERFUSE is true when the major version is above 4, or it is 4.x with x >= 18,
    or 3.10 with a revision (after the ``-``) of at least 1127 (RHEL 7.8).
    """
    match = re.match(r"(\d+)\.(\d+)", release)
    if not match:
        return Fact(None, f"kernel release {release!r} not understood")
    major, minor = int(match[1]), int(match[2])
    rev_match = re.match(r"[^-]*-(\d+)", release)
    rev = int(rev_match[1]) if rev_match else -1
    if major > 4 or (major == 4 and minor >= 18):
        return Fact(True, f"kernel {release} >= 4.18: cvmfsexec would use mode 3")
    if (major, minor) == (3, 10) and rev >= 1127:
        return Fact(True, f"kernel {release} is 3.10 with revision {rev} >= 1127 (RHEL 7.8+): "
                          "cvmfsexec would use mode 3")
    return Fact(False, f"kernel {release} is older than 4.18 and 3.10.0-1127: "
                       "cvmfsexec would use mode 2")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _os_release(etc_root: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (_read(etc_root / "os-release") or "").splitlines():
        key, sep, raw = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            try:
                values[key.strip()] = " ".join(shlex.split(raw))
            except ValueError:  # unbalanced quotes: keep what is there
                values[key.strip()] = raw.strip("\"' ")
    return values


def _judge_host_repo(repo: str, state: str | None, fqrn: str | None,
                     mount: Mount | None) -> str:
    """Whether a repository under the host's /cvmfs is there: ``present`` or why not.

    A FUSE mount counts only if it answers ``user.fqrn`` with the repository's
    name (the rule of :mod:`cvmfsd.mountinfo`; the source says nothing: a
    system mount reads ``fuse cvmfs2``, a cvmfsexec one ``fuse /dev/fuse``).
    Anything else -- a bind mount or NFS export of someone's /cvmfs, a
    container's -- counts by GlideinWMS's test: a ``.cvmfsdirtab`` or any entry.
    """
    if state is None:
        return "not checked"
    if fqrn is not None and fqrn != repo:
        return f"serves {fqrn!r}, not {repo}"
    if mount is not None and fqrn is None and state == "present":
        return "a FUSE mount that answers no user.fqrn: not CVMFS"
    return state


@dataclass(frozen=True)
class _Ran:
    status: int | None  # None: did not start, or timed out
    output: str
    what: str  # "exit 0", "timed out after 5 s", "cannot run: ..."


class _Child:
    """A check run in a child process, started at once, its result collected later."""

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.proc: subprocess.Popen[str] | None = None
        self.error = ""
        # A new session lets us kill the whole tree on timeout (unshare's children too).
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True)
        except OSError as exc:
            self.error = f"cannot run: {exc.strerror}"

    def result(self) -> _Ran:
        """Wait for it until its deadline (counted from its start); kill it past that."""
        proc = self.proc
        if proc is None:
            return _Ran(None, "", self.error)
        try:
            out, _ = proc.communicate(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            try:
                out, _ = proc.communicate(timeout=1.0)
            except subprocess.TimeoutExpired:  # stuck in D state: leave it, report the hang
                out = ""
            return _Ran(None, out, f"timed out after {self.timeout:g} s")
        return _Ran(proc.returncode, out, f"exit {proc.returncode}")

    def cancel(self) -> None:
        """End it unwaited for (the probe was given up): no child is left behind."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# Runs inside `unshare -rm`: mount(2) a FUSE file system on /dev/fuse with no daemon
# behind it (mounting needs none), then close the fd (aborting the connection so
# nothing can block on it) and detach the mount.  Its last line: "ok|step|ERRNO".
# It imports as little as it can (no json, no tempfile): it is on the critical path.
_FUSE_CHECK = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def done(ok, step, err=0):
    print("%d|%s|%s" % (ok, step, errno.errorcode.get(err, str(err))))
    raise SystemExit(0)
try:
    fd = os.open("/dev/fuse", os.O_RDWR)
except OSError as exc:
    done(False, "open /dev/fuse", exc.errno)
d = os.path.join(os.environ.get("TMPDIR") or "/tmp",
                 "cvmfsd-fuse-check." + os.urandom(6).hex())
try:
    os.mkdir(d, 0o700)
except OSError as exc:
    done(False, "mkdir " + d, exc.errno)
opts = "fd=%d,rootmode=40000,user_id=0,group_id=0" % fd
rc = libc.mount(b"cvmfsd-probe", d.encode(), b"fuse", 6, opts.encode())  # nosuid,nodev
err = ctypes.get_errno()
os.close(fd)
if rc == 0:
    libc.umount2(d.encode(), 2)  # MNT_DETACH
os.rmdir(d)
done(rc == 0, "mount", err)
"""

# Looks at each repository under a root; one JSON line per repository as it goes,
# so after a timeout the parent knows which one hung.  One text, run two ways: in a
# child process (_REPO_CHECK) when anything is mounted at or below the root, which
# may hang; in-process when nothing is, as on most nodes that need cvmfsd: a plain
# directory (or none) on the root's file system cannot hang in FUSE.
_REPO_LOOK = """
import json, os
def look(root, repos, emit):
    for repo in repos:
        path = os.path.join(root, repo)
        state = fqrn = None
        try:
            dirtab = os.path.exists(os.path.join(path, ".cvmfsdirtab"))
            with os.scandir(path) as entries:
                state = "present" if dirtab or next(entries, None) else "empty"
            fqrn = os.getxattr(path, "user.fqrn").decode(errors="replace")
        except OSError as exc:
            if state is None:
                state = os.strerror(exc.errno) if exc.errno else str(exc)
        emit(json.dumps([repo, state, fqrn]))
"""
_REPO_CHECK = _REPO_LOOK + """
import sys
look(sys.argv[1], sys.argv[2:], lambda line: print(line, flush=True))
"""


def _look_here(cvmfs_root: Path, names: Sequence[str]) -> _Ran:
    """_REPO_LOOK in this process (only where nothing is mounted to hang on)."""
    namespace: dict[str, object] = {}
    exec(_REPO_LOOK, namespace)  # noqa: S102 - our own constant text, shared with the child
    lines: list[str] = []
    look = namespace["look"]
    assert callable(look)  # noqa: S101 - defined by the text above
    look(str(cvmfs_root), names, lines.append)
    return _Ran(0, "\n".join(lines), "looked in-process: nothing is mounted there")


def _mounted_at_or_below(root: Path, proc_root: Path) -> bool:
    """Whether the mount table shows anything at ``root`` or below it (autofs included)."""
    prefix = str(root).rstrip("/") + "/"
    return any(m.mountpoint == str(root) or m.mountpoint.startswith(prefix)
               for m in parse_mountinfo(_read(proc_root / "self" / "mountinfo") or ""))


class Checks:
    """The probe's slow checks, started as early as possible and collected by probe_host.

    ``cvmfsd run`` starts them before it imports the rest of itself, so the
    children (a user namespace, a FUSE mount in one, a look at /cvmfs) run while
    the interpreter loads: they are on the critical path of every pilot.
    """

    def __init__(self, *, repos: Sequence[str] = (), cvmfs_root: Path = Path("/cvmfs"),
                 proc_root: Path = Path("/proc"), timeout: float = 5.0,
                 run_checks: bool = True) -> None:
        self.repos_wanted = tuple(repos)
        self.cvmfs_root, self.proc_root, self.timeout = cvmfs_root, proc_root, timeout
        self.names = list(dict.fromkeys((GWMS_PROBE_REPO, *repos)))
        self.look: _Child | None = None
        if _mounted_at_or_below(cvmfs_root, proc_root):
            self.look = _Child([sys.executable, "-I", "-S", "-c", _REPO_CHECK,
                                str(cvmfs_root), *self.names], timeout)
        self.userns: _Child | None = None
        self.fuse: _Child | None = None
        if run_checks:
            self.userns = _Child(["unshare", "-rm", "true"], timeout)
            self.fuse = _Child(["unshare", "-rm", sys.executable, "-I", "-S", "-c", _FUSE_CHECK],
                               timeout)

    def looked(self) -> _Ran:
        """What the look at the repositories found (in a child, or here)."""
        if self.look is None:
            return _look_here(self.cvmfs_root, self.names)
        return self.look.result()

    def cancel(self) -> None:
        """End the children unwaited for: the run was given up before the probe ended."""
        for child in (self.look, self.userns, self.fuse):
            if child is not None:
                child.cancel()


def _fuse_in_userns(ran: _Ran) -> Fact[bool | None]:
    how = "ran `unshare -rm python -c <FUSE mount check>`"
    try:
        flag, step, err = ran.output.strip().splitlines()[-1].split("|")
        ok = {"1": True, "0": False}[flag]
    except (ValueError, IndexError, KeyError):
        return Fact(False if ran.status is not None else None,
                    f"{how}: {ran.what}: {ran.output.strip()[:200]!r}")
    detail = "mounted and unmounted FUSE" if ok else f"{step} failed: {err}"
    return Fact(bool(ok), f"{how}: {detail}")


def _repos(checks: Checks) -> tuple[Fact[bool], Fact[tuple[str, ...]]]:
    cvmfs_root, wanted, names = checks.cvmfs_root, checks.repos_wanted, checks.names
    ran = checks.looked()
    states: dict[str, str] = {}
    fqrns: dict[str, str | None] = {}
    for line in ran.output.splitlines():
        try:
            repo, state, fqrn = json.loads(line)
            states[str(repo)], fqrns[str(repo)] = str(state), fqrn
        except ValueError:
            continue
    for repo in names:
        if repo not in states:  # the first silent one is the one that hung
            states[repo] = ran.what if ran.status is None else "not checked"
            break
    # Read after the child looked: an autofs /cvmfs mounts a repository on access.
    table = parse_mountinfo(_read(checks.proc_root / "self" / "mountinfo") or "")
    fuse = {m.mountpoint: m for m in table if is_fuse(m.fstype)}
    for repo in names:
        states[repo] = _judge_host_repo(repo, states.get(repo),
                                        fqrns.get(repo), fuse.get(str(cvmfs_root / repo)))
    autofs = any(m.mountpoint == str(cvmfs_root) and m.fstype == "autofs" for m in table)

    def evidence(repo: str) -> str:
        mount = fuse.get(str(cvmfs_root / repo))
        seen = f", a FUSE mount ({mount.fstype} {mount.source})" if mount else ""
        fqrn = f", user.fqrn {fqrns[repo]}" if fqrns.get(repo) else ""
        return f"{cvmfs_root / repo}: {states.get(repo, 'not checked')}{seen}{fqrn}"

    how = (f"checked in a child process (timeout {checks.timeout:g} s)" if checks.look
           else f"nothing mounted at or below {cvmfs_root}: looked in-process")
    how += f"; {cvmfs_root} is autofs" if autofs else ""
    host = Fact(states.get(GWMS_PROBE_REPO) == "present",
                f"{how}: {evidence(GWMS_PROBE_REPO)}")
    present = tuple(r for r in wanted if states.get(r) == "present")
    said = "; ".join(evidence(r) for r in wanted) or "no repositories wanted"
    return host, Fact(present, f"{how}: {said}")


def _dev_fuse(dev_root: Path) -> Fact[bool]:
    path = dev_root / "fuse"
    try:
        st = path.stat()
    except OSError as exc:
        return Fact(False, f"{path}: {exc.strerror}")
    kind = (f"char device {os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
            if stat.S_ISCHR(st.st_mode) else "not a char device")
    desc = f"{path} ({kind}, mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid})"
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return Fact(False, f"cannot open {desc} read-write: {exc.strerror}")
    return Fact(True, f"opened {desc} read-write")


def _fusermount(search_path: str | None) -> Fact[tuple[str, ...]]:
    usable, notes = [], []
    for name in ("fusermount3", "fusermount"):
        found = shutil.which(name, path=search_path)
        if found is None:
            notes.append(f"{name}: not on PATH")
            continue
        st = Path(found).stat()
        setuid = bool(st.st_mode & stat.S_ISUID) and st.st_uid == 0
        if setuid or os.geteuid() == 0:
            usable.append(found)
        notes.append(f"{found}: {'setuid root' if setuid else 'not setuid root'}")
    return Fact(tuple(usable), "; ".join(notes))


def _fuse_group(etc_root: Path) -> Fact[bool | None]:
    for line in (_read(etc_root / "group") or "").splitlines():
        fields = line.split(":")
        if len(fields) == 4 and fields[0] == "fuse" and fields[2].isdigit():
            gid = int(fields[2])
            try:
                user = pwd.getpwuid(os.getuid()).pw_name
            except KeyError:
                user = str(os.getuid())
            member = gid in os.getgroups() or user in fields[3].split(",")
            return Fact(member, f"group fuse (gid {gid}) in {etc_root / 'group'}; "
                                f"{user} is {'' if member else 'not '}a member")
    return Fact(None, f"no group fuse in {etc_root / 'group'}")


def probe_host(*, proc_root: Path = Path("/proc"), sys_root: Path = Path("/sys"),
               etc_root: Path = Path("/etc"), dev_root: Path = Path("/dev"),
               cvmfs_root: Path = Path("/cvmfs"), repos: Sequence[str] = (),
               run_checks: bool = True, timeout: float = 5.0,
               search_path: str | None = None, checks: Checks | None = None) -> HostFacts:
    """Probe the node; this blocks for up to a few times *timeout* seconds.

    Args:
        proc_root, sys_root, etc_root, dev_root: where to read those trees.
        cvmfs_root: where a host CVMFS would be mounted.
        repos: the repositories wanted; each is looked for under *cvmfs_root*.
        run_checks: create a user namespace and mount FUSE in one for real;
            False leaves those facts None (for tests on canned trees).
        timeout: the deadline of each check run in a child process.
        search_path: the PATH to look for fusermount and apptainer in
            (default: the environment's).
        checks: the checks in child processes, started earlier with the
            same *repos*, *cvmfs_root*, *proc_root*, *timeout* and
            *run_checks* (by default they are started here).
    """
    if checks is None:
        checks = Checks(repos=repos, cvmfs_root=cvmfs_root, proc_root=proc_root,
                        timeout=timeout, run_checks=run_checks)
    osrel_path = proc_root / "sys" / "kernel" / "osrelease"
    release = _read(osrel_path)
    os_release = _os_release(etc_root)
    where = f"read {etc_root / 'os-release'}"
    arch_file = _read(proc_root / "sys" / "kernel" / "arch")
    max_ns_path = proc_root / "sys" / "user" / "max_user_namespaces"
    max_ns = _read(max_ns_path)
    skipped: Fact[bool | None] = Fact(None, "not checked (run_checks=False)")
    userns, fuse_ns = skipped, skipped
    try:
        if checks.userns is not None:
            ran = checks.userns.result()
            userns = Fact(ran.status == 0 if ran.status is not None else None,
                          f"ran `unshare -rm true`: {ran.what} "
                          f"{ran.output.strip()[:200]}".rstrip())
        if checks.fuse is not None:
            fuse_ns = _fuse_in_userns(checks.fuse.result())
        host_cvmfs, present = _repos(checks)
    finally:
        checks.cancel()  # only if interrupted: each was waited for above
    masked = [m.mountpoint for m in parse_mountinfo(_read(proc_root / "self" / "mountinfo") or "")
              if m.mountpoint == "/proc/sys" or m.mountpoint.startswith("/proc/driver")]
    runtime = next(filter(None, (shutil.which(n, path=search_path)
                                 for n in ("apptainer", "singularity"))), None)
    return HostFacts(
        kernel_release=Fact(release, f"read {osrel_path}: {release}"),
        os_id=Fact(os_release.get("ID"), f"{where}: ID={os_release.get('ID')}"),
        os_id_like=Fact(tuple(os_release.get("ID_LIKE", "").split()),
                        f"{where}: ID_LIKE={os_release.get('ID_LIKE')}"),
        os_version_id=Fact(os_release.get("VERSION_ID"),
                           f"{where}: VERSION_ID={os_release.get('VERSION_ID')}"),
        arch=Fact(arch_file, f"read {proc_root}/sys/kernel/arch") if arch_file
        else Fact(os.uname().machine, "uname(2)'s machine"),
        max_user_namespaces=Fact(int(max_ns) if max_ns and max_ns.isdigit() else None,
                                 f"read {max_ns_path}: {max_ns}"),
        userns=userns,
        fuse_in_userns=fuse_ns,
        cvmfsexec_userfuse=cvmfsexec_userfuse(release) if release
        else Fact(None, f"no kernel release in {osrel_path}"),
        dev_fuse=_dev_fuse(dev_root),
        fusermount=_fusermount(search_path),
        fuse_group=_fuse_group(etc_root),
        proc_masked=Fact(bool(masked), f"mount points {', '.join(masked)} in mountinfo"
                         if masked else f"no /proc/sys or /proc/driver mount in "
                         f"{proc_root}/self/mountinfo"),
        container_runtime=Fact(runtime, f"found {runtime} on PATH" if runtime
                               else "no apptainer or singularity on PATH"),
        host_cvmfs=host_cvmfs,
        repos_present=present,
        repos_wanted=checks.repos_wanted,
    )
