#!/usr/bin/env python3
"""Where the agent's CPU goes in one capture of a busy CPython: a breakdown
by phase, to read beside tools/bench_python.py's totals (not a test, and
not a comparison: the phases are the agent's own).

Runs the agent in this process (``perfagent.cli.main``) with timers around
the phases that cost most at start-up and at the end, each counting the
process's CPU (user + sys) spent inside it; nested phases are counted in
both (``build profile`` includes the symbol tables and kallsyms).  Module
loading is the import system's ``get_code`` (compiling the source, or
reading the cached bytecode).  The interpreter's own start-up is not
counted (it comes before this script runs).

usage: sudo python3 tools/startup_phases.py [--python PATH] [--duration 10]
       [-- extra agent options]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib._bootstrap_external as bootstrap_external
import os
import resource
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The busy CPython of bench_python (the figures it prints are this tool's subject).
from bench_python import BUSY  # noqa: E402

#: (module, class or None, function, label)
PHASES = (
    ("perfagent.symbolize.kallsyms", "KernelSymbols", "load", "kallsyms"),
    ("perfagent.bpf.btf", "BTF", "load_vmlinux", "BTF: read and scan vmlinux"),
    ("perfagent.bpf.btf", "BTF", "find_all", "BTF: find types by name"),
    ("perfagent.symbolize.native", "SymbolTable", "__init__", "native symbol tables"),
    ("perfagent.bpf.syscall", None, "prog_load", "BPF_PROG_LOAD (verifier)"),
    ("perfagent.capture", "CaptureState", "resolve_pending", "per-sample unwinding"),
    ("perfagent.oncpu", None, "build_profile", "build profile (symbols included)"),
)

totals = {}


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(label: str, func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        c0 = cpu()
        try:
            return func(*args, **kwargs)
        finally:
            totals[label] = totals.get(label, 0.0) + cpu() - c0
    return wrapper


def instrument() -> None:
    for module, owner_name, attr, label in PHASES:
        mod = importlib.import_module(module)
        owner = getattr(mod, owner_name) if owner_name else mod
        raw = owner.__dict__.get(attr) if owner_name else getattr(owner, attr, None)
        if raw is None:
            continue
        if isinstance(raw, (staticmethod, classmethod)):
            setattr(owner, attr, type(raw)(timed(label, raw.__func__)))
        else:
            setattr(owner, attr, timed(label, raw))
    loader = bootstrap_external.SourceLoader
    loader.get_code = timed("module loading (compile or unmarshal)", loader.get_code)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default="/var/cache/perfagent/pythons/3.13-shared/bin/python3.13")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (perf_event_open, bpf)")
    tmp = tempfile.mkdtemp(prefix="startup-phases-")
    script = os.path.join(tmp, "busy.py")
    with open(script, "w") as f:
        f.write(BUSY)
    target = subprocess.Popen([args.python, script, str(args.duration + 10)], stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout.readline().startswith("ready")
        start = cpu()
        instrument()
        from perfagent import cli
        sys.argv = ["perf-agent"]
        try:
            cli.main(["--profile", "--pid", str(target.pid), "--duration", "%gs" % args.duration, "--quiet",
                      "--profile-output", os.path.join(tmp, "p.pb.gz"), *args.extra])
        except SystemExit:
            pass
        total = cpu() - start
    finally:
        target.kill()
        target.wait()
    print("agent CPU after interpreter start-up: %.3f s (PYTHONDONTWRITEBYTECODE=%s)"
          % (total, os.environ.get("PYTHONDONTWRITEBYTECODE", "")))
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print("  %-40s %.3f s" % (label, seconds))


if __name__ == "__main__":
    main()
