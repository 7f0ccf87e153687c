"""The janitor: a small process that cleans up CVMFS if cvmfsd dies without doing it.

cvmfsd starts it once per run with :func:`spawn_janitor`, as ``python -m
cvmfsd.janitor --parent PID [--dist DIR] [--config-repo NAME] [--log FILE]
[--lock-fd N] [--payload-tmp DIR]``, and keeps the returned :class:`Janitor` to
tell it namespace PID 1 (mode 3), the processes of its tree, and, on a clean
exit, that there is nothing to do.  Without ``--dist`` (the host's /cvmfs, or
none) it guards the payload alone.

Theory of operation:

* **Knowing that cvmfsd died.**  The janitor's stdin is the read end of a pipe
  whose only write end is in cvmfsd, close-on-exec so that no child inherits it.
  However cvmfsd ends, SIGKILL included, the kernel closes that end and the
  janitor reads EOF.  A ``done`` line before EOF means cvmfsd cleaned up itself,
  and the janitor exits doing nothing; EOF without ``done`` means clean up.
  PR_SET_PDEATHSIG is a second trigger, but it fires when the parent *thread*
  exits (prctl(2)), and cvmfsd has worker threads, so the handler acts only if
  getppid() is no longer cvmfsd.
* **Outliving the pilot's signals.**  HUP, INT, QUIT and TERM are ignored: a
  Ctrl-C or a batch system's SIGTERM to the process group lets cvmfsd shut down
  in order, and if cvmfsd dies of it instead, the janitor is still there.
  :func:`spawn_janitor` blocks those signals before the fork, so there is no
  window while the interpreter starts; the janitor ignores and then unblocks them.
* **Holding the distribution.**  ``--lock-fd`` is cvmfsd's descriptor of
  ``<dist>/.cvmfsd.lock`` (:func:`cvmfsd.leftovers.lock_dist`), passed on
  explicitly: the flock(2) belongs to the open file, so it stays taken while
  either process holds it.  A SIGKILLed cvmfsd thus leaves the distribution
  locked until the janitor has cleaned it, and a new cvmfsd never cleans or
  mounts alongside it.  The janitor makes the descriptor close-on-exec at once
  (an ``umount`` stuck in FUSE must not keep the lock) and closes it once its
  clean-up is finished.
* **Knowing the payload.**  In mode 3, namespace PID 1 takes everything in the
  namespace with it.  Elsewhere (modes 1 and 2, the host's /cvmfs, none) the
  payload is known two ways.  By a marker: cvmfsd gives the payload, and no
  one else, ``TMPDIR=<--payload-tmp>``, which its children inherit
  (:func:`find_payload`).  And by what cvmfsd sees: cvmfsd tells the janitor
  the processes of its tree (``tree PID START ...`` lines, batched, see
  :mod:`cvmfsd.procevents`), and at clean-up those still alive and all their
  descendants belong (:func:`find_tree`); so does a process that left the
  payload's session and changed its TMPDIR.  With the netlink source every
  fork in the tree is told within ``TELL_INTERVAL``; with the pidfd source
  (EL9's kernel for an unprivileged pilot) cvmfsd looks at its tree on each
  SIGCHLD and every ``LOOK_INTERVAL`` (1 s).  What escapes: a process that
  changed its TMPDIR, left the payload's session, was not yet told of when
  cvmfsd died, and whose told ancestors had all ended by then (its parent
  gone, it became cvmfsd's orphan, then init's).  With pidfd that is a
  process forked less than ``LOOK_INTERVAL`` before the kill; with netlink,
  less than ``TELL_INTERVAL`` (or, in a fork storm, more than ``TELL_MAX``
  per ``TELL_INTERVAL`` behind).
* **Cleaning.**  (1) SIGKILL namespace PID 1 (mode 3; it ignores the catchable
  signals), which makes the kernel kill every process of its pid namespace, and
  so every cvmfs2 there and their mounts.  (2) SIGKILL the payload, all of
  it at once (:func:`end_payload`: stopped first, then killed; no SIGTERM and
  grace): it has lost its supervisor and, in modes 1 and 2, is about to lose
  /cvmfs; in mode 3 the kernel has just killed it as abruptly; and while it
  runs, its open files keep the mounts busy and the lock taken.  (3) Unmount every mount below the
  distribution's ``dist/cvmfs`` in the janitor's mount namespace (modes 1 and 2),
  newest first and the configuration repository last, with ``umount`` as root
  and ``fusermount -u`` otherwise.  (4) End the cvmfs2 processes of this
  distribution that remain: time to exit on their own, SIGTERM, SIGKILL.
  (5) Lazily unmount what is still mounted, but only where no cvmfs2 serves it
  any more (cvmfs PR #1281: a lazily unmounted repository whose cvmfs2 lives on
  keeps its lock, and the next mount of it hangs).  The payload's TMPDIR
  (``--payload-tmp``) is removed between (3) and (4).  (6) Release the lock
  and exit.
  Around it: cvmfsd's control socket is removed first (a client gets "no such
  file" at once, not a refused connection from a path that looks alive), and
  glidein_config, if cvmfsd named one that still names it, is marked last:
  ``CVMFSD_STATUS failed``, ``GWMS_IS_CVMFS no`` and the reason, for the
  glidein's cleanup script and the job-wrapper fragment (:func:`report_death`).
* **Never a stranger.**  A process is named by its pid *and* its start time
  (field 22 of ``/proc/<pid>/stat``).  Before each signal the janitor opens a
  pidfd, checks the start time and what the process is (namespace PID 1, a
  cvmfs2 naming this distribution's mount directory, a process found to
  carry the payload's TMPDIR, which no other process has, or one cvmfsd told
  of, or a descendant of one, never the janitor), then signals
  through the pidfd, so a reused pid cannot be hit.  Mounts outside
  ``dist/cvmfs`` are never touched; no process group is signalled by number.
* **Light.**  It starts on every run, so it imports only os, select, signal,
  sys, time, cvmfsd._prctl, cvmfsd.errors and cvmfsd.mountinfo (cvmfsd.glidein only to
  report a death), and parses /proc by hand (no pathlib,
  argparse or subprocess: hence the plain ``os`` calls; shutil only to remove
  the payload's TMPDIR).  It holds no descriptor of cvmfsd's but the pipe and
  the lock: stdout and stderr are /dev/null, and the log file is opened only to
  report a clean-up.
"""

