#!/usr/bin/env python3
"""What reading Python stacks in the kernel costs, side by side with the
alternatives, in one run (issue 12's figures; not a test).

1. **The target's throughput** on a call-heavy Python loop (function calls
   per second, counted by the target itself over 10 s): alone, while
   perfagent samples it at 99 Hz with the in-kernel walk (the default),
   and while perfagent samples it with ``--inject-python`` (CPython's perf
   trampoline, for comparison).  Ratios against the run alone.
2. **BPF cost per sample** (``kernel.bpf_stats_enabled``: the program's
   run time over its run count) of the on-CPU program, with the Python walk
   and with ``--no-python-walk``, for ``--unwind dwarf`` (stack copy) and
   ``--unwind fp`` (counted in the kernel).
3. **Agent CPU** (user + sys of the agent process) for a 10 s capture of a
   busy CPython at 99 Hz, side by side with py-spy (pip's ``py-spy``,
   installed here when missing: a benchmark dependency only) recording the
   same target at the same rate.  Twice: a copy of the package compiled
   beforehand (in this run's temporary directory, as an installed copy
   has it) and the repository's without bytecode (PYTHONDONTWRITEBYTECODE=1, or a
   read-only copy without __pycache__: every import compiles its source).

The machine is shared and noisy: read the ratios, run it twice.

usage: sudo python3 tools/bench_python.py [--python PATH] [--duration 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

from benchlib import agent, children_cpu, install_agent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CALL_HEAVY = r"""
import os, sys, time
def leaf(x):
    return x + 1
def mid(x):
    return leaf(x) + leaf(x)
def top(n):
    s = 0
    for i in range(n):
        s += mid(i)
    return s
seconds = float(sys.argv[1])
print("ready", os.getpid(), flush=True)
calls = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    top(1000)
    calls += 3000
print("calls", calls, flush=True)
"""

BUSY = r"""
import os, sys, time
def spin(n):
    x = 0
    for i in range(n):
        x += i * i
    return x
def work():
    return spin(5000)
