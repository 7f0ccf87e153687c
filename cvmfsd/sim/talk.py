"""A tiny ``cvmfs_talk``: ``python -m cvmfsd.sim.talk -p SOCKET COMMAND...``.

Like the real ``cvmfs_talk -p``, it connects to the socket, sends the command
words joined by blanks (no newline), prints everything the daemon answers
until it closes the connection, and exits 0. It exits 1 if the socket cannot
be reached. The lead's ``makedist`` installs it as ``dist/usr/bin/cvmfs_talk``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cvmfsd.sim._sockets import connect_socket

DEFAULT_TIMEOUT = 30.0


def talk(path: str, command: str, *, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Send ``command`` to the talk socket at ``path`` and return the answer.

    Raises:
        OSError: the socket cannot be reached or the exchange timed out.
    """
    with connect_socket(path) as sock:  # long paths too, as cvmfs_talk.cc:116 does
        sock.settimeout(timeout)
        sock.sendall(command.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="cvmfs_talk", description=__doc__.splitlines()[0])
    parser.add_argument("-p", dest="socket", required=True, help="path of the talk socket")
    parser.add_argument(
        "-t",
        dest="timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for the answer",
    )
    parser.add_argument("command", nargs="+", help="the command, e.g. 'internal affairs'")
    args = parser.parse_args(argv)
    try:
        answer = talk(args.socket, " ".join(args.command), timeout=args.timeout)
    except OSError as exc:
        print(f"Seems like CernVM-FS is not running in {args.socket} ({exc})", file=sys.stderr)
        return 1
    sys.stdout.write(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
