"""perfagent.offcpu against the running kernel: off-CPU time from sched_switch
and on-CPU samples counted in the kernel, on programs whose stacks are known.

Needs root (or CAP_BPF + CAP_PERFMON), bpf() and kernel BTF; skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import pytest

from conftest import PROGRAMS, compile_c
from perfagent.bpf import syscall as sc
from perfagent.bpf.btf import VMLINUX_PATH
from perfagent.bpf.maps import HashMap
from perfagent.bpf.syscall import BPFError
from perfagent.offcpu import InKernelSampler, OffCpuCollector, OffCpuStack, OnCpuStack
from perfagent.symbolize.native import BinaryCache
from perfagent.symbolize.procmaps import read_maps
from test_bpf_kernel import assert_gone, bpf_fds


def _why_not() -> str:
    if not os.path.exists(VMLINUX_PATH):
        return "no kernel BTF"
    try:
        with HashMap(4, 4, 1, name="probe"):
            return ""
    except BPFError as exc:
        return str(exc)


_WHY = _why_not()
pytestmark = pytest.mark.skipif(bool(_WHY), reason="bpf() unusable here: %s" % _WHY)


@pytest.fixture(scope="session")
def blocker_bin(programs_dir) -> str:
    return compile_c(os.path.join(PROGRAMS, "offcpu_blocker.c"),
                     os.path.join(programs_dir, "offcpu_blocker"))


def start_ready(argv: Sequence[str], **kw) -> subprocess.Popen:
    """Start a test program and wait for its "ready <pid>" line."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, text=True, **kw)
    line = proc.stdout.readline()
    assert line.startswith("ready"), line
    return proc


def finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


def symbolizer(pid: int, binary: str) -> Callable[[Sequence[int]], List[Optional[str]]]:
    """Function names (leaf first) of user ips, from the process's maps now.

    Return addresses (every frame but the leaf) are looked up one byte back,
    inside the call instruction, so a call ending a function is not
    attributed to the next one.
    """
    maps = [m for m in read_maps(pid) if m.is_exec and m.path.startswith("/")]
    cache = BinaryCache()
    real = os.path.realpath(binary)

    def names(ips: Sequence[int]) -> List[Optional[str]]:
        out: List[Optional[str]] = []
        for i, ip in enumerate(ips):
            addr = ip if i == 0 else ip - 1
            m = next((m for m in maps if m.start <= addr < m.end), None)
            if m is None:
                out.append(None)
                continue
            out.append(cache.load(m.path).symbolize_offset(addr - m.start + m.pgoff))
        return out

    names.in_binary = lambda ip: any(  # type: ignore[attr-defined]
        m.start <= ip < m.end and os.path.realpath(m.path) == real for m in maps)
    return names


# -- off-CPU ------------------------------------------------------------------

def test_blocking_shares_stacks_and_total(blocker_bin):
    proc = start_ready([blocker_bin, "6"])
    try:
        pid = proc.pid
        names = symbolizer(pid, blocker_bin)
        col = OffCpuCollector({pid})
        col.start()
        t0 = time.monotonic()
        time.sleep(1.5)
        got: List[OffCpuStack] = col.collect()      # a periodic drain mid-way
        time.sleep(1.5)
        col.stop()
        wall = time.monotonic() - t0
        got += col.collect()
    finally:
        finish(proc)

    assert all(s.tgid == pid for s in got)
    main = [s for s in got if s.tid == pid]
    assert any(s.tid != pid for s in got), "the helper thread blocks too"
    total = sum(s.blocked_ns for s in main) / 1e9
    assert abs(total - wall) <= 0.10 * wall, (total, wall)

    by_func: Dict[str, int] = {"block_sleep": 0, "block_read": 0}
    with_main = 0
    for s in main:
        assert s.user_ips, "user stack missing: %r" % (s,)
        assert names.in_binary(s.user_ips[0]), "leaf %#x not in %s" % (s.user_ips[0], blocker_bin)
        frames = names(s.user_ips)
        assert frames[0] == "sys3", frames
        for f in by_func:
            if f in frames:
                by_func[f] += s.blocked_ns
        if "main" in frames:
            with_main += s.blocked_ns
        assert s.kernel_ips, "kernel stack missing: %r" % (s,)
    both = by_func["block_sleep"] + by_func["block_read"]
    assert both >= 0.95 * total * 1e9, by_func
    share = by_func["block_sleep"] / both
    assert 0.72 <= share <= 0.78, share
    assert with_main >= 0.95 * both
    # Episodes: ~3 s / 40 ms cycles, two blocks each; each counted once.
    episodes = sum(s.count for s in main)
    assert 100 <= episodes <= 2 * wall / 0.040 + 10, episodes


