"""Bookkeeping of the simulated client: counters, the log, inodes and the tree.

Nothing here does network or FUSE I/O, and nothing imports trio. Counters are
updated from worker threads (downloads run in threads), so they take a lock.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cvmfsd.sim.stratum import Entry, Manifest

ROOT_INODE = 1  # FUSE_ROOT_ID, the value of pyfuse3.ROOT_INODE

#: The raw counters kept, with the descriptions printed by ``internal affairs``.
#: Names are those of the real client's statistics registry (``mountpoint.cc``,
#: ``download.h``, ``fetch.cc``); the real one has many more.
COUNTERS: Mapping[str, str] = {
    "catalog_revision": "Revision of the root catalog",
    "cvmfs.n_fs_dir_open": "overall number of directory open operations",
    "cvmfs.n_fs_forget": "overall number of inode forgets",
    "cvmfs.n_fs_lookup": "overall number of lookups",
    "cvmfs.n_fs_lookup_negative": "overall number of negative lookups",
    "cvmfs.n_fs_open": "overall number of open calls",
    "cvmfs.n_fs_read": "overall number of read calls",
    "cvmfs.n_fs_readlink": "overall number of readlink calls",
    "cvmfs.n_fs_stat": "overall number of stat calls",
    "cvmfs.n_io_error": "overall number of I/O errors",
    "cvmfs.no_open_dirs": "currently open directories",
    "cvmfs.no_open_files": "currently open files",
    "download.n_host_failover": "Number of host failovers",
    "download.n_proxy_failover": "Number of proxy failovers",
    "download.n_requests": "Number of requests",
    "download.n_retries": "Number of retries",
    "download.sz_transfer_time": "Transfer time (milliseconds)",
    "download.sz_transferred_bytes": "Number of transferred bytes",
    "eio.total": "EIO returned to calling process. Sum of individual eio counters",
    "fetch.n_downloads": "overall number of downloaded files (incl. catalogs, chunks)",
    "fetch.n_invocations": "overall number of object requests (hits + downloads)",
}


class Counters:
    """The raw counter registry; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTERS, 0)

    def inc(self, name: str, by: int = 1) -> None:
        """Add ``by`` to counter ``name``."""
        with self._lock:
            self._values[name] += by

    def set(self, name: str, value: int) -> None:
        """Set counter ``name`` (gauges and resets)."""
        with self._lock:
            self._values[name] = value

    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def snapshot(self) -> dict[str, int]:
        """A consistent copy of every counter."""
        with self._lock:
            return dict(self._values)


class Log:
    """The client's log: ``CVMFS_USYSLOG``, ``CVMFS_DEBUGLOG`` and the logbuffer.

    The real client writes syslog-style lines to the ``CVMFS_USYSLOG`` file;
    here a line is ``YYYY-MM-DD HH:MM:SS (<fqrn>) <message>``. The supervisor
    tails that file. Every message also goes to the debug log, if any, and
    the last 10 to the in-memory buffer behind the ``logbuffer`` xattr.
    """

    def __init__(self, fqrn: str, usyslog: Path | None, debuglog: Path | None) -> None:
        self.fqrn = fqrn
        self.usyslog = usyslog
        self.debuglog = debuglog
        self.buffer: collections.deque[str] = collections.deque(maxlen=10)
        self._lock = threading.Lock()

    def _write(self, path: Path | None, line: str) -> None:
        if path is None:
            return
        try:
            with path.open("a") as out:
                out.write(line + "\n")
        except OSError:
            pass  # like syslog, logging never fails the file system

    def info(self, message: str) -> None:
        """Log an event to the user syslog, the debug log and the buffer."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self._lock:
            self.buffer.append(
                f"[{time.strftime('%m %d %Y %H:%M:%S UTC', time.gmtime())}] {message}"
            )
            self._write(self.usyslog, f"{stamp} ({self.fqrn}) {message}")
            self._write(self.debuglog, f"{stamp} ({self.fqrn}) {message}")

    def debug(self, message: str) -> None:
        """Log a detail to the debug log only."""
        with self._lock:
            self._write(self.debuglog, f"{time.strftime('%Y-%m-%d %H:%M:%S')} (debug) {message}")


class Inodes:
    """Inode numbers by repository path, stable across revisions."""

    def __init__(self) -> None:
        self._by_path: dict[str, int] = {"": ROOT_INODE}
        self._by_ino: dict[int, str] = {ROOT_INODE: ""}

    def ino(self, path: str) -> int:
        """The inode of ``path``, allocated on first use."""
        ino = self._by_path.get(path)
        if ino is None:
            ino = len(self._by_ino) + ROOT_INODE
            self._by_path[path] = ino
            self._by_ino[ino] = path
        return ino

    def path(self, ino: int) -> str | None:
        """The path of inode ``ino``, or None if it was never handed out."""
        return self._by_ino.get(ino)

    @property
    def max(self) -> int:
        """The highest inode number handed out."""
        return len(self._by_ino)


@dataclass(frozen=True)
class Tree:
    """One revision: its manifest, catalog and a directory index."""

    manifest: Manifest
    catalog: Mapping[str, Entry]
    children: Mapping[str, tuple[str, ...]]
    loaded_at: float

    @classmethod
    def build(cls, manifest: Manifest, catalog: Mapping[str, Entry]) -> Tree:
        """Index ``catalog`` by directory."""
        children: dict[str, list[str]] = {p: [] for p, e in catalog.items() if e["type"] == "d"}
        for path in catalog:
            if path:
                parent, _, name = path.rpartition("/")
                children.setdefault(parent, []).append(name)
        return cls(
            manifest=manifest,
            catalog=catalog,
            children={p: tuple(sorted(names)) for p, names in children.items()},
            loaded_at=time.monotonic(),
        )

    @staticmethod
    def join(parent: str, name: str) -> str:
        """The repository path of ``name`` inside ``parent``."""
        return f"{parent}/{name}" if parent else name

    def expires_in(self) -> float:
        """Seconds until the root catalog TTL runs out (may be negative)."""
        return self.loaded_at + self.manifest.ttl - time.monotonic()
