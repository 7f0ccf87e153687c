"""The shim's command line (parsed by hand: it starts on the payload's critical path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cvmfsd import shim
from cvmfsd.launch import Dist, LaunchPlan


def test_the_command_line_launch_writes_parses() -> None:
    """What LaunchPlan.argv puts after ``-m cvmfsd.shim`` is what Args reads back."""
    plan = LaunchPlan(dist=Dist(Path("/d")), repos=("repo.a", "repo.b"),
                      payload=("sh", "-c", "echo --repos x"), nonesting=False)
    argv = plan.argv(channel_fd=7, stdio_fds=[8, 9, 11])
    args = shim.Args(argv[argv.index("cvmfsd.shim") + 1:])
    assert (args.channel_fd, args.stdio_fds, args.repos, args.allow_nesting, args.payload) == (
        7, [8, 9, 11], ["repo.a", "repo.b"], True, ["sh", "-c", "echo --repos x"])


@pytest.mark.parametrize(("argv", "said"), [
    (["--channel-fd", "3", "--stdio-fds", "0,1,2", "--", "true", "--bogus"], None),
    (["--channel-fd", "3", "--stdio-fds", "0,1,2"], "no payload after --"),
    (["--stdio-fds", "0,1,2", "--", "true"], "--channel-fd and --stdio-fds are required"),
    (["--channel-fd", "x", "--stdio-fds", "0,1,2", "--", "true"],
     "--channel-fd 'x': expected file descriptor numbers"),
    (["--channel-fd", "3", "--stdio-fds", "0,1", "--", "true"],
     "--stdio-fds '0,1': expected three numbers"),
    (["--channel-fd", "3,4", "--stdio-fds", "0,1,2", "--", "true"],
     "--channel-fd '3,4': expected one number"),
    (["--channel-fd"], "--channel-fd needs a value"),
    (["--verbose", "--", "true"], "unknown option '--verbose'"),
])
def test_bad_command_lines_say_what_is_wrong(argv: list[str], said: str | None) -> None:
    """Each mistake is named; options after ``--`` belong to the payload."""
    if said is None:
        assert shim.Args(argv).payload == ["true", "--bogus"]
        return
    with pytest.raises(ValueError, match="^" + re.escape(said) + "$"):
        shim.Args(argv)


def test_main_refuses_a_bad_command_line_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 and the usage on stderr, before touching any descriptor."""
    assert shim.main(["--channel-fd", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvmfsd shim: --channel-fd and --stdio-fds are required\nusage:")
