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

User stacks come in one of two ways:

* ``copy_stack=0``: bpf_get_stackid with BPF_F_USER_STACK, which walks frame
  pointers from the user registers saved at kernel entry.  Code built
  without frame pointers gives short or wrong user stacks; in particular a
  libc system-call wrapper that does not set up a frame hides its caller
  (the walk continues from the caller's caller), and CPython built without
  frame pointers (every distribution's) hides every Python function.
* ``copy_stack=N``: the program also copies the thread's user registers
  (bpf_task_pt_regs: what the thread's entry into the kernel saved) and N
  bytes and a little more of its user stack from sp (bpf_probe_read_user,
  a page at a time, stopping at the first page that cannot be read without
  faulting) into a BPF ring buffer, for user space to unwind with the
  binaries' DWARF CFI exactly like an on-CPU sample (perfagent.unwind).
  The episode's end then goes to the ring too, as its own record, rather
  than into the count map, and user space pairs the two by (tid, episode
  start).  When the ring is full the episode falls back to the
  frame-pointer stack id, counted in ``copies_dropped``; kernel threads
  (no user memory) never copy.

Kernel stacks are always right.

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
from perfagent.bpf.maps import ArrayMap, HashMap, RingBuf, StackTraceMap, possible_cpus
from perfagent.bpf.prog import Link, Prog
from perfagent.bpf.syscall import BPFError
from perfagent.offcpu.common import (
    STACK_KEY, STACK_SUMS, STACKID_FLAGS_KERNEL, STACKID_FLAGS_USER, STAT_COPY_DROPS, TGID_KEY,
    TGID_VALUE, FollowsTgids, StackResolver, Stats, close_all, emit_accumulate, emit_bump,
    emit_stackid, emit_tgid_filter, make_tgid_map, thread_alive)

# include/linux/sched.h: the task states the program tests.
TASK_RUNNING = 0x0000
TASK_DEAD = 0x0080

# The open interval of a blocked thread, keyed by its tid (u32):
# struct blocked {
#     __u64 since;       0   bpf_ktime_get_ns() when it switched out (moved
#                            forward when user space credits an open interval)
#     __u32 tgid;        8
#     __s32 ustack;      12  user stack id (or -errno)
#     __s32 kstack;      16  kernel stack id (or -errno)
#     __u32 copied;      20  1 if the ring holds this episode's stack copy
#     __u64 episode;     24  the original ``since``: names the episode
# };                     32
BLOCKED = struct.Struct("<QIiiIQ")
TID_KEY = struct.Struct("<I")

# The ring buffer's records (copy_stack > 0), told apart by their first u32.
RECORD_STACK = 1
RECORD_END = 2
# A stack copy, built in the CPU's slot of the scratch array and sent with
# bpf_ringbuf_output (its size: the header and the bytes copied):
# struct stack_copy {
#     __u32 kind;        0   RECORD_STACK
#     __u32 tid;         4
#     __u32 tgid;        8
#     __u32 size;        12  bytes of stack copied, from regs.sp upward
#     __u64 episode;     16
#     __u64 regs[8];     24  user bx, bp, sp, ip, r12-r15 (arch UNWIND_PT_REGS)
#     __u8  stack[];     88
# };
COPY_HDR = struct.Struct("<IIIIQ8Q")
COPY_REGS_OFF = 24
# The end of an episode whose stack was copied:
# struct episode_end {
#     __u32 kind;        0   RECORD_END
#     __u32 tid;         4
#     __u32 tgid;        8
#     __s32 kstack;      12
#     __u64 episode;     16
#     __u64 blocked_ns;  24  since the (possibly moved) ``since``
# };                     32
EPISODE_END = struct.Struct("<IIIiQQ")
RECORD_KIND = struct.Struct("<I")

# The program's stack frame (offsets from r10).
OFF_BLOCKED = -32          # struct blocked being built for prev
OFF_TID = -40              # u32 tid: the key into the blocked map
OFF_KEY = -56              # struct stack_key for next
OFF_SUMS = -72             # struct stack_sums {blocked ns, 1}
OFF_SCRATCH = -80          # u32: a stats slot index / the CPU number
OFF_END = -112             # struct episode_end for next
assert OFF_BLOCKED + BLOCKED.size == 0
assert OFF_KEY + STACK_KEY.size <= OFF_TID
assert OFF_SUMS + STACK_SUMS.size <= OFF_KEY
assert OFF_END + EPISODE_END.size <= OFF_SCRATCH

PAGE_SIZE = 4096           # bpf_probe_read_user copies one page per call
DEFAULT_RING_BYTES = 8 << 20

DEFAULT_MAX_ENTRIES = 16384     # distinct (thread, stack) pairs between collects
DEFAULT_MAX_THREADS = 32768     # threads blocked at once
DEFAULT_STACK_ENTRIES = 16384   # distinct stacks over the whole capture
# Live followed processes at once (exited ones are removed from the map).
DEFAULT_MAX_TGIDS = 65536


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
    # With copy_stack: the episode's user registers and stack, to unwind
    # (``user_ips`` is then empty).  One object per episode: several
    # entries (credits of an open interval, then its end) share it.
    copy: Optional["StackCopy"] = None


class StackCopy:
    """One episode's user registers and stack copy (from sp upward).

    ``user_ips`` is for the consumer: it unwinds once, stores the result
    here and drops ``stack`` (tens of KiB) with ``unwound()``.
    """

    __slots__ = ("regs", "stack", "user_ips")

    def __init__(self, regs: Tuple[int, ...], stack: bytes) -> None:
        self.regs = regs
        self.stack = stack
        self.user_ips: Optional[Tuple[int, ...]] = None

    def unwound(self, user_ips: Tuple[int, ...]) -> None:
        self.user_ips = user_ips
        self.stack = b""


class _CopyArgs(NamedTuple):
    """What the stack-copying part of the program needs (copy_stack > 0)."""

    ring: RingBuf
    scratch: ArrayMap         # one slot per CPU: the record being built
    pages: int                # page-sized bpf_probe_read_user calls at most
    mm_off: int               # offsetof(task_struct, mm): NULL for kernel threads
    regs_off: Tuple[int, ...]  # offsetof(pt_regs, <arch UNWIND_PT_REGS>)


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
                  stacks: StackTraceMap, tgids: Optional[HashMap], stats: Stats,
                  copy: Optional[_CopyArgs] = None) -> Program:
    """The sched_switch program (see the module docstring for what it does)."""
    p = Program("offcpu")
    ctx, task, entry, delta = R6, R7, R8, R9
    copied = R7                                  # switch-in: after next->pid is read
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
    p.st(W, FP, OFF_BLOCKED + 20, 0)             # blocked.copied = 0
    p.copy_mem(DW, FP, OFF_BLOCKED + 24, FP, OFF_BLOCKED + 0)  # blocked.episode = since
    if copy is not None:
        emit_stack_copy(p, copy, stats)          # blocked.copied = 1 if it reached the ring
    p.ld_map_fd(R1, blocked)
    p.mov(R2, FP).add(R2, OFF_TID)
    p.mov(R3, FP).add(R3, OFF_BLOCKED)
    p.mov(R4, sc.BPF_ANY)
    p.call("map_update_elem")                    # blocked[tid] = {now, tgid, stacks}

    # -- next switches in: was it blocked? -----------------------------------
    p.label("switch_in")
    p.ldx(DW, task, ctx, 8 * args.next)
    p.copy_mem(W, FP, OFF_TID, task, args.pid_off)  # tid = next->pid (a BTF pointer: direct load)
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
    p.copy_mem(W, FP, OFF_KEY + 0, entry, 8)     # key.tgid = blocked.tgid
    p.copy_mem(W, FP, OFF_KEY + 4, FP, OFF_TID)  # key.tid
    p.copy_mem(W, FP, OFF_KEY + 8, entry, 12)    # key.ustack
    p.copy_mem(W, FP, OFF_KEY + 12, entry, 16)   # key.kstack
    if copy is not None:
        # Everything is read before the delete: a deleted element of a
        # preallocated hash map may be reused by another CPU at once.
        p.st(W, FP, OFF_END + 0, RECORD_END)
        p.copy_mem(W, FP, OFF_END + 4, FP, OFF_TID)      # end.tid
        p.copy_mem(W, FP, OFF_END + 8, entry, 8)         # end.tgid
        p.copy_mem(W, FP, OFF_END + 12, entry, 16)       # end.kstack
        p.copy_mem(DW, FP, OFF_END + 16, entry, 24)      # end.episode
        p.stx(DW, FP, delta, OFF_END + 24)               # end.blocked_ns
        p.ldx(W, copied, entry, 20)

    p.ld_map_fd(R1, blocked)
    p.mov(R2, FP).add(R2, OFF_TID)
    p.call("map_delete_elem")                    # the interval is closed
    p.jsle(delta, 0, "out")                      # cannot happen; never add a negative
    if copy is not None:
        # Its stack is in the ring: so goes its end, for user space to pair.
        p.jeq(copied, 0, "aggregate")
        p.ld_map_fd(R1, copy.ring)
        p.mov(R2, FP).add(R2, OFF_END)
        p.mov(R3, EPISODE_END.size)
        p.mov(R4, sc.BPF_RB_NO_WAKEUP)
        p.call("ringbuf_output")
        p.jeq(R0, 0, "out")
        emit_bump(p, stats.map, STAT_COPY_DROPS, OFF_SCRATCH, "end_dropped")
        p.label("aggregate")                     # ... else with the frame-pointer stack
    emit_accumulate(p, counts, OFF_KEY, OFF_SUMS, stats.map, OFF_SCRATCH, "count")

    p.label("out")
    p.mov(R0, 0)
    p.exit()
    return p


def emit_stack_copy(p: Program, copy: _CopyArgs, stats: Stats) -> None:
    """Send the current thread's user registers and stack to the ring.

    Runs at switch-out, in the thread's own context (its page tables are
    loaded), after the blocked record on the stack has tgid, tid and since.
    The copy starts at the user sp: first the rest of sp's page, then whole
    pages, each with one bpf_probe_read_user, stopping at the first page
    that cannot be read without a page fault (the top of the stack, a page
    swapped out); what was read is sent.  Nothing is sent for a kernel
    thread (no mm), or when not even the first page could be read.  The
    record is built in this CPU's slot of a scratch array (the BPF stack
    has 512 bytes): the program runs with preemption off, so no other
    program uses the slot meanwhile.  Clobbers r0-r5 and r7-r9.
    """
    regs, buf, sp, size = R7, R8, R9, R7
    stack_off = COPY_HDR.size
    p.call("get_current_task_btf")
    p.mov(R7, R0)
    p.ldx(DW, R1, R7, copy.mm_off)
    p.jeq(R1, 0, "copy_done")                    # a kernel thread: no user stack
    p.mov(R1, R7)
    p.call("task_pt_regs")                       # the user registers saved at kernel entry
    p.mov(regs, R0)
    p.call("get_smp_processor_id")
    p.stx(W, FP, R0, OFF_SCRATCH)
    p.ld_map_fd(R1, copy.scratch)
    p.mov(R2, FP).add(R2, OFF_SCRATCH)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, "copy_done")
    p.mov(buf, R0)

    p.st(W, buf, 0, RECORD_STACK)                # copy.kind
    p.copy_mem(W, buf, 4, FP, OFF_TID)           # copy.tid
    p.copy_mem(W, buf, 8, FP, OFF_BLOCKED + 8)   # copy.tgid
    p.copy_mem(DW, buf, 16, FP, OFF_BLOCKED + 0)  # copy.episode
    for i, off in enumerate(copy.regs_off):
        # copy.regs[i] (pt_regs is a BTF pointer: direct loads)
        p.copy_mem(DW, buf, COPY_REGS_OFF + 8 * i, regs, off)
    p.ldx(DW, sp, regs, copy.regs_off[2])        # regs is dead from here: size reuses r7

    # First piece: from sp to the end of its page (1..PAGE_SIZE bytes).
    p.mov(R1, sp).and_(R1, PAGE_SIZE - 1)
    p.mov(size, PAGE_SIZE).sub(size, R1)
    p.mov(R1, buf).add(R1, stack_off)
    p.mov(R2, size)
    p.mov(R3, sp)
    p.call("probe_read_user")
    p.jne(R0, 0, "copy_done")                    # not even sp's page: no copy
    for k in range(1, copy.pages):
        p.mov(R1, buf).add(R1, stack_off).add(R1, size)
        p.mov(R2, PAGE_SIZE)
        p.mov(R3, sp).add(R3, size)
        p.call("probe_read_user")
        p.jne(R0, 0, "copy_send")
        p.add(size, PAGE_SIZE)

    p.label("copy_send")
    p.stx(W, buf, size, 12)                      # copy.size
    p.ld_map_fd(R1, copy.ring)
    p.mov(R2, buf)
    p.mov(R3, size).add(R3, stack_off)
    p.mov(R4, sc.BPF_RB_NO_WAKEUP)
    p.call("ringbuf_output")
    p.jne(R0, 0, "copy_dropped")
    p.st(W, FP, OFF_BLOCKED + 20, 1)             # blocked.copied = 1
    p.ja("copy_done")
    p.label("copy_dropped")                      # the ring is full
    emit_bump(p, stats.map, STAT_COPY_DROPS, OFF_SCRATCH, "copy_dropped")
    p.label("copy_done")


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

    ``copy_stack`` > 0 copies that many bytes (at least) of each episode's
    user stack, with its registers, for a DWARF unwind (see the module
    docstring); the ring they travel in holds ``ring_bytes`` and must be
    drained with ``drain_copies()`` often (every 100 ms or so), not only by
    ``collect()``.  ``on_copy(tgid, copy)`` is called for each copy as it is
    read, so the consumer can unwind it at once and free the bytes
    (``StackCopy.unwound``): a thread blocked for minutes would otherwise
    keep its copy that long.  Entries carrying a copy come one per episode
    (and one per credit of a still open one), not aggregated.
    """

    def __init__(self, tgids: Optional[Set[int]] = None,
                 max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_threads: int = DEFAULT_MAX_THREADS,
                 stack_entries: int = DEFAULT_STACK_ENTRIES,
                 max_tgids: int = DEFAULT_MAX_TGIDS,
                 copy_stack: int = 0,
                 ring_bytes: int = DEFAULT_RING_BYTES,
                 on_copy: Optional[Callable[[int, "StackCopy"], None]] = None) -> None:
        self._initial_tgids = None if tgids is None else set(tgids)
        self.max_entries = max_entries
        self.max_threads = max_threads
        self.stack_entries = stack_entries
        self.max_tgids = max(max_tgids, len(self._initial_tgids or ()))
        self.copy_stack = copy_stack
        self.ring_bytes = ring_bytes
        self.on_copy = on_copy
        self._ring: Optional[RingBuf] = None
        self._scratch: Optional[ArrayMap] = None
        # (tid, episode) -> its stack copy, until the episode's end is read
        self._copies: Dict[Tuple[int, int], StackCopy] = {}
        self._orphans: Set[Tuple[int, int]] = set()
        self.copies = 0            # stack copies read from the ring
        self.copies_missing = 0    # episode ends whose copy was not found
        self._copy_drops = 0
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
            copy = self._copy_args() if self.copy_stack > 0 else None
            prog = build_program(args, self._blocked, self._counts, self._stacks, self._tgids,
                                 self._stats, copy)
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

    def _copy_args(self) -> _CopyArgs:
        from perfagent.arch import current
        fields = getattr(current(), "UNWIND_PT_REGS", None)
        if fields is None:
            raise BPFError("off-CPU stack copies are not supported on %s yet" % current().NAME,
                           errno.EOPNOTSUPP)
        btf = vmlinux()
        pages = (self.copy_stack - 1) // PAGE_SIZE + 2   # at least copy_stack bytes from sp
        self._ring = RingBuf(self.ring_bytes, name="offcpu_copies")
        self._scratch = ArrayMap(COPY_HDR.size + pages * PAGE_SIZE, possible_cpus(),
                                 name="offcpu_scratch")
        return _CopyArgs(ring=self._ring, scratch=self._scratch, pages=pages,
                         mm_off=btf.member("task_struct", "mm").offset,
                         regs_off=tuple(btf.member("pt_regs", f).offset for f in fields))

    def _close(self) -> None:
        objs = [self._link, self._prog, self._counts, self._blocked, self._stacks, self._tgids,
                self._stats, self._ring, self._scratch]
        if self._stats is not None:
            self._copy_drops = self._stats.read(STAT_COPY_DROPS)
        self._link = self._prog = None
        self._counts = self._blocked = self._tgids = None
        self._stacks = None
        self._stats = None
        self._ring = self._scratch = None
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
    def copies_dropped(self) -> int:
        """Stack copies (or their episodes' ends) refused by a full ring: those
        episodes have the frame-pointer stack instead."""
        if self._stats is not None:
            self._copy_drops = self._stats.read(STAT_COPY_DROPS)
        return self._copy_drops

    @property
    def prog_ids(self) -> List[int]:
        return [self._prog.id] if self._prog is not None else []

    @property
    def map_ids(self) -> List[int]:
        maps = [self._tgids, self._blocked, self._counts, self._stacks,
                self._stats.map if self._stats is not None else None, self._ring, self._scratch]
        return [m.id for m in maps if m is not None]

    # -- draining -------------------------------------------------------------

    def drain_copies(self) -> List[OffCpuStack]:
        """Read the ring of stack copies (copy_stack > 0): the episodes that
        ended since the last call, one entry each.  Cheap when it is empty;
        call it every ~100 ms so the ring does not fill up."""
        if self._ring is None:
            return []
        assert self._resolver is not None
        out: List[OffCpuStack] = []
        copies = self._copies
        for rec in self._ring.consume():
            kind = RECORD_KIND.unpack_from(rec, 0)[0]
            if kind == RECORD_STACK:
                hdr = COPY_HDR.unpack_from(rec, 0)
                _kind, tid, tgid, size, episode = hdr[:5]
                copy = StackCopy(hdr[5:], rec[COPY_HDR.size:COPY_HDR.size + size])
                copies[(tid, episode)] = copy
                self.copies += 1
                if self.on_copy is not None:
                    self.on_copy(tgid, copy)
            elif kind == RECORD_END:
                _kind, tid, tgid, kstack, episode, blocked_ns = EPISODE_END.unpack_from(rec, 0)
                copy = copies.pop((tid, episode), None)
                if copy is None:
                    self.copies_missing += 1
                out.append(OffCpuStack(tgid, tid, (), self._resolver.resolve(kstack),
                                       blocked_ns, 1, copy))
        return out

    def _gather(self, final: bool = False) -> List[OffCpuStack]:
        assert self._blocked is not None and self._counts is not None
        assert self._resolver is not None
        sums: Dict[Tuple[int, int, int, int], List[int]] = {}
        resolve = self._resolver.resolve

        def add(key: Tuple[int, int, int, int], ns: int, n: int) -> None:
            s = sums.get(key)
            if s is None:
                sums[key] = [ns, n]
            else:
                s[0] += ns
                s[1] += n

        # The blocked threads are listed before the ring is read: an episode
        # that is in neither (its end read, or not yet begun) leaves no copy
        # behind except by a lost end record (see _forget_orphans).
        open_tids = list(self._blocked.keys())
        out = self.drain_copies()
        live: Set[Tuple[int, int]] = set()

        # Close the open intervals at "now".
        for raw_tid in open_tids:
            now = _monotonic_ns()
            raw = self._blocked.lookup(raw_tid)
            if raw is None:
                continue                         # woke up meanwhile: the kernel counted it
            since, tgid, ustack, kstack, copied, episode = BLOCKED.unpack(raw)
            tid = TID_KEY.unpack(raw_tid)[0]
            if since >= now:
                continue                         # a record made after our clock read
            if not thread_alive(tgid, tid):
                self._blocked.delete(raw_tid)    # gone without a switch back in
                continue
            copy = None
            if copied:
                live.add((tid, episode))
                copy = self._copies.get((tid, episode))
                if copy is None and not final:
                    continue                     # its copy is still in the ring: next time
            key = (tgid, tid, ustack, kstack)
            if final:
                self._blocked.delete(raw_tid)
                if copy is not None:
                    out.append(OffCpuStack(tgid, tid, (), resolve(kstack), now - since, 1, copy))
                else:
                    add(key, now - since, 1)
                continue
            try:
                self._blocked.update(raw_tid, BLOCKED.pack(now, tgid, ustack, kstack, copied, episode),
                                     sc.BPF_EXIST)
            except BPFError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                continue                         # closed by the program meanwhile
            if copy is not None:
                out.append(OffCpuStack(tgid, tid, (), resolve(kstack), now - since, 0, copy))
            else:
                add(key, now - since, 0)
        self._forget_orphans(live, final)

        assert self._stats is not None
        self._drops = self._stats.drops
        self._stats.before_drain()
        for k, v in self._counts.drain():
            ns, n = STACK_SUMS.unpack(v)
            add(STACK_KEY.unpack(k), ns, n)

        out.extend(OffCpuStack(tgid, tid, resolve(us), resolve(ks), ns, n)
                   for (tgid, tid, us, ks), (ns, n) in sums.items())
        return out

    def _forget_orphans(self, live: Set[Tuple[int, int]], final: bool) -> None:
        """Drop copies whose episode ended without an end record (the ring was
        full, so the end went to the count map; or the thread died).

        A copy neither blocked nor ended now may just be too new (its
        episode began after the blocked list was read): it is dropped only
        when it is still an orphan at the next collect().
        """
        if final:
            self._copies.clear()
            self._orphans = set()
            return
        orphans = {k for k in self._copies if k not in live}
        for k in orphans & self._orphans:
            del self._copies[k]
        self._orphans = orphans - self._orphans
