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


JWT = ("eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJwaWxvdCIsImV4cCI6MTcwMDAwMDAwMH0."
       "c2lnbmF0dXJlLWJ5dGVz")
PEM = "-----BEGIN RSA PRIVATE KEY-----\\nMIIEowIBAAKCAQEA\\n-----END RSA PRIVATE KEY-----"


@pytest.mark.parametrize(("key", "secret"), [
    ("GLIDEIN_Site", False), ("GWMS_MAIN_DIR", False), ("KEYBOARD", False),
    ("GLIDEIN_Auth_Method", False), ("CVMFS_HTTP_PROXY", False), ("GLIDEIN_Entry_Name", False),
    ("GLIDEIN_TOKEN", True), ("CONDOR_PASSWORD", True), ("GLIDEIN_SECRET_FILE", True),
    ("GWMS_CREDENTIAL", True), ("SSH_PRIVATE", True), ("GLIDEIN_KEY", True),
    ("GLIDEIN_HTTP_AUTH", True), ("GLIDEIN_PRIVKEY", True), ("GLIDEIN_APIKEY", True),
    ("GLIDEIN_OAUTH_BEARER", True), ("GLIDEIN_PWD", True), ("GLIDEIN_Collector_Pass", True),
    ("GLIDEIN_HMAC", True), ("GLIDEIN_SESSION_ID", True), ("GLIDEIN_SIGNATURE", True),
    ("X509_USER_PROXY", True), ("GLIDEIN_X509_PROXY", True),
])
def test_secret_looking_keys(key: str, secret: bool) -> None:
    """Keys naming tokens, passwords, keys, signatures, proxies or auth are secrets."""
    assert is_secret(key, "value") == secret


@pytest.mark.parametrize(("value", "secret"), [
    ("Some Site With Spaces", False), ("CMSHTPC_T2_US_Nebraska_Red_gw1_long", False),
    ("123e4567-e89b-12d3-a456-426614174000", False), ("/home/glidein_pilot/glide_aB3xYz/execute",
                                                      False),
    ("da39a3ee5e6b4b0d3255bfef95601890afd80709", False), ("https://proxy.example.org:3128", False),
    (PEM, True), (JWT, True), (f"Bearer {JWT}", True),
    ("ghp_R2d2C3poX9kLmN0pQrStUvWxYz123456", True), ("sk-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z", True),
])
def test_secret_looking_values(value: str, secret: bool) -> None:
    """PEM blocks, JWTs and long opaque tokens are secrets under any name; names, paths,
    UUIDs and hex digests are not."""
    assert is_secret("GLIDEIN_Innocent", value) == secret


def test_exported_variables_keep_values_and_drop_the_rest() -> None:
    """Only prefixed, valid, non-secret keys are exported, values verbatim."""
    values = {"GLIDEIN_Site": "A Site  'quoted' $x", "GWMS_DIR": "/w d", "OTHER": "x",
              "GLIDEIN_TOKEN": "t", "GLIDEIN-BAD": "x", "CVMFS_REPOS": "a:b"}
    assert exported_variables(values) == {
        "GLIDEIN_Site": "A Site  'quoted' $x", "GWMS_DIR": "/w d", "CVMFS_REPOS": "a:b"}
    allowed = exported_variables(values, allow=["GLIDEIN_TOKEN"])
    assert allowed["GLIDEIN_TOKEN"] == values["GLIDEIN_TOKEN"]


def test_secret_values_are_not_exported_unless_allowed() -> None:
    """A PEM proxy or a JWT under an innocent name stays out of the environment."""
    values = {"GLIDEIN_X509_PROXY": PEM, "GLIDEIN_Note": JWT, "GLIDEIN_Site": "S"}
    assert exported_variables(values) == {"GLIDEIN_Site": "S"}
    assert "GLIDEIN_Note" in exported_variables(values, allow=["GLIDEIN_Note"])


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


def test_exported_variables_are_bounded() -> None:
    """A value too big for one environment string, or for the total, is left out and named."""
    from cvmfsd.config import EXPORT_MAX_TOTAL, EXPORT_MAX_VARIABLE, oversized_variables

    values = {"GLIDEIN_Huge": "x" * EXPORT_MAX_VARIABLE, "GLIDEIN_Site": "S"}
    values.update({f"GLIDEIN_V{i}": "y" * (EXPORT_MAX_VARIABLE // 2) for i in range(20)})
    exported = exported_variables(values)
    assert "GLIDEIN_Huge" not in exported and exported["GLIDEIN_Site"] == "S"
    assert sum(len(k) + len(v) + 2 for k, v in exported.items()) <= EXPORT_MAX_TOTAL
    assert set(oversized_variables(values)) == set(values) - set(exported)
