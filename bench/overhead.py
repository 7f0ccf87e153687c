"""Supervisor overhead: ``cvmfsd run`` vs the distribution's cvmfsexec alone.

Both start the same repositories on the same simulated distribution (warm
cache) with a payload that prints one line; the time measured is from spawning
the command to reading that line, i.e. until the payload runs with /cvmfs.
Runs alternate between the two so that machine noise hits both alike.

    python bench/overhead.py [--trials 20] [--repos 2] [--bundle dist/cvmfsd.pyz]

Target (design.md): cvmfsd adds at most 150 ms.  With ``--bundle``, ``cvmfsd
run`` from the one-file bundle joins the alternation (in place, and unpacked
under ``$CVMFSD_CACHE``), with this interpreter and ``-I``; target (issue 13):
within 30 ms of the installed package.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cvmfsd.sim import makedist, stratum


def time_to_payload(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, text=True, env=env)
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
    parser.add_argument("--bundle", type=Path, default=None,
                        help="also time cvmfsd run from this bundle")
    args = parser.parse_args()
    commands: dict[str, tuple[list[str], dict[str, str] | None]] = {}
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
        commands = {"cvmfsexec alone": (plain, None), "cvmfsd run": (supervised, None)}
        if args.bundle is not None:
            clean = {k: v for k, v in os.environ.items()
                     if not k.startswith(("PYTHON", "CVMFSD_"))}
            from_bundle = [sys.executable, "-I", str(args.bundle.absolute()), *supervised[3:]]
            commands["bundle (in place)"] = (from_bundle, clean)
            commands["bundle ($CVMFSD_CACHE)"] = (from_bundle,
                                                  {**clean, "CVMFSD_CACHE": str(root / "c")})
        for argv, env in commands.values():  # warm the cache and the page cache
            time_to_payload(argv, env)
        results: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.trials):
            for name, (argv, env) in commands.items():
                results[name].append(time_to_payload(argv, env))
    for name, samples in results.items():
        print(describe(name, samples))
    added = [s - p for s, p in zip(results["cvmfsd run"], results["cvmfsexec alone"])]
    print(describe("added by cvmfsd", added))
    for name in list(results)[2:]:
        more = [b - s for b, s in zip(results[name], results["cvmfsd run"])]
        print(describe(f"{name} - installed", more))
    return 0


if __name__ == "__main__":
    sys.exit(main())
