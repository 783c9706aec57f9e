#!/usr/bin/env python3
"""Capture cost, side by side with perf, on a busy two-thread native workload.

Prints, for a 10 s capture at 99 Hz of the same process in the same run:
samples, lost samples and CPU seconds of perfagent (``--pid``), and of
``perf record -g`` plus ``perf report`` (the equivalent job with perf: the
raw data is useless until reported), and the ratio of the two.  Machines
here are noisy: compare the ratio, not absolute times.

usage: sudo python3 tools/bench_capture.py [--duration 10] [--rate 99]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import children_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAIN_C = os.path.join(REPO, "tests", "programs", "chain.c")


def run_measured(argv, **kw):
    before = children_cpu()
    t0 = time.monotonic()
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    return r, children_cpu() - before, time.monotonic() - t0


def start_workload(binary: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([binary, str(seconds), "1"], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()  # "ready PID"
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=99)
    ap.add_argument("--unwind", default="fp", help="the agent's --unwind (fp matches perf record -g)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="perfagent-bench-")
    try:
        binary = os.path.join(tmp, "chain")
        subprocess.run(["gcc", "-O2", "-fno-omit-frame-pointer", "-fno-optimize-sibling-calls",
                        "-pthread", "-o", binary, CHAIN_C], check=True)
        env = dict(os.environ, PYTHONPATH=REPO)
        span = args.duration + 6

        work = start_workload(binary, span)
        out = os.path.join(tmp, "agent.pb.gz")
        r, agent_cpu, agent_wall = run_measured(
            [sys.executable, "-S", "-m", "perfagent", "--profile", "--pid", str(work.pid),
             "--duration", "%gs" % args.duration, "--sample-rate", str(args.rate), "--unwind", args.unwind,
             "--profile-output", out], env=env)
        work.kill()
        work.wait()
        m = re.search(r"(\d+) samples, (\d+) lost", r.stderr)
        agent_samples, agent_lost = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)

        perf = shutil.which("perf")
        perf_cpu = perf_samples = perf_lost = None
        if perf:
            work = start_workload(binary, span)
            data = os.path.join(tmp, "perf.data")
            rec, rec_cpu, _ = run_measured([perf, "record", "-g", "-e", "cpu-clock", "-F", str(args.rate),
                                            "-p", str(work.pid), "-o", data, "--", "sleep", "%g" % args.duration])
            rep, rep_cpu, _ = run_measured([perf, "report", "-i", data, "--stdio"])
            work.kill()
            work.wait()
            perf_cpu = rec_cpu + rep_cpu
            # Exact counts (not measured): the default report rounds "Samples: 1K".
            counts = subprocess.run([perf, "report", "-i", data, "--stdio", "-n", "-g", "none",
                                     "--sort", "pid"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True).stdout
            perf_samples = sum(int(m.group(1)) for m in re.finditer(r"^\s+(?:[\d.]+%\s+)+(\d+)\s+\d+:", counts, re.M))
            m = re.search(r"Total Lost Samples: (\d+)", counts)
            perf_lost = int(m.group(1)) if m else 0

        print("workload: 2 busy threads, %d Hz, %.0f s" % (args.rate, args.duration))
        print("%-40s %9s %6s %12s" % ("", "samples", "lost", "CPU seconds"))
        print("%-40s %9d %6d %12.3f" % ("perfagent --profile --pid --unwind " + args.unwind,
                                         agent_samples, agent_lost, agent_cpu))
        if perf_cpu is not None:
            print("%-40s %9d %6d %12.3f" % ("perf record -g + perf report", perf_samples, perf_lost, perf_cpu))
            print("ratio perfagent / perf CPU: %.2f" % (agent_cpu / perf_cpu if perf_cpu else float("nan")))
        else:
            print("perf not installed: no comparison")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
