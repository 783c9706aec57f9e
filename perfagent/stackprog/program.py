"""The two stack programs: on-CPU (perf event) and off-CPU (sched_switch).

Both are assembled from the emitters of :mod:`.capture`; what differs is
the context (a perf sample or a scheduler switch) and the accounting.

On-CPU, per sample of a followed thread:
  aggregate -- kernel and frame-pointer user stacks and the Python stack go
               to the stores; ``counts[{tgid, tid, khash, uhash, pyhash}] +=
               {1, sample period}``;
  record    -- header, kernel stack, user registers and stack copy and the
               Python stack go to the ring as one RECORD_SAMPLE.
  kunwind   -- as aggregate, with the user stack walked by the in-kernel
               DWARF walk (perfagent.stackprog.kunwind); a walk it leaves
               to user space is sent as record mode sends it.
  The program returns 0: perf writes nothing to its own ring buffer.

Off-CPU, at each switch of a followed thread that blocked (see
perfagent.offcpu.collector for what "blocked" means), the same capture is
taken at switch-out; the episode's start, tgid and hashes wait in
``blocked[tid]``; at switch-in the blocked time is added to ``counts``
(aggregate) or sent as an RECORD_END record that pairs with the episode's
RECORD_STACK record by (tid, episode start) -- never by time.
"""

from __future__ import annotations

import struct
from typing import Optional

from perfagent.records import NamedTuple
from perfagent.bpf import syscall as sc
from perfagent.bpf.asm import DW, FP, R0, R1, R2, R3, R4, R8, R9, W, Program
from perfagent.bpf.maps import ArrayMap, HashMap, RingBuf
from perfagent.stackprog.accounting import (
    STAT_COPY_DROPS, STAT_STORE_DROPS, ParentOffsets, Stats, emit_accumulate, emit_bump, emit_tgid_filter,
)
from perfagent.stackprog import capture as C
from perfagent.stackprog import kunwind as KU
from perfagent.stackprog.layout import (
    H_CPU, H_KIND, H_PERIOD, H_TGID, H_TID, H_TIME, KERNEL_OFF, PY_MAX_FRAMES, PYTHON_OFF,
    RECORD_END, RECORD_SAMPLE, RECORD_STACK, STACK_N_OFF, USER_OFF,
)

# struct count_key {
#     __u32 tgid;        0
#     __u32 tid;         4
#     __u64 khash;       8    kernel stack (0: none)
#     __u64 uhash;       16   frame-pointer user stack (0: none, or a copy was sent)
#     __u64 pyhash;      24   Python stack (0: none)
# };                     32
COUNT_KEY = struct.Struct("<IIQQQ")
# struct sums { __u64 a; __u64 b; }: on-CPU {samples, period ns}; off-CPU {blocked ns, episodes}
SUMS = struct.Struct("<QQ")

# The off-CPU program's open interval of a blocked thread, keyed by tid (u32):
# struct blocked {
#     __u64 since;       0   bpf_ktime_get_ns() at switch-out (moved forward
#                            when user space credits an open interval)
#     __u32 tgid;        8
#     __u32 copied;      12  1: the ring holds this episode's capture (RECORD_STACK)
#     __u64 khash;       16
#     __u64 uhash;       24
#     __u64 pyhash;      32
#     __u64 episode;     40  the original ``since``: names the episode
# };                     48
BLOCKED = struct.Struct("<QIIQQQQ")
TID_KEY = struct.Struct("<I")
# struct episode_end {
#     __u32 kind;        0   RECORD_END
#     __u32 tid;         4
#     __u32 tgid;        8
#     __u32 pad;         12
#     __u64 episode;     16
#     __u64 blocked_ns;  24
# };                     32
EPISODE_END = struct.Struct("<IIIIQQ")