# The janitor starts on every run: plain os calls, no pathlib import.
# ruff: noqa: PTH100, PTH103, PTH108, PTH112, PTH117, PTH118, PTH119, PTH120

from __future__ import annotations

import os
import select
import signal
import stat
import sys
import time

from cvmfsd.errors import CvmfsdError
from cvmfsd.mountinfo import is_fuse, parse_mountinfo

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (3 ms)
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Iterable, Sequence
    from pathlib import Path

#: What the janitor ignores: the signals a pilot sends to its process group.
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)
#: PR_SET_PDEATHSIG's signal; its handler checks that cvmfsd is really gone.
PDEATH_SIGNAL = signal.SIGUSR1
UNMOUNT_TIMEOUT = 2.0  # per umount/fusermount run: a hung daemon may stall it
BUSY_RETRIES, BUSY_PAUSE = 10, 0.02  # a busy mount is tried again for up to ~0.2 s (+ runs)
EXIT_GRACE = 1.0  # for a cvmfs2 to exit by itself once its mount is gone
TERM_GRACE = 1.0  # between SIGTERM and SIGKILL
PAYLOAD_WAIT = 1.0  # for the SIGKILLed payload to be gone (one stuck in FUSE may not be)
TREE_PRUNE_AT = 4096  # processes of cvmfsd's tree held before the ended ones are dropped
TREE_LINE = 128  # processes per ``tree`` line: at most ~30 bytes each, in one page
PIPE_PAGE = select.PIPE_BUF  # a ``tree`` line, padded: written whole, in one pipe page
F_GETPIPE_SZ = 1032  # fcntl.F_GETPIPE_SZ (Python >= 3.10; linux/fcntl.h)
#: How cvmfsd names the payload's TMPDIR (tempfile.mkdtemp's prefix).
PAYLOAD_TMP_PREFIX = "cvmfsd-payload-"
_POLL = 0.005
_DEFAULT_PATH = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")
_SIM_CVMFS2 = "cvmfsd.sim.cvmfs2"

#: A process as the janitor names it: (pid, start time in clock ticks).
Ident = tuple[int, int]
#: A cvmfs2 process of the distribution: (pid, start time, mount point it serves).
Cvmfs2 = tuple[int, int, str]


class JanitorError(CvmfsdError):
    """The janitor cannot be started or told something: cvmfsd is unguarded."""


# --- /proc, by hand ------------------------------------------------------------


def read_proc_file(path: str) -> bytes | None:
    """A /proc file, whole, with plain os calls (a third of pathlib's cost, which a look
    at a tree of 200 processes notices); None if it cannot be read (the process is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _stat(pid: int, proc_root: str) -> tuple[int, int, int] | None:
    """``pid``'s (start time, process group, session), or None if it is gone or a zombie."""
    stat = read_proc_file(f"{proc_root}/{pid}/stat")
    if stat is None:
        return None
    # comm, in parentheses, may hold anything: the fields follow the last ')'.
    fields = stat.rpartition(b")")[2].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19]), int(fields[2]), int(fields[3])


def process_start(pid: int, proc_root: str = "/proc") -> int | None:
    """``pid``'s start time (clock ticks after boot), or None if it is gone or a zombie."""
    stat = _stat(pid, proc_root)
    return None if stat is None else stat[0]


def _status(pid: int, proc_root: str) -> dict[str, str]:
    text = read_proc_file(f"{proc_root}/{pid}/status")
    if text is None:
        return {}
    lines = text.decode(errors="replace").splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _real_uid(status: dict[str, str]) -> int | None:
    uids = status.get("Uid", "").split()
    return int(uids[0]) if uids else None


def is_namespace_init(pid: int, proc_root: str = "/proc") -> bool:
    """Whether ``pid`` is PID 1 of a pid namespace below ours and runs as our uid."""
    status = _status(pid, proc_root)
    nspid = status.get("NSpid", "").split()
    return len(nspid) > 1 and nspid[-1] == "1" and _real_uid(status) == os.getuid()


def mount_dirs(root: str) -> tuple[str, ...]:
    """The spellings of a distribution's ``dist/cvmfs``: as given (absolute) and resolved.

    mountrepo names mount points through ``pwd`` (symlinks kept); the kernel's
    mount table has them resolved.
    """
    given = os.path.join(os.path.abspath(root), "dist", "cvmfs")
    return tuple(dict.fromkeys((given, os.path.realpath(given))))


def cvmfs2_mountpoint(argv: Sequence[str], dirs: Sequence[str],
                      exe: str | None = None) -> str | None:
    """The mount point a cvmfs2 command line serves, if it is one below ``dirs``.

    cvmfs2 is ``cvmfs2 [options] <repo> <mount point>``, the mount point
    ``dist/cvmfs/<repo>`` (mountrepo); its watchdog child has the same command
    line.  Either argv[0] is named cvmfs2 and its executable (``exe``, from
    ``/proc/<pid>/exe``, when known) is that distribution's ``usr/bin/cvmfs2``,
    or it is the simulated one, ``python -m cvmfsd.sim.cvmfs2`` run by a
    Python.  A same-uid process whose arguments merely mention
    ``cvmfsd.sim.cvmfs2`` and a mount point is not cvmfs2 (issue 12).
    """
    if len(argv) < 3:
        return None
    mountpoint = os.path.normpath(argv[-1])
    parent = os.path.dirname(mountpoint)
    if parent not in dirs or argv[-2] != os.path.basename(mountpoint):
        return None
    if os.path.basename(argv[0]) == "cvmfs2":
        binary = os.path.join(os.path.dirname(parent), "usr", "bin", "cvmfs2")
        if exe is not None and os.path.realpath(exe) != os.path.realpath(binary):
            return None
    elif list(argv[1:3]) == ["-m", _SIM_CVMFS2]:
        python = os.path.basename(exe if exe is not None else argv[0])
        if not python.startswith("python"):
            return None
    else:
        return None
    return mountpoint


