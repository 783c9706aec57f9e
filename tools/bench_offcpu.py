#!/usr/bin/env python3
"""What off-CPU stack copies cost: the agent, the target, and perf beside them.

A native workload built without frame pointers (release-style) blocks very
often: THREADS threads each loop main > outer > middle > inner > nanosleep
(1 ms), so about 900 blocking episodes per thread per second.  For
``--duration`` seconds each, with the same workload running throughout:

1. nothing attached: the workload's own CPU time (the baseline);
2. ``perfagent --offcpu --pid`` (default --unwind auto): every episode's
   user registers and stack are copied by the sched_switch program into a
   ring buffer and unwound with DWARF CFI by the agent;
3. ``perfagent --offcpu --pid --unwind fp``: frame-pointer stack ids only,
   blocked time summed in the kernel;
4. ``perf record -e context-switches -c 1 --call-graph dwarf`` on the same
   pid, then ``perf report``: perf's own way to get DWARF stacks at every
   switch-out without tracefs (it counts switches, not blocked time, and
   also records preemptions).

For each: CPU seconds of the profiler (user + sys, RUSAGE_CHILDREN, perf
record and report together), the workload's CPU seconds in the same
window (what the stack copy adds to each switch-out shows here), and how
many stacks reached ``outer`` (whole).  Machines here are noisy: compare
the ratios, and run it twice.

usage: sudo python3 tools/bench_offcpu.py [--duration 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import children_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKLOAD_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;

__attribute__((noinline)) void inner(void)
{
    struct timespec ts = {0, 1000 * 1000};
    nanosleep(&ts, NULL);
    for (int i = 0; i < 2000; i++) sink += i;
}
__attribute__((noinline)) void middle(void) { inner(); sink++; }
__attribute__((noinline)) void outer(void) { middle(); sink++; }

static void *loop(void *unused)
{
    (void)unused;
    for (;;) outer();
    return NULL;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 2;
    pthread_t t;
    for (int i = 1; i < n; i++) pthread_create(&t, NULL, loop, NULL);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    loop(NULL);
    return 0;
}
"""


def target_cpu(pid: int) -> float:
    """Seconds every thread of ``pid`` has run so far (schedstat: exact, where
    utime/stime are tick samples, too coarse for threads that run 10 us at a time)."""
    total = 0
    for t in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/schedstat" % (pid, t)) as f:
            total += int(f.read().split()[0])
    return total / 1e9


def measure(argv, pid: int, env=None, cwd=None):
    """(profiler CPU s, workload CPU s, stderr+stdout) for one command."""
    c0, t0 = children_cpu(), target_cpu(pid)
    r = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    c1, t1 = children_cpu(), target_cpu(pid)
    if r.returncode != 0:
        sys.exit("%s failed:\n%s" % (argv[0], r.stderr))
    return c1 - c0, t1 - t0, r.stderr + r.stdout


