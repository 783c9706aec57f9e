"""A target that keeps calling Python functions it has never called before.

Every 20 ms it compiles and calls a brand-new function, so with the perf
trampoline on, its perf map grows steadily; with it off, the map stays as it
is.  Prints "ready <pid>" once running.
"""

import os
import sys
import time

print("ready", os.getpid(), flush=True)
stop = time.monotonic() + (float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
i = 0
while time.monotonic() < stop:
    namespace = {}
    exec("def fresh_%d():\n    return %d\n" % (i, i), namespace)
    namespace["fresh_%d" % i]()
    i += 1
    time.sleep(0.02)
