"""perfagent.offcpu against the running kernel: off-CPU time from sched_switch
and on-CPU samples counted in the kernel, on programs whose stacks are known.

Needs root (or CAP_BPF + CAP_PERFMON), bpf() and kernel BTF; skipped otherwise.
"""

from __future__ import annotations

import os
import struct
import subprocess
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import pytest

from conftest import PROGRAMS, compile_c
from perfagent.bpf import syscall as sc
from perfagent.bpf.btf import VMLINUX_PATH
from perfagent.bpf.maps import HashMap
from perfagent.bpf.syscall import BPFError
from perfagent.offcpu import (InKernelSampler, OffCpuCollector, OffCpuStack, OnCpuStack,
                               strip_tracing_frames)
from perfagent.offcpu import collector as offcpu_collector
from perfagent.symbolize.kallsyms import KernelSymbols
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


def on_cpu_ns(pid: int) -> int:
    """CPU time of all of ``pid``'s threads so far (schedstat: ns on a CPU)."""
    total = 0
    for t in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/schedstat" % (pid, t)) as f:
            total += int(f.read().split()[0])
    return total


# -- off-CPU ------------------------------------------------------------------

TRUTH = struct.Struct("=5Q")   # seq, sleep ns, read ns, current start, current kind


def read_truth(path: str) -> List[int]:
    """[ns in block_sleep's call, ns in block_read's call] up to now, the call
    in progress included (offcpu_blocker.c's seqlock, retried until stable)."""
    while True:
        with open(path, "rb") as f:
            seq, sleep_ns, read_ns, start, kind = TRUTH.unpack(f.read(TRUTH.size))
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        with open(path, "rb") as f:
            seq2 = TRUTH.unpack(f.read(TRUTH.size))[0]
        if seq % 2 == 0 and seq2 == seq:
            totals = [sleep_ns, read_ns]
            if kind:
                totals[kind - 1] += now - start
            return totals


def schedstat(pid: int, tid: int) -> List[int]:
    """[ns on a CPU, ns runnable waiting for one] of a thread so far."""
    with open("/proc/%d/task/%d/schedstat" % (pid, tid)) as f:
        return [int(x) for x in f.read().split()[:2]]


class BlockerRun(NamedTuple):
    pid: int
    got: List[OffCpuStack]
    truth: List[int]        # the program's own [sleep ns, read ns] over the capture
    wall: float             # seconds from start() to stop()
    cpu: float              # seconds the main thread ran meanwhile
    runnable: float         # seconds it waited for a CPU meanwhile
    names: Callable[[Sequence[int]], List[Optional[str]]]
    collector: OffCpuCollector


