"""``cvmfsctl enter -- true`` as a whole process vs ``python -c pass``.

Starts ``cvmfsd run`` in mode 3 on a simulated distribution with one
repository, then alternates the two commands (so that machine noise hits both
alike) and reports the median, p90, standard deviation and minimum of each
and the ratio of the medians.  ``enter`` asks cvmfsd for its status, opens and
joins four namespaces, forks the keeper and the command, and waits.

    python bench/enter.py [--runs 50] [--ctypes]

``--ctypes`` forces the C library's setns where ``os.setns`` exists (3.12+).
Target (issue 11): <= 2.5x.  For numbers that mean something: no
PYTHONDONTWRITEBYTECODE, and a non-editable install (an editable one adds an
import hook to every start-up); ``--cvmfsctl`` picks another installed script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _repos  # bench/_repos.py, beside this script
from _timing import describe, timed  # bench/_timing.py


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--ctypes", action="store_true",
                        help="force the C library's setns (as on Python < 3.12)")
    parser.add_argument("--cvmfsctl", default=str(Path(sys.executable).parent / "cvmfsctl"))
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.TemporaryDirectory(prefix="cvb", dir="/tmp") as tmp:
        work = Path(tmp)
        dist, repos = _repos.build(work, 1, "enter.test")
        gconfig = work / "glidein_config"
        gconfig.write_text("GLIDEIN_Site Bench Site\n")
        socket_path = work / "s" / "c.sock"
        errors = work / "cvmfsd.err"
        with errors.open("wb") as err:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist), "--repos",
                 repos[0], "--glidein-config", str(gconfig), "--socket", str(socket_path),
                 "--log-level", "error", "--", "sleep", "3600"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            _repos.wait_ready(daemon, gconfig, timeout=60, errors=errors)
            if args.ctypes:
                enter = [sys.executable, "-c", "import sys; from cvmfsd import ctl, enter; "
                         "enter.FORCE_CTYPES = True; sys.exit(ctl.main(sys.argv[1:]))"]
            else:
                enter = [args.cvmfsctl]
            enter += ["--socket", str(socket_path), "enter", "--"]
            check = subprocess.run([*enter, "cat", f"/cvmfs/{repos[0]}/file.txt"],
                                   capture_output=True, text=True, check=True, env=env)
            assert check.stdout == f"{repos[0]}\n", check
            commands = {"python -c pass": [sys.executable, "-c", "pass"],
                        "cvmfsctl enter -- true": [*enter, "true"]}
            times: dict[str, list[float]] = {name: [] for name in commands}
            for run in range(args.runs + 3):
                for name, argv in commands.items():
                    elapsed = timed(argv, env)
                    if run >= 3:  # warm-up: page cache, bytecode
                        times[name].append(elapsed)
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
    for name, samples in times.items():
        print(describe(name, samples))
    medians = [statistics.median(samples) for samples in times.values()]
    print(f"ratio of medians: {medians[1] / medians[0]:.2f}x (target <= 2.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
