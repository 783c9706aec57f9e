#!/usr/bin/env python3
"""User stacks walked in the kernel vs in the agent vs perf, system-wide.

Two busy processes built without frame pointers run: the native chain
target (tests/programs/unwind.c, -O2 -fomit-frame-pointer: alloca, a PLT
call into a library) and a CPython loop.  For each sample rate (99 and 999
Hz per CPU), measured in one run, side by side:

* agent CPU seconds (user + sys of the agent process, RUSAGE_CHILDREN) of a
  ``-a --profile --unwind dwarf`` capture (a copy of the package compiled
  beforehand, as an installed copy has it, run as ``python3 -S`` by the
  machine's own python3 unless --agent-python says otherwise: what a user
  on the host runs), ``--unwind-in kernel`` and
  ``--unwind-in user``, and the same of ``perf record -a --call-graph dwarf``
  plus ``perf report`` on its file (summed);
* chain completeness: the share of the two targets' samples whose user chain
  reaches ``_start`` (read back from each profile);
* BPF cost per sample: run_time_ns / run_cnt of the on-CPU program
  (kernel.bpf_stats_enabled=1, read through BPF_OBJ_GET_INFO_BY_FD), for the
  in-kernel walk with and without the Python walk and for the stack copy of
  the user-space walker, from a capture driven in this process.

The machines are shared and noisy: compare ratios.  ``--repeat N`` runs N
rounds per rate (in-kernel, user-space, perf in turn, so each round's three
see the same machine) and prints every round and the medians: the agent's
and perf's CPU and the median of the rounds' ratios.  A single round's
ratio moved between 0.21 and 0.34 on the same tree here.

usage: sudo python3 tools/bench_kunwind.py [--duration 10] [--rates 99,999] [--repeat N] [--agent-python PATH]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import agent as agent_argv, children_cpu, install_agent, machine_python

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PROGRAMS = os.path.join(REPO, "tests", "programs")
NOFP = ["-O2", "-g", "-fomit-frame-pointer"]
PY_LOOP = "print('ready', flush=True)\ndef f(n):\n    return sum(i * i for i in range(n))\nwhile True:\n    f(10000)\n"
STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


def build(tmp: str) -> str:
    lib = os.path.join(tmp, "libunwhop.so")
    subprocess.run(["gcc", *NOFP, "-shared", "-fPIC", "-o", lib, os.path.join(PROGRAMS, "unwhop.c")], check=True)
    exe = os.path.join(tmp, "unwind")
    subprocess.run(["gcc", *NOFP, "-o", exe, os.path.join(PROGRAMS, "unwind.c"), "-L", tmp, "-lunwhop",
                    "-Wl,-rpath," + tmp], check=True)
    return exe


def start(argv):
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith("ready")
    return p


def measured(argv, **kw):
    before = children_cpu()
    t0 = time.monotonic()
    r = subprocess.run(argv, **kw)
    return r, children_cpu() - before, time.monotonic() - t0


def completeness(path: str, pids) -> float:
    """Share of the targets' samples whose user chain reaches _start."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from conftest import sample_stacks
    from perfagent.pprof.decode import read_profile
    total = whole = 0
    for names, labels, values in sample_stacks(read_profile(path)):
        if labels.get("pid") not in pids:
            continue
        total += values[0]
        whole += values[0] if names and names[0] == "_start" else 0
    return whole / total if total else float("nan")


