"""Read and update a GlideinWMS ``glidein_config`` file, and resolve its CVMFS policy.

The file format is GlideinWMS's (``add_config_line.source``): one ``KEY value``
per line, the key up to the first space and the value the rest of the line
*with its spaces kept*; the last occurrence of a key wins.  Reading never fails
on a bad line: the line is reported as a :class:`Problem` and everything else is
read.  Writing follows ``gconfig_add``: log to ``<file>.history``, drop the old
lines of the key, append the new line, rename a temporary file over the original.

Concurrent writers are kept apart by the lock of ``gconfig_add_safe``, so cvmfsd
and glidein scripts can write the same file: ``<file>.lock`` is a symlink (made
atomically, also on NFS) and ``<file>.pid`` names the holder.  A holder whose
process has been gone for ``stale_after`` seconds loses the lock, as in
GlideinWMS.  One addition: a lock with *no* pid file that is older than
``stale_after`` is also broken (GlideinWMS would wait for it until it times out;
such a lock can only come from a writer killed between ``ln -s`` and writing the
pid).  The lock is per process, not per thread.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import stat
import tempfile
import time
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cvmfsd.errors import ConfigError, PolicyError

MAX_LINE_BYTES = 4096  # GlideinWMS's GWSM_CONFIG_LINE_MAX (4k)
KEY_PATTERN = "[A-Za-z_][A-Za-z0-9_]*"
_KEY = re.compile(KEY_PATTERN + r"\Z")


@dataclass(frozen=True)
class Problem:
    """One line of a glidein_config that is malformed.

    Attributes:
        where: the file (or other source) the line came from.
        line: its 1-based line number.
        message: what is wrong and what was expected.
        skipped: True if the line was left out of the values; False if it was
            read anyway (an over-long line is still a valid ``KEY value``).
    """

    where: str
    line: int
    message: str
    skipped: bool

    def __str__(self) -> str:
        outcome = "line ignored" if self.skipped else "line read anyway"
        return f"{self.where}:{self.line}: {self.message} ({outcome})"


@dataclass(frozen=True)
class GlideinConfig:
    """The values of a glidein_config (last occurrence of each key) and its problems."""

    values: Mapping[str, str]
    problems: tuple[Problem, ...] = ()
    path: Path | None = None

    def get(self, key: str, default: str | None = None) -> str | None:
        """Return the value of *key*, or *default* if the file does not set it."""
        return self.values.get(key, default)


def parse_glidein_config(data: bytes, *, where: str) -> GlideinConfig:
    """Parse the bytes of a glidein_config; *where* names the source in problems."""
    values: dict[str, str] = {}
    problems: list[Problem] = []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line starts no new one
    for number, raw in enumerate(lines, start=1):
        if b"\0" in raw:
            problems.append(Problem(where, number, "contains a NUL byte; expected a text "
                                    "line 'KEY value'", skipped=True))
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Problem(where, number, f"is not valid UTF-8 (byte {exc.start}); "
                                    "expected a text line 'KEY value'", skipped=True))
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if not _KEY.match(key):
            shown = key if len(key) <= 40 else key[:37] + "..."
            problems.append(Problem(where, number, f"key {shown!r} is not a valid name; "
                                    f"expected 'KEY value' with KEY {KEY_PATTERN}", skipped=True))
            continue
        if len(raw) > MAX_LINE_BYTES:
            problems.append(Problem(where, number, f"is {len(raw)} bytes, over GlideinWMS's "
                                    f"{MAX_LINE_BYTES}-byte limit", skipped=False))
        values[key] = value
    return GlideinConfig(types.MappingProxyType(values), tuple(problems))


def read_glidein_config(path: Path | str) -> GlideinConfig:
    """Read a glidein_config file as GlideinWMS does (see :func:`parse_glidein_config`).

    Raises:
        ConfigError: the file cannot be read.
    """
    path = Path(path)
    try:
        # Not blocking on a FIFO put in its place: cvmfsd reads it on its event loop.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as file:
            kind = _kind(os.fstat(file.fileno()).st_mode)
            if kind is not None:
                raise ConfigError(f"cannot read glidein_config {path}: it is {kind}; "
                                  "expected a regular file")
            data = file.read()
    except OSError as exc:
        raise ConfigError(f"cannot read glidein_config {path}: {exc.strerror}") from None
    config = parse_glidein_config(data, where=str(path))
    return GlideinConfig(config.values, config.problems, path)


def _kind(mode: int) -> str | None:
    """What a file that is not a regular one is, for a message; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a special file"


