"""The Python stack, read by the BPF program from the interpreter's memory.

At every capture of a thread of a CPython process the program walks that
thread's frame chain, as perfagent.python.reader does from user space, and
records each frame's code object and instruction offset (``struct
pyframe``, perfagent.stackprog.layout).  Nothing is done to the target: it
reads with bpf_probe_read_user, at the instant of the sample or switch.

What the program needs, user space provides in two maps:

* ``py_procs``: tgid -> ``struct py_proc`` (below): where ``_PyRuntime`` is
  and the offsets of this interpreter's build, packed from its
  perfagent.python.layout.Layout (3.8-3.12 from the generated table, 3.13+
  from the process's own _Py_DebugOffsets).  One program serves every
  version: the offsets are data.
* ``py_threads``: (tgid, pthread_t) -> the thread's PyThreadState.  The key
  is the thread's fs base, which on x86-64 *is* its pthread_t
  (``PyThreadState.thread_id``) with glibc and musl, read by the program
  from ``current->thread.fsbase``: uniform for every version, no tid and
  pid-namespace translation.  User space fills it from the reader's thread
  list every drain cycle; a thread it does not know yet (created since, or
  reusing a recycled pthread struct) is looked up by the program itself in
  the interpreters' thread lists (bounded), and the entry cached.  Every
  use is validated: the thread state's own thread_id must be the fs base.

The walk (``emit_python_walk``):

* 3.8-3.10 (model 1): ``tstate->frame``, then ``f_back``; a frame's
  instruction is ``f_lasti`` (stored as is).
* 3.11+ (model 2): the current frame from ``tstate->cframe->current_frame``
  (3.11, 3.12) or ``tstate->current_frame`` (3.13+), then ``previous``; a
  frame's instruction is stored as its byte offset in the code
  (``prev_instr``/``instr_ptr`` minus the code's first instruction).  A
  frame whose owner marks the C stack (3.12+: owner >= the shim value) is
  not a Python frame: it becomes a PYFRAME_LINK entry holding its own
  address, a local of the ``_PyEval_EvalFrameDefault`` call that ran the
  frames before it.  In 3.11 a frame with ``is_entry`` ends its eval call;
  the link is that call's ``_PyCFrame``, followed through ``previous``.
* Each frame costs one bpf_probe_read_user of the frame's head (all the
  fields the walk needs lie in its first FRAME_READ bytes); the walk stops
  at PY_MAX_FRAMES entries (PYSTACK_TRUNCATED) or at an unreadable pointer
  (PYSTACK_BAD_READ).
"""

from __future__ import annotations

import struct
from typing import Optional

from perfagent.records import NamedTuple
from perfagent.bpf import syscall as sc
from perfagent.bpf.asm import B, DW, FP, R0, R1, R2, R3, R4, R5, R6, R8, R9, W, Program
from perfagent.bpf.maps import HashMap, Map
from perfagent.python.layout import FRAME_OBJECT, Layout
from perfagent.stackprog.capture import BUF, bpf_loop_supported
from perfagent.stackprog.layout import (
    PY_MAX_FRAMES, PYFRAME_LINENO_MASK, PYFRAME_LINK, PYSTACK_BAD_READ, PYSTACK_HDR, PYSTACK_NO_THREAD,
    PYSTACK_TRUNCATED, PYTHON_OFF,
)

MODEL_FRAME_OBJECT = 1
MODEL_INTERPRETER_FRAME = 2

# struct py_proc {
#     __u64 runtime;           0   _PyRuntime
#     __u64 code_tag_mask;     8   bits to clear in a frame's code pointer (3.14+ stack refs)
#     __u32 model;             16  MODEL_*
#     __u32 interp_head;       20  _PyRuntimeState.interpreters.head
#     __u32 interp_next;       24  PyInterpreterState.next
#     __u32 interp_threads;    28  PyInterpreterState.threads.head (tstate_head)
#     __u32 tstate_next;       32  PyThreadState.next
#     __u32 tstate_thread_id;  36  PyThreadState.thread_id (pthread_t)
#     __u32 tstate_frame;      40  frame (3.8-3.10) / current_frame (3.13+) / NONE
#     __u32 tstate_cframe;     44  cframe (3.11, 3.12) / NONE
#     __u32 cframe_current;    48  _PyCFrame.current_frame
#     __u32 cframe_previous;   52  _PyCFrame.previous
#     __u32 frame_back;        56  f_back / previous
#     __u32 frame_code;        60  f_code / f_executable
#     __u32 frame_instr;       64  f_lasti / prev_instr / instr_ptr
#     __u32 frame_owner;       68  owner (3.12+) / NONE
#     __u32 frame_is_entry;    72  is_entry (3.11) / NONE
#     __u32 owner_shim;        76  owner >= this: a C-stack frame (3.12+); 256 when none
#     __u32 code_adaptive;     80  offsetof(PyCodeObject, co_code_adaptive) (3.11+)
#     __u32 code_firstlineno;  84  offsetof(PyCodeObject, co_firstlineno)
#     __u32 tstate_prev;       88  PyThreadState.prev
#     __u32 tstate_interp;     92  PyThreadState.interp
# };                           96
PY_PROC = struct.Struct("<QQIIIIIIIIIIIIIIIIIIII")
assert PY_PROC.size == 96
NONE = 0xFFFF  # an absent member: never read (the code tests before using it)

