"""A Python workload with a known shape: main > round_robin > fn1/fn2/fn3.

The three functions burn CPU in the ratio 1:2:3, measured on the thread's
own CPU clock, so the ratio holds however busy the machine is.  Prints
"ready <pid>" once running; runs for argv[1] seconds (default 30).
"""

import os
import sys
import time

SLICE = 0.002  # seconds of thread CPU time per unit


def spin(units):
    end = time.thread_time() + units * SLICE
    x = 0
    while time.thread_time() < end:
        x += 1
    return x


def fn1():
    return spin(1)


def fn2():
    return spin(2)


def fn3():
    return spin(3)


def round_robin():
    fn1()
    fn2()
    fn3()


def main(stop):
    # Returns every 100 ms and is called again, so that a trampoline switched
    # on from outside (ptrace injection) covers main too: only frames entered
    # after activation go through the trampoline.
    until = min(stop, time.monotonic() + 0.1)
    while time.monotonic() < until:
        round_robin()


if __name__ == "__main__":
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    print("ready", os.getpid(), flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        main(end)
