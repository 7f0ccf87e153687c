"""Configuration: what the payload sees, which names pass, which command lines fail."""

from __future__ import annotations

import pytest

from cvmfsd.config import Config, exported_variables, is_secret, split_repos
from cvmfsd.errors import UsageError
from cvmfsd.names import repo_name_problem


@pytest.mark.parametrize(("name", "ok"), [
    ("atlas.cern.ch", True), ("repo.a", True), ("config-osg.opensciencegrid.org", True),
    ("norepo", False), ("../etc", False), ("a..b", False), (".a.b", False), ("-a.b", False),
    ("A.b", False), ("a.b c", False), ("a.b;rm", False), ("a.b/c", False), ("", False),
    ("a." + "b" * 254, False),
])
def test_repository_names(name: str, ok: bool) -> None:
    """Only names that can never become a path or a shell word pass."""
    assert (repo_name_problem(name) is None) == ok


@pytest.mark.parametrize(("key", "secret"), [
    ("GLIDEIN_Site", False), ("GWMS_MAIN_DIR", False), ("X509_USER_PROXY", False),
    ("GLIDEIN_TOKEN", True), ("CONDOR_PASSWORD", True), ("GLIDEIN_SECRET_FILE", True),
    ("GWMS_CREDENTIAL", True), ("SSH_PRIVATE", True), ("GLIDEIN_KEY", True),
    ("KEYBOARD", False), ("GLIDEIN_AUTH_METHOD", True),
])
def test_secret_looking_keys(key: str, secret: bool) -> None:
    """Keys naming tokens, passwords, secrets, credentials, keys or auth are secrets."""
    assert is_secret(key) == secret


def test_exported_variables_keep_values_and_drop_the_rest() -> None:
    """Only prefixed, valid, non-secret keys are exported, values verbatim."""
    values = {"GLIDEIN_Site": "A Site  'quoted' $x", "GWMS_DIR": "/w d", "OTHER": "x",
              "GLIDEIN_TOKEN": "t", "GLIDEIN-BAD": "x", "CVMFS_REPOS": "a:b"}
    assert exported_variables(values) == {
        "GLIDEIN_Site": "A Site  'quoted' $x", "GWMS_DIR": "/w d", "CVMFS_REPOS": "a:b"}
    allowed = exported_variables(values, allow=["GLIDEIN_TOKEN"])
    assert allowed["GLIDEIN_TOKEN"] == values["GLIDEIN_TOKEN"]


def test_split_repos_accepts_commas_and_colons_once_each() -> None:
    """GlideinWMS lists repositories with colons; cvmfsd's flag with commas."""
    assert split_repos("a.b:c.d, e.f,a.b") == ("a.b", "c.d", "e.f")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"payload": ()}, "no payload given"),
    ({"payload": ("true",), "mode": "5"}, "--mode '5'"),
    ({"payload": ("true",), "repos": ("x/y",)}, "invalid repository name 'x/y'"),
    ({"payload": ("true",), "grace": -1.0}, "--grace"),
])
def test_bad_configuration_is_a_usage_error(kwargs: dict[str, object], message: str) -> None:
    """Each bad value is refused with a message naming it."""
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        Config(**kwargs)  # type: ignore[arg-type]
