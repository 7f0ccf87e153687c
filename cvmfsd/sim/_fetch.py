"""Downloads from the stratum and the local object cache of the simulated client.

Theory of operation: every object request goes through :meth:`Fetcher.fetch`
(``fetch.n_invocations``). An object already in the cache is a hit; otherwise
it is downloaded (``fetch.n_downloads``), its SHA-1 checked, written to
``<cache>/txn/`` and renamed into ``<cache>/<2 hex>/<38 hex>[C]``, which is the
real POSIX cache layout. Requests for one object are serialised, so a second
thread waiting for a download in progress counts as a hit, as in the real
client. Catalogs go through the same path and are pinned while loaded.

Downloads walk the host chain (``CVMFS_SERVER_URL``) starting at the active
host; for ``http://`` hosts each proxy group is tried in order (``DIRECT``
means no proxy). A failing proxy counts a proxy failover, a failing host a
host failover; after the whole chain failed, the request is retried up to
``CVMFS_MAX_RETRIES`` times with doubling back-off. All of this is blocking
I/O, run in worker threads by the trio layer.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from cvmfsd.sim._settings import Settings
from cvmfsd.sim._state import Counters, Log
from cvmfsd.sim.stratum import (
    CATALOG_SUFFIX,
    FAULTS,
    MANIFEST,
    Faults,
    Manifest,
    object_path,
    parse_faults,
    parse_manifest,
)


class DownloadError(Exception):
    """Every host (and proxy) failed for one request."""


class _ProxyError(Exception):
    """The proxy, not the host, failed."""


class Fetcher:
    """Host chain, cache and counters of one mounted repository."""

    def __init__(self, settings: Settings, counters: Counters, log: Log) -> None:
        self.settings = settings
        self.counters = counters
        self.log = log
        self.cache = settings.cache_dir
        self.active_host = 0
        self.active_proxy = 0
        self.host_down: set[int] = set()
        self.pinned: dict[str, int] = {}  # cache-relative path -> size
        self.cache_bytes = 0
        self.cleanups: list[float] = []
        self._lock = threading.Lock()
        self._object_locks: dict[str, threading.Lock] = {}

    # -- cache ------------------------------------------------------------------

    def setup_cache(self) -> None:
        """Create the cache directory and measure what it already holds.

        Raises:
            OSError: the directory cannot be created or written.
        """
        (self.cache / "txn").mkdir(parents=True, exist_ok=True)
        if not os.access(self.cache, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(self.cache))
        total = 0
        for sub in self.cache.iterdir():
            if len(sub.name) == 2 and sub.is_dir():
                total += sum(f.stat().st_size for f in sub.iterdir() if f.is_file())
        self.cache_bytes = total

    def _cleanup(self) -> None:
        """Evict least recently used unpinned objects down to half the quota."""
        limit = self.settings.quota_limit_mb * 1024 * 1024
        if limit <= 0 or self.cache_bytes <= limit:
            return
        files = [
            f
            for sub in self.cache.iterdir()
            if len(sub.name) == 2 and sub.is_dir()
            for f in sub.iterdir()
            if f"{sub.name}/{f.name}" not in self.pinned
        ]
        files.sort(key=lambda f: f.stat().st_atime)
        for f in files:
            if self.cache_bytes <= limit // 2:
                break
            size = f.stat().st_size
            f.unlink(missing_ok=True)
            self.cache_bytes -= size
        self.cleanups.append(time.time())
        self.log.info(f"cleaned up cache to {self.cache_bytes // (1024 * 1024)} MB")

    # -- downloads --------------------------------------------------------------

    def _get_once(self, base: str, relpath: str, proxy: str) -> bytes:
        url = f"{base}/{relpath}"
        if url.startswith("file://"):
            return Path(url[len("file://") :]).read_bytes()
        direct = proxy.upper() == "DIRECT"
        handler = urllib.request.ProxyHandler({} if direct else {"http": proxy})
        opener = urllib.request.build_opener(handler)
        timeout = self.settings.timeout_direct if direct else self.settings.timeout
        try:
            # Only file:// and http:// URLs get here (checked in make_settings).
            with opener.open(url, timeout=timeout or None) as reply:
                data: bytes = reply.read()
                return data
        except urllib.error.HTTPError:
            raise  # the host answered: not the proxy's fault
        except OSError as exc:
            if not direct:
                raise _ProxyError(str(exc)) from exc
            raise

    def _get_from_host(self, base: str, relpath: str) -> bytes:
        if base.startswith("file://"):
            return self._get_once(base, relpath, "DIRECT")
        groups = self.settings.proxy_groups
        for step in range(len(groups)):
            index = (self.active_proxy + step) % len(groups)
            try:
                return self._get_once(base, relpath, groups[index][0])
            except _ProxyError as exc:
                self.counters.inc("download.n_proxy_failover")
                self.log.info(f"proxy {groups[index][0]} failed ({exc}), failing over")
                self.active_proxy = (index + 1) % len(groups)
        raise DownloadError("all proxies failed")

    def download(self, relpath: str) -> bytes:
        """Download ``relpath`` from the repository with host failover and retries.

        Raises:
            DownloadError: every host failed on every attempt.
        """
        hosts = self.settings.server_urls
        backoff = self.settings.backoff_init_ms / 1000
        errors: list[str] = []
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                self.counters.inc("download.n_retries")
                time.sleep(backoff)
                backoff *= 2
            for step in range(len(hosts)):
                index = (self.active_host + step) % len(hosts)
                self.counters.inc("download.n_requests")
                started = time.monotonic()
                try:
                    data = self._get_from_host(hosts[index], relpath)
                except (OSError, DownloadError) as exc:
                    errors.append(f"{hosts[index]}: {exc}")
                    self.host_down.add(index)
                    if len(hosts) > 1:
                        self.counters.inc("download.n_host_failover")
                        self.active_host = (index + 1) % len(hosts)
                        self.log.info(f"failed to download from {hosts[index]}, switching host")
                    continue
                self.host_down.discard(index)
                self.counters.inc("download.sz_transferred_bytes", len(data))
                self.counters.inc(
                    "download.sz_transfer_time", int((time.monotonic() - started) * 1000)
                )
                return data
        raise DownloadError(f"failed to download {relpath}: " + "; ".join(errors[-3:]))

    def fetch(self, content_hash: str, suffix: str = "", *, pin: bool = False) -> Path:
        """Return the cache path of an object, downloading it on a miss.

        Raises:
            DownloadError: the object could not be downloaded or was corrupt.
            OSError: the cache could not be written.
        """
        self.counters.inc("fetch.n_invocations")
        rel = object_path(content_hash, suffix)[len("data/") :]
        with self._lock:
            lock = self._object_locks.setdefault(rel, threading.Lock())
        with lock:
            target = self.cache / rel
            if not target.exists():
                self.counters.inc("fetch.n_downloads")
                data = self.download(object_path(content_hash, suffix))
                actual = hashlib.sha1(data, usedforsecurity=False).hexdigest()
                if actual != content_hash:
                    self.log.info(f"hash mismatch for {rel}: got {actual}")
                    raise DownloadError(f"corrupted object {rel}")
                self._store(target, data)
                self.log.info(f"downloaded {rel} ({len(data)} bytes) from {self.active_url}")
        if pin:
            self.pinned[rel] = target.stat().st_size
        return target

    def _store(self, target: Path, data: bytes) -> None:
        target.parent.mkdir(exist_ok=True)
        tmp = self.cache / "txn" / f"fetch.{os.getpid()}.{threading.get_ident()}"
        tmp.write_bytes(data)
        tmp.replace(target)
        with self._lock:
            self.cache_bytes += len(data)
            self._cleanup()

    def unpin(self, content_hash: str) -> None:
        """Release the pin of a catalog that is no longer loaded."""
        self.pinned.pop(object_path(content_hash, CATALOG_SUFFIX)[len("data/") :], None)

    def fetch_manifest(self) -> Manifest:
        """Download and parse ``.cvmfspublished`` (never cached).

        Raises:
            DownloadError: no host served it.
            StratumError: it is malformed.
        """
        text = self.download(MANIFEST).decode(errors="replace")
        return parse_manifest(text, where=f"{self.active_url}/{MANIFEST}")

    def fetch_faults(self) -> Faults:
        """Read the simulation's fault knobs from the active host (uncounted).

        Raises:
            StratumError: the fault file is malformed.
        """
        try:
            data = self._get_once(self.active_url, FAULTS, "DIRECT")
        except OSError:
            return Faults()  # no fault file (or unreachable): no faults
        return parse_faults(data.decode(errors="replace"), where=f"{self.active_url}/{FAULTS}")

    @property
    def active_url(self) -> str:
        """The URL of the host currently in use."""
        return self.settings.server_urls[self.active_host]
