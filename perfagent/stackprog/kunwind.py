"""The user stack walked in the kernel with the binaries' CFI (``--unwind-in kernel``).

Instead of copying 32 KiB of stack per sample for user space to walk, the
stack program walks it where it stands: frame by frame, with bpf_loop (Linux
5.17+) calling :func:`emit_step_callback` once per frame.  Each step finds the
frame's mapping in the process's sorted mapping list, the binary's compact
row for the pc (perfagent.unwind.compact: both by binary search over array
maps, each probe a call of a nested bpf_loop callback), computes the CFA,
and reads the return address and rbp with bpf_probe_read_user -- exactly the user-space walker's step
(perfagent.unwind.walker), which stays the reference and the fallback.  The
result is a ``struct stack`` of program counters at USER_OFF, stored and
counted like the frame-pointer stacks of ``--unwind fp``.

Tables, filled by user space (perfagent.unwind.kernel):

    unwind_procs[tgid]    -> struct uw_proc { __u32 first; __u32 n; }  mappings[first, first+n)
    unwind_mappings[i]    -> struct uw_mapping (sorted by start within a process)
    unwind_tables[t]      -> struct uw_table { __u32 first; __u32 count; }  rows[first, first+count)
    unwind_rows[i]        -> struct unwind_row (perfagent.unwind.compact)

    struct uw_mapping {
        __u64 start;      0
        __u64 end;        8
        __u64 bias;       16   row pc = address - bias (load bias plus the table's base)
        __u32 table;      24
        __u32 kind;       28   UW_MAP_*
    };                    32

The walk also places the Python stack (perfagent.stackprog.python, walked
first) among the native frames: a native frame owns the stack bytes [its
sp, its CFA), and each PYFRAME_LINK entry -- the address of a local of one
_PyEval_EvalFrameDefault call (3.11+) -- is replaced by the index of the
frame whose bytes hold it, flagged PYFRAME_LINK_INDEX (perfagent.python.merge
then needs no stack pointers).  Each step keeps its frame's sp (SPS_OFF);
once the walk ended, one merge of the entries with those sps places the
links (emit_link_callback): links grow toward the root as frames do, so a
forward position in each serves every link; the last frame takes those
left above its sp, as the user-space merge does.  Done in the kernel, the
stored Python stacks are the same wherever a thread's stack lies, so they
aggregate like the native ones.

A walk ends in one of the UW_STATUS_* outcomes.  UW_STATUS_FALLBACK means
"not for the kernel": the process is not loaded yet, a pc lies in a mapping
it does not know (dlopen since), a binary was refused, or a row says
UW_CFA_FALLBACK.  The program then sends the whole capture (registers and
stack copy) to the ring as record mode does, and user space walks it.
"""

from __future__ import annotations

import struct

from perfagent.records import NamedTuple
from perfagent.bpf.asm import B, DW, FP, H, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, W, Program
from perfagent.bpf.maps import ArrayMap, HashMap
from perfagent.stackprog.accounting import STAT_KUNWIND
from perfagent.stackprog.capture import BUF
from perfagent.stackprog.layout import (
    CAPTURE_USER, H_FLAGS, H_RESERVED, H_REGS, PERF_MAX_STACK_DEPTH, PY_MAX_FRAMES, PYFRAME_LINK, PYFRAME_LINK_INDEX,
    PYSTACK_HDR, PYTHON_OFF, SPS_OFF, STACK_IPS_OFF, STACK_N_OFF, USER_OFF,
)
from perfagent.stackprog.python import OFF_PY_LINENO as _PY_LOWEST
from perfagent.unwind import compact as K

UW_PROC_KEY = struct.Struct("<I")   # tgid
UW_INDEX = struct.Struct("<I")      # an array map's key
UW_PROC = struct.Struct("<II")
UW_MAPPING = struct.Struct("<QQQII")
UW_TABLE = struct.Struct("<II")
assert UW_MAPPING.size == 32

# uw_mapping.kind
UW_MAP_TABLE = 0      # rows of unwind_tables[table]
UW_MAP_FP = 1         # no CFI (a binary without it, anonymous or unreadable memory): frame pointer
UW_MAP_FALLBACK = 2   # refused (tables full, a perf trampoline arena): the user-space walker

