"""``cvmfsd demo``: a simulated stratum and distribution, and ``cvmfsd run`` on it.

It publishes two small repositories, makes a distribution, writes a
glidein_config as a pilot would have it, and runs ``cvmfsd run`` with a
payload that reads a file from each repository (twice from one, to show a
cache hit), prints hit rate and download count from the magic extended
attributes, prints a glidein variable it got inside the namespace, and shows
a few of cvmfsd's metrics and ClassAd lines through ``cvmfsctl``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cvmfsd.sim import makedist, stratum

REPOS = ("software.demo.test", "data.demo.test")

PAYLOAD = r"""
set -e
echo "inside the namespace as uid $(id -u); GLIDEIN_Site is '$GLIDEIN_Site'"
echo "--- /cvmfs/software.demo.test/README"
cat /cvmfs/software.demo.test/README
echo "--- /cvmfs/data.demo.test/events.csv (read twice)"
cat /cvmfs/data.demo.test/events.csv >/dev/null
head -n 3 /cvmfs/data.demo.test/events.csv
python3 - <<'PY'
import os
for repo in ("software.demo.test", "data.demo.test"):
    path = "/cvmfs/" + repo
    get = lambda name: os.getxattr(path, "user." + name).decode()
    print(f"{repo}: revision {get('revision')}, hitrate {get('hitrate')}%, "
          f"{get('ndownload')} downloads, {get('nopen')} opens")
PY
sleep 1.5  # one metrics collection after the reads (--metrics-interval 1)
echo "--- cvmfsctl metrics (some; all at http://$("$CVMFSCTL" get CVMFSD_METRICS_ADDRESS)/metrics)"
"$CVMFSCTL" metrics | grep -E '^cvmfs_(mount_up|fetch_(requests|downloads)_total|cache_hit_ratio)'
echo "--- cvmfsctl classad (for an HTCondor startd cron)"
"$CVMFSCTL" classad | grep -E 'HAS_CVMFS|_REVISION|_HIT_RATIO'
"""


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _publish_demo_repos(stratum_dir: Path, scratch: Path) -> None:
    software = scratch / "software"
    (software / "bin").mkdir(parents=True)
    (software / "README").write_text("Simulated software repository, served by cvmfsd.sim.\n")
    (software / "bin/hello").write_text("#!/bin/sh\necho hello from /cvmfs\n")
    (software / "bin/hello").chmod(0o755)
    data = scratch / "data"
    data.mkdir()
    rows = "\n".join(f"{i},{i * i}" for i in range(1000))
    (data / "events.csv").write_text(f"event,value\n{rows}\n")
    for repo, source in zip(REPOS, (software, data)):
        revision = stratum.publish(stratum_dir, repo, source)
        _say(f"published {repo} revision {revision}")


def _leftovers(dist: Path) -> str:
    """Mounts and processes that still refer to ``dist`` (there should be none)."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4].startswith(str(dist))]
    procs = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(dist).encode() in (entry / "cmdline").read_bytes():
                procs.append(entry.name)
        except OSError:
            continue
    found = [f"mount {m}" for m in mounts] + [f"process {p}" for p in procs]
    return ", ".join(found)


def run_demo(workdir: Path | None, *, keep: bool = False) -> int:
    """Build everything under ``workdir`` (a new temp dir if None) and run it.

    Returns:
        cvmfsexec's exit status.
    """
    made_here = workdir is None
    root = Path(tempfile.mkdtemp(prefix="cvmfsd-demo-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    try:
        stratum_dir = root / "stratum"
        _publish_demo_repos(stratum_dir, root / "src")
        dist = makedist.make_dist(root / "cvmfsexec", stratum=stratum_dir)
        _say(f"made distribution {dist}")
        config = root / "glidein_config"
        config.write_text("GLIDEIN_Site Demo Site (simulated)\nGLIDEIN_CVMFS required\n")
        argv = [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist),
                "--repos", ",".join(REPOS), "--glidein-config", str(config),
                "--metrics-interval", "1", "--",
                "/bin/sh", "-c", PAYLOAD]
        _say("running: cvmfsd " + " ".join(argv[3:-1]) + " <payload>")
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        status = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, env=env).returncode
        _say(f"cvmfsd exited with status {status}")
        _say(f"left behind under {dist}: {_leftovers(dist) or 'no mount and no process'}")
        written = [line for line in config.read_text().splitlines()
                   if line.startswith(("GWMS_", "CVMFS", "HAS_"))]
        _say("written back to glidein_config: " + "; ".join(written))
        return status
    finally:
        if made_here and not keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            _say(f"kept {root}")