print("ready", os.getpid(), flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    work()
"""


def throughput(python: str, script: str, seconds: float, profiler, tmp: str) -> float:
    """Calls per second the target counted, with ``profiler(pid)`` (or None) running."""
    proc = subprocess.Popen([python, script, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("ready")
    runner = None
    if profiler is not None:
        argv, env = profiler(proc.pid)
        runner = subprocess.Popen(argv, cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    proc.wait()
    if runner is not None:
        runner.wait()
    calls = int(re.search(r"calls (\d+)", out).group(1))
    return calls / seconds


# struct bpf_prog_info: name[16] at 64, run_time_ns at 192, run_cnt at 200.
PROG_NAME, RUN_TIME, RUN_CNT = 64, 192, 200
BPF_PROG_GET_FD_BY_ID = 13


def prog_stats(name_prefix: str):
    """(run_time_ns, run_cnt) summed over loaded programs named ``name_prefix*``."""
    from perfagent.bpf import syscall as sc
    total_ns = total_cnt = 0
    for pid in sc.all_ids(sc.BPF_PROG_GET_NEXT_ID):
        attr = bytearray(struct.pack("<IIII", pid, 0, 0, 0))
        try:
            fd = sc.bpf(BPF_PROG_GET_FD_BY_ID, attr)
        except sc.BPFError:
            continue
        try:
            info = sc.obj_get_info_by_fd(fd)
        finally:
            os.close(fd)
        if len(info) < RUN_CNT + 8:
            continue
        name = info[PROG_NAME:PROG_NAME + 16].split(b"\0")[0].decode()
        if name.startswith(name_prefix):
            total_ns += struct.unpack_from("<Q", info, RUN_TIME)[0]
            total_cnt += struct.unpack_from("<Q", info, RUN_CNT)[0]
    return total_ns, total_cnt


def bpf_cost(python: str, script: str, seconds: float, extra, prefix: str, tmp: str):
    """(ns per run, ns per sample of the target) of the on-CPU program while
    the agent samples the target: the program runs on every CPU's samples,
    and leaves the other processes' at once."""
    proc = subprocess.Popen([python, script, str(seconds + 3)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("ready")
    argv, env = agent(["--profile", "--pid", str(proc.pid), "--duration", "%gs" % seconds, "--quiet",
                       "--profile-output", os.path.join(tmp, "c.pb.gz"), *extra], tmp)
    runner = subprocess.Popen(argv, cwd=tmp, env=env, stderr=subprocess.PIPE, text=True)
    # Read the counters just before the capture ends (the program is gone after).
    time.sleep(seconds)
    ns, cnt = prog_stats(prefix)
    _, err = runner.communicate()
    proc.kill()
    proc.wait()
    m = re.search(r"(\d+) samples", err)
    samples = int(m.group(1)) if m else 0
    return (ns / cnt if cnt else float("nan")), (ns / samples if samples else float("nan"))


def agent_cpu(python: str, script: str, seconds: float, argv_for, tmp: str):
    proc = subprocess.Popen([python, script, str(seconds + 5)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("ready")
    argv, env = argv_for(proc.pid)
    before = children_cpu()
    t0 = time.monotonic()
    r = subprocess.run(argv, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - t0
    cpu = children_cpu() - before
    proc.kill()
    proc.wait()
    return cpu, wall, r.stderr


def ensure_py_spy() -> str:
    """py-spy's own executable: the one pip put beside this interpreter
    first (a version manager's shim on PATH, such as pyenv's, is a shell
    script that would add its own processes to py-spy's CPU)."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.access(beside, os.X_OK):
        if shutil.which("py-spy") is None:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
        if not os.access(beside, os.X_OK):
            return shutil.which("py-spy")
    return beside


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default="/var/cache/perfagent/pythons/3.13-shared/bin/python3.13")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (perf_event_open, bpf)")
    d = args.duration
    tmp = tempfile.mkdtemp(prefix="bench-python-")
    try:
        heavy = os.path.join(tmp, "heavy.py")
        busy = os.path.join(tmp, "busy.py")
        with open(heavy, "w") as f:
            f.write(CALL_HEAVY)
        with open(busy, "w") as f:
            f.write(BUSY)
        out = os.path.join(tmp, "p.pb.gz")

        print("1. target throughput, call-heavy loop, %s, %.0f s, %d rounds (alone, walk, trampoline"
              " in turn: the machine's load changes between runs)" % (args.python, d, args.rounds))
        runs = {"alone": [], "walk": [], "tramp": []}
        for _ in range(args.rounds):
            runs["alone"].append(throughput(args.python, heavy, d, None, tmp))
            runs["walk"].append(throughput(args.python, heavy, d, lambda pid: agent(
                ["--profile", "--pid", str(pid), "--duration", "%gs" % (d + 2), "--quiet",
                 "--profile-output", out], tmp), tmp))
            runs["tramp"].append(throughput(args.python, heavy, d, lambda pid: agent(
                ["--profile", "--pid", str(pid), "--duration", "%gs" % (d + 2), "--quiet", "--inject-python",
                 "--no-python-walk", "--profile-output", out], tmp), tmp))
        alone = statistics.median(runs["alone"])
        for key, label in (("alone", "alone                      "), ("walk", "perfagent, in-kernel walk  "),
                           ("tramp", "perfagent, --inject-python ")):
            value = statistics.median(runs[key])
            print("   %s %12.0f calls/s   x%.3f  (rounds: %s)" % (
                label, value, value / alone, " ".join("x%.3f" % (v / a) for v, a in zip(runs[key], runs["alone"]))))

        print("2. BPF cost per sample (kernel.bpf_stats_enabled), busy CPython, 99 Hz")
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            old = f.read().strip()
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write("1")
        try:
            for label, extra, prefix in (
                    # (--unwind-in user: without the Python walk a CPython
                    # target would be walked in the kernel, another program)
                    ("dwarf, Python walk   ", ["--unwind", "dwarf", "--unwind-in", "user"], "oncpu_rec"),
                    ("dwarf, no walk       ", ["--unwind", "dwarf", "--unwind-in", "user", "--no-python-walk"],
                     "oncpu_rec"),
                    ("fp (counted), walk   ", ["--unwind", "fp"], "oncpu_agg"),
                    ("fp (counted), no walk", ["--unwind", "fp", "--no-python-walk"], "oncpu_agg")):
                per_run, per_sample = bpf_cost(args.python, busy, min(d, 5.0), extra, prefix, tmp)
                print("   %s %6.2f us per run, %6.2f us per sample of the target"
                      % (label, per_run / 1000, per_sample / 1000))
        finally:
            with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
                f.write(old)

        print("3. agent CPU, 10 s of a busy CPython at 99 Hz (default options), %d rounds in turn" % args.rounds)
        installed = install_agent(os.path.join(tmp, "installed"))
        spy = ensure_py_spy()
        cpus = {"cached": [], "source": [], "py-spy": []}
        for _ in range(args.rounds):
            for key, cache in (("cached", installed), ("source", "")):
                cpu, wall, err = agent_cpu(args.python, busy, d, lambda pid: agent(
                    ["--profile", "--pid", str(pid), "--duration", "%gs" % d, "--quiet", "--profile-output", out],
                    tmp, cache), tmp)
                samples = re.search(r"(\d+) samples", err)
                print("   perfagent, %-14s %.2f CPU s  (%s samples, %.1f s wall)"
                      % ("bytecode cached" if cache else "no bytecode", cpu, samples.group(1) if samples else "?", wall))
                cpus[key].append(cpu)
            cpu2, wall2, _ = agent_cpu(args.python, busy, d, lambda pid: (
                [spy, "record", "-p", str(pid), "-d", str(int(d)), "-r", "99", "-f", "raw", "-o",
                 os.path.join(tmp, "spy.txt")], dict(os.environ)), tmp)
            print("   py-spy record              %.2f CPU s  (%.1f s wall)" % (cpu2, wall2))
            cpus["py-spy"].append(cpu2)
        spy_cpu = statistics.median(cpus["py-spy"])
        print("   medians: perfagent %.2f CPU s with bytecode cached, %.2f without; py-spy %.2f"
              % (statistics.median(cpus["cached"]), statistics.median(cpus["source"]), spy_cpu))
        for key, label in (("cached", "bytecode cached"), ("source", "no bytecode")):
            print("   ratio perfagent (%s) / py-spy  %.2f  (rounds: %s)" % (
                label, statistics.median(cpus[key]) / spy_cpu if spy_cpu else float("nan"),
                " ".join("%.2f" % (a / b) for a, b in zip(cpus[key], cpus["py-spy"]) if b)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
