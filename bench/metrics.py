"""/metrics latency with 20 repositories, one of them hung, and cvmfsd's resident memory.

Starts ``cvmfsd run`` in mode 3 on the simulated distribution with 20
repositories (collection and probes every ``--interval`` seconds: 15, the
default of both, or 1 to make scrapes race the collection loop and 20 probe
children a second), then:

1. scrapes /metrics back to back over one keep-alive connection, as
   Prometheus does, with every repository healthy;
2. hangs one repository (``cvmfs_talk sim hang``: its FUSE requests stall,
   as a stuck cvmfs2's do), waits until cvmfsd reports it ``hung``, and
   scrapes again while it stays hung;
3. reads cvmfsd's VmRSS and VmHWM (/proc/<pid>/status).

    python bench/metrics.py [--repos 20] [--scrapes 2000] [--interval 15]

Targets (design.md): p99 <= 20 ms with one repository hung, never blocking;
RSS <= 40 MB.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _repos import build, wait_ready  # bench/_repos.py, beside this script


def scrape_many(address: str, count: int) -> tuple[list[float], int]:
    """Latencies (s) of ``count`` scrapes over one connection, and the body size."""
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    latencies, size = [], 0
    for _ in range(count):
        start = time.perf_counter()
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read()
        latencies.append(time.perf_counter() - start)
        size = len(body)
        if response.status != 200:
            raise SystemExit(f"scrape answered {response.status}")
    connection.close()
    return latencies, size


def line(name: str, latencies: list[float], size: int) -> str:
    ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(ms, n=100, method="inclusive")  # never beyond min..max
    return (f"{name:<22} {len(ms):>7} {q[49]:>8.2f} {q[89]:>8.2f} {q[98]:>8.2f} "
            f"{ms[-1]:>8.2f} {size:>9}")


def talk(path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(command.encode())
        return sock.recv(4096).decode()


def memory(pid: int) -> dict[str, int]:
    fields = {}
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = text.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def wait_hung(address: str, repo: str, timeout: float) -> None:
    needle = f'cvmfs_mount_state{{repo="{repo}",state="hung"}} 1.0'
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", "/metrics")
        if needle in connection.getresponse().read().decode():
            return
        time.sleep(0.2)
    raise SystemExit(f"{repo} never became hung")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repos", type=int, default=20)
    parser.add_argument("--scrapes", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=15.0,
                        help="--metrics-interval and --probe-interval of cvmfsd (default 15)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cvb", dir="/tmp") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        print(f"publishing {args.repos} repositories ...", file=sys.stderr)
        dist, repos = build(work, args.repos, "bench.test")
        gconfig = work / "glidein_config"
        gconfig.write_text("GLIDEIN_Site Bench\n")
        print("starting cvmfsd ...", file=sys.stderr)
        process = subprocess.Popen(
            [sys.executable, "-m", "cvmfsd", "run", "--dist", str(dist), "--repos",
             ",".join(repos), "--glidein-config", str(gconfig), "--socket",
             str(work / "sock" / "s"), "--metrics-interval", str(args.interval),
             "--probe-interval", str(args.interval),
             "--probe-deadline", "1", "--hang-timeout", "3600", "--log-level", "error",
             "--", "sleep", "3600"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            address = wait_ready(process, gconfig, timeout=120)
            time.sleep(3)  # the first collection cycles
            print(f"scraping {args.scrapes} times, all healthy ...", file=sys.stderr)
            healthy, size_ok = scrape_many(address, args.scrapes)
            hung = repos[len(repos) // 2]
            sock = dist / "dist" / "var" / "lib" / "cvmfs" / "shared" / f"cvmfs_io.{hung}"
            if talk(sock, "sim hang") != "OK\n":
                raise SystemExit("the simulated cvmfs2 refused to hang")
            wait_hung(address, hung, 2 * args.interval + 30)
            print(f"{hung} is hung; scraping {args.scrapes} times ...", file=sys.stderr)
            stalled, size_hung = scrape_many(address, args.scrapes)
            mem = memory(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
    print(f"\n/metrics, {args.repos} repositories, {args.interval:g} s collection and probe "
          "interval, one keep-alive connection")
    print(f"{'phase':<22} {'scrapes':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'bytes':>9}")
    print(line("all healthy", healthy, size_ok))
    print(line("one hung", stalled, size_hung))
    print(f"\ncvmfsd resident memory: VmRSS {mem['VmRSS'] / 2**20:.1f} MiB, "
          f"peak VmHWM {mem['VmHWM'] / 2**20:.1f} MiB (target <= 40 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
