#!/usr/bin/env python3
"""Where a long run's memory goes per short-lived process: tracemalloc over
a capture whose processes come and go.

A spawner starts ``COUNT`` children (tests/programs/churn_child.c, each
loading one of 200 libraries and spinning 20 ms, one every 50 ms); a child
Python captures the spawner and its children (``--pid``, ``--unwind
dwarf``, 999 Hz) under tracemalloc and compares a snapshot taken after the
100th process was released with one at the end: the traced growth per
released process that had samples, the capture's bookkeeping at both
points, and the lines that grew most.  Not timed: run it before and after
a change to what released processes leave.

usage: sudo python3 tools/churn_tracemalloc.py [COUNT]   (default 400)
"""
import json
import os
import subprocess
import shutil
import sys
import tempfile

from benchlib import AGENT_PRELUDE, REPO

sys.path.insert(0, os.path.join(REPO, "tests"))

from churn import build, go, spawner  # noqa: E402


AGENT = r'''
import tracemalloc, gc, select
spid = int(sys.argv[1]); count = int(sys.argv[2])
tracemalloc.start(3)
session = Capture(CaptureOptions(pid=spid, unwind="dwarf", sample_rate=999), lambda line: None)
session.start()
os.write(1, b"go\n")
st = {}
def released(state):
    return sum(1 for p in state.processes.values() if p.released) + len(getattr(state, "_shells", ()))
line = ""
cycles = 0
while True:
    session.drain(); cycles += 1
    time.sleep(0.1)
    rel = session.state.released_processes
    if "snap" not in st and rel >= 100:
        gc.collect(); st["snap"] = tracemalloc.take_snapshot(); st["rel"] = released(session.state)
        st["held"] = session.state.bookkeeping()
    if select.select([sys.stdin], [], [], 0)[0]:
        line = sys.stdin.readline()
        if line.startswith("done"): break
for _ in range(15):
    time.sleep(0.1); session.drain()
gc.collect()
snap = tracemalloc.take_snapshot()
held = session.state.bookkeeping()
rel = released(session.state)
lines = [[s.size_diff, s.count_diff, str(s.traceback[0])] for s in snap.compare_to(st["snap"], "lineno")[:20]]
total = sum(s.size for s in snap.statistics("filename")) - sum(s.size for s in st["snap"].statistics("filename"))
session.stop()
report({"held0": st["held"], "held1": held, "rel0": st["rel"], "rel1": rel, "total": total, "lines": lines})
session.close()
'''


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("churn_tracemalloc: needs root")
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    tmp = tempfile.mkdtemp(prefix="tm-pid-")
    try:
        child, libs = build(tmp, 200)
        spawn = spawner(child, libs, every=0.05, ms=20, count=count, wait=True)
        p = subprocess.Popen([sys.executable, "-c", AGENT_PRELUDE % {"repo": REPO} + AGENT, str(spawn.pid), str(count)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().startswith("go")
        go(spawn)
        done = spawn.stdout.readline()
        p.stdin.write(done); p.stdin.flush()
        out, err = p.communicate()
        spawn.stdin.close(); spawn.wait()
        r = json.loads([x for x in err.splitlines() if x.startswith("STATS ")][-1][6:])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d = r["rel1"] - r["rel0"]
    print("held0", r["held0"]); print("held1", r["held1"])
    print("sampled released processes +%d; traced growth %d B = %.0f B each; distinct stacks +%d"
          % (d, r["total"], r["total"] / max(1, d), r["held1"]["distinct_stacks"] - r["held0"]["distinct_stacks"]))
    for size, n, where in r["lines"]:
        print("%9d B %7d  %s" % (size, n, where))
    return 0


if __name__ == "__main__":
    sys.exit(main())
