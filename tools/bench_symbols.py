#!/usr/bin/env python3
"""Building a binary's function symbol table, side by side with readelf.

For each binary: the agent's CPU seconds for SymbolTable (bulk decode:
one iter_unpack per table, filters in comprehensions, names decoded only
for aliases and on lookup), the same for decoding every symbol one by one
(ELFFile.iter_symbols, the way the table was built before), and the CPU
seconds of ``readelf -sW`` over the same file.  Best of three runs each.

usage: python3 tools/bench_symbols.py [BINARY ...]
(default: libLLVM-14, libpython3.11, libc, libstdc++ where present)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from benchlib import children_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from perfagent.elf import ELFFile  # noqa: E402
from perfagent.symbolize.native import SymbolTable  # noqa: E402

DEFAULT = ["/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1", "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
           "/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"]


def best_of(fn, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def per_symbol(path: str) -> int:
    """Every symbol of both tables decoded one by one, with its name."""
    n = 0
    with ELFFile.from_path(path) as elf:
        for table in (".symtab", ".dynsym"):
            for sym in elf.iter_symbols(table):
                n += bool(sym.name)
    return n


def table(path: str) -> int:
    with ELFFile.from_path(path) as elf:
        return len(SymbolTable([elf]))


def readelf(path: str) -> float:
    best = float("inf")
    for _ in range(3):
        before = children_cpu()
        subprocess.run(["readelf", "-sW", path], stdout=subprocess.DEVNULL, check=True)
        best = min(best, children_cpu() - before)
    return best


def main() -> int:
    paths = [p for p in (sys.argv[1:] or DEFAULT) if os.path.exists(p)]
    print("%-48s %9s %12s %14s %12s" % ("binary", "functions", "SymbolTable", "per-symbol", "readelf -s"))
    for path in paths:
        functions = table(path)
        bulk = best_of(lambda: table(path))
        slow = best_of(lambda: per_symbol(path))
        peer = readelf(path) if shutil.which("readelf") else float("nan")
        print("%-48s %9d %10.3f s %12.3f s %10.3f s" % (os.path.basename(path), functions, bulk, slow, peer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