# The thread map: struct { __u32 tgid; __u32 pad; __u64 pthread; } -> __u64 tstate
PY_THREAD_KEY = struct.Struct("<IIQ")
U64 = struct.Struct("<Q")

#: Bytes of a frame read at once: every field the walk uses must lie below.
FRAME_READ = 128
#: Bounds of the program's own search for a thread state it was not given:
#: inline (no bpf_loop), SEARCH_THREADS threads of each of
#: SEARCH_INTERPRETERS interpreters; through bpf_loop, as many steps in all
#: (an interpreter's head or one thread state each), shared as the lists
#: come: a main interpreter with many threads is searched further.
SEARCH_INTERPRETERS = 4
SEARCH_THREADS = 32

DEFAULT_MAX_PROCS = 4096
DEFAULT_MAX_THREADS = 65536

# Where the walk keeps its state, on the program's stack (offsets from r10),
# below what perfagent.stackprog.program uses (down to -144).
OFF_PY_KEY = -168          # struct py_thread_key
OFF_PY_TSTATE = -176       # u64
OFF_PY_CFRAME = -192       # u64: 3.11's current _PyCFrame
OFF_PY_FRAME = -200        # u64: the frame being read
OFF_PY_HEAD = -200 - FRAME_READ   # the frame's first FRAME_READ bytes
OFF_PY_T = OFF_PY_HEAD - 8        # u64 scratch
OFF_PY_T2 = OFF_PY_T - 8          # u64 scratch
OFF_PY_LINENO = OFF_PY_T2 - 8     # u64: a code object's co_firstlineno
assert OFF_PY_LINENO >= -512


class PyWalkMaps(NamedTuple):
    procs: Map                 # tgid -> struct py_proc
    threads: Map               # struct py_thread_key -> tstate
    fsbase_off: int            # offsetof(task_struct, thread.fsbase)


def pack_proc(runtime: int, layout: Layout) -> bytes:
    """The ``struct py_proc`` of one interpreter."""
    model = MODEL_FRAME_OBJECT if layout.frame_model == FRAME_OBJECT else MODEL_INTERPRETER_FRAME

    def o(v: Optional[int]) -> int:
        return NONE if v is None else v

    # The walk reads the frame's head once and takes the u64 members at
    # 8-aligned offsets (masked for the verifier), the u8 ones anywhere.
    for field, aligned in ((layout.frame_back, True), (layout.frame_code, True),
                           (layout.frame_instr, True), (layout.frame_owner, False),
                           (layout.frame_is_entry, False)):
        if field is None:
            continue
        if field + (8 if aligned else 1) > FRAME_READ or (aligned and field % 8):
            raise ValueError("frame member at %d is not where the walk can read it" % field)
    return PY_PROC.pack(
        runtime, layout.code_tag_mask or 0, model,
        layout.runtime_interpreters_head, layout.interp_next, o(layout.interp_threads_head),
        layout.tstate_next, layout.tstate_thread_id,
        o(layout.tstate_frame), o(layout.tstate_cframe),
        o(layout.cframe_current_frame), o(layout.cframe_previous),
        layout.frame_back, layout.frame_code, layout.frame_instr,
        o(layout.frame_owner), o(layout.frame_is_entry),
        layout.frame_owner_shim if layout.frame_owner_shim is not None else 256,
        o(layout.code_adaptive), layout.code_firstlineno,
        layout.tstate_prev if layout.tstate_prev is not None else NONE, layout.tstate_interp)


