"""Tests for cvmfsd.sim.stratum: publishing, manifests, catalogs and fault knobs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cvmfsd.sim import stratum
from cvmfsd.sim.stratum import Faults, StratumError

FQRN = "test.sim.example"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A small tree with a file, a nested file, an empty dir and a symlink."""
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "hello.txt").write_text("hello\n")
    (src / "sub" / "deeper" / "data.bin").write_bytes(bytes(range(256)))
    (src / "link").symlink_to("hello.txt")
    return src


@pytest.mark.parametrize(
    "name",
    ["atlas.cern.ch", "a.b", "config-osg.opensciencegrid.org", "x1.y-2.z3", "a" * 200 + ".ch"],
)
def test_valid_names(name: str) -> None:
    """Ordinary repository names pass validation unchanged."""
    assert stratum.validate_fqrn(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "nodot",
        "Upper.case",
        ".leading.dot",
        "-leading.dash",
        "double..dot",
        "trailing.dot.",
        "a/b.c",
        "../etc.passwd",
        "a b.c",
        "a;rm.c",
        "a$(x).c",
        "a" * 250 + ".cern.ch",
    ],
)
def test_invalid_names(name: str) -> None:
    """Names that could become paths or shell words are rejected, saying what is expected."""
    with pytest.raises(StratumError, match="expected lowercase letters"):
        stratum.validate_fqrn(name)


def test_stratum_error_is_value_error() -> None:
    """Callers may catch StratumError as ValueError."""
    assert issubclass(StratumError, ValueError)


def test_publish_layout_and_catalog(tmp_path: Path, source: Path) -> None:
    """Publishing stores content-addressed objects, a JSON catalog with suffix C and a manifest."""
    s = tmp_path / "stratum"
    assert stratum.publish(s, FQRN, source, ttl=60) == 1
    manifest = stratum.read_manifest(s, FQRN)
    assert (manifest.fqrn, manifest.revision, manifest.ttl) == (FQRN, 1, 60)
    text = (s / FQRN / ".cvmfspublished").read_text()
    assert text.splitlines()[0] == f"C{manifest.root_hash}"
    assert text.splitlines()[-1] == "--"
    assert [line[0] for line in text.splitlines()[:-1]] == ["C", "D", "N", "S", "T"]
    catalog_file = s / FQRN / "data" / manifest.root_hash[:2] / (manifest.root_hash[2:] + "C")
    assert (
        hashlib.sha1(catalog_file.read_bytes(), usedforsecurity=False).hexdigest()
        == manifest.root_hash
    )
    catalog = stratum.load_catalog(s, FQRN)
    assert catalog[""]["type"] == "d"
    assert catalog["empty"]["type"] == "d"
    assert catalog["link"] == {**catalog["link"], "type": "l", "target": "hello.txt"}
    hello = catalog["hello.txt"]
    assert (hello["type"], hello["size"]) == ("f", 6)
    digest = str(hello["hash"])
    assert digest == hashlib.sha1(b"hello\n", usedforsecurity=False).hexdigest()
    assert (s / FQRN / stratum.object_path(digest)).read_bytes() == b"hello\n"
    assert catalog["sub/deeper/data.bin"]["size"] == 256


def test_revisions_increment(tmp_path: Path, source: Path) -> None:
    """Each publication is the previous revision plus one, with a new root catalog."""
    s = tmp_path / "stratum"
    first = stratum.publish(s, FQRN, source)
    (source / "new").mkdir()
    second = stratum.publish(s, FQRN, source)
    assert (first, second) == (1, 2)
    assert "new" in stratum.load_catalog(s, FQRN)
    assert stratum.read_manifest(s, FQRN).ttl == 240


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ttl": 0}, "ttl=0"),
        ({"ttl": True}, "ttl=True"),
    ],
)
def test_publish_rejects_bad_ttl(
    tmp_path: Path, source: Path, kwargs: dict[str, int], match: str
) -> None:
    """A TTL must be a positive number of seconds."""
    with pytest.raises(StratumError, match=match):
        stratum.publish(tmp_path / "s", FQRN, source, **kwargs)