def whole_share(report_py: str, profile: str, env) -> str:
    """Share of off-CPU time whose stack reaches outer (perfagent's profile)."""
    folded = subprocess.run([sys.executable, "-m", "perfagent", "report", profile, "--folded"],
                            env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    total = whole = 0
    for line in folded.splitlines():
        stack, _, value = line.rpartition(" ")
        if "inner" in stack or "nanosleep" in stack:
            total += int(value)
            whole += int(value) * (";outer;middle;inner" in stack)
    return "%.1f%% of the sleep time reaches outer" % (100.0 * whole / total if total else 0.0)


BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


def program_cost(pid: int, seconds: float, copy_stack: int):
    """(ns per run, runs) of the sched_switch program following ``pid``, from
    the kernel's own accounting (kernel.bpf_stats_enabled, fdinfo run_time_ns):
    what each switch pays in the kernel, copy or no copy."""
    sys.path.insert(0, REPO)
    from perfagent.offcpu.collector import OffCpuCollector
    with open(BPF_STATS) as f:
        old = f.read().strip()
    with open(BPF_STATS, "w") as f:
        f.write("1")
    try:
        with OffCpuCollector({pid}, copy_stack=copy_stack, on_copy=lambda tgid, c: c.unwound(())) as col:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                time.sleep(0.1)
                col.drain_copies()
            with open("/proc/self/fdinfo/%d" % col._prog.fd) as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        col.collect()
    finally:
        with open(BPF_STATS, "w") as f:
            f.write(old)
    runs = int(info.get("run_cnt", "0"))
    return (int(info.get("run_time_ns", "0")) / runs if runs else 0.0), runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (bpf, perf_event_open)")
    tmp = tempfile.mkdtemp(prefix="bench_offcpu.")
    src = os.path.join(tmp, "sleeper.c")
    exe = os.path.join(tmp, "sleeper")
    with open(src, "w") as f:
        f.write(WORKLOAD_C)
    subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-pthread", "-o", exe, src], check=True)
    env = dict(os.environ, PYTHONPATH=REPO)
    dur = "%gs" % args.duration
    work = subprocess.Popen([exe, str(args.threads)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(work.stdout.readline().split()[1])
        time.sleep(1)
        rows = []
        base_t0 = target_cpu(pid)
        time.sleep(args.duration)
        rows.append(("no profiler", 0.0, target_cpu(pid) - base_t0, ""))

        for label, extra in (("perfagent --offcpu (auto: stack copies)", []),
                             ("perfagent --offcpu --unwind fp", ["--unwind", "fp"])):
            out = os.path.join(tmp, "off%d.pb.gz" % len(extra))
            cpu, tcpu, text = measure([sys.executable, "-S", "-m", "perfagent", "--offcpu", "--pid", str(pid),
                                       "--duration", dur, "--offcpu-output", out, "--quiet", *extra],
                                      pid, env=env)
            m = re.search(r"(\d+) blocking episodes", text)
            note = "%s episodes; %s" % (m.group(1) if m else "?", whole_share(sys.executable, out, env))
            u = re.search(r"off-CPU: (unwound .*)", text)
            if u:
                note += "; " + u.group(1).split(",")[0]
            rows.append((label, cpu, tcpu, note))

        if shutil.which("perf"):
            data = os.path.join(tmp, "perf.data")
            cpu, tcpu, text = measure(["perf", "record", "-q", "-e", "context-switches", "-c", "1",
                                       "--call-graph", "dwarf,32768", "-p", str(pid), "-o", data,
                                       "--", "sleep", "%g" % args.duration], pid)
            c0 = children_cpu()
            rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "-g",
                                  "caller,0.5,callee", "--percent-limit", "1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            cpu += children_cpu() - c0
            samples = re.search(r"of event 'context-switches'.*?\n# Event count \(approx\.\): (\d+)",
                                rep.stdout, re.S)
            rows.append(("perf record -e context-switches --call-graph dwarf + report", cpu, tcpu,
                         "%s switches" % (samples.group(1) if samples else "?")))
        base_t0 = target_cpu(pid)
        time.sleep(args.duration)
        rows.append(("no profiler, again (the noise)", 0.0, target_cpu(pid) - base_t0, ""))
        costs = [(n, program_cost(pid, 3.0, n)) for n in (32768, 0)]
    finally:
        work.kill()
        work.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    base = rows[0][2]
    print("%d threads sleeping 1 ms in a loop, %g s per run" % (args.threads, args.duration))
    print("%-62s %12s %14s" % ("", "profiler CPU", "workload CPU"))
    for label, cpu, tcpu, note in rows:
        print("%-62s %10.2f s %10.2f s (x%.2f)  %s" % (label, cpu, tcpu, tcpu / base if base else 0, note))
    for n, (ns, runs) in costs:
        print("sched_switch program, %s: %.0f ns per run (%d runs in 3 s, every switch on the machine)"
              % ("copying %d bytes of stack" % n if n else "stack ids only", ns, runs))
    ours = rows[1][1]
    perf_rows = [r for r in rows if r[0].startswith("perf record")]
    if perf_rows and perf_rows[0][1]:
        print("perfagent (copies) / perf profiler CPU: %.2f" % (ours / perf_rows[0][1]))


if __name__ == "__main__":
    main()
