"""Turn parsed cvmfs configuration into the simulated client's settings (pure).

Defaults and derived paths follow the real client (``mount/default.conf``,
``mountpoint.cc``, ``cvmfs_talk.cc DeterminePaths``): the cache directory is
``CVMFS_CACHE_DIR``, else ``<CVMFS_CACHE_BASE>/shared`` for a shared cache or
``<CVMFS_CACHE_BASE>/<fqrn>``; the workspace is ``CVMFS_WORKSPACE``, else the
cache directory; the talk socket is ``CVMFS_TALK_SOCKET``, else
``<workspace>/cvmfs_io.<fqrn>``. cvmfs2 itself binds it as
``./cvmfs_io.<fqrn>`` (``mountpoint.cc``: ``talk_socket_path_``), relative to
the workspace it has changed into (``FileSystem::SetupCwd``);
:attr:`Settings.talk_bind` is that spelling, :attr:`Settings.talk_socket` the
absolute path a client uses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cvmfsd.loader import LoaderCode

VERSION = "2.13.3"


class SettingsError(Exception):
    """The configuration cannot be used; carries the loader exit code."""

    def __init__(self, code: LoaderCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _is_on(value: str) -> bool:
    return value.strip().upper() in ("YES", "ON", "1", "TRUE")


def _int(config: Mapping[str, str], key: str, default: int) -> int:
    raw = config.get(key, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(
            LoaderCode.OPTIONS, f"Failed to parse {key}={raw!r}: expected an integer"
        ) from None


@dataclass(frozen=True)
class Settings:
    """Everything the simulated cvmfs2 needs from its configuration."""

    fqrn: str
    mountpoint: str
    server_urls: tuple[str, ...]
    proxy_groups: tuple[tuple[str, ...], ...]
    proxy_config: str
    timeout: int
    timeout_direct: int
    max_retries: int
    backoff_init_ms: int
    cache_base: Path
    shared_cache: bool
    cache_dir: Path
    workspace: Path
    talk_socket: Path
    talk_bind: str
    quota_limit_mb: int
    nfiles: int
    usyslog: Path | None
    debuglog: Path | None
    parameters: tuple[tuple[str, str, str], ...]

    @property
    def maxfd(self) -> int:
        """Open-file budget as the real client reports it (CVMFS_NFILES - 512)."""
        return self.nfiles - 512


def make_settings(
    config: Mapping[str, str],
    fqrn: str,
    mountpoint: str,
    *,
    sources: Mapping[str, str] | None = None,
) -> Settings:
    """Derive the settings for mounting ``fqrn`` on ``mountpoint``.

    Args:
        config: the parsed configuration (see :func:`cvmfsconf.parse_config`).
        fqrn: the repository name (already validated).
        mountpoint: the absolute mount point.
        sources: the file each key came from, for ``cvmfs_talk parameters``.

    Returns:
        The frozen settings.

    Raises:
        SettingsError: a missing or malformed option, with the loader code
            (``OPTIONS``, or ``WPAD`` when only ``auto`` proxies are configured).
    """
    org = fqrn.split(".", 1)[0]
    raw_urls = config.get("CVMFS_SERVER_URL", "").strip()
    if not raw_urls:
        raise SettingsError(LoaderCode.OPTIONS, "Failed to configure: CVMFS_SERVER_URL required")
    urls = tuple(
        u.strip().replace("@fqrn@", fqrn).replace("@org@", org).rstrip("/")
        for u in raw_urls.split(";")
        if u.strip()
    )
    for url in urls:
        if not url.startswith(("file:///", "http://")):
            raise SettingsError(
                LoaderCode.OPTIONS,
                f"Failed to configure: server URL {url!r} is not file:///... or http://...",
            )
    proxy_config = config.get("CVMFS_HTTP_PROXY", "").strip()
    if not proxy_config:
        raise SettingsError(LoaderCode.OPTIONS, "Failed to configure: CVMFS_HTTP_PROXY required")
    # Groups are separated by ';', members of a load-balance group by '|'.
    # 'auto' would be resolved through WPAD/PAC, which the simulation cannot
    # reach, so it resolves to nothing, as it does on an isolated node.
    groups = tuple(
        members
        for group in proxy_config.split(";")
        if (members := tuple(p for p in group.split("|") if p and p.lower() != "auto"))
    )
    if not groups:
        raise SettingsError(LoaderCode.WPAD, "Failed to discover HTTP proxy servers")
    cache_base = Path(config.get("CVMFS_CACHE_BASE") or "/var/lib/cvmfs")
    shared = _is_on(config.get("CVMFS_SHARED_CACHE", "yes"))
    cache_dir = Path(config.get("CVMFS_CACHE_DIR") or (cache_base / ("shared" if shared else fqrn)))
    workspace = Path(config.get("CVMFS_WORKSPACE") or cache_dir)
    talk_bind = config.get("CVMFS_TALK_SOCKET") or f"./cvmfs_io.{fqrn}"
    talk = workspace / talk_bind if not talk_bind.startswith("/") else Path(talk_bind)
    talk = Path(os.path.normpath(talk))
    debuglog = config.get("CVMFS_DEBUGLOG", "")
    usyslog = config.get("CVMFS_USYSLOG", "")
    nfiles = _int(config, "CVMFS_NFILES", 131072)
    if nfiles <= 512:
        raise SettingsError(LoaderCode.OPTIONS, f"Failed to set CVMFS_NFILES={nfiles}: too low")
    return Settings(
        fqrn=fqrn,
        mountpoint=mountpoint,
        server_urls=urls,
        proxy_groups=groups,
        proxy_config=proxy_config,
        timeout=_int(config, "CVMFS_TIMEOUT", 5),
        timeout_direct=_int(config, "CVMFS_TIMEOUT_DIRECT", 10),
        max_retries=_int(config, "CVMFS_MAX_RETRIES", 1),
        backoff_init_ms=1000 * _int(config, "CVMFS_BACKOFF_INIT", 2),
        cache_base=cache_base,
        shared_cache=shared,
        cache_dir=cache_dir,
        workspace=workspace,
        talk_socket=talk,
        talk_bind=talk_bind,
        quota_limit_mb=_int(config, "CVMFS_QUOTA_LIMIT", 4000),
        nfiles=nfiles,
        usyslog=Path(usyslog) if usyslog else None,
        debuglog=Path(debuglog) if debuglog else None,
        parameters=tuple(
            (key, value, (sources or {}).get(key, "@INTERNAL@"))
            for key, value in sorted(config.items())
        ),
    )