# Outcomes (and stats slots from STAT_KUNWIND on).
UW_STATUS_RUNNING = 0     # also "complete" for a capture without a user context
UW_STATUS_COMPLETE = 1    # reached the outermost frame
UW_STATUS_TRUNCATED = 2   # PERF_MAX_STACK_DEPTH frames
UW_STATUS_STOPPED = 3     # no CFI (dwarf mode), an unreadable word, a failed sanity check
UW_STATUS_FALLBACK = 4    # left to the user-space walker (see the module docstring)
UW_STATUS_SELF = 5        # the agent's own process: only the sampled pc (see UW_PROC_SELF)
STATUS_NAMES = ("no user stack", "complete", "truncated", "stopped", "fell back to user space",
                "of the agent itself (not walked)")

# uw_proc.count of the agent's own process (-a samples it too): its user
# stack is the sampled pc alone.  Walking it would cost the agent most of
# what it measures: it is never loaded (its address space changes as it
# works), so every sample of it fell back to the user-space walker, ~0.5 ms
# of the agent's CPU each -- which the next samples see again.
UW_PROC_SELF = 0xFFFFFFFF

# Bounds of the binary searches: 2**(steps-1) entries at most.
MAX_MAPPINGS = 256        # executable mappings of one process
MAP_SEARCH_STEPS = 9
MAX_ROWS = 1 << 20        # rows of every table together (16 MiB)
ROW_SEARCH_STEPS = 21
MAX_TABLES = 4096
MAX_PROCS = 1024

# struct uw_walk, the bpf_loop context on the main program's stack (below
# the Python walk's slots, see perfagent.stackprog.python):
OFF_UW = -480
W_PC, W_SP, W_BP, W_LEAF_SP, W_RA = 0, 8, 16, 24, 32   # u64
W_N, W_STATUS, W_FLAGS, W_FIRST, W_COUNT, W_LO, W_HI, W_TGID, W_STAT, W_WHICH = (
    40, 44, 48, 52, 56, 60, 64, 68, 72, 76)             # u32
W_TARGET = 80                                       # u64: what a binary search looks for
W_PYPOS = 88        # u32: the next Python entry to look at (links before it are placed)
W_LINK_INDEX = 92   # u32: the native frame the next link is looked for from
UW_WALK_SIZE = 96
assert OFF_UW + UW_WALK_SIZE <= _PY_LOWEST and OFF_UW >= -512   # below the Python walk's slots
# uw_walk.which: the array a binary search probes
SEARCH_MAPPINGS, SEARCH_ROWS = 0, 1
# uw_walk.flags
F_LEAF = 1          # the frame at pc is the sampled one (its pc is exact)
F_EXACT = 2         # the previous frame was a signal frame: pc is exact
F_BP_UNKNOWN = 4    # rbp has no known value any more
F_EXACT_SHIFT = 1
assert F_EXACT == 1 << F_EXACT_SHIFT
# The callback's own stack (u32 slots, then the 16 bytes a read fills).
CB_KEY = -4         # the key of a map lookup
CB_MID = -8         # a binary search's probe
CB_FIRST = -12      # the table's first row
CB_NEW_FLAGS = -16  # uw_walk.flags once the step is accepted
CB_READ = -32
# The deepest callback's stack as the verifier counts it ("stack depth
# 504+56+8+8+0+0" for the whole program, the Python walk's callbacks
# included): perfagent.unwind.kernel's probe reproduces the walk's depth
# with it.
PROBE_STEP_STACK = 56


class KUnwindMaps(NamedTuple):
    """The tables the walk reads (filled by perfagent.unwind.kernel)."""

    procs: HashMap
    mappings: ArrayMap
    tables: ArrayMap
    rows: ArrayMap
    auto: bool              # --unwind auto: a pc without CFI tries the frame pointer


def make_maps(auto: bool, max_rows: int = 0, max_procs: int = MAX_PROCS) -> KUnwindMaps:
    from perfagent.offcpu.common import close_all
    made = []
    try:
        made.append(HashMap(4, UW_PROC.size, max_procs, name="uw_procs"))
        made.append(ArrayMap(UW_MAPPING.size, max_procs * MAX_MAPPINGS, name="uw_mappings"))
        made.append(ArrayMap(UW_TABLE.size, MAX_TABLES, name="uw_tables"))
        made.append(ArrayMap(K.UNWIND_ROW.size, max_rows or MAX_ROWS, name="uw_rows"))
    except BaseException:
        close_all(made)
        raise
    return KUnwindMaps(made[0], made[1], made[2], made[3], auto)