def make_maps(fsbase_off: int, max_procs: int = DEFAULT_MAX_PROCS,
              max_threads: int = DEFAULT_MAX_THREADS) -> PyWalkMaps:
    procs = HashMap(4, PY_PROC.size, max_procs, name="py_procs")
    try:
        threads = Map(sc.BPF_MAP_TYPE_LRU_HASH, PY_THREAD_KEY.size, 8, max_threads, name="py_threads")
    except BaseException:
        procs.close()
        raise
    return PyWalkMaps(procs, threads, fsbase_off)


def fsbase_offset() -> int:
    """offsetof(struct task_struct, thread.fsbase) on this kernel (x86-64)."""
    from perfagent.bpf.btf import vmlinux
    return vmlinux().member("task_struct", "thread.fsbase").offset


def _read_user(p: Program, dst_off: int, size: int, src, base=FP) -> None:
    """base+dst_off = size bytes at user address ``src`` (a register); r0 = result."""
    p.mov(R1, base).add(R1, dst_off)
    p.mov(R2, size)
    p.mov(R3, src)
    p.call("probe_read_user")


def _proc_field(p: Program, dst, field_off: int) -> None:
    """dst = (u32) proc->field (r8 holds the py_proc pointer)."""
    p.ldx(W, dst, R8, field_off)


def _read_member(p: Program, dst_off: int, ptr, field_off: int, fail: str, base=FP) -> None:
    """base+dst_off = the u64 member at ``ptr`` (a register) + proc->field
    (its offset in the target's struct, from the py_proc at r8); goto fail
    when it cannot be read.  Uses r0-r3."""
    _proc_field(p, R3, field_off)
    p.add(R3, ptr)
    _read_user(p, dst_off, 8, R3, base)
    p.jne(R0, 0, fail)


def _thread_ids(p: Program, tstate, base, read_off: int, pthread_off: int, fail: str) -> None:
    """r1 = the thread state's thread_id (read into base+read_off), r2 =
    this thread's pthread_t (at base+pthread_off); goto fail when the read
    fails."""
    _read_member(p, read_off, tstate, 36, fail, base)
    p.ldx(DW, R1, base, read_off)
    p.ldx(DW, R2, base, pthread_off)


def _head_u64(p: Program, dst, field_off: int, tag: str, head: int = OFF_PY_HEAD, base=FP) -> None:
    """dst = the u64 at proc->field within the frame head read at base+head.

    The member offset comes from the map: bounded with a mask so the
    verifier sees a read inside the stack buffer."""
    p.ldx(W, R1, R8, field_off)
    p.and_(R1, FRAME_READ - 8)       # FRAME_READ is a power of two; 8-byte aligned members
    p.mov(R2, base).add(R2, head)
    p.add(R2, R1)
    p.ldx(DW, dst, R2, 0)


def _head_u8(p: Program, dst, field_off: int, head: int = OFF_PY_HEAD, base=FP) -> None:
    p.ldx(W, R1, R8, field_off)
    p.and_(R1, FRAME_READ - 1)
    p.mov(R2, base).add(R2, head)
    p.add(R2, R1)
    p.ldx(B, dst, R2, 0)


def _emit_entry(p: Program, code_reg, instr_reg, flags: int, tag: str, lineno: bool = False,
                slots=None) -> None:
    """frames[n] = {code, instr, flags}; n += 1 (n is pystack.n).  Uses r1.

    With ``lineno``, flags is the code object's co_firstlineno, read now
    (OFF_PY_T holds the code address).  The count lives in the map value,
    not in a register or on the stack: a value loaded from a map is an
    unknown scalar to the verifier, so the states after any number of
    entries are alike and prune; an exact count would make every unrolled
    frame a different state per count.
    """
    s = slots or _MAIN_SLOTS
    p.ldx(W, R1, BUF, PYTHON_OFF)
    p.jge(R1, PY_MAX_FRAMES, tag + "_full")
    if lineno:
        p.stx(DW, s.base, code_reg, s.t)
        p.stx(DW, s.base, instr_reg, s.t2)
        p.ldx(DW, R3, s.base, s.t)
        _proc_field(p, R1, 84)
        p.add(R3, R1)
        p.st(DW, s.base, s.lineno, 0)
        _read_user(p, s.lineno, 4, R3, s.base)         # co_firstlineno, at the sample's instant
        p.ldx(DW, code_reg, s.base, s.t)
        p.ldx(DW, instr_reg, s.base, s.t2)
        p.ldx(W, R1, BUF, PYTHON_OFF)
        p.jge(R1, PY_MAX_FRAMES, tag + "_full")
    p.lsh(R1, 4)                                   # * PYFRAME_SIZE (16)
    p.add(R1, BUF)
    p.stx(DW, R1, code_reg, PYTHON_OFF + PYSTACK_HDR.size + 0)
    p.stx(W, R1, instr_reg, PYTHON_OFF + PYSTACK_HDR.size + 8)
    if lineno:
        p.ldx(W, R2, s.base, s.lineno)
        p.and_(R2, PYFRAME_LINENO_MASK)
        p.stx(W, R1, R2, PYTHON_OFF + PYSTACK_HDR.size + 12)
    else:
        imm = flags - (1 << 32) if flags >= 1 << 31 else flags   # the u32's bits as an s32 immediate
        p.st(W, R1, PYTHON_OFF + PYSTACK_HDR.size + 12, imm)
    p.ldx(W, R1, BUF, PYTHON_OFF)
    p.add(R1, 1)
    p.stx(W, BUF, R1, PYTHON_OFF)
    p.label(tag + "_full")


