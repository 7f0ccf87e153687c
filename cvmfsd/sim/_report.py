"""What the simulated client reports: magic xattr values and talk answers.

Formats follow the real client (``magic_xattr.cc``, ``talk.cc``,
``options.cc``); units are the real ones (KiB, minutes, percent). Pure
formatting over a :class:`Client`; no I/O except ``os.getpid``.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable

from cvmfsd.sim._client import Client
from cvmfsd.sim._settings import VERSION
from cvmfsd.sim._state import COUNTERS

_MB = 1024 * 1024


def _hitrate(c: Client) -> str:
    invocations = c.counters["fetch.n_invocations"]
    if invocations == 0:
        return "n/a"
    return f"{100.0 * (1 - c.counters['fetch.n_downloads'] / invocations):.3f}"


def _speed(c: Client) -> str:
    ms = c.counters["download.sz_transfer_time"]
    if ms == 0:
        return "n/a"
    return str(int(1000 * (c.counters["download.sz_transferred_bytes"] / 1024) / ms))


def _tree_counters(c: Client) -> str:
    kinds = {"f": "regular", "l": "symlink", "d": "dir"}
    counts = dict.fromkeys(kinds.values(), 0)
    size = 0
    for entry in c.tree.catalog.values():
        counts[kinds[str(entry["type"])]] += 1
        if entry["type"] == "f":
            size += int(entry["size"])
    counts["file_size"] = size
    return "".join(f"{name},{value}\n" for name, value in counts.items())


def _active_proxy(c: Client) -> str:
    if c.fetcher.active_url.startswith("file://"):
        return "DIRECT"
    return c.settings.proxy_groups[c.fetcher.active_proxy][0]


#: Magic xattrs (without the ``user.`` prefix) and how to compute each value.
XATTRS: dict[str, Callable[[Client], str]] = {
    "catalog_counters": _tree_counters,
    # cvmfs.cc ExpiresMagicXattr: (valid_until - now) / 60 in C, i.e. truncated
    # towards zero, and negative once the TTL ran out without a new catalog.
    "expires": lambda c: str(int(c.expires_in() / 60)),
    "fqrn": lambda c: c.settings.fqrn,
    "hitrate": _hitrate,
    "host": lambda c: c.fetcher.active_url,
    "host_list": lambda c: ";".join(c.settings.server_urls),
    "inode_max": lambda c: str(c.inodes.max),
    "logbuffer": lambda c: "\n".join(c.log.buffer) + "\n",
    "maxfd": lambda c: str(c.settings.maxfd),
    "nclg": lambda c: "1",
    "ncleanup24": lambda c: str(sum(t > time.time() - 86400 for t in c.fetcher.cleanups)),
    "ndiropen": lambda c: str(c.counters["cvmfs.n_fs_dir_open"]),
    "ndownload": lambda c: str(c.counters["fetch.n_downloads"]),
    "nioerr": lambda c: str(c.counters["cvmfs.n_io_error"]),
    "nopen": lambda c: str(c.counters["cvmfs.n_fs_open"]),
    "pid": lambda c: str(os.getpid()),
    "proxy": _active_proxy,
    "repo_counters": _tree_counters,
    "revision": lambda c: str(c.tree.manifest.revision),
    "root_hash": lambda c: c.tree.manifest.root_hash,
    "rx": lambda c: str(c.counters["download.sz_transferred_bytes"] // 1024),
    "speed": _speed,
    "tag": lambda c: "",
    "timeout": lambda c: str(c.settings.timeout),
    "timeout_direct": lambda c: str(c.settings.timeout_direct),
    "timestamp_last_ioerr": lambda c: str(c.last_ioerr),
    "uptime": lambda c: str(int((time.time() - c.boot_time) // 60)),
    "usedfd": lambda c: str(len(c.files)),
    "useddirp": lambda c: str(len(c.dirs)),
    "version": lambda c: f"{VERSION}.0",
}


def xattr(client: Client, name: str) -> str | None:
    """The value of magic xattr ``name`` (no ``user.`` prefix), or None if unknown."""
    compute = XATTRS.get(name)
    return None if compute is None else compute(client)


def cache_size(c: Client) -> str:
    """The ``cache size`` answer."""
    used = c.fetcher.cache_bytes
    pinned = sum(c.fetcher.pinned.values())
    return (
        f"Current cache size is {used // _MB}MB ({used} Bytes), "
        f"pinned: {pinned // _MB}MB ({pinned} Bytes)\n"
    )


def host_info(c: Client) -> str:
    """The ``host info`` answer."""
    lines = [
        f"  [{i}] {url} ({'host down' if i in c.fetcher.host_down else 'unprobed'})\n"
        for i, url in enumerate(c.settings.server_urls)
    ]
    lines.append(f"Active host {c.fetcher.active_host}: {c.fetcher.active_url}\n")
    return "".join(lines)


def proxy_info(c: Client) -> str:
    """The ``proxy info`` answer (without DNS TTLs, which the simulation has none of)."""
    groups = c.settings.proxy_groups
    lines = ["Load-balance groups:\n"]
    lines += [f"[{i}] {', '.join(group)}\n" for i, group in enumerate(groups)]
    active = c.fetcher.active_proxy
    lines.append(f"Active proxy: [{active}] {groups[active][0]}\n")
    return "".join(lines)


def timeout_info(c: Client) -> str:
    """The ``timeout info`` answer."""

    def fmt(seconds: int) -> str:
        return f"{seconds}s" if seconds else "no timeout"

    return (
        f"Timeout with proxy: {fmt(c.settings.timeout)}\n"
        f"Timeout without proxy: {fmt(c.settings.timeout_direct)}\n"
    )


def parameters(c: Client) -> str:
    """The ``parameters`` answer: ``KEY=VALUE    # from <file>`` per option."""
    return "".join(
        f"{key}={shlex.quote(value)}    # from {source}\n"
        for key, value, source in c.settings.parameters
    )


