#!/usr/bin/env python3
"""Memory and drain latency of a long system-wide capture while processes
come and go, side by side with perf.

A process is born and gone every 100 ms (each spinning 20 ms in a
different small library: tests/programs/churn_child.c with N generated .so
files) while the agent captures ``-a --unwind dwarf`` for ``--minutes``
(default 10), in a child Python that drives its own drain loop: peak RSS,
RSS after warm-up (the first minute, or a tenth of the run) against RSS at
the end, drain-cycle latency (its work, without the wait for data: max and
p99) and the capture's bookkeeping counts at the end.  Then ``perf record
-a --call-graph dwarf`` + ``perf report`` for a shorter time (its data file
grows with the run) with their CPU seconds and peak RSS.

usage: sudo python3 tools/bench_churn.py [--minutes 10] [--libraries 200] [--perf-seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

from benchlib import children_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from churn import build, spawner  # noqa: E402

AGENT = r'''
import json, os, resource, sys, time
sys.path.insert(0, %(repo)r)
from perfagent.session import Capture, CaptureOptions, DRAIN_INTERVAL

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

seconds = float(sys.argv[1])
warmup = min(60.0, seconds / 10)
session = Capture(CaptureOptions(all=True, unwind="dwarf"), lambda line: None)
session.start()
start = time.monotonic()
cycles, rss = [], []
warm = None
while time.monotonic() - start < seconds:
    session.sampler.wait(int(DRAIN_INTERVAL * 1000))
    t0 = time.perf_counter()
    session.drain()
    cycles.append(time.perf_counter() - t0)
    if warm is None and time.monotonic() - start >= warmup:
        warm = rss_kb()
    if len(cycles) %% 50 == 0:
        rss.append(rss_kb())
held = session.state.bookkeeping()
end = rss_kb()
session.stop()
print("STATS " + json.dumps({"cycles": cycles, "warm_kb": warm, "end_kb": end, "rss": rss,
                             "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                             "samples": session.samples, "held": held,
                             "evicted": session.state.walker.cache.evicted}), file=sys.stderr)
session.close()
'''


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def agent_run(seconds: float) -> dict:
    r = subprocess.run([sys.executable, "-c", AGENT % {"repo": REPO}, str(seconds)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = [x for x in r.stderr.splitlines() if x.startswith("STATS ")]
    if not line:
        sys.exit("agent failed:\n" + r.stderr[-3000:])
    return json.loads(line[-1][6:])


def perf_run(seconds: float, tmp: str) -> dict:
    data = os.path.join(tmp, "perf.data")
    before = children_cpu()
    subprocess.run(["perf", "record", "-q", "-a", "-F", "99", "--call-graph", "dwarf", "-o", data,
                    "--", "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    record = children_cpu() - before
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    before = children_cpu()
    subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return {"record_cpu": record, "report_cpu": children_cpu() - before,
            "maxrss_kb": max(rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss),
            "data_mb": os.path.getsize(data) / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--libraries", type=int, default=200, help="distinct .so files the processes cycle through")
    ap.add_argument("--perf-seconds", type=float, default=30.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_churn: needs root")
    tmp = tempfile.mkdtemp(prefix="bench-churn-")
    try:
        child, libs = build(tmp, args.libraries)
        spawn = spawner(child, libs, every=0.1, ms=20, count=0)
        try:
            agent = agent_run(args.minutes * 60)
            perf = perf_run(args.perf_seconds, tmp) if shutil.which("perf") else None
        finally:
            spawn.kill()
            spawn.wait()
        cycles = agent["cycles"]
        print("churn: a process every 100 ms, %d distinct libraries; perf-agent -a --unwind dwarf, %.1f min"
              % (args.libraries, args.minutes))
        print("  samples %d; drain cycles %d: max %.3f s, p99 %.3f s (the work, without the wait; interval 0.1 s)"
              % (agent["samples"], len(cycles), max(cycles or [0]), percentile(cycles, 0.99)))
        print("  RSS after warm-up %.1f MB, at the end %.1f MB, peak %.1f MB"
              % ((agent["warm_kb"] or 0) / 1024, agent["end_kb"] / 1024, agent["maxrss_kb"] / 1024))
        print("  RSS every 5 s (MB): %s" % " ".join("%.0f" % (k / 1024) for k in agent["rss"]))
        print("  held at the end: %s; CFI evictions %d" % (agent["held"], agent["evicted"]))
        if perf:
            print("perf record -a --call-graph dwarf (%.0f s): %.2f CPU s, perf report %.2f CPU s, "
                  "peak RSS %.1f MB, perf.data %.0f MB"
                  % (args.perf_seconds, perf["record_cpu"], perf["report_cpu"], perf["maxrss_kb"] / 1024,
                     perf["data_mb"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
