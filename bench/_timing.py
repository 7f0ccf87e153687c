"""Timing whole processes, for the start-up benches (bench/enter.py, bench/bundle.py)."""

from __future__ import annotations

import statistics
import subprocess
import time


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Seconds ``argv`` takes as a whole process, stdout discarded; it must succeed."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   env=env)
    return time.perf_counter() - start


def describe(name: str, samples: list[float], width: int = 22) -> str:
    """One line: median, p90, stdev and min in ms, and the number of samples."""
    ordered = sorted(samples)
    p90 = ordered[max(0, round(0.9 * len(ordered)) - 1)]
    spread = statistics.stdev(ordered) * 1000 if len(ordered) > 1 else 0.0
    return (f"{name:>{width}}: median {statistics.median(ordered) * 1000:6.1f} ms, "
            f"p90 {p90 * 1000:6.1f} ms, stdev {spread:5.1f} ms, "
            f"min {ordered[0] * 1000:6.1f} ms (n={len(ordered)})")
