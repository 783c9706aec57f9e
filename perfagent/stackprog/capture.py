"""Emitters for the capture both stack programs share (see the package docstring).

Register conventions inside a program built here: ``r6`` holds the
program's context for its whole life, ``r7`` the capture buffer (this
CPU's scratch slot, a map value pointer) once :func:`emit_scratch` found it;
``r8`` and ``r9`` are free for the caller between emitters.  Every emitter
clobbers r0-r5 (helper calls do).  Stack slots (offsets from r10) are the
caller's: each emitter says which it uses.

Every loop here is a bounded loop the verifier walks (Linux 5.3+): a
counter compared with a constant bound, pointers advanced by constants;
the hashes also come as bpf_loop callbacks (5.17+), verified once.
"""

from __future__ import annotations

from typing import Optional, Tuple

from perfagent.records import NamedTuple
from perfagent.bpf import syscall as sc
from perfagent.bpf.asm import DW, FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, W, Program, Reg
from perfagent.bpf.maps import ArrayMap, HashMap
from perfagent.stackprog.layout import (
    CAPTURE_USER, H_FLAGS, H_REGS, H_STACK_SIZE, KERNEL_OFF, PERF_MAX_STACK_DEPTH, PYFRAME_SIZE,
    PYSTACK_HDR, PYTHON_OFF, STACK_IPS_OFF, STACK_N_OFF, STACK_OFF, USER_OFF,
)
from perfagent.stackprog.store import FNV_OFFSET_BASIS, FNV_PRIME

CTX, BUF = R6, R7
PAGE_SIZE = 4096
EEXIST = 17


class CopySpec(NamedTuple):
    """What copying the user registers and stack needs (from BTF)."""

    pages: int                  # page-sized bpf_probe_read_user calls at most
    mm_off: int                 # offsetof(task_struct, mm): NULL for a kernel thread
    regs_off: Tuple[int, ...]   # offsetof(pt_regs, <arch UNWIND_PT_REGS>)


def copy_pages(copy_bytes: int) -> int:
    """Pages to read so that at least ``copy_bytes`` above sp are copied
    (the first read covers only the rest of sp's page)."""
    return (copy_bytes - 1) // PAGE_SIZE + 2


def emit_scratch(p: Program, scratch: ArrayMap, slot_off: int, fail: str) -> None:
    """``r7 = &scratch[smp_processor_id()]`` or goto ``fail``.

    The program runs with preemption (or interrupts) off, so no other
    program uses this CPU's slot until it returns.  Uses the u32 at
    fp+slot_off.
    """
    p.call("get_smp_processor_id")
    p.stx(W, FP, R0, slot_off)
    p.ld_map_fd(R1, scratch)
    p.mov(R2, FP).add(R2, slot_off)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, fail)
    p.mov(BUF, R0)


def emit_get_stack(p: Program, part_off: int, flags: int) -> None:
    """``buf->part = bpf_get_stack(ctx, ...)`` as a ``struct stack`` (n = 0 on error)."""
    p.mov(R1, CTX)
    p.mov(R2, BUF).add(R2, part_off + STACK_IPS_OFF)
    p.mov(R3, 8 * PERF_MAX_STACK_DEPTH)
    p.mov(R4, flags)
    p.call("get_stack")
    tag = "gs%d_%d" % (part_off, flags)
    p.jsge(R0, 0, tag + "_ok")
    p.mov(R0, 0)
    p.label(tag + "_ok")
    p.rsh(R0, 3)                                   # bytes -> addresses
    p.stx(W, BUF, R0, part_off + STACK_N_OFF)


def _bounded_count(p: Program, n: Reg, count_off: int, count_size: int, bound: int, out: Reg,
                   tag: str) -> None:
    """n = min(the count at buf+count_off, bound); out = 0 and goto
    tag_done when it is 0 (a hash's prologue)."""
    p.ldx(count_size, n, BUF, count_off)
    p.jle(n, bound, tag + "_bounded")
    p.mov(n, bound)
    p.label(tag + "_bounded")
    p.mov(out, 0)
    p.jeq(n, 0, tag + "_done")


