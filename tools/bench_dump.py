#!/usr/bin/env python3
"""What ``perf-agent dump`` costs on a 50-thread Python process.

Starts a CPython process with 50 threads (the main thread sleeping; 20
waiting on locks, 10 in time.sleep, 10 waiting on an event under 30 levels
of recursion, 5 spinning in bytecode, 4 in select on a pipe), then runs
``perf-agent dump --pid N --json`` ``--rounds`` times with and without
``--native`` and prints, from the JSON's ``timing``, the dump's own time
(everything after the interpreter started: /proc, memory reads, stops,
unwinding, symbols) and the longest single-thread stop of each round, plus
the command's wall time (with interpreter start-up) and the distribution of
every thread's stop (from the stop seen to the thread resumed) and of the
time threads took to reach their stop after being asked.  The first ``--native`` round parses the binaries'
symbols and CFI, as every real run does (one run per command).

usage: sudo python3 tools/bench_dump.py [--python PATH] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGET = r'''
import os, select, sys, threading, time
lock = threading.Lock(); lock.acquire()
event = threading.Event()
r, w = os.pipe()
def waiter(): lock.acquire()
def sleeper():
    while True: time.sleep(100)
def deep(n):
    if n: return deep(n - 1)
    event.wait()
def spinner():
    x = 0
    while True: x += 1
def selector(): select.select([r], [], [])
kinds = [waiter] * 20 + [sleeper] * 10 + [lambda: deep(30)] * 10 + [spinner] * 5 + [selector] * 4
for k in kinds:
    threading.Thread(target=k, daemon=True).start()
time.sleep(0.5)
print("ready", len(threading.enumerate()), flush=True)
while True: time.sleep(100)
'''


def ms(values: List[float]) -> str:
    return "min %7.2f  med %7.2f  max %7.2f ms" % (min(values), statistics.median(values), max(values))


def run(pid: int, native: bool, rounds: int) -> None:
    totals, stops, walls, every, waits = [], [], [], [], []
    for _ in range(rounds):
        argv = [sys.executable, "-m", "perfagent", "dump", "--pid", str(pid), "--json"] + (["--native"] if native else [])
        t0 = time.monotonic()
        r = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        walls.append((time.monotonic() - t0) * 1000)
        if r.returncode != 0:
            raise SystemExit("dump failed: %s" % r.stderr)
        doc = json.loads(r.stdout)
        totals.append(doc["timing"]["total_ms"])
        if native:
            stops.append(doc["timing"]["max_stop_us"] / 1000.0)
            every.extend(t["stop_us"] / 1000.0 for t in doc["threads"] if t["stop_us"] is not None)
            waits.extend(t["stop_wait_us"] / 1000.0 for t in doc["threads"] if t["stop_wait_us"] is not None)
        nthreads = len(doc["threads"])
    print("%s (%d threads, %d rounds)" % ("--native" if native else "Python only", nthreads, rounds))
    print("  dump time       ", ms(totals))
    print("  command wall    ", ms(walls))
    if native:
        print("  longest stop    ", ms(stops))
        for name, values in (("every stop", every), ("reaching a stop", waits)):
            values.sort()
            print("  %-16s median %.3f  p90 %.3f  p99 %.3f  max %.3f ms (%d threads)"
                  % (name, statistics.median(values), values[int(len(values) * 0.9)],
                     values[int(len(values) * 0.99)], values[-1], len(values)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default="/root/.pyenv/versions/3.12.1/bin/python3.12")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    p = subprocess.Popen([args.python, "-c", TARGET], stdout=subprocess.PIPE, text=True)
    try:
        print(args.python, p.stdout.readline().strip())
        run(p.pid, False, args.rounds)
        run(p.pid, True, args.rounds)
    finally:
        p.kill()
        p.wait()


if __name__ == "__main__":
    main()