STEP_LABEL = "uw_step"


def emit_kernel_walk(p: Program, maps: KUnwindMaps, tgid_off: int, stats, tag: str,
                     links: bool = True) -> None:
    """The walk into buf->user (a ``struct stack``); its outcome at
    fp+OFF_UW+W_STATUS, counted in stats[STAT_KUNWIND + status].

    Needs the user registers at H_REGS (emit_user_regs_and_copy without a
    copy) and the tgid (u32) at fp+tgid_off.  Uses r0-r5, r8, r9.  With
    ``links``, the Python stack at buf->python (walked before) has its
    links placed (emit_step_callback must be given ``links`` too: it emits
    their callback).
    """
    t = tag
    ctx = OFF_UW
    p.st(W, BUF, USER_OFF + STACK_N_OFF, 0)
    p.st(W, FP, ctx + W_STATUS, UW_STATUS_RUNNING)
    p.ldx(W, R1, BUF, H_FLAGS)
    p.jset(R1, CAPTURE_USER, t + "_user")
    p.ja(t + "_count")                                 # a kernel thread: no user stack
    p.label(t + "_user")
    p.ldx(DW, R8, BUF, H_REGS + 8 * 3)                 # ip
    p.jeq(R8, 0, t + "_count")
    p.ld_map_fd(R1, maps.procs)
    p.mov(R2, FP).add(R2, tgid_off)
    p.call("map_lookup_elem")
    p.jne(R0, 0, t + "_known")
    p.st(W, FP, ctx + W_STATUS, UW_STATUS_FALLBACK)   # not loaded (yet)
    p.ja(t + "_count")
    p.label(t + "_self")
    p.stx(DW, BUF, R8, USER_OFF + STACK_IPS_OFF)       # ips[0]: the sampled pc, alone
    p.st(W, BUF, USER_OFF + STACK_N_OFF, 1)
    p.st(W, FP, ctx + W_STATUS, UW_STATUS_SELF)
    p.ja(t + "_count")
    p.label(t + "_known")
    p.ldx(W, R1, R0, 4)
    p.jeq32(R1, UW_PROC_SELF - (1 << 32), t + "_self")   # imm is s32: -1
    p.copy_mem(W, FP, ctx + W_FIRST, R0, 0)
    p.copy_mem(W, FP, ctx + W_COUNT, R0, 4)
    p.stx(DW, FP, R8, ctx + W_PC)
    p.stx(DW, BUF, R8, USER_OFF + STACK_IPS_OFF)       # ips[0]: the sampled pc
    p.copy_mem(DW, FP, ctx + W_SP, BUF, H_REGS + 8 * 2)
    p.copy_mem(DW, FP, ctx + W_LEAF_SP, BUF, H_REGS + 8 * 2)
    p.copy_mem(DW, FP, ctx + W_BP, BUF, H_REGS + 8 * 1)
    p.st(W, FP, ctx + W_N, 1)
    if links:
        p.copy_mem(DW, BUF, SPS_OFF, BUF, H_REGS + 8 * 2)   # sps[0]: the leaf's sp
    # pypos = 0 and link_index = 0 loaded from the map value: unknown to
    # the verifier, so the states of each entry prune instead of being
    # walked one by one.  So are the flags (F_LEAF): as constants, every
    # combination of flags the steps can make was a state of its own at
    # the bpf_loop call (83 of them: 60k instructions processed instead of 9k).
    p.st(DW, BUF, H_RESERVED, 0)
    p.ldx(DW, R1, BUF, H_RESERVED)
    p.stx(W, FP, R1, ctx + W_PYPOS)
    p.stx(W, FP, R1, ctx + W_LINK_INDEX)
    p.add(R1, F_LEAF)
    p.stx(W, FP, R1, ctx + W_FLAGS)
    p.mov(R1, PERF_MAX_STACK_DEPTH)
    p.ld_func(R2, STEP_LABEL)
    p.mov(R3, FP).add(R3, ctx)
    p.mov(R4, 0)
    p.call("loop")
    p.ldx(W, R1, FP, ctx + W_N)
    p.stx(W, BUF, R1, USER_OFF + STACK_N_OFF)
    p.ldx(W, R1, FP, ctx + W_STATUS)
    p.jne(R1, UW_STATUS_RUNNING, t + "_ended")
    p.st(W, FP, ctx + W_STATUS, UW_STATUS_TRUNCATED)  # bpf_loop ran out
    p.label(t + "_ended")
    # The links are placed among the frames walked.  (A walk left to user
    # space keeps them: its walker places them.)  Each callback passes an
    # entry or a frame: the entries and the frames are bounds enough.
    if links:
        p.ldx(W, R1, FP, ctx + W_STATUS)
        p.jeq(R1, UW_STATUS_FALLBACK, t + "_count")
        p.mov(R1, PY_MAX_FRAMES + PERF_MAX_STACK_DEPTH)
        p.ld_func(R2, LINK_LABEL)
        p.mov(R3, FP).add(R3, ctx)
        p.mov(R4, 0)
        p.call("loop")
    p.label(t + "_count")
    p.ldx(W, R1, FP, ctx + W_STATUS)
    p.add(R1, STAT_KUNWIND)
    p.stx(W, FP, R1, ctx + W_STAT)
    p.ld_map_fd(R1, stats)
    p.mov(R2, FP).add(R2, ctx + W_STAT)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, t + "_done")
    p.mov(R1, 1)
    p.atomic_add(DW, R0, R1, 0)
    p.label(t + "_done")


