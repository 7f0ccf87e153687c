"""The one-file bundle (issue 13): built reproducibly, run with ``-I`` from a read-only copy.

The bundle under test is ``$CVMFSD_TEST_BUNDLE`` (CI builds it first: then a
missing file is a failure, not a skip); without it, one is built from this
checkout in a session fixture.  It is run with each interpreter of
``$CVMFSD_TEST_BUNDLE_PYTHONS`` (``:``-separated; CI gives pyenv's 3.9 and its
newest 3.1x), else with pyenv's where found, else with this one.
"""

from __future__ import annotations

import json
import marshal
import os
import shutil
import subprocess
import sys
import types
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfsd import _selfexec, bundle
from tests.conftest import REPO_A, REPO_B

CHECKOUT = Path(__file__).resolve().parent.parent
MAX_SIZE = 5 * 1024 * 1024


def _wheels() -> Path:
    return Path(os.environ.get("CVMFSD_TEST_WHEELS") or CHECKOUT / "dist" / "wheels")


@pytest.fixture(name="bundle_file", scope="session")
def _bundle_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle under test: CI's, or one built here from this checkout."""
    given = os.environ.get("CVMFSD_TEST_BUNDLE")
    if given:
        if not Path(given).is_file():
            pytest.fail(f"CVMFSD_TEST_BUNDLE={given}: no such file (the bundle was not built)")
        return Path(given)
    if os.environ.get("CI"):
        pytest.fail("CI must build the bundle and name it in CVMFSD_TEST_BUNDLE")
    output = tmp_path_factory.mktemp("bundle") / "cvmfsd.pyz"
    assert bundle.main(["build", "-o", str(output), "--wheels", str(_wheels()),
                        *_python_options()]) == 0
    return output


def _pythons() -> list[str]:
    given = os.environ.get("CVMFSD_TEST_BUNDLE_PYTHONS")
    if given:
        return given.split(":")
    versions = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"
    try:
        found = sorted(versions.glob("3.*"), key=lambda p: tuple(map(int, p.name.split("."))))
    except (OSError, ValueError):
        found = []
    oldest = [p for p in found if p.name.startswith("3.9.")][-1:]
    newest = [p for p in found if not p.name.startswith("3.9.")][-1:]
    chosen = [str(p / "bin" / "python") for p in [*oldest, *newest]
              if os.access(p / "bin" / "python", os.X_OK)]
    return chosen or [sys.executable]


PYTHONS = _pythons()


def _python_options() -> list[str]:
    """``--python P`` for each interpreter of the tests: the bundle has bytecode for each."""
    return [option for python in PYTHONS for option in ("--python", python)]


def _cache_tag(python: str) -> str:
    ran = subprocess.run([python, "-I", "-c", "import sys; print(sys.implementation.cache_tag)"],
                         capture_output=True, text=True, check=True, timeout=30)
    return ran.stdout.strip()


#: Runs the bundle's ``__main__`` as ``BUNDLE -m cvmfsd._selfexec`` (the way
#: cvmfsd starts its helpers), recording every source compiled; then imports
#: more of the bundle and prints what it saw as JSON.  Arguments: the bundle,
#: then optionally a cache tag to pretend to be, or "bad-offset" to make the
#: bundle's record of where its bytecode is wrong.
PROBE = """\
import ast, builtins, inspect, json, runpy, sys, textwrap, traceback
bundle, how = sys.argv[1], sys.argv[2]
if how == "bad-offset":
    sys.path.insert(0, bundle)
    import _cvmfsd_bundle
    sys.path.remove(bundle)
    where = list(_cvmfsd_bundle.BYTECODE[sys.implementation.cache_tag])
    where[1] += 1  # the offset of the bytecode in the file
    _cvmfsd_bundle.BYTECODE[sys.implementation.cache_tag] = tuple(where)
elif how != "as-is":
    sys.implementation.cache_tag = how
compiled = []
real_compile = builtins.compile
def spy(source, filename, *args, **kwargs):
    compiled.append(str(filename))
    return real_compile(source, filename, *args, **kwargs)
builtins.compile = spy
sys.argv = [bundle, "-m", "cvmfsd._selfexec"]
try:
    runpy.run_path(bundle, run_name="__main__")
except SystemExit:
    pass
sys.path.insert(0, bundle)  # run_path took it away; the finder needs none
import importlib.resources, trio, structlog, cvmfsd.config, cvmfsd.daemon
builtins.compile = real_compile
try:
    cvmfsd.config.parse_address("nonsense")
except Exception:
    tb = traceback.format_exc()
setup = importlib.resources.files("cvmfsd.glidein_scripts").joinpath("cvmfsd_setup.sh")
def doc(obj):
    return None if obj.__doc__ is None else inspect.cleandoc(obj.__doc__)
def source_doc(obj):  # the docstring in the bundle's source
    return ast.get_docstring(ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0])
print(json.dumps({
    "compiled": sorted(set(name[len(bundle) + 1:] for name in compiled
                           if name.startswith(bundle + "/"))),
    "loader": type(cvmfsd.daemon.__loader__).__name__,
    "file": cvmfsd.daemon.__file__,
    "co_filename": cvmfsd.daemon.run.__code__.co_filename,
    "trio_path": list(trio.__path__),
    "traceback": tb,
    "resource": setup.read_text()[:11],
    "module_doc": doc(cvmfsd.daemon),
    "run_doc": doc(cvmfsd.daemon.run),
    "run_source_doc": source_doc(cvmfsd.daemon.run),
    "config_doc": doc(cvmfsd.config.Config),
    "config_source_doc": source_doc(cvmfsd.config.Config),
}))
"""