def agent(where: str, rate: int, duration: float, tmp: str, pids, installed: str, python: str):
    out = os.path.join(tmp, "%s-%d.pb.gz" % (where, rate))
    argv, env = agent_argv(["--profile", "-a", "--unwind", "dwarf", "--unwind-in", where, "--sample-rate",
                            str(rate), "--duration", "%gs" % duration, "--quiet", "--profile-output", out],
                           tmp, installed, python)
    r, cpu, _ = measured(argv, env=env, cwd=tmp, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit("agent failed: " + r.stderr)
    samples = re.search(r"wrote .*: (\d+) samples?, (\d+) lost", r.stderr)
    kernel = re.search(r"unwound (\d+) user stacks in the kernel.*?(\d+) fell back", r.stderr)
    note = "%s samples, %s lost" % samples.groups() if samples else ""
    if kernel:
        note += "; %s walked in the kernel, %s fell back" % kernel.groups()
    return cpu, completeness(out, pids), note


def perf(rate: int, duration: float, tmp: str):
    data = os.path.join(tmp, "perf-%d.data" % rate)
    _, rec, _ = measured(["perf", "record", "-q", "-a", "--call-graph", "dwarf", "-F", str(rate), "-o", data,
                          "--", "sleep", str(duration)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, rep, _ = measured(["perf", "report", "-i", data, "--stdio", "-q"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    os.unlink(data)
    return rec + rep


def bpf_cost(where: str, python_walk: bool, rate: int, seconds: float, warmup: float = 3.0):
    """ns per run of the on-CPU program, from a capture driven here, over
    ``seconds`` after ``warmup`` (tables loaded: the steady state)."""
    from perfagent.session import Capture, CaptureOptions
    cap = Capture(CaptureOptions(all=True, unwind="dwarf", unwind_in=where, python_walk=python_walk,
                                 sample_rate=rate))
    cap.start()
    try:
        progs = [s.engine._prog for s in cap.sources if getattr(s.engine, "_prog", None) is not None
                 and s.engine._prog.name.startswith("oncpu")]
        marks = []
        for until in (warmup, warmup + seconds):
            end = cap.mono_start + until
            while time.monotonic() < end:
                cap.poll(0.1)
            marks.append(progs[0].run_stats() if progs else (0, 0))
    finally:
        cap.stop()
        cap.close()
    ns, runs = marks[1][0] - marks[0][0], marks[1][1] - marks[0][1]
    return ns / runs if runs else float("nan"), runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rates", default="99,999")
    ap.add_argument("--python", default="/usr/bin/python3.11", help="the CPython target")
    ap.add_argument("--repeat", type=int, default=1, help="rounds per rate (medians printed)")
    ap.add_argument("--agent-python", default=machine_python(),
                    help="the interpreter running the agent (default: the machine's python3)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    rates = [int(r) for r in args.rates.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench-kunwind-")
    procs = []
    old_stats = None
    try:
        exe = build(tmp)
        installed = install_agent(os.path.join(tmp, "installed"), args.agent_python)
        procs.append(start([exe, "chain", "100000"]))
        procs.append(start([args.python, "-c", PY_LOOP]))
        pids = {p.pid for p in procs}
        rows = []
        # A first capture, not counted: the first round after the targets
        # start cost the agent up to twice the others (0.42-0.44 against
        # 0.22-0.28 CPU s, 413 stacks fell back against 110-151): the files
        # it reads and the targets' first seconds are cold.
        agent("kernel", max(rates), 2.0, tmp, pids, installed, args.agent_python)
        for rate in rates:
            for _ in range(max(1, args.repeat)):
                k_cpu, k_full, k_note = agent("kernel", rate, args.duration, tmp, pids, installed,
                                              args.agent_python)
                u_cpu, u_full, u_note = agent("user", rate, args.duration, tmp, pids, installed,
                                              args.agent_python)
                p_cpu = perf(rate, args.duration, tmp) if shutil.which("perf") else float("nan")
                rows.append((rate, k_cpu, u_cpu, p_cpu, k_full, u_full, k_note, u_note))
        with open(STATS_SYSCTL) as f:
            old_stats = f.read().strip()
        with open(STATS_SYSCTL, "w") as f:
            f.write("1")
        cost = {}
        for label, where, py in (("kernel walk + Python walk", "kernel", True),
                                 ("kernel walk, no Python walk", "kernel", False),
                                 ("32 KiB stack copy (user walk) + Python walk", "user", True)):
            cost[label] = bpf_cost(where, py, max(rates), 5.0)
    finally:
        if old_stats is not None:
            with open(STATS_SYSCTL, "w") as f:
                f.write(old_stats)
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    print("agent CPU seconds for a %gs -a --unwind dwarf capture (2 busy FP-less processes, %d CPUs; "
          "agent run by %s)" % (args.duration, os.cpu_count() or 0, args.agent_python))
    print("%6s  %12s  %12s  %16s  %10s  %10s" % ("Hz", "in-kernel", "user-space", "perf rec+report",
                                                 "kernel/perf", "user/perf"))
    for rate, k, u, p, kf, uf, kn, un in rows:
        print("%6d  %12.2f  %12.2f  %16.2f  %10.2f  %10.2f" % (rate, k, u, p, k / p, u / p))
    if args.repeat > 1:
        print("medians of %d rounds" % args.repeat)
        for rate in rates:
            mine = [r for r in rows if r[0] == rate]
            med = [statistics.median(r[i] for r in mine) for i in (1, 2, 3)]
            print("%6d  %12.2f  %12.2f  %16.2f  %10.2f  %10.2f" % (
                rate, med[0], med[1], med[2], statistics.median(r[1] / r[3] for r in mine),
                statistics.median(r[2] / r[3] for r in mine)))
    print("\nchains reaching _start (the two targets' samples)")
    for rate, k, u, p, kf, uf, kn, un in rows:
        print("%6d Hz  in-kernel %5.1f%% (%s)\n           user-space %5.1f%% (%s)" % (rate, 100 * kf, kn, 100 * uf, un))
    print("\nBPF on-CPU program cost per sample at %d Hz (kernel.bpf_stats_enabled)" % max(rates))
    for label, (ns, runs) in cost.items():
        print("  %-45s %8.0f ns  (%d runs)" % (label, ns, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
