"""The mounted repository's state: current revision, faults, open handles.

:class:`Client` is shared by the FUSE operations, the talk socket and the
background tasks of one simulated ``cvmfs2``. Its blocking methods (catalog
loads) are called in worker threads; everything else is quick and in memory.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from cvmfsd.sim._cachemgr import SharedCacheClient
from cvmfsd.sim._fetch import DownloadError, Fetcher
from cvmfsd.sim._settings import Settings
from cvmfsd.sim._state import Counters, Inodes, Log, Tree
from cvmfsd.sim._watchdog import Watchdog
from cvmfsd.sim.stratum import CATALOG_SUFFIX, Faults, StratumError, parse_catalog

#: mountpoint.h ``kShortTermTTL``: the TTL applied after a failed revision check.
SHORT_TERM_TTL = 180


class CatalogError(Exception):
    """The manifest or the root catalog could not be loaded."""


@dataclass
class OpenFile:
    """One open file handle."""

    fd: int
    path: str


class Client:
    """State of one mounted repository."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.counters = Counters()
        self.log = Log(settings.fqrn, settings.usyslog, settings.debuglog)
        self.fetcher = Fetcher(settings, self.counters, self.log)
        self.inodes = Inodes()
        self._tree: Tree | None = None
        self.faults = Faults()
        self.boot_time = time.time()
        self.mount_time = time.monotonic()
        #: fuse_remount.cc ``catalogs_valid_until_`` (monotonic): renewed by each
        #: check, so it lies in the past while a check is under way or stalls.
        self.valid_until = time.monotonic()
        self.files: dict[int, OpenFile] = {}
        self.dirs: dict[int, str] = {}
        self._next_fh = 1
        self.last_ioerr = 0
        #: Set by the hang fault: FUSE requests stall from then on.
        self.hanging = False
        #: ``sim eio on|off`` overrides the fault file's ``eio`` knob.
        self.eio_override: bool | None = None
        #: The crash watchdog process (None with ``-o disable_watchdog``).
        self.watchdog: Watchdog | None = None
        #: The connection to the shared cache manager (None for a private cache).
        self.cachemgr: SharedCacheClient | None = None

    @property
    def watchdog_pid(self) -> int:
        """``Watchdog::GetPid``: the watchdog's pid, or our own without one."""
        return self.watchdog.pid if self.watchdog is not None else os.getpid()

    @property
    def cachemgr_pid(self) -> int:
        """``QuotaManager::GetPid``: the shared cache manager's pid, or our own."""
        return self.cachemgr.pid if self.cachemgr is not None else os.getpid()

    @property
    def tree(self) -> Tree:
        """The revision being served."""
        if self._tree is None:
            raise RuntimeError("no revision loaded yet")  # a bug: load() runs before mounting
        return self._tree

    # -- revisions --------------------------------------------------------------

    def load(self) -> Tree:
        """Fetch the manifest and its root catalog (blocking).

        Raises:
            CatalogError: either could not be downloaded or parsed.
        """
        try:
            manifest = self.fetcher.fetch_manifest()
            if manifest.fqrn != self.settings.fqrn:
                raise CatalogError(
                    f"manifest names {manifest.fqrn!r}, expected {self.settings.fqrn!r}"
                )
            current = self._tree
            if current is not None and current.manifest.root_hash == manifest.root_hash:
                # Same root catalog: the real client re-reads only the manifest.
                return Tree.build(manifest, current.catalog)
            path = self.fetcher.fetch(manifest.root_hash, CATALOG_SUFFIX, pin=True)
            catalog = parse_catalog(path.read_bytes(), where=str(path))
        except (DownloadError, StratumError, OSError) as exc:
            raise CatalogError(str(exc)) from None
        return Tree.build(manifest, catalog)

    def apply(self, tree: Tree) -> bool:
        """Serve ``tree`` from now on; return whether the revision changed."""
        old = self._tree
        self._tree = tree
        self.valid_until = time.monotonic() + tree.manifest.ttl
        self.counters.set("catalog_revision", tree.manifest.revision)
        if old is not None and old.manifest.root_hash != tree.manifest.root_hash:
            self.fetcher.unpin(old.manifest.root_hash)
        changed = old is None or old.manifest.revision != tree.manifest.revision
        if changed:
            self.log.info(
                f"CernVM-FS: using revision {tree.manifest.revision} "
                f"(root catalog {tree.manifest.root_hash})"
            )
        return changed

    def check_revision(self) -> str:
        """Re-read the manifest and apply a new revision (blocking).

        Returns:
            The real client's ``remount`` answer: ``Catalog up to date``,
            ``New revision applied`` or ``Failed``.
        """
        try:
            tree = self.load()
        except CatalogError as exc:
            self.log.info(f"failed to check for a new revision: {exc}")
            self.valid_until = time.monotonic() + SHORT_TERM_TTL  # "applying short term TTL"
            return "Failed"
        return "New revision applied" if self.apply(tree) else "Catalog up to date"

    def expires_in(self) -> float:
        """Seconds until the root catalog's TTL runs out; negative once it has."""
        return self.valid_until - time.monotonic()

    # -- handles and errors -----------------------------------------------------

    def new_fh(self) -> int:
        """Allocate a file or directory handle number."""
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def update_open_gauges(self) -> None:
        """Refresh the open-files/dirs gauges after an open or a release."""
        self.counters.set("cvmfs.no_open_files", len(self.files))
        self.counters.set("cvmfs.no_open_dirs", len(self.dirs))

    def eio_for(self, path: str) -> bool:
        """Whether reading ``path`` must fail with EIO right now."""
        if self.eio_override is not None:
            return self.eio_override
        return self.faults.eio_matches(path)

    def record_io_error(self, path: str, why: str) -> None:
        """Count an I/O error returned to a caller and log it."""
        self.counters.inc("cvmfs.n_io_error")
        self.counters.inc("eio.total")
        self.last_ioerr = int(time.time())
        self.log.info(f"EIO (01): failed to read /{path} ({why})")

    def reset_error_counters(self) -> None:
        """The talk command ``reset error counters``: zero ``nioerr`` only.

        ``eio.total`` and ``timestamp_last_ioerr`` keep their values, so a reader
        can still tell that errors happened before the reset.
        """
        self.counters.set("cvmfs.n_io_error", 0)

    def close_all(self) -> None:
        """Close every open cache file descriptor (shutdown)."""
        for handle in self.files.values():
            os.close(handle.fd)
        self.files.clear()
