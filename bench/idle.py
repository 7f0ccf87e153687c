"""cvmfsd at rest: its own CPU and wake-ups with 20 repositories mounted and the payload asleep.

Starts ``cvmfsd run`` in mode 3 on the simulated distribution with N small
repositories, the default probe and metrics intervals (15 s), and a payload
that sleeps; waits until it is ready and has settled, then reads cvmfsd's
/proc counters at the start and end of each window:

* CPU: utime + stime of /proc/<pid>/stat (every thread of cvmfsd, ended ones
  included), as % of one core; the probe children it reaped (cutime + cstime)
  are shown apart: they are other processes;
* wake-ups: voluntary + nonvoluntary context switches, of the main thread
  (/proc/<pid>/status) and summed over its threads (/proc/<pid>/task/*/status;
  a thread that ends within the window takes its count with it);
* what cvmfsd did meanwhile, from /metrics (scraped just outside the window):
  probes (``cvmfs_mount_probe_duration_seconds_count``) and collection cycles
  (``cvmfsd_collect_duration_seconds_count``);
* the node's forks (/proc/stat ``processes``): the kernel's process-event
  connector tells cvmfsd about every process on the node, so a busy node
  wakes it more.

    python bench/idle.py [--repos 20] [--seconds 60] [--windows 3] [--settle 20]
                         [--without-netlink]

``--without-netlink`` starts cvmfsd with the process-event connector off (its
pidfd fallback, as where the connector is refused), to tell the connector's
share of the cost from the rest.

Target (design.md): idle CPU <= 0.5 % of one core, no busy polling.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _repos import build, wait_ready  # bench/_repos.py, beside this script

TICK = os.sysconf("SC_CLK_TCK")
# `cvmfsd` with ProcessEvents(use_netlink=False), for --without-netlink.
WITHOUT_NETLINK = """
import sys
from cvmfsd import cli, procevents
init = procevents.ProcessEvents.__init__
def without_netlink(self, *args, **kwargs):
    init(self, *args, **{**kwargs, "use_netlink": False})
procevents.ProcessEvents.__init__ = without_netlink
sys.exit(cli.main(sys.argv[1:]))
"""


@dataclass(frozen=True)
class Sample:
    """cvmfsd's counters at one moment."""

    when: float  # time.monotonic()
    cpu: float  # seconds, utime + stime
    children: float  # seconds, cutime + cstime
    main_switches: int  # context switches of the main thread
    thread_switches: dict[int, int]  # per live thread
    node_forks: int


def switches(status: Path) -> int:
    total = 0
    for line in status.read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
            total += int(line.split()[1])
    return total


def sample(pid: int) -> Sample:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            threads[int(task.name)] = switches(task / "status")
        except (OSError, ValueError):
            continue  # ended meanwhile
    forks = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                 if line.startswith("processes "))
    return Sample(time.monotonic(), (utime + stime) / TICK, (cutime + cstime) / TICK,
                  switches(Path(f"/proc/{pid}/status")), threads, forks)


def scrape_counts(address: str) -> dict[str, float]:
    """Totals of the ``_count`` series of the probe and collection histograms."""
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    totals = {"probes": 0.0, "collections": 0.0}
    for name, key in (("cvmfs_mount_probe_duration_seconds_count", "probes"),
                      ("cvmfsd_collect_duration_seconds_count", "collections")):
        for match in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE):
            totals[key] += float(match.group(1))
    return totals


@dataclass(frozen=True)
class Window:
    seconds: float
    cpu_percent: float
    cpu_ms: float
    children_ms: float
    main_wakeups: int
    all_wakeups: int
    threads_ended: int
    probes: float
    collections: float
    node_forks_per_s: float


