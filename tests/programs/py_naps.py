"""An off-CPU Python workload with a known shape: main > nap_short (sleeps
10 ms) and main > nap_long (sleeps 30 ms) in turn, with a little CPU work
after each, so 1:3 by blocked time.

Prints "ready <pid>" once running and runs for argv[1] seconds (default 30).
On SIGTERM or at the end it prints "truth <short ns> <long ns>": the time
the thread itself measured inside each function's sleeps (a loaded machine
stretches them unevenly: the wake-up waits for a CPU).
"""

import os
import signal
import sys
import time

totals = [0, 0]


def nap(kind, seconds):
    t0 = time.monotonic_ns()
    try:
        time.sleep(seconds)
    finally:
        totals[kind] += time.monotonic_ns() - t0


def nap_short():
    nap(0, 0.010)


def nap_long():
    nap(1, 0.030)


def work():
    x = 0
    for i in range(2000):
        x += i * i
    return x


def main(stop):
    # Returns every 100 ms and is called again, so that a trampoline switched
    # on from outside (ptrace injection) covers main too.
    until = min(stop, time.monotonic() + 0.1)
    while time.monotonic() < until:
        nap_short()
        work()
        nap_long()
        work()


def report(*_):
    print("truth %d %d" % tuple(totals), flush=True)
    os._exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, report)
    stop = time.monotonic() + (float(sys.argv[1]) if len(sys.argv) > 1 else 30.0)
    print("ready %d" % os.getpid(), flush=True)
    while time.monotonic() < stop:
        main(stop)
    report()
