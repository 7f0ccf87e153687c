"""Supervisor overhead: ``cvmfsd run`` vs the distribution's cvmfsexec alone.

Both start the same repositories on the same simulated distribution (warm
cache) with a payload that prints one line; the time measured is from spawning
the command to reading that line, i.e. until the payload runs with /cvmfs.
Runs alternate between the two so that machine noise hits both alike.

    python bench/overhead.py [--trials 20] [--repos 2]

Target (design.md): cvmfsd adds at most 150 ms.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cvmfsd.sim import makedist, stratum


def time_to_payload(argv: list[str]) -> float:
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip() == "payload-started":
            elapsed = time.perf_counter() - start
            break
    else:
        raise RuntimeError(f"{argv[0]} never started the payload (exit {process.wait()})")
    process.stdout.close()
    if process.wait() != 0:
        raise RuntimeError(f"{argv[0]} failed")
    return elapsed


def describe(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[max(0, round(0.9 * len(ordered)) - 1)]
    return (f"{name:>16}: median {statistics.median(ordered) * 1000:7.1f} ms, "
            f"p90 {p90 * 1000:7.1f} ms, stdev {statistics.stdev(ordered) * 1000:6.1f} ms, "
            f"min {ordered[0] * 1000:7.1f} ms (n={len(ordered)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--repos", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cvb", dir="/tmp") as tmp:
        root = Path(tmp)
        repos = [f"bench{i}.sim.test" for i in range(args.repos)]
        for repo in repos:
            (root / "src" / repo).mkdir(parents=True)
            (root / "src" / repo / "f").write_text(repo)
            stratum.publish(root / "st", repo, root / "src" / repo)
        dist = makedist.make_dist(root / "d", stratum=root / "st")
        payload = ["/bin/sh", "-c", "echo payload-started"]
        plain = [str(dist / "cvmfsexec"), "-N", *repos, "--", *payload]
        supervised = [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist),
                      "--repos", ",".join(repos), "--", *payload]
        for argv in (plain, supervised):  # warm the cache and the page cache
            time_to_payload(argv)
        results: dict[str, list[float]] = {"cvmfsexec alone": [], "cvmfsd run": []}
        for _ in range(args.trials):
            results["cvmfsexec alone"].append(time_to_payload(plain))
            results["cvmfsd run"].append(time_to_payload(supervised))
    for name, samples in results.items():
        print(describe(name, samples))
    added = [s - p for s, p in zip(results["cvmfsd run"], results["cvmfsexec alone"])]
    print(describe("added by cvmfsd", added))
    return 0


if __name__ == "__main__":
    sys.exit(main())