def _encode_line(key: str, value: str) -> bytes:
    if not _KEY.match(key):
        raise ConfigError(f"cannot write glidein_config key {key!r}: expected {KEY_PATTERN}")
    bad = next((c for c in ("\n", "\r", "\0") if c in value), None)
    if bad is not None:
        raise ConfigError(
            f"cannot write glidein_config {key}: the value contains {bad!r}; "
            "expected a single line (glidein_config has one 'KEY value' per line)"
        )
    try:
        line = f"{key} {value}".encode()
    except UnicodeEncodeError:
        raise ConfigError(f"cannot write glidein_config {key}: the value is not "
                          "encodable as UTF-8") from None
    if len(line) > MAX_LINE_BYTES:
        raise ConfigError(f"cannot write glidein_config {key}: the line would be {len(line)} "
                          f"bytes, over GlideinWMS's {MAX_LINE_BYTES}-byte limit")
    return line + b"\n"


def render_update(data: bytes, updates: Mapping[str, str]) -> bytes:
    """Return *data* without the lines of the updated keys, plus one new line per key.

    Every other line, malformed ones included, is kept byte for byte.

    Raises:
        ConfigError: a key is not a valid name, or a value is not a single line.
    """
    new = [_encode_line(key, value) for key, value in updates.items()]
    keys = {key.encode() for key in updates}
    # Split on "\n" only, exactly as the reader does, so "key" means the same here.
    chunks = data.split(b"\n")
    tail = chunks.pop()  # what follows the last newline: b"" for a well-ended file
    lines = [chunk + b"\n" for chunk in chunks] + ([tail + b"\n"] if tail else [])
    kept = [raw for raw in lines if raw[:-1].partition(b" ")[0] not in keys]
    return b"".join(kept + new)


def update_glidein_config(path: Path | str, updates: Mapping[str, str], *,
                          lock_timeout: float = 300.0, stale_after: float = 60.0) -> None:
    """Set *updates* in the glidein_config at *path*, atomically and under its lock.

    This blocks (on the lock, and on the file system): call it from a worker
    thread in async code.

    Args:
        path: the glidein_config; it must exist (GlideinWMS creates it).
        updates: the keys to set and their single-line values.
        lock_timeout: how long to wait for another writer (GlideinWMS: 300 s).
        stale_after: how long a dead holder keeps the lock (GlideinWMS: 60 s).

    Raises:
        ConfigError: bad key or value, the lock cannot be had, or the file
            cannot be read or written.
    """
    path = Path(path)
    for key, value in updates.items():
        _encode_line(key, value)  # reject bad input before touching anything
    if not path.is_file():
        raise ConfigError(f"cannot update glidein_config {path}: no such file",
                          hint="glidein_startup.sh creates it; check the path")
    with _symlink_lock(path, timeout=lock_timeout, stale_after=stale_after):
        try:
            mode = path.stat().st_mode & 0o7777
            data = path.read_bytes()
            _append_history(path.with_name(path.name + ".history"),
                            b"".join(f"CVMFSD{os.getpid()} ".encode() + _encode_line(k, v)
                                     for k, v in updates.items()))
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(render_update(data, updates))
                    os.fchmod(out.fileno(), mode)
                    out.flush()
                    os.fsync(out.fileno())
                Path(tmp).replace(path)
            except BaseException:
                with contextlib.suppress(OSError):
                    Path(tmp).unlink()
                raise
        except OSError as exc:
            raise ConfigError(f"cannot update glidein_config {path}: "
                              f"{exc.strerror} ({exc.filename})") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it just is not ours
    return True


#: How companion files (``.pid``, ``.history``) are opened: never through a symlink,
#: never blocking on a FIFO someone put there.
_COMPANION = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _own_regular_file(fd: int) -> bool:
    """Whether ``fd`` is a regular file of ours with one name (not another's choosing)."""
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_nlink == 1


