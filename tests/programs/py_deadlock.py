"""Target for tests/test_dump.py: two threads deadlocked on two locks.

Runs on CPython 3.8 and later.  Thread "one" holds lock_a and waits for
lock_b; thread "two" holds lock_b and waits for lock_a.  The main thread
echoes its stdin ("echo LINE") so a test can check that it still runs, and
prints "usr1" / "usr2" from handlers of SIGUSR1 / SIGUSR2 (Python runs
them in the main thread).  With the argument ``spin`` the main thread spins
in a Python loop instead (it holds the GIL nearly all the time) and a
thread named "echo" does the echoing.  Lines the tests check carry
``# @name`` marks.  It prints "ready" once both threads are blocked on
their second lock.
"""

import signal
import sys
import threading
import time

lock_a = threading.Lock()
lock_b = threading.Lock()
holding = threading.Barrier(3)


def one():
    with lock_a:
        holding.wait()
        lock_b.acquire()  # @one-wait


def two():
    with lock_b:
        holding.wait()
        lock_a.acquire()  # @two-wait


def on_signal(signum, frame):
    print("usr1" if signum == signal.SIGUSR1 else "usr2", flush=True)


def echo():
    for line in sys.stdin:  # @echo-read
        print("echo", line.strip(), flush=True)


def spin():
    n = 0
    # One line: every instruction of the loop is on it, wherever it is read.
    while True: n += 1  # @spin-loop


def main():
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGUSR2, on_signal)
    threading.Thread(target=one, name="one", daemon=True).start()
    threading.Thread(target=two, name="two", daemon=True).start()
    holding.wait()
    time.sleep(0.2)  # both threads are now inside their second acquire
    if sys.argv[1:] == ["spin"]:
        threading.Thread(target=echo, name="echo", daemon=True).start()
        print("ready", flush=True)
        spin()  # @spin-call
    print("ready", flush=True)
    echo()  # @main-call


main()  # @module-call