def _set_flag(p: Program, flag: int) -> None:
    p.ldx(W, R1, BUF, PYTHON_OFF + 4)
    p.or_(R1, flag)
    p.stx(W, BUF, R1, PYTHON_OFF + 4)


def emit_python_walk(maps: PyWalkMaps, key_tgid_off: int, use_loop: Optional[bool] = None):
    """A ``python_walk(p, tag)`` for perfagent.stackprog.program.emit_capture.

    ``key_tgid_off``: the stack slot holding the current tgid (u32).  The
    walk writes ``struct pystack`` at buf+PYTHON_OFF.  Uses r8 (the py_proc
    pointer) and r9 (the frame), r0-r5, and the stack slots above.

    ``use_loop`` (default: when the kernel has it) walks the frames through
    bpf_loop; the returned function's ``callbacks(p)`` then emits the
    callbacks, once, after the program's last exit (emit_callbacks).
    """
    if use_loop is None:
        use_loop = bpf_loop_supported()
    frames = _loop_frames if use_loop else _walk_frames

    def walk(p: Program, tag: str) -> None:
        t = tag
        done = t + "_done"
        p.st(DW, BUF, PYTHON_OFF, 0)                           # n = 0, flags = 0
        p.ld_map_fd(R1, maps.procs)
        p.mov(R2, FP).add(R2, key_tgid_off)
        p.call("map_lookup_elem")
        p.jeq(R0, 0, done)                                     # not a CPython process
        p.mov(R8, R0)
        # -- which thread state: the fs base is the thread's pthread_t --------
        p.copy_mem(W, FP, OFF_PY_KEY + 0, FP, key_tgid_off)
        p.st(W, FP, OFF_PY_KEY + 4, 0)
        p.call("get_current_task_btf")
        p.copy_mem(DW, FP, OFF_PY_KEY + 8, R0, maps.fsbase_off)
        p.ld_map_fd(R1, maps.threads)
        p.mov(R2, FP).add(R2, OFF_PY_KEY)
        p.call("map_lookup_elem")
        p.jeq(R0, 0, t + "_search")
        p.ldx(DW, R9, R0, 0)                                   # the cached tstate ...
        p.stx(DW, FP, R9, OFF_PY_TSTATE)
        _thread_ids(p, R9, FP, OFF_PY_T, OFF_PY_KEY + 8, t + "_search")   # ... validated
        p.jne(R1, R2, t + "_search")
        # ... and still linked: glibc reuses a dead thread's pthread struct
        # (same fs base) for a new one, and a freed thread state may still
        # hold the old thread_id: prev->next, or interp's first thread when
        # it has no prev, must be this thread state.
        _proc_field(p, R1, 88)
        p.jeq(R1, NONE, t + "_walk")
        p.ldx(DW, R3, FP, OFF_PY_TSTATE)
        p.add(R3, R1)
        _read_user(p, OFF_PY_T, 8, R3)                         # prev
        p.jne(R0, 0, t + "_search")
        p.ldx(DW, R3, FP, OFF_PY_T)
        p.jeq(R3, 0, t + "_first")
        _proc_field(p, R1, 32)
        p.add(R3, R1)                                          # &prev->next
        p.ja(t + "_linked")
        p.label(t + "_first")
        _proc_field(p, R1, 92)
        p.ldx(DW, R3, FP, OFF_PY_TSTATE)
        p.add(R3, R1)
        _read_user(p, OFF_PY_T, 8, R3)                         # tstate->interp
        p.jne(R0, 0, t + "_search")
        p.ldx(DW, R3, FP, OFF_PY_T)
        _proc_field(p, R1, 28)
        p.add(R3, R1)                                          # &interp->threads.head
        p.label(t + "_linked")
        _read_user(p, OFF_PY_T, 8, R3)
        p.jne(R0, 0, t + "_search")
        p.ldx(DW, R1, FP, OFF_PY_T)
        p.ldx(DW, R2, FP, OFF_PY_TSTATE)
        p.jeq(R1, R2, t + "_walk")

        # -- not known (yet): search the interpreters' thread lists ------------
        p.label(t + "_search")
        p.ldx(DW, R3, R8, 0)                                   # runtime
        _proc_field(p, R1, 20)
        p.add(R3, R1)
        _read_user(p, OFF_PY_FRAME, 8, R3)                     # interp = runtime->interpreters.head
        p.jne(R0, 0, t + "_nothread")
        if use_loop:
            _loop_search(p, t)
        else:
            _unrolled_search(p, t)
        p.ja(t + "_nothread")
        p.label(t + "_found")
        p.ld_map_fd(R1, maps.threads)                          # cache it
        p.mov(R2, FP).add(R2, OFF_PY_KEY)
        p.mov(R3, FP).add(R3, OFF_PY_TSTATE)
        p.mov(R4, sc.BPF_ANY)
        p.call("map_update_elem")
        p.ja(t + "_walk")
        p.label(t + "_nothread")
        _set_flag(p, PYSTACK_NO_THREAD)
        p.ja(done)

        # -- the walk -----------------------------------------------------------
        p.label(t + "_walk")
        p.st(DW, FP, OFF_PY_CFRAME, 0)
        p.ldx(DW, R9, FP, OFF_PY_TSTATE)
        _proc_field(p, R1, 44)                                 # tstate_cframe
        p.jeq(R1, 0xFFFF, t + "_no_cframe")
        p.mov(R3, R9).add(R3, R1)
        _read_user(p, OFF_PY_CFRAME, 8, R3)                    # cframe = tstate->cframe
        p.jne(R0, 0, t + "_bad")
        p.ldx(DW, R3, FP, OFF_PY_CFRAME)
        _proc_field(p, R1, 48)
        p.add(R3, R1)
        _read_user(p, OFF_PY_FRAME, 8, R3)                     # frame = cframe->current_frame
        p.jne(R0, 0, t + "_bad")
        p.ja(t + "_model")
        p.label(t + "_no_cframe")
        _proc_field(p, R1, 40)
        p.mov(R3, R9).add(R3, R1)
        _read_user(p, OFF_PY_FRAME, 8, R3)                     # frame = tstate->frame / current_frame
        p.jne(R0, 0, t + "_bad")
        p.label(t + "_model")
        _proc_field(p, R1, 16)
        p.jeq(R1, MODEL_FRAME_OBJECT, t + "_m1")
        frames(p, t, MODEL_INTERPRETER_FRAME)
        p.ja(t + "_count")
        p.label(t + "_m1")
        frames(p, t, MODEL_FRAME_OBJECT)
        p.label(t + "_count")
        p.ja(done)
        p.label(t + "_bad")
        _set_flag(p, PYSTACK_BAD_READ)
        p.label(done)

    walk.callbacks = emit_frame_callbacks if use_loop else None
    return walk