def _append_history(history: Path, data: bytes) -> None:
    """Append to ``<gc>.history``: created exclusively, or ours already; never a symlink.

    In a shared (sticky) directory another user may have put a symlink, a
    FIFO or a file of theirs there: then the history is not written (issue 12),
    and the update goes on.
    """
    flags = os.O_WRONLY | os.O_APPEND | _COMPANION
    try:
        fd = os.open(history, flags | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            fd = os.open(history, flags)
        except OSError:
            return  # a symlink (ELOOP), a FIFO without reader (ENXIO), not writable
    try:
        if _own_regular_file(fd):
            os.write(fd, data)
    finally:
        os.close(fd)


def _read_pid(pidfile: Path) -> int | None:
    try:
        fd = os.open(pidfile, os.O_RDONLY | _COMPANION)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return int(os.read(fd, 64).strip())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _write_pid(pidfile: Path) -> None:
    """Name ourselves the holder in ``<gc>.pid``, created exclusively, never through a symlink.

    What is there already (a leftover, or another user's plant) is removed
    first if we may; if it stays, the lock goes without a pid file (others
    then treat it as a lock of an unknown writer).
    """
    for _ in range(2):
        try:
            fd = os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _COMPANION, 0o644)
        except FileExistsError:
            try:
                pidfile.unlink()
            except OSError:
                return
            continue
        except OSError:
            return
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        return


def _break_lock(lock: Path, pidfile: Path) -> bool:
    """Remove the lock (and the pid file); whether the lock is gone.

    The rename is what makes breaking atomic: of two breakers only one wins it.
    Nothing here raises: a name another user planted in a sticky directory
    cannot be renamed or removed, which must not crash a writer that holds
    the lock (it would be left stale).
    """
    with contextlib.suppress(OSError):
        pidfile.unlink()
    gone = lock.with_name(lock.name[: -len(".lock")] + ".deleteme")
    try:
        lock.rename(gone)
    except FileNotFoundError:
        return True
    except OSError:  # e.g. someone else's .deleteme in a sticky directory
        try:
            lock.unlink()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True
    with contextlib.suppress(OSError):
        gone.unlink()
    return True


@contextlib.contextmanager
def _symlink_lock(path: Path, *, timeout: float, stale_after: float,
                  poll: float = 0.05) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    pidfile = path.with_name(path.name + ".pid")
    deadline = time.monotonic() + timeout
    dead: tuple[int | None, float] | None = None  # (holder, when first seen gone)
    while True:
        try:
            lock.symlink_to(path.name)  # relative: resolves to the file itself
            break
        except FileExistsError:
            pass
        now = time.monotonic()
        holder = _read_pid(pidfile)
        if holder is None:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.lstat(lock).st_mtime > stale_after and _break_lock(
                        lock, pidfile):
                    continue
        elif holder == os.getpid() or not _pid_alive(holder):
            # Not us holding it: this lock is not reentrant, so our pid is a leftover.
            if dead is None or dead[0] != holder:
                dead = (holder, now)
            elif now - dead[1] >= stale_after and _break_lock(lock, pidfile):
                continue
        if now >= deadline:
            raise ConfigError(
                f"cannot lock glidein_config {path}: {lock} held by "
                f"{'pid ' + str(holder) if holder else 'an unknown writer'} for over {timeout:g} s",
                hint=f"if no glidein script is running, remove {lock} and {pidfile}",
            )
        time.sleep(poll)
    try:
        _write_pid(pidfile)
        yield
    finally:
        _break_lock(lock, pidfile)


class Policy(enum.Enum):
    """How much the glidein wants CVMFS (GlideinWMS's GLIDEIN_CVMFS values)."""

    REQUIRED = "required"  # no CVMFS fails the glidein
    PREFERRED = "preferred"  # try; continue without CVMFS on failure
    OPTIONAL = "optional"  # like PREFERRED (GlideinWMS documents them alike)
    NEVER = "never"  # do not mount


