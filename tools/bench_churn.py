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
import os
import shutil
import subprocess
import sys
import tempfile

from benchlib import REPO, percentile, run_agent, run_measured

sys.path.insert(0, os.path.join(REPO, "tests"))

from churn import build, spawner  # noqa: E402

# After benchlib.AGENT_PRELUDE.
AGENT = r'''
seconds = float(sys.argv[1])
warmup = min(60.0, seconds / 10)
session = Capture(CaptureOptions(all=True, unwind="dwarf"), lambda line: None)
session.start()
start = time.monotonic()
rss = []          # (seconds since the start, RSS KiB) every 5 s
state = {"warm": None, "next": 5.0}

def each(took):
    now = time.monotonic() - start
    if state["warm"] is None and now >= warmup:
        state["warm"] = rss_kb()
    if now >= state["next"]:
        state["next"] += 5.0
        rss.append((round(now, 1), rss_kb()))

cycles = drain_cycles(session, seconds, each)
held = session.state.bookkeeping()
tables = getattr(session.state, "kernel_tables", None)
end = rss_kb()
session.stop()
report({"cycles": cycles, "warm_kb": state["warm"], "end_kb": end, "rss": rss, "maxrss_kb": maxrss_kb(),
        "samples": session.samples, "held": held, "evicted": session.state.walker.cache.evicted,
        "tables": tables.counts() if tables is not None else None})
session.close()
'''


def agent_run(seconds: float) -> dict:
    return run_agent(AGENT, [seconds])


def perf_run(seconds: float, tmp: str) -> dict:
    data = os.path.join(tmp, "perf.data")
    record, record_rss = run_measured(["perf", "record", "-q", "-a", "-F", "99", "--call-graph", "dwarf",
                                       "-o", data, "--", "sleep", str(seconds)])
    report, report_rss = run_measured(["perf", "report", "-i", data, "--stdio", "--no-children"])
    return {"record_cpu": record, "report_cpu": report, "maxrss_kb": max(record_rss, report_rss),
            "data_mb": os.path.getsize(data) / 1e6}


def rss_at(samples, seconds: float) -> int:
    """The RSS sample nearest ``seconds`` into the run (KiB)."""
    return min(samples, key=lambda tk: abs(tk[0] - seconds))[1] if samples else 0


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
        marks = [m for m in (1, 2, 3, 5, 10, 20, 30, 60) if m <= args.minutes]
        print("  RSS at %s" % ", ".join("%d min %.1f MB" % (m, rss_at(agent["rss"], m * 60) / 1024)
                                       for m in marks))
        print("  RSS every 5 s (MB): %s" % " ".join("%.0f" % (k / 1024) for _t, k in agent["rss"]))
        print("  held at the end: %s; CFI evictions %d" % (agent["held"], agent["evicted"]))
        print("  kernel unwind tables at the end: %s" % agent["tables"])
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