def _lookup(p: Program, m, key_reg, fail: str) -> None:
    """r0 = &m[key_reg] (key through the callback's stack) or goto fail."""
    p.stx(W, FP, key_reg, CB_KEY)
    p.ld_map_fd(R1, m)
    p.mov(R2, FP).add(R2, CB_KEY)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, fail)


def _read_word(p: Program, addr_reg, fail: str) -> None:
    """r0 = the user word at addr_reg, or goto fail."""
    p.mov(R3, addr_reg)
    p.mov(R1, FP).add(R1, CB_READ)
    p.mov(R2, 8)
    p.call("probe_read_user")
    p.jne(R0, 0, fail)
    p.ldx(DW, R0, FP, CB_READ)


def _search(p: Program, m, key_field_off: int, key_size: int, value_reg, steps: int, tag: str,
            fail: str) -> None:
    """Binary search of m[lo, hi) (ctx W_LO, W_HI) for the last entry whose
    field at key_field_off is <= value_reg; ctx W_LO = its index + 1.

    Each probe is one call of the SEARCH_LABEL callback through a nested
    bpf_loop (``steps`` probes at most: 2**(steps-1) entries): the verifier
    checks the probe once instead of walking every iteration of an inline
    loop (which cost it 145k instructions and half a second per load)."""
    ctx = R9
    p.stx(DW, ctx, value_reg, W_TARGET)
    p.st(W, ctx, W_WHICH, SEARCH_MAPPINGS if key_size == DW else SEARCH_ROWS)
    p.mov(R1, steps)
    p.ld_func(R2, SEARCH_LABEL)
    p.mov(R3, ctx)
    p.mov(R4, 0)
    p.call("loop")
    p.ldx(W, R1, ctx, W_WHICH)
    p.jeq(R1, SEARCH_FAILED, fail)


SEARCH_LABEL = "uw_search"
SEARCH_FAILED = 0xFF


def emit_search_callback(p: Program, maps: KUnwindMaps) -> None:
    """``long uw_search(u32 index, struct uw_walk *w)``: one probe of the
    binary search _search starts; returns 1 once lo == hi."""
    ctx = R9
    p.label(SEARCH_LABEL)
    p.mov(ctx, R2)
    p.ldx(W, R1, ctx, W_LO)
    p.ldx(W, R2, ctx, W_HI)
    p.jge(R1, R2, "uws_done")
    p.add(R1, R2).rsh(R1, 1)
    p.stx(W, FP, R1, -8)                               # mid
    p.stx(W, FP, R1, -4)                               # the key
    p.ldx(W, R3, ctx, W_WHICH)
    p.jeq(R3, SEARCH_ROWS, "uws_rows")
    p.ld_map_fd(R1, maps.mappings)
    p.mov(R2, FP).add(R2, -4)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, "uws_failed")
    p.ldx(DW, R1, R0, 0)                               # mapping start
    p.ja("uws_compare")
    p.label("uws_rows")
    p.ld_map_fd(R1, maps.rows)
    p.mov(R2, FP).add(R2, -4)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, "uws_failed")
    p.ldx(W, R1, R0, 0)                                # row pc
    p.label("uws_compare")
    p.ldx(DW, R2, ctx, W_TARGET)
    p.jgt(R1, R2, "uws_hi")
    p.ldx(W, R1, FP, -8)
    p.add(R1, 1)
    p.stx(W, ctx, R1, W_LO)
    p.mov(R0, 0)
    p.exit()
    p.label("uws_hi")
    p.ldx(W, R1, FP, -8)
    p.stx(W, ctx, R1, W_HI)
    p.mov(R0, 0)
    p.exit()
    p.label("uws_failed")
    p.st(W, ctx, W_WHICH, SEARCH_FAILED)
    p.label("uws_done")
    p.mov(R0, 1)
    p.exit()