def _unrolled_search(p: Program, t: str) -> None:
    """The thread search without bpf_loop (Linux < 5.17): SEARCH_THREADS
    threads of each of SEARCH_INTERPRETERS interpreters, inline.  Starts
    with the first interpreter at fp+OFF_PY_FRAME; goes to t_found with the
    thread state at fp+OFF_PY_TSTATE, or falls through (not found)."""
    for k in range(SEARCH_INTERPRETERS):
        ik = "%s_i%d" % (t, k)
        p.ldx(DW, R9, FP, OFF_PY_FRAME)                    # the interpreter
        p.jeq(R9, 0, t + "_nothread")
        _read_member(p, OFF_PY_TSTATE, R9, 28, t + "_nothread")    # its first thread state
        for j in range(SEARCH_THREADS):
            tj = "%s_t%d" % (ik, j)
            p.ldx(DW, R9, FP, OFF_PY_TSTATE)
            p.jeq(R9, 0, ik + "_next")
            _thread_ids(p, R9, FP, OFF_PY_T, OFF_PY_KEY + 8, ik + "_next")
            p.jeq(R1, R2, t + "_found")
            _read_member(p, OFF_PY_TSTATE, R9, 32, ik + "_next")   # tstate = tstate->next
            p.label(tj + "_end")
        p.label(ik + "_next")
        p.ldx(DW, R9, FP, OFF_PY_FRAME)
        _read_member(p, OFF_PY_FRAME, R9, 24, t + "_nothread")     # interp = interp->next


