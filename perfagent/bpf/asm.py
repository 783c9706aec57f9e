"""A small eBPF assembler: programs written as method calls, not hex.

    p = Program("count")
    p.call("get_current_pid_tgid")          # r0 = tgid << 32 | tid
    p.stx(W, FP, R0, -4)                     # *(u32 *)(r10 - 4) = r0
    p.ld_map_fd(R1, counts)                  # r1 = &counts
    p.mov(R2, FP)
    p.add(R2, -4)                            # r2 = r10 - 4 (the key)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, "out")
    ...
    p.label("out")
    p.mov(R0, 0)
    p.exit()

Encoding follows include/uapi/linux/bpf.h and bpf_common.h:
``struct bpf_insn { __u8 code; __u8 dst_reg:4, src_reg:4; __s16 off; __s32 imm; }``
with ``code = class | size/op | mode/source``.  Argument orders mirror the
kernel's include/linux/filter.h macros (BPF_LDX_MEM(SIZE, DST, SRC, OFF),
BPF_STX_MEM(SIZE, DST, SRC, OFF), BPF_ST_MEM(SIZE, DST, OFF, IMM)), so a
reader who knows those recognises every line.

Labels are resolved when the program is assembled, so jumps may go forward
or backward; an undefined or duplicate label, or a jump farther than an s16
offset reaches, is an AsmError.  ``ld_map_fd`` keeps the Map object and
writes its fd at assembly time (BPF_PSEUDO_MAP_FD, which the verifier
replaces by the map's address).
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Union

from perfagent.records import NamedTuple
from perfagent.bpf.syscall import BPFError

# Instruction classes (bpf_common.h, bpf.h)
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ST = 0x02
BPF_STX = 0x03
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_JMP32 = 0x06
BPF_ALU64 = 0x07

# Sizes
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10
BPF_DW = 0x18

# Modes
BPF_IMM = 0x00
BPF_ABS = 0x20
BPF_IND = 0x40
BPF_MEM = 0x60
BPF_ATOMIC = 0xC0

# Sources
BPF_K = 0x00
BPF_X = 0x08

# ALU operations
BPF_ADD = 0x00
BPF_SUB = 0x10
BPF_MUL = 0x20
BPF_DIV = 0x30
BPF_OR = 0x40
BPF_AND = 0x50
BPF_LSH = 0x60
BPF_RSH = 0x70
BPF_NEG = 0x80
BPF_MOD = 0x90
BPF_XOR = 0xA0
BPF_MOV = 0xB0
BPF_ARSH = 0xC0

# Jump operations
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGT = 0x20
BPF_JGE = 0x30
BPF_JSET = 0x40
BPF_JNE = 0x50
BPF_JSGT = 0x60
BPF_JSGE = 0x70
BPF_CALL = 0x80
BPF_EXIT = 0x90
BPF_JLT = 0xA0
BPF_JLE = 0xB0
BPF_JSLT = 0xC0
BPF_JSLE = 0xD0

# src_reg of the first LD_IMM64 slot: imm is a map fd to relocate.
BPF_PSEUDO_MAP_FD = 1
# ... imm is the offset (in insns, from the next one) of a subprogram: a
# callback for bpf_loop (the verifier checks it as a function of its own).
BPF_PSEUDO_FUNC = 4

# Short names for sizes, as the verifier log and filter.h read them.
B, H, W, DW = BPF_B, BPF_H, BPF_W, BPF_DW

# enum bpf_func_id: the helpers the profiler's programs call.
HELPERS: Dict[str, int] = {
    "map_lookup_elem": 1,
    "map_update_elem": 2,
    "map_delete_elem": 3,
    "probe_read": 4,
    "ktime_get_ns": 5,
    "get_smp_processor_id": 8,
    "get_current_pid_tgid": 14,
    "get_current_comm": 16,
    "perf_event_output": 25,
    "get_stackid": 27,
    "get_current_task": 35,
    "get_stack": 67,
    "probe_read_user": 112,
    "probe_read_kernel": 113,
    "ktime_get_boot_ns": 125,
    "ringbuf_output": 130,
    "ringbuf_reserve": 131,
    "ringbuf_submit": 132,
    "ringbuf_discard": 133,
    "ringbuf_query": 134,
    "get_current_task_btf": 158,
    "snprintf": 165,
    "task_pt_regs": 175,
    "loop": 181,
}

# struct bpf_insn {
#     __u8  code;
#     __u8  dst_reg:4;   (low nibble on little-endian)
#     __u8  src_reg:4;   (high nibble)
#     __s16 off;
#     __s32 imm;
# };
BPF_INSN = struct.Struct("<BBhi")
INSN_SIZE = BPF_INSN.size
assert INSN_SIZE == 8

S16 = (-(1 << 15), (1 << 15) - 1)
S32 = (-(1 << 31), (1 << 31) - 1)


class AsmError(BPFError):
    """A program that cannot be encoded (bad label, operand out of range)."""


class Reg(int):
    """A register number; distinct from int so ``mov(R1, 1)`` vs ``mov(R1, R2)``
    chooses the immediate or register form."""

    def __repr__(self) -> str:
        return "r%d" % int(self)


R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = (Reg(i) for i in range(11))
FP = R10  # the read-only frame pointer; the stack is the 512 bytes below it

Operand = Union[Reg, int]


class Insn(NamedTuple):
    code: int
    dst: int
    src: int
    off: int
    imm: int

    def encode(self) -> bytes:
        return BPF_INSN.pack(self.code, (self.src << 4) | self.dst, self.off, self.imm)


def encode(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One instruction's 8 bytes."""
    return Insn(code, dst, src, off, imm).encode()