@dataclass(frozen=True)
class PolicyDecision:
    """The resolved policy and which attributes decided it.

    Attributes:
        policy: the policy to follow.
        use_cvmfs: whether to try to provide CVMFS at all (False only for NEVER).
        source: a sentence naming the attributes and values that decided.
    """

    policy: Policy
    use_cvmfs: bool
    source: str

    def __post_init__(self) -> None:
        if self.use_cvmfs != (self.policy is not Policy.NEVER):
            raise ValueError(f"use_cvmfs={self.use_cvmfs} contradicts policy {self.policy.name}")

    @property
    def failure_is_fatal(self) -> bool:
        """Whether failing to provide CVMFS must fail the glidein (REQUIRED only)."""
        return self.policy is Policy.REQUIRED


def _decide(policy: Policy, source: str) -> PolicyDecision:
    return PolicyDecision(policy, policy is not Policy.NEVER, source)


def _policy_value(key: str, raw: str, accepted: tuple[Policy, ...]) -> Policy | None:
    """The policy *raw* names (any case), None if empty; PolicyError if it names none."""
    if not raw:
        return None
    for policy in accepted:
        if raw.lower() == policy.value:
            return policy
    names = "|".join(p.value for p in accepted)
    raise PolicyError(f"glidein_config {key}={raw!r} is not valid; expected one of {names} "
                      "(any case), or empty", hint="fix the attribute in the Factory entry")


def _is_one(text: str) -> bool:
    """Whether GlideinWMS's ``[[ $x -ne 1 ]]`` would count *text* as 1 (an integer 1)."""
    try:
        return int(text) == 1
    except ValueError:
        return False  # bash arithmetic reads a word as an unset variable: 0


def resolve_policy(values: Mapping[str, str]) -> PolicyDecision:
    """Resolve the CVMFS policy from glidein_config *values*, as GlideinWMS reads them.

    Theory of operation.  Three attributes decide, read in this order:

    1. ``GLIDEIN_USE_CVMFSEXEC`` is *GlideinWMS's own* switch: 1 runs its
       cvmfs_setup.sh (cgWParamDict.py:253 lists it in every glidein), which
       mounts in mode 1 into the same ``CVMFSEXEC_DIR/.cvmfsexec`` and
       unmounts it at exit (cvmfs_umount.sh).  cvmfsd never needs it, and when
       it is 1 cvmfsd stands aside (NEVER): two provisioners of one
       distribution would unmount each other's repositories.
    2. ``GLIDEIN_USE_CVMFS`` (Frontend, 0|1) and ``GLIDEIN_CVMFS_REQUIRE``
       (Factory, required|preferred|never, any case), as PR #631's
       cvmfs_setup_ff.sh reads them: an empty USE skips (NEVER, whatever
       REQUIRE says); USE=1 with never skips (NEVER); USE=1 otherwise is
       REQUIRED (the VO mandates CVMFS); USE=0 follows REQUIRE when it is
       required or preferred, and skips otherwise.  Two deviations, both
       lenient: an empty REQUIRE is accepted (#631 rejects it) and
       ``optional`` is read as released GlideinWMS documents it (preferred).
    3. Without either of those, ``GLIDEIN_CVMFS`` (required|preferred|optional|
       never) of released GlideinWMS decides; GlideinWMS itself reads it only
       when GLIDEIN_USE_CVMFSEXEC=1, so cvmfsd can use it without that switch.
       With no attribute at all the policy is PREFERRED: cvmfsd was started
       on purpose, so it tries, but never fails a glidein that did not ask.
       (The glidein set-up script, cvmfsd_setup.sh, does not start cvmfsd at
       all in that case: in a glidein, nothing set means not requested.)

    Raises:
        PolicyError: an attribute that decides has an invalid value.
    """
    def get(key: str) -> str:
        return values.get(key, "").strip()

    gwms_own = get("GLIDEIN_USE_CVMFSEXEC")
    if _is_one(gwms_own):
        return _decide(Policy.NEVER, f"GLIDEIN_USE_CVMFSEXEC={gwms_own}: GlideinWMS's own "
                       "cvmfs_setup.sh provides CVMFS in this glidein; cvmfsd stands aside")
    use, require = get("GLIDEIN_USE_CVMFS"), get("GLIDEIN_CVMFS_REQUIRE")
    if use or require:
        return _resolve_use(use, require)
    old = _policy_value("GLIDEIN_CVMFS", get("GLIDEIN_CVMFS"), tuple(Policy))
    if old is not None:
        return _decide(old, f"GLIDEIN_CVMFS={get('GLIDEIN_CVMFS')}: GLIDEIN_CVMFS decides "
                       f"({old.value})")
    return _decide(Policy.PREFERRED, "no CVMFS policy attribute set: cvmfsd was started "
                   "explicitly, so it tries and continues without CVMFS (preferred)")