# Stack frame (offsets from r10), shared by both programs.
OFF_KEY = -32              # struct count_key (its hashes double as the stores' key slots)
OFF_SUMS = -48             # struct sums
OFF_SLOT = -56             # u32: the CPU number / a stats slot index
OFF_TID = -64              # u32: the off-CPU program's key into blocked
OFF_BLOCKED = -112         # struct blocked being built for prev
OFF_END = -144             # struct episode_end for next
KEY_TGID, KEY_TID, KEY_KHASH, KEY_UHASH, KEY_PYHASH = (OFF_KEY + o for o in (0, 4, 8, 16, 24))
assert OFF_BLOCKED + BLOCKED.size <= OFF_TID and OFF_END + EPISODE_END.size <= OFF_BLOCKED

AGGREGATE = "aggregate"
RECORD = "record"
# The user stack walked in the kernel (perfagent.stackprog.kunwind) and
# aggregated; a walk left to user space is sent as a record.
KUNWIND = "kunwind"


class Maps(NamedTuple):
    """The maps a stack program uses (None where its mode needs none)."""

    scratch: ArrayMap                 # per-CPU capture slot (layout.scratch_size)
    stats: Stats
    tgids: Optional[HashMap]          # followed processes; None: every process
    counts: Optional[HashMap]         # aggregate mode (and off-CPU fallbacks)
    native: Optional[HashMap]         # native stack store
    python: Optional[HashMap]         # Python stack store
    ring: Optional[RingBuf]           # record mode
    follow: Optional[ParentOffsets] = None   # children of followed processes join the filter
    kunwind: Optional[object] = None         # KUNWIND mode: perfagent.stackprog.kunwind.KUnwindMaps


def _drop(p: Program, stats: Stats, slot: int):
    return lambda tag: emit_bump(p, stats.map, slot, OFF_SLOT, tag + "_bump")


def emit_capture(p: Program, maps: Maps, user_fp: bool, copy: Optional[C.CopySpec],
                 python_walk, tag: str) -> None:
    """The shared capture into this CPU's slot (r7 must point at it).

    Kernel stack always; the frame-pointer user stack when ``user_fp``;
    user registers and, with ``copy``, the stack bytes; the Python stack
    through ``python_walk(p, tag)`` (or none).
    """
    C.emit_get_stack(p, KERNEL_OFF, 0)
    if user_fp:
        C.emit_get_stack(p, USER_OFF, sc.BPF_F_USER_STACK)
    else:
        p.st(W, C.BUF, USER_OFF + STACK_N_OFF, 0)
    if copy is not None:
        C.emit_user_regs_and_copy(p, copy, True, tag + "_copy")
    if python_walk is not None:
        python_walk(p, tag + "_py")
    else:
        C.emit_empty_python(p)


def emit_hash_and_store(p: Program, maps: Maps, kernel: bool, user: bool, python: bool,
                        tag: str, loop: bool = False) -> None:
    """The count key's hashes of the captured parts, each part stored.
    With ``loop`` the hashes run through bpf_loop (their context in the
    sums' slots, written only afterwards; emit_hash_callbacks after the
    program's last exit)."""
    drop = _drop(p, maps.stats, STAT_STORE_DROPS)
    ctx = OFF_SUMS if loop else None
    for present, off, slot, name in ((kernel, KERNEL_OFF, KEY_KHASH, "k"), (user, USER_OFF, KEY_UHASH, "u")):
        if present:
            C.emit_native_hash(p, off, slot, "%s_%sh" % (tag, name), ctx)
            C.emit_store(p, maps.native, off, slot, drop, "%s_%ss" % (tag, name))
        else:
            p.st(DW, FP, slot, 0)
    if python:
        C.emit_python_hash(p, KEY_PYHASH, PY_MAX_FRAMES, tag + "_ph", ctx)
        C.emit_store(p, maps.python, PYTHON_OFF, KEY_PYHASH, drop, tag + "_ps")
    else:
        p.st(DW, FP, KEY_PYHASH, 0)


def _hash_loop(mode: str) -> bool:
    """Hash through bpf_loop: always in KUNWIND mode (its walk needs
    bpf_loop), else when the kernel has it."""
    return mode == KUNWIND or C.bpf_loop_supported()