def emit_hash_words(p: Program, first_word_off: int, count_off: int, count_size: int,
                    stride: int, words: Tuple[int, ...], bound: int, out: Reg, tag: str) -> None:
    """``out`` = FNV-1a over ``words`` (offsets within each element) of the
    ``n`` elements at buf+first_word_off, ``stride`` apart, n read from
    buf+count_off (``count_size`` W); 0 when n is 0.

    Uses r0-r5.  The loop runs at most ``bound`` times (the verifier's
    bound); the element pointer advances by a constant.
    """
    n, i, ptr, w = R1, R2, R3, R4
    _bounded_count(p, n, count_off, count_size, bound, out, tag)
    p.ld_imm64(out, FNV_OFFSET_BASIS)
    p.ld_imm64(R5, FNV_PRIME)
    p.mov(i, 0)
    p.mov(ptr, BUF).add(ptr, first_word_off)
    p.label(tag + "_loop")
    p.jge(i, n, tag + "_done")
    for off in words:
        p.ldx(DW, w, ptr, off)
        p.xor(out, w)
        p.mul(out, R5)
    p.add(ptr, stride)
    p.add(i, 1)
    p.ja(tag + "_loop")
    p.label(tag + "_done")


# -- the same hashes through bpf_loop ----------------------------------------
# The inline loop above costs the verifier every iteration up to its bound
# (127 or 192 of them, three loops per program: over half of what it
# walked for the on-CPU program with the Python walk).  Where the kernel
# has bpf_loop (5.17+; the JIT inlines the call) each element is one call of
# a callback verified once.  Its context, 16 bytes on the main program's
# stack: the running hash, then the spilled pointer to the first element.
HASH_CTX_HASH = 0
HASH_CTX_FIRST = 8
#: What is hashed, for either form: (bpf_loop callback label, stride, words
#: per element, bound) of a native ``struct stack`` and of the Python
#: stack's entries.
HASH_NATIVE_CB = ("hash_native", 8, (0,), PERF_MAX_STACK_DEPTH)


def hash_python_cb(bound: int) -> tuple:
    return ("hash_python", PYFRAME_SIZE, (0, 8), bound)


def emit_hash_loop(p: Program, first_word_off: int, count_off: int, count_size: int, callback: tuple,
                   ctx_off: int, out: Reg, tag: str) -> None:
    """:func:`emit_hash_words` through bpf_loop: ``out`` = the same FNV-1a,
    0 when n is 0.  ``callback`` names the bpf_loop callback (emitted once
    by :func:`emit_hash_callbacks`); fp+ctx_off..+16 is its context."""
    label, _stride, _words, bound = callback
    _bounded_count(p, R1, count_off, count_size, bound, out, tag)
    p.ld_imm64(R2, FNV_OFFSET_BASIS)
    p.stx(DW, FP, R2, ctx_off + HASH_CTX_HASH)
    p.mov(R2, BUF).add(R2, first_word_off)
    p.stx(DW, FP, R2, ctx_off + HASH_CTX_FIRST)
    p.ld_func(R2, label)
    p.mov(R3, FP).add(R3, ctx_off)
    p.mov(R4, 0)
    p.call("loop")
    p.ldx(DW, out, FP, ctx_off + HASH_CTX_HASH)
    p.label(tag + "_done")


def emit_hash_callbacks(p: Program, callbacks) -> None:
    """``long hash_*(u32 index, struct hash_ctx *c)``: the element ``index``
    folded into c->hash.  Emit once per program, after its last exit."""
    for label, stride, words, bound in callbacks:
        p.label(label)
        p.jge(R1, bound, label + "_end")              # (bpf_loop's count is bounded already)
        p.ldx(DW, R3, R2, HASH_CTX_FIRST)
        p.mul(R1, stride)
        p.add(R3, R1)
        p.ldx(DW, R0, R2, HASH_CTX_HASH)
        p.ld_imm64(R5, FNV_PRIME)
        for off in words:
            p.ldx(DW, R4, R3, off)
            p.xor(R0, R4)
            p.mul(R0, R5)
        p.stx(DW, R2, R0, HASH_CTX_HASH)
        p.mov(R0, 0)
        p.exit()
        p.label(label + "_end")
        p.mov(R0, 1)
        p.exit()


def emit_store(p: Program, store: HashMap, part_off: int, hash_slot: int, stats_drop,
               tag: str) -> None:
    """``store[hash] = buf->part`` (BPF_NOEXIST) when the hash at fp+hash_slot
    is not 0.  ``stats_drop(tag)`` emits the count of a failed insert other
    than "already there" (the store is full: that stack will be lost)."""
    p.ldx(DW, R1, FP, hash_slot)
    p.jeq(R1, 0, tag + "_stored")
    p.ld_map_fd(R1, store)
    p.mov(R2, FP).add(R2, hash_slot)
    p.mov(R3, BUF).add(R3, part_off)
    p.mov(R4, sc.BPF_NOEXIST)
    p.call("map_update_elem")
    p.jeq(R0, 0, tag + "_stored")
    p.jeq(R0, -EEXIST, tag + "_stored")
    stats_drop(tag)
    p.label(tag + "_stored")