def _is_cvmfs2(argv: Sequence[str], dirs: Sequence[str], exe: str | None) -> bool:
    """Whether a command line is a cvmfs2 of the distribution whose ``dist/cvmfs`` is
    in ``dirs``: the one serving a mount (:func:`cvmfs2_mountpoint`) or a helper it
    started (``cvmfs2 __cachemgr__ ...``), by the same tests of the executable."""
    if cvmfs2_mountpoint(argv, dirs, exe or "?") is not None:
        return True
    if len(argv) > 1 and os.path.basename(argv[0]) == "cvmfs2" and exe is not None:
        binaries = {os.path.realpath(os.path.join(os.path.dirname(d), "usr", "bin", "cvmfs2"))
                    for d in dirs}
        return os.path.realpath(exe) in binaries
    return (list(argv[1:3]) == ["-m", _SIM_CVMFS2]
            and os.path.basename(exe or "?").startswith("python"))


def is_cvmfs2_process(pid: int, dirs: Sequence[str], proc_root: str = "/proc") -> bool:
    """Whether ``pid`` is a cvmfs2 of the distribution whose ``dist/cvmfs`` is in ``dirs``,
    or a helper it started (:func:`_is_cvmfs2`)."""
    return _is_cvmfs2(_cmdline(pid, proc_root), dirs, _exe(pid, proc_root))


def _exe(pid: int, proc_root: str) -> str | None:
    """What ``/proc/<pid>/exe`` points to (None if unreadable)."""
    try:
        return os.readlink(f"{proc_root}/{pid}/exe")  # noqa: PTH115 - the janitor keeps to os
    except OSError:
        return None


def _cmdline(pid: int, proc_root: str) -> list[str]:
    raw = read_proc_file(f"{proc_root}/{pid}/cmdline") or b""
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]