def _loop_search(p: Program, t: str) -> None:
    """The thread search through bpf_loop (SEARCH_CALLBACK, one thread or
    interpreter per call): the verifier checks one step instead of the
    SEARCH_INTERPRETERS x SEARCH_THREADS of the inline search (2,700
    instructions, a fifth of the program's verification).  Starts with the
    first interpreter at fp+OFF_PY_FRAME; goes to t_found with the thread
    state at fp+OFF_PY_TSTATE, or falls through (not found)."""
    p.st(DW, FP, OFF_PY_TSTATE, 0)                             # the interpreter's head next
    p.st(DW, FP, OFF_PY_CTX + S_FOUND, 0)
    p.stx(DW, FP, R8, OFF_PY_CTX + S_PROC)
    p.mov(R1, SEARCH_INTERPRETERS * (SEARCH_THREADS + 1))
    p.ld_func(R2, SEARCH_CALLBACK)
    p.mov(R3, FP).add(R3, OFF_PY_CTX)
    p.mov(R4, 0)
    p.call("loop")
    p.ldx(DW, R1, FP, OFF_PY_CTX + S_FOUND)
    p.jne(R1, 0, t + "_found")


def emit_search_callback(p: Program) -> None:
    """``long py_search(u32 index, void *ctx)``: one step of the thread
    search: read an interpreter's first thread state, or compare a thread
    state's thread_id with this thread's pthread_t and go to the next one
    (the next interpreter after the last).  Returns 1 once found
    (ctx S_FOUND set) or at the end of the interpreters."""
    c = SEARCH_CALLBACK
    ctx = _CB_CTX
    p.label(c)
    p.mov(ctx, R2)
    p.ldx(DW, R8, ctx, S_PROC)
    p.ldx(DW, R9, ctx, S_TSTATE)
    p.jne(R9, 0, c + "_thread")
    p.ldx(DW, R9, ctx, S_INTERP)                           # the interpreter's first thread
    p.jeq(R9, 0, c + "_stop")
    _read_member(p, S_TSTATE, R9, 28, c + "_stop", ctx)           # interp->threads.head
    p.ldx(DW, R9, ctx, S_TSTATE)
    p.jeq(R9, 0, c + "_next_interp")
    p.mov(R0, 0)
    p.exit()
    p.label(c + "_thread")
    _thread_ids(p, R9, ctx, S_T, S_PTHREAD, c + "_next_interp")
    p.jne(R1, R2, c + "_advance")
    p.st(DW, ctx, S_FOUND, 1)
    p.ja(c + "_stop")
    p.label(c + "_advance")
    _read_member(p, S_TSTATE, R9, 32, c + "_next_interp", ctx)    # tstate = tstate->next
    p.ldx(DW, R9, ctx, S_TSTATE)
    p.jeq(R9, 0, c + "_next_interp")
    p.mov(R0, 0)
    p.exit()
    p.label(c + "_next_interp")
    p.st(DW, ctx, S_TSTATE, 0)
    p.ldx(DW, R9, ctx, S_INTERP)
    _read_member(p, S_INTERP, R9, 24, c + "_stop", ctx)           # interp = interp->next
    p.mov(R0, 0)
    p.exit()
    p.label(c + "_stop")
    p.mov(R0, 1)
    p.exit()


def emit_callbacks(p: Program, python_walk) -> None:
    """The subprograms ``python_walk`` (emit_python_walk's, or None) calls:
    for a program builder to call after its main program's last exit."""
    callbacks = getattr(python_walk, "callbacks", None)
    if callbacks is not None:
        callbacks(p)


class _Slots(NamedTuple):
    """Where one frame step keeps its data, all on the main program's stack:
    reached from r10 in the bounded loop, through the bpf_loop context
    pointer in the callback (which then needs no stack of its own: older
    kernels count a callback's stack in the program's 512 bytes)."""

    base: object       # the register the offsets below are from
    head: int          # the frame's first FRAME_READ bytes
    t: int             # u64 scratch
    t2: int            # u64 scratch
    lineno: int        # u64: a code object's co_firstlineno
    frame: tuple       # (reg, off) of the u64 frame pointer
    cframe: tuple      # (reg, off) of 3.11's current _PyCFrame


