"""Build the one-file bundle of cvmfsd and cvmfsctl: ``python -m cvmfsd.bundle build``.

The bundle is a stdlib zip application (PEP 441) that any CPython >= 3.9 runs in
place: ``python3 cvmfsd.pyz run ...`` is ``cvmfsd run ...``, ``python3 cvmfsd.pyz
cvmfsctl get KEY`` is ``cvmfsctl get KEY``, and ``python3 cvmfsd.pyz -m MODULE``
runs one of cvmfsd's modules (how cvmfsd starts its own helpers from the bundle,
see :mod:`cvmfsd._selfexec`).  Nothing is extracted: modules are imported from
the zip, so a read-only location and a read-only home are fine; for each
interpreter given with ``--python``, from bytecode compiled at build time (see
the finder in :data:`BOOT`), for any other from source by ``zipimport``.

Inside: the cvmfsd package (not :mod:`cvmfsd.sim`, nor this builder) and the
runtime dependencies as pinned pure-Python wheels from PyPI (:data:`PINS`,
checked against their sha256), fetched with ``pip download --only-binary :all:
--no-deps``.  python-prctl (compiled) is replaced by :mod:`cvmfsd._prctl`'s
ctypes path; pyfuse3 is the simulation's only.  cvmfsd's own bytecode leaves
out its docstrings (:data:`STRIPPED`), so no code of cvmfsd may read one at
run time (the tests compare every ``--help`` from bytecode and from source).

Reproducible: the same checkout, wheels and interpreters give the same bytes
(entries sorted, timestamps fixed at 1980-01-01, fixed modes, fixed compression
level, bytecode compiled with PYTHONHASHSEED=0 in one process per interpreter).

Usage::

    python -m cvmfsd.bundle build [-o dist/cvmfsd.pyz] [--wheels dist/wheels]
                                  [--python PATH ...]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import marshal
import os
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
#: The modules whose bytecode has no docstrings (see :data:`COMPILER`):
#: cvmfsd's own, none of which reads one at run time; the dependencies keep
#: theirs (some read ``__doc__``).  A fifth of cvmfsd's compressed bytecode,
#: per interpreter; the sources in the bundle keep them.
STRIPPED = ("cvmfsd/",)
#: Parts of the wheels that stay out: test suites, compiled caches, RECORD.
EXCLUDED_PARTS = ("/_tests/", "/tests/", "/__pycache__/")

FIXED_TIME = (1980, 1, 1, 0, 0, 0)
SHEBANG = b"#!/usr/bin/env python3\n"

#: The bundle's __main__: short, since zipimport compiles it at every start
#: (twice: its get_filename compiles too); it runs _cvmfsd_boot (BOOT) from this
#: interpreter's bytecode if the build made some (_cvmfsd_bundle.BYTECODE says
#: where), else from source, compiled once.
STUB = '''\
"""cvmfsd bundle: python3 cvmfsd.pyz [cvmfsd|cvmfsctl] ARGS, or -m MODULE ARGS."""
import os
import sys

if sys.version_info < (3, 9):
    sys.stderr.write("cvmfsd: needs Python >= 3.9, this is %s (%s)\\n"
                     % (sys.version.split()[0], sys.executable))
    raise SystemExit(69)


def _boot():
    import zipimport
    import _cvmfsd_bundle as info
    from importlib.util import MAGIC_NUMBER
    bundle = os.path.abspath(sys.path[0])
    boot = sys.modules["_cvmfsd_boot"] = type(sys)("_cvmfsd_boot")
    boot.__file__ = bundle + "/_cvmfsd_boot.py"
    boot.__loader__ = zipimport.zipimporter(bundle)  # its source, for tracebacks
    where = info.BYTECODE.get(sys.implementation.cache_tag)
    if where and where[0] == MAGIC_NUMBER.hex() and not sys.flags.optimize:
        try:
            import _imp
            import marshal
            import zlib
            fd = os.open(bundle, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, where[4], where[1] + where[2] + where[3])
            finally:
                os.close(fd)
            code = marshal.loads(zlib.decompress(data))
            _imp._fix_co_filename(code, boot.__file__)
            exec(code, boot.__dict__)
            return boot
        except Exception:  # noqa: BLE001 - changed after its build? the source works
            pass
    exec(boot.__loader__.get_code("_cvmfsd_boot"), boot.__dict__)
    return boot


raise SystemExit(_boot().main(sys.argv[1:]))
'''

#: The bundle's start-up (_cvmfsd_boot.py): $CVMFSD_CACHE, the bytecode finder,
#: --version and the dispatch to cvmfsd, cvmfsctl or -m MODULE.
BOOT = '''\
"""Start-up of the cvmfsd bundle, run by its __main__ (see cvmfsd.bundle)."""
import os
import sys


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
        with zipfile.ZipFile(bundle) as archive:  # not _bytecode/: the cache compiles
            archive.extractall(partial, [name for name in archive.namelist()
                                         if not name.startswith("_bytecode/")])
        try:
            os.rename(partial, target)
        except OSError:  # another process was first
            shutil.rmtree(partial, ignore_errors=True)
        return target
    except Exception:  # noqa: BLE001 - the zip always works
        return None


def _read(bundle, offset, size):
    """``size`` bytes of the bundle file at ``offset`` (OSError if fewer)."""
    fd = os.open(bundle, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError("%s: %d bytes at %d, expected %d" % (bundle, len(data), offset, size))
    return data


class _Bytecode(object):
    """Meta-path finder of the modules the build compiled for this interpreter.

    Theory of operation: zipimport compiles every module from source at
    every start, twice (its get_filename compiles too), and would use a
    X.pyc beside X.py for one interpreter version only.  The build compiled
    every module with each interpreter it was given into one stored entry
    per cache tag, _bytecode/<tag>: a compressed index ("path start length"
    per module), then each module's marshalled code, compressed alone.  One
    entry, not one per module: zipimport reads the whole zip directory at
    every start, a few microseconds an entry.
    _cvmfsd_bundle.BYTECODE names where each entry's bytes are in the file.
    Ahead of the path finder, this finder claims the modules of the index
    and reads their code with pread (no zipfile import); the rest (source
    for tracebacks, data, resources) is zipimport's, as if it had found
    the module.  A module whose code cannot be read comes from source.
    """

    def __init__(self, bundle, base, lines):
        self.bundle = bundle
        self.base = base  # where the modules' code starts in the file
        self.modules = {}
        for line in lines:
            path, start, size = line.split()
            name = path[:-3].replace("/", ".")
            name = name[:-9] if name.endswith(".__init__") else name
            self.modules[name] = (path, int(start), int(size))
        self.importers = {}

    def find_spec(self, fullname, path=None, target=None):
        found = self.modules.get(fullname)
        if found is None:
            return None
        origin = self.bundle + "/" + found[0]
        where = origin.rpartition("/")[0]
        package = found[0].endswith("/__init__.py")
        entry = where.rpartition("/")[0] if package else where  # where zipimport finds it
        if path is not None and entry not in path:
            return None  # a package's __path__ that leaves the bundle: not ours
        from importlib.util import spec_from_file_location
        return spec_from_file_location(fullname, origin,
                                       loader=_Module(self, fullname, found, origin, entry),
                                       submodule_search_locations=[where] if package else None)

    def importer(self, entry):
        """The zipimporter of ``entry``, a directory of the bundle (made once)."""
        found = self.importers.get(entry)
        if found is None:
            import zipimport
            found = self.importers[entry] = zipimport.zipimporter(entry)
        return found


class _Module(object):
    """Loader of one module of the bundle: its code from bytecode, all else from zipimport."""

    def __init__(self, finder, name, found, origin, entry):
        self.finder = finder
        self.name = name
        self.path, self.start, self.size = found
        self.origin = origin
        self.entry = entry
        self.archive = finder.bundle  # importlib.resources.files (3.9) reads it

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exec(self.get_code(self.name), module.__dict__)

    def get_code(self, fullname):
        try:
            import _imp
            import marshal
            import zlib
            data = _read(self.finder.bundle, self.finder.base + self.start, self.size)
            code = marshal.loads(zlib.decompress(data))
            _imp._fix_co_filename(code, self.origin)  # built without knowing this path
            return code
        except Exception:  # noqa: BLE001 - the source always works
            return self.finder.importer(self.entry).get_code(fullname)

    def get_source(self, fullname):
        return self.finder.importer(self.entry).get_source(fullname)

    def get_filename(self, fullname):
        return self.origin

    def is_package(self, fullname):
        return self.path.endswith("/__init__.py")

    def get_data(self, pathname):
        return self.finder.importer(self.entry).get_data(pathname)

    def get_resource_reader(self, fullname):
        return self.finder.importer(self.entry).get_resource_reader(fullname)


def _bytecode(bundle, info):
    """Import from the build's bytecode for this interpreter, where it has some.

    info.BYTECODE maps a cache tag to (magic number in hex, offset of its
    entry's data in the file, size of the index, start and size of
    _cvmfsd_boot's code); -O wants other bytecode (no asserts): source.
    """
    from importlib.machinery import PathFinder
    from importlib.util import MAGIC_NUMBER
    where = info.BYTECODE.get(sys.implementation.cache_tag)
    if not where or where[0] != MAGIC_NUMBER.hex() or sys.flags.optimize:
        return
    try:
        import zlib
        offset, size = where[1:3]
        lines = zlib.decompress(_read(bundle, offset, size)).decode("utf-8").splitlines()
    except Exception:  # noqa: BLE001 - the bundle was changed after its build: source
        return
    finder = _Bytecode(bundle, offset + size, lines)
    try:
        position = sys.meta_path.index(PathFinder)
    except ValueError:
        position = len(sys.meta_path)
    sys.meta_path.insert(position, finder)


def _setup():
    import _cvmfsd_bundle as info
    bundle = info.BUNDLE = os.path.abspath(sys.path[0])
    cache = _cache(bundle, info) if os.path.isfile(bundle) else None
    if cache is not None:
        sys.path[0] = cache
    elif os.path.isfile(bundle):
        _bytecode(bundle, info)


def _version():
    import _cvmfsd_bundle as info
    lines = ["cvmfsd %s (bundle %s, Python %s)" % (info.VERSION, info.SOURCE,
                                                   sys.version.split()[0])]
    lines += ["  %s %s" % pin for pin in info.PINS]
    return "\\n".join(lines)


def main(argv):
    """Run cvmfsd, cvmfsctl or ``-m MODULE`` from the bundle; the exit status."""
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
    try:
        return cli_main(argv)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("cvmfsd.sim"):
            raise
        sys.stderr.write(
            "cvmfsd: the simulated CVMFS distribution (cvmfsd.sim, for 'cvmfsd sim' and "
            "'cvmfsd demo') is not in the one-file bundle: it needs pyfuse3, so the bundle "
            "leaves it out; run it from a checkout or an installed cvmfsd with its extra "
            "(pip install 'cvmfsd[sim]')\\n")
        return 69
'''


#: Run by each interpreter the bundle is built for (``python -S -s -c``, with
#: PYTHONHASHSEED=0 so that frozenset constants keep one order, and
#: PYTHONNODEBUGRANGES=1, see :func:`compile_for`): reads the sources as a
#: marshalled list of (path, bytes, strip) on stdin, writes back the marshalled
#: (cache tag, magic number, [(path, marshalled code)], [(path, error)]).
#: One process compiles all files in sorted order, so that even marshal's
#: reference flags (which follow reference counts) come out the same.
#:
#: A source with ``strip`` set is compiled from its syntax tree without the
#: docstrings of its module, classes and functions (see :data:`STRIPPED`):
#: the first statement of such a body, if a string, goes, and a body that was
#: nothing else gets a ``pass`` on the docstring's line.  Every other node
#: keeps its position, so tracebacks name the lines that the source's
#: bytecode would; ``optimize`` stays 0 (-OO would strip the asserts too).
#: A decorated class keeps its docstring: the decorator may read it
#: (``dataclass`` makes one from ``inspect.signature`` where there is none,
#: some 80 us a class at every import).
COMPILER = """\
import ast, importlib.util, marshal, sys, warnings
warnings.simplefilter("ignore")
BODIES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
def without_docstrings(tree):
    for node in list(ast.walk(tree)):
        if isinstance(node, ast.ClassDef) and node.decorator_list:
            continue  # a decorator may read it (dataclass makes one, slowly, if none)
        first = node.body[0] if isinstance(node, BODIES) and node.body else None
        if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            node.body[:1] = [] if node.body[1:] else [ast.copy_location(ast.Pass(), first)]
    return tree
compiled, failed = [], []
for path, source, strip in marshal.loads(sys.stdin.buffer.read()):
    try:
        if strip:
            source = without_docstrings(compile(source, path, "exec", ast.PyCF_ONLY_AST,
                                                dont_inherit=True))
        code = compile(source, path, "exec", dont_inherit=True, optimize=0)
    except (SyntaxError, ValueError) as exc:
        failed.append((path, str(exc)))
        continue
    compiled.append((path, marshal.dumps(code)))
    del code
sys.stdout.buffer.write(marshal.dumps(
    (sys.implementation.cache_tag, importlib.util.MAGIC_NUMBER, compiled, failed)))
"""

#: The bytecode for the interpreters of cache tag T is the one stored entry
#: BYTECODE/T (see :func:`compile_for` and the bundle's ``__main__``).
BYTECODE = "_bytecode"


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


@dataclass(frozen=True)
class Bytecode:
    """The bundle's modules compiled by one interpreter (see :func:`compile_for`)."""

    tag: str  #: the interpreter's sys.implementation.cache_tag
    magic: bytes  #: its importlib.util.MAGIC_NUMBER
    index: bytes  #: compressed: a line "path start length" per module
    code: bytes  #: each module's marshalled code, compressed alone, at its start
    where: dict[str, tuple[int, int]]  #: path: (start, length) in code


def compile_for(python: str, sources: Sequence[tuple[str, bytes]]) -> Bytecode:
    """The bytecode of ``sources`` for ``python``, for the entry ``_bytecode/<tag>``.

    Each module's code is compressed alone, so that one is read without the
    others; the bundle stores the entry uncompressed, the index first.
    cvmfsd's own modules (:data:`STRIPPED`) are compiled without docstrings.

    Raises:
        BundleError: ``python`` does not run, has no cache tag, or cannot
            compile one of the sources.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    # PYTHONNODEBUGRANGES (3.11+): no column positions in the line tables,
    # a fifth of the bytecode; tracebacks still show each line, without ^^^.
    env.update(PYTHONHASHSEED="0", PYTHONNODEBUGRANGES="1")
    try:
        ran = subprocess.run([python, "-S", "-s", "-c", COMPILER],
                             input=marshal.dumps([(path, source, path.startswith(STRIPPED))
                                                  for path, source in sources]),
                             capture_output=True, env=env, check=False)
    except OSError as exc:
        raise BundleError(f"cannot run {python} to compile the bundle's modules: {exc}") from None
    if ran.returncode != 0:
        raise BundleError(f"{python} failed to compile the bundle's modules "
                          f"(exit {ran.returncode}):\n{ran.stderr.decode(errors='replace')}")
    # our own child's answer, from the interpreter the builder was told to use
    tag, magic, compiled, failed = marshal.loads(ran.stdout)  # noqa: S302
    if failed:
        raise BundleError(f"{python} cannot compile " + "; ".join(
            f"{path}: {error}" for path, error in failed))
    if not tag:
        raise BundleError(f"{python} has no sys.implementation.cache_tag: it cannot "
                          "use bytecode; build without it (it runs the bundle from source)")
    where: dict[str, tuple[int, int]] = {}
    code = bytearray()
    for path, marshalled in compiled:
        packed = zlib.compress(marshalled, 9)
        where[path] = (len(code), len(packed))
        code += packed
    index = "".join(f"{path} {start} {size}\n" for path, (start, size) in where.items())
    return Bytecode(tag=tag, magic=magic, index=zlib.compress(index.encode(), 9),
                    code=bytes(code), where=where)


def source_id(checkout: Path) -> str:
    """What the bundle was built from: ``git describe`` of the checkout, else 'unknown'."""
    try:
        ran = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty"],
                             check=False, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return ran.stdout.strip() if ran.returncode == 0 and ran.stdout.strip() else "unknown"


def build(output: Path, *, checkout: Path, wheels: Sequence[Path], source: str,
          pythons: Sequence[str] = (sys.executable,)) -> int:
    """Write the bundle to ``output`` (atomically); its size in bytes.

    Args:
        pythons: the interpreters whose bytecode goes in (see :func:`compile_for`);
            any other runs the bundle from source.

    Raises:
        BundleError: two inputs provide the same file, or an interpreter fails
            to compile them or has the cache tag of another.
    """
    from cvmfsd import __version__

    entries: dict[str, bytes] = {}
    for name, data in [*_package_entries(checkout),
                       *(entry for wheel in wheels for entry in _wheel_entries(wheel))]:
        if name in entries or name.startswith(f"{BYTECODE}/"):
            raise BundleError(f"{name} is provided twice" if name in entries
                              else f"{name}: {BYTECODE}/ is the bundle's own")
        entries[name] = data
    entries["__main__.py"] = STUB.encode()
    entries["_cvmfsd_boot.py"] = BOOT.encode()
    sources = [(name, entries[name]) for name in sorted(entries)
               if name.endswith(".py") and name != "__main__.py"]
    compiled: dict[str, Bytecode] = {}
    for python in pythons:
        bytecode = compile_for(python, sources)
        if bytecode.tag in compiled:
            raise BundleError(f"two of the interpreters {', '.join(pythons)} have the cache "
                              f"tag {bytecode.tag}: give one of them")
        compiled[bytecode.tag] = bytecode
        entries[f"{BYTECODE}/{bytecode.tag}"] = bytecode.index + bytecode.code
    digest = hashlib.sha256()
    for name in sorted(entries):
        digest.update(f"{name}\0{len(entries[name])}\0".encode())
        digest.update(entries[name])
    pins = ", ".join(repr((name, version)) for name, version, _ in PINS)
    info_name = "_cvmfsd_bundle.py"
    # tag: (magic, offset in the file, size of the index, start and size of the boot code)
    where: dict[str, tuple[str, int, int, int, int]] = {}
    buffer = io.BytesIO()
    buffer.write(SHEBANG)
    with zipfile.ZipFile(buffer, "w") as bundle:
        # Sorted, the bytecode entries come before the info module that says
        # where they are, so their offsets are known when it is written.
        for name in sorted([*entries, info_name]):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.create_system = 3  # Unix, whatever the build host
            if name == info_name:
                data = (
                    f'"""What this cvmfsd bundle holds (written by cvmfsd.bundle)."""\n'
                    f"VERSION = {__version__!r}\nSOURCE = {source!r}\nPINS = ({pins},)\n"
                    f"#: sha256 of every other entry: names the unpacked copy under "
                    f"$CVMFSD_CACHE\nDIGEST = {digest.hexdigest()!r}\n"
                    f"#: cache tag: (magic number, offset of its bytecode in this file, "
                    f"size of the index, start and size of _cvmfsd_boot after it)\n"
                    f"BYTECODE = {dict(sorted(where.items()))!r}\n"
                    f"#: the bundle file, set by __main__ when it runs\nBUNDLE = None\n").encode()
            else:
                data = entries[name]
            if not name.startswith(f"{BYTECODE}/"):
                info.compress_type = zipfile.ZIP_DEFLATED
                bundle.writestr(info, data, compresslevel=9)
                continue
            # Stored (its parts are compressed), so read in place: the data
            # follows the 30-byte local header and the name (no extra field).
            info.compress_type = zipfile.ZIP_STORED
            bytecode = compiled[name[len(BYTECODE) + 1:]]
            where[bytecode.tag] = (bytecode.magic.hex(),
                                   buffer.tell() + 30 + len(name.encode()),
                                   len(bytecode.index), *bytecode.where["_cvmfsd_boot.py"])
            bundle.writestr(info, data)
    data = buffer.getvalue()
    for tag, (_, offset, size, *_boot) in where.items():
        if data[offset:offset + size] != compiled[tag].index:
            raise BundleError(f"{BYTECODE}/{tag} is not at offset {offset} of the bundle "
                              "(a zip local header of another size?)")
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
    b.add_argument("--python", action="append", dest="pythons", metavar="PATH",
                   help="an interpreter to compile the bundle's modules with, so that it "
                        "imports them from bytecode (repeat for several versions; "
                        "default: this one); any other compiles them at every start")
    args = parser.parse_args(argv)
    wheels_dir = args.wheels or args.output.parent / "wheels"
    try:
        wheels = fetch_wheels(wheels_dir)
        size = build(args.output, checkout=args.checkout, wheels=wheels,
                     source=source_id(args.checkout),
                     pythons=args.pythons or [sys.executable])
    except BundleError as exc:
        print(f"cvmfsd.bundle: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output}: {size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
