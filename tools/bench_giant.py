#!/usr/bin/env python3
"""The first unwind through a giant binary (libLLVM-14: 98k FDEs, 93k gaps),
side by side with perf.

Runs tests/programs/llvmcall.c (linked with -lLLVM-14, built without frame
pointers) and captures it with ``--unwind dwarf`` in a child Python that
drives the agent's own drain loop, timing every drain cycle: the first
cycle that unwinds through libLLVM pays for finding its CFI; the agent's
RSS before and after, and what the CFI cache holds for libLLVM (FDEs
decoded, rows built, bytes), are printed.  Then ``perf record --call-graph
dwarf`` + ``perf report`` on the same program for the same time, with their
CPU seconds and peak RSS.  ``--whole-table`` also times what a pc in a gap
used to cost: compiling libLLVM's whole merged table (5-18 s, ~300 MB).

usage: sudo python3 tools/bench_giant.py [--duration 5] [--whole-table]
(Debian: apt-get install llvm-14-dev for libLLVM-14 and its headers)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile

from benchlib import REPO, children_cpu, percentile, run_agent

sys.path.insert(0, os.path.join(REPO, "tests"))

from giant import LIBLLVM, build_llvmcall, have_libllvm  # noqa: E402

# After benchlib.AGENT_PRELUDE.
AGENT = r'''
pid, seconds = int(sys.argv[1]), float(sys.argv[2])
session = Capture(CaptureOptions(pid=pid, unwind="dwarf"), lambda line: None)
session.start()
rss_start = rss_kb()
first = None
seen = [0]

def each(took):
    global first
    if first is None and session.samples > seen[0]:
        first = {"seconds": took, "rss_before_kb": rss_start, "rss_after_kb": rss_kb()}
    seen[0] = session.samples

cycles = drain_cycles(session, seconds, each)
session.stop()
held = {}
cache = session.state.walker.cache
for key, cfi in list(cache._by_inode.items()):
    table = cfi.table
    if table is not None and len(table._cfi.data) > 1 << 22:  # libLLVM's 5 MB .eh_frame
        held = {"fdes_decoded": table.fdes_decoded, "rows_built": table.rows_built,
                "gap_lookups": table.gap_lookups, "bytes": table.nbytes()}
report({"first": first, "cycles": cycles, "samples": session.samples,
        "summary": session.state.walker.summary(), "held": held,
        "rss_end_kb": rss_kb(), "maxrss_kb": maxrss_kb()})
session.close()
'''

WHOLE = r'''
import resource, sys, time
sys.path.insert(0, %(repo)r)
from perfagent.dwarf.table import CFITable
from perfagent.elf import ELFFile
t0 = time.perf_counter()
with ELFFile.from_path(%(lib)r) as elf:
    table = CFITable.from_elf(elf)
table.compile()
print("%%d rows in %%.1f s, peak RSS %%d MB" %% (len(table), time.perf_counter() - t0,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024))
'''


def start(exe: str) -> subprocess.Popen:
    p = subprocess.Popen([exe], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith("ready")
    return p


def stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()


def agent_run(exe: str, seconds: float) -> dict:
    target = start(exe)
    try:
        return run_agent(AGENT, [target.pid, seconds])
    finally:
        stop(target)


def perf_run(exe: str, seconds: float, tmp: str) -> dict:
    target = start(exe)
    data = os.path.join(tmp, "perf.data")
    before = children_cpu()
    try:
        subprocess.run(["perf", "record", "-q", "-F", "99", "--call-graph", "dwarf", "-p", str(target.pid),
                        "-o", data, "--", "sleep", str(seconds)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        record = children_cpu() - before  # before the target is waited for: perf's CPU alone
    finally:
        stop(target)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    before = children_cpu()
    subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return {"record_cpu": record, "report_cpu": children_cpu() - before,
            "maxrss_kb": max(rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--whole-table", action="store_true",
                    help="also compile libLLVM's whole table (what a gap used to cost)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_giant: needs root")
    if not have_libllvm():
        sys.exit("bench_giant: needs %s and its headers (apt-get install llvm-14-dev)" % LIBLLVM)
    tmp = tempfile.mkdtemp(prefix="bench-giant-")
    try:
        exe = build_llvmcall(tmp)
        agent = agent_run(exe, args.duration)
        first = agent["first"] or {}
        cycles = agent["cycles"]
        print("target: %s (libLLVM-14, no frame pointers), %.0f s at 99 Hz" % (exe, args.duration))
        print("perf-agent --unwind dwarf: %d samples; %s" % (agent["samples"], agent["summary"]))
        print("  first drain with samples (finds every binary's CFI, first unwind): %.3f s, RSS +%.1f MB"
              % (first.get("seconds", 0), (first.get("rss_after_kb", 0) - first.get("rss_before_kb", 0)) / 1024))
        print("  drain cycles (work, without the wait for data): %d, max %.3f s, p99 %.3f s (interval 0.1 s)"
              % (len(cycles), max(cycles or [0]), percentile(cycles, 0.99)))
        print("  libLLVM CFI held: %s" % agent["held"])
        print("  agent RSS at the end %.1f MB, peak %.1f MB"
              % (agent["rss_end_kb"] / 1024, agent["maxrss_kb"] / 1024))
        if shutil.which("perf"):
            perf = perf_run(exe, args.duration, tmp)
            print("perf record --call-graph dwarf: %.2f CPU s; perf report: %.2f CPU s; peak RSS of any child %.1f MB"
                  % (perf["record_cpu"], perf["report_cpu"], perf["maxrss_kb"] / 1024))
        if args.whole_table:
            r = subprocess.run([sys.executable, "-c", WHOLE % {"repo": REPO, "lib": LIBLLVM}],
                               stdout=subprocess.PIPE, text=True)
            print("whole merged table (the old gap path): " + r.stdout.strip())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
