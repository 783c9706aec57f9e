"""A CPython workload whose order by self time and by total time differ.

<module> > outer > inner: outer() burns 2 ms of its thread's CPU time in
its own loop, then calls inner(), which burns 3 ms.  By self time inner
leads (60%, outer 40%); by total time outer does (100%, and the most self
time of the frames in every sample).  Prints "ready <pid>"; runs argv[1]
seconds (default 60).
"""

import os
import sys
import time


def inner():
    end = time.thread_time() + 0.003
    while time.thread_time() < end:
        pass


def outer():
    end = time.thread_time() + 0.002
    while time.thread_time() < end:
        pass
    inner()


if __name__ == "__main__":
    stop = time.monotonic() + (float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
    print("ready", os.getpid(), flush=True)
    while time.monotonic() < stop:
        outer()