#: The bounded loops' slots: all on the main program's stack.
_MAIN_SLOTS = _Slots(FP, OFF_PY_HEAD, OFF_PY_T, OFF_PY_T2, OFF_PY_LINENO, (FP, OFF_PY_FRAME), (FP, OFF_PY_CFRAME))

# -- the bpf_loop variant --------------------------------------------------------
# The callback ``long py_frame_mN(u32 index, void *ctx)`` reads one frame.
# ctx points into the main program's stack at OFF_PY_CTX; every slot of
# the walk is reached from there, and the capture buffer and py_proc
# pointers are spilled in the thread key's slots (dead once the thread
# state is known).
OFF_PY_CTX = OFF_PY_HEAD
CTX_BUF = OFF_PY_KEY - OFF_PY_CTX
CTX_PROC = OFF_PY_KEY + 8 - OFF_PY_CTX
_CB_CTX = R6
_CB_SLOTS = _Slots(_CB_CTX, 0, OFF_PY_T - OFF_PY_CTX, OFF_PY_T2 - OFF_PY_CTX, OFF_PY_LINENO - OFF_PY_CTX,
                   (_CB_CTX, OFF_PY_FRAME - OFF_PY_CTX), (_CB_CTX, OFF_PY_CFRAME - OFF_PY_CTX))
# The thread search's slots in the same ctx (the frame's head is not read
# yet, the cframe not set: both free; the thread key is live).
S_PROC = 0                                  # the py_proc pointer
S_FOUND = OFF_PY_CFRAME - OFF_PY_CTX        # u64: 1 once found
S_INTERP = OFF_PY_FRAME - OFF_PY_CTX        # u64: the interpreter searched
S_TSTATE = OFF_PY_TSTATE - OFF_PY_CTX       # u64: the thread state looked at (0: the head next)
S_PTHREAD = OFF_PY_KEY + 8 - OFF_PY_CTX     # u64: this thread's pthread_t
S_T = OFF_PY_T - OFF_PY_CTX                 # u64: a read
SEARCH_CALLBACK = "py_search"
FRAME_CALLBACKS = {MODEL_FRAME_OBJECT: "py_frame_m1", MODEL_INTERPRETER_FRAME: "py_frame_m2"}


def _frame_m1(p: Program, t: str, s: _Slots, bad: str) -> None:
    """One PyFrameObject (r3 holds its address): its entry, then frame = f_back."""
    _read_user(p, s.head, FRAME_READ, R3, s.base)
    p.jne(R0, 0, bad)
    _head_u64(p, R4, 60, t + "_code", s.head, s.base)                   # f_code
    _head_u64(p, R5, 64, t + "_lasti", s.head, s.base)                  # f_lasti (an int: the low 32 bits)
    _emit_entry(p, R4, R5, 0, t + "_e", lineno=True, slots=s)
    _head_u64(p, R3, 56, t + "_back", s.head, s.base)                   # f_back
    p.stx(DW, s.frame[0], R3, s.frame[1])


def _frame_m2(p: Program, t: str, s: _Slots, bad: str) -> None:
    """One _PyInterpreterFrame (r3 holds its address): a link for a C-stack
    frame, else its entry (and 3.11's cframe link); then frame = previous."""
    _read_user(p, s.head, FRAME_READ, R3, s.base)
    p.jne(R0, 0, bad)
    # A frame owned by the C stack (3.12+): a link, not a Python frame.
    _proc_field(p, R1, 68)
    p.jeq(R1, 0xFFFF, t + "_python")
    _head_u8(p, R4, 68, s.head, s.base)
    _proc_field(p, R1, 76)
    p.jlt(R4, R1, t + "_python")
    p.ldx(DW, R4, s.frame[0], s.frame[1])
    p.mov(R5, 0)
    _emit_entry(p, R4, R5, PYFRAME_LINK, t + "_link", slots=s)
    p.ja(t + "_next")
    p.label(t + "_python")
    _head_u64(p, R4, 60, t + "_code", s.head, s.base)                   # f_code / f_executable
    p.ldx(DW, R1, R8, 8)
    p.xor(R1, -1)
    p.and_(R4, R1)                                              # clear the stack-ref tag bits
    _head_u64(p, R5, 64, t + "_instr", s.head, s.base)                  # prev_instr / instr_ptr
    p.sub(R5, R4)
    _proc_field(p, R1, 80)
    p.sub(R5, R1)                                               # byte offset in the code
    _emit_entry(p, R4, R5, 0, t + "_e", lineno=True, slots=s)
    # 3.11: is_entry ends this eval call; its link is the current _PyCFrame.
    _proc_field(p, R1, 72)
    p.jeq(R1, 0xFFFF, t + "_next")
    _head_u8(p, R4, 72, s.head, s.base)
    p.jeq(R4, 0, t + "_next")
    p.ldx(DW, R4, s.cframe[0], s.cframe[1])
    p.mov(R5, 0)
    _emit_entry(p, R4, R5, PYFRAME_LINK, t + "_cf", slots=s)
    p.ldx(DW, R3, s.cframe[0], s.cframe[1])
    p.jeq(R3, 0, t + "_next")
    _proc_field(p, R1, 52)
    p.add(R3, R1)
    _read_user(p, s.t, 8, R3, s.base)                           # cframe = cframe->previous
    p.ldx(DW, R1, s.base, s.t)
    p.jeq(R0, 0, t + "_cf_set")
    p.mov(R1, 0)
    p.label(t + "_cf_set")
    p.stx(DW, s.cframe[0], R1, s.cframe[1])
    p.label(t + "_next")
    _head_u64(p, R3, 56, t + "_back", s.head, s.base)                   # previous
    p.stx(DW, s.frame[0], R3, s.frame[1])