def find_cvmfs2(dirs: Sequence[str], proc_root: str = "/proc",
                uid: int | None = None) -> list[Cvmfs2]:
    """The live cvmfs2 processes of ``uid`` (ours by default) serving a mount below ``dirs``."""
    uid = os.getuid() if uid is None else uid
    found = []
    try:
        entries = [e.name for e in os.scandir(proc_root) if e.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        pid = int(name)
        argv = _cmdline(pid, proc_root)
        if cvmfs2_mountpoint(argv, dirs) is None or _real_uid(_status(pid, proc_root)) != uid:
            continue
        mountpoint = cvmfs2_mountpoint(argv, dirs, _exe(pid, proc_root) or "?")
        if mountpoint is None:
            continue
        start = process_start(pid, proc_root)
        if start is not None:
            found.append((pid, start, mountpoint))
    return found


def dist_mounts(mountinfo: str, dirs: Sequence[str], config_repo: str | None = None) -> list[str]:
    """The FUSE mount points strictly below ``dirs``, in unmount order.

    Newest first (mountinfo lists mounts in the order they were made) and the
    configuration repository last, since the others' configuration comes from it.
    Only FUSE mounts are ours to unmount (:func:`cvmfsd.mountinfo.is_fuse`);
    their source says nothing (``/dev/fuse`` from cvmfsexec).
    """
    found: list[str] = []
    for m in parse_mountinfo(mountinfo):
        point = m.mountpoint
        if (is_fuse(m.fstype) and any(point.startswith(d + "/") for d in dirs)
                and point not in found):
            found.append(point)
    found.reverse()
    if config_repo:
        found.sort(key=lambda point: os.path.basename(point) == config_repo)
    return found


def read_mountinfo(proc_root: str = "/proc") -> str:
    """This process's mount table (reading it never touches a FUSE file system)."""
    return (read_proc_file(f"{proc_root}/self/mountinfo") or b"").decode(errors="surrogateescape")


# --- signals and unmounts --------------------------------------------------------


def signal_process(ident: Ident, sig: int, still_ours: Callable[[int], bool],
                   proc_root: str = "/proc") -> bool:
    """Send ``sig`` to ``ident`` if it is still the same process and ``still_ours(pid)``.

    A pidfd is opened first and the checks are made through /proc after it:
    if they pass, the pidfd refers to that very process, so a pid reused
    meanwhile cannot receive the signal.  Kernels without pidfds (< 5.3) fall
    back to kill(2) right after the checks.

    Returns:
        Whether the signal was sent.
    """
    pid, start = ident
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (OSError, AttributeError):
        pidfd = None
    try:
        if process_start(pid, proc_root) != start or not still_ours(pid):
            return False
        if pidfd is None:
            os.kill(pid, sig)
        else:
            signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return True


def wait_gone(idents: Iterable[Ident], timeout: float, proc_root: str = "/proc") -> list[Ident]:
    """Wait up to ``timeout`` s for the processes to end; return those still alive."""
    alive = list(idents)
    deadline = time.monotonic() + timeout
    while True:
        alive = [i for i in alive if process_start(i[0], proc_root) == i[1]]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(_POLL)


def _holds_dev_fuse(pid: int, proc_root: str) -> bool:
    """Whether ``pid`` has /dev/fuse open: a FUSE daemon, not its watchdog."""
    try:
        entries = list(os.scandir(f"{proc_root}/{pid}/fd"))
    except OSError:
        return False
    for entry in entries:
        try:
            if os.readlink(entry.path) == "/dev/fuse":  # noqa: PTH115 - the janitor keeps to os
                return True
        except OSError:
            continue
    return False


def stop_cvmfs2(procs: Sequence[Cvmfs2], dirs: Sequence[str], *, exit_grace: float,
                term_grace: float, proc_root: str = "/proc",
                on_signal: Callable[[Cvmfs2, signal.Signals], None] = lambda p, s: None,
                ) -> list[Cvmfs2]:
    """End cvmfs2 processes: ``exit_grace`` s to exit alone, SIGTERM, ``term_grace`` s, SIGKILL.

    Before each signal the process must still be the same and still be a cvmfs2
    serving the same mount point below ``dirs``.

    Returns:
        The processes still alive after the SIGKILL (normally none).
    """
    by_ident = {(pid, start): point for pid, start, point in procs}

    def still_cvmfs2(pid: int) -> bool:
        start = process_start(pid, proc_root)
        point = None if start is None else by_ident.get((pid, start))
        return point is not None and cvmfs2_mountpoint(_cmdline(pid, proc_root), dirs) == point

    alive = wait_gone(by_ident, exit_grace, proc_root)
    for sig, grace in ((signal.SIGTERM, term_grace), (signal.SIGKILL, term_grace)):
        if not alive:
            break
        targets = alive
        if sig is signal.SIGTERM:
            # The daemons first (they hold /dev/fuse), not their watchdogs, which have
            # the same command line: a watchdog that gets SIGTERM makes its cvmfs2
            # abort (cvmfs monitor.cc), turning a clean end into an ENOTCONN mount;
            # a watchdog leaves by itself once its cvmfs2 is gone.
            targets = [i for i in alive if _holds_dev_fuse(i[0], proc_root)] or alive
        for ident in targets:
            if signal_process(ident, sig, still_cvmfs2, proc_root):
                on_signal((*ident, by_ident[ident]), sig)
        alive = wait_gone(alive, grace, proc_root)
    return [(pid, start, by_ident[(pid, start)]) for pid, start in alive]


def _payload_marker(tmp: str) -> bytes:
    return b"TMPDIR=" + os.fsencode(tmp)


def _marked(pid: int, marker: bytes, proc_root: str) -> bool:
    environ = read_proc_file(f"{proc_root}/{pid}/environ")
    return environ is not None and marker in environ.split(b"\0")


def find_payload(tmp: str, proc_root: str = "/proc", uid: int | None = None) -> list[Ident]:
    """The live processes of ``uid`` (ours by default) that belong to the payload.

    cvmfsd gives the payload, and no one else, ``TMPDIR=tmp`` (a directory that
    mkdtemp made for this run), and its children inherit it: a process belongs
    if its environment (as of its last execve) holds that entry, or if it is in
    a session led by such a process (cvmfsd starts the payload in a session of
    its own; this also reaches what the payload ran with another TMPDIR).  The
    janitor, and its session (the pilot's), never belong.
    """
    uid = os.getuid() if uid is None else uid
    marker, me, my_session = _payload_marker(tmp), os.getpid(), os.getsid(0)
    try:
        pids = [int(e.name) for e in os.scandir(proc_root) if e.name.isdigit()]
    except OSError:
        return []
    found: dict[int, tuple[int, int, bool]] = {}  # pid: (start, session, marked)
    for pid in pids:
        stat = _stat(pid, proc_root) if pid != me else None
        if stat is None or _real_uid(_status(pid, proc_root)) != uid:
            continue
        found[pid] = (stat[0], stat[2], _marked(pid, marker, proc_root))
    leaders = {pid for pid, (_, sid, marked) in found.items()
               if marked and sid == pid and sid != my_session}
    return [(pid, start) for pid, (start, sid, marked) in found.items()
            if marked or sid in leaders]


def children(pid: int, proc_root: str = "/proc") -> list[int]:
    """The children of ``pid`` (of all its threads)."""
    try:
        tasks = [e.name for e in os.scandir(f"{proc_root}/{pid}/task")]
    except OSError:
        return []
    return [int(c) for t in tasks
            for c in (read_proc_file(f"{proc_root}/{pid}/task/{t}/children") or b"").split()]


def find_tree(tree: Iterable[Ident], dirs: Sequence[str] = (), proc_root: str = "/proc",
              uid: int | None = None) -> list[Ident]:
    """The processes cvmfsd told of (:class:`_Commands` ``tree``) still alive, and their
    descendants now; never the janitor, nor a cvmfs2 of the distribution below
    ``dirs`` (a mount's is ended after its unmount, step (4); a cache manager
    leaves with its cvmfs2), nor another uid's process."""
    uid = os.getuid() if uid is None else uid
    me = os.getpid()
    found: dict[int, int] = {}
    queue = list(tree)  # (pid, start), or (pid, -1) for a child found now
    while queue:
        pid, start = queue.pop()
        now = process_start(pid, proc_root)
        if pid in found or pid == me or now is None or start not in (now, -1):
            continue
        if _real_uid(_status(pid, proc_root)) != uid or (
                dirs and _is_cvmfs2(_cmdline(pid, proc_root), dirs, _exe(pid, proc_root))):
            continue
        found[pid] = now
        queue += [(child, -1) for child in children(pid, proc_root)]
    return list(found.items())


def end_payload(tmp: str | None, *, tree: Iterable[Ident] = (), dirs: Sequence[str] = (),
                timeout: float = PAYLOAD_WAIT, proc_root: str = "/proc",
                log: Callable[[str], None] = lambda _: None) -> list[Ident]:
    """SIGKILL the payload and wait up to ``timeout`` s for it to go.

    The payload is what carries its TMPDIR (:func:`find_payload`), and what
    cvmfsd told of and its descendants (:func:`find_tree`), which also reaches
    a process that left the payload's session and changed its TMPDIR.  First
    each is stopped (SIGSTOP) and the tree looked at again, until a look finds
    nothing new: a stopped process forks no more, so its children are all
    found before the SIGKILLs, which would make them orphans of another
    parent.  Each process is signalled through a pidfd once its start time is
    checked again (it belonged when found: whatever it does since, it stays
    the payload's); what it forked meanwhile is found on the next look.

    Returns:
        The processes still alive (stuck in a hung FUSE mount, say).
    """
    known = list(tree)

    def find() -> list[Ident]:
        return list(dict.fromkeys([*(find_payload(tmp, proc_root) if tmp else []),
                                   *find_tree(known, dirs, proc_root)]))

    deadline = time.monotonic() + timeout
    stopped: list[Ident] = []
    while time.monotonic() < deadline:
        new = [i for i in find() if i not in stopped]
        if not new:
            break
        for ident in new:
            if signal_process(ident, signal.SIGSTOP, lambda _: True, proc_root):
                stopped.append(ident)
        known += new
    signalled: list[Ident] = []
    pending = stopped
    while True:
        for ident in pending:
            if signal_process(ident, signal.SIGKILL, lambda _: True, proc_root):
                signalled.append(ident)
        alive = wait_gone(signalled, max(0.0, deadline - time.monotonic()), proc_root)
        pending = [i for i in find() if i not in signalled]
        if not pending or time.monotonic() >= deadline:
            break
    # A stopped process may have died before its SIGKILL: the kernel sends SIGHUP to a
    # process group with a stopped member once it is orphaned (its parent killed first).
    ended = {pid for pid, _ in (*stopped, *signalled)}
    if ended:
        log(f"killed the payload: SIGSTOP, SIGKILL to pids {sorted(ended)}")
    if alive:
        log(f"payload processes still alive after SIGKILL: {[pid for pid, _ in alive]}")
    return alive


def remove_payload_tmp(path: str, log: Callable[[str], None] = lambda _: None) -> bool:
    """Remove the payload's TMPDIR, which cvmfsd made; whether it is gone.

    Only a directory named as cvmfsd names them, and not if anything is mounted
    at or below it: removing would descend into that file system (a hung one
    would stall the janitor for good).
    """
    if not os.path.isabs(path) or not os.path.basename(path).startswith(PAYLOAD_TMP_PREFIX):
        log(f"not removing {path}: not a payload TMPDIR of cvmfsd")
        return False
    if not os.path.lexists(path):
        return True
    real = os.path.realpath(path)
    points = (m.mountpoint for m in parse_mountinfo(read_mountinfo()))
    if any(p == real or p.startswith(real + "/") for p in points):
        log(f"not removing the payload's TMPDIR {path}: something is mounted in it")
        return False
    import shutil  # only now: the janitor's start-up stays light

    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log(f"cannot remove the payload's TMPDIR {path} entirely")
        return False
    log(f"removed the payload's TMPDIR {path}")
    return True


def _which(name: str) -> str | None:
    dirs = os.environ.get("PATH", "").split(os.pathsep) + list(_DEFAULT_PATH)
    for d in dirs:
        path = os.path.join(d or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def unmount_argv(mountpoint: str, *, lazy: bool) -> list[str] | None:
    """The command that unmounts a FUSE mount: ``umount`` as root, else ``fusermount -u``.

    None if no such tool is installed.
    """
    if os.geteuid() == 0:
        tool = _which("umount")
        return None if tool is None else [tool, *(["-l"] if lazy else []), mountpoint]
    tool = _which("fusermount3") or _which("fusermount")
    return None if tool is None else [tool, "-u", *(["-z"] if lazy else []), mountpoint]


def run_bounded(argv: Sequence[str], timeout: float, out_fd: int | None = None) -> int | None:
    """Run ``argv`` with stdin /dev/null and default signal dispositions, for ``timeout`` s.

    Returns:
        Its exit status (negative: killed by that signal), or None if it could
        not start or had to be SIGKILLed at the deadline; such a child (stuck
        in FUSE) is not waited for.
    """
    actions: list[tuple[int, int, str, int, int] | tuple[int, int, int]]
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
    if out_fd is None:
        actions += [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, 1, 2)]
    else:
        actions += [(os.POSIX_SPAWN_DUP2, out_fd, 1), (os.POSIX_SPAWN_DUP2, out_fd, 2)]
    try:
        pid = os.posix_spawn(argv[0], list(argv), os.environ, file_actions=actions,
                             setsigmask=(), setsigdef=(*IGNORED_SIGNALS, PDEATH_SIGNAL))
    except OSError:
        return None
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)  # our own child, not yet reaped: the pid is its
            return None
        time.sleep(_POLL)


