"""``cvmfsd demo``: a simulated stratum and distribution, and cvmfsexec run on it.

It publishes two small repositories, makes a distribution, and runs the
distribution's own ``cvmfsexec`` with a payload that reads a file from each
repository (twice from one, to show a cache hit) and prints hit rate and
download count from the magic extended attributes.
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
echo "inside the namespace as uid $(id -u), pid $$"
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
        argv = [str(dist / "cvmfsexec"), *REPOS, "--", "/bin/sh", "-c", PAYLOAD]
        _say("running: " + " ".join(argv[:-1]) + " <payload>")
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        status = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, env=env).returncode
        _say(f"cvmfsexec exited with status {status}; the namespace and its mounts are gone")
        return status
    finally:
        if made_here and not keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            _say(f"kept {root}")
