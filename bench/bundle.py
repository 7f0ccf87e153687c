"""The one-file bundle: its size, and ``cvmfsctl get KEY`` from it as a whole process.

Starts ``cvmfsd run`` (from the bundle) on a simulated distribution, then
times, alternately, ``python -c pass`` and ``python -I cvmfsd.pyz cvmfsctl get
GLIDEIN_Site`` run in place from the zip and with ``$CVMFSD_CACHE`` (the
bundle unpacked once into a scratch directory), with the same interpreter.
The bundle it builds has bytecode for that interpreter; a given one says for
which interpreters it has some (any other compiles the modules at every start).

    python bench/bundle.py [--bundle dist/cvmfsd.pyz] [--python python3] [--runs 50]

Targets (design.md): the bundle <= 5 MB; ``cvmfsctl get`` from it <= 3x
``python3 -c pass``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import _repos
from _timing import describe, timed  # bench/_timing.py, beside this script

from cvmfsd import bundle as builder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None,
                        help="the bundle (default: build one from this checkout)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run it")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CVMFSD_"))}
    with tempfile.TemporaryDirectory(prefix="cvb", dir="/tmp") as tmp:
        work = Path(tmp)
        pyz = args.bundle
        if pyz is None:
            pyz = work / "cvmfsd.pyz"
            checkout = Path(__file__).resolve().parent.parent
            builder.main(["build", "-o", str(pyz), "--wheels", str(checkout / "dist/wheels"),
                          "--python", args.python])
        size = pyz.stat().st_size
        with zipfile.ZipFile(pyz) as archive:
            tags = sorted(name.split("/")[1] for name in archive.namelist()
                          if name.startswith(f"{builder.BYTECODE}/"))
        dist, repos = _repos.build(work, 1, "bundle.test")
        gconfig = work / "glidein_config"
        gconfig.write_text("GLIDEIN_Site Bench_Site\n")
        socket_path = work / "s" / "c.sock"
        errors = work / "cvmfsd.err"
        with errors.open("wb") as err:
            daemon = subprocess.Popen(
                [args.python, "-I", str(pyz), "run", "--dist", str(dist), "--repos", repos[0],
                 "--glidein-config", str(gconfig), "--socket", str(socket_path),
                 "--log-level", "error", "--", "sleep", "3600"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            _repos.wait_ready(daemon, gconfig, timeout=60, errors=errors)
            get = [args.python, "-I", str(pyz), "cvmfsctl", "--socket", str(socket_path),
                   "get", "GLIDEIN_Site"]
            cached = {**env, "CVMFSD_CACHE": str(work / "cache")}
            check = subprocess.run(get, capture_output=True, text=True, check=True, env=cached)
            tag = subprocess.run([args.python, "-c", "import sys; print(sys.implementation."
                                  "cache_tag)"], capture_output=True, text=True,
                                 check=True).stdout.strip()
            assert check.stdout == "Bench_Site\n", check
            commands = {"python -c pass": ([args.python, "-c", "pass"], env),
                        "cvmfsctl get (in place)": (get, env),
                        "cvmfsctl get ($CVMFSD_CACHE)": (get, cached)}
            times: dict[str, list[float]] = {name: [] for name in commands}
            for run in range(args.runs + 3):
                for name, (argv, environ) in commands.items():
                    elapsed = timed(argv, environ)
                    if run >= 3:  # warm-up: page cache
                        times[name].append(elapsed)
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
    print(f"bundle: {size} bytes ({size / 2**20:.2f} MiB; target <= 5 MB), "
          f"bytecode for {', '.join(tags) or 'no interpreter'}; {args.python} is {tag}")
    for name, samples in times.items():
        print(describe(name, samples, width=28))
    base = statistics.median(times["python -c pass"])
    for name in list(times)[1:]:
        print(f"{name}: {statistics.median(times[name]) / base:.2f}x python -c pass "
              "(target <= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
