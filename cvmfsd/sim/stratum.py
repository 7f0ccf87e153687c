"""The simulated Stratum 1: publish a directory tree as a repository revision.

Layout of repository ``<fqrn>`` under a stratum directory ``S`` (modelled on the
real server layout, so a plain HTTP server over ``S`` serves it as the real
``http://host/cvmfs/<fqrn>`` URLs would):

- ``S/<fqrn>/.cvmfspublished``: the manifest. Text lines ``C<root catalog hash>``,
  ``D<ttl seconds>``, ``N<fqrn>``, ``S<revision>``, ``T<unix time>``, then ``--``.
  The real manifest is followed by a signature; the simulation stops at ``--``.
- ``S/<fqrn>/data/<2 hex>/<38 hex>``: content-addressed objects (SHA-1 of the
  content). The root catalog carries the suffix ``C``, as in the real store.
- ``S/<fqrn>/.cvmfsfaults``: JSON fault knobs read by the simulated ``cvmfs2``
  (not part of real CVMFS).

The real catalog is an SQLite database; here it is a JSON object mapping a
repository-relative path (``""`` for the root, ``"dir/file"`` below it) to an
entry ``{"type": "d"|"f"|"l", "mode", "size", "mtime", "hash"?, "target"?}``.

Everything here is plain, synchronous file I/O; the ``cvmfsd sim`` CLI and the
tests call it directly. Writes are atomic (temporary file, then rename), so a
mounted ``cvmfs2`` never reads half a manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from cvmfsd.names import repo_name_problem
from cvmfsd.sim._faults import Faults, StratumError, make_faults, parse_faults

__all__ = [
    "CATALOG_SUFFIX",
    "FAULTS",
    "MANIFEST",
    "Catalog",
    "Entry",
    "Faults",
    "Manifest",
    "StratumError",
    "load_catalog",
    "object_path",
    "parse_catalog",
    "parse_faults",
    "parse_manifest",
    "publish",
    "read_faults",
    "read_manifest",
    "set_faults",
    "validate_fqrn",
]

MANIFEST = ".cvmfspublished"
FAULTS = ".cvmfsfaults"
CATALOG_SUFFIX = "C"

#: What one catalog entry looks like once parsed.
Entry = Mapping[str, Union[str, int]]
Catalog = Mapping[str, Entry]

_HASH = re.compile(r"[0-9a-f]{40}")


def validate_fqrn(fqrn: str) -> str:
    """Check that ``fqrn`` is a safe repository name and return it.

    A repository name ends up in paths and in shell command lines, so only
    lowercase letters, digits, ``-`` and ``.`` are allowed, with at least one
    dot, no empty label (hence no ``..``), no leading dot or dash, at most
    255 characters.

    Args:
        fqrn: the fully qualified repository name, e.g. ``atlas.cern.ch``.

    Returns:
        ``fqrn`` unchanged.

    Raises:
        StratumError: the name is not acceptable.
    """
    problem = repo_name_problem(fqrn)
    if problem:
        raise StratumError(problem)
    return fqrn


def object_path(content_hash: str, suffix: str = "") -> str:
    """Return the store-relative path ``data/ab/cdef...[suffix]`` of an object.

    Raises:
        StratumError: ``content_hash`` is not 40 lowercase hex digits.
    """
    if not _HASH.fullmatch(content_hash):
        raise StratumError(
            f"invalid object hash {content_hash!r}: expected 40 lowercase hex digits"
        )
    return f"data/{content_hash[:2]}/{content_hash[2:]}{suffix}"


@dataclass(frozen=True)
class Manifest:
    """The parsed ``.cvmfspublished`` of one revision."""

    root_hash: str
    ttl: int
    fqrn: str
    revision: int
    timestamp: int

    def render(self) -> str:
        """Render the manifest text, as published."""
        return (
            f"C{self.root_hash}\nD{self.ttl}\nN{self.fqrn}\nS{self.revision}\n"
            f"T{self.timestamp}\n--\n"
        )


def parse_manifest(text: str, *, where: str = "manifest") -> Manifest:
    """Parse manifest text (the lines before ``--``); unknown keys are ignored.

    Raises:
        StratumError: a required key (C, D, N, S, T) is missing or malformed.
    """
    keys: dict[str, str] = {}
    for line in text.splitlines():
        if line == "--":
            break
        if line:
            keys[line[0]] = line[1:]
    try:
        manifest = Manifest(
            root_hash=keys["C"],
            ttl=int(keys["D"]),
            fqrn=keys["N"],
            revision=int(keys["S"]),
            timestamp=int(keys["T"]),
        )
    except (KeyError, ValueError) as exc:
        raise StratumError(
            f"{where}: malformed manifest ({exc!r}); expected lines C<hash>, D<ttl>, "
            "N<fqrn>, S<revision>, T<timestamp>, then '--'"
        ) from None
    object_path(manifest.root_hash)  # validates the hash
    return manifest


def repo_dir(stratum: Path, fqrn: str) -> Path:
    """Return ``stratum/<fqrn>`` after validating the name."""
    return Path(stratum) / validate_fqrn(fqrn)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _store(repo: Path, data: bytes, suffix: str = "") -> str:
    digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    target = repo / object_path(digest, suffix)
    if not target.exists():  # content-addressed: an existing object is identical
        _write_atomic(target, data)
    return digest


def _scan(source: Path, repo: Path) -> dict[str, dict[str, object]]:
    """Store every file of ``source`` and return the catalog entries."""
    catalog: dict[str, dict[str, object]] = {}
    for path in sorted([source, *source.rglob("*")]):
        rel = path.relative_to(source).as_posix()
        rel = "" if rel == "." else rel
        st = path.lstat()
        entry: dict[str, object] = {
            "mode": stat.S_IMODE(st.st_mode),
            "mtime": int(st.st_mtime),
        }
        if stat.S_ISLNK(st.st_mode):
            target = str(path.readlink())
            entry.update(type="l", target=target, size=len(os.fsencode(target)))
        elif stat.S_ISDIR(st.st_mode):
            entry.update(type="d", size=4096)
        elif stat.S_ISREG(st.st_mode):
            entry.update(type="f", size=st.st_size, hash=_store(repo, path.read_bytes()))
        else:
            raise StratumError(f"{path}: only regular files, directories and symlinks publish")
        catalog[rel] = entry
    return catalog


def publish(stratum: Path, fqrn: str, source: Path, *, ttl: int = 240) -> int:
    """Publish the tree ``source`` as the next revision of repository ``fqrn``.

    Regular files, directories and symlinks are copied into the object store;
    the catalog and then the manifest are written last, so a client never sees
    a manifest whose objects are missing.

    Args:
        stratum: the stratum directory (created if needed).
        fqrn: the repository name.
        source: the directory to publish.
        ttl: the root catalog TTL in seconds (manifest ``D``).

    Returns:
        The new revision: 1 for the first publication, then previous + 1.

    Raises:
        StratumError: a bad name, source, TTL or an unsupported file type.
    """
    repo = repo_dir(stratum, fqrn)
    source = Path(source)
    if not source.is_dir():
        raise StratumError(f"publish {fqrn}: source {source} is not a directory")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
        raise StratumError(f"publish {fqrn}: ttl={ttl!r}, expected seconds >= 1")
    previous = read_manifest(stratum, fqrn).revision if (repo / MANIFEST).exists() else 0
    catalog = _scan(source, repo)
    blob = json.dumps(catalog, sort_keys=True, separators=(",", ":")).encode()
    root_hash = _store(repo, blob, CATALOG_SUFFIX)
    manifest = Manifest(
        root_hash=root_hash, ttl=ttl, fqrn=fqrn, revision=previous + 1, timestamp=int(time.time())
    )
    _write_atomic(repo / MANIFEST, manifest.render().encode())
    return manifest.revision


def read_manifest(stratum: Path, fqrn: str) -> Manifest:
    """Read the current manifest of ``fqrn``.

    Raises:
        StratumError: the repository was never published or its manifest is bad.
    """
    path = repo_dir(stratum, fqrn) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StratumError(f"{path}: no manifest; publish {fqrn} first") from None
    return parse_manifest(text, where=str(path))


def parse_catalog(blob: bytes, *, where: str = "catalog") -> dict[str, Entry]:
    """Parse a JSON catalog object and check the shape of every entry.

    Raises:
        StratumError: not a JSON object of entries, or no root entry.
    """
    try:
        data = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StratumError(f"{where}: not a JSON catalog ({exc})") from None
    if not isinstance(data, dict) or data.get("", {}).get("type") != "d":
        raise StratumError(f"{where}: expected a JSON object with a root directory entry ''")
    for path, entry in data.items():
        if not isinstance(entry, dict) or entry.get("type") not in ("d", "f", "l"):
            raise StratumError(f"{where}: entry {path!r} has no valid type (d, f or l)")
    return data


def load_catalog(stratum: Path, fqrn: str, root_hash: str | None = None) -> dict[str, Entry]:
    """Load the catalog ``root_hash`` (default: the current revision's).

    Raises:
        StratumError: the manifest or catalog object is missing or malformed.
    """
    if root_hash is None:
        root_hash = read_manifest(stratum, fqrn).root_hash
    path = repo_dir(stratum, fqrn) / object_path(root_hash, CATALOG_SUFFIX)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise StratumError(f"{path}: catalog object missing") from None
    return parse_catalog(blob, where=str(path))


def read_faults(stratum: Path, fqrn: str) -> Faults:
    """Read the fault knobs of ``fqrn`` (no file means no faults).

    Raises:
        StratumError: the fault file is malformed.
    """
    path = repo_dir(stratum, fqrn) / FAULTS
    try:
        return parse_faults(path.read_text(), where=str(path))
    except FileNotFoundError:
        return Faults()


def set_faults(stratum: Path, fqrn: str, **knobs: object) -> Faults:
    """Merge ``knobs`` into the fault file of ``fqrn``; a ``None`` value clears one.

    Example: ``set_faults(s, "a.b.c", crash_after=0)``, ``set_faults(s, "a.b.c",
    crash_after=None)``.

    Returns:
        The knobs now in force.

    Raises:
        StratumError: an unknown knob or a bad value; the file is left unchanged.
    """
    path = repo_dir(stratum, fqrn) / FAULTS
    merged = {**read_faults(stratum, fqrn).to_json(), **knobs}
    merged = {k: v for k, v in merged.items() if v is not None}
    faults = make_faults(merged, str(path))
    _write_atomic(path, json.dumps(faults.to_json(), sort_keys=True).encode())
    return faults