def emit_hash_callbacks(p: Program, python: bool) -> None:
    """emit_hash_and_store's bpf_loop callbacks (after the last exit)."""
    C.emit_hash_callbacks(p, [C.HASH_NATIVE_CB] + ([C.hash_python_cb(PY_MAX_FRAMES)] if python else []))


def emit_identity(p: Program, maps: Maps, skip: str) -> None:
    """key.tid, key.tgid of the current thread; the idle task and threads of
    processes not followed go to ``skip``."""
    p.call("get_current_pid_tgid")                # tgid << 32 | tid
    p.stx(W, FP, R0, KEY_TID)
    p.mov(R1, R0).rsh(R1, 32)
    p.stx(W, FP, R1, KEY_TGID)
    p.mov32(R1, R0)
    p.jeq(R1, 0, skip)                            # the idle task (tid 0 on every CPU)
    emit_tgid_filter(p, maps.tgids, KEY_TGID, skip, maps.follow, OFF_SLOT)


def build_oncpu(mode: str, maps: Maps, period_off: int, copy: Optional[C.CopySpec] = None,
                python_walk=None) -> Program:
    """The perf-event program (see the module docstring)."""
    p = Program("oncpu_" + mode[:3])
    loop = mode != RECORD and _hash_loop(mode)     # (record mode hashes nothing)
    p.mov(C.CTX, R1)                               # struct bpf_perf_event_data *
    emit_identity(p, maps, "out")
    C.emit_scratch(p, maps.scratch, OFF_SLOT, "out")
    if mode == AGGREGATE:
        emit_capture(p, maps, True, None, python_walk, "cap")
        emit_hash_and_store(p, maps, True, True, python_walk is not None, "agg", loop)
        p.st(DW, FP, OFF_SUMS + 0, 1)                               # one sample
        p.copy_mem(DW, FP, OFF_SUMS + 8, C.CTX, period_off)         # ctx->sample_period
        emit_accumulate(p, maps.counts, OFF_KEY, OFF_SUMS, maps.stats.map, OFF_SLOT, "count")
    elif mode == KUNWIND:
        emit_walked_capture(p, maps, copy, python_walk, "cap")
        p.ldx(W, R1, FP, KU.OFF_UW + KU.W_STATUS)
        p.jeq(R1, KU.UW_STATUS_FALLBACK, "record")
        emit_hash_and_store(p, maps, True, True, python_walk is not None, "agg", loop)
        p.st(DW, FP, OFF_SUMS + 0, 1)
        p.copy_mem(DW, FP, OFF_SUMS + 8, C.CTX, period_off)
        emit_accumulate(p, maps.counts, OFF_KEY, OFF_SUMS, maps.stats.map, OFF_SLOT, "count",
                        wake_ring=maps.ring)
        p.ja("out")
        p.label("record")                          # the user-space walker's: the whole capture
        p.st(W, C.BUF, H_KIND, RECORD_SAMPLE)
        p.copy_mem(W, C.BUF, H_TID, FP, KEY_TID)
        p.copy_mem(W, C.BUF, H_TGID, FP, KEY_TGID)
        p.call("get_smp_processor_id")
        p.stx(W, C.BUF, R0, H_CPU)
        p.call("ktime_get_ns")
        p.stx(DW, C.BUF, R0, H_TIME)
        p.copy_mem(DW, C.BUF, H_PERIOD, C.CTX, period_off)
        C.emit_stack_copy(p, copy, "fallback_copy")
        C.emit_record_size(p, R8, copy.pages * C.PAGE_SIZE)
        C.emit_ringbuf_output(p, maps.ring, R8, _drop(p, maps.stats, STAT_COPY_DROPS))
    else:
        p.st(W, C.BUF, H_KIND, RECORD_SAMPLE)
        p.copy_mem(W, C.BUF, H_TID, FP, KEY_TID)
        p.copy_mem(W, C.BUF, H_TGID, FP, KEY_TGID)
        p.copy_mem(W, C.BUF, H_CPU, FP, OFF_SLOT)
        p.call("ktime_get_ns")
        p.stx(DW, C.BUF, R0, H_TIME)
        p.copy_mem(DW, C.BUF, H_PERIOD, C.CTX, period_off)
        emit_capture(p, maps, False, copy, python_walk, "cap")
        C.emit_record_size(p, R8, copy.pages * C.PAGE_SIZE if copy else 0)
        C.emit_ringbuf_output(p, maps.ring, R8, _drop(p, maps.stats, STAT_COPY_DROPS))
    p.label("out")
    p.mov(R0, 0)                                   # 0: perf writes no sample record
    p.exit()
    if mode == KUNWIND:
        KU.emit_step_callback(p, maps.kunwind, maps.scratch, python_walk is not None)
    if loop:
        emit_hash_callbacks(p, python_walk is not None)
    _emit_walk_callbacks(p, python_walk)
    return p


