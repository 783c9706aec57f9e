"""A CPython workload for the in-kernel walk's tests.

<module> > main > round_robin > fn1/fn2/fn3 > spin, the three functions
burning CPU 1:2:3 on the thread's own CPU clock.  main() is entered once,
before "ready" is printed, and never returns until the end: its frame (and
<module>'s) were entered long before any capture starts.  Lines marked
``# @NAME`` are the ones a sample of that frame must show.

usage: py_walk.py SECONDS [THREADS]   (THREADS extra threads run the same loop)
"""

import os
import sys
import threading
import time

SLICE = 0.002


def spin(units):  # @spin-def
    end = time.thread_time() + units * SLICE  # @spin-start
    x = 0  # @spin-init
    while time.thread_time() < end:  # @spin-loop
        x += 1  # @spin-body
    return x  # @spin-return


def fn1():
    return spin(1)  # @fn1


def fn2():
    return spin(2)  # @fn2


def fn3():
    return spin(3)  # @fn3


def round_robin():
    fn1()  # @rr1
    fn2()  # @rr2
    fn3()  # @rr3


def main(stop):
    while time.monotonic() < stop:
        round_robin()  # @main


def worker(stop):
    main(stop)  # @worker


if __name__ == "__main__":
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    stop = time.monotonic() + seconds
    for _ in range(threads):
        threading.Thread(target=worker, args=(stop,), daemon=True).start()
    print("ready", os.getpid(), flush=True)
    main(stop)  # @module
    print("done", flush=True)