def unmount(mountpoint: str, *, lazy: bool, timeout: float = UNMOUNT_TIMEOUT,
            out_fd: int | None = None) -> bool:
    """Unmount one FUSE mount point (see :func:`unmount_argv`); whether the tool succeeded."""
    argv = unmount_argv(mountpoint, lazy=lazy)
    return argv is not None and run_bounded(argv, timeout, out_fd) == 0


def unmount_busy(mountpoint: str, *, retries: int = BUSY_RETRIES, pause: float = BUSY_PAUSE,
                 out_fd: int | None = None) -> bool:
    """Unmount, retrying a few times at short intervals: a mount is often busy only for a
    moment (a probe or a dying payload's last file), and the next step -- ending its cvmfs2
    -- costs a second and an ENOTCONN mount."""
    for attempt in range(retries + 1):
        if unmount(mountpoint, lazy=False, out_fd=out_fd):
            return True
        if attempt < retries:
            time.sleep(pause)
    return False


# --- the janitor process ---------------------------------------------------------


class _Log:
    """An append-only log file, opened only once there is something to say."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.fd: int | None = None

    def open(self) -> int | None:
        if self.fd is None and self.path:
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                  | os.O_CLOEXEC, 0o644)
            except OSError:
                self.path = None
        return self.fd

    def __call__(self, message: str) -> None:
        fd = self.open()
        if fd is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            try:  # noqa: SIM105 - contextlib is one import more at start-up
                os.write(fd, f"{stamp} janitor[{os.getpid()}]: {message}\n".encode())
            except OSError:
                pass  # a full disk must not stop the clean-up


def _kill_namespace_init(ident: Ident, log: Callable[[str], None]) -> None:
    if not signal_process(ident, signal.SIGKILL, is_namespace_init):
        log(f"pid {ident[0]} is no longer namespace PID 1: not killed")
    elif wait_gone([ident], TERM_GRACE):
        log(f"namespace PID 1 (pid {ident[0]}) is still alive after SIGKILL")
    else:
        log(f"killed namespace PID 1 (pid {ident[0]})")


def clean_up(root: str | None, *, config_repo: str | None = None,
             namespace_init: Ident | None = None, payload_tmp: str | None = None,
             tree: Iterable[Ident] = (), log: Callable[[str], None] = lambda _: None,
             out_fd: int | None = None) -> bool:
    """End the payload and CVMFS of the distribution at ``root`` (steps (1) to (6) of
    the module docstring, but the lock); without ``root``, the payload alone.

    ``tree``: the processes of cvmfsd's tree that cvmfsd told of (pid, start time).

    Returns:
        Whether nothing is left: no payload process or TMPDIR, no mount below
        the distribution's ``dist/cvmfs`` in this mount namespace, no cvmfs2 of it.
    """
    if namespace_init is not None:
        _kill_namespace_init(namespace_init, log)
    # Before the unmounts: the payload's open files and cwd keep the mounts busy.
    dirs = () if root is None else mount_dirs(root)
    payload_left = (end_payload(payload_tmp, tree=tree, dirs=dirs, log=log)
                    if payload_tmp or tree else [])
    stuck = []
    for point in dist_mounts(read_mountinfo(), dirs, config_repo) if dirs else ():
        if unmount_busy(point, out_fd=out_fd):
            log(f"unmounted {point}")
        else:
            stuck.append(point)
    # Now, not after the cvmfs2 processes' exit, which may take a second.
    tmp_gone = payload_tmp is None or remove_payload_tmp(payload_tmp, log)
    if not dirs:
        return tmp_gone and not payload_left

    def on_signal(proc: Cvmfs2, sig: signal.Signals) -> None:
        log(f"sent {sig.name} to cvmfs2 pid {proc[0]} ({proc[2]})")

    left = stop_cvmfs2(find_cvmfs2(dirs), dirs, exit_grace=EXIT_GRACE, term_grace=TERM_GRACE,
                       on_signal=on_signal)
    serving = {point for _, _, point in left}
    mounted = dist_mounts(read_mountinfo(), dirs, config_repo)
    for point in stuck:
        if point not in mounted:
            continue
        if point in serving:
            log(f"left {point} mounted: its cvmfs2 survived SIGKILL")
        elif unmount(point, lazy=True, out_fd=out_fd):
            log(f"lazily unmounted {point} (its cvmfs2 is gone)")
        else:
            log(f"cannot unmount {point}")
    clean = not find_cvmfs2(dirs) and not dist_mounts(read_mountinfo(), dirs)
    if left:
        log(f"cvmfs2 processes still alive: {[pid for pid, _, _ in left]}")
    return clean and tmp_gone and not payload_left


class _Commands:
    """What cvmfsd said so far: namespace PID 1, its tree, and whether it is done.

    ``tree`` holds the processes cvmfsd told of (pid -> start time); those that
    ended are dropped whenever it has doubled since the last time, so that a
    fork storm costs the janitor little memory and amortised constant work.
    """

    def __init__(self, log: Callable[[str], None], proc_root: str = "/proc") -> None:
        self.log = log
        self.proc_root = proc_root
        self.namespace_init: Ident | None = None
        self.tree: dict[int, int] = {}
        self._prune_at = TREE_PRUNE_AT
        self.done = False
        self.glidein_config: str | None = None
        self.socket: str | None = None
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            words = text.split()
            name, _, rest = text.partition(" ")
            if name == "glidein-config" and rest.startswith("/"):
                self.glidein_config = rest
            elif name == "socket" and rest.startswith("/"):
                self.socket = rest
            elif words == ["done"]:
                self.done = True
            elif (words[:1] == ["tree"] and len(words) % 2 == 1
                  and all(w.isdigit() for w in words[1:])):
                numbers = [int(w) for w in words[1:]]
                self.tree.update(zip(numbers[::2], numbers[1::2]))
                if len(self.tree) >= self._prune_at:
                    self.tree = {pid: start for pid, start in self.tree.items()
                                 if process_start(pid, self.proc_root) == start}
                    self._prune_at = max(TREE_PRUNE_AT, 2 * len(self.tree))
            elif words == ["ns-clear"]:
                self.namespace_init = None
            elif len(words) == 3 and words[0] == "ns" and all(w.isdigit() for w in words[1:]):
                self.namespace_init = (int(words[1]), int(words[2]))
            else:
                self.log(f"ignoring unknown command {line!r} from cvmfsd")


def remove_socket(path: str | None, log: Callable[[str], None]) -> None:
    """Remove cvmfsd's control socket, if ``path`` still is a socket (nothing else)."""
    if path is None:
        return
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
            log(f"removed the control socket {path}")
    except OSError:
        pass  # gone already, or not ours to remove
    directory = os.path.dirname(path)
    if os.path.basename(directory).startswith(f"cvmfsd-{os.getuid()}-"):
        try:  # noqa: SIM105 - the private directory cvmfsd made; only if empty
            os.rmdir(directory)  # noqa: PTH106 - the janitor keeps to os
        except OSError:
            pass


