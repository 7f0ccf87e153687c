"""Mode selection (the table), cvmfsexec build naming and finding."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cvmfsd.errors import ConfigError, HostUnsupported
from cvmfsd.glidein import Policy, PolicyDecision
from cvmfsd.mode import MACHINE_TYPES, DistName, Mode, find_dist, select_dist, select_mode
from cvmfsd.probe import Fact, HostFacts

PREFERRED = PolicyDecision(Policy.PREFERRED, True, "test")
REQUIRED = PolicyDecision(Policy.REQUIRED, True, "test")
NEVER = PolicyDecision(Policy.NEVER, False, "test")


def facts(**changes: object) -> HostFacts:
    """A modern EL9 host where everything works; *changes* override single values."""
    base = HostFacts(
        kernel_release=Fact("5.14.0-362.el9.x86_64", "canned"),
        os_id=Fact("rocky", "canned"),
        os_id_like=Fact(("rhel", "centos", "fedora"), "canned"),
        os_version_id=Fact("9.3", "canned"),
        arch=Fact("x86_64", "canned"),
        max_user_namespaces=Fact(30000, "canned"),
        userns=Fact(True, "canned"),
        fuse_in_userns=Fact(True, "canned"),
        cvmfsexec_userfuse=Fact(True, "canned"),
        dev_fuse=Fact(True, "canned"),
        fusermount=Fact(("/usr/bin/fusermount3",), "canned"),
        fuse_group=Fact(None, "canned"),
        proc_masked=Fact(False, "canned"),
        container_runtime=Fact(None, "canned"),
        host_cvmfs=Fact(False, "canned"),
        repos_present=Fact((), "canned"),
        repos_wanted=("repo.a",),
    )
    wrapped = {k: v if k == "repos_wanted" else Fact(v, f"canned {k}")
               for k, v in changes.items()}
    return dataclasses.replace(base, **wrapped)  # type: ignore[arg-type]


MODE_CASES = [
    # (fact changes, expected mode, fragment of why the runner-up was rejected)
    ({}, Mode.MODE3, None),
    ({"repos_present": ("repo.a",)}, Mode.HOST, None),
    ({"repos_present": ("repo.b",)}, Mode.MODE3, "lacks repo.a"),
    ({"repos_wanted": (), "host_cvmfs": True}, Mode.HOST, None),
    ({"fuse_in_userns": False, "cvmfsexec_userfuse": False}, Mode.MODE2, None),
    ({"fuse_in_userns": True, "cvmfsexec_userfuse": False}, Mode.MODE2, "would run mode 2"),
    ({"fuse_in_userns": False}, Mode.MODE1, "FUSE mounts inside a user namespace: no"),
    ({"userns": False}, Mode.MODE1, "unprivileged user namespaces: no"),
    ({"userns": None, "fuse_in_userns": None}, Mode.MODE1, "unknown"),
    ({"userns": False, "fusermount": ()}, Mode.NONE, "no usable fusermount"),
    ({"userns": False, "dev_fuse": False}, Mode.NONE, "/dev/fuse usable: no"),
    ({"userns": False, "fusermount": (), "container_runtime": "/usr/bin/apptainer"},
     Mode.NONE, "not supported for launch"),
]


@pytest.mark.parametrize(("changes", "mode", "fragment"), MODE_CASES)
def test_select_mode(changes: dict[str, object], mode: Mode, fragment: str | None) -> None:
    """The first usable row of the table wins; every other mode gets a reason."""
    decision = select_mode(PREFERRED, facts(**changes))
    assert mode is decision.mode
    rejected = {r.mode: r.reason for r in decision.rejected}
    assert set(Mode) - {mode} == set(rejected)
    assert all(rejected.values())
    if fragment is not None:
        assert fragment in decision.explain()
    assert "not supported for launch" in rejected[Mode.MODE4]


def test_later_usable_modes_say_so() -> None:
    """A usable mode ranked below the winner is reported as usable."""
    rejected = {r.mode: r.reason for r in select_mode(PREFERRED, facts()).rejected}
    assert rejected[Mode.MODE1] == "usable, but mode3 comes first"
    assert "cvmfsexec runs mode 3" in rejected[Mode.MODE2]


def test_kernel_rule_disagreement_is_noted() -> None:
    """FUSE-in-userns working on a kernel cvmfsexec calls old is recorded as a note."""
    decision = select_mode(PREFERRED, facts(cvmfsexec_userfuse=False))
    assert Mode.MODE2 is decision.mode
    assert any("uname -r" in note for note in decision.notes)


def test_never_policy() -> None:
    """NEVER gives NONE, not fatal, with every mode rejected by the policy."""
    decision = select_mode(NEVER, facts(), forced=Mode.MODE3)
    assert (decision.mode, decision.fatal) == (Mode.NONE, False)
    assert all("policy is never" in r.reason for r in decision.rejected)
    assert any("forced mode mode3 ignored" in n for n in decision.notes)


@pytest.mark.parametrize(("policy", "fatal"), [(REQUIRED, True), (PREFERRED, False)])
def test_nothing_usable(policy: PolicyDecision, fatal: bool) -> None:
    """With no usable mode the decision is NONE, fatal only under REQUIRED."""
    decision = select_mode(policy, facts(userns=False, fusermount=()))
    assert (Mode.NONE, fatal) == (decision.mode, decision.fatal)


def test_forced_mode() -> None:
    """A forced mode wins if usable, and raises HostUnsupported if not."""
    assert Mode.MODE1 is select_mode(PREFERRED, facts(), forced=Mode.MODE1).mode
    assert Mode.NONE is select_mode(REQUIRED, facts(), forced=Mode.NONE).mode
    with pytest.raises(HostUnsupported, match=r"mode2 was forced .*cvmfsexec runs mode 3"):
        select_mode(PREFERRED, facts(), forced=Mode.MODE2)
    with pytest.raises(HostUnsupported, match="not supported for launch"):
        select_mode(PREFERRED, facts(), forced=Mode.MODE4)


def test_cvmfsexec_mode_numbers() -> None:
    """Modes map to GlideinWMS's GWMS_CVMFSEXEC_MODE numbers."""
    modes = (Mode.MODE3, Mode.MODE2, Mode.MODE1, Mode.MODE4, Mode.HOST, Mode.NONE)
    assert [m.cvmfsexec_mode for m in modes] == [3, 2, 1, 4, None, None]