def measure(pid: int, address: str, seconds: float) -> Window:
    before_counts = scrape_counts(address)
    time.sleep(0.5)  # let the scrape's own wake-ups pass
    first = sample(pid)
    time.sleep(seconds)
    last = sample(pid)
    time.sleep(0.5)
    after_counts = scrape_counts(address)
    elapsed = last.when - first.when
    cpu = last.cpu - first.cpu
    all_wakeups = sum(n - first.thread_switches.get(tid, 0)
                      for tid, n in last.thread_switches.items())
    return Window(
        seconds=elapsed, cpu_percent=100 * cpu / elapsed, cpu_ms=1000 * cpu,
        children_ms=1000 * (last.children - first.children),
        main_wakeups=last.main_switches - first.main_switches, all_wakeups=all_wakeups,
        threads_ended=len(set(first.thread_switches) - set(last.thread_switches)),
        probes=after_counts["probes"] - before_counts["probes"],
        collections=after_counts["collections"] - before_counts["collections"],
        node_forks_per_s=(last.node_forks - first.node_forks) / elapsed)


def row(name: str, w: Window) -> str:
    return (f"{name:<8} {w.seconds:6.1f} {w.cpu_percent:7.3f} {w.cpu_ms:8.0f} {w.children_ms:8.0f} "
            f"{w.main_wakeups:7d} {w.all_wakeups:7d} {w.all_wakeups / w.seconds:7.2f} "
            f"{w.threads_ended:5d} {w.probes:6.0f} {w.collections:6.0f} "
            f"{w.node_forks_per_s:7.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repos", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of one window")
    parser.add_argument("--windows", type=int, default=3, help="windows measured in a row")
    parser.add_argument("--settle", type=float, default=20.0,
                        help="seconds to wait after ready before measuring")
    parser.add_argument("--without-netlink", action="store_true",
                        help="turn the process-event connector off (pidfd fallback)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cvi", dir="/tmp") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        print(f"publishing {args.repos} repositories ...", file=sys.stderr)
        dist, repos = build(work, args.repos, "idle.test")
        gconfig = work / "glidein_config"
        gconfig.write_text("GLIDEIN_Site Bench\n")
        print("starting cvmfsd (mode 3, default intervals) ...", file=sys.stderr)
        cvmfsd = ["-c", WITHOUT_NETLINK] if args.without_netlink else ["-m", "cvmfsd"]
        with (work / "cvmfsd.err").open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, *cvmfsd, "run", "--dist", str(dist), "--mode", "3",
                 "--repos", ",".join(repos), "--glidein-config", str(gconfig), "--socket",
                 str(work / "sock" / "s"), "--log-level", "warning", "--",
                 "sleep", "999999"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        windows: list[Window] = []
        try:
            address = wait_ready(process, gconfig, timeout=300, errors=work / "cvmfsd.err")
            print(f"ready; settling for {args.settle:g} s ...", file=sys.stderr)
            time.sleep(args.settle)
            for n in range(1, args.windows + 1):
                print(f"window {n}/{args.windows}: {args.seconds:g} s ...", file=sys.stderr,
                      flush=True)
                windows.append(measure(process.pid, address, args.seconds))
                if process.poll() is not None:
                    raise SystemExit("cvmfsd ended during the measurement:\n"
                                     + (work / "cvmfsd.err").read_text()[-3000:])
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
    events = "pidfd (connector off)" if args.without_netlink else "default (netlink connector)"
    print(f"\ncvmfsd idle, mode 3, {args.repos} repositories, default probe and metrics "
          f"intervals (15 s), payload asleep; process events: {events}")
    print(f"{'window':<8} {'s':>6} {'CPU %':>7} {'CPU ms':>8} {'kids ms':>8} {'wk main':>7} "
          f"{'wk all':>7} {'wk/s':>7} {'thr-':>5} {'probes':>6} {'coll':>6} {'forks/s':>7}")
    for n, w in enumerate(windows, 1):
        print(row(str(n), w))
    if len(windows) > 1:
        cpu = [w.cpu_percent for w in windows]
        rate = [w.all_wakeups / w.seconds for w in windows]
        print(f"\nCPU {statistics.mean(cpu):.3f} % of one core (min {min(cpu):.3f}, "
              f"max {max(cpu):.3f}; target <= 0.5 %); wake-ups {statistics.mean(rate):.2f}/s "
              f"(min {min(rate):.2f}, max {max(rate):.2f})")
    print("CPU %: cvmfsd's own (all its threads); kids ms: its reaped children (probes); "
          "wk: context switches (main thread, all live threads); thr-: threads that ended in "
          "the window; coll: metric collection cycles; forks/s: the whole node's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