def run_blocker(blocker_bin: str, tmp_path, seconds: float, **collector_kw) -> BlockerRun:
    """Capture offcpu_blocker for ``seconds`` (a periodic collect() half-way,
    and the copy ring read every 100 ms), with the collector attached before
    the program starts blocking."""
    truth_file = str(tmp_path / "truth")
    with open(truth_file, "wb") as f:
        f.write(bytes(TRUTH.size))
    proc = subprocess.Popen([blocker_bin, "%g" % (seconds + 3), truth_file],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        pid = proc.pid
        names = symbolizer(pid, blocker_bin)
        col = OffCpuCollector({pid}, **collector_kw)
        col.start()
        t0 = time.monotonic()
        sched0 = schedstat(pid, pid)
        # Go only now, so that every blocking call is seen from its start.
        proc.stdin.write("go\n")
        proc.stdin.flush()
        got: List[OffCpuStack] = []
        for half in (0, 1):
            end = time.monotonic() + seconds / 2
            while time.monotonic() < end:
                time.sleep(0.1)
                got += col.drain_copies()
            if half == 0:
                got += col.collect()
        truth = read_truth(truth_file)
        sched = [b - a for a, b in zip(sched0, schedstat(pid, pid))]
        col.stop()
        wall = time.monotonic() - t0
        got += col.collect()
    finally:
        finish(proc)
        proc.stdin.close()
    return BlockerRun(pid, got, truth, wall, sched[0] / 1e9, sched[1] / 1e9, names, col)


def frame_pointer_ips(s: OffCpuStack) -> Tuple[int, ...]:
    return s.user_ips


def test_blocking_shares_stacks_and_total(blocker_bin, tmp_path):
    check_blocker(run_blocker(blocker_bin, tmp_path, 3.0), frame_pointer_ips)


def check_blocker(run: BlockerRun, user_ips: Callable[[OffCpuStack], Tuple[int, ...]]) -> None:
    """The blocker's known shape: 3:1 (by its own clock), from main, the
    total close to the wall time, kernel and user stacks agreeing."""
    pid, got, truth, wall, cpu, runnable, names, _col = run
    assert all(s.tgid == pid for s in got)
    main = [s for s in got if s.tid == pid]
    assert any(s.tid != pid for s in got), "the helper thread blocks too"
    total = sum(s.blocked_ns for s in main) / 1e9
    # The thread is off-CPU nearly all the time: on an idle machine that is
    # within 10% of the wall time.  What is not counted is the time it ran
    # and, on a loaded machine, the time it waited for a CPU after being
    # preempted (runnable, so not blocked; part of ``runnable``).
    assert wall - cpu - runnable - 0.03 * wall <= total <= wall - cpu + 0.03 * wall, (
        total, wall, cpu, runnable)
    if runnable < 0.02 * wall:
        assert abs(total - wall) <= 0.10 * wall, (total, wall)

    by_func: Dict[str, int] = {"block_sleep": 0, "block_read": 0}
    kernel_by_func: Dict[str, int] = {"block_sleep": 0, "block_read": 0}
    ksyms = KernelSymbols.load()
    with_main = 0
    for s in main:
        ips = user_ips(s)
        assert ips, "user stack missing: %r" % (s,)
        assert names.in_binary(ips[0]), "leaf %#x not in the blocker" % ips[0]
        frames = names(ips)
        assert frames[0] == "sys3", frames
        for f in by_func:
            if f in frames:
                by_func[f] += s.blocked_ns
        if "main" in frames:
            with_main += s.blocked_ns
        assert s.kernel_ips, "kernel stack missing: %r" % (s,)
        if ksyms.available:
            kstack = strip_tracing_frames(s.kernel_ips, ksyms.lookup)
            assert ksyms.lookup(kstack[0]).split(".")[0] == "__schedule"
            knames = [ksyms.lookup(ip) for ip in kstack]
            assert len(kstack) < len(s.kernel_ips) and "schedule" in knames, knames
            # The kernel side agrees with the user side about where it blocked.
            if "do_nanosleep" in knames:
                kernel_by_func["block_sleep"] += s.blocked_ns
            if any(n and n.endswith("pipe_read") for n in knames):   # anon_pipe_read in 6.x
                kernel_by_func["block_read"] += s.blocked_ns
    if ksyms.available:
        assert kernel_by_func == by_func, (kernel_by_func, by_func)
    both = by_func["block_sleep"] + by_func["block_read"]
    assert both >= 0.95 * total * 1e9, by_func
    assert abs(both - sum(truth)) <= 0.03 * sum(truth), (by_func, truth)
    share = by_func["block_sleep"] / both
    # 3:1 by design; the program's own clock is the reference when a loaded
    # machine stretches the read side (see offcpu_blocker.c).
    true_share = truth[0] / sum(truth)
    assert abs(share - true_share) <= 0.03, (share, true_share)
    assert 0.55 <= true_share <= 0.80, true_share   # the program works as described
    if runnable < 0.02 * wall:
        assert abs(share - 0.75) <= 0.03, share      # an idle machine: 3:1 as designed
    assert with_main >= 0.95 * both
    # Episodes: ~3 s / 40 ms cycles, two blocks each; each counted once.
    episodes = sum(s.count for s in main)
    assert 100 <= episodes <= 2 * wall / 0.040 + 10, episodes


# -- off-CPU with stack copies (DWARF unwinding) ------------------------------

NOFP_FLAGS = ["-O2", "-fomit-frame-pointer", "-pthread"]


@pytest.fixture(scope="session")
def blocker_nofp_bin(programs_dir) -> str:
    """The blocker as release builds are: no frame pointers, CFI only."""
    return compile_c(os.path.join(PROGRAMS, "offcpu_blocker.c"),
                     os.path.join(programs_dir, "offcpu_blocker_nofp"), NOFP_FLAGS)


class Unwinder:
    """Unwinds stack copies as they are read (the collector's on_copy), as
    the command line does: perfagent's capture state and DWARF walker."""

    def __init__(self) -> None:
        from perfagent.capture import CaptureState
        from perfagent.unwind.walker import CFICache, Walker
        self.state = CaptureState(offcpu_walker=Walker("dwarf", CFICache()))
        self.seen: List[int] = []

    def __call__(self, tgid: int, copy) -> None:
        self.seen.append(tgid)
        self.state.unwind_copy(tgid, copy)


def copied_ips(s: OffCpuStack) -> Tuple[int, ...]:
    assert s.copy is not None and not s.user_ips, s
    assert s.copy.user_ips is not None and s.copy.stack == b"", "not unwound as it arrived"
    return s.copy.user_ips


def test_stack_copies_unwound_without_frame_pointers(blocker_nofp_bin, tmp_path):
    unwind = Unwinder()
    run = run_blocker(blocker_nofp_bin, tmp_path, 3.0, copy_stack=32768, on_copy=unwind)
    col = run.collector
    assert col.copies_dropped == 0 and col.copies_missing == 0
    assert set(unwind.seen) == {run.pid}
    # Every episode of every thread came with its copy, and the walks were whole.
    assert all(s.copy is not None for s in run.got), [s for s in run.got if s.copy is None][:3]
    walker = unwind.state.offcpu_walker
    assert walker.outcomes[0] >= 0.99 * sum(walker.outcomes), walker.summary()
    check_blocker(run, copied_ips)
    # The helper thread blocks in libc's read and nanosleep wrappers (no
    # frame pointers either): its stacks reach helper and start_thread.
    helper = [s for s in run.got if s.tid != run.pid]
    helper_ns = sum(s.blocked_ns for s in helper)
    whole = sum(s.blocked_ns for s in helper
                if {"helper", "start_thread"} <= set(run.names(copied_ips(s))))
    assert whole >= 0.99 * helper_ns, (whole, helper_ns)


def test_frame_pointer_stacks_of_the_same_build_lose_the_callers(blocker_nofp_bin, tmp_path):
    # What the copies are for: without frame pointers the kernel's walk
    # does not get from sys3 to block_sleep / block_read and main.
    run = run_blocker(blocker_nofp_bin, tmp_path, 1.0)
    main = [s for s in run.got if s.tid == run.pid]
    total = sum(s.blocked_ns for s in main)
    from_main = sum(s.blocked_ns for s in main if "main" in run.names(s.user_ips))
    assert total > 0 and from_main <= 0.5 * total, (from_main, total)


def test_full_copy_ring_falls_back_to_frame_pointer_stacks(blocker_bin, tmp_path):
    # A ring of one page takes only the smallest copies (a stack whose top
    # is near sp): the other episodes are counted anyway, with the kernel's
    # frame-pointer stack.
    run = run_blocker(blocker_bin, tmp_path, 1.0, copy_stack=32768, ring_bytes=4096,
                      on_copy=Unwinder())
    col = run.collector
    main = [s for s in run.got if s.tid == run.pid]
    assert col.copies_dropped >= 20, (col.copies, col.copies_dropped)
    fallback = [s for s in main if s.copy is None]
    assert sum(s.count for s in fallback) >= 20
    blocked = sum(s.blocked_ns for s in main
                  if {"block_sleep", "block_read"} & set(run.names(copied_ips(s) if s.copy else s.user_ips)))
    assert abs(blocked - sum(run.truth)) <= 0.05 * sum(run.truth), (blocked, run.truth)


def test_stack_copy_program_leaves_nothing_behind(blocker_bin):
    before_fds = bpf_fds()
    proc = start_ready([blocker_bin, "20"])
    try:
        with OffCpuCollector({proc.pid}, copy_stack=8192, on_copy=Unwinder()) as col:
            prog_ids, map_ids = col.prog_ids, col.map_ids
            assert len(map_ids) == 7   # tgids, blocked, counts, stacks, stats, ring, scratch
            time.sleep(0.5)
            got = col.drain_copies()
        got += col.collect()
    finally:
        finish(proc)
    assert got and col.copies > 0
    assert bpf_fds() <= before_fds
    assert_gone(prog_ids, map_ids, set())


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
    proc = start_ready([blocker_bin, "20"])
    try:
        with OffCpuCollector(set()) as col:
            time.sleep(0.3)
            assert col.collect() == []
            col.add_tgid(proc.pid)
            time.sleep(0.5)
            alive = proc.poll() is None
        got = col.collect()
    finally:
        finish(proc)
    assert alive
    assert got and all(s.tgid == proc.pid for s in got)
    assert sum(s.blocked_ns for s in got) >= 0.3e9


def test_every_process_and_nothing_left_behind():
    before_fds = bpf_fds()
    before_links = set(sc.all_ids(sc.BPF_LINK_GET_NEXT_ID))
    with OffCpuCollector() as col:   # tgids=None: the program without a filter
        child = subprocess.Popen(["sleep", "0.2"])
        prog_ids, map_ids = col.prog_ids, col.map_ids
        # blocked, counts, the stack store, stats and the capture scratch
        assert len(prog_ids) == 1 and len(map_ids) == 5
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


@pytest.mark.parametrize("copy_stack", [0, 4096, 32768, 65528])
@pytest.mark.parametrize("tgids", [None, set()])
@pytest.mark.parametrize("prev_state_arg", [True, False])
def test_every_offcpu_program_variant_passes_the_verifier(monkeypatch, copy_stack, tgids, prev_state_arg):
    if not prev_state_arg:
        real = offcpu_collector._sched_switch_args
        monkeypatch.setattr(offcpu_collector, "_sched_switch_args",
                            lambda: real()._replace(prev_state=None))
    with OffCpuCollector(tgids, copy_stack=copy_stack, on_copy=Unwinder()) as col:
        assert len(col.prog_ids) == 1


@pytest.mark.parametrize("tgids", [None, {1}])
def test_inkernel_program_passes_the_verifier(tgids):
    with InKernelSampler(99, tgids) as s:
        assert s.prog_ids


def test_program_for_kernels_without_prev_state(monkeypatch, blocker_bin, tmp_path):
    # Before 5.18 sched_switch had no prev_state argument: the program reads
    # prev->__state (or ->state) itself.  Same results expected.
    real = offcpu_collector._sched_switch_args
    monkeypatch.setattr(offcpu_collector, "_sched_switch_args",
                        lambda: real()._replace(prev_state=None))
    run = run_blocker(blocker_bin, tmp_path, 1.0)
    blocked = sum(s.blocked_ns for s in run.got
                  if s.tid == run.pid and {"block_sleep", "block_read"} & set(run.names(s.user_ips)))
    assert abs(blocked - sum(run.truth)) <= 0.05 * sum(run.truth), (blocked, run.truth)


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
        cpu0 = on_cpu_ns(pid)
        prog_ids, map_ids = s.prog_ids, s.map_ids
        time.sleep(seconds / 2)
        got: List[OnCpuStack] = s.collect_if_full(0.0)   # drains: the map is not empty
        assert got
        time.sleep(seconds / 2)
        s.stop()
        cpu = (on_cpu_ns(pid) - cpu0) / 1e9
        got += s.collect()
    finally:
        finish(proc)
    assert bpf_fds() <= before_fds
    assert_gone(prog_ids, map_ids)
    assert s.dropped == 0
    if filtered:
        assert all(x.tgid == pid for x in got)
    mine = [x for x in got if x.tgid == pid]
    # cpu-clock samples what runs: the busy program gets ``rate`` samples per
    # second of CPU it had (all of the time on an idle machine).
    assert cpu >= 0.1 * seconds, "the busy program hardly ran: %.2f s" % cpu
    n = sum(x.samples for x in mine)
    assert 0.8 * rate * cpu <= n <= 1.2 * rate * cpu, (n, cpu)
    cpu_ns = sum(x.period_ns for x in mine)
    assert 0.8 * cpu <= cpu_ns / 1e9 <= 1.2 * cpu, (cpu_ns, cpu)
    walked = [x for x in mine if x.user_ips]
    assert sum(x.samples for x in walked) >= 0.95 * n
    in_chain = in_binary = 0
    for x in walked:
        # The rest: clock_gettime in the vDSO, page faults, ...
        if names.in_binary(x.user_ips[0]):
            in_binary += x.samples
        frames = names(x.user_ips)
        # spin() is static and may be inlined into main.
        if frames[:4] in (["leaf", "c", "b", "a"], ["tick", "leaf", "c", "b"]) and "main" in frames:
            in_chain += x.samples
    assert in_binary >= 0.9 * n, in_binary
    assert in_chain >= 0.9 * n, in_chain


def test_inkernel_sampler_started_off_samples_only_once_enabled(chain_bin):
    """start(enable=False) loads and attaches the program with its events
    off (the capture turns them on once /proc is read): a busy process's
    second on a CPU brings no sample before enable() and its share after."""
    rate = 200
    proc = start_ready([chain_bin, "4"])
    try:
        s = InKernelSampler(rate, {proc.pid})
        s.start(enable=False)
        try:
            cpu0 = on_cpu_ns(proc.pid)
            time.sleep(1.0)
            off = sum(x.samples for x in s.collect())
            off_cpu = (on_cpu_ns(proc.pid) - cpu0) / 1e9
            s.enable()
            cpu1 = on_cpu_ns(proc.pid)
            time.sleep(1.0)
            on_cpu = (on_cpu_ns(proc.pid) - cpu1) / 1e9
        finally:
            s.stop()
        on = sum(x.samples for x in s.collect())
    finally:
        finish(proc)
    assert off_cpu >= 0.5 and off == 0, (off, off_cpu)
    assert 0.8 * rate * on_cpu <= on <= 1.2 * rate * on_cpu, (on, on_cpu)


def test_stack_cache_keeps_open_intervals_stacks_not_every_stack():
    """A long run must not hold every stack ever drained (the user-space
    copy of the kernel's stack store), yet an interval open across many
    collections -- a thread asleep the whole time -- still has its stacks
    every time it is reported: the cache keeps two drains and the hashes
    the open intervals hold (StoreCache.rotate_pinned)."""
    from perfagent.stackprog import layout as L
    from perfagent.stackprog.store import HASH_KEY
    # Blocked in read until the collector runs, then asleep from then on.
    sleeper = subprocess.Popen(["sh", "-c", "read x; exec sleep 30"], stdin=subprocess.PIPE)
    try:
        with OffCpuCollector({sleeper.pid}) as col:
            sleeper.stdin.write(b"go\n")
            sleeper.stdin.flush()
            time.sleep(0.3)
            # A stack drained long ago that nothing holds any more.
            col._cache.add_native(HASH_KEY.pack(0xDEADBEEF), struct.pack("<II", 1, 0)
                                  + struct.pack("<Q", 0x401000) + bytes(L.STACK_SIZE - 16))
            seen = []
            for _ in range(6):
                got = [s for s in col.collect() if s.tgid == sleeper.pid]
                seen.append(got)
                time.sleep(0.1)
            assert col._cache.native(0xDEADBEEF) is None     # gone after two rotations
            held = len(col._cache)
    finally:
        sleeper.kill()
        sleeper.wait()
    # Reported (still open) in every collection, with its kernel stack each time.
    assert all(got and all(s.kernel_ips for s in got) for got in seen), seen
    assert held <= 8, held
