"""Off-CPU time: how long threads spend blocked, and where they blocked.

A tp_btf program on sched_switch does the bookkeeping in the kernel:

* When a followed thread (``prev``) leaves the CPU *because it blocked*, it
  records the time and the thread's user and kernel stack ids under its tid.
  sched_switch runs in ``prev``'s context (``current`` is still ``prev``),
  so bpf_get_stackid sees exactly the stacks that led into the scheduler.
* When a thread (``next``) comes back onto a CPU and has such a record, the
  blocked nanoseconds and one episode are added to a hash map keyed by
  (tgid, tid, user stack id, kernel stack id), and the record is deleted.

"Blocked" means the scheduler is switching the thread out with a state other
than TASK_RUNNING, and not by preemption: a thread that is preempted (or
yields) stays runnable, and the time it then spends waiting in the run queue
is left out on purpose.  That is CPU contention, not blocking, and counting
it would make every busy thread on a loaded machine look "off-CPU".  An
interval that did start with blocking ends when the thread runs again, not
when it is woken, so it includes the run-queue wait after the wakeup (on a
loaded machine, part of a 10 ms sleep is waiting for a CPU).  Dying threads
(TASK_DEAD) are not recorded: they never come back.

User stacks come from bpf_get_stackid with BPF_F_USER_STACK, which walks
frame pointers from the user registers saved at kernel entry.  Code built
without frame pointers gives short or wrong user stacks; in particular a
libc system-call wrapper that does not set up a frame hides its caller (the
walk continues from the caller's caller).  Kernel stacks are always right.

Intervals that are still open (threads still blocked) when ``collect()`` or
``stop()`` runs are closed at that moment from user space, using
CLOCK_MONOTONIC, the clock bpf_ktime_get_ns reads.  A periodic ``collect()``
credits the time so far and moves the record's start to "now" in the
kernel's map (BPF_EXIST, so a record the program has closed meanwhile is
left alone), counting the episode only once, when it really ends or at
``stop()``.  One race remains: if the thread wakes, blocks again and gets a
new record between our lookup and update (microseconds), the new record's
start is moved back to our "now" and that sliver is counted twice.
"""

from __future__ import annotations

import errno
import struct
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

from perfagent.bpf import syscall as sc
from perfagent.bpf.asm import DW, FP, R0, R1, R2, R3, R4, R6, R7, R8, R9, W, Program
from perfagent.bpf.btf import vmlinux
from perfagent.bpf.maps import HashMap, StackTraceMap
from perfagent.bpf.prog import Link, Prog
from perfagent.bpf.syscall import BPFError
from perfagent.offcpu.common import (
    STACK_KEY, STACK_SUMS, STACKID_FLAGS_KERNEL, STACKID_FLAGS_USER, TGID_KEY, TGID_VALUE, FollowsTgids,
    StackResolver, Stats, close_all, emit_accumulate, emit_stackid, emit_tgid_filter,
    make_tgid_map, thread_alive)

# include/linux/sched.h: the task states the program tests.
TASK_RUNNING = 0x0000
TASK_DEAD = 0x0080

# The open interval of a blocked thread, keyed by its tid (u32):
# struct blocked {
#     __u64 since;       0   bpf_ktime_get_ns() when it switched out
#     __u32 tgid;        8
#     __s32 ustack;      12  user stack id (or -errno)
#     __s32 kstack;      16  kernel stack id (or -errno)
#     __u32 pad;         20
# };                     24
BLOCKED = struct.Struct("<QIiiI")
TID_KEY = struct.Struct("<I")

# The program's stack frame (offsets from r10).
OFF_BLOCKED = -24          # struct blocked being built for prev
OFF_TID = -32              # u32 tid: the key into the blocked map
OFF_KEY = -48              # struct stack_key for next
OFF_SUMS = -64             # struct stack_sums {blocked ns, 1}
OFF_SCRATCH = -72          # u32: a stats slot index
assert OFF_BLOCKED + BLOCKED.size == 0
assert OFF_KEY + STACK_KEY.size <= OFF_TID
assert OFF_SUMS + STACK_SUMS.size <= OFF_KEY

DEFAULT_MAX_ENTRIES = 16384     # distinct (thread, stack) pairs between collects
DEFAULT_MAX_THREADS = 32768     # threads blocked at once
DEFAULT_STACK_ENTRIES = 16384   # distinct stacks over the whole capture
DEFAULT_MAX_TGIDS = 4096