def _resolve_use(use: str, require: str) -> PolicyDecision:
    if use not in ("", "0", "1"):
        raise PolicyError(f"glidein_config GLIDEIN_USE_CVMFS={use!r} is not valid; expected 0 "
                          "or 1, or empty", hint="fix the attribute in the Frontend group")
    said = f"GLIDEIN_USE_CVMFS={use or '(unset)'}, GLIDEIN_CVMFS_REQUIRE={require or '(unset)'}"
    if not use:  # #631 skips before it looks at REQUIRE
        return _decide(Policy.NEVER, f"{said}: CVMFS not requested by the Frontend (skipped)")
    policy = _policy_value("GLIDEIN_CVMFS_REQUIRE", require, tuple(Policy))
    if policy is Policy.NEVER:
        return _decide(Policy.NEVER, f"{said}: the Factory forbids CVMFS here (skipped)")
    if use == "1":
        return _decide(Policy.REQUIRED, f"{said}: the VO mandates CVMFS (required)")
    if policy is None:
        return _decide(Policy.NEVER, f"{said}: not requested (skipped)")
    return _decide(policy, f"{said}: the Factory's policy decides ({policy.value})")


#: The job-wrapper fragment that takes jobs into the mode-3 namespace.
JOB_WRAPPER = "cvmfsd_job_wrapper.sh"


def job_wrapper_listed(values: Mapping[str, str], name: str = JOB_WRAPPER) -> bool | None:
    """Whether the jobs of this glidein will run the job-wrapper fragment *name*.

    ``WRAPPER_LIST`` in glidein_config names a file (glidein_startup.sh:1847,
    1903) to which every fetched file of type ``wrapper`` is appended, as its
    full path, when it is fetched (:1256-1257); condor_startup.sh concatenates
    them into the job wrapper (:142-163).  A fragment fetched after this call
    is not seen: list it before cvmfsd_setup.sh.

    Returns:
        None without ``WRAPPER_LIST`` (not a GlideinWMS glidein: cvmfsd's
        payload is what uses CVMFS); otherwise whether a line of the file
        names *name*.  An unreadable file counts as not listed.
    """
    listing = values.get("WRAPPER_LIST", "").strip()
    if not listing:
        return None
    try:
        lines = Path(listing).read_text(errors="replace").splitlines()
    except OSError:
        return False
    return any(line.strip().rsplit("/", 1)[-1] == name for line in lines)


def failure_updates(message: str, hint: str | None, *, category: str = "WN_Resource",
                    limit: int = 1000) -> dict[str, str]:
    """The glidein_config lines that say cvmfsd failed and why (single lines, bounded).

    ``category`` is error_gen's failure category (``WN_Resource``, ``Config``).
    """
    def line(text: str) -> str:
        flat = " ".join(text.split())
        return flat if len(flat) <= limit else flat[: limit - 3] + "..."

    return {"CVMFSD_STATUS": "failed", "GWMS_IS_CVMFS": "no", "CVMFSD_ERROR": line(message),
            "CVMFSD_HINT": line(hint or ""), "CVMFSD_FAILURE": category}


def record_failure(path: Path | str, message: str, hint: str | None, *, category: str,
                   pid: int, lock_timeout: float = 10.0) -> bool:
    """Record in glidein_config that the cvmfsd with *pid* failed, and why.

    A glidein_config that names another cvmfsd which still runs is left alone
    (two runs on one glidein_config: the live one's status stands).  Returns
    whether it was written; a file that cannot be read or written is not an
    error here (the failure itself is what the caller reports).
    """
    try:
        owner = read_glidein_config(path).values.get("CVMFSD_PID", "")
        if owner.isdigit() and int(owner) != pid and _pid_alive(int(owner)):
            return False
        update_glidein_config(path, {"CVMFSD_PID": str(pid), **failure_updates(
            message, hint, category=category)}, lock_timeout=lock_timeout)
    except ConfigError:
        return False
    return True
