"""A Python target for the injection tests: python py_target.py MODE.

A worker thread defines and calls a brand-new function every 20 ms (so an
active perf trampoline has something to write to /tmp/perf-PID.map) and
reports "tick N".  The main thread sits in an awkward state chosen by MODE
and reports on stdout after each round:

  sleep     time.sleep(4.0)                  -> "main sleep ELAPSED"
  event     threading.Event().wait(4.0)      -> "main event RESULT ELAPSED"
  select    select.select on an idle pipe    -> "main select NREADY ELAPSED"
  read      os.read on a pipe written at 4 s -> "main read DATA ELAPSED"
  busy      bytecode loop                    -> "main busy N"
  alloc     heavy allocation                 -> "main alloc N"
  sigalrm   SIGALRM at 1 kHz, Python handler -> "main sigalrm COUNT ELAPSED"
  subproc   subprocess.run in a loop         -> "main subproc N"
  pipe      write/read through a pipe        -> "main pipe N"
  gilhog    main sleeps; the worker holds the GIL in C forever
  gilwait   main sleeps; the worker holds the GIL for 1.5 s at a time, in C
            (reports "hold start" / "hold end" around each)
  spin      main spins in pure Python, no system call -> "main spin N" every ~2**22 rounds
  cspin     main runs sum(range(3*10**7)) in C, over and over -> "main cspin N"
  sigrec LIB  no worker thread; main loads LIB (tests/programs/sigrec.c),
            whose handlers print "siginfo ..." lines, and sleeps
  vfork LIB MS  main calls LIB's hold_in_vfork(MS) (tests/programs/vforker.c)
            over and over -> "main vfork start N" before, "main vfork N" after

Anything that goes wrong raises, which prints on stderr: the tests require
stderr to stay empty.
"""

import os
import select
import signal
import subprocess
import sys
import threading
import time

BLOCK = 4.0
out_lock = threading.Lock()


def report(*words):
    line = " ".join(str(w) for w in words) + "\n"
    with out_lock:
        os.write(1, line.encode())


def worker():
    n = 0
    while True:
        ns = {}
        exec("def fresh_%d():\n    return %d\n" % (n, n), ns)
        ns["fresh_%d" % n]()
        report("tick", n)
        n += 1
        time.sleep(0.02)


def hog():
    # sum() over a range runs in C without ever dropping the GIL.
    sum(range(10 ** 15))


def gil_waits():
    import ctypes
    libc = ctypes.PyDLL(None)  # a PyDLL call keeps the GIL
    while True:
        report("hold start")
        libc.usleep(1500000)
        report("hold end")
        time.sleep(0.1)


def main():
    mode = sys.argv[1]
    # "ready" first: once the hog runs, no other thread gets the GIL again.
    report("ready", os.getpid())
    if mode != "sigrec":
        threading.Thread(target=hog if mode == "gilhog" else worker, daemon=True).start()
    if mode == "gilwait":
        threading.Thread(target=gil_waits, daemon=True).start()
    if mode in ("sleep", "gilhog", "gilwait", "sigrec"):
        if mode == "sigrec":
            import ctypes
            if ctypes.CDLL(sys.argv[2]).sigrec_install(1) < 0:
                raise SystemExit("sigrec_install failed")
            report("installed")
        while True:
            t = time.monotonic()
            time.sleep(BLOCK)
            report("main sleep", round(time.monotonic() - t, 4))
    elif mode == "event":
        while True:
            t = time.monotonic()
            r = threading.Event().wait(BLOCK)
            report("main event", r, round(time.monotonic() - t, 4))
    elif mode == "select":
        r, w = os.pipe()
        while True:
            t = time.monotonic()
            ready = select.select([r], [], [], BLOCK)[0]
            report("main select", len(ready), round(time.monotonic() - t, 4))
    elif mode == "read":
        while True:
            r, w = os.pipe()
            threading.Timer(BLOCK, os.write, (w, b"x")).start()
            t = time.monotonic()
            data = os.read(r, 1)
            report("main read", data.decode(), round(time.monotonic() - t, 4))
            os.close(r)
            os.close(w)
    elif mode == "busy":
        n = 0
        while True:
            x = 0
            for i in range(20000):
                x += i * i
            n += 1
            if n % 50 == 0:
                report("main busy", n)
    elif mode == "alloc":
        n = 0
        while True:
            junk = [{"k": [i] * 8, "s": str(i) * 4} for i in range(2000)]
            junk.append(bytearray(1 << 16))
            del junk
            n += 1
            if n % 20 == 0:
                report("main alloc", n)
    elif mode == "sigalrm":
        count = [0]

        def handler(signum, frame):
            count[0] += 1
        signal.signal(signal.SIGALRM, handler)
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        while True:
            time.sleep(0.05)
            report("main sigalrm", count[0], round(time.monotonic() - start, 4))
    elif mode == "subproc":
        n = 0
        while True:
            subprocess.run(["true"], check=True)
            n += 1
            report("main subproc", n)
    elif mode == "pipe":
        r, w = os.pipe()
        n = 0
        while True:
            os.write(w, b"y" * 512)
            if os.read(r, 512) != b"y" * 512:
                raise AssertionError("pipe data")
            n += 1
            if n % 500 == 0:
                report("main pipe", n)
    elif mode == "spin":
        n = 0
        while True:
            n += 1
            if not n & 0x3fffff:
                report("main spin", n)
    elif mode == "cspin":
        n = 0
        while True:
            sum(range(3 * 10 ** 7))
            n += 1
            report("main cspin", n)
    elif mode == "vfork":
        import ctypes
        hold = ctypes.CDLL(sys.argv[2]).hold_in_vfork
        ms = int(sys.argv[3])
        n = 0
        while True:
            report("main vfork start", n)
            hold(ms)
            n += 1
            report("main vfork", n)
    else:
        raise SystemExit("unknown mode " + mode)


main()
