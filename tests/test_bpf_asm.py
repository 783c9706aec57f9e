"""The assembler's encodings, byte for byte, and its label handling.

Every expected value is derived by hand from include/uapi/linux/bpf.h and
bpf_common.h (class | size/op | mode/source, dst_reg in the low nibble of
byte 1, src_reg in the high nibble, then s16 off and s32 imm little-endian),
the same composition the kernel's include/linux/filter.h macros perform.
No kernel is needed.
"""

from __future__ import annotations

import pytest

from perfagent.bpf.asm import (
    B, DW, FP, H, R0, R1, R2, R3, R4, R6, R10, W, AsmError, Insn, Program, encode,
)


def one(build) -> bytes:
    p = Program()
    build(p)
    return p.assemble()


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


@pytest.mark.parametrize("build, expected", [
    # BPF_ALU64_IMM(BPF_MOV, R0, 0): 0x07 | 0xb0 | BPF_K(0) = 0xb7
    (lambda p: p.mov(R0, 0), "b7 00 0000 00000000"),
    # BPF_EXIT_INSN(): BPF_JMP(0x05) | BPF_EXIT(0x90) = 0x95
    (lambda p: p.exit(), "95 00 0000 00000000"),
    # BPF_MOV64_REG(R1, R6): 0x07 | 0xb0 | BPF_X(0x08) = 0xbf; regs = 6 << 4 | 1
    (lambda p: p.mov(R1, R6), "bf 61 0000 00000000"),
    # BPF_MOV32_IMM(R1, 1): BPF_ALU(0x04) | 0xb0 = 0xb4
    (lambda p: p.mov32(R1, 1), "b4 01 0000 01000000"),
    # BPF_ALU64_IMM(BPF_ADD, R2, -4): 0x07; imm -4 = fcffffff
    (lambda p: p.add(R2, -4), "07 02 0000 fcffffff"),
    # BPF_ALU64_IMM(BPF_RSH, R0, 32): 0x07 | 0x70 = 0x77
    (lambda p: p.rsh(R0, 32), "77 00 0000 20000000"),
    # BPF_ALU64_REG(BPF_XOR, R3, R1): 0x07 | 0xa0 | 0x08 = 0xaf
    (lambda p: p.xor(R3, R1), "af 13 0000 00000000"),
    # BPF_ALU64_IMM(BPF_NEG, R0, 0): 0x07 | 0x80 = 0x87
    (lambda p: p.neg(R0), "87 00 0000 00000000"),
    # BPF_LDX_MEM(BPF_DW, R2, R1, 8): BPF_LDX(0x01) | BPF_MEM(0x60) | BPF_DW(0x18) = 0x79
    (lambda p: p.ldx(DW, R2, R1, 8), "79 12 0800 00000000"),
    # BPF_LDX_MEM(BPF_W, R0, R1, 0): 0x01 | 0x60 | 0x00 = 0x61
    (lambda p: p.ldx(W, R0, R1, 0), "61 10 0000 00000000"),
    # BPF_LDX_MEM(BPF_H, ...) = 0x69, BPF_LDX_MEM(BPF_B, ...) = 0x71
    (lambda p: p.ldx(H, R0, R1, 2), "69 10 0200 00000000"),
    (lambda p: p.ldx(B, R0, R1, 3), "71 10 0300 00000000"),
    # BPF_STX_MEM(BPF_W, R10, R0, -4): BPF_STX(0x03) | 0x60 = 0x63; off -4 = fcff
    (lambda p: p.stx(W, FP, R0, -4), "63 0a fcff 00000000"),
    # BPF_STX_MEM(BPF_DW, R10, R1, -8): 0x03 | 0x60 | 0x18 = 0x7b
    (lambda p: p.stx(DW, R10, R1, -8), "7b 1a f8ff 00000000"),
    # BPF_ST_MEM(BPF_DW, R10, -16, 1): BPF_ST(0x02) | 0x60 | 0x18 = 0x7a
    (lambda p: p.st(DW, FP, -16, 1), "7a 0a f0ff 01000000"),
    # BPF_ATOMIC_OP(BPF_DW, BPF_ADD, R0, R1, 0): 0x03 | BPF_ATOMIC(0xc0) | 0x18 = 0xdb, imm BPF_ADD
    (lambda p: p.atomic_add(DW, R0, R1, 0), "db 10 0000 00000000"),
    # BPF_EMIT_CALL(BPF_FUNC_map_lookup_elem = 1): BPF_JMP | BPF_CALL(0x80) = 0x85
    (lambda p: p.call("map_lookup_elem"), "85 00 0000 01000000"),
    # BPF_FUNC_get_stackid = 27 (0x1b), BPF_FUNC_probe_read_kernel = 113 (0x71)
    (lambda p: p.call("get_stackid"), "85 00 0000 1b000000"),
    (lambda p: p.call("probe_read_kernel"), "85 00 0000 71000000"),
])
def test_single_instruction(build, expected):
    assert one(build) == h(expected)


