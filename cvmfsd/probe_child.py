"""Look at one CVMFS mount point once: the disposable child of :func:`cvmfsd.watch.probe_repo`.

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

The file is run as a script, not with ``-m``: with ``-I -S`` the interpreter
skips site-packages and the cvmfsd package, so the child starts in about
20 ms.  It must therefore import nothing but the standard library.
"""

from __future__ import annotations

import errno
import json
import os
import sys

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


def main(argv: list[str]) -> int:
    """Entry point: ``PATH REPO``; prints the JSON line and exits 0 (2 on a usage error)."""
    if len(argv) != 2:
        sys.stderr.write("usage: probe_child.py PATH REPO\n")
        return 2
    sys.stdout.write(json.dumps(probe(argv[0], argv[1])) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
