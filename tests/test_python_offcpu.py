"""Python function names in off-CPU profiles (--offcpu --inject-python).

CPython builds without frame pointers, so the kernel's frame-pointer walk
never gets from the sleeping system call to the interpreter, let alone to
the perf trampolines that carry the Python names: the names come from the
user stacks the sched_switch program copies and perfagent unwinds with the
binaries' DWARF CFI (the default --unwind auto).

The workload (programs/py_naps.py) blocks in main > nap_short (10 ms
sleeps) and main > nap_long (30 ms) in turn and reports how long each
really slept by its own clock, the reference for the shares.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Dict, List, Tuple

import pytest

from conftest import PROGRAMS, run_agent
from perfagent.pprof.decode import read_profile
from test_python_profiling import KINDS, interpreter, remove_perf_map

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")

PY_NAPS = os.path.join(PROGRAMS, "py_naps.py")
NAPS = ("nap_short", "nap_long")


def python_offcpu_stacks(path: str, tid: int) -> List[Tuple[List[str], int, bool]]:
    """(Python function names root-first, off-CPU ns, whether the stack is
    in a sleep) per sample of thread ``tid``."""
    profile = read_profile(path)
    assert [t.type for t in profile.sample_type] == ["blocks", "offcpu"]
    funcs = {f.id: f for f in profile.functions}
    locs = {loc.id: loc for loc in profile.locations}
    out = []
    for s in profile.samples:
        labels = {lab.key: lab.str or lab.num for lab in s.labels}
        if str(labels.get("tid")) != str(tid):
            continue
        lines = [line for lid in reversed(s.location_ids) for line in reversed(locs[lid].lines)]
        py = [funcs[line.function_id].name for line in lines if funcs[line.function_id].filename.endswith(".py")]
        sleeping = any("nanosleep" in funcs[line.function_id].name for line in lines)
        out.append((py, s.values[1], sleeping))
    return out


def parse_truth(stdout: str) -> Tuple[int, int]:
    for line in stdout.splitlines():
        if line.startswith("truth "):
            short, long_ = line.split()[1:]
            return int(short), int(long_)
    raise AssertionError("no truth line in %r" % stdout)


def check_naps(path: str, tid: int, truth: Tuple[int, int]) -> None:
    # A stack without Python frames that is not asleep is the interpreter
    # starting or ending (page-cache reads: 1.15 s of a 4 s capture once,
    # in the full suite on the 2-core VM): not a nap, not counted.
    stacks = [st for st in python_offcpu_stacks(path, tid) if st[0] or st[2]]
    total = sum(ns for _, ns, _ in stacks)
    assert total >= 1e9, total
    per_nap: Dict[str, int] = {n: 0 for n in NAPS}
    for py, ns, _ in stacks:
        for nap in NAPS:
            # whole: the chain main > nap_x > nap, down to the sleep
            if py[-3:] == ["main", nap, "nap"]:
                per_nap[nap] += ns
    both = sum(per_nap.values())
    # The rest is the interpreter starting (page-cache reads) and the
    # nap() running when the trampoline went on (--pid), which has no
    # trampoline frame: a few per cent at most.
    others: Dict[tuple, int] = {}
    for py, ns, sleeping in stacks:
        if py[-3:] not in (["main", nap, "nap"] for nap in NAPS):
            others[(tuple(py), sleeping)] = others.get((tuple(py), sleeping), 0) + ns
    assert both >= 0.90 * total, (per_nap, total, sorted(others.items(), key=lambda kv: -kv[1])[:4])
    share = per_nap["nap_long"] / both
    want = truth[1] / sum(truth)          # 0.75 on an idle machine
    print("nap_long share %.4f, own clock %.4f, named %.3f" % (share, want, both / total))
    assert abs(share - want) <= 0.03, (share, want, per_nap)


@pytest.mark.parametrize("kind", KINDS)
def test_launch_mode_offcpu_names_python_functions(kind, tmp_path):
    python = interpreter(kind)
    out = tmp_path / "off.pb.gz"
    r = run_agent(["--offcpu", "--inject-python", "--duration", "4s", "--offcpu-output", str(out),
                   "--", python, PY_NAPS, "30"], cwd=str(tmp_path))
    pid = int(r.stdout.split("ready ")[1].split()[0])
    remove_perf_map(pid)
    assert r.returncode == 0, r.stderr
    assert "off-CPU: unwound" in r.stderr, r.stderr
    check_naps(str(out), pid, parse_truth(r.stdout))


@pytest.mark.parametrize("kind", ["shared", "static"])
def test_pid_injection_offcpu_names_python_functions(kind, tmp_path):
    python = interpreter(kind)
    proc = subprocess.Popen([python, PY_NAPS, "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        out = tmp_path / "off.pb.gz"
        r = run_agent(["--offcpu", "--profile", "--inject-python", "--pid", str(proc.pid),
                       "--duration", "4s", "--offcpu-output", str(out),
                       "--profile-output", str(tmp_path / "on.pb.gz")], cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        stdout, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        remove_perf_map(proc.pid)
    assert err == ""
    check_naps(str(out), proc.pid, parse_truth(stdout))


def test_all_processes_offcpu_names_python_and_native(tmp_path, programs_dir):
    """-a --offcpu --inject-python: a Python target (injected by the lenient
    system-wide pass) and a native one without frame pointers, in one profile."""
    from conftest import compile_c, contains_chain, sample_stacks
    blocker = compile_c(os.path.join(PROGRAMS, "offcpu_blocker.c"), os.path.join(programs_dir, "blocker_all_nofp"),
                        ["-O2", "-fomit-frame-pointer", "-pthread"])
    py = subprocess.Popen([interpreter("shared"), PY_NAPS, "60"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    native = subprocess.Popen([blocker, "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert py.stdout.readline().startswith("ready")
        assert native.stdout.readline().startswith("ready")
        out = tmp_path / "all.pb.gz"
        r = run_agent(["--offcpu", "-a", "--inject-python", "--duration", "4s", "--offcpu-output", str(out)],
                      cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
        assert py.poll() is None and native.poll() is None
    finally:
        for p in (py, native):
            p.kill()
            p.communicate()
        remove_perf_map(py.pid)
    stacks = python_offcpu_stacks(str(out), py.pid)
    total = sum(ns for _, ns, _ in stacks)
    named = sum(ns for py_names, ns, _ in stacks if py_names[-3:] in (["main", n, "nap"] for n in NAPS))
    assert total >= 1e9 and named >= 0.90 * total, (named, total)
    mine = [(names, v) for names, labels, v in sample_stacks(read_profile(str(out)))
            if str(labels.get("tid")) == str(native.pid)]
    native_total = sum(v[1] for _, v in mine)
    whole = sum(v[1] for names, v in mine
                if contains_chain(names, ["main", "block_sleep"]) or contains_chain(names, ["main", "block_read"]))
    assert native_total >= 1e9 and whole >= 0.95 * native_total, (whole, native_total)
