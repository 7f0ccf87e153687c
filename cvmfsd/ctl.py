"""``cvmfsctl``: the client of a running cvmfsd.

Its start-up must stay light (no trio, pyroute2 or prometheus imports): it is
run by pilots and jobs many times.  The control channel it talks to is not
built yet; today it only reports its version.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cvmfsd import __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cvmfsctl`` and return its exit status."""
    parser = argparse.ArgumentParser(prog="cvmfsctl", description="Query a running cvmfsd.")
    parser.add_argument("--version", action="version", version=f"cvmfsctl {__version__}")
    parser.parse_args(argv)
    print("cvmfsctl: no command given; the control channel is not available in this version",
          file=sys.stderr)
    return 2