def _os(os_id: str, like: tuple[str, ...], version: str, arch: str = "x86_64") -> HostFacts:
    return facts(os_id=os_id, os_id_like=like, os_version_id=version, arch=arch)


DIST_CASES = [
    # (os id, ID_LIKE, VERSION_ID, arch, source, expected name)
    ("rocky", ("rhel", "centos", "fedora"), "9.3", "x86_64", "osg", "cvmfsexec-osg-rhel9-x86_64"),
    ("almalinux", ("rhel", "centos", "fedora"), "8.9", "aarch64", "osg",
     "cvmfsexec-osg-rhel8-aarch64"),
    ("rhel", ("fedora",), "10.0", "x86_64", "default", "cvmfsexec-default-rhel10-x86_64"),
    ("centos", ("rhel", "fedora"), "7", "x86_64", "default", "cvmfsexec-default-rhel7-x86_64"),
    ("ol", ("fedora",), "8.9", "ppc64le", "default", "cvmfsexec-default-rhel8-ppc64le"),
    ("sles", ("suse",), "15.5", "aarch64", "egi", "cvmfsexec-egi-suse15-aarch64"),
    ("opensuse-leap", ("suse", "opensuse"), "15.6", "x86_64", "osg",
     "cvmfsexec-osg-suse15-x86_64"),
    ("debian", (), "11", "x86_64", "default", "cvmfsexec-default-rhel8-x86_64"),
    ("debian", (), "12", "x86_64", "egi", "cvmfsexec-egi-rhel9-x86_64"),
    ("debian", (), "13", "aarch64", "osg", "cvmfsexec-osg-rhel9-aarch64"),
    ("ubuntu", ("debian",), "22.04", "x86_64", "osg", "cvmfsexec-osg-rhel9-x86_64"),
    ("ubuntu", ("debian",), "24.04", "arm64", "default", "cvmfsexec-default-rhel9-aarch64"),
]