def _sext16(p: Program, reg) -> None:
    p.lsh(reg, 48).arsh(reg, 48)


def emit_step_callback(p: Program, maps: KUnwindMaps, scratch: ArrayMap, links: bool = True) -> None:
    """The bpf_loop callback ``long uw_step(u32 index, struct uw_walk *w)``:
    one frame of the walk.  Returns 0 to go on, 1 when the walk ended (its
    status set).  Emit after the main program's last exit.  With ``links``
    (the Python walk) each frame's sp is kept and the link placement's
    callback emitted too.

    Registers: r9 the walk context, r8 the capture buffer, r6 the address
    being looked up (then the CFA), r7 the row.
    """
    ctx, buf, addr, row = R9, R8, R6, R7
    p.label(STEP_LABEL)
    p.mov(ctx, R2)
    p.call("get_smp_processor_id")
    _lookup(p, scratch, R0, "uw_fallback")
    p.mov(buf, R0)
    p.ldx(W, R1, ctx, W_N)
    p.jge(R1, PERF_MAX_STACK_DEPTH, "uw_truncated")
    # The address whose row applies: a return address points after its call.
    p.ldx(DW, addr, ctx, W_PC)
    p.ldx(W, R1, ctx, W_FLAGS)
    p.jset(R1, F_LEAF | F_EXACT, "uw_exact")
    p.sub(addr, 1)
    p.label("uw_exact")

    # -- the mapping ---------------------------------------------------------
    p.ldx(W, R1, ctx, W_FIRST)
    p.stx(W, ctx, R1, W_LO)
    p.ldx(W, R2, ctx, W_COUNT)
    p.add(R1, R2)
    p.stx(W, ctx, R1, W_HI)
    _search(p, maps.mappings, 0, DW, addr, MAP_SEARCH_STEPS, "uw_ms", "uw_fallback")
    p.ldx(W, R1, ctx, W_LO)
    p.ldx(W, R2, ctx, W_FIRST)
    p.jle(R1, R2, "uw_fallback")                      # below the first mapping: not known
    p.sub(R1, 1)
    _lookup(p, maps.mappings, R1, "uw_fallback")
    p.ldx(DW, R1, R0, 8)
    p.jge(addr, R1, "uw_fallback")                    # in no mapping the program knows
    p.ldx(W, R1, R0, 28)
    p.jeq(R1, UW_MAP_FP, "uw_fp")
    p.jne(R1, UW_MAP_TABLE, "uw_fallback")
    p.ldx(DW, R1, R0, 16)
    p.sub(addr, R1)                                   # the row pc
    p.ldx(W, R1, R0, 24)
    _lookup(p, maps.tables, R1, "uw_fallback")
    p.ldx(W, R1, R0, 0)
    p.stx(W, ctx, R1, W_LO)
    p.ldx(W, R2, R0, 4)
    p.add(R1, R2)
    p.stx(W, ctx, R1, W_HI)
    p.ldx(W, R2, ctx, W_LO)
    p.stx(W, FP, R2, CB_FIRST)                      # first
    _search(p, maps.rows, 0, W, addr, ROW_SEARCH_STEPS, "uw_rs", "uw_fallback")
    p.ldx(W, R1, ctx, W_LO)
    p.ldx(W, R2, FP, CB_FIRST)
    p.jle(R1, R2, "uw_fallback")                      # cannot happen: rows[first].pc is 0
    p.sub(R1, 1)
    _lookup(p, maps.rows, R1, "uw_fallback")
    p.mov(row, R0)

    # A caller whose frame is a signal frame was entered at its first byte:
    # the previous entry is that exact pc + 1 (the walker's convention).
    p.ldx(W, R1, ctx, W_FLAGS)
    p.jset(R1, F_LEAF, "uw_kind")
    p.ldx(B, R1, row, 6)
    p.jset(R1, K.UW_ROW_SIGNAL, "uw_signal_entry")
    p.ja("uw_kind")
    p.label("uw_signal_entry")
    p.ldx(W, R1, ctx, W_FLAGS)
    p.jset(R1, F_EXACT, "uw_kind")                    # already +1
    p.ldx(W, R1, ctx, W_N)
    p.jge(R1, PERF_MAX_STACK_DEPTH, "uw_truncated")
    p.jeq(R1, 0, "uw_kind")
    p.lsh(R1, 3)
    p.add(R1, buf)
    p.ldx(DW, R2, R1, USER_OFF + STACK_IPS_OFF - 8)
    p.add(R2, 1)
    p.stx(DW, R1, R2, USER_OFF + STACK_IPS_OFF - 8)

    # -- the CFA (into r6) -----------------------------------------------------
    p.label("uw_kind")
    p.ldx(B, R1, row, 4)
    p.jeq(R1, K.UW_CFA_NONE, "uw_none")
    p.jeq(R1, K.UW_CFA_END, "uw_complete")
    p.ldx(W, R2, row, 8)
    p.lsh(R2, 32).arsh(R2, 32)                        # cfa_off (s32)
    p.jeq(R1, K.UW_CFA_RSP, "uw_cfa_rsp")
    p.jeq(R1, K.UW_CFA_PLT, "uw_cfa_plt")
    p.jeq(R1, K.UW_CFA_DEREF_RSP, "uw_cfa_deref_rsp")
    p.jeq(R1, K.UW_CFA_RBP, "uw_cfa_rbp")
    p.jeq(R1, K.UW_CFA_DEREF_RBP, "uw_cfa_rbp")
    p.ja("uw_fallback")
    p.label("uw_cfa_rsp")
    p.ldx(DW, addr, ctx, W_SP)
    p.add(addr, R2)
    p.ja("uw_ra")
    p.label("uw_cfa_plt")
    p.ldx(DW, addr, ctx, W_SP)
    p.add(addr, R2)
    p.ldx(DW, R1, ctx, W_PC)
    p.and_(R1, 15)
    p.ldx(B, R2, row, 7)
    p.jlt(R1, R2, "uw_ra")
    p.add(addr, 8)
    p.ja("uw_ra")
    p.label("uw_cfa_deref_rsp")
    p.ldx(DW, R1, ctx, W_SP)
    p.add(R1, R2)
    _read_word(p, R1, "uw_stopped")
    p.mov(addr, R0)
    p.ja("uw_ra")
    p.label("uw_cfa_rbp")
    p.ldx(W, R3, ctx, W_FLAGS)
    p.jset(R3, F_BP_UNKNOWN, "uw_stopped")
    p.ldx(DW, addr, ctx, W_BP)
    p.add(addr, R2)
    p.jne(R1, K.UW_CFA_DEREF_RBP, "uw_ra")
    _read_word(p, addr, "uw_stopped")
    p.mov(addr, R0)

    # -- the return address -------------------------------------------------------
    p.label("uw_ra")
    p.ldx(H, R1, row, 12)
    _sext16(p, R1)
    p.ldx(B, R2, row, 6)
    p.jset(R2, K.UW_ROW_RA_RSP, "uw_ra_rsp")
    p.add(R1, addr)
    p.ja("uw_ra_read")
    p.label("uw_ra_rsp")
    p.ldx(DW, R2, ctx, W_SP)
    p.add(R1, R2)
    p.label("uw_ra_read")
    _read_word(p, R1, "uw_stopped")
    p.stx(DW, ctx, R0, W_RA)

    # -- rbp -------------------------------------------------------------------------
    p.ldx(H, R2, row, 14)
    _sext16(p, R2)
    p.ldx(B, R1, row, 5)
    p.jeq(R1, K.UW_RBP_SAME, "uw_flags")
    p.jeq(R1, K.UW_RBP_OFFSET, "uw_bp_offset")
    p.jeq(R1, K.UW_RBP_EXPR_RSP, "uw_bp_expr")
    p.jeq(R1, K.UW_RBP_VAL_OFFSET, "uw_bp_val")
    p.ja("uw_bp_unknown")                              # UW_RBP_UNDEFINED
    p.label("uw_bp_val")
    p.add(R2, addr)
    p.stx(DW, ctx, R2, W_BP)
    p.ja("uw_flags")
    p.label("uw_bp_offset")
    p.add(R2, addr)
    p.ldx(DW, R1, ctx, W_LEAF_SP)
    p.jlt(R2, R1, "uw_flags")                          # popped by the leaf's epilogue: rbp holds it
    p.ja("uw_bp_read")
    p.label("uw_bp_expr")
    p.ldx(DW, R1, ctx, W_SP)
    p.add(R2, R1)
    p.label("uw_bp_read")
    _read_word(p, R2, "uw_bp_unknown")
    p.stx(DW, ctx, R0, W_BP)
    p.ldx(W, R1, ctx, W_FLAGS)
    p.and_(R1, ~F_BP_UNKNOWN)
    p.stx(W, ctx, R1, W_FLAGS)
    p.ja("uw_flags")
    p.label("uw_bp_unknown")
    p.ldx(W, R1, ctx, W_FLAGS)
    p.or_(R1, F_BP_UNKNOWN)
    p.stx(W, ctx, R1, W_FLAGS)

    # A signal frame's caller (the interrupted code) is at its exact pc.
    p.label("uw_flags")
    p.ldx(W, R1, ctx, W_FLAGS)
    p.and_(R1, ~(F_LEAF | F_EXACT))
    p.ldx(B, R2, row, 6)
    p.and_(R2, K.UW_ROW_SIGNAL)
    p.jeq(R2, 0, "uw_flags_set")
    p.or_(R1, F_EXACT)
    p.label("uw_flags_set")
    p.stx(W, FP, R1, CB_NEW_FLAGS)                     # the new flags, applied after the checks
    p.ldx(W, R1, ctx, W_FLAGS)                         # the old ones (F_LEAF) for the checks
    p.ja("uw_check")

    # -- no CFI: the frame pointer ---------------------------------------------
    p.label("uw_none")
    if not maps.auto:
        p.ja("uw_stopped")
    p.label("uw_fp")
    p.ldx(W, R1, ctx, W_FLAGS)
    p.jset(R1, F_BP_UNKNOWN, "uw_stopped")
    p.ldx(DW, addr, ctx, W_BP)
    p.ldx(DW, R1, ctx, W_SP)
    p.jlt(addr, R1, "uw_stopped")
    p.mov(R3, addr)
    p.mov(R1, FP).add(R1, CB_READ)
    p.mov(R2, 16)
    p.call("probe_read_user")
    p.jne(R0, 0, "uw_stopped")
    p.copy_mem(DW, ctx, W_BP, FP, CB_READ)
    p.copy_mem(DW, ctx, W_RA, FP, CB_READ + 8)
    p.add(addr, 16)
    p.ldx(W, R1, ctx, W_FLAGS)
    p.and_(R1, ~(F_LEAF | F_EXACT))
    p.stx(W, FP, R1, CB_NEW_FLAGS)
    p.ldx(W, R1, ctx, W_FLAGS)                         # the old flags (F_LEAF) for the checks

    # -- checks, then the caller becomes a frame --------------------------------
    # r1: the flags before this step; the new ones wait at CB_NEW_FLAGS.
    p.label("uw_check")
    p.ldx(DW, R2, ctx, W_RA)
    p.jeq(R2, 0, "uw_complete")                        # the psABI's outermost-frame marker
    p.ldx(DW, R3, ctx, W_SP)
    p.jlt(addr, R3, "uw_stopped")                      # the stack grows towards the caller...
    p.jset(R1, F_LEAF, "uw_grew")
    p.jeq(addr, R3, "uw_stopped")                      # ... strictly, above the leaf
    p.label("uw_grew")
    p.ldx(W, R1, FP, CB_NEW_FLAGS)
    p.stx(W, ctx, R1, W_FLAGS)
    p.stx(DW, ctx, addr, W_SP)
    p.stx(DW, ctx, R2, W_PC)
    # ips[] holds an exact pc + 1 (F_EXACT): added without a branch, so
    # the verifier never decides one on the flags it just computed (which
    # would make them precise, and each value a state of its own).
    p.rsh(R1, F_EXACT_SHIFT).and_(R1, 1)
    p.add(R2, R1)
    p.ldx(W, R1, ctx, W_N)
    p.jge(R1, PERF_MAX_STACK_DEPTH, "uw_truncated")
    p.mov(R3, R1)
    p.lsh(R3, 3)
    p.add(R3, buf)
    p.stx(DW, R3, R2, USER_OFF + STACK_IPS_OFF)
    if links:
        p.stx(DW, R3, addr, SPS_OFF)                   # the caller's sp: this frame's CFA
    p.add(R1, 1)
    p.stx(W, ctx, R1, W_N)
    p.mov(R0, 0)
    p.exit()

    for label, status in (("uw_complete", UW_STATUS_COMPLETE), ("uw_truncated", UW_STATUS_TRUNCATED),
                          ("uw_stopped", UW_STATUS_STOPPED), ("uw_fallback", UW_STATUS_FALLBACK)):
        p.label(label)
        p.st(W, ctx, W_STATUS, status)
        p.mov(R0, 1)
        p.exit()
    emit_search_callback(p, maps)
    if links:
        emit_link_callback(p, scratch)