_FRAME_STEPS = {MODEL_FRAME_OBJECT: _frame_m1, MODEL_INTERPRETER_FRAME: _frame_m2}


def _walk_frames(p: Program, t: str, model: int) -> None:
    """Every frame of the chain, as a bounded loop: r9 counts the frames (the
    verifier walks each of the PY_MAX_FRAMES iterations), for kernels
    without bpf_loop.  A link counts as an entry, not as a frame."""
    k = R9
    m = "%s_m%d" % (t, model)
    p.mov(k, 0)
    p.label(m + "_loop")
    p.ldx(DW, R3, FP, OFF_PY_FRAME)
    p.jeq(R3, 0, m + "_end")
    p.jge(k, PY_MAX_FRAMES, m + "_truncated")
    _FRAME_STEPS[model](p, m, _MAIN_SLOTS, m + "_bad")
    p.add(k, 1)
    p.ja(m + "_loop")
    p.label(m + "_truncated")
    _set_flag(p, PYSTACK_TRUNCATED)
    p.ja(m + "_end")
    p.label(m + "_bad")
    _set_flag(p, PYSTACK_BAD_READ)
    p.label(m + "_end")


def _loop_frames(p: Program, t: str, model: int) -> None:
    """Every frame of the chain through bpf_loop (Linux 5.17+): the verifier
    checks the callback's one frame instead of each of PY_MAX_FRAMES
    iterations of an inline loop.  The callback returns 1 at the chain's
    end or an unreadable frame (which it flags, clearing the frame slot);
    a frame still pending after the last iteration is a truncation."""
    m = "%s_m%d" % (t, model)
    p.stx(DW, FP, BUF, OFF_PY_CTX + CTX_BUF)                    # (the thread key is dead now)
    p.stx(DW, FP, R8, OFF_PY_CTX + CTX_PROC)
    p.mov(R1, PY_MAX_FRAMES)
    p.ld_func(R2, FRAME_CALLBACKS[model])
    p.mov(R3, FP).add(R3, OFF_PY_CTX)
    p.mov(R4, 0)
    p.call("loop")
    p.ldx(DW, R3, FP, OFF_PY_FRAME)
    p.jeq(R3, 0, m + "_end")
    _set_flag(p, PYSTACK_TRUNCATED)
    p.label(m + "_end")


def emit_frame_callbacks(p: Program) -> None:
    """The bpf_loop callbacks of _loop_frames and _loop_search; emit once per
    program, after the main program's last exit (emit_python_walk's
    ``callbacks``)."""
    emit_search_callback(p)
    for model, label in sorted(FRAME_CALLBACKS.items()):
        c = label
        p.label(label)
        p.mov(_CB_CTX, R2)
        p.ldx(DW, BUF, _CB_CTX, CTX_BUF)
        p.ldx(DW, R8, _CB_CTX, CTX_PROC)
        p.ldx(DW, R3, _CB_CTX, _CB_SLOTS.frame[1])
        p.jeq(R3, 0, c + "_stop")
        _FRAME_STEPS[model](p, c + "_f", _CB_SLOTS, c + "_bad")
        p.mov(R0, 0)
        p.exit()
        p.label(c + "_bad")
        _set_flag(p, PYSTACK_BAD_READ)
        p.st(DW, _CB_CTX, _CB_SLOTS.frame[1], 0)
        p.label(c + "_stop")
        p.mov(R0, 1)
        p.exit()
