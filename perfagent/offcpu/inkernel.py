"""On-CPU samples counted in the kernel instead of written to ring buffers.

For ``--unwind fp`` the kernel walks the stacks anyway; writing every sample
(with its callchain of up to 127 addresses) into a perf ring buffer only for
the agent to parse it and count identical stacks costs the agent CPU in
proportion to the sample rate.  Here a BPF_PROG_TYPE_PERF_EVENT program
attached to each CPU's cpu-clock event (PERF_EVENT_IOC_SET_BPF) does the
counting: it asks bpf_get_stackid for the user and kernel stack ids and adds
one sample and the sample's period to a hash map keyed by (tgid, tid, user
stack id, kernel stack id).  It returns 0, which tells perf not to emit the
sample, so no ring buffer is mapped at all; user space only drains the map.

User stacks are frame-pointer walks (bpf_get_stackid, BPF_F_USER_STACK), as
with the kernel's callchains: code without frame pointers gives short or
wrong user stacks.  What is lost compared with ring-buffer sampling: the
time of each sample (the map only has sums), and PERF_RECORD_MMAP/COMM
events; the caller reads /proc/PID/maps and comm itself, before the
processes exit.

The kernel-side cost (the stack walks, now plus a hash-map update) is paid
in the interrupted tasks' context in both designs; what in-kernel counting
saves is the agent's work per sample.  tools/bench_inkernel.py measures it.
"""

from __future__ import annotations

import struct
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

from perfagent.bpf import syscall as sc
from perfagent.bpf.asm import DW, FP, R0, R1, R6, W, Program
from perfagent.bpf.btf import vmlinux
from perfagent.bpf.maps import HashMap, StackTraceMap
from perfagent.bpf.prog import PerfEvent, Prog
from perfagent.bpf.syscall import BPFError
from perfagent.offcpu.common import (
    STACK_KEY, STACK_SUMS, STACKID_FLAGS_KERNEL, STACKID_FLAGS_USER, TGID_KEY, TGID_VALUE, FollowsTgids,
    StackResolver, Stats, close_all, emit_accumulate, emit_stackid, emit_tgid_filter,
    make_tgid_map)
from perfagent.perf import attr as A
from perfagent.perf.sampler import online_cpus, raise_fd_limit

# The program's stack frame (offsets from r10).
OFF_KEY = -16              # struct stack_key
OFF_SUMS = -32             # struct stack_sums {1 sample, sample period}
OFF_SCRATCH = -40          # u32: a stats slot index

# struct bpf_perf_event_data {           (uapi linux/bpf_perf_event.h)
#     bpf_user_pt_regs_t regs;    0      (struct pt_regs on x86-64: 168 bytes)
#     __u64 sample_period;        sizeof(regs)
#     __u64 addr;
# };
# The offset comes from BTF when the struct is there; otherwise from the
# size of bpf_user_pt_regs_t; 168 (x86-64) as the last resort.
_X86_64_PT_REGS_SIZE = 168

DEFAULT_MAX_ENTRIES = 32768
# A stack map entry holds 127 u64 slots whatever the depth: ~1 KiB each, so
# 32768 entries pin ~33 MB of kernel memory.  Fewer would save memory but
# lose more stacks to bucket collisions (-EEXIST; see StackResolver), about
# n^2 / (2 * entries) of n distinct stacks: ~12 of 900 here.
DEFAULT_STACK_ENTRIES = 32768
# Live followed processes at once (exited ones are removed from the map).
DEFAULT_MAX_TGIDS = 65536
# collect_if_full() drains when the map is this full.
NEAR_FULL = 0.5


class OnCpuStack(NamedTuple):
    """Samples of one thread at one (user stack, kernel stack); ips leaf first."""

    tgid: int
    tid: int
    user_ips: Tuple[int, ...]
    kernel_ips: Tuple[int, ...]
    samples: int
    period_ns: int   # sum of the samples' periods: CPU time at this stack


def sample_period_offset() -> int:
    """offsetof(struct bpf_perf_event_data, sample_period) on this kernel."""
    try:
        btf = vmlinux()
    except (BPFError, OSError):
        return _X86_64_PT_REGS_SIZE
    try:
        return btf.member("bpf_perf_event_data", "sample_period").offset
    except BPFError:
        pass
    try:
        return btf.size_of(btf.find("bpf_user_pt_regs_t"))
    except BPFError:
        return _X86_64_PT_REGS_SIZE


def build_program(counts: HashMap, stacks: StackTraceMap, tgids: Optional[HashMap],
                  stats: Stats, period_off: int) -> Program:
    """Per sample: counts[{tgid, tid, ustack, kstack}] += {1, ctx->sample_period}."""
    p = Program("oncpu_count")
    ctx = R6
    p.mov(ctx, R1)                                # struct bpf_perf_event_data *
    p.call("get_current_pid_tgid")                # the sampled thread: tgid << 32 | tid
    p.stx(W, FP, R0, OFF_KEY + 4)                 # key.tid
    p.rsh(R0, 32)
    p.stx(W, FP, R0, OFF_KEY + 0)                 # key.tgid
    emit_tgid_filter(p, tgids, OFF_KEY + 0, "out")

    emit_stackid(p, ctx, stacks, STACKID_FLAGS_USER)
    p.stx(W, FP, R0, OFF_KEY + 8)                 # key.ustack
    emit_stackid(p, ctx, stacks, STACKID_FLAGS_KERNEL)
    p.stx(W, FP, R0, OFF_KEY + 12)                # key.kstack

    p.st(DW, FP, OFF_SUMS + 0, 1)                 # sums.a = one sample
    p.copy_mem(DW, FP, OFF_SUMS + 8, ctx, period_off)  # sums.b = ctx->sample_period
    emit_accumulate(p, counts, OFF_KEY, OFF_SUMS, stats.map, OFF_SCRATCH, "count")

    p.label("out")
    p.mov(R0, 0)                                  # 0: perf emits no sample record
    p.exit()
    return p