def report_death(parent: int, why: str, clean: bool, commands: _Commands,
                 log: Callable[[str], None], *, lock_timeout: float = 10.0) -> bool:
    """Mark glidein_config: cvmfsd failed, the jobs have no CVMFS (if it still names ``parent``).

    The glidein's cleanup script (cvmfsd_cleanup.sh) and the job-wrapper
    fragment read CVMFSD_STATUS; without this they would go on reading the
    ``ready`` of a dead cvmfsd.  Only a glidein_config whose CVMFSD_PID is
    ``parent`` is touched: a later cvmfsd's status is not ours to overwrite.
    Returns whether it was written.
    """
    if commands.glidein_config is None:
        return False
    # Imported only now: the janitor starts on every run, and reports rarely.
    from cvmfsd.glidein import failure_updates, read_glidein_config, update_glidein_config

    path = commands.glidein_config
    try:
        if read_glidein_config(path).get("CVMFSD_PID") != str(parent):
            log(f"{path} names another cvmfsd: not marked")
            return False
        message = (f"cvmfsd (pid {parent}) ended without stopping CVMFS: it {why}; its "
                   f"janitor ended CVMFS ({'nothing left' if clean else 'clean-up incomplete'})")
        hint = ("it was killed (SIGKILL, out of memory?) or crashed; see cvmfsd's log and "
                "the janitor's log beside the distribution")
        update_glidein_config(path, failure_updates(message, hint), lock_timeout=lock_timeout)
    except CvmfsdError as exc:
        log(f"cannot mark {path}: {exc}")
        return False
    log(f"marked {path}: CVMFSD_STATUS failed, GWMS_IS_CVMFS no")
    return True


