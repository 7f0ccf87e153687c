"""The cvmfs2 loader's exit codes (``cvmfs/loader.h``, enum ``Failures``).

``mountrepo`` exits with the code of the ``cvmfs2`` it runs, so these numbers are
what a failed mount reports all the way up through ``cvmfsexec``. Both the
simulated ``cvmfs2`` (which exits with them) and the supervisor (which explains
them) use this table.
"""

from __future__ import annotations

import enum


class LoaderCode(enum.IntEnum):
    """One failure class of the cvmfs2 loader; the value is its exit status."""

    OK = 0
    UNKNOWN = 1
    OPTIONS = 2
    PERMISSION = 3
    MOUNT = 4
    LOADER_TALK = 5
    FUSE_LOOP = 6
    LOAD_LIBRARY = 7
    INCOMPATIBLE_VERSIONS = 8
    CACHE_DIR = 9
    PEERS = 10
    NFS_MAPS = 11
    QUOTA = 12
    MONITOR = 13
    TALK = 14
    SIGNATURE = 15
    CATALOG = 16
    MAINTENANCE_MODE = 17
    SAVE_STATE = 18
    RESTORE_STATE = 19
    OTHER_MOUNT = 20
    DOUBLE_MOUNT = 21
    HISTORY = 22
    WPAD = 23
    LOCK_WORKSPACE = 24
    REVISION_BLACKLIST = 25

    @property
    def cause(self) -> str:
        """A sentence for an operator: what this failure usually means."""
        return _CAUSES.get(self, "see the repository's log for details")

    @classmethod
    def describe(cls, status: int) -> str:
        """Name an exit status, including ones outside the table (``'exit 99'``)."""
        try:
            code = cls(status)
        except ValueError:
            return f"exit {status} (not a cvmfs2 loader code)"
        return f"{code.name.lower()} ({code.value}): {code.cause}"


_CAUSES = {
    LoaderCode.OK: "success",
    LoaderCode.UNKNOWN: "unclassified failure",
    LoaderCode.OPTIONS: "invalid or missing configuration (CVMFS_SERVER_URL, CVMFS_HTTP_PROXY)",
    LoaderCode.PERMISSION: "no permission to mount or to open /dev/fuse",
    LoaderCode.MOUNT: "the FUSE mount itself failed (mount point missing, busy or not permitted)",
    LoaderCode.FUSE_LOOP: "the FUSE event loop failed",
    LoaderCode.CACHE_DIR: "the cache directory cannot be created or used",
    LoaderCode.QUOTA: "the cache quota manager failed (cache too small or corrupt)",
    LoaderCode.TALK: "the cvmfs_talk control socket cannot be created",
    LoaderCode.SIGNATURE: "the repository manifest signature or whitelist is invalid",
    LoaderCode.CATALOG: "the root catalog cannot be loaded (server or proxy unreachable?)",
    LoaderCode.MAINTENANCE_MODE: "the repository is in maintenance mode",
    LoaderCode.OTHER_MOUNT: "another file system is already mounted there",
    LoaderCode.DOUBLE_MOUNT: "the repository is already mounted",
    LoaderCode.HISTORY: "the tag history cannot be loaded",
    LoaderCode.WPAD: "proxy auto-discovery (WPAD/PAC) failed; set CVMFS_HTTP_PROXY",
    LoaderCode.LOCK_WORKSPACE: "the cache workspace is locked by another cvmfs2",
    LoaderCode.REVISION_BLACKLIST: "the repository revision is blacklisted",
}
