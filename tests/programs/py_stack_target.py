"""Target for tests/test_python_reader.py: known Python stacks in known threads.

Runs on CPython 3.8 and later.  Threads:

* main:    <module> > main > round_robin > fn_a, spinning on one line;
* sleeper: ... > sleeper, blocked in time.sleep on one line;
* subint:  ... > run_sub, inside the subinterpreter call, where the
           subinterpreter runs <module> > sub_sleeper (SUB_SCRIPT), blocked
           in time.sleep (when the interpreter has _interpreters or
           _xxsubinterpreters).

Each line the tests check carries a ``# @name`` mark; the tests find the
line numbers from this file's text.  It prints one line "ready SUB" (SUB
= 1 with a subinterpreter, 0 without) once every thread has started.
"""

import sys
import threading
import time

SUB_SCRIPT = (
    "import time\n"
    "def sub_sleeper():\n"
    "    while True: time.sleep(1000)\n"
    "sub_sleeper()\n"
)
SUB_LOOP_LINE = 3
SUB_CALL_LINE = 4


def subinterpreters():
    for name in ("_interpreters", "_xxsubinterpreters"):
        try:
            return __import__(name)
        except ImportError:
            pass
    return None


def run_sub(mod, iid, started):
    started.set()
    mod.run_string(iid, SUB_SCRIPT)  # @run-call


def sleeper(started):
    started.set()
    while True: time.sleep(1000)  # @sleep-loop


def fn_a():
    x = 0
    while True: x += 1  # @a-loop


def round_robin():
    fn_a()  # @rr-call


def main():
    started = threading.Event()
    threading.Thread(target=sleeper, args=(started,), name="sleeper", daemon=True).start()
    started.wait()
    mod = subinterpreters()
    if mod is not None:
        sub_started = threading.Event()
        iid = mod.create()
        threading.Thread(target=run_sub, args=(mod, iid, sub_started), name="subint", daemon=True).start()
        sub_started.wait()
    print("ready %d" % (mod is not None), flush=True)
    round_robin()  # @main-call


main()  # @module-call
