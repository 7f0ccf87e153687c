"""Look at CVMFS mount points from a child process: the probe worker of :mod:`cvmfsd.watch`.

A stuck cvmfs2 makes even ``stat`` sleep in D state, where no signal reaches
the caller until the FUSE request is answered or aborted (cvmfs-facts.md part B
§6).  So the looking is done here, in a child process the supervisor can
abandon: ``python -I -S probe_child.py PATH REPO`` stats PATH, reads the magic
xattrs ``user.fqrn`` and ``user.revision``, then, for the metrics, the
observation xattrs of :data:`OBSERVED` and statfs (cvmfs answers it with the
cache quota and the cache size), and prints one JSON line::

    {"state": "ok", "revision": "42", "error": null,
     "attrs": {"hitrate": "97.5", ...}, "statfs": [used_bytes, limit_bytes]}

An observation that fails is left out; only the identity decides the state.

States: ``ok``; ``enotconn`` (the daemon died: ENOTCONN or ECONNABORTED); ``absent`` (ENOENT,
or PATH is a plain directory without CVMFS xattrs); ``error`` (anything else,
including a mount that serves another repository).  ``hung`` is never printed:
the parent decides that when no line comes within its deadline.

``python -I -S probe_child.py --serve`` is the long-lived probe worker of
:class:`cvmfsd.probing.ProbeWorker`: it reads requests, one JSON object a line on
stdin, ``{"id": 7, "path": PATH, "repo": REPO}``, and probes each in a thread of
its own, so that a request stuck in D state on one mount does not hold up the
others; each answer is the line above with the request's ``"id"`` added, in
the order the probes end.  ``{"id": 8, "ping": true}`` is answered at once by
the reading thread, ``{"id": 8, "pong": true}``: the parent's liveness check.
The reading thread never touches FUSE.  A stuck thread stays stuck until its
FUSE request is answered or aborted (its late answer is then written, and the
parent drops it).  The worker exits on EOF of stdin, that is when the parent
closes the pipe or dies.

The file is run as a script, not with ``-m``: with ``-I -S`` the interpreter
skips site-packages and the cvmfsd package, so the child starts in about
20 ms.  It must therefore import nothing but the standard library.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
from typing import BinaryIO

# getxattr of a CVMFS xattr on a directory that is not a CVMFS mount.
_NOT_CVMFS = frozenset({errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP})
# A FUSE connection whose daemon died answers ENOTCONN; the first request after
# the abort can also see ECONNABORTED (seen on Linux 6.x): both mean "daemon gone".
_BY_ERRNO = {errno.ENOTCONN: "enotconn", errno.ECONNABORTED: "enotconn", errno.ENOENT: "absent"}
#: Magic xattrs read for the metrics (cvmfs-facts.md part B §1).  Not
#: ``logbuffer``: the real client throttles it, so it must not be polled.
OBSERVED = ("hitrate", "nioerr", "timestamp_last_ioerr", "host", "proxy", "version", "pid",
            "expires", "nclg", "usedfd", "useddirp", "maxfd", "timeout", "timeout_direct",
            "uptime", "ncleanup24")


def _xattr(path: str, name: str) -> str:
    return os.getxattr(path, name).decode(errors="replace")


def observe(path: str) -> dict[str, object]:
    """The observation xattrs and statfs of a mount that answered; failures left out."""
    attrs = {}
    for name in OBSERVED:
        try:
            attrs[name] = _xattr(path, "user." + name)
        except OSError:
            continue
    found: dict[str, object] = {"attrs": attrs}
    try:
        st = os.statvfs(path)
    except OSError:
        return found
    found["statfs"] = [(st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize]
    return found


def probe(path: str, repo: str) -> dict[str, object]:
    """Stat ``path`` and read its CVMFS identity; may block forever on a stuck mount.

    Returns:
        ``{"state": ..., "revision": ..., "error": ...}`` (plus ``attrs`` and
        ``statfs`` when ``ok``), ready for JSON.
    """
    step = "stat"
    try:
        os.stat(path)  # noqa: PTH116 - no pathlib: the child's start-up is the probe's cost
        step = "getxattr user.fqrn"
        try:
            fqrn = _xattr(path, "user.fqrn")
        except OSError as exc:
            if exc.errno not in _NOT_CVMFS:
                raise
            return {"state": "absent", "revision": None,
                    "error": f"{path} is not a CVMFS mount (no user.fqrn: {exc.strerror})"}
        if fqrn != repo:
            return {"state": "error", "revision": None,
                    "error": f"{path} serves {fqrn!r}, expected {repo!r}"}
        step = "getxattr user.revision"
        revision = _xattr(path, "user.revision")
    except OSError as exc:
        code = exc.errno or 0
        name = errno.errorcode.get(code, str(code))
        return {"state": _BY_ERRNO.get(code, "error"), "revision": None,
                "error": f"{step} {path}: [{name}] {exc.strerror}"}
    return {"state": "ok", "revision": revision, "error": None, **observe(path)}


def _probe_answer(path: str, repo: str) -> dict[str, object]:
    try:
        return probe(path, repo)
    except Exception as exc:  # a worker thread must always answer
        return {"state": "error", "revision": None, "error": f"probe failed: {exc!r}"}


def serve(requests: BinaryIO, answers: BinaryIO) -> int:
    """Answer probe requests read from ``requests`` on ``answers`` until EOF (see above).

    Returns:
        0 at EOF of ``requests``; a thread still stuck in FUSE does not delay it.
    """
    lock = threading.Lock()

    def send(answer: dict[str, object]) -> None:
        data = (json.dumps(answer) + "\n").encode()
        try:
            with lock:
                answers.write(data)
                answers.flush()
        except OSError:  # the parent is gone (EPIPE): nobody needs us any more
            os._exit(0)

    def work(rid: int, path: str, repo: str) -> None:
        send({"id": rid, **_probe_answer(path, repo)})

    for line in requests:
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        rid = request.get("id") if isinstance(request, dict) else None
        if not isinstance(request, dict) or not isinstance(rid, int):
            send({"id": None, "error": f"bad request {line[:200]!r}"})
            continue
        if request.get("ping"):
            send({"id": rid, "pong": True})
            continue
        path, repo = request.get("path"), request.get("repo")
        if not isinstance(path, str) or not isinstance(repo, str):
            send({"id": rid, "state": "error", "revision": None,
                  "error": f"bad request {line[:200]!r}"})
            continue
        try:
            threading.Thread(target=work, args=(rid, path, repo), daemon=True,
                             name=f"probe-{rid}").start()
        except RuntimeError as exc:  # no more threads (pids limit)
            send({"id": rid, "state": "error", "revision": None,
                  "error": f"cannot start a probe thread: {exc}"})
    return 0


def main(argv: list[str]) -> int:
    """Entry point: ``PATH REPO`` prints the JSON line and exits 0; ``--serve`` is the worker.

    Returns 2 on a usage error.
    """
    if argv == ["--serve"]:
        # Ctrl-C of a foreground cvmfsd reaches its whole process group: the
        # worker ends with cvmfsd, through EOF, instead.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        serve(sys.stdin.buffer, sys.stdout.buffer)
        sys.stdout.flush()
        os._exit(0)  # not sys.exit: no interpreter shutdown under threads stuck in FUSE
    if len(argv) != 2:
        sys.stderr.write("usage: probe_child.py PATH REPO | --serve\n")
        return 2
    sys.stdout.write(json.dumps(probe(argv[0], argv[1])) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
