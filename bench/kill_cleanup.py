"""SIGKILL of a process of cvmfsd's tree -> nothing of ours left: how long it takes.

For each target (payload, shim, namespace PID 1, cvmfsexec, unshare; and cvmfsd
itself, which its janitor cleans up after), many trials: start ``cvmfsd run``
in mode 3 on the simulated distribution, wait for the payload, SIGKILL the
target, and time until no process of the trial and no mount under the
distribution remains (polled every 2 ms, so the numbers carry that much
granularity).  A leak is a trial still not clean after 10 s.

    python bench/kill_cleanup.py [--trials 20]

Target (design.md): p99 <= 200 ms, 0 leaks.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cvmfsd import launch
from cvmfsd.sim import makedist, stratum

MARKER = "6179"


def ours(dist: Path, root_pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not launch.is_running(int(entry.name)):
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(dist).encode() in argv or argv == f"sleep\0{MARKER}\0".encode() \
                or b"cvmfsd.shim" in argv or int(entry.name) == root_pid:
            found.append(int(entry.name))
    return found


def mounts(dist: Path) -> bool:
    return str(dist) in Path("/proc/self/mountinfo").read_text()


def find(root: int, name: str) -> int | None:
    for pid in launch.descendants(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if (name == "payload" and text[:2] == ["sleep", MARKER]) or \
           (name == "shim" and "cvmfsd.shim" in text) or \
           (name == "namespace-init" and launch.is_namespace_init(pid)) or \
           (name == "cvmfsexec" and len(text) > 1 and text[1].endswith("/cvmfsexec")) or \
           (name == "unshare" and text[:1] == ["unshare"]):
            return pid
    return None


def trial(dist: Path, target: str) -> float | None:
    process = subprocess.Popen(
        [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist), "--grace", "1",
         "--log-level", "error", "--repos", "bench.sim.test", "--", "sleep", MARKER],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while find(process.pid, "payload") is None:
        if time.monotonic() > deadline:
            raise SystemExit("the payload never started")
        time.sleep(0.01)
    victim = process.pid if target == "cvmfsd" else find(process.pid, target)
    assert victim is not None
    start = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    while ours(dist, process.pid) or mounts(dist):
        if time.perf_counter() - start > 10:
            left = ours(dist, process.pid)
            print(f"  leak after SIGKILL of {target}: mounts={mounts(dist)} processes="
                  + "; ".join(Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
                              .decode(errors="replace")[:100] for p in left))
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            process.wait()
            return None
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    process.wait()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--targets", default="payload,shim,namespace-init,cvmfsexec,unshare,cvmfsd")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cvk", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        (root / "src" / "f").write_text("x")
        stratum.publish(root / "st", "bench.sim.test", root / "src")
        dist = makedist.make_dist(root / "d", stratum=root / "st")
        everything: list[float] = []
        for target in args.targets.split(","):
            times, leaks = [], 0
            for _ in range(args.trials):
                elapsed = trial(dist, target)
                if elapsed is None:
                    leaks += 1
                else:
                    times.append(elapsed)
            times.sort()
            everything += times
            p99 = times[min(len(times) - 1, int(0.99 * len(times)))] if times else float("nan")
            print(f"{target:>15}: median {times[len(times) // 2] * 1000:6.1f} ms, "
                  f"p99 {p99 * 1000:6.1f} ms, max {times[-1] * 1000:6.1f} ms, "
                  f"leaks {leaks}/{args.trials}")
        everything.sort()
        p99 = everything[min(len(everything) - 1, int(0.99 * len(everything)))]
        print(f"{'all':>15}: p99 {p99 * 1000:.1f} ms over {len(everything)} clean trials")
    return 0


if __name__ == "__main__":
    sys.exit(main())
