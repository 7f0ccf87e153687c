"""SIGKILL of a process of cvmfsd's tree -> nothing of ours left: how long it takes.

For each target (payload, shim, namespace PID 1, cvmfsexec, unshare; and cvmfsd
itself, which its janitor cleans up after), many trials: start ``cvmfsd run``
in mode 3 on the simulated distribution, wait for the payload, SIGKILL the
target, and time until no process of the trial (cvmfsd included) and no mount
under the distribution remains (polled every 2 ms, so the numbers carry that
much granularity).  A leak is a trial still not clean after 10 s.

A process belongs to the trial if its command line names the distribution or
holds this run's marker (the payload is ``sleep MARKER``, and the shim carries
the payload's command line), so other cvmfsd instances on the machine are
never counted.

    python bench/kill_cleanup.py [--trials 20] [--targets payload,cvmfsd]

Target (design.md): p99 <= 200 ms, 0 leaks.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cvmfsd import launch
from cvmfsd.sim import makedist, stratum

# Unique to this run: the payload's `sleep MARKER` is never another run's.
MARKER = str(6_000_000 + os.getpid())
TARGETS = ("payload", "shim", "namespace-init", "cvmfsexec", "unshare", "cvmfsd")
LEAK_AFTER = 10.0


def cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return []


def ours(dist: Path, root_pid: int) -> list[int]:
    """Live processes of the trial: cvmfsd, and whatever names the dist or the marker."""
    found = []
    needle = str(dist).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not launch.is_running(int(entry.name)):
            continue
        argv = cmdline(int(entry.name))
        if int(entry.name) == root_pid or MARKER.encode() in argv \
                or any(needle in arg for arg in argv):
            found.append(int(entry.name))
    return found


def mounts(dist: Path) -> bool:
    return str(dist) in Path("/proc/self/mountinfo").read_text()


def find(root: int, name: str) -> int | None:
    for pid in launch.descendants(root):
        text = [a.decode(errors="replace") for a in cmdline(pid)]
        if (name == "payload" and text[:2] == ["sleep", MARKER]) or \
           (name == "shim" and "cvmfsd.shim" in text) or \
           (name == "namespace-init" and launch.is_namespace_init(pid)) or \
           (name == "cvmfsexec" and len(text) > 1 and text[1].endswith("/cvmfsexec")) or \
           (name == "unshare" and text[:1] == ["unshare"]):
            return pid
    return None


def trial(dist: Path, target: str) -> float | None:
    """Seconds from the SIGKILL until the trial is clean; None for a leak."""
    errors = dist.parent / "cvmfsd.err"
    with errors.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist), "--grace", "1",
             "--log-level", "error", "--repos", "bench.sim.test", "--", "sleep", MARKER],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 30
    while find(process.pid, "payload") is None:
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit(f"the payload never started (cvmfsd exit {process.poll()}):\n"
                             + errors.read_text(errors="replace")[-2000:])
        time.sleep(0.01)
    victim = process.pid if target == "cvmfsd" else find(process.pid, target)
    if victim is None:
        raise SystemExit(f"no {target} in the tree of cvmfsd {process.pid}")
    start = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    while ours(dist, process.pid) or mounts(dist):
        if time.perf_counter() - start > LEAK_AFTER:
            left = ours(dist, process.pid)
            print(f"  leak after SIGKILL of {target}: mounts={mounts(dist)} processes="
                  + "; ".join(b" ".join(cmdline(p)).decode(errors="replace")[:100]
                              for p in left), file=sys.stderr)
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            process.wait()
            return None
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    process.wait()
    return elapsed


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(name: str, times: list[float], leaks: int, trials: int) -> str:
    if not times:
        return f"{name:>15} " + " ".join(["      -"] * 6) + f" {leaks:>3}/{trials}"
    ms = sorted(t * 1000 for t in times)
    stdev = statistics.stdev(ms) if len(ms) > 1 else 0.0
    return (f"{name:>15} {ms[0]:7.1f} {statistics.median(ms):7.1f} {quantile(ms, 0.9):7.1f} "
            f"{quantile(ms, 0.99):7.1f} {ms[-1]:7.1f} {stdev:7.1f} {leaks:>3}/{trials}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per target")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated, from {','.join(TARGETS)}")
    args = parser.parse_args()
    targets = args.targets.split(",")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {sorted(unknown)}; expected some of {TARGETS}")
    results: dict[str, tuple[list[float], int]] = {}
    with tempfile.TemporaryDirectory(prefix="cvk", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        (root / "src" / "f").write_text("x")
        stratum.publish(root / "st", "bench.sim.test", root / "src")
        dist = makedist.make_dist(root / "d", stratum=root / "st")
        for target in targets:
            times, leaks = [], 0
            for n in range(1, args.trials + 1):
                elapsed = trial(dist, target)
                if elapsed is None:
                    leaks += 1
                else:
                    times.append(elapsed)
                if n % 10 == 0 or n == args.trials:
                    worst = max(times) * 1000 if times else float("nan")
                    print(f"  {target}: {n}/{args.trials} trials, worst so far {worst:.1f} ms, "
                          f"leaks {leaks}", file=sys.stderr, flush=True)
            results[target] = (times, leaks)
    print(f"\nSIGKILL -> no process and no mount of the trial left (ms; {args.trials} trials "
          "per target)")
    print(f"{'target':>15} {'min':>7} {'median':>7} {'p90':>7} {'p99':>7} {'max':>7} "
          f"{'stdev':>7} leaks")
    for target, (times, leaks) in results.items():
        print(row(target, times, leaks, args.trials))
    everything = [t for times, _ in results.values() for t in times]
    print(row("all", everything, sum(leaks for _, leaks in results.values()),
              args.trials * len(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
