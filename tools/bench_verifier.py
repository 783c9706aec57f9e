#!/usr/bin/env python3
"""What verifying the KUNWIND stack programs costs, per variant.

Builds every form of the walking program the agent loads (the variants of
tests/test_kunwind.py's test_verifier_accepts_every_variant: on-CPU and
off-CPU, with and without the Python walk, --unwind dwarf and auto) and
prints, for each, the verifier's own statistics (log_level 4: processed
insns, total and peak states, its verification time) and the load's CPU
time without a log, as the agent loads it (thread CPU time around
BPF_PROG_LOAD: the verifier runs in the caller's thread; min and median of
``--repeat`` loads).  A benchmark, not a test: the 2-core VM is shared, so
read the CPU times of one run together.

With ``--where VARIANT`` (e.g. ``oncpu-python-dwarf``), the log_level 2 log
of that variant is taken apart: the instructions the verifier processed,
counted per subprogram and per label region (the nearest label before the
instruction), to show where its work goes.

With ``--against REV``, the programs of git revision REV (its perfagent/
extracted with git archive into a temporary directory) are measured too,
variant by variant in the same run, and shown beside this tree's.

usage: sudo python3 tools/bench_verifier.py [--repeat 5] [--against REV]
       sudo python3 tools/bench_verifier.py --where oncpu-python-dwarf [--top 40] [--save-log FILE]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import os
import re
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --repo DIR (used by --against): the perfagent package measured.
sys.path.insert(0, sys.argv[sys.argv.index("--repo") + 1] if "--repo" in sys.argv else REPO)

from perfagent.bpf import syscall as sc  # noqa: E402
from perfagent.bpf.prog import func_btf  # noqa: E402
from perfagent.stackprog.variants import VARIANTS  # noqa: E402

BPF_LOG_LEVEL2 = 2   # level 1 keeps only a failing path on recent kernels
BPF_LOG_STATS = 4
_STATS = re.compile(r"processed (\d+) insns \(limit \d+\) max_states_per_insn (\d+) "
                    r"total_states (\d+) peak_states (\d+) mark_read (\d+)")
_VTIME = re.compile(r"verification time (\d+) usec")
_INSN = re.compile(r"^(\d+): \([0-9a-f]{2}\)")


def build(which: str, python: bool, auto: bool):
    """The program exactly as test_verifier_accepts_every_variant builds it
    (perfagent.stackprog.variants: ``--against`` needs a revision that has it)."""
    from perfagent.stackprog.variants import build_variant
    return build_variant(which, python, auto)


def functions(prog):
    """Program.load's function list: (insn offset, name, nargs)."""
    subs = sorted({s.target for s in prog._slots if s.func}, key=lambda t: prog._labels[t])
    return [(0, prog.name or "prog", 1)] + [(prog._labels[t], t, 2) for t in subs]


def load(b, log_level: int = 0, log_size: int = 0):
    """One BPF_PROG_LOAD: (thread CPU s, wall s, log text)."""
    insns = b.prog.assemble()
    blob, info = func_btf(functions(b.prog))
    btf_fd = sc.btf_load(blob)
    buf = sc._Buf(log_size) if log_level else None
    try:
        t0, w0 = time.thread_time(), time.perf_counter()
        fd = sc.prog_load(b.prog_type, insns, log_level=log_level, log_buf=buf, prog_btf_fd=btf_fd,
                          func_info=info, prog_name=b.prog.name, **b.load_kw)
        cpu, wall = time.thread_time() - t0, time.perf_counter() - w0
        sc.close_fd(fd)
    finally:
        sc.close_fd(btf_fd)
    return cpu, wall, buf.raw.value.decode("utf-8", "replace") if buf else ""


def stats_of(b) -> dict:
    _, _, log = load(b, BPF_LOG_STATS, 1 << 16)
    m, v = _STATS.search(log), _VTIME.search(log)
    if m is None:
        raise SystemExit("%s: no statistics in the log:\n%s" % (b.name, log))
    return dict(insns=int(m.group(1)), max_per_insn=int(m.group(2)), total=int(m.group(3)),
                peak=int(m.group(4)), vtime=int(v.group(1)) / 1e6 if v else 0.0)