def test_ld_imm64_two_slots():
    # BPF_LD_IMM64(R1, 0x1122334455667788): BPF_LD(0x00) | BPF_DW(0x18) | BPF_IMM(0x00)
    # = 0x18, low half in the first slot's imm, high half in the second's.
    assert one(lambda p: p.ld_imm64(R1, 0x1122334455667788)) == h(
        "18 01 0000 88776655" "00 00 0000 44332211")
    # -1 fills both halves.
    assert one(lambda p: p.ld_imm64(R0, -1)) == h("18 00 0000 ffffffff" "00 00 0000 ffffffff")


def test_copy_mem_is_a_load_and_a_store():
    # *(u32 *)(r10 - 8) = *(u32 *)(r6 + 4) through r1:
    # BPF_LDX_MEM(BPF_W, R1, R6, 4) = 61 61 0400, BPF_STX_MEM(BPF_W, R10, R1, -8) = 63 1a f8ff
    assert one(lambda p: p.copy_mem(W, FP, -8, R6, 4)) == h(
        "61 61 0400 00000000" "63 1a f8ff 00000000")
    # another scratch register, 64-bit
    assert one(lambda p: p.copy_mem(DW, R2, 16, R3, 0, via=R4)) == h(
        "79 34 0000 00000000" "7b 42 1000 00000000")


class FakeMap:
    fd = 7


def test_ld_map_fd_pseudo():
    # BPF_LD_MAP_FD(R1, 7): 0x18 with src_reg = BPF_PSEUDO_MAP_FD (1) -> regs 0x11
    assert one(lambda p: p.ld_map_fd(R1, FakeMap())) == h("18 11 0000 07000000" "00 00 0000 00000000")
    # A bare fd works too, and the fd is read at assembly time.
    m = FakeMap()
    p = Program().ld_map_fd(R2, m)
    m.fd = 9
    assert p.assemble()[:8] == h("18 12 0000 09000000")


def test_jumps_forward_and_backward():
    p = Program()
    p.label("top")               # 0
    p.jeq(R0, 0, "out")          # 0: off = 3 - 1 = +2
    p.add(R0, -1)                # 1
    p.ja("top")                  # 2: off = 0 - 3 = -3
    p.label("out")
    p.exit()                     # 3
    insns = p.instructions()
    # BPF_JMP_IMM(BPF_JEQ, R0, 0, 2): 0x05 | 0x10 | BPF_K = 0x15
    assert insns[0] == Insn(0x15, 0, 0, 2, 0)
    assert insns[0].encode() == h("15 00 0200 00000000")
    # BPF_JMP_A(-3): BPF_JMP | BPF_JA(0x00) = 0x05
    assert insns[2].encode() == h("05 00 fdff 00000000")


def test_jump_register_and_jmp32():
    p = Program()
    p.jne(R0, R1, "x")     # BPF_JMP_REG(BPF_JNE, R0, R1, 1): 0x05|0x50|0x08 = 0x5d
    p.jeq32(R2, 5, "x")    # BPF_JMP32_IMM(BPF_JEQ, R2, 5, 0): 0x06|0x10 = 0x16
    p.label("x")
    p.exit()
    code = p.assemble()
    assert code[:8] == h("5d 10 0100 00000000")
    assert code[8:16] == h("16 02 0000 05000000")


def test_label_after_ld_imm64_counts_two_slots():
    p = Program()
    p.ja("x")                  # 0: skips the two slots of ld_imm64
    p.ld_imm64(R0, 1 << 40)    # 1, 2
    p.label("x")
    p.exit()                   # 3
    assert p.instructions()[0].off == 2
    assert len(p) == 4


def test_label_errors():
    p = Program().label("a")
    with pytest.raises(AsmError, match="duplicate label 'a'"):
        p.label("a")
    q = Program().jeq(R0, 0, "nowhere")
    q.exit()
    with pytest.raises(AsmError, match="undefined label 'nowhere'"):
        q.assemble()


def test_jump_out_of_range():
    p = Program()
    p.ja("far")
    for _ in range(40000):
        p.mov(R0, 0)
    p.label("far")
    p.exit()
    with pytest.raises(AsmError, match="beyond the s16 offset"):
        p.assemble()


def test_operand_checks():
    with pytest.raises(AsmError, match="not a register"):
        Program().mov(1, 2)  # type: ignore[arg-type]
    with pytest.raises(AsmError, match="does not fit in 32 bits"):
        Program().mov(R0, 1 << 32)
    with pytest.raises(AsmError, match="does not fit in 16 bits"):
        Program().ldx(DW, R0, R1, 1 << 15)
    with pytest.raises(AsmError, match="unknown helper 'nope'"):
        Program().call("nope")
    with pytest.raises(AsmError, match="W or DW"):
        Program().atomic_add(B, R0, R1, 0)


def test_encode_function_matches_builder():
    assert encode(0xb7, 0, 0, 0, 0) == one(lambda p: p.mov(R0, 0))
    assert encode(0x85, imm=14) == one(lambda p: p.call("get_current_pid_tgid"))
