#!/usr/bin/env python3
"""What one refresh of ``perf-agent top`` costs on a process with many distinct stacks.

The workload is a CPython process whose every sample is a different stack:
300 generated functions call each other at random, 3 to 12 deep, with a
few microseconds of work at the bottom.  The capture and the refresh loop
are the command's own (perfagent.session.Capture and
perfagent.top.command.TopLoop, tables drawn to /dev/null); each refresh is
timed as a whole and in its parts:

* bucket: this interval's increments turned into report stacks (frames
          seen for the first time are symbolized; a known stack is one dict
          lookup), added to the window's running sum, the expired interval
          subtracted
* view:   python_first() and function_totals() over the window's distinct
          stacks
* draw:   sorting the rows and formatting the table

and, for comparison, what the same view costs computed from the whole
capture's stacks (what a refresh would cost without the window's
increments).

usage: sudo python3 tools/bench_top.py [--duration 60] [--sample-rate 999] [--window 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WORKLOAD = r'''
import random, sys
N = 300
exec("\n".join(
    "def f%d(d, r):\n    if d == 0:\n        return burn()\n    return FUNCS[r.randrange(N)](d - 1, r)\n" % i
    for i in range(N)))
FUNCS = [globals()["f%d" % i] for i in range(N)]
def burn():
    x = 0
    for i in range(100):
        x += i
    return x
r = random.Random(1)
print("ready", flush=True)
while True:
    FUNCS[r.randrange(N)](r.randrange(3, 13), r)
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--sample-rate", type=int, default=999)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()

    from perfagent.session import Capture, CaptureOptions
    from perfagent.top import window as W
    from perfagent.top.command import TopLoop, TopOptions, Notes
    from perfagent.top.screen import PlainScreen

    target = subprocess.Popen([args.python, "-c", WORKLOAD], stdout=subprocess.PIPE, text=True)
    assert target.stdout.readline().startswith("ready")
    devnull = os.open(os.devnull, os.O_WRONLY)
    opts = TopOptions()
    opts.pid, opts.sample_rate, opts.window = target.pid, args.sample_rate, args.window
    cap = Capture(CaptureOptions(pid=target.pid, sample_rate=args.sample_rate))
    cap.state.take_increments()
    cap.start()
    top = TopLoop(cap, PlainScreen(devnull, "utf-8"), opts, "bench", Notes(immediate=False))
    rows = []
    try:
        end = cap.mono_start + args.duration
        next_refresh = cap.mono_start + 1.0
        while time.monotonic() < end:
            cap.poll(max(0.001, min(0.1, next_refresh - time.monotonic())))
            now = time.monotonic()
            if now < next_refresh:
                continue
            next_refresh += 1.0
            t0 = time.perf_counter()
            pending = len(cap.state.increments)
            top.push_bucket(now)
            t1 = time.perf_counter()
            top.compute_view()
            t2 = time.perf_counter()
            top.draw()
            t3 = time.perf_counter()
            rows.append((now - cap.mono_start, pending, len(top.window.counts), len(cap.state.stacks),
                         (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t3 - t0) * 1e3))
    finally:
        cap.stop()
        target.kill()
        target.wait()

    # The same view from the whole capture's stacks, for comparison.
    t0 = time.perf_counter()
    whole = W.SlidingWindow(1e9, 1.0)
    whole.push(0.0, 1.0, W.bucket_of(cap.state.stacks, top.names))
    W.window_view(whole, top.names, False)
    whole_ms = (time.perf_counter() - t0) * 1e3
    cap.close()

    print("%6s %9s %9s %9s %8s %8s %8s %8s" % ("t(s)", "interval", "window", "capture", "bucket", "view",
                                             "draw", "total"))
    print("%6s %9s %9s %9s %8s %8s %8s %8s" % ("", "stacks", "stacks", "stacks", "ms", "ms", "ms", "ms"))
    for r in rows:
        print("%6.1f %9d %9d %9d %8.1f %8.1f %8.1f %8.1f" % r)
    steady = [r for r in rows if r[0] > args.window + 2] or rows
    print("samples %d, frames %d, distinct stacks in the capture %d"
          % (cap.samples, len(top.names.frames.frames), len(cap.state.stacks)))
    print("steady state (after the first window): refresh median %.1f ms, max %.1f ms; window stacks median %d"
          % (statistics.median(r[7] for r in steady), max(r[7] for r in steady),
             statistics.median(r[2] for r in steady)))
    print("first refresh %.1f ms (naming the first frames: ELF symbols, kallsyms)" % rows[0][7])
    print("the same view computed from the whole capture (%d stacks): %.1f ms" % (len(cap.state.stacks), whole_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