def open_catalogs(c: Client) -> str:
    """The ``open catalogs`` answer: the root catalog only (no nested catalogs)."""
    m = c.tree.manifest
    return f"- / (revision {m.revision}, hash {m.root_hash}C)\n"


def raw_counters(c: Client) -> str:
    """The ``Raw Counters:`` table body (``Name|Value|Description``), sorted by name."""
    values = c.counters.snapshot()
    lines = ["Name|Value|Description\n"]
    lines += [f"{name}|{values[name]}|{COUNTERS[name]}\n" for name in sorted(values)]
    return "".join(lines)


def internal_affairs(c: Client) -> str:
    """The ``internal affairs`` answer.

    The real answer has SQLite statistics and per-operation latency
    histograms between the flags and the raw counters; the simulation keeps
    no histograms and prints an empty section in their place.
    """
    revision = c.tree.manifest.revision
    return (
        "Inode Generation:\n"
        f"  init-catalog-revision: {revision}  current-catalog-revision: {revision}  "
        "incarnation: 0  inode generation: 0\n"
        "Cache Mode: read-write\n"
        "Drainout Mode: false\n"
        f"Maintenance Mode: false\n"
        "SQlite Statistics:\n"
        "  (simulated: catalogs are JSON)\n"
        "\nLatency distribution of system calls:\n"
        "  (not recorded by the simulation)\n"
        "\nRaw Counters:\n" + raw_counters(c)
    )


def metrics_prometheus(c: Client) -> str:
    """A subset of the 2.13 ``metrics prometheus`` answer (bare names, HELP/TYPE each)."""
    repo = c.settings.fqrn
    rows = [
        ("cvmfs_cached_bytes", "gauge", "CVMFS currently cached bytes.", c.fetcher.cache_bytes),
        (
            "cvmfs_pinned_bytes",
            "gauge",
            "CVMFS currently pinned bytes.",
            sum(c.fetcher.pinned.values()),
        ),
        (
            "cvmfs_total_cache_size_bytes",
            "gauge",
            "CVMFS configured cache size limit.",
            c.settings.quota_limit_mb * _MB,
        ),
        (
            "cvmfs_rx_total",
            "counter",
            "Shows the overall amount of downloaded bytes since mounting.",
            c.counters["download.sz_transferred_bytes"],
        ),
        (
            "cvmfs_ndownload_total",
            "counter",
            "Shows the overall number of downloaded files since mounting.",
            c.counters["fetch.n_downloads"],
        ),
        (
            "cvmfs_nioerr_total",
            "counter",
            "Shows the total number of I/O errors encountered.",
            c.counters["cvmfs.n_io_error"],
        ),
        ("cvmfs_timestamp_last_ioerr", "counter", "Timestamp of the last ioerror.", c.last_ioerr),
        (
            "cvmfs_uptime_seconds",
            "counter",
            "Shows the time since the repo was mounted.",
            int(time.time() - c.boot_time),
        ),
        ("cvmfs_pid", "gauge", "Shows the process id of the CernVM-FS Fuse process.", os.getpid()),
        ("cvmfs_nclg", "gauge", "Shows the number of currently loaded nested catalogs.", 1),
    ]
    out = []
    for name, kind, help_text, value in rows:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        out.append(f'{name}{{repo="{repo}"}} {value}\n')
    rev = c.tree.manifest.revision
    out.append("# HELP cvmfs_repo Shows the version of CVMFS used by this repository.\n")
    out.append("# TYPE cvmfs_repo gauge\n")
    out.append(
        f'cvmfs_repo{{repo="{repo}",mountpoint="{c.settings.mountpoint}",'
        f'version="{VERSION}.0",revision="{rev}"}} 1\n'
    )
    return "".join(out)
