"""Create a simulated cvmfsexec distribution directory.

The layout is the one ``makedist`` of cvmfsexec 4.51 produces (cvmfs-facts.md,
part A §1.3), with the real scripts' interfaces but the simulated binaries::

    DIR/cvmfsexec, mountrepo, umountrepo
    DIR/dist/.cvmfsexecdist                  disttype and machtype
    DIR/dist/usr/bin/cvmfs2, cvmfs_talk      wrappers running cvmfsd.sim
    DIR/dist/usr/libexec/cvmfsexec-sim/      the stages of the simulated cvmfsexec
    DIR/dist/etc/cvmfs/default.conf          the client's defaults
    DIR/dist/etc/cvmfs/default.d/50-sim.conf CVMFS_CONFIG_REPOSITORY, CVMFS_SERVER_URL
    DIR/dist/etc/cvmfs/default.local         site settings (proxy)
    DIR/dist/var/lib/cvmfs/                  the cache (DIR/dist/cvmfs/<repo>,
                                             DIR/dist/var/run/cvmfs/ and DIR/log/
                                             are made by mountrepo)

The configuration repository is published into the stratum if it is not there
yet, so a fresh distribution mounts at once.

:func:`pack_dist` is ``makedist -o``: one self-extracting file, the form in
which GlideinWMS ships cvmfsexec (see :func:`pack_dist` for what it does).
"""

from __future__ import annotations

import io
import shlex
import shutil
import sys
import tarfile
import tempfile
from importlib import resources
from pathlib import Path

from cvmfsd.sim import stratum as stratum_mod

DEFAULT_CONFIG_REPO = "config-sim.cvmfsd.test"
DEFAULT_MACHTYPE = "rhel9-x86_64"
SCRIPTS = ("cvmfsexec", "mountrepo", "umountrepo")
LIBEXEC = ("commands", "ns-root", "ns-user")


class DistError(Exception):
    """The distribution cannot be made where, or as, it was asked for."""


def _wrapper(python: str, module: str) -> str:
    return f'#!/bin/sh\nexec {shlex.quote(python)} -m {module} "$@"\n'


def _default_conf() -> str:
    # The simulated client's built-in defaults, in the spirit of cvmfs's own
    # /etc/cvmfs/default.conf (whose paths mountrepo relocates into dist/).
    return (
        "# Defaults of the simulated cvmfs client (cvmfsd.sim).\n"
        "# Override them in default.local, never here.\n"
        "CVMFS_CACHE_BASE=/var/lib/cvmfs\n"
        "CVMFS_SHARED_CACHE=yes\n"
        "CVMFS_QUOTA_LIMIT=4000\n"
        "CVMFS_TIMEOUT=5\n"
        "CVMFS_TIMEOUT_DIRECT=10\n"
        "CVMFS_MOUNT_DIR=/cvmfs\n"
        "CVMFS_RELOAD_SOCKETS=/var/run/cvmfs\n"
    )


def make_dist(
    target: Path,
    *,
    stratum: Path,
    config_repo: str = DEFAULT_CONFIG_REPO,
    server_url: str | None = None,
    proxy: str = "DIRECT",
    machtype: str = DEFAULT_MACHTYPE,
    python: str = sys.executable,
) -> Path:
    """Create the distribution directory ``target`` and return it, absolute.

    Args:
        target: the directory to create; it must not exist yet (as with makedist).
        stratum: the local stratum that serves the repositories.
        config_repo: the configuration repository's name (CVMFS_CONFIG_REPOSITORY).
        server_url: CVMFS_SERVER_URL; by default ``file://<stratum>/@fqrn@``.
        proxy: CVMFS_HTTP_PROXY written to default.local.
        machtype: recorded in ``dist/.cvmfsexecdist``.
        python: the interpreter the cvmfs2 wrapper runs; it must have cvmfsd
            and pyfuse3 installed and be usable by whoever runs cvmfsexec.

    Raises:
        DistError: ``target`` exists, or a name or path is unusable.
    """
    target = target.absolute()
    stratum = stratum.absolute()
    if target.exists():
        raise DistError(f"{target}: already exists; makedist creates a new distribution only")
    try:
        stratum_mod.validate_fqrn(config_repo)
    except stratum_mod.StratumError as exc:
        raise DistError(f"config repository: {exc}") from None
    if server_url is None:
        server_url = f"file://{stratum}/@fqrn@"
    for name, value in (("server URL", server_url), ("proxy", proxy), ("target", str(target)),
                        ("machine type", machtype)):
        if any(c in value for c in "\n\"'`$\\"):
            raise DistError(
                f"{name} {value!r}: quotes, $, backslashes and newlines are not allowed"
            )
    if not (stratum / config_repo / ".cvmfspublished").exists():
        _publish_config_repo(stratum, config_repo)

    dist = target / "dist"
    # What the rpms hold.  dist/cvmfs/<repo>, dist/var/run/cvmfs and log/ are
    # made by mountrepo on the first mount, as in a real distribution.
    for sub in ("usr/bin", "usr/lib64", "usr/libexec/cvmfsexec-sim", "etc/cvmfs/default.d",
                "etc/cvmfs/domain.d", "etc/cvmfs/config.d", "var/lib/cvmfs"):
        (dist / sub).mkdir(parents=True)

    package = resources.files("cvmfsd.sim")
    for name in SCRIPTS:
        _install(target / name, package.joinpath("scripts").joinpath(name).read_text(), 0o755)
    for name in LIBEXEC:
        text = package.joinpath("libexec").joinpath(name).read_text()
        _install(dist / "usr/libexec/cvmfsexec-sim" / name, text, 0o644)
    _install(dist / "usr/bin/cvmfs2", _wrapper(python, "cvmfsd.sim.cvmfs2"), 0o755)
    _install(dist / "usr/bin/cvmfs_talk", _wrapper(python, "cvmfsd.sim.talk"), 0o755)

    etc = dist / "etc/cvmfs"
    _install(etc / "default.conf", _default_conf(), 0o644)
    _install(
        etc / "default.d/50-sim.conf",
        "# Written by cvmfsd sim makedist: where the simulated stratum is.\n"
        f"CVMFS_CONFIG_REPOSITORY={config_repo}\n"
        f'CVMFS_SERVER_URL="{server_url}"\n',
        0o644,
    )
    # The real makedist writes CVMFS_HTTP_PROXY="auto;DIRECT" plus WLCG PAC
    # URLs; nothing here can reach those, so the simulation goes DIRECT.
    _install(etc / "default.local", f'CVMFS_HTTP_PROXY="{proxy}"\n', 0o644)
    _install(etc.parent / "os-release", 'ID_LIKE="rhel"\nVERSION_ID="9"\n', 0o644)
    _install(dist / ".cvmfsexecdist", f"disttype: standard\nmachtype: {machtype}\n", 0o644)
    return target