LINK_LABEL = "uw_link"
PY_FRAMES_OFF = PYTHON_OFF + PYSTACK_HDR.size
_LINK_IMM = PYFRAME_LINK - (1 << 32)      # bit 31 as an s32 immediate


def emit_link_callback(p: Program, scratch: ArrayMap) -> None:
    """``long uw_link(u32 index, struct uw_walk *w)``: one move of the merge
    of the Python entries (from w->pypos) with the walked frames' sps (from
    w->link_index).  A Python frame is passed.  A link at or above the next
    frame's sp moves the frame on; else the link is the frame's when at or
    above its sp (the last frame's whatever lies above), and nowhere when
    below it (the user-space merge puts its run at the root end, and so it
    does with a link left as it is), and is passed.  Returns 1 past the last
    entry.

    A step of the walk used to place the links below its CFA through a
    nested bpf_loop: that branch in the step doubled what the verifier
    walked through it (27% of the instructions it processed for the on-CPU
    program); this merge, once per walk, is verified once."""
    ctx, buf = R9, R8
    p.label(LINK_LABEL)
    p.mov(ctx, R2)
    p.call("get_smp_processor_id")
    p.stx(W, FP, R0, -4)
    p.ld_map_fd(R1, scratch)
    p.mov(R2, FP).add(R2, -4)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, "uwl_end")
    p.mov(buf, R0)
    p.ldx(W, R1, ctx, W_PYPOS)
    p.ldx(W, R2, buf, PYTHON_OFF)                      # pystack.n
    p.jge(R1, R2, "uwl_end")
    p.jge(R1, PY_MAX_FRAMES, "uwl_end")
    p.mov(R3, R1).lsh(R3, 4)                           # * PYFRAME_SIZE
    p.add(R3, buf)
    p.add(R1, 1)
    p.ldx(W, R4, R3, PY_FRAMES_OFF + 12)              # flags
    p.jset(R4, _LINK_IMM, "uwl_link")
    p.stx(W, ctx, R1, W_PYPOS)                         # a Python frame: passed
    p.ja("uwl_next")
    p.label("uwl_link")
    p.ldx(DW, R5, R3, PY_FRAMES_OFF)                   # the link's address
    p.ldx(W, R0, ctx, W_LINK_INDEX)
    p.jge(R0, PERF_MAX_STACK_DEPTH, "uwl_end")
    p.mov(R2, R0).add(R2, 1)
    p.ldx(W, R1, ctx, W_N)
    p.jge(R2, R1, "uwl_place")                         # the last frame
    p.jge(R2, PERF_MAX_STACK_DEPTH, "uwl_place")
    p.mov(R1, R2).lsh(R1, 3)
    p.add(R1, buf)
    p.ldx(DW, R1, R1, SPS_OFF)
    p.jlt(R5, R1, "uwl_place")                         # below the next frame's sp
    p.stx(W, ctx, R2, W_LINK_INDEX)                    # the next frame's (or later)
    p.ja("uwl_next")
    p.label("uwl_place")
    p.ldx(W, R1, ctx, W_PYPOS)
    p.add(R1, 1)
    p.stx(W, ctx, R1, W_PYPOS)
    p.mov(R1, R0).lsh(R1, 3)
    p.add(R1, buf)
    p.ldx(DW, R1, R1, SPS_OFF)
    p.jlt(R5, R1, "uwl_next")                          # below this frame: no frame's
    p.stx(DW, R3, R0, PY_FRAMES_OFF)
    p.or_(R4, PYFRAME_LINK_INDEX)
    p.stx(W, R3, R4, PY_FRAMES_OFF + 12)
    p.label("uwl_next")
    p.mov(R0, 0)
    p.exit()
    p.label("uwl_end")
    p.mov(R0, 1)
    p.exit()