def _check_reg(r: object) -> int:
    if not isinstance(r, Reg) or not 0 <= r <= 10:
        raise AsmError("not a register: %r (use R0..R10)" % (r,))
    return int(r)


def _check_range(value: int, bounds, what: str) -> int:
    if not isinstance(value, int) or not bounds[0] <= value <= bounds[1]:
        raise AsmError("%s %r does not fit in %d bits" % (
            what, value, 16 if bounds is S16 else 32))
    return value


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


class _Slot:
    """One instruction slot before label and map resolution."""

    __slots__ = ("code", "dst", "src", "off", "imm", "target", "map", "func")

    def __init__(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0,
                 target: Optional[str] = None, map: object = None, func: bool = False) -> None:
        self.code, self.dst, self.src, self.off, self.imm = code, dst, src, off, imm
        self.target = target
        self.map = map
        self.func = func  # target is a subprogram: its offset goes in imm, not off


class Program:
    """An eBPF program under construction.  Every emitting method returns self."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._slots: List[_Slot] = []
        self._labels: Dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def _emit(self, slot: _Slot) -> "Program":
        self._slots.append(slot)
        return self

    # -- labels ---------------------------------------------------------

    def label(self, name: str) -> "Program":
        """Mark the next instruction as ``name``, a jump target."""
        if name in self._labels:
            raise AsmError("duplicate label %r" % name)
        self._labels[name] = len(self._slots)
        return self

    # -- ALU --------------------------------------------------------------

    def alu(self, cls: int, op: int, dst: Reg, src: Operand) -> "Program":
        """BPF_ALU64_REG / BPF_ALU64_IMM (or the 32-bit class)."""
        d = _check_reg(dst)
        if isinstance(src, Reg):
            return self._emit(_Slot(cls | op | BPF_X, d, _check_reg(src)))
        return self._emit(_Slot(cls | op | BPF_K, d, imm=_check_range(src, S32, "immediate")))

    def add(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU64, BPF_ADD, dst, src)
    def sub(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU64, BPF_SUB, dst, src)
    def mul(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU64, BPF_MUL, dst, src)
    def div(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU64, BPF_DIV, dst, src)
    def or_(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU64, BPF_OR, dst, src)
    def and_(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU64, BPF_AND, dst, src)
    def lsh(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU64, BPF_LSH, dst, src)
    def rsh(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU64, BPF_RSH, dst, src)
    def mod(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU64, BPF_MOD, dst, src)
    def xor(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU64, BPF_XOR, dst, src)
    def mov(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU64, BPF_MOV, dst, src)
    def arsh(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU64, BPF_ARSH, dst, src)

    def add32(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU, BPF_ADD, dst, src)
    def sub32(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU, BPF_SUB, dst, src)
    def mul32(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU, BPF_MUL, dst, src)
    def div32(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU, BPF_DIV, dst, src)
    def or32(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU, BPF_OR, dst, src)
    def and32(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU, BPF_AND, dst, src)
    def lsh32(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU, BPF_LSH, dst, src)
    def rsh32(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU, BPF_RSH, dst, src)
    def mod32(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU, BPF_MOD, dst, src)
    def xor32(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU, BPF_XOR, dst, src)
    def mov32(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU, BPF_MOV, dst, src)
    def arsh32(self, dst: Reg, src: Operand) -> "Program": return self.alu(BPF_ALU, BPF_ARSH, dst, src)

    def neg(self, dst: Reg) -> "Program":
        return self._emit(_Slot(BPF_ALU64 | BPF_NEG | BPF_K, _check_reg(dst)))

    def neg32(self, dst: Reg) -> "Program":
        return self._emit(_Slot(BPF_ALU | BPF_NEG | BPF_K, _check_reg(dst)))

    # -- 64-bit immediates and maps ---------------------------------------

    def ld_imm64(self, dst: Reg, imm: int, src: int = 0) -> "Program":
        """BPF_LD_IMM64: two slots, low then high 32 bits of ``imm``."""
        d = _check_reg(dst)
        if not -(1 << 63) <= imm < (1 << 64):
            raise AsmError("immediate %r does not fit in 64 bits" % imm)
        imm &= (1 << 64) - 1
        self._emit(_Slot(BPF_LD | BPF_DW | BPF_IMM, d, src, imm=_signed32(imm)))
        return self._emit(_Slot(0, imm=_signed32(imm >> 32)))

    def ld_map_fd(self, dst: Reg, map: object) -> "Program":
        """BPF_LD_MAP_FD: ``dst`` = the map (an object with ``.fd``, or an fd).

        The fd is read when the program is assembled, so the map must be
        open then; the verifier turns it into the map's address.
        """
        d = _check_reg(dst)
        self._emit(_Slot(BPF_LD | BPF_DW | BPF_IMM, d, BPF_PSEUDO_MAP_FD, map=map))
        return self._emit(_Slot(0))

    def ld_func(self, dst: Reg, label: str) -> "Program":
        """BPF_LD_IMM64 with BPF_PSEUDO_FUNC: ``dst`` = the subprogram at
        ``label`` (a bpf_loop callback).  The subprogram must follow the
        main program's last exit; it gets r1, r2 as arguments and returns r0."""
        d = _check_reg(dst)
        self._emit(_Slot(BPF_LD | BPF_DW | BPF_IMM, d, BPF_PSEUDO_FUNC, target=label, func=True))
        return self._emit(_Slot(0))

    # -- memory ---------------------------------------------------------------

    def ldx(self, size: int, dst: Reg, src: Reg, off: int) -> "Program":
        """BPF_LDX_MEM: ``dst = *(size *)(src + off)``."""
        return self._emit(_Slot(BPF_LDX | size | BPF_MEM, _check_reg(dst), _check_reg(src),
                                _check_range(off, S16, "offset")))

    def stx(self, size: int, dst: Reg, src: Reg, off: int) -> "Program":
        """BPF_STX_MEM: ``*(size *)(dst + off) = src``."""
        return self._emit(_Slot(BPF_STX | size | BPF_MEM, _check_reg(dst), _check_reg(src),
                                _check_range(off, S16, "offset")))

    def st(self, size: int, dst: Reg, off: int, imm: int) -> "Program":
        """BPF_ST_MEM: ``*(size *)(dst + off) = imm``."""
        return self._emit(_Slot(BPF_ST | size | BPF_MEM, _check_reg(dst), 0,
                                _check_range(off, S16, "offset"),
                                _check_range(imm, S32, "immediate")))

    def copy_mem(self, size: int, dst: Reg, dst_off: int, src: Reg, src_off: int,
                 via: Reg = R1) -> "Program":
        """``*(size *)(dst + dst_off) = *(size *)(src + src_off)`` through the
        scratch register ``via`` (BPF has no memory-to-memory move): a load
        and a store, so that filling a struct field by field reads as such."""
        self.ldx(size, via, src, src_off)
        return self.stx(size, dst, via, dst_off)

    def atomic_add(self, size: int, dst: Reg, src: Reg, off: int) -> "Program":
        """BPF_ATOMIC_OP(size, BPF_ADD, ...): ``lock *(size *)(dst + off) += src``
        (the old BPF_XADD encoding; W or DW only)."""
        if size not in (BPF_W, BPF_DW):
            raise AsmError("atomic_add needs W or DW, not size 0x%x" % size)
        return self._emit(_Slot(BPF_STX | size | BPF_ATOMIC, _check_reg(dst), _check_reg(src),
                                _check_range(off, S16, "offset"), BPF_ADD))

    # -- jumps ----------------------------------------------------------------

    def ja(self, target: str) -> "Program":
        """BPF_JMP_A: unconditional jump to label ``target``."""
        return self._emit(_Slot(BPF_JMP | BPF_JA, target=target))

    def jmp(self, cls: int, op: int, dst: Reg, src: Operand, target: str) -> "Program":
        """BPF_JMP_REG / BPF_JMP_IMM (or BPF_JMP32_*): ``if dst op src goto target``."""
        d = _check_reg(dst)
        if isinstance(src, Reg):
            return self._emit(_Slot(cls | op | BPF_X, d, _check_reg(src), target=target))
        return self._emit(_Slot(cls | op | BPF_K, d, imm=_check_range(src, S32, "immediate"),
                                target=target))

    def jeq(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP, BPF_JEQ, dst, src, target)
    def jne(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP, BPF_JNE, dst, src, target)
    def jgt(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP, BPF_JGT, dst, src, target)
    def jge(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP, BPF_JGE, dst, src, target)
    def jlt(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP, BPF_JLT, dst, src, target)
    def jle(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP, BPF_JLE, dst, src, target)
    def jsgt(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP, BPF_JSGT, dst, src, target)
    def jsge(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP, BPF_JSGE, dst, src, target)
    def jslt(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP, BPF_JSLT, dst, src, target)
    def jsle(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP, BPF_JSLE, dst, src, target)
    def jset(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP, BPF_JSET, dst, src, target)

    def jeq32(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP32, BPF_JEQ, dst, src, target)
    def jne32(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP32, BPF_JNE, dst, src, target)
    def jgt32(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP32, BPF_JGT, dst, src, target)
    def jge32(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP32, BPF_JGE, dst, src, target)
    def jlt32(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP32, BPF_JLT, dst, src, target)
    def jle32(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP32, BPF_JLE, dst, src, target)
    def jsgt32(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP32, BPF_JSGT, dst, src, target)
    def jsge32(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP32, BPF_JSGE, dst, src, target)
    def jslt32(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP32, BPF_JSLT, dst, src, target)
    def jsle32(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP32, BPF_JSLE, dst, src, target)
    def jset32(self, dst: Reg, src: Operand, target: str) -> "Program": return self.jmp(BPF_JMP32, BPF_JSET, dst, src, target)

    def call(self, helper: Union[str, int]) -> "Program":
        """BPF_EMIT_CALL: call a helper by name (see HELPERS) or number.

        Arguments go in r1..r5, the result comes back in r0, and r1..r5 are
        clobbered; r6..r9 survive the call.
        """
        if isinstance(helper, str):
            try:
                helper = HELPERS[helper]
            except KeyError:
                raise AsmError("unknown helper %r (known: %s)"
                               % (helper, ", ".join(sorted(HELPERS)))) from None
        return self._emit(_Slot(BPF_JMP | BPF_CALL, imm=helper))

    def exit(self) -> "Program":
        """BPF_EXIT_INSN: return r0."""
        return self._emit(_Slot(BPF_JMP | BPF_EXIT))

    # -- assembly -------------------------------------------------------------

    def instructions(self) -> List[Insn]:
        """The program with labels resolved and map fds filled in."""
        out: List[Insn] = []
        for pc, s in enumerate(self._slots):
            off, imm = s.off, s.imm
            if s.target is not None:
                if s.target not in self._labels:
                    raise AsmError("undefined label %r (jump at insn %d)" % (s.target, pc))
                rel = self._labels[s.target] - (pc + 1)
                if s.func:
                    out.append(Insn(s.code, s.dst, s.src, 0, rel))
                    continue
                if not S16[0] <= rel <= S16[1]:
                    raise AsmError("jump at insn %d to %r is %d insns away, beyond the s16 offset"
                                   % (pc, s.target, rel))
                off = rel
            if s.map is not None:
                fd = s.map if isinstance(s.map, int) else getattr(s.map, "fd")
                imm = fd
            out.append(Insn(s.code, s.dst, s.src, off, imm))
        end = len(self._slots)
        for name, pc in self._labels.items():
            if pc == end:
                raise AsmError("label %r is at the end of the program, after the last insn" % name)
        return out

    def assemble(self) -> bytes:
        """The program as the bytes BPF_PROG_LOAD takes."""
        return b"".join(insn.encode() for insn in self.instructions())

    def load(self, prog_type: int, **kwargs) -> "object":
        """Assemble and load; see perfagent.bpf.prog.Prog for ``kwargs``."""
        from perfagent.bpf.prog import Prog
        kwargs.setdefault("name", self.name)
        kwargs.setdefault("maps", [s.map for s in self._slots
                                   if s.map is not None and not isinstance(s.map, int)])
        subprograms = sorted({s.target for s in self._slots if s.func}, key=lambda t: self._labels[t])
        if subprograms:
            # The verifier wants every function named in BTF once there are several.
            kwargs.setdefault("functions", [(0, self.name or "prog", 1)]
                              + [(self._labels[t], t, 2) for t in subprograms])
        return Prog(prog_type, self.assemble(), **kwargs)