def test_cpu_bound_threads_sharing_a_cpu_are_not_off_cpu(chain_bin):
    # Two spinning threads (main + one worker) on CPU 0: each is preempted all
    # the time, but preemption leaves it runnable, which is not blocking.
    proc = start_ready([chain_bin, "4", "1"], preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        pid = proc.pid
        tids = [int(t) for t in os.listdir("/proc/%d/task" % pid)]
        assert len(tids) == 2

        def involuntary() -> int:
            n = 0
            for t in tids:
                with open("/proc/%d/task/%d/status" % (pid, t)) as f:
                    for line in f:
                        if line.startswith("nonvoluntary_ctxt_switches"):
                            n += int(line.split()[1])
            return n

        before = involuntary()
        with OffCpuCollector({pid}) as col:
            t0 = time.monotonic()
            time.sleep(2)
        wall = time.monotonic() - t0
        preempted = involuntary() - before
        got = col.collect()
    finally:
        finish(proc)
    assert preempted >= 20, "the two threads did not take turns on CPU 0"
    blocked = sum(s.blocked_ns for s in got) / 1e9
    assert blocked <= 0.02 * wall * len(tids), (blocked, got)


def test_add_tgid_at_run_time(blocker_bin):
    proc = start_ready([blocker_bin, "3"])
    try:
        with OffCpuCollector(set()) as col:
            time.sleep(0.3)
            assert col.collect() == []
            col.add_tgid(proc.pid)
            time.sleep(0.5)
        got = col.collect()
    finally:
        finish(proc)
    assert got and all(s.tgid == proc.pid for s in got)
    assert sum(s.blocked_ns for s in got) >= 0.3e9


def test_every_process_and_nothing_left_behind():
    before_fds = bpf_fds()
    before_links = set(sc.all_ids(sc.BPF_LINK_GET_NEXT_ID))
    with OffCpuCollector() as col:   # tgids=None: the program without a filter
        child = subprocess.Popen(["sleep", "0.2"])
        prog_ids, map_ids = col.prog_ids, col.map_ids
        assert len(prog_ids) == 1 and len(map_ids) == 4
        new_links = set(sc.all_ids(sc.BPF_LINK_GET_NEXT_ID)) - before_links
        assert new_links
        child.wait()
        time.sleep(0.1)
    got = col.collect()
    assert bpf_fds() <= before_fds
    assert_gone(prog_ids, map_ids, new_links)
    mine = [s for s in got if s.tgid == child.pid]
    assert mine and sum(s.blocked_ns for s in mine) >= 0.15e9
    assert col.collect() == []


# -- on-CPU, counted in the kernel ------------------------------------------------

@pytest.mark.parametrize("filtered", [True, False])
def test_inkernel_sampler_rate_and_stacks(chain_bin, filtered):
    rate, seconds = 200, 2.0
    proc = start_ready([chain_bin, "4"])
    before_fds = bpf_fds()
    try:
        pid = proc.pid
        names = symbolizer(pid, chain_bin)
        s = InKernelSampler(rate, {pid} if filtered else None)
        s.start()
        prog_ids, map_ids = s.prog_ids, s.map_ids
        time.sleep(seconds / 2)
        got: List[OnCpuStack] = s.collect_if_full(0.0)   # drains: the map is not empty
        assert got
        time.sleep(seconds / 2)
        s.stop()
        got += s.collect()
    finally:
        finish(proc)
    assert bpf_fds() <= before_fds
    assert_gone(prog_ids, map_ids)
    assert s.dropped == 0
    if filtered:
        assert all(x.tgid == pid for x in got)
    mine = [x for x in got if x.tgid == pid]
    n = sum(x.samples for x in mine)
    assert 0.75 * rate * seconds <= n <= 1.15 * rate * seconds, n
    cpu_ns = sum(x.period_ns for x in mine)
    assert 0.75 * seconds <= cpu_ns / 1e9 <= 1.15 * seconds, cpu_ns
    walked = [x for x in mine if x.user_ips]
    assert sum(x.samples for x in walked) >= 0.95 * n
    in_chain = 0
    for x in walked:
        assert names.in_binary(x.user_ips[0]) or x.kernel_ips, x
        frames = names(x.user_ips)
        # spin() is static and may be inlined into main.
        if frames[:4] in (["leaf", "c", "b", "a"], ["tick", "leaf", "c", "b"]) and "main" in frames:
            in_chain += x.samples
    assert in_chain >= 0.9 * n, in_chain