def _emit_walk_callbacks(p: Program, python_walk) -> None:
    """The Python walk's bpf_loop callbacks, if it has any (after the last exit)."""
    if python_walk is not None:
        from perfagent.stackprog.python import emit_callbacks
        emit_callbacks(p, python_walk)


def emit_walked_capture(p: Program, maps: Maps, copy: C.CopySpec, python_walk, tag: str) -> None:
    """The capture of KUNWIND mode: kernel stack, user registers, the
    Python stack, the user stack walked in the kernel into buf->user (its
    links placed: perfagent.stackprog.kunwind).  The
    walk's outcome is at fp+OFF_UW+W_STATUS."""
    C.emit_get_stack(p, KERNEL_OFF, 0)
    C.emit_user_regs_and_copy(p, copy, False, tag + "_regs")
    # The Python stack first: the native walk places its links (kunwind).
    if python_walk is not None:
        python_walk(p, tag + "_py")
    else:
        C.emit_empty_python(p)
    KU.emit_kernel_walk(p, maps.kunwind, KEY_TGID, maps.stats.map, tag + "_walk", python_walk is not None)


# include/linux/sched.h: the task states the off-CPU program tests.
TASK_RUNNING = 0x0000
TASK_DEAD = 0x0080


class SchedSwitchArgs(NamedTuple):
    """Where the off-CPU program finds what it needs on this kernel (from BTF)."""

    preempt: int              # ctx index of ``bool preempt``
    prev: int                 # ctx index of ``struct task_struct *prev``
    next: int                 # ctx index of ``struct task_struct *next``
    prev_state: Optional[int]  # ctx index of ``unsigned int prev_state`` (5.18+)
    state_off: int            # offsetof(task_struct, __state) (``state`` before 5.14)
    state_size: int
    pid_off: int              # offsetof(task_struct, pid): the thread id
    attach_btf_id: int