def _parse_args(argv: Sequence[str]) -> dict[str, str]:
    # argparse would double the janitor's start-up time.
    known = {"--dist", "--parent", "--config-repo", "--log", "--lock-fd", "--payload-tmp"}
    opts: dict[str, str] = {}
    args = list(argv)
    while args:
        flag = args.pop(0)
        if flag not in known or not args:
            raise SystemExit(f"usage: python -m cvmfsd.janitor --parent PID [--dist DIR] "
                             f"[--config-repo NAME] [--log FILE] [--lock-fd N] "
                             f"[--payload-tmp DIR] (bad: {flag})")
        opts[flag[2:]] = args.pop(0)
    if "parent" not in opts:
        raise SystemExit("cvmfsd.janitor: --parent is required")
    return opts


def _hold_lock(fd_text: str | None) -> int | None:
    """The inherited lock descriptor, made close-on-exec: no umount child may keep it."""
    if fd_text is None:
        return None
    try:
        fd = int(fd_text)
        os.set_inheritable(fd, False)
    except (ValueError, OSError):
        return None
    return fd


def _arm_parent_death() -> int:
    """PR_SET_PDEATHSIG, reported through a wake-up pipe; returns its read end."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    # A handler, however empty, keeps the signal from killing us; the wake-up
    # byte is what the loop acts on.
    signal.signal(PDEATH_SIGNAL, lambda signum, frame: None)
    from cvmfsd import _prctl

    try:
        _prctl.set_pdeathsig(PDEATH_SIGNAL)
    except OSError:  # pipe EOF alone still tells cvmfsd's death
        return wake_r
    return wake_r


def _serve(parent: int, commands: _Commands) -> str:
    """Read cvmfsd's commands until ``done``, EOF or cvmfsd's death; say which."""
    wake = _arm_parent_death()
    poller = select.poll()
    poller.register(0, select.POLLIN)
    poller.register(wake, select.POLLIN)
    why = "is no longer our parent"
    while os.getppid() == parent:  # also catches a death before PDEATHSIG was armed
        for fd, _ in poller.poll():
            if fd == wake:
                os.read(wake, 64)
                continue
            chunk = os.read(0, 4096)
            if not chunk:
                return "closed its pipe without saying done"
            commands.feed(chunk)
            if commands.done:
                return "done"
    # cvmfsd is gone, but a process it forked without exec may hold the pipe:
    # take what cvmfsd wrote before it died, without waiting for EOF.
    os.set_blocking(0, False)
    try:
        while not commands.done and (chunk := os.read(0, 4096)):
            commands.feed(chunk)
    except BlockingIOError:
        pass
    return "done" if commands.done else why


def main(argv: Sequence[str] | None = None) -> int:
    """Run the janitor (``python -m cvmfsd.janitor``); 0 if nothing or everything was cleaned."""
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, IGNORED_SIGNALS)
    opts = _parse_args(sys.argv[1:] if argv is None else argv)
    parent = int(opts["parent"])
    lock_fd = _hold_lock(opts.get("lock-fd"))  # the distribution stays ours until closed
    os.chdir("/")  # never keep a mount busy
    log = _Log(opts.get("log"))
    commands = _Commands(log)
    why = _serve(parent, commands)
    if commands.done:
        return 0
    started = time.monotonic()
    dist, payload_tmp = opts.get("dist"), opts.get("payload-tmp")
    log(f"cvmfsd (pid {parent}) {why}: cleaning up {dist or 'after the payload'}")
    remove_socket(commands.socket, log)  # first: a client must not wait on a dead server
    clean = clean_up(dist, config_repo=opts.get("config-repo"), payload_tmp=payload_tmp,
                     namespace_init=commands.namespace_init, tree=commands.tree.items(),
                     log=log, out_fd=log.open())
    log(f"clean-up {'complete' if clean else 'INCOMPLETE'} after "
        f"{time.monotonic() - started:.3f} s")
    report_death(parent, why, clean, commands, log)
    if lock_fd is not None:
        os.close(lock_fd)  # a new cvmfsd may take the distribution now
    return 0 if clean else 1


# --- cvmfsd's side ------------------------------------------------------------------


class Janitor:
    """cvmfsd's handle on its janitor process (made by :func:`spawn_janitor`).

    The methods write one line to the janitor's pipe; none of them waits for
    the janitor except :meth:`close`.
    """

    def __init__(self, process: subprocess.Popen[bytes], pipe: int) -> None:
        self.process = process
        self._pipe: int | None = pipe
        # The same pipe through an open file description of its own, non-blocking,
        # for the ``tree`` lines only (:meth:`tell_processes`).
        try:
            self._tree_pipe: int | None = os.open(
                f"/proc/self/fd/{pipe}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self._tree_pipe = None

    @property
    def pid(self) -> int:
        """The janitor's pid."""
        return self.process.pid

    def _send(self, line: str) -> None:
        if self._pipe is None:
            raise JanitorError("the janitor was already closed")
        try:
            os.write(self._pipe, f"{line}\n".encode())
        except BrokenPipeError:
            raise JanitorError(f"the janitor (pid {self.pid}) is gone",
                               hint="CVMFS will not be cleaned up if cvmfsd is killed") from None

    def set_namespace_init(self, pid: int) -> None:
        """Have the janitor SIGKILL ``pid``, namespace PID 1, if cvmfsd dies.

        Its start time is recorded now, so the janitor kills it only if it is
        still the same process then.

        Raises:
            ValueError: ``pid`` is not (or no longer) PID 1 of a pid namespace of ours.
            JanitorError: the janitor is gone or closed.
        """
        start = process_start(pid)
        if start is None or not is_namespace_init(pid) or process_start(pid) != start:
            raise ValueError(f"pid {pid} is not PID 1 of a pid namespace of uid {os.getuid()}")
        self._send(f"ns {pid} {start}")

    def set_reporting(self, *, glidein_config: Path | None, socket: Path | None) -> None:
        """Have the janitor mark ``glidein_config`` failed and remove ``socket`` if cvmfsd dies.

        Raises:
            ValueError: a path is not absolute or spans lines.
            JanitorError: the janitor is gone or closed.
        """
        for word, path in (("glidein-config", glidein_config), ("socket", socket)):
            if path is None:
                continue
            text = os.path.abspath(path)
            if "\n" in text:
                raise ValueError(f"{word} path {text!r} spans lines")
            self._send(f"{word} {text}")

    def tell_processes(self, processes: Sequence[Ident]) -> int:
        """Have the janitor SIGKILL these processes of cvmfsd's tree if cvmfsd dies.

        Each is named by its pid and start time, and killed only if it is still
        that process; what it forked by then is found from it.  The caller
        batches.  This never blocks, and leaves room in the pipe for ``done``:
        each line is one page (``PIPE_BUF``: written whole or not at all, and it
        takes exactly one of the pipe's pages), written through a non-blocking
        open file description of the pipe of its own, and only while at most
        half the pipe is taken; a line that does not go is dropped (the janitor
        is not reading, or cannot keep up).

        Returns:
            How many processes were sent.

        Raises:
            JanitorError: the janitor is gone or closed.
        """
        sent = 0
        for at in range(0, len(processes), TREE_LINE):
            batch = processes[at:at + TREE_LINE]
            line = " ".join(["tree", *(f"{pid} {start}" for pid, start in batch)])
            if not self._send_page(line):
                break
            sent += len(batch)
        return sent

    def _send_page(self, line: str) -> bool:
        import fcntl
        import termios

        if self._pipe is None:
            raise JanitorError("the janitor was already closed")
        if self._tree_pipe is None:
            return False
        page = line.encode().ljust(PIPE_PAGE - 1) + b"\n"
        held = bytearray(4)
        fcntl.ioctl(self._tree_pipe, termios.FIONREAD, held)
        size = fcntl.fcntl(self._tree_pipe, F_GETPIPE_SZ)
        if int.from_bytes(held, sys.byteorder) + len(page) > size // 2:
            return False
        try:
            os.write(self._tree_pipe, page)
        except BlockingIOError:
            return False
        except BrokenPipeError:
            raise JanitorError(f"the janitor (pid {self.pid}) is gone",
                               hint="CVMFS will not be cleaned up if cvmfsd is killed") from None
        return True

    def clear_namespace_init(self) -> None:
        """Forget namespace PID 1 (the namespace has ended).

        Raises:
            JanitorError: the janitor is gone or closed.
        """
        self._send("ns-clear")

    def close(self, *, clean_up: bool = False, timeout: float = 5.0) -> int | None:
        """Release the janitor, and wait up to ``timeout`` s for it to exit.

        Args:
            clean_up: False (cvmfsd cleaned up itself): the janitor exits at
                once, doing nothing.  True: the janitor cleans up as if cvmfsd
                had died, and this waits for it.
            timeout: how long to wait; the janitor exits within milliseconds
                after a plain close, and within a few seconds after a clean-up.

        Returns:
            The janitor's exit status (0: nothing left behind), or None if it is
            still running.  Calling close again only waits again.
        """
        if self._pipe is not None:
            try:
                if not clean_up:
                    os.write(self._pipe, b"done\n")
            except BrokenPipeError:
                pass
            finally:
                os.close(self._pipe)
                self._pipe = None
                if self._tree_pipe is not None:
                    os.close(self._tree_pipe)
                    self._tree_pipe = None
        import subprocess

        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def spawn_janitor(dist: Path | None, *, log: Path | None = None, lock_fd: int | None = None,
                  payload_tmp: Path | None = None) -> Janitor:
    """Start the janitor of the cvmfsexec distribution at ``dist`` (its root directory).

    Call it from the thread that will live as long as cvmfsd (the main thread)
    so that PR_SET_PDEATHSIG fires only when cvmfsd exits; from another thread
    it stays correct, as the janitor re-checks its parent.  It returns once
    the janitor is forked; the janitor needs ~30 ms to be ready, and what is
    written meanwhile waits in the pipe.

    Args:
        dist: the distribution's root directory; None: there is none to
            clean (the payload uses the host's /cvmfs, or none).
        log: where the janitor reports a clean-up; by default
            ``<dist>/log/janitor.log`` (nowhere without ``dist``).  Nothing is
            written after a normal close.
        lock_fd: cvmfsd's locked descriptor of the distribution's lock file,
            passed on to the janitor, which holds the lock until it has cleaned.
        payload_tmp: the payload's TMPDIR (absolute, exactly as in the
            payload's environment): if cvmfsd dies, the janitor kills every
            process that has it (and their sessions), then removes it.

    Raises:
        JanitorError: the janitor process could not be started.
    """
    import subprocess

    from cvmfsd._selfexec import module_argv
    from cvmfsd.launch import Dist

    argv = [*module_argv("cvmfsd.janitor"), "--parent", str(os.getpid())]
    if dist is not None:
        root = dist.absolute()
        argv += ["--dist", str(root)]
        log = log or root / "log" / "janitor.log"
        config_repo = Dist(root).config_repo()
        if config_repo:
            argv += ["--config-repo", config_repo]
    if log is not None:
        argv += ["--log", str(log)]
    if lock_fd is not None:
        argv += ["--lock-fd", str(lock_fd)]
    if payload_tmp is not None:
        argv += ["--payload-tmp", str(payload_tmp)]  # as the payload's TMPDIR says it
    read_end, write_end = os.pipe()  # both close-on-exec; Popen dups read_end to stdin
    # Blocked signals stay pending across fork and exec: the janitor sets them
    # to SIG_IGN before unblocking them, so none can kill it while it starts.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, IGNORED_SIGNALS)
    try:
        # Same cwd as cvmfsd, so that ``-m`` finds cvmfsd as cvmfsd found itself;
        # the janitor then moves to / so as never to keep a mount busy.
        process = subprocess.Popen(argv, stdin=read_end, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL,
                                   pass_fds=() if lock_fd is None else (lock_fd,))
    except OSError as exc:
        os.close(write_end)
        raise JanitorError(f"cannot start the janitor ({sys.executable}): {exc}") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(read_end)
    return Janitor(process, write_end)


if __name__ == "__main__":
    sys.exit(main())