def test_publish_rejects_missing_source_and_bad_name(tmp_path: Path, source: Path) -> None:
    """A missing source directory or a bad name is refused before anything is written."""
    with pytest.raises(StratumError, match="not a directory"):
        stratum.publish(tmp_path / "s", FQRN, tmp_path / "nope")
    with pytest.raises(StratumError, match="invalid repository name"):
        stratum.publish(tmp_path / "s", "../evil", source)
    assert not (tmp_path / "s").exists()


def test_read_manifest_of_unpublished_repo(tmp_path: Path) -> None:
    """Reading a repository that was never published says so."""
    with pytest.raises(StratumError, match=r"publish .* first"):
        stratum.read_manifest(tmp_path, FQRN)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("C" + "a" * 40 + "\nD240\nNa.b\nS3\nT17\n--\nsignature", True),
        ("C" + "a" * 40 + "\nD240\nNa.b\nS3\n--\n", False),
        ("Cnothex\nD240\nNa.b\nS3\nT1\n--\n", False),
        ("C" + "a" * 40 + "\nDx\nNa.b\nS3\nT1\n--\n", False),
    ],
)
def test_parse_manifest(text: str, ok: bool) -> None:
    """Manifests need C, D, N, S and T, with a valid hash; text after -- is ignored."""
    if ok:
        assert stratum.parse_manifest(text).revision == 3
    else:
        with pytest.raises(StratumError):
            stratum.parse_manifest(text)


def test_faults_merge_and_clear(tmp_path: Path, source: Path) -> None:
    """set_faults merges knobs, None clears one, and read_faults round-trips."""
    stratum.publish(tmp_path, FQRN, source)
    assert stratum.read_faults(tmp_path, FQRN) == Faults()
    stratum.set_faults(tmp_path, FQRN, mount_fail=16, mount_delay=0.5)
    faults = stratum.set_faults(tmp_path, FQRN, eio=["/hello.txt"], mount_fail=None)
    assert faults == Faults(mount_delay=0.5, eio=("hello.txt",))
    assert stratum.read_faults(tmp_path, FQRN) == faults
    assert faults.eio_matches("hello.txt") and not faults.eio_matches("other")
    assert Faults(eio="*").eio_matches("anything")
    on_disk = json.loads((tmp_path / FQRN / ".cvmfsfaults").read_text())
    assert on_disk == {"mount_delay": 0.5, "eio": ["hello.txt"]}


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"mount_fail": 0}, "mount_fail=0"),
        ({"mount_fail": "16"}, "mount_fail='16'"),
        ({"crash_after": -1}, "crash_after=-1"),
        ({"hang_after": "soon"}, "hang_after='soon'"),
        ({"eio": "hello.txt"}, "eio='hello.txt'"),
        ({"explode": 1}, "unknown fault knob"),
    ],
)
def test_bad_fault_knobs(tmp_path: Path, knobs: dict[str, object], match: str) -> None:
    """Bad knobs are refused with the knob, the value and what was expected."""
    with pytest.raises(StratumError, match=match):
        stratum.set_faults(tmp_path, FQRN, **knobs)
    assert not (tmp_path / FQRN / ".cvmfsfaults").exists()


@pytest.mark.parametrize(
    ("text", "match"),
    [("[1]", "JSON object"), ("{", "not JSON"), ('{"eio": 3}', "eio=3")],
)
def test_parse_faults_errors(text: str, match: str) -> None:
    """A malformed fault file is reported, never silently ignored."""
    with pytest.raises(StratumError, match=match):
        stratum.parse_faults(text)


def test_parse_catalog_rejects_garbage() -> None:
    """A catalog needs a root directory entry and typed entries."""
    with pytest.raises(StratumError, match="root directory"):
        stratum.parse_catalog(b"{}")
    with pytest.raises(StratumError, match="no valid type"):
        stratum.parse_catalog(b'{"": {"type": "d"}, "x": {"type": "q"}}')
