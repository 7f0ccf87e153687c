"""A background ``cvmfsd run`` with metrics, for the tests that scrape it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cvmfsd import ctl, glidein
from cvmfsd.talk import short_address
from tests.conftest import REPO_A, REPO_B, reap, wait_for

CVMFSD = [sys.executable, "-m", "cvmfsd"]
READS = (f"/cvmfs/{REPO_A}/hello.txt", f"/cvmfs/{REPO_A}/sub/deeper/file.txt",
         f"/cvmfs/{REPO_B}/data.csv", f"/cvmfs/{REPO_A}/hello.txt")


class Daemon:
    """A background ``cvmfsd run`` whose payload runs ``script`` (default: read READS), then
    touches ``marker`` and sleeps."""

    def __init__(self, dist: Path, work: Path, *extra: str,
                 repos: Sequence[str] = (REPO_A, REPO_B), script: str | None = None) -> None:
        self.work = work
        self.gconfig = work / "glidein_config"
        self.gconfig.write_text("GLIDEIN_Site Test_Site\nGLIDEIN_Entry_Name Test_Entry\n"
                                "GLIDEIN_UUID 1234-abcd\n")
        self.socket = work / "sock" / "s"
        self.marker = work / "reads-done"
        script = script or f"cat {' '.join(READS)} > /dev/null"
        script = f"{script} && touch {self.marker} && exec sleep 120"
        self.process = subprocess.Popen(
            [*CVMFSD, "run", "--dist", str(dist), "--repos", ",".join(repos),
             "--glidein-config", str(self.gconfig), "--socket", str(self.socket),
             "--metrics-interval", "0.3", "--probe-interval", "0.3", "--probe-deadline", "1",
             *extra, "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        wait_for(lambda: self.marker.exists() or self.process.poll() is not None, 60)
        assert self.process.poll() is None, self.stop()

    @property
    def address(self) -> str:
        return glidein.read_glidein_config(self.gconfig).values["CVMFSD_METRICS_ADDRESS"]

    def scrape(self, accept: str = "") -> tuple[float, str]:
        """(seconds the scrape took, the body)."""
        request = urllib.request.Request(f"http://{self.address}/metrics",
                                         headers={"Accept": accept} if accept else {})
        start = time.monotonic()
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            body = answer.read().decode()
        return time.monotonic() - start, body

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(self.scrape()[1]) for s in f.samples}

    def status(self) -> dict[str, object]:
        result = ctl.call(str(self.socket), "status").result
        assert isinstance(result, dict)
        return result

    def stop(self) -> str:
        """SIGTERM, wait, and return the log."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=60)
        finally:
            reap(self.process)
        return err


def talk(path: Path, command: str) -> str:
    """cvmfs_talk, through a short path: the tests may run in a deep directory."""
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        try:
            sock.connect(short_address(dirfd, path.name))
        finally:
            os.close(dirfd)
        sock.sendall(command.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def talk_socket(dist: Path, repo: str) -> Path:
    return dist / "dist" / "var" / "lib" / "cvmfs" / "shared" / f"cvmfs_io.{repo}"