def _probe(python: str, bundle_file: Path, how: str = "as-is") -> dict[str, object]:
    ran = subprocess.run([python, "-I", "-c", PROBE, str(bundle_file), how],
                         capture_output=True, text=True, env=_isolated_env(), check=False,
                         timeout=60)
    assert ran.returncode == 0, ran.stderr[-3000:]
    result: dict[str, object] = json.loads(ran.stdout)
    return result


@pytest.fixture(name="readonly_bundle")
def _readonly_bundle(bundle_file: Path, short_tmp: Path) -> Iterator[Path]:
    """A copy of the bundle in a directory nobody may write to."""
    directory = short_tmp / "ro"
    directory.mkdir()
    copy = directory / "cvmfsd.pyz"
    shutil.copyfile(bundle_file, copy)
    copy.chmod(0o555)
    directory.chmod(0o555)
    yield copy
    directory.chmod(0o755)


def _isolated_env(**extra: str) -> dict[str, str]:
    """The environment of a pilot: no home to write to, nothing of ours on any path."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTHON", "CVMFSD_", "VIRTUAL_ENV"))}
    env.update(HOME="/nonexistent/home", PATH="/usr/bin:/bin", **extra)
    return env


def test_building_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    """Same checkout and wheels, two builds: identical files (fixed times and order)."""
    one, two = tmp_path / "1" / "cvmfsd.pyz", tmp_path / "2" / "cvmfsd.pyz"
    checkout = tmp_path / "checkout"  # a snapshot: the same inputs, whatever else edits
    shutil.copytree(CHECKOUT / "cvmfsd", checkout / "cvmfsd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for output in (one, two):  # each compiles in new processes of every interpreter
        assert bundle.main(["build", "-o", str(output), "--wheels", str(_wheels()),
                            "--checkout", str(checkout), *_python_options()]) == 0
    assert one.read_bytes() == two.read_bytes()
    with zipfile.ZipFile(one) as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    assert {i.date_time for i in infos} == {bundle.FIXED_TIME}


def test_contents_and_size(bundle_file: Path) -> None:
    """Every runtime dependency is in; the simulation, tests and compiled code are not."""
    assert bundle_file.stat().st_size <= MAX_SIZE
    with zipfile.ZipFile(bundle_file) as archive:
        names = archive.namelist()
    tops = {name.split("/")[0] for name in names}
    for package in ("cvmfsd", "trio", "structlog", "prometheus_client", "pyroute2",
                    "exceptiongroup", "sniffio", "outcome", "attrs", "sortedcontainers",
                    "idna"):
        assert package in tops, package
    assert not [n for n in names if n.startswith("cvmfsd/sim/") or n == "cvmfsd/bundle.py"]
    assert not [n for n in names if n.endswith((".so", ".pyc")) or "/_tests/" in n]
    assert not [n for n in names if n.split("/")[0] in ("prctl", "pyfuse3")]
    tags = {_cache_tag(python) for python in PYTHONS}
    assert {n for n in names if n.startswith("_bytecode/")} == {f"_bytecode/{t}" for t in tags}


@pytest.mark.parametrize("python", PYTHONS)
def test_modules_come_from_bytecode(readonly_bundle: Path, python: str) -> None:
    """From a read-only bundle, nothing but the bundle's ``__main__`` is compiled from source.

    The modules of cvmfsd and of its dependencies are loaded by the bundle's
    bytecode loader, with ``__file__`` and the code's file name inside the
    bundle; their source (tracebacks) and data (importlib.resources) are read
    from the zip.
    """
    seen = _probe(python, readonly_bundle)
    assert seen["compiled"] == ["__main__.py", "_cvmfsd_bundle.py"]
    assert seen["loader"] == "_Module"
    assert seen["file"] == seen["co_filename"] == f"{readonly_bundle}/cvmfsd/daemon.py"
    assert seen["trio_path"] == [f"{readonly_bundle}/trio"]
    assert seen["resource"] == "#!/bin/bash"
    tb = str(seen["traceback"])
    assert f'File "{readonly_bundle}/cvmfsd/config.py", line {_raise_line(readonly_bundle)},' in tb
    assert 'raise UsageError(f"--metrics-address {text!r}: expected HOST:PORT' in tb


def _raise_line(bundle_file: Path) -> int:
    """The line of the bundle's cvmfsd/config.py that raises the probe's error."""
    with zipfile.ZipFile(bundle_file) as archive:
        lines = archive.read("cvmfsd/config.py").decode().splitlines()
    (line,) = [number for number, text in enumerate(lines, 1)
               if 'raise UsageError(f"--metrics-address {text!r}: expected HOST:PORT' in text]
    return line


@pytest.mark.parametrize("python", PYTHONS)
def test_cvmfsd_bytecode_has_no_docstrings(readonly_bundle: Path, python: str) -> None:
    """cvmfsd's modules and functions have no ``__doc__`` from the bytecode; the source has.

    A decorated class keeps its docstring (``dataclass`` would make one from
    ``inspect.signature``, slowly); the traceback test above checks that the
    line numbers are the source's.
    """
    seen = _probe(python, readonly_bundle)
    assert seen["loader"] == "_Module"
    assert seen["module_doc"] is None
    assert seen["run_doc"] is None
    assert seen["run_source_doc"]
    assert seen["config_source_doc"]
    assert seen["config_doc"] == seen["config_source_doc"]


#: A module with every kind of docstring, an assert, and lines to raise from.
DOCUMENTED = b'''"""The module's docstring."""
from __future__ import annotations

