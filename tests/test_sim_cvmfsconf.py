"""Tests for cvmfsd.sim.cvmfsconf: shell-style cvmfs configuration parsing."""

from __future__ import annotations

import pytest

from cvmfsd.sim.cvmfsconf import parse_config


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1", {"A": "1"}),
        ("A=1\nA=2", {"A": "2"}),
        ("  export A=x", {"A": "x"}),
        ("A='single $B quoted'", {"A": "single $B quoted"}),
        ('B=b\nA="dq $B ${B}x"', {"B": "b", "A": "dq b bx"}),
        ("B=b\nA=$B/${B}", {"B": "b", "A": "b/b"}),
        ("A=$UNSET-x", {"A": "-x"}),
        ("A=${UNSET:-fallback}", {"A": "fallback"}),
        ("B=set\nA=${B:-fallback}", {"B": "set", "A": "set"}),
        ("# comment\n\nA=1 # trailing", {"A": "1"}),
        ("A=a#b", {"A": "a#b"}),
        ('A="with # hash"', {"A": "with # hash"}),
        ("A=one two", {"A": "one"}),
        ('A="a\\"b\\$c\\d"', {"A": 'a"b$c\\d'}),
        ("A=a\\ b", {"A": "a b"}),
        ("A=", {"A": ""}),
        ("A=$", {"A": "$"}),
        ("A=${", {"A": "${"}),
        ("A=${bad-name}", {"A": "${bad-name}"}),
        ("if [ x ]; then\nA=1\nfi", {"A": "1"}),
        ("1A=x\n=y\nlower_ok=z", {"lower_ok": "z"}),
        (
            'CVMFS_SERVER_URL="http://s1/cvmfs/@fqrn@;http://s2/cvmfs/@fqrn@"',
            {"CVMFS_SERVER_URL": "http://s1/cvmfs/@fqrn@;http://s2/cvmfs/@fqrn@"},
        ),
        ('CVMFS_HTTP_PROXY="auto;DIRECT"', {"CVMFS_HTTP_PROXY": "auto;DIRECT"}),
    ],
)
def test_parse_config(text: str, expected: dict[str, str]) -> None:
    """Assignments, quoting, expansion and comments follow POSIX sh."""
    assert parse_config(text) == expected


def test_initial_values_expand_and_survive() -> None:
    """Values from earlier files are visible to $VAR and kept unless overridden."""
    result = parse_config("B=$A/more\nC=3", {"A": "/base", "C": "1"})
    assert result == {"A": "/base", "B": "/base/more", "C": "3"}