class OffCpuStack(NamedTuple):
    """Blocked time of one thread at one (user stack, kernel stack).

    Instruction pointers are leaf first; an empty tuple means the stack was
    not available (see ``OffCpuCollector.lost_stacks``).  The kernel stack
    starts inside the BPF program: see ``strip_tracing_frames``.
    """

    tgid: int
    tid: int
    user_ips: Tuple[int, ...]
    kernel_ips: Tuple[int, ...]
    blocked_ns: int
    count: int      # blocking episodes that ended (or were closed at stop())


class _SchedSwitchArgs(NamedTuple):
    """Where the program finds what it needs on this kernel (from BTF)."""

    preempt: int              # ctx index of ``bool preempt``
    prev: int                 # ctx index of ``struct task_struct *prev``
    next: int                 # ctx index of ``struct task_struct *next``
    prev_state: Optional[int]  # ctx index of ``unsigned int prev_state`` (5.18+)
    state_off: int            # offsetof(task_struct, __state) (``state`` before 5.14)
    state_size: int
    pid_off: int              # offsetof(task_struct, pid): the thread id
    attach_btf_id: int


def _sched_switch_args() -> _SchedSwitchArgs:
    btf = vmlinux()
    names = [a.name for a in btf.raw_tp_args("sched_switch")]

    def index(name: str, default: Optional[int]) -> Optional[int]:
        return names.index(name) if name in names else default

    state = btf.member_any("task_struct", "__state", "state")
    # Unnamed arguments (no __bpf_trace_sched_switch in BTF): the order has
    # been (preempt, prev, next[, prev_state]) since 4.x.
    return _SchedSwitchArgs(
        preempt=index("preempt", 0), prev=index("prev", 1), next=index("next", 2),
        prev_state=index("prev_state", 3 if len(names) >= 4 else None),
        state_off=state.offset, state_size=btf.member_size(state),
        pid_off=btf.member("task_struct", "pid").offset,
        attach_btf_id=btf.raw_tp_btf_id("sched_switch"))


def build_program(args: _SchedSwitchArgs, blocked: HashMap, counts: HashMap,
                  stacks: StackTraceMap, tgids: Optional[HashMap], stats: Stats) -> Program:
    """The sched_switch program (see the module docstring for what it does)."""
    p = Program("offcpu")
    ctx, task, entry, delta = R6, R7, R8, R9
    p.mov(ctx, R1)                               # ctx: u64 args[] of the tracepoint

    # -- prev switches out: did it block? ------------------------------------
    p.ldx(DW, R1, ctx, 8 * args.preempt)
    p.jne(R1, 0, "switch_in")                    # preempted: still runnable
    if args.prev_state is not None:
        # What __schedule decided (a pending signal has already turned a
        # sleep back into TASK_RUNNING here).
        p.ldx(DW, R1, ctx, 8 * args.prev_state)
    else:
        p.ldx(DW, task, ctx, 8 * args.prev)
        p.ldx(W if args.state_size == 4 else DW, R1, task, args.state_off)
    p.jeq(R1, TASK_RUNNING, "switch_in")         # yielded: still runnable
    p.jset(R1, TASK_DEAD, "switch_in")           # exiting: never comes back

    p.call("get_current_pid_tgid")               # current is prev: tgid << 32 | tid
    p.stx(W, FP, R0, OFF_TID)
    p.mov32(R1, R0)
    p.jeq(R1, 0, "switch_in")                    # the idle task (tid 0 on every CPU)
    p.rsh(R0, 32)
    p.stx(W, FP, R0, OFF_BLOCKED + 8)            # blocked.tgid
    emit_tgid_filter(p, tgids, OFF_BLOCKED + 8, "switch_in")

    p.call("ktime_get_ns")
    p.stx(DW, FP, R0, OFF_BLOCKED + 0)           # blocked.since = now
    emit_stackid(p, ctx, stacks, STACKID_FLAGS_USER)
    p.stx(W, FP, R0, OFF_BLOCKED + 12)           # blocked.ustack
    emit_stackid(p, ctx, stacks, STACKID_FLAGS_KERNEL)
    p.stx(W, FP, R0, OFF_BLOCKED + 16)           # blocked.kstack
    p.st(W, FP, OFF_BLOCKED + 20, 0)             # blocked.pad
    p.ld_map_fd(R1, blocked)
    p.mov(R2, FP).add(R2, OFF_TID)
    p.mov(R3, FP).add(R3, OFF_BLOCKED)
    p.mov(R4, sc.BPF_ANY)
    p.call("map_update_elem")                    # blocked[tid] = {now, tgid, stacks}

    # -- next switches in: was it blocked? -----------------------------------
    p.label("switch_in")
    p.ldx(DW, task, ctx, 8 * args.next)
    p.ldx(W, R1, task, args.pid_off)             # next->pid (a BTF pointer: direct load)
    p.stx(W, FP, R1, OFF_TID)
    p.ld_map_fd(R1, blocked)
    p.mov(R2, FP).add(R2, OFF_TID)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, "out")                          # not followed, or was runnable
    p.mov(entry, R0)

    p.call("ktime_get_ns")
    p.mov(delta, R0)
    p.ldx(DW, R1, entry, 0)
    p.sub(delta, R1)                             # delta = now - blocked.since
    p.stx(DW, FP, delta, OFF_SUMS + 0)           # sums.a = blocked ns
    p.st(DW, FP, OFF_SUMS + 8, 1)                # sums.b = one episode
    p.ldx(W, R1, entry, 8)
    p.stx(W, FP, R1, OFF_KEY + 0)                # key.tgid
    p.ldx(W, R1, FP, OFF_TID)
    p.stx(W, FP, R1, OFF_KEY + 4)                # key.tid
    p.ldx(W, R1, entry, 12)
    p.stx(W, FP, R1, OFF_KEY + 8)                # key.ustack
    p.ldx(W, R1, entry, 16)
    p.stx(W, FP, R1, OFF_KEY + 12)               # key.kstack

    p.ld_map_fd(R1, blocked)
    p.mov(R2, FP).add(R2, OFF_TID)
    p.call("map_delete_elem")                    # the interval is closed
    p.jsle(delta, 0, "out")                      # cannot happen; never add a negative
    emit_accumulate(p, counts, OFF_KEY, OFF_SUMS, stats.map, OFF_SCRATCH, "count")

    p.label("out")
    p.mov(R0, 0)
    p.exit()
    return p