import dataclasses


class Plain:
    """A class's docstring."""

    def only_a_docstring(self) -> None:
        """Its body becomes a pass."""


@dataclasses.dataclass
class Decorated:
    """Kept: its decorator may read it."""

    field: int = 0


async def coroutine() -> None:
    """A coroutine's docstring."""


def fails(flag: bool) -> None:
    """A docstring
    on two lines."""
    assert flag, "asserts stay"
    raise ValueError("raised")
'''


@pytest.mark.parametrize(("path", "stripped"), [("cvmfsd/m.py", True), ("trio/m.py", False)])
def test_docstrings_are_compiled_out_of_cvmfsd_only(path: str, stripped: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """cvmfsd's modules compile without docstrings (lines and asserts kept); others keep them."""
    compiled = bundle.compile_for(sys.executable, [(path, DOCUMENTED)])
    start, size = compiled.where[path]
    code = marshal.loads(zlib.decompress(compiled.code[start:start + size]))  # noqa: S302
    module = types.ModuleType("documented")
    monkeypatch.setitem(sys.modules, "documented", module)  # for dataclass
    exec(code, module.__dict__)  # noqa: S102 - compiled just now from DOCUMENTED
    docs = [module.__doc__, module.Plain.__doc__, module.Plain.only_a_docstring.__doc__,
            module.coroutine.__doc__, module.fails.__doc__]
    assert (docs == [None] * 5) if stripped else all(docs)
    assert module.Plain().only_a_docstring() is None
    assert module.Decorated.__doc__ == "Kept: its decorator may read it."
    lines = DOCUMENTED.decode().splitlines()
    for flag, error, text in [(False, AssertionError, 'assert flag, "asserts stay"'),
                              (True, ValueError, 'raise ValueError("raised")')]:
        with pytest.raises(error) as raised:
            module.fails(flag)
        assert raised.traceback[-1].lineno == lines.index(f"    {text}")  # both from 0


#: Every parser of cvmfsd and cvmfsctl, for ``--help``.
HELPS = [[], ["run"], ["probe"], ["demo"], ["sim"], ["sim", "makedist"], ["sim", "publish"],
         ["sim", "fault"], ["cvmfsctl"], *(["cvmfsctl", verb] for verb in (
             "ping", "get", "wait", "remount", "exec", "enter"))]


@pytest.mark.parametrize("python", PYTHONS)
def test_help_from_bytecode_is_the_help_from_source(readonly_bundle: Path, python: str,
                                                    short_tmp: Path) -> None:
    """``--help`` reads the same from the bundle's bytecode (no docstrings) as from source.

    With ``$CVMFSD_CACHE`` the interpreter compiles the unpacked sources, with
    their docstrings: a help text taken from one would differ.
    """
    cache = {"CVMFSD_CACHE": str(short_tmp / "cache")}
    for argv in HELPS:
        texts = [subprocess.run([python, "-I", str(readonly_bundle), *argv, "--help"],
                                capture_output=True, text=True, env=_isolated_env(**extra),
                                check=False, timeout=60)
                 for extra in ({}, cache)]
        in_place, cached = ((ran.returncode, ran.stdout, ran.stderr) for ran in texts)
        assert in_place == cached, argv
        assert in_place[0] == 0 and in_place[1].startswith("usage: "), (argv, in_place)
    assert (short_tmp / "cache").is_dir()


@pytest.mark.parametrize("how", ["cpython-0", "bad-offset"], ids=["uncovered", "bad-offset"])
def test_modules_come_from_source_without_bytecode(readonly_bundle: Path, how: str) -> None:
    """Another interpreter than the build's, or bytecode not where recorded: zipimport, source."""
    seen = _probe(PYTHONS[-1], readonly_bundle, how)
    compiled = seen["compiled"]
    assert isinstance(compiled, list)
    assert {"_cvmfsd_boot.py", "cvmfsd/daemon.py", "trio/__init__.py"} <= set(compiled)
    assert seen["loader"] == "zipimporter"
    assert seen["file"] == seen["co_filename"] == f"{readonly_bundle}/cvmfsd/daemon.py"
    assert 'raise UsageError(f"--metrics-address {text!r}' in str(seen["traceback"])
    assert seen["run_doc"] == seen["run_source_doc"]
    assert seen["module_doc"]


def test_simulation_is_not_in_the_bundle(bundle_file: Path, tmp_path: Path) -> None:
    """``cvmfsd sim`` from the bundle says the simulation is left out, and where to get it."""
    ran = subprocess.run([PYTHONS[-1], "-I", str(bundle_file), "sim", "makedist",
                          str(tmp_path / "d"), "--stratum", str(tmp_path / "s")],
                         capture_output=True, text=True, env=_isolated_env(), check=False,
                         timeout=60)
    assert ran.returncode == 69
    assert "Traceback" not in ran.stderr
    assert "(cvmfsd.sim, for 'cvmfsd sim' and 'cvmfsd demo') is not in the one-file bundle" \
        in ran.stderr
    assert "pip install 'cvmfsd[sim]'" in ran.stderr


@pytest.mark.parametrize("python", PYTHONS)
def test_version_names_everything_inside(readonly_bundle: Path, python: str) -> None:
    """``--version`` (of cvmfsd and of cvmfsctl) prints cvmfsd's and every pin's version."""
    for command in ([], ["cvmfsctl"]):
        ran = subprocess.run([python, "-I", str(readonly_bundle), *command, "--version"],
                             capture_output=True, text=True, env=_isolated_env(),
                             check=True, timeout=60)
        lines = ran.stdout.splitlines()
        assert lines[0].startswith("cvmfsd 0.")
        assert [line.split() for line in lines[1:]] == [[n, v] for n, v, _ in bundle.PINS]


def test_helpers_run_from_the_bundle() -> None:
    """From a bundle, cvmfsd's helpers are ``python -I [-S] BUNDLE -m MODULE``."""
    assert _selfexec.module_argv("cvmfsd.janitor", python="py", bundle="/b.pyz") == [
        "py", "-I", "/b.pyz", "-m", "cvmfsd.janitor"]
    assert _selfexec.module_argv("cvmfsd.probe_child", python="py", flags=("-I", "-S"),
                                 bundle="/b.pyz") == [
        "py", "-I", "-S", "/b.pyz", "-m", "cvmfsd.probe_child"]
    assert _selfexec.bundle_path() is None  # this test runs cvmfsd installed
    assert _selfexec.module_argv("cvmfsd.shim", python="py") == ["py", "-m", "cvmfsd.shim"]


def test_cvmfsctl_wrapper_runs_the_bundle(tmp_path: Path) -> None:
    """``$CVMFSCTL`` from a bundle is one script that runs the bundle's cvmfsctl."""
    path = _selfexec.cvmfsctl_wrapper(str(tmp_path), python="/py 3", bundle="/b b.pyz")
    assert path == str(tmp_path / "cvmfsctl")
    assert os.access(path, os.X_OK)
    assert "exec '/py 3' -I '/b b.pyz' cvmfsctl \"$@\"" in Path(path).read_text()
    assert _selfexec.cvmfsctl_wrapper(str(tmp_path)) is None  # installed: none


@pytest.mark.fuse
@pytest.mark.parametrize("cache", [False, True], ids=["in-place", "cached"])
@pytest.mark.parametrize("python", PYTHONS)
def test_run_and_cvmfsctl_from_a_readonly_bundle(readonly_bundle: Path, python: str,
                                                 dist: Path, short_tmp: Path,
                                                 cache: bool) -> None:
    """``python -I cvmfsd.pyz run`` mounts the simulation; ``$CVMFSCTL get``/``env`` work.

    The bundle is read-only, the home does not exist; the only writable
    places are the scratch directory (short_tmp) and /tmp (the payload's TMPDIR).
    With $CVMFSD_CACHE, the bundle is unpacked there once and reused.
    """
    scratch = short_tmp / "scratch"
    scratch.mkdir()
    (scratch / "sock").mkdir(mode=0o700)
    gconfig = scratch / "glidein_config"
    gconfig.write_text("GLIDEIN_Site Test_Site\nGLIDEIN_Entry_Name Test_Entry\n")
    out = scratch / "out"
    script = (f'"$CVMFSCTL" get GLIDEIN_Site > {out}.get && "$CVMFSCTL" env > {out}.env && '
              f"cat /cvmfs/{REPO_A}/hello.txt /cvmfs/{REPO_B}/data.csv > {out}.read")
    extra = {"CVMFSD_CACHE": str(scratch / "cache")} if cache else {}
    ran = subprocess.run(
        [python, "-I", str(readonly_bundle), "run", "--dist", str(dist),
         "--repos", f"{REPO_A},{REPO_B}", "--glidein-config", str(gconfig),
         "--socket", str(scratch / "sock" / "s"), "--", "sh", "-c", script],
        cwd=scratch, capture_output=True, text=True, env=_isolated_env(**extra), timeout=120,
        check=False)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert Path(f"{out}.get").read_text() == "Test_Site\n"
    assert "export GLIDEIN_Site='Test_Site'" in Path(f"{out}.env").read_text()
    assert Path(f"{out}.read").read_text() == "hello from repo.a\nx,y\n1,2\n"
    assert "Traceback" not in ran.stderr
    assert [p.name for p in readonly_bundle.parent.iterdir()] == ["cvmfsd.pyz"]
    if cache:
        (unpacked,) = (scratch / "cache").iterdir()
        assert (unpacked / "cvmfsd" / "daemon.py").is_file()
    else:
        assert not (scratch / "cache").exists()


# -- the glidein set-up script runs the bundle ---------------------------------------------

def _python39() -> str:
    for python in PYTHONS:
        ran = subprocess.run([python, "-I", "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True, timeout=30)
        if ran.stdout.strip() == "(3, 9)":
            return python
    if os.environ.get("CI"):
        pytest.fail(f"no Python 3.9 among {PYTHONS}")
    pytest.skip(f"no Python 3.9 among {PYTHONS}")


def _path_without_python(where: Path, **pythons: str) -> str:
    """A PATH with every tool of /usr/bin and /bin but no python, plus ``pythons``.

    ``pythons`` maps a command name to an interpreter, or to a version that a
    fake interpreter of that name reports (``python3="3.6.8"``, EL8's).
    """
    bin_dir = where / "bin"
    bin_dir.mkdir()
    for system in (Path("/usr/bin"), Path("/bin")):
        for tool in system.iterdir():
            link = bin_dir / tool.name
            if not tool.name.startswith(("python", "platform-python")) and not link.exists():
                link.symlink_to(tool)
    for name, target in pythons.items():
        if target.startswith("/"):
            (bin_dir / name).symlink_to(target)
        else:
            (bin_dir / name).write_text(f"#!/bin/sh\necho {target}\n")
            (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def _setup_with_path(pilot: Path, path: str) -> subprocess.CompletedProcess[str]:
    from tests.test_glidein_scripts import script

    env = {**_isolated_env(), "PATH": path}
    return subprocess.run(["bash", script("cvmfsd_setup.sh"), "glidein_config", "entry"],
                          capture_output=True, text=True, timeout=120, check=False,
                          cwd=pilot.parent, stdin=subprocess.DEVNULL, env=env)


@pytest.mark.fuse
def test_glidein_setup_runs_the_bundle_with_python39(readonly_bundle: Path, short_tmp: Path,
                                                     dist: Path) -> None:
    """python3 is EL8's 3.6, python3.9 is there: the set-up script runs the bundle with it."""
    from tests.test_glidein_scripts import calls, cleanup, make_pilot, values

    python39 = _python39()
    pilot = make_pilot(short_tmp, f"CVMFSEXEC_DIR {dist}\nGLIDEIN_CVMFS_REPOS {REPO_A}\n"
                       "GLIDEIN_USE_CVMFS 1\nGLIDEIN_CVMFS_REQUIRE preferred\nCVMFSD_GRACE 7\n",
                       cvmfsd=readonly_bundle)
    path = _path_without_python(short_tmp, python3="3.6.8", **{"python3.9": python39})
    try:
        done = _setup_with_path(pilot, path)
        assert done.returncode == 0, (done.stderr, calls(pilot))
        got = values(pilot)
        assert got["CVMFSD_STATUS"] == "ready", got
        assert calls(pilot)[-1][:2] == ["-ok", "cvmfsd_setup.sh"]
        argv = Path(f"/proc/{got['CVMFSD_PID']}/cmdline").read_bytes().split(b"\0")
        assert argv[:3] == [os.fsencode(f"{path}/python3.9"), b"-I", os.fsencode(readonly_bundle)]
        ctl = subprocess.run([got["CVMFSCTL"], "--socket", got["CVMFSD_SOCKET"], "get",
                              "GLIDEIN_CVMFS_REPOS"], capture_output=True, text=True,
                             check=False, timeout=30, env=_isolated_env())
        assert (ctl.returncode, ctl.stdout) == (0, f"{REPO_A}\n"), ctl.stderr
        assert (short_tmp / "cvmfsd-cache").is_dir()  # GLIDEIN_WORK_DIR/cvmfsd-cache
    finally:
        ended = cleanup(pilot)
    assert ended.returncode == 0, ended.stderr


@pytest.mark.parametrize(("policy", "status"), [("preferred", 0), ("required", 1)])
def test_glidein_setup_without_any_python39(bundle_file: Path, short_tmp: Path,
                                            policy: str, status: int) -> None:
    """No Python >= 3.9 at all: error_gen says what was found; the policy decides."""
    from tests.test_glidein_scripts import calls, make_pilot, values

    pilot = make_pilot(short_tmp, f"GLIDEIN_CVMFS_REPOS {REPO_A}\nGLIDEIN_CVMFS {policy}\n",
                       cvmfsd=bundle_file)
    done = _setup_with_path(pilot, _path_without_python(short_tmp, python3="3.6.8"))
    assert done.returncode == status, done.stderr
    kind, name, *rest = calls(pilot)[-1]
    detail = rest[1]
    assert "no Python >= 3.9 to run the cvmfsd bundle" in detail
    assert "python3 3.6.8 (" in detail
    if policy == "required":
        assert (kind, name, rest[0]) == ("-error", "cvmfsd_setup.sh", "WN_Resource")
    else:
        assert (kind, name, rest[0]) == ("-ok", "cvmfsd_setup.sh", "msg")
        assert detail.startswith("continuing without CVMFS, as the policy (preferred) allows")
        assert values(pilot)["CVMFSD_STATUS"] == "without-cvmfs"