def _emit_hash_to(p: Program, first_word_off: int, count_off: int, callback: tuple, hash_slot: int,
                  tag: str, loop_ctx: Optional[int]) -> None:
    """fp+hash_slot (u64) = the hash of the elements ``callback`` describes
    (label, stride, words, bound): inline, or with ``loop_ctx`` (a stack
    offset) through bpf_loop (see emit_hash_loop)."""
    if loop_ctx is not None:
        emit_hash_loop(p, first_word_off, count_off, W, callback, loop_ctx, R0, tag)
    else:
        _label, stride, words, bound = callback
        emit_hash_words(p, first_word_off, count_off, W, stride, words, bound, R0, tag)
    p.stx(DW, FP, R0, hash_slot)


def emit_native_hash(p: Program, part_off: int, hash_slot: int, tag: str,
                     loop_ctx: Optional[int] = None) -> None:
    """fp+hash_slot (u64) = the hash of the ``struct stack`` at buf+part_off."""
    _emit_hash_to(p, part_off + STACK_IPS_OFF, part_off + STACK_N_OFF, HASH_NATIVE_CB, hash_slot,
                  tag, loop_ctx)


def emit_python_hash(p: Program, hash_slot: int, bound: int, tag: str,
                     loop_ctx: Optional[int] = None) -> None:
    """fp+hash_slot (u64) = the hash of the Python stack: each entry's code
    object (or link address) and instruction/flags word."""
    _emit_hash_to(p, PYTHON_OFF + PYSTACK_HDR.size, PYTHON_OFF, hash_python_cb(bound), hash_slot,
                  tag, loop_ctx)


def emit_user_regs_and_copy(p: Program, copy: CopySpec, with_copy: bool, tag: str) -> None:
    """Fill the header's user registers and, ``with_copy``, the stack bytes.

    The registers are what the thread's entry into the kernel saved
    (bpf_task_pt_regs: for an interrupt from user mode that *is* the
    interrupted user context).  The copy starts at the user sp: first the
    rest of sp's page, then whole pages, one bpf_probe_read_user each,
    stopping at the first page that cannot be read without a fault (the
    top of the stack).  A kernel thread (no mm) gets neither and no
    CAPTURE_USER flag.  Uses r8, r9.
    """
    regs, sp, size = R8, R9, R8
    done = tag + "_done"
    p.st(W, BUF, H_STACK_SIZE, 0)
    p.st(W, BUF, H_FLAGS, 0)
    # current->mm read with bpf_probe_read_kernel from the task's address
    # as a scalar (into the first register slot, overwritten below): a
    # load through the BTF task pointer makes the verifier look up its
    # "__safe_trusted"/"__safe_rcu" types by name, a linear search of
    # vmlinux's BTF, for every state reaching it (about 3 ms of a 19 ms load).
    p.call("get_current_task")
    p.mov(R3, R0).add(R3, copy.mm_off)
    p.mov(R1, BUF).add(R1, H_REGS)
    p.mov(R2, 8)
    p.call("probe_read_kernel")
    p.jne(R0, 0, done)
    p.ldx(DW, R1, BUF, H_REGS)
    p.jeq(R1, 0, done)                             # a kernel thread: no user context
    p.call("get_current_task_btf")
    p.mov(R1, R0)
    p.call("task_pt_regs")
    p.mov(regs, R0)
    for i, off in enumerate(copy.regs_off):
        p.copy_mem(DW, BUF, H_REGS + 8 * i, regs, off)  # pt_regs is a BTF pointer: direct loads
    p.st(W, BUF, H_FLAGS, CAPTURE_USER)
    if not with_copy:
        p.label(done)
        return
    p.ldx(DW, sp, regs, copy.regs_off[2])          # regs dead from here: size reuses r8
    _emit_copy_from(p, copy, sp, tag, done)
    p.label(done)


def emit_stack_copy(p: Program, copy: CopySpec, tag: str) -> None:
    """The stack bytes from the sp already in the header's registers (a
    capture that first tried without them: the in-kernel walk's fallback).
    Nothing without CAPTURE_USER.  Uses r8, r9."""
    done = tag + "_done"
    p.st(W, BUF, H_STACK_SIZE, 0)
    p.ldx(W, R1, BUF, H_FLAGS)
    p.jset(R1, CAPTURE_USER, tag + "_user")
    p.ja(done)
    p.label(tag + "_user")
    p.ldx(DW, R9, BUF, H_REGS + 8 * 2)
    _emit_copy_from(p, copy, R9, tag, done)
    p.label(done)


