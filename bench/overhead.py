"""Supervisor overhead: ``cvmfsd run`` vs the distribution's cvmfsexec alone.

Both start the same repositories on the same simulated distribution (warm
cache) with a payload that prints one line; the time measured is from spawning
the command to reading that line, i.e. until the payload runs with /cvmfs.
Runs alternate between the two so that machine noise hits both alike.

    python bench/overhead.py [--trials 20] [--repos 2] [--bundle dist/cvmfsd.pyz] [--timeline]

Target (design.md): cvmfsd adds at most 150 ms.  For numbers that mean
something, run it from a non-editable install (an editable one adds an import
hook to the start-up of cvmfsd and of each helper it starts); the bytecode of
every command is cached during the warm-up (PYTHONDONTWRITEBYTECODE is dropped).
With ``--bundle``, ``cvmfsd run`` from the one-file bundle joins the alternation
(in place, and unpacked under ``$CVMFSD_CACHE``), with this interpreter and
``-I``; target (issue 13):
within 30 ms of the installed package.

With ``--timeline``, the trials of ``cvmfsd run`` also record where its time
goes (:mod:`cvmfsd.timeline`): for each phase, the median moment it was
reached, counted from the spawn of ``cvmfsd run``, in cvmfsd and in the shim,
beside the median moment cvmfsexec alone starts its payload.
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


def time_to_payload(argv: list[str], env: dict[str, str] | None = None,
                    marks: dict[str, float] | None = None) -> float:
    """Seconds from spawning ``argv`` to its payload's line; ``marks``: the timeline's."""
    timeline = None
    if marks is not None:
        fd, timeline = tempfile.mkstemp(prefix="cvmfsd-timeline-")
        os.close(fd)
        env = {**(env if env is not None else os.environ), "CVMFSD_TIMELINE": timeline}
    start = time.monotonic()  # CLOCK_MONOTONIC, as the timeline's
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, text=True, env=env)
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip() == "payload-started":
            elapsed = time.monotonic() - start
            break
    else:
        raise RuntimeError(f"{argv[0]} never started the payload (exit {process.wait()})")
    process.stdout.close()
    if process.wait() != 0:
        raise RuntimeError(f"{argv[0]} failed")
    if timeline is not None and marks is not None:
        for line in Path(timeline).read_text().splitlines():
            stamp, _pid, phase = line.split(" ", 2)
            marks.setdefault(phase, float(stamp) - start)
        marks["payload line read"] = elapsed
        Path(timeline).unlink()
    return elapsed


def print_timeline(runs: list[dict[str, float]], alone: list[float]) -> None:
    """Each phase's median moment (ms from spawn), in the order they are reached."""
    phases: dict[str, list[float]] = {}
    for marks in runs:
        for phase, at in marks.items():
            phases.setdefault(phase, []).append(at)
    print(f"\ntimeline of cvmfsd run (median ms from spawn, n={len(runs)}; "
          "step: since the phase before):")
    previous = 0.0
    for phase, moments in sorted(phases.items(), key=lambda item: statistics.median(item[1])):
        at = statistics.median(moments) * 1000
        print(f"  {at:7.1f} ms  (+{at - previous:6.1f})  {phase}")
        previous = at
    print(f"  cvmfsexec alone starts its payload at {statistics.median(alone) * 1000:7.1f} ms")


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
    parser.add_argument("--timeline", action="store_true",
                        help="also show where cvmfsd run's time goes, phase by phase")
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
        # An installed cvmfsd has its bytecode cached: let every command write it.
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
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
        timelines: list[dict[str, float]] = []
        for _ in range(args.trials):
            for name, (argv, env) in commands.items():
                marks: dict[str, float] | None = None
                if args.timeline and name == "cvmfsd run":
                    marks = {}
                    timelines.append(marks)
                results[name].append(time_to_payload(argv, env, marks))
    for name, samples in results.items():
        print(describe(name, samples))
    added = [s - p for s, p in zip(results["cvmfsd run"], results["cvmfsexec alone"])]
    print(describe("added by cvmfsd", added))
    for name in list(results)[2:]:
        more = [b - s for b, s in zip(results[name], results["cvmfsd run"])]
        print(describe(f"{name} - installed", more))
    if timelines:
        print_timeline(timelines, results["cvmfsexec alone"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
