#!/usr/bin/env python3
"""Agent CPU for a system-wide frame-pointer capture: ring-buffer records
versus counting stacks in the kernel (perfagent.offcpu.InKernelSampler).

While a busy two-thread native workload runs (one thread per CPU on a small
machine), measures the CPU seconds (user + sys, RUSAGE_CHILDREN) of:

1. ``python3 -m perfagent --profile -a --unwind fp --duration 10s``: every
   sample is a perf record with its callchain, parsed and aggregated by the
   agent, then symbolized and written as pprof;
2. a small script driving InKernelSampler for the same time at the same
   rate: the BPF program counts per (tgid, tid, user stack, kernel stack),
   the script drains the map (every 100 ms if it is half full, and at the
   end) and resolves stack ids, without symbolization;
3. the same script's interpreter start and imports alone, for reference.

The two are not the same job (1 symbolizes and writes a profile), so the
difference is an upper bound of what in-kernel aggregation saves in the
sampling path.  Machines here are noisy: run it twice.

usage: sudo python3 tools/bench_inkernel.py [--duration 10] [--rate 99]
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

DRIVER = r"""
import sys, time
from perfagent.offcpu import InKernelSampler
rate, duration = int(sys.argv[1]), float(sys.argv[2])
stacks = []
with InKernelSampler(rate) as s:
    end = time.monotonic() + duration
    while time.monotonic() < end:
        time.sleep(0.1)
        stacks += s.collect_if_full()
stacks += s.collect()
print("%d samples, %d distinct stacks, %d dropped, %d lost stacks" % (
    sum(x.samples for x in stacks), len(stacks), s.dropped, s.lost_stacks))
"""

STARTUP = "import perfagent.offcpu, perfagent.bpf.btf; perfagent.bpf.btf.vmlinux()"


def run_measured(argv, **kw):
    """(CompletedProcess, CPU seconds, wall seconds) of one child run to completion."""
    before = children_cpu()
    t0 = time.monotonic()
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    return r, children_cpu() - before, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=99)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="perfagent-bench-")
    env = dict(os.environ, PYTHONPATH=REPO)
    try:
        binary = os.path.join(tmp, "chain")
        subprocess.run(["gcc", "-O2", "-fno-omit-frame-pointer", "-fno-optimize-sibling-calls",
                        "-pthread", "-o", binary, CHAIN_C], check=True)
        threads = max(1, (os.cpu_count() or 2) - 1)   # main + workers: one per CPU
        # The workload is not waited for until the end, so RUSAGE_CHILDREN
        # deltas around each measured run only hold that run.
        work = subprocess.Popen([binary, "%g" % (3 * args.duration + 30), str(threads)],
                                stdout=subprocess.PIPE, text=True)
        work.stdout.readline()
        try:
            out = os.path.join(tmp, "agent.pb.gz")
            ring, ring_cpu, ring_wall = run_measured(
                [sys.executable, "-S", "-m", "perfagent", "--profile", "-a", "--unwind", "fp",
                 "--duration", "%gs" % args.duration, "--sample-rate", str(args.rate),
                 "--profile-output", out], env=env)
            m = re.search(r"(\d+) samples, (\d+) lost", ring.stderr)
            ring_what = ("%s samples, %s lost" % m.groups()) if m else ring.stderr.strip()[-200:]
            ink, ink_cpu, ink_wall = run_measured(
                [sys.executable, "-c", DRIVER, str(args.rate), "%g" % args.duration], env=env)
            ink_what = ink.stdout.strip() or ink.stderr.strip()[-200:]
            base, base_cpu, _ = run_measured([sys.executable, "-c", STARTUP], env=env)
        finally:
            work.kill()
            work.wait()
        print("workload: %d busy threads on %d CPUs; system-wide, %d Hz, %g s"
              % (threads + 1, os.cpu_count() or 0, args.rate, args.duration))
        print("%-44s %10s %8s  %s" % ("", "CPU s", "wall s", ""))
        print("%-44s %10.3f %8.2f  %s" % ("perfagent --profile -a --unwind fp (ring)",
                                          ring_cpu, ring_wall, ring_what))
        print("%-44s %10.3f %8.2f  %s" % ("InKernelSampler + drain (no symbolization)",
                                          ink_cpu, ink_wall, ink_what))
        print("%-44s %10.3f %8s" % ("  of which interpreter start + imports + BTF", base_cpu, ""))
        if ring.returncode or ink.returncode or base.returncode:
            print("a run failed:\n%s\n%s\n%s" % (ring.stderr, ink.stderr, base.stderr),
                  file=sys.stderr)
            return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