SCHEDULER_ENTRY = "__schedule"


def strip_tracing_frames(kernel_ips: Sequence[int],
                         lookup: Callable[[int], Optional[str]]) -> Tuple[int, ...]:
    """``kernel_ips`` from __schedule on: without the program's own frames.

    A kernel stack taken at sched_switch starts with the BPF program and the
    tracepoint's dispatch (bpf_trace_run4 here; __bpf_trace_sched_switch and
    __traceiter_sched_switch on older kernels), which vary by kernel version,
    so they are cut by name at symbolization time rather than with a fixed
    skip count in the program.  ``lookup`` is a kallsyms lookup (e.g.
    perfagent.symbolize.kallsyms.KernelSymbols.lookup); a stack without
    __schedule (or without symbols) is returned whole.
    """
    for i, ip in enumerate(kernel_ips):
        name = lookup(ip)
        if name is not None and name.split(".")[0] == SCHEDULER_ENTRY:
            return tuple(kernel_ips[i:])
    return tuple(kernel_ips)


def _monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns()."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class OffCpuCollector(FollowsTgids):
    """Blocked time per thread and stack, from a sched_switch BPF program.

    ``tgids`` None follows every process; a set follows only threads of those
    processes, and ``add_tgid`` adds one (a child, a new pid) while running.
    Call ``collect()`` periodically (it drains the kernel's count map, which
    holds ``max_entries`` distinct (thread, stack) pairs: a full map drops
    episodes) and once more after ``stop()`` for the remainder.  ``stop()``
    closes every fd: nothing stays in the kernel.  Needs kernel BTF (tp_btf).
    """

    def __init__(self, tgids: Optional[Set[int]] = None,
                 max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_threads: int = DEFAULT_MAX_THREADS,
                 stack_entries: int = DEFAULT_STACK_ENTRIES,
                 max_tgids: int = DEFAULT_MAX_TGIDS) -> None:
        self._initial_tgids = None if tgids is None else set(tgids)
        self.max_entries = max_entries
        self.max_threads = max_threads
        self.stack_entries = stack_entries
        self.max_tgids = max(max_tgids, len(self._initial_tgids or ()))
        self._tgids: Optional[HashMap] = None
        self._blocked: Optional[HashMap] = None
        self._counts: Optional[HashMap] = None
        self._stacks: Optional[StackTraceMap] = None
        self._prog: Optional[Prog] = None
        self._link: Optional[Link] = None
        self._resolver: Optional[StackResolver] = None
        self._stats: Optional[Stats] = None
        self._drops = 0
        self._pending: List[OffCpuStack] = []
        self._running = False

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        if self._running:
            return
        try:
            args = _sched_switch_args()
            self._tgids = make_tgid_map(self._initial_tgids, self.max_tgids)
            self._blocked = HashMap(TID_KEY.size, BLOCKED.size, self.max_threads,
                                    name="offcpu_blocked")
            self._counts = HashMap(STACK_KEY.size, STACK_SUMS.size, self.max_entries,
                                   name="offcpu_counts")
            self._stacks = StackTraceMap(self.stack_entries, name="offcpu_stacks")
            self._resolver = StackResolver(self._stacks)
            self._stats = Stats()
            prog = build_program(args, self._blocked, self._counts, self._stacks, self._tgids,
                                 self._stats)
            self._prog = prog.load(sc.BPF_PROG_TYPE_TRACING,
                                   expected_attach_type=sc.BPF_TRACE_RAW_TP,
                                   attach_btf_id=args.attach_btf_id)
            self._link = self._prog.attach_tracing()
        except BaseException:
            self._close()
            raise
        self._running = True


    def stop(self) -> None:
        """Detach, close the open intervals, close every fd.  The remainder
        is returned by the next ``collect()``."""
        if not self._running:
            self._close()
            return
        try:
            # Detach first so that nothing changes the maps under the final walk.
            if self._link is not None:
                self._link.close()
            self._pending.extend(self._gather(final=True))
        finally:
            self._running = False
            self._close()

    def _close(self) -> None:
        objs = [self._link, self._prog, self._counts, self._blocked, self._stacks, self._tgids,
                self._stats]
        self._link = self._prog = None
        self._counts = self._blocked = self._tgids = None
        self._stacks = None
        self._stats = None
        close_all(objs)

    @property
    def lost_stacks(self) -> int:
        """Stack ids that could not be resolved (walk failed, map collision)."""
        return self._resolver.lost if self._resolver else 0

    @property
    def dropped(self) -> int:
        """Episodes lost because the count map was full (call collect() more often
        or raise max_entries)."""
        if self._stats is not None:
            self._drops = self._stats.drops
        return self._drops

    def pending_entries(self) -> int:
        """About how many entries the kernel's count map holds now: call
        ``collect()`` when this nears ``max_entries``."""
        return self._stats.pending() if self._stats is not None else 0

    @property
    def prog_ids(self) -> List[int]:
        return [self._prog.id] if self._prog is not None else []

    @property
    def map_ids(self) -> List[int]:
        maps = [self._tgids, self._blocked, self._counts, self._stacks,
                self._stats.map if self._stats is not None else None]
        return [m.id for m in maps if m is not None]

    # -- draining -------------------------------------------------------------

    def _gather(self, final: bool = False) -> List[OffCpuStack]:
        assert self._blocked is not None and self._counts is not None
        assert self._resolver is not None
        sums: Dict[Tuple[int, int, int, int], List[int]] = {}

        def add(key: Tuple[int, int, int, int], ns: int, n: int) -> None:
            s = sums.get(key)
            if s is None:
                sums[key] = [ns, n]
            else:
                s[0] += ns
                s[1] += n

        # Close the open intervals at "now".
        for raw_tid in list(self._blocked.keys()):
            now = _monotonic_ns()
            raw = self._blocked.lookup(raw_tid)
            if raw is None:
                continue                         # woke up meanwhile: the kernel counted it
            since, tgid, ustack, kstack, _pad = BLOCKED.unpack(raw)
            tid = TID_KEY.unpack(raw_tid)[0]
            if since >= now:
                continue                         # a record made after our clock read
            if not thread_alive(tgid, tid):
                self._blocked.delete(raw_tid)    # gone without a switch back in
                continue
            key = (tgid, tid, ustack, kstack)
            if final:
                self._blocked.delete(raw_tid)
                add(key, now - since, 1)
                continue
            try:
                self._blocked.update(raw_tid, BLOCKED.pack(now, tgid, ustack, kstack, 0),
                                     sc.BPF_EXIST)
            except BPFError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                continue                         # closed by the program meanwhile
            add(key, now - since, 0)

        assert self._stats is not None
        self._drops = self._stats.drops
        self._stats.before_drain()
        for k, v in self._counts.drain():
            ns, n = STACK_SUMS.unpack(v)
            add(STACK_KEY.unpack(k), ns, n)

        resolve = self._resolver.resolve
        return [OffCpuStack(tgid, tid, resolve(us), resolve(ks), ns, n)
                for (tgid, tid, us, ks), (ns, n) in sums.items()]
