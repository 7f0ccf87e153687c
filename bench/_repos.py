"""Shared by the benchmarks: a distribution with many repositories, and a ready cvmfsd."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from cvmfsd import glidein
from cvmfsd.sim import makedist, stratum


def build(work: Path, count: int, domain: str) -> tuple[Path, list[str]]:
    """Publish ``count`` one-file repositories ``rNN.<domain>`` and make a distribution."""
    repos = [f"r{i:02d}.{domain}" for i in range(count)]
    for repo in repos:
        src = work / "src" / repo
        src.mkdir(parents=True)
        (src / "file.txt").write_text(f"{repo}\n")
        stratum.publish(work / "st", repo, src)
    return makedist.make_dist(work / "d", stratum=work / "st"), repos


def wait_ready(process: subprocess.Popen[bytes], gconfig: Path, *, timeout: float,
               errors: Path | None = None) -> str:
    """Wait for CVMFSD_STATUS=ready in glidein_config; return CVMFSD_METRICS_ADDRESS."""
    deadline = time.monotonic() + timeout
    while glidein.read_glidein_config(gconfig).values.get("CVMFSD_STATUS") != "ready":
        if process.poll() is not None or time.monotonic() > deadline:
            tail = errors.read_text(errors="replace")[-3000:] if errors else ""
            raise SystemExit(f"cvmfsd did not become ready (exit {process.poll()})\n{tail}")
        time.sleep(0.1)
    return glidein.read_glidein_config(gconfig).values["CVMFSD_METRICS_ADDRESS"]