class InKernelSampler(FollowsTgids):
    """cpu-clock sampling at ``sample_rate`` Hz on every online CPU, counted
    per stack in the kernel.

    ``tgids`` None samples every process (like ``-a``); a set limits the
    counting to those processes (the events still fire on every CPU, the
    program ignores other threads), and ``add_tgid`` adds one while running.
    Call ``collect_if_full()`` now and then (cheap: two map lookups) or
    ``collect()`` periodically, and ``collect()`` once after ``stop()``.
    """

    def __init__(self, sample_rate: int, tgids: Optional[Set[int]] = None,
                 max_entries: int = DEFAULT_MAX_ENTRIES,
                 stack_entries: int = DEFAULT_STACK_ENTRIES,
                 max_tgids: int = DEFAULT_MAX_TGIDS) -> None:
        self.sample_rate = sample_rate
        self._initial_tgids = None if tgids is None else set(tgids)
        self.max_entries = max_entries
        self.stack_entries = stack_entries
        self.max_tgids = max(max_tgids, len(self._initial_tgids or ()))
        self.cpus = online_cpus()
        self._tgids: Optional[HashMap] = None
        self._counts: Optional[HashMap] = None
        self._stacks: Optional[StackTraceMap] = None
        self._stats: Optional[Stats] = None
        self._prog: Optional[Prog] = None
        self._events: List[PerfEvent] = []
        self._resolver: Optional[StackResolver] = None
        self._pending: List[OnCpuStack] = []
        self._drops = 0
        self._running = False

    def _attr(self) -> bytes:
        flags = A.attr_flags(disabled=True, freq=True, exclude_hv=True)
        # No sample_type bits: the program reads what it needs from the
        # context, and nothing is ever written to a ring buffer.
        return A.pack_attr(A.PERF_TYPE_SOFTWARE, A.PERF_COUNT_SW_CPU_CLOCK,
                           self.sample_rate, 0, flags)

    def start(self) -> None:
        if self._running:
            return
        try:
            raise_fd_limit()
            self._tgids = make_tgid_map(self._initial_tgids, self.max_tgids)
            self._counts = HashMap(STACK_KEY.size, STACK_SUMS.size, self.max_entries,
                                   name="oncpu_counts")
            self._stacks = StackTraceMap(self.stack_entries, name="oncpu_stacks")
            self._stats = Stats()
            self._resolver = StackResolver(self._stacks)
            prog = build_program(self._counts, self._stacks, self._tgids, self._stats,
                                 sample_period_offset())
            self._prog = prog.load(sc.BPF_PROG_TYPE_PERF_EVENT)
            attr = self._attr()
            for cpu in self.cpus:
                ev = PerfEvent(attr, -1, cpu)
                self._events.append(ev)
                ev.set_bpf(self._prog)
            for ev in self._events:
                ev.enable()
        except BaseException:
            self._close()
            raise
        self._running = True


    def collect_if_full(self, fraction: float = NEAR_FULL) -> List[OnCpuStack]:
        """``collect()`` when the count map is ``fraction`` full, else []."""
        if self._running and self.pending_entries() >= fraction * self.max_entries:
            return self._gather()
        return []

    def pending_entries(self) -> int:
        return self._stats.pending() if self._stats is not None else 0

    @property
    def dropped(self) -> int:
        """Samples lost because the count map was full."""
        if self._stats is not None:
            self._drops = self._stats.drops
        return self._drops

    @property
    def lost_stacks(self) -> int:
        return self._resolver.lost if self._resolver else 0

    @property
    def prog_ids(self) -> List[int]:
        return [self._prog.id] if self._prog is not None else []

    @property
    def map_ids(self) -> List[int]:
        maps = [self._tgids, self._counts, self._stacks,
                self._stats.map if self._stats is not None else None]
        return [m.id for m in maps if m is not None]

    def stop(self) -> None:
        if not self._running:
            self._close()
            return
        try:
            # Closing the events detaches the program: the maps are then final.
            close_all(self._events)
            self._events = []
            self._pending.extend(self._gather())
        finally:
            self._running = False
            self._close()

    def _close(self) -> None:
        objs = list(self._events) + [self._prog, self._counts, self._stacks, self._tgids,
                                     self._stats]
        self._events = []
        self._prog = None
        self._counts = self._stacks = self._tgids = None
        self._stats = None
        close_all(objs)

    def _gather(self) -> List[OnCpuStack]:
        assert self._counts is not None and self._stats is not None
        assert self._resolver is not None
        self._drops = self._stats.drops
        self._stats.before_drain()
        sums: Dict[Tuple[int, int, int, int], List[int]] = {}
        for k, v in self._counts.drain():
            n, period = STACK_SUMS.unpack(v)
            key = STACK_KEY.unpack(k)
            s = sums.get(key)
            if s is None:
                sums[key] = [n, period]
            else:   # the fallback drain may see a key twice
                s[0] += n
                s[1] += period
        resolve = self._resolver.resolve
        return [OnCpuStack(tgid, tid, resolve(us), resolve(ks), n, period)
                for (tgid, tid, us, ks), (n, period) in sums.items()]