@pytest.mark.parametrize("case", DIST_CASES)
def test_select_dist(case: tuple[str, tuple[str, ...], str, str, str, str]) -> None:
    """os-release ID/ID_LIKE/VERSION_ID and the arch name a makedist machine type."""
    os_id, like, version, arch, src, name = case
    dist = select_dist(_os(os_id, like, version, arch), src)
    assert name == str(dist)
    assert dist.machine_type in MACHINE_TYPES
    assert dist.why


DIST_ERRORS = [
    (("centos", ("rhel",), "7"), "osg", "OSG needs EL 8"),
    (("rocky", ("rhel",), "8.9"), "egi", "rhel9 and suse only"),
    (("rhel", (), "10.0", "aarch64"), "default", "no rhel10-aarch64 build"),
    (("rhel", (), "6.10"), "default", "no rhel6-x86_64 build"),
    (("debian", (), "10"), "default", "debian 10 has no cvmfsexec build"),
    (("ubuntu", ("debian",), "20.04"), "default", "ubuntu 20 has no cvmfsexec build"),
    (("fedora", (), "40"), "default", "fedora has no cvmfsexec build"),
    (("arch", (), ""), "default", "no OS major version"),
    (("rocky", ("rhel",), "9.3", "riscv64"), "default", "no rhel9-riscv64 build"),
]


@pytest.mark.parametrize(("os_args", "src", "pattern"), DIST_ERRORS)
def test_select_dist_unsupported(os_args: tuple[str, tuple[str, ...], str], src: str,
                                 pattern: str) -> None:
    """Unsupported platforms and sources raise HostUnsupported saying why."""
    with pytest.raises(HostUnsupported, match=pattern):
        select_dist(_os(*os_args), src)


def test_select_dist_bad_source() -> None:
    """An unknown source is a ConfigError listing the accepted ones."""
    with pytest.raises(ConfigError, match="osg\\|egi\\|default\\|none"):
        select_dist(facts(), "cern")


def test_find_dist(tmp_path: Path) -> None:
    """A self-extracting file or a directory with cvmfsexec is found, in search order."""
    first, second = tmp_path / "a", tmp_path / "b"
    (second / "cvmfsexec-osg-rhel9-x86_64").mkdir(parents=True)
    (second / "cvmfsexec-osg-rhel9-x86_64" / "cvmfsexec").write_text("#!/bin/sh\n")
    first.mkdir()
    packed = first / "cvmfsexec-default-rhel9-x86_64"
    packed.write_text("#!/bin/sh\n")
    packed.chmod(0o755)
    name = DistName("osg", "rhel", 9, "x86_64")
    assert second / name.name == find_dist([first, second], name)
    assert packed == find_dist([first, second], ["cvmfsexec-nope", name, packed.name])
    assert packed == find_dist([str(first), second], [packed.name, name])


def test_find_dist_names_everything_tried(tmp_path: Path) -> None:
    """When nothing fits, the error names every name and directory, and broken candidates."""
    (tmp_path / "cvmfsexec-x").mkdir()
    with pytest.raises(ConfigError) as info:
        find_dist([tmp_path, tmp_path / "other"], ["cvmfsexec-x", "cvmfsexec-y"])
    message = str(info.value)
    for part in ("cvmfsexec-x, cvmfsexec-y", str(tmp_path / "other"),
                 "is neither an executable file nor a directory with cvmfsexec"):
        assert part in message
