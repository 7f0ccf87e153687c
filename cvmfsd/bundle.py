"""Build the one-file bundle of cvmfsd and cvmfsctl: ``python -m cvmfsd.bundle build``.

The bundle is a stdlib zip application (PEP 441) that any CPython >= 3.9 runs in
place: ``python3 cvmfsd.pyz run ...`` is ``cvmfsd run ...``, ``python3 cvmfsd.pyz
cvmfsctl get KEY`` is ``cvmfsctl get KEY``, and ``python3 cvmfsd.pyz -m MODULE``
runs one of cvmfsd's modules (how cvmfsd starts its own helpers from the bundle,
see :mod:`cvmfsd._selfexec`).  Nothing is extracted: modules are imported from
the zip by ``zipimport``, so a read-only location and a read-only home are fine.

Inside: the cvmfsd package (not :mod:`cvmfsd.sim`, nor this builder) and the
runtime dependencies as pinned pure-Python wheels from PyPI (:data:`PINS`,
checked against their sha256), fetched with ``pip download --only-binary :all:
--no-deps``.  python-prctl (compiled) is replaced by :mod:`cvmfsd._prctl`'s
ctypes path; pyfuse3 is the simulation's only.

Reproducible: the same checkout and wheels give the same bytes (entries sorted,
timestamps fixed at 1980-01-01, fixed modes, fixed compression level).

Usage::

    python -m cvmfsd.bundle build [-o dist/cvmfsd.pyz] [--wheels dist/wheels]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

#: The runtime dependencies: name, version, sha256 of the wheel.  The newest
#: versions that still support Python 3.9; exceptiongroup and typing_extensions
#: are needed below 3.11 only, and are harmless above.
PINS: tuple[tuple[str, str, str], ...] = (
    ("attrs", "26.1.0", "c647aa4a12dfbad9333ca4e71fe62ddc36f4e63b2d260a37a8b83d2f043ac309"),
    ("exceptiongroup", "1.3.2",
     "41c6a70dfec22050d3d8b43386b059a4dc0bca3f3d40a40971cb206fff1785af"),
    ("idna", "3.20", "ab7ae7122974553370f0bdb919e1a960b2cd1bc1ef0276416d896db81c14582c"),
    ("outcome", "1.3.0.post0",
     "e771c5ce06d1415e356078d3bdd68523f284b4ce5419828922b6871e65eda82b"),
    ("prometheus_client", "0.26.0",
     "fa93d06737aa02bacd05794768508bb97d2fbee28cb3bca04eaae92f0ca953d6"),
    ("pyroute2", "0.9.7", "01a2a3afe565a6acb0a0d5d8ac86c9682b6564407e3d9589070191ae94b737e8"),
    ("sniffio", "1.3.1", "2f6da418d1f1e0fddd844478f41680e794e6051915791a034ff65e5f100525a2"),
    ("sortedcontainers", "2.4.0",
     "a163dcaede0f1c021485e957a39245190e74249897e2ae4b2aa38595db237ee0"),
    ("structlog", "25.5.0", "a8453e9b9e636ec59bd9e79bbd4a72f025981b3ba0f5837aebf48f02f37a7f9f"),
    ("trio", "0.31.0", "b5d14cd6293d79298b49c3485ffd9c07e3ce03a6da8c7dfbe0cb3dd7dc9a4774"),
    ("typing_extensions", "4.16.0",
     "481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8"),
)

#: Parts of the checkout's cvmfsd package that stay out: the simulation (its
#: FUSE needs pyfuse3; no daemon module imports it) and this builder.
EXCLUDED = ("cvmfsd/sim/", "cvmfsd/bundle.py")
#: Parts of the wheels that stay out: test suites, compiled caches, RECORD.
EXCLUDED_PARTS = ("/_tests/", "/tests/", "/__pycache__/")

FIXED_TIME = (1980, 1, 1, 0, 0, 0)
SHEBANG = b"#!/usr/bin/env python3\n"

MAIN = '''\
"""cvmfsd bundle: python3 cvmfsd.pyz [cvmfsd|cvmfsctl] ARGS, or -m MODULE ARGS."""
import os
import sys

if sys.version_info < (3, 9):
    sys.stderr.write("cvmfsd: needs Python >= 3.9, this is %s (%s)\\n"
                     % (sys.version.split()[0], sys.executable))
    raise SystemExit(69)


def _cache(bundle, info):
    """The bundle unpacked under $CVMFSD_CACHE (made on first use), or None.

    Imports from the zip compile every module at every start; unpacked in a
    directory of ours, the interpreter keeps their bytecode.  Only in a
    directory that is ours and writable by no one else; any failure: None.
    """
    root = os.environ.get("CVMFSD_CACHE")
    if not root:
        return None
    target = os.path.join(root, "cvmfsd-" + info.DIGEST[:20])
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        for path in (root, target):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                break
            if st.st_uid != os.getuid() or st.st_mode & 0o022 or not os.path.isdir(path):
                return None
        else:
            if os.path.isfile(os.path.join(target, "__main__.py")):
                return target
        import shutil
        import tempfile
        import zipfile
        partial = tempfile.mkdtemp(prefix=".partial-", dir=root)
        with zipfile.ZipFile(bundle) as archive:
            archive.extractall(partial)
        try:
            os.rename(partial, target)
        except OSError:  # another process was first
            shutil.rmtree(partial, ignore_errors=True)
        return target
    except Exception:  # noqa: BLE001 - the zip always works
        return None


def _setup():
    import _cvmfsd_bundle as info
    bundle = info.BUNDLE = os.path.abspath(sys.path[0])
    cache = _cache(bundle, info) if os.path.isfile(bundle) else None
    if cache is not None:
        sys.path[0] = cache


def _version():
    import _cvmfsd_bundle as info
    lines = ["cvmfsd %s (bundle %s, Python %s)" % (info.VERSION, info.SOURCE,
                                                   sys.version.split()[0])]
    lines += ["  %s %s" % pin for pin in info.PINS]
    return "\\n".join(lines)


def main(argv):
    _setup()
    if argv[:1] == ["-m"] and len(argv) > 1:
        import runpy
        sys.argv = [argv[1]] + argv[2:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return 0
    command = "cvmfsd"
    if argv[:1] in (["cvmfsd"], ["cvmfsctl"]):
        command, argv = argv[0], argv[1:]
    if argv == ["--version"]:
        print(_version())
        return 0
    sys.argv = [command] + argv
    if command == "cvmfsctl":
        from cvmfsd.ctl import main as ctl_main
        return ctl_main(argv)
    from cvmfsd.cli import main as cli_main
    return cli_main(argv)


raise SystemExit(main(sys.argv[1:]))
'''


class BundleError(Exception):
    """The bundle cannot be built (a wheel missing, not matching its pin, ...)."""


def wheel_name(name: str, version: str) -> str:
    """The file name prefix of a pinned wheel (``trio-0.31.0-``)."""
    return f"{name}-{version}-"


def fetch_wheels(wheels: Path, *, python: str = sys.executable) -> list[Path]:
    """The pinned wheels in ``wheels``, downloaded with pip where missing; checked.

    Raises:
        BundleError: pip failed, or a wheel's sha256 is not its pin's.
    """
    wheels.mkdir(parents=True, exist_ok=True)
    found: list[Path] = []
    missing = [f"{name}=={version}" for name, version, _ in PINS
               if not _find(wheels, name, version)]
    if missing:
        ran = subprocess.run([python, "-m", "pip", "download", "--quiet", "--only-binary",
                              ":all:", "--no-deps", "--dest", str(wheels), *missing],
                             check=False, capture_output=True, text=True)
        if ran.returncode != 0:
            raise BundleError(f"pip download {' '.join(missing)} failed:\n{ran.stderr}")
    for name, version, sha256 in PINS:
        path = _find(wheels, name, version)
        if path is None:
            raise BundleError(f"no wheel of {name} {version} in {wheels} after pip download")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise BundleError(f"{path}: sha256 {digest}, expected {sha256} (the pin)")
        found.append(path)
    return found


def _find(wheels: Path, name: str, version: str) -> Path | None:
    for path in sorted(wheels.glob(f"{wheel_name(name, version)}*.whl")):
        if path.name.endswith("-none-any.whl"):
            return path
    return None


def _wheel_entries(path: Path) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as wheel:
        for info in wheel.infolist():
            name = info.filename
            if info.is_dir() or name.endswith((".pyc", "/RECORD")):
                continue
            if any(part in f"/{name}" for part in EXCLUDED_PARTS):
                continue
            yield name, wheel.read(info)


def _package_entries(checkout: Path) -> Iterator[tuple[str, bytes]]:
    package = checkout / "cvmfsd"
    for path in sorted(package.rglob("*")):
        name = path.relative_to(checkout).as_posix()
        if not path.is_file() or "__pycache__" in name or name.startswith(EXCLUDED):
            continue
        if path.suffix in (".py", ".sh", ".typed"):
            yield name, path.read_bytes()


def source_id(checkout: Path) -> str:
    """What the bundle was built from: ``git describe`` of the checkout, else 'unknown'."""
    try:
        ran = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty"],
                             check=False, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return ran.stdout.strip() if ran.returncode == 0 and ran.stdout.strip() else "unknown"


def build(output: Path, *, checkout: Path, wheels: Sequence[Path], source: str) -> int:
    """Write the bundle to ``output`` (atomically); its size in bytes.

    Raises:
        BundleError: two inputs provide the same file.
    """
    from cvmfsd import __version__

    entries: dict[str, bytes] = {}
    for name, data in [*_package_entries(checkout),
                       *(entry for wheel in wheels for entry in _wheel_entries(wheel))]:
        if name in entries:
            raise BundleError(f"{name} is provided twice")
        entries[name] = data
    entries["__main__.py"] = MAIN.encode()
    digest = hashlib.sha256()
    for name in sorted(entries):
        digest.update(f"{name}\0{len(entries[name])}\0".encode())
        digest.update(entries[name])
    pins = ", ".join(repr((name, version)) for name, version, _ in PINS)
    entries["_cvmfsd_bundle.py"] = (
        f'"""What this cvmfsd bundle holds (written by cvmfsd.bundle)."""\n'
        f"VERSION = {__version__!r}\nSOURCE = {source!r}\nPINS = ({pins},)\n"
        f"#: sha256 of every other entry: names the unpacked copy under $CVMFSD_CACHE\n"
        f"DIGEST = {digest.hexdigest()!r}\n"
        f"#: the bundle file, set by __main__ when it runs\nBUNDLE = None\n").encode()
    buffer = io.BytesIO()
    buffer.write(SHEBANG)
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3  # Unix, whatever the build host
            bundle.writestr(info, entries[name], compresslevel=9)
    data = buffer.getvalue()
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(output)
    return len(data)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cvmfsd.bundle build``; 0 on success, 1 on a build error."""
    parser = argparse.ArgumentParser(prog="python -m cvmfsd.bundle",
                                     description="Build the one-file cvmfsd bundle.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the bundle from this checkout")
    b.add_argument("-o", "--output", type=Path, default=Path("dist/cvmfsd.pyz"),
                   help="the bundle to write (default: dist/cvmfsd.pyz)")
    b.add_argument("--wheels", type=Path, default=None,
                   help="where the pinned wheels are kept and downloaded "
                        "(default: 'wheels' beside the output)")
    b.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parent.parent,
                   help="the checkout whose cvmfsd package goes in (default: this one)")
    args = parser.parse_args(argv)
    wheels_dir = args.wheels or args.output.parent / "wheels"
    try:
        wheels = fetch_wheels(wheels_dir)
        size = build(args.output, checkout=args.checkout, wheels=wheels,
                     source=source_id(args.checkout))
    except BundleError as exc:
        print(f"cvmfsd.bundle: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output}: {size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