def _emit_copy_from(p: Program, copy: CopySpec, sp: Reg, tag: str, done: str) -> None:
    size = R8
    p.mov(R1, sp).and_(R1, PAGE_SIZE - 1)
    p.mov(size, PAGE_SIZE).sub(size, R1)           # 1..PAGE_SIZE: the rest of sp's page
    p.mov(R1, BUF).add(R1, STACK_OFF)
    p.mov(R2, size)
    p.mov(R3, sp)
    p.call("probe_read_user")
    p.jne(R0, 0, done)                             # not even sp's page: no bytes
    for _ in range(1, copy.pages):
        p.mov(R1, BUF).add(R1, STACK_OFF).add(R1, size)
        p.mov(R2, PAGE_SIZE)
        p.mov(R3, sp).add(R3, size)
        p.call("probe_read_user")
        p.jne(R0, 0, tag + "_copied")
        p.add(size, PAGE_SIZE)
    p.label(tag + "_copied")
    p.stx(W, BUF, size, H_STACK_SIZE)


def emit_empty_python(p: Program) -> None:
    """No Python stack (n = 0, flags = 0)."""
    p.st(DW, BUF, PYTHON_OFF, 0)


def emit_record_size(p: Program, out: Reg, max_copy: int) -> None:
    """``out`` = bytes of the capture to send: up to the end of the copied stack."""
    p.ldx(W, out, BUF, H_STACK_SIZE)
    p.jle(out, max_copy, "size_bounded")
    p.mov(out, 0)
    p.label("size_bounded")
    p.add(out, STACK_OFF)


#: The share of a ring's bytes waiting to be read at which a record wakes
#: the reader (see emit_ringbuf_output).
WAKE_SHARE = 4


def emit_ringbuf_output(p: Program, ring, size: Reg, dropped) -> None:
    """bpf_ringbuf_output(ring, buf, size, flags); ``dropped(tag)`` counts a
    full ring.

    No wakeup per record (a busy program would wake the reader thousands
    of times a second), but a forced one once a quarter of the ring waits
    (bpf_ringbuf_query's BPF_RB_AVAIL_DATA), as the perf rings' watermark
    does: the reader may then wait long between drains, and the ring need
    only hold what arrives while it wakes and drains, not a whole wait's
    worth (``size`` must be a callee-saved register)."""
    p.ld_map_fd(R1, ring)
    p.mov(R2, sc.BPF_RB_AVAIL_DATA)
    p.call("ringbuf_query")                       # bytes produced, not yet consumed
    p.ld_map_fd(R1, ring)
    p.mov(R2, BUF)
    p.mov(R3, size)
    p.mov(R4, sc.BPF_RB_NO_WAKEUP)
    p.jlt(R0, ring.size // WAKE_SHARE, "ring_quiet")
    p.mov(R4, sc.BPF_RB_FORCE_WAKEUP)
    p.label("ring_quiet")
    p.call("ringbuf_output")
    p.jeq(R0, 0, "ring_sent")
    dropped("ring_full")
    p.label("ring_sent")


_loop_support: list = []


def bpf_loop_supported() -> bool:
    """Whether this kernel's verifier takes a bpf_loop call (5.17+) in a
    perf-event program; asked once per agent (a ten-instruction load)."""
    if not _loop_support:
        probe = Program("loop_probe")
        probe.mov(R1, 1)
        probe.ld_func(R2, "cb")
        probe.mov(R3, 0).mov(R4, 0)
        probe.call("loop")
        probe.mov(R0, 0).exit()
        probe.label("cb").mov(R0, 1).exit()
        try:
            probe.load(sc.BPF_PROG_TYPE_PERF_EVENT).close()
            _loop_support.append(True)
        except sc.BPFError:
            _loop_support.append(False)
    return _loop_support[0]


__all__ = ["CTX", "BUF", "CopySpec", "copy_pages", "emit_scratch", "emit_get_stack", "emit_hash_words",
           "emit_hash_loop", "emit_hash_callbacks", "bpf_loop_supported", "emit_store", "emit_native_hash",
           "emit_python_hash", "emit_user_regs_and_copy", "emit_stack_copy", "emit_empty_python",
           "emit_record_size", "emit_ringbuf_output", "KERNEL_OFF", "USER_OFF"]