def where(b, top: int, save: str = "") -> None:
    """Processed instructions per subprogram and per label region."""
    _, _, log = load(b, BPF_LOG_LEVEL2, (1 << 30) - 1)
    if save:
        with open(save, "w") as f:
            f.write(log)
    counts = collections.Counter()
    for line in log.splitlines():
        m = _INSN.match(line)
        if m:
            counts[int(m.group(1))] += 1
    labels = sorted((pc, name) for name, pc in b.prog._labels.items())
    starts = [pc for pc, _ in labels]
    funcs = sorted((off, name) for off, name, _ in functions(b.prog))
    fstarts = [off for off, _ in funcs]
    by_func, by_label = collections.Counter(), collections.Counter()
    for pc, n in counts.items():
        by_func[funcs[bisect.bisect_right(fstarts, pc) - 1][1]] += n
        i = bisect.bisect_right(starts, pc) - 1
        by_label[labels[i][1] if i >= 0 else "(start)"] += n
    total = sum(counts.values())
    print("%s: %d instructions of %d processed (log level 2)" % (b.name, total, len(b.prog)))
    for name, n in by_func.most_common():
        print("  %-28s %8d  %5.1f%%" % (name, n, 100.0 * n / total))
    print("  label regions:")
    for name, n in by_label.most_common(top):
        print("    %-40s %8d" % (name, n))


def measure(which: str, python: bool, auto: bool, repeat: int) -> dict:
    from perfagent.offcpu.common import close_all
    b = build(which, python, auto)
    try:
        st = stats_of(b)
        cpus = sorted(load(b)[0] for _ in range(repeat))
        st.update(name=b.name, size=len(b.prog), cpu_min=cpus[0], cpu_median=statistics.median(cpus))
        return st
    finally:
        close_all(b.objs)


def extract(rev: str) -> str:
    """A temporary directory holding perfagent/ as of ``rev``."""
    tmp = tempfile.mkdtemp(prefix="bench_verifier.")
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "perfagent"], stdout=subprocess.PIPE,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    return tmp


def peer(repo: str, variant, repeat: int) -> dict:
    which, python, auto = variant
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--repo", repo, "--json", "--repeat",
                          str(repeat), "--only", "%s,%d,%d" % (which, python, auto)],
                         stdout=subprocess.PIPE, check=True, text=True).stdout
    return json.loads(out)


ROW = "%-30s %6d %9d %7d %5d %6d %8.3f %7.3f %7.3f"
HEAD = "%-30s %6s %9s %7s %5s %6s %8s %7s %7s" % (
    "variant", "insns", "processed", "states", "peak", "max/in", "vtime s", "CPU min", "median")


def row(st: dict, label: str) -> str:
    return ROW % (label, st["size"], st["insns"], st["total"], st["peak"], st["max_per_insn"], st["vtime"],
                  st["cpu_min"], st["cpu_median"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="loads per variant for the CPU time")
    ap.add_argument("--against", help="a git revision whose programs are measured beside these")
    ap.add_argument("--where", help="break down the log of this variant (e.g. oncpu-python-dwarf)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--save-log", default="", help="with --where: write its log_level 2 log here")
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only", help=argparse.SUPPRESS)
    a = ap.parse_args()
    from perfagent.offcpu.common import close_all
    from perfagent.unwind.kernel import kernel_walk_supported
    why = kernel_walk_supported()
    if why is not None:
        raise SystemExit("the kernel walk is not supported here: " + why)
    if a.only:
        which, python, auto = a.only.split(",")
        print(json.dumps(measure(which, python == "1", auto == "1", a.repeat)))
        return
    if a.where:
        for variant in VARIANTS:
            b = build(*variant)
            try:
                if b.name == a.where:
                    where(b, a.top, a.save_log)
            finally:
                close_all(b.objs)
        return
    tmp = extract(a.against) if a.against else None
    try:
        print("verifier statistics (log_level 4) and load CPU time without a log, %d loads each" % a.repeat)
        print(HEAD)
        for variant in VARIANTS:
            if tmp:
                before = peer(tmp, variant, a.repeat)
                print(row(before, before["name"] + " @" + a.against[:10]))
            st = measure(*variant, a.repeat)
            print(row(st, st["name"]) if not tmp else row(st, "  this tree"))
            if tmp:
                print("%-30s %6s %8.2fx %6.2fx %5s %6s %8s %6.2fx %6.2fx" % (
                    "", "", before["insns"] / st["insns"], before["total"] / st["total"], "", "", "",
                    before["cpu_min"] / st["cpu_min"], before["cpu_median"] / st["cpu_median"]))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