def build_offcpu(mode: str, maps: Maps, blocked: HashMap, args: SchedSwitchArgs,
                 copy: Optional[C.CopySpec] = None, python_walk=None) -> Program:
    """The sched_switch program (see the module docstring)."""
    p = Program("offcpu_" + mode[:3])
    loop = _hash_loop(mode)
    task = R8
    p.mov(C.CTX, R1)                               # ctx: u64 args[] of the tracepoint

    # -- prev switches out: did it block? ----------------------------------
    p.ldx(DW, R1, C.CTX, 8 * args.preempt)
    p.jne(R1, 0, "switch_in")                      # preempted: still runnable
    if args.prev_state is not None:
        # What __schedule decided (a pending signal has already turned a
        # sleep back into TASK_RUNNING here).
        p.ldx(DW, R1, C.CTX, 8 * args.prev_state)
    else:
        p.ldx(DW, task, C.CTX, 8 * args.prev)
        p.ldx(W if args.state_size == 4 else DW, R1, task, args.state_off)
    p.jeq(R1, TASK_RUNNING, "switch_in")           # yielded: still runnable
    p.jset(R1, TASK_DEAD, "switch_in")             # exiting: never comes back
    emit_identity(p, maps, "switch_in")            # current is still prev
    p.copy_mem(W, FP, OFF_TID, FP, KEY_TID)
    p.call("ktime_get_ns")
    p.stx(DW, FP, R0, OFF_BLOCKED + 0)             # blocked.since = now
    p.stx(DW, FP, R0, OFF_BLOCKED + 40)            # blocked.episode = since
    p.copy_mem(W, FP, OFF_BLOCKED + 8, FP, KEY_TGID)
    p.st(W, FP, OFF_BLOCKED + 12, 0)               # blocked.copied = 0
    C.emit_scratch(p, maps.scratch, OFF_SLOT, "switch_in")
    if mode == AGGREGATE:
        emit_capture(p, maps, True, None, python_walk, "cap")
        emit_hash_and_store(p, maps, True, True, python_walk is not None, "out", loop)
    elif mode == KUNWIND:
        # Walked in the kernel: stored and counted; a walk left to user
        # space goes to the ring as record mode's capture does.
        emit_walked_capture(p, maps, copy, python_walk, "cap")
        p.ldx(W, R1, FP, KU.OFF_UW + KU.W_STATUS)
        p.jne(R1, KU.UW_STATUS_FALLBACK, "walked")
        p.call("get_smp_processor_id")             # OFF_SLOT was reused by the walk's bumps
        p.stx(W, FP, R0, OFF_SLOT)
        _emit_record_header(p)
        C.emit_stack_copy(p, copy, "fallback_copy")
        _emit_offcpu_record(p, maps, copy, python_walk, loop)
        p.ja("hashed")
        p.label("walked")
        emit_hash_and_store(p, maps, True, True, python_walk is not None, "out", loop)
        p.label("hashed")
    else:
        _emit_record_header(p)
        emit_capture(p, maps, False, copy, python_walk, "cap")
        _emit_offcpu_record(p, maps, copy, python_walk, loop)
    for off, slot in ((16, KEY_KHASH), (24, KEY_UHASH), (32, KEY_PYHASH)):
        p.copy_mem(DW, FP, OFF_BLOCKED + off, FP, slot)
    p.label("remember")
    p.ld_map_fd(R1, blocked)
    p.mov(R2, FP).add(R2, OFF_TID)
    p.mov(R3, FP).add(R3, OFF_BLOCKED)
    p.mov(R4, sc.BPF_ANY)
    p.call("map_update_elem")                      # blocked[tid] = the open interval
    _emit_switch_in(p, mode, maps, blocked, args)
    if mode == KUNWIND:
        KU.emit_step_callback(p, maps.kunwind, maps.scratch, python_walk is not None)
    if loop:                                       # every mode hashes (the fallback path too)
        emit_hash_callbacks(p, python_walk is not None)
    _emit_walk_callbacks(p, python_walk)
    return p


def _emit_record_header(p: Program) -> None:
    """The RECORD_STACK header of the episode being opened."""
    p.st(W, C.BUF, H_KIND, RECORD_STACK)
    p.copy_mem(W, C.BUF, H_TID, FP, KEY_TID)
    p.copy_mem(W, C.BUF, H_TGID, FP, KEY_TGID)
    p.copy_mem(W, C.BUF, H_CPU, FP, OFF_SLOT)
    p.copy_mem(DW, C.BUF, H_TIME, FP, OFF_BLOCKED + 0)
    p.st(DW, C.BUF, H_PERIOD, 0)