def _install(path: Path, text: str, mode: int) -> None:
    path.write_text(text)
    path.chmod(mode)


def _publish_config_repo(stratum: Path, config_repo: str) -> None:
    with tempfile.TemporaryDirectory(prefix="cvmfsd-config-") as tmp:
        root = Path(tmp)
        etc = root / "etc/cvmfs"
        for sub in ("domain.d", "config.d"):
            (etc / sub).mkdir(parents=True)
        (etc / "default.conf").write_text(
            "# Configuration repository of the simulated stratum (cvmfsd.sim).\n"
            "CVMFS_USE_GEOAPI=no\n"
        )
        stratum.mkdir(parents=True, exist_ok=True)
        stratum_mod.publish(stratum, config_repo, root)


def remove_dist(target: Path) -> None:
    """Delete a distribution directory (after everything in it is unmounted)."""
    shutil.rmtree(target)


#: The line after which a self-extracting file holds its gzipped tar (makedist:228,232).
TAR_MARKER = "__TAR_BELOW__"
#: Where a self-extracting file unpacks, beside itself (makedist:224).
UNPACKED = ".cvmfsexec"
#: What makedist -o packs: the tools and dist/, without cache or run-time state (makedist:234).
PACKED = SCRIPTS
_NOT_PACKED = ("dist/var/run/cvmfs/", "dist/var/lib/cvmfs/")

# Our own words for what makedist -o's header does (makedist:221-232): unpack
# into .cvmfsexec beside the file, afresh whenever the file is newer than that
# directory (bash -nt: also when it does not exist), then exec the unpacked
# cvmfsexec with every argument.  Unlike the real header, paths are quoted.
_HEADER = f"""#!/bin/bash
# A cvmfsexec distribution in one file, as cvmfsexec's `makedist -o` makes it
# (written by cvmfsd sim makedist -o).  It unpacks into {UNPACKED}/ beside
# itself and runs {UNPACKED}/cvmfsexec with the arguments it was given.
packed="$0"
unpacked="$(cd "$(dirname "$packed")" && pwd)/{UNPACKED}"
if [ "$packed" -nt "$unpacked" ]; then
    rm -rf "$unpacked"
    mkdir "$unpacked"
    marker=$(grep -a -n -m 1 '^{TAR_MARKER}' "$packed" | cut -d: -f1)
    tail -n "+$((marker + 1))" "$packed" | tar -xzf - -C "$unpacked"
fi
exec "$unpacked/cvmfsexec" "$@"
{TAR_MARKER}
"""


def pack_dist(source: Path, output: Path) -> Path:
    """Pack the distribution ``source`` into the self-extracting file ``output``.

    This is ``makedist -o``: a bash header, then a gzipped tar of ``cvmfsexec``,
    ``mountrepo``, ``umountrepo`` and ``dist/`` without the contents of
    ``dist/var/lib/cvmfs`` and ``dist/var/run/cvmfs``.  Run, the file unpacks
    into ``.cvmfsexec`` beside itself when it is newer than that directory and
    execs ``.cvmfsexec/cvmfsexec`` with its arguments, so ``FILE -v`` unpacks
    and prints the version.  ``output`` is overwritten.

    Raises:
        DistError: ``source`` is not a distribution made by makedist, or
            ``output`` cannot be written.
    """
    source = source.absolute()
    if not (source / "dist/.cvmfsexecdist").is_file():
        raise DistError(
            "Must be run from where cvmfs distribution was made by makedist (without -s): "
            f"{source / 'dist/.cvmfsexecdist'} is missing"
        )

    def keep(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if member.name.startswith(_NOT_PACKED) else member

    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as tar:
        for name in (*PACKED, "dist"):
            tar.add(source / name, arcname=name, filter=keep)
    output = output.absolute()
    try:
        output.write_bytes(_HEADER.encode() + payload.getvalue())
        output.chmod(0o755)
    except OSError as exc:
        raise DistError(f"cannot write the self-extracting file {output}: {exc.strerror}; "
                        "expected a writable file in an existing directory") from None
    return output
