"""Processes born and gone, each mapping a different library (tests and
tools/bench_churn.py share them)."""

from __future__ import annotations

import os
import subprocess
from typing import List

PROGRAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs")

# Spins for the milliseconds asked; a distinct constant per library makes
# each a different file (another inode, another build id).
LIBRARY = r"""
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
__attribute__((noinline)) long spin_%(n)d(long ms) {
    volatile long x = %(n)d; double end = now() + ms / 1e3;
    while (now() < end) x = x * 31 + 7;
    return x;
}
long work(long ms) { return spin_%(n)d(ms) + 1; }
"""

NOFP = ["-O2", "-fomit-frame-pointer", "-Wl,--build-id=sha1"]


def build(out_dir: str, libraries: int) -> (str, List[str]):
    """(the child program, ``libraries`` distinct shared libraries)."""
    child = os.path.join(out_dir, "churn_child")
    subprocess.run(["gcc", *NOFP, "-o", child, os.path.join(PROGRAMS, "churn_child.c"), "-ldl"], check=True)
    libs = []
    for n in range(libraries):
        src = os.path.join(out_dir, "churn%d.c" % n)
        with open(src, "w") as f:
            f.write(LIBRARY % {"n": n})
        lib = os.path.join(out_dir, "libchurn%d.so" % n)
        libs.append(lib)
    # One gcc per library, run a few at a time.
    procs = []
    for n, lib in enumerate(libs):
        procs.append(subprocess.Popen(["gcc", *NOFP, "-shared", "-fPIC", "-o", lib,
                                       os.path.join(out_dir, "churn%d.c" % n)]))
        if len(procs) >= 8:
            assert procs.pop(0).wait() == 0
    for p in procs:
        assert p.wait() == 0
    return child, libs


SPAWNER = r"""
import subprocess, sys, time
child, every, ms, count = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
wait = sys.argv[5] == "wait"
libs = sys.argv[6:]
print("ready", flush=True)
if wait:
    sys.stdin.readline()
n = 0
next_at = time.monotonic()
while count <= 0 or n < count:
    subprocess.run([child, libs[n %% len(libs)], ms])
    n += 1
    next_at += every
    time.sleep(max(0.0, next_at - time.monotonic()))
print("done %%d" %% n, flush=True)
sys.stdin.read()
"""


def spawner(child: str, libs: List[str], every: float, ms: int, count: int,
            wait: bool = False) -> subprocess.Popen:
    """A process that starts ``child`` with the next library every ``every``
    seconds (each spinning ``ms`` milliseconds), ``count`` times (0: until
    killed); prints "ready" at the start and "done N" at the end, then
    waits for its stdin to close.  With ``wait``, it starts only after
    :func:`go` (so a capture that takes a while to start misses nothing)."""
    p = subprocess.Popen(["python3", "-c", SPAWNER % (), child, str(every), str(ms), str(count),
                          "wait" if wait else "now"] + libs,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith("ready")
    return p


def go(p: subprocess.Popen) -> None:
    """Start a spawner made with ``wait=True``."""
    p.stdin.write("go\n")
    p.stdin.flush()
