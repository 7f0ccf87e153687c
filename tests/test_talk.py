"""cvmfsd's cvmfs_talk client against a socket that behaves as cvmfs2's does.

cvmfs2's talk socket (cvmfs/talk.cc, cvmfs/talk.h at ae7450ec9): one responder
thread, ``listen(fd, 1)`` (talk.cc:89), commands of at most 512 bytes
(talk.h:42), bound as ``./cvmfs_io.<fqrn>`` relative to the workspace
(mountpoint.cc:1886), so it exists at depths where the absolute path does not
fit ``sun_path``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cvmfsd.talk import MAX_COMMAND, short_address, talk

SUN_PATH_MAX = 107  # usable bytes of sockaddr_un.sun_path


def deep_dir(base: Path) -> Path:
    """A directory whose ``cvmfs_io.<repo>`` path is over 140 bytes, as in a glidein."""
    path = base / ("glide_" + "x" * 40) / ("execute_" + "y" * 40) / "dist/var/lib/cvmfs/shared"
    path.mkdir(parents=True)
    assert len(str(path / "cvmfs_io.repo.a")) > 140
    return path


class Responder:
    """One thread, backlog 1, one command at a time: cvmfs2's talk responder."""

    def __init__(self, workspace: Path, *, delay: float = 0.0, answer: bool = True) -> None:
        self.path = workspace / "cvmfs_io.repo.a"
        dirfd = os.open(workspace, os.O_PATH | os.O_DIRECTORY)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(short_address(dirfd, self.path.name))
        finally:
            os.close(dirfd)
        self.sock.listen(1)
        self.delay, self.answer = delay, answer
        self.commands: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                command = conn.recv(MAX_COMMAND)
                self.commands.append(command)
                time.sleep(self.delay)
                if not self.answer:
                    time.sleep(10)
                    continue
                conn.sendall(b"answer to " + command + b"\n")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture(name="responder")
def _responder(tmp_path: Path) -> Iterator[Responder]:
    r = Responder(deep_dir(tmp_path), delay=0.05)
    yield r
    r.close()


async def test_deep_workspace_is_reached_through_a_short_path(responder: Responder) -> None:
    """Over 140 bytes: the absolute path cannot be connected to, the client still talks."""
    assert len(str(responder.path)) > SUN_PATH_MAX
    with socket.socket(socket.AF_UNIX) as plain, pytest.raises(OSError):
        plain.connect(str(responder.path))  # the premise: what a naive client meets
    assert await talk(responder.path, "revision") == "answer to revision\n"


async def test_a_full_listen_queue_is_retried(responder: Responder) -> None:
    """Eight clients at once against backlog 1 and a 50 ms responder: every one answered."""
    answers: list[str] = []

    async def one(i: int) -> None:
        answers.append(await talk(responder.path, f"cmd {i}", deadline=5))

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, i)
    assert sorted(answers) == sorted(f"answer to cmd {i}\n" for i in range(8))


async def test_long_command_refused_before_sending(responder: Responder) -> None:
    """cvmfs2 reads 512 bytes of a command: a longer one is an error here, not a truncation."""
    with pytest.raises(ValueError, match="at most 512"):
        await talk(responder.path, "x" * (MAX_COMMAND + 1))
    assert responder.commands == []
    assert await talk(responder.path, "y" * MAX_COMMAND) == f"answer to {'y' * MAX_COMMAND}\n"


async def test_no_answer_is_a_timeout(tmp_path: Path) -> None:
    """A responder that never answers costs the deadline, then TimeoutError naming it."""
    r = Responder(tmp_path, answer=False)
    try:
        with pytest.raises(TimeoutError, match=r"no answer within 0\.3 s"):
            await talk(r.path, "cache size", deadline=0.3)
    finally:
        r.close()


async def test_missing_socket_is_an_oserror(tmp_path: Path) -> None:
    """No socket file (no cvmfs2): OSError at once, naming the path."""
    with trio.fail_after(1), pytest.raises(OSError, match=r"cvmfs_io\.repo\.a"):
        await talk(tmp_path / "cvmfs_io.repo.a", "pid")


async def test_a_socket_nobody_listens_on_fails_at_once(tmp_path: Path) -> None:
    """A dead cvmfs2's socket file (ECONNREFUSED) is not retried: no daemon, no wait."""
    r = Responder(tmp_path)
    r.close()  # the file stays, nobody listens
    assert r.path.exists()
    with trio.fail_after(0.5), pytest.raises(ConnectionRefusedError):
        await talk(r.path, "pid", deadline=5)
