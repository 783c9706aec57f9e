#!/usr/bin/env python3
"""Round-trip time of perf-trampoline activation and deactivation.

For each CPython 3.12+ found (the /var/cache/perfagent/pythons builds, the
pyenv ones) and each target state (sleeping, busy in bytecode, allocating),
starts tests/programs/py_target.py, then runs ``--rounds`` activate /
deactivate pairs and prints, per process, the min / median / max of each
(detection included, as a caller pays it), in milliseconds.  Or measures the
given ``--pid`` processes instead.  With ``--session`` the rounds share one
injection session per process, as a capture's activate/deactivate do (the
stub is mapped once and unmapped at the end, outside the figures).

usage: sudo python3 tools/bench_inject.py [--rounds 20] [--modes sleep,busy,alloc] [--session] [--pid N ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from perfagent.python import InjectionError, InjectionSkip, activate, deactivate  # noqa: E402

TARGET = os.path.join(REPO, "tests", "programs", "py_target.py")
PYTHONS = [
    "/var/cache/perfagent/pythons/3.13-shared/bin/python3.13",
    "/var/cache/perfagent/pythons/3.13-static/bin/python3.13",
    "/root/.pyenv/versions/3.13.0/bin/python3.13",
    "/root/.pyenv/versions/3.12.1/bin/python3.12",
]


def fmt(values: List[float]) -> str:
    ms = [v * 1000 for v in values]
    return "min %6.2f  med %6.2f  max %6.2f ms" % (min(ms), statistics.median(ms), max(ms))


def measure(pid: int, rounds: int, label: str, session: bool = False) -> None:
    ups: List[float] = []
    downs: List[float] = []
    kw = {}
    try:
        if session:
            from perfagent.python import open_session
            kw["session"] = open_session(pid)
        for _ in range(rounds):
            ups.append(activate(pid, **kw))
            downs.append(deactivate(pid, **kw))
        if session:
            kw["session"].finish()
    except (InjectionSkip, InjectionError) as exc:
        print("%-48s %s" % (label, exc))
        return
    print("%-48s activate   %s" % (label, fmt(ups)))
    print("%-48s deactivate %s" % ("", fmt(downs)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--modes", default="sleep,busy,alloc")
    ap.add_argument("--pid", type=int, action="append", default=[])
    ap.add_argument("--session", action="store_true", help="one injection session per process")
    args = ap.parse_args()
    if args.pid:
        for pid in args.pid:
            measure(pid, args.rounds, "pid=%d" % pid, args.session)
        return 0
    for python in PYTHONS:
        if not os.access(python, os.X_OK):
            continue
        for mode in args.modes.split(","):
            p = subprocess.Popen([python, TARGET, mode], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            try:
                p.stdout.readline()  # ready
                time.sleep(0.3)
                measure(p.pid, args.rounds, "%s %s pid=%d" % (python.split("/")[-3] if "cache" in python
                                                              else os.path.basename(python), mode, p.pid),
                        args.session)
                if p.poll() is not None:
                    print("  target died: %s" % p.returncode)
            finally:
                p.kill()
                p.wait()
                try:
                    os.unlink("/tmp/perf-%d.map" % p.pid)
                except FileNotFoundError:
                    pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