def _emit_offcpu_record(p: Program, maps: Maps, copy, python_walk, loop: bool) -> None:
    """Send the capture in this CPU's slot as the episode's record (then
    ``goto remember``); when the ring is full, fall through with
    frame-pointer stacks stored instead."""
    C.emit_record_size(p, R9, copy.pages * C.PAGE_SIZE if copy else 0)
    p.ld_map_fd(R1, maps.ring)
    p.mov(R2, C.BUF)
    p.mov(R3, R9)
    p.mov(R4, sc.BPF_RB_NO_WAKEUP)
    p.call("ringbuf_output")
    p.jne(R0, 0, "copy_dropped")
    p.st(W, FP, OFF_BLOCKED + 12, 1)               # blocked.copied = 1
    # The kernel stack is in the record; the hashes stay 0.
    for off in (16, 24, 32):
        p.st(DW, FP, OFF_BLOCKED + off, 0)
    p.ja("remember")
    p.label("copy_dropped")                        # the ring is full: frame-pointer stacks instead
    emit_bump(p, maps.stats.map, STAT_COPY_DROPS, OFF_SLOT, "copy_dropped")
    C.emit_get_stack(p, USER_OFF, sc.BPF_F_USER_STACK)
    emit_hash_and_store(p, maps, True, True, python_walk is not None, "fb", loop)


def _emit_switch_in(p: Program, mode: str, maps: Maps, blocked: HashMap, args: SchedSwitchArgs) -> None:
    """The second half: the thread switching in ends its episode."""
    entry, delta, copied = R8, R9, R8
    p.label("switch_in")
    p.ldx(DW, R1, C.CTX, 8 * args.next)
    p.copy_mem(W, FP, OFF_TID, R1, args.pid_off, via=R2)   # tid = next->pid (BTF pointer: direct load)
    p.ld_map_fd(R1, blocked)
    p.mov(R2, FP).add(R2, OFF_TID)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, "out")                            # not followed, or was runnable
    p.mov(entry, R0)
    p.call("ktime_get_ns")
    p.mov(delta, R0)
    p.ldx(DW, R1, entry, 0)
    p.sub(delta, R1)                               # delta = now - blocked.since
    p.stx(DW, FP, delta, OFF_SUMS + 0)             # sums.a = blocked ns
    p.st(DW, FP, OFF_SUMS + 8, 1)                  # sums.b = one episode
    # Everything is read before the delete: a deleted element of a
    # preallocated hash map may be reused by another CPU at once.
    p.copy_mem(W, FP, KEY_TGID, entry, 8)
    p.copy_mem(W, FP, KEY_TID, FP, OFF_TID)
    p.copy_mem(DW, FP, KEY_KHASH, entry, 16)
    p.copy_mem(DW, FP, KEY_UHASH, entry, 24)
    p.copy_mem(DW, FP, KEY_PYHASH, entry, 32)
    if mode in (RECORD, KUNWIND):
        p.st(W, FP, OFF_END + 0, RECORD_END)
        p.copy_mem(W, FP, OFF_END + 4, FP, OFF_TID)
        p.copy_mem(W, FP, OFF_END + 8, entry, 8)
        p.st(W, FP, OFF_END + 12, 0)
        p.copy_mem(DW, FP, OFF_END + 16, entry, 40)
        p.stx(DW, FP, delta, OFF_END + 24)
        p.ldx(W, copied, entry, 12)                # entry is dead from here
    p.ld_map_fd(R1, blocked)
    p.mov(R2, FP).add(R2, OFF_TID)
    p.call("map_delete_elem")                      # the interval is closed
    p.jsle(delta, 0, "out")                        # cannot happen; never add a negative
    if mode in (RECORD, KUNWIND):
        p.jeq(copied, 0, "aggregate")
        p.ld_map_fd(R1, maps.ring)
        p.mov(R2, FP).add(R2, OFF_END)
        p.mov(R3, EPISODE_END.size)
        p.mov(R4, sc.BPF_RB_NO_WAKEUP)
        p.call("ringbuf_output")
        p.jeq(R0, 0, "out")
        emit_bump(p, maps.stats.map, STAT_COPY_DROPS, OFF_SLOT, "end_dropped")
        p.label("aggregate")                       # ... else with the stored hashes
    emit_accumulate(p, maps.counts, OFF_KEY, OFF_SUMS, maps.stats.map, OFF_SLOT, "count")
    p.label("out")
    p.mov(R0, 0)
    p.exit()
