#!/usr/bin/env python3
"""DWARF unwinding cost on a busy CPython workload, side by side with perf.

Prints microseconds per sample and per frame spent in the agent's walker,
the agent's total CPU seconds and peak RSS for a 10 s ``--unwind dwarf``
capture at 99 Hz, and the CPU seconds of ``perf record --call-graph dwarf``
plus ``perf report`` on the same kind of process, measured in the same run,
with the ratio (target: at most 2.0; the machines are noisy, so compare
ratios, not absolute times).

usage: sudo python3 tools/bench_unwind.py [--duration 10] [--depth 10] [--python /usr/bin/python3.11]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import children_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKLOAD = r'''
import sys
def rec(n):
    if n == 0:
        return sum(i * i for i in range(2000))
    return list(map(rec, [n - 1]))[0]
print("ready", flush=True)
depth = int(sys.argv[1])
while True:
    rec(depth)
'''

# Runs the capture in a child process with the walker timed, so the
# per-sample figures come from the real code path, not a model of it.
AGENT = r'''
import json, resource, sys, time
sys.path.insert(0, %(repo)r)
from perfagent.unwind import walker as W
from perfagent import cli, run
stats = {"walks": 0, "frames": 0, "seconds": 0.0}
orig = W.Walker.walk
def timed(self, proc, binary_for, regs, stack):
    t0 = time.perf_counter()
    ips = orig(self, proc, binary_for, regs, stack)
    stats["seconds"] += time.perf_counter() - t0
    stats["walks"] += 1
    stats["frames"] += len(ips)
    return ips
W.Walker.walk = timed
code = run.run(cli.parse_args(sys.argv[1:]))
stats["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("STATS " + json.dumps(stats), file=sys.stderr)
sys.exit(code)
'''


def measured(argv, **kw):
    before = children_cpu()
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    return r, children_cpu() - before


def start(python, depth, path):
    p = subprocess.Popen([python, path, str(depth)], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--depth", type=int, default=10, help="C->Python->C recursion levels of the workload")
    ap.add_argument("--python", default="/usr/bin/python3.11", help="target interpreter (no frame pointers)")
    ap.add_argument("--stack-size", type=int, default=32768)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="perfagent-bench-")
    try:
        script = os.path.join(tmp, "work.py")
        with open(script, "w") as f:
            f.write(WORKLOAD)
        target = start(args.python, args.depth, script)
        out = os.path.join(tmp, "agent.pb.gz")
        r, agent_cpu = measured([sys.executable, "-c", AGENT % {"repo": REPO}, "--profile", "--pid",
                                 str(target.pid), "--duration", "%gs" % args.duration, "--unwind", "dwarf",
                                 "--stack-size", str(args.stack_size), "--profile-output", out])
        target.kill()
        target.wait()
        stats = {}
        for line in r.stderr.splitlines():
            if line.startswith("STATS "):
                stats = json.loads(line[6:])
            elif "unwound" in line:
                print(line)
        perf = shutil.which("perf")
        perf_cpu = None
        if perf:
            target = start(args.python, args.depth, script)
            data = os.path.join(tmp, "perf.data")
            _, rec_cpu = measured([perf, "record", "-e", "cpu-clock", "-F", "99", "--call-graph",
                                   "dwarf,%d" % args.stack_size, "-p", str(target.pid), "-o", data,
                                   "--", "sleep", "%g" % args.duration])
            _, rep_cpu = measured([perf, "report", "-i", data, "--stdio"])
            target.kill()
            target.wait()
            perf_cpu = rec_cpu + rep_cpu
        walks = max(stats.get("walks", 0), 1)
        frames = max(stats.get("frames", 0), 1)
        print("workload: %s, %d C/Python recursion levels, 99 Hz, %.0f s, stack copy %d bytes"
              % (args.python, args.depth, args.duration, args.stack_size))
        print("walker: %d samples, %.1f frames/sample, %.1f us/sample, %.2f us/frame"
              % (stats.get("walks", 0), frames / walks, 1e6 * stats.get("seconds", 0) / walks,
                 1e6 * stats.get("seconds", 0) / frames))
        print("perfagent --unwind dwarf: %.3f CPU s, peak RSS %.1f MB" % (agent_cpu, stats.get("maxrss_kb", 0) / 1024))
        if perf_cpu is not None:
            print("perf record --call-graph dwarf + perf report: %.3f CPU s" % perf_cpu)
            print("ratio perfagent / perf CPU: %.2f" % (agent_cpu / perf_cpu if perf_cpu else float("nan")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
