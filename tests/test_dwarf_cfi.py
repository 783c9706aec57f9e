"""Unit tests of the CFI decoder from hand-assembled .eh_frame/.debug_frame bytes.

Each test builds the smallest section that exercises one rule of DWARF 5
section 6.4 or the LSB .eh_frame format, so a failure names the rule.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from typing import List, Optional

import pytest

from perfagent.dwarf import (
    CFA_PLT, CFA_REG_OFFSET, CFA_UNSUPPORTED, CFITable, CallFrameInfo, DWARFError, EHFrameHdr,
    RULE_OFFSET, RULE_REGISTER, RULE_SAME_VALUE, RULE_UNDEFINED, RULE_UNSUPPORTED,
    RULE_VAL_OFFSET, UnresolvablePointer, UnwindRow, fde_rows, load_eh_frame_hdr,
    match_plt_expression,
)
from perfagent.dwarf.constants import *  # noqa: F401,F403  (DW_CFA_*, DW_EH_PE_*)
from perfagent.dwarf.pointers import EncodedPointerReader, read_sleb128, read_uleb128
from perfagent.dwarf.table import CFIStats, section_rows
from perfagent.errors import ParseError

RSP, RBP, RBX, R12, RA = 7, 6, 3, 12, 16


# ------------------------------------------------------------------ assembling

def uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def sleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        done = (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40)
        out.append(byte | (0 if done else 0x80))
        if done:
            return bytes(out)


def op(opcode: int, *operands: bytes) -> bytes:
    return bytes([opcode]) + b"".join(operands)


class Section:
    """Appends CIEs/FDEs to a little-endian .eh_frame or .debug_frame image."""

    def __init__(self, eh: bool = True, address_size: int = 8) -> None:
        self.eh = eh
        self.address_size = address_size
        self.buf = bytearray()

    def _entry(self, id_field: bytes, body: bytes, dwarf64: bool) -> int:
        offset = len(self.buf)
        payload = id_field + body
        pad = -len(payload) % self.address_size
        payload += bytes([DW_CFA_nop]) * pad
        if dwarf64:
            self.buf += struct.pack("<IQ", DWARF64_ESCAPE, len(payload))
        else:
            self.buf += struct.pack("<I", len(payload))
        self.buf += payload
        return offset

    def cie(self, instructions: bytes = b"", augmentation: bytes = b"zR", aug_data: Optional[bytes] = None,
            caf: int = 1, daf: int = -8, ra: int = RA, version: int = 1, dwarf64: bool = False,
            extra: bytes = b"") -> int:
        if aug_data is None:
            aug_data = bytes([DW_EH_PE_udata4]) if augmentation == b"zR" else b""
        if self.eh:
            id_field = struct.pack("<Q" if dwarf64 else "<I", EH_CIE_ID)
        else:
            id_field = struct.pack("<Q", DW_CIE_ID_64) if dwarf64 else struct.pack("<I", DW_CIE_ID_32)
        body = bytes([version]) + augmentation + b"\0" + extra
        if version >= 4:
            body += bytes([self.address_size, 0])
        body += uleb(caf) + sleb(daf) + (bytes([ra]) if version == 1 else uleb(ra))
        if augmentation.startswith(b"z"):
            body += uleb(len(aug_data)) + aug_data
        return self._entry(id_field, body + instructions, dwarf64)

    def fde(self, cie: int, start: int, size: int, instructions: bytes = b"", dwarf64: bool = False,
            address_fmt: str = "<I", aug_data: Optional[bytes] = b"", raw_addresses: Optional[bytes] = None) -> int:
        id_pos = len(self.buf) + (12 if dwarf64 else 4)
        if self.eh:
            pointer = id_pos - cie
        else:
            pointer = cie
        id_field = struct.pack("<Q" if dwarf64 else "<I", pointer)
        addresses = raw_addresses
        if addresses is None:
            fmt = address_fmt[1]
            addresses = struct.pack("<" + fmt + fmt, start, size)
        body = addresses + (uleb(len(aug_data)) + aug_data if aug_data is not None else b"")
        return self._entry(id_field, body + instructions, dwarf64)

    def terminate(self) -> None:
        self.buf += b"\0\0\0\0"

    def cfi(self, section_addr: int = 0x10000, **kw) -> CallFrameInfo:
        return CallFrameInfo(bytes(self.buf), section_addr, self.eh, self.address_size, True, **kw)


# The common x86-64 CIE: CFA = rsp+8, return address at CFA-8.
X86_CIE = op(DW_CFA_def_cfa, uleb(RSP), uleb(8)) + op(DW_CFA_offset | RA, uleb(1))


def rows_of(section: Section, fde_offset: int, **kw):
    cfi = section.cfi(**kw)
    return [(s, e, UnwindRow(*f)) for s, e, f in fde_rows(cfi, cfi.fde_at(fde_offset))]


def single_fde(instructions: bytes, cie_instructions: bytes = X86_CIE, size: int = 0x100):
    sec = Section()
    cie = sec.cie(cie_instructions)
    fde = sec.fde(cie, 0x1000, size, instructions)
    return rows_of(sec, fde)


def last_row(instructions: bytes, **kw) -> UnwindRow:
    return single_fde(instructions, **kw)[-1][2]


# ----------------------------------------------------------------- primitives

@pytest.mark.parametrize("encoded, value", [
    (b"\x02", 2), (b"\x7f", 127), (b"\x80\x01", 128), (b"\x81\x01", 129), (b"\x82\x01", 130),
    (b"\xb9\x64", 12857), (b"\xe5\x8e\x26", 624485)])
def test_uleb128(encoded, value):
    assert read_uleb128(encoded, 0) == (value, len(encoded))
    assert uleb(value) == encoded


@pytest.mark.parametrize("encoded, value", [
    (b"\x02", 2), (b"\x7e", -2), (b"\xff\x00", 127), (b"\x81\x7f", -127), (b"\x80\x01", 128),
    (b"\x80\x7f", -128), (b"\x81\x01", 129), (b"\xff\x7e", -129)])
def test_sleb128(encoded, value):
    assert read_sleb128(encoded, 0) == (value, len(encoded))
    assert sleb(value) == encoded


def test_dwarf_error_is_parse_error():
    assert issubclass(DWARFError, ParseError)
    assert issubclass(UnresolvablePointer, DWARFError)


# ----------------------------------------------------------- pointer encodings

SECTION_ADDR = 0x4000


def reader(data: bytes, **kw) -> EncodedPointerReader:
    return EncodedPointerReader(data, SECTION_ADDR, 8, True, **kw)


@pytest.mark.parametrize("fmt, data, value", [
    (DW_EH_PE_absptr, struct.pack("<Q", 0x123456789), 0x123456789),
    (DW_EH_PE_uleb128, uleb(624485), 624485),
    (DW_EH_PE_sleb128, sleb(-129), (-129) & (2 ** 64 - 1)),
    (DW_EH_PE_udata2, struct.pack("<H", 0xFFFE), 0xFFFE),
    (DW_EH_PE_udata4, struct.pack("<I", 0xFFFFFFFE), 0xFFFFFFFE),
    (DW_EH_PE_udata8, struct.pack("<Q", 2 ** 64 - 2), 2 ** 64 - 2),
    (DW_EH_PE_sdata2, struct.pack("<h", -2), 2 ** 64 - 2),
    (DW_EH_PE_sdata4, struct.pack("<i", -2), 2 ** 64 - 2),
    (DW_EH_PE_sdata8, struct.pack("<q", -2), 2 ** 64 - 2),
])
def test_pointer_formats(fmt, data, value):
    assert reader(data + b"junk").read(0, fmt) == (value, len(data))


def test_pointer_pcrel_is_relative_to_the_field():
    data = b"\0" * 8 + struct.pack("<i", -0x100)
    assert reader(data).read(8, DW_EH_PE_pcrel | DW_EH_PE_sdata4) == (SECTION_ADDR + 8 - 0x100, 12)


def test_pointer_datarel_textrel_funcrel():
    data = struct.pack("<i", 0x10)
    r = reader(data, data_base=0x9000, text_base=0x2000)
    assert r.read(0, DW_EH_PE_datarel | DW_EH_PE_sdata4)[0] == 0x9010
    assert r.read(0, DW_EH_PE_textrel | DW_EH_PE_sdata4)[0] == 0x2010
    assert r.read(0, DW_EH_PE_funcrel | DW_EH_PE_sdata4, func_base=0x3000)[0] == 0x3010
    with pytest.raises(UnresolvablePointer):
        reader(data).read(0, DW_EH_PE_datarel | DW_EH_PE_sdata4)
    with pytest.raises(UnresolvablePointer):
        reader(data).read(0, DW_EH_PE_funcrel | DW_EH_PE_sdata4)


def test_pointer_aligned_skips_to_address_size():
    data = b"\xaa" * 3 + b"\0" * 5 + struct.pack("<Q", 0xABCDEF)
    assert reader(data).read(3, DW_EH_PE_aligned) == (0xABCDEF, 16)


def test_pointer_indirect_needs_a_reader():
    data = struct.pack("<Q", 0x5000)
    memory = {0x5000: 0x7777}
    assert reader(data, read_pointer=memory.get).read(0, DW_EH_PE_indirect | DW_EH_PE_absptr)[0] == 0x7777
    with pytest.raises(UnresolvablePointer):
        reader(data).read(0, DW_EH_PE_indirect | DW_EH_PE_absptr)
    with pytest.raises(UnresolvablePointer):
        reader(struct.pack("<Q", 0x6000), read_pointer=memory.get).read(0, DW_EH_PE_indirect)


def test_pointer_omit_and_bad_format():
    assert reader(b"").read(5, DW_EH_PE_omit) == (None, 5)
    with pytest.raises(DWARFError):
        reader(b"\0" * 8).read(0, 0x05)  # no such format
    with pytest.raises(DWARFError):
        reader(b"\0" * 8).read(0, 0x60 | DW_EH_PE_udata4)  # no such application


# ------------------------------------------------- DWARF 5 Appendix D.6 example

def test_appendix_d6_example():
    """The specification's RISC example: 4-byte instructions, R7 = SP = CFA
    base, R8 the return-address column, initially held in R1; fs = 12."""
    fs = 12
    cie_instructions = (op(DW_CFA_def_cfa, uleb(7), uleb(0)) + op(DW_CFA_same_value, uleb(0))
                        + op(DW_CFA_undefined, uleb(1)) + op(DW_CFA_undefined, uleb(2))
                        + op(DW_CFA_undefined, uleb(3)) + op(DW_CFA_same_value, uleb(4))
                        + op(DW_CFA_same_value, uleb(5)) + op(DW_CFA_same_value, uleb(6))
                        + op(DW_CFA_register, uleb(8), uleb(1)))
    fde_instructions = (op(DW_CFA_advance_loc | 1) + op(DW_CFA_def_cfa_offset, uleb(fs))
                        + op(DW_CFA_advance_loc | 1) + op(DW_CFA_offset | 8, uleb(1))
                        + op(DW_CFA_advance_loc | 1) + op(DW_CFA_offset | 6, uleb(2))
                        + op(DW_CFA_advance_loc | 1) + op(DW_CFA_def_cfa_register, uleb(6))
                        + op(DW_CFA_advance_loc | 1) + op(DW_CFA_offset | 4, uleb(3))
                        + op(DW_CFA_advance_loc | 11) + op(DW_CFA_restore | 4)
                        + op(DW_CFA_advance_loc | 1) + op(DW_CFA_restore | 6)
                        + op(DW_CFA_def_cfa_register, uleb(7))
                        + op(DW_CFA_advance_loc | 1) + op(DW_CFA_restore | 8)
                        + op(DW_CFA_advance_loc | 1) + op(DW_CFA_def_cfa_offset, uleb(0)))
    sec = Section(eh=False, address_size=4)
    cie = sec.cie(cie_instructions, augmentation=b"", caf=4, daf=-4, ra=8)
    fde = sec.fde(cie, 0x100, 80, fde_instructions, aug_data=None)
    rows = rows_of(sec, fde)
    # (loc, CFA register, CFA offset, R8 = "ra" rule, R6 = "rbp" slot rule, R3 = "rbx" slot)
    expected = [
        (0x100, 7, 0, (RULE_REGISTER, 1), (RULE_SAME_VALUE, 0)),
        (0x104, 7, fs, (RULE_REGISTER, 1), (RULE_SAME_VALUE, 0)),
        (0x108, 7, fs, (RULE_OFFSET, -4), (RULE_SAME_VALUE, 0)),
        (0x10C, 7, fs, (RULE_OFFSET, -4), (RULE_OFFSET, -8)),
        (0x110, 6, fs, (RULE_OFFSET, -4), (RULE_OFFSET, -8)),
        (0x114, 6, fs, (RULE_OFFSET, -4), (RULE_OFFSET, -8)),  # R4 saved: not a tracked column
        (0x140, 6, fs, (RULE_OFFSET, -4), (RULE_OFFSET, -8)),  # R4 restored
        (0x144, 7, fs, (RULE_OFFSET, -4), (RULE_SAME_VALUE, 0)),
        (0x148, 7, fs, (RULE_REGISTER, 1), (RULE_SAME_VALUE, 0)),
        (0x14C, 7, 0, (RULE_REGISTER, 1), (RULE_SAME_VALUE, 0)),
    ]
    table = CFITable.from_spans(fde_rows(sec.cfi(), sec.cfi().fde_at(fde)))
    for loc, cfa_reg, cfa_off, ra_rule, r6_rule in expected:
        row = table.lookup(loc)
        assert (row.cfa_kind, row.cfa_register, row.cfa_offset) == (CFA_REG_OFFSET, cfa_reg, cfa_off), hex(loc)
        assert row.rule(RA) == ra_rule, hex(loc)
        assert row.rule(RBP) == r6_rule, hex(loc)
        assert row.rule(RBX) == (RULE_UNDEFINED, 0)  # R3, undefined by the CIE
    assert rows[-1][:2] == (0x14C, 0x150)
    assert table.lookup(0x150) is None and table.lookup(0xFF) is None


# ------------------------------------------------------------- every opcode

def _cfa(row: UnwindRow):
    return row.cfa_kind, row.cfa_register, row.cfa_offset


@pytest.mark.parametrize("name, instructions, check", [
    ("def_cfa", op(DW_CFA_def_cfa, uleb(RBP), uleb(16)),
     lambda r: _cfa(r) == (CFA_REG_OFFSET, RBP, 16)),
    ("def_cfa_sf", op(DW_CFA_def_cfa_sf, uleb(RBP), sleb(-2)),  # factored by daf -8
     lambda r: _cfa(r) == (CFA_REG_OFFSET, RBP, 16)),
    ("def_cfa_register", op(DW_CFA_def_cfa_register, uleb(RBP)),
     lambda r: _cfa(r) == (CFA_REG_OFFSET, RBP, 8)),
    ("def_cfa_offset", op(DW_CFA_def_cfa_offset, uleb(200)),
     lambda r: _cfa(r) == (CFA_REG_OFFSET, RSP, 200)),
    ("def_cfa_offset_sf", op(DW_CFA_def_cfa_offset_sf, sleb(-3)),
     lambda r: _cfa(r) == (CFA_REG_OFFSET, RSP, 24)),
    ("offset", op(DW_CFA_offset | RBX, uleb(2)), lambda r: r.rule(RBX) == (RULE_OFFSET, -16)),
    ("offset_extended", op(DW_CFA_offset_extended, uleb(R12), uleb(3)),
     lambda r: r.rule(R12) == (RULE_OFFSET, -24)),
    ("offset_extended_sf", op(DW_CFA_offset_extended_sf, uleb(R12), sleb(-3)),
     lambda r: r.rule(R12) == (RULE_OFFSET, 24)),
    ("val_offset", op(DW_CFA_val_offset, uleb(RBP), uleb(1)),
     lambda r: r.rule(RBP) == (RULE_VAL_OFFSET, -8)),
    ("val_offset_sf", op(DW_CFA_val_offset_sf, uleb(RBP), sleb(1)),
     lambda r: r.rule(RBP) == (RULE_VAL_OFFSET, -8)),
    ("GNU_negative_offset_extended", op(DW_CFA_GNU_negative_offset_extended, uleb(RBX), uleb(2)),
     lambda r: r.rule(RBX) == (RULE_OFFSET, 16)),
    ("undefined", op(DW_CFA_undefined, uleb(RA)), lambda r: r.rule(RA) == (RULE_UNDEFINED, 0)),
    ("same_value", op(DW_CFA_offset | RBX, uleb(2)) + op(DW_CFA_same_value, uleb(RBX)),
     lambda r: r.rule(RBX) == (RULE_SAME_VALUE, 0)),
    ("register", op(DW_CFA_register, uleb(RBX), uleb(R12)), lambda r: r.rule(RBX) == (RULE_REGISTER, R12)),
    ("expression", op(DW_CFA_expression, uleb(RBP), uleb(2), bytes([DW_OP_breg0 + RSP, 8])),
     lambda r: r.rule(RBP) == (RULE_UNSUPPORTED, 0)),
    ("val_expression", op(DW_CFA_val_expression, uleb(RBP), uleb(2), bytes([DW_OP_breg0 + RSP, 8])),
     lambda r: r.rule(RBP) == (RULE_UNSUPPORTED, 0)),
    ("restore", op(DW_CFA_offset | RA, uleb(5)) + op(DW_CFA_restore | RA),
     lambda r: r.rule(RA) == (RULE_OFFSET, -8)),
    ("restore_extended", op(DW_CFA_offset | RA, uleb(5)) + op(DW_CFA_restore_extended, uleb(RA)),
     lambda r: r.rule(RA) == (RULE_OFFSET, -8)),
    ("restore_without_cie_rule", op(DW_CFA_offset | RBX, uleb(5)) + op(DW_CFA_restore | RBX),
     lambda r: r.rule(RBX) == (RULE_SAME_VALUE, 0)),
    ("GNU_args_size", op(DW_CFA_GNU_args_size, uleb(300)) + op(DW_CFA_def_cfa_offset, uleb(16)),
     lambda r: _cfa(r) == (CFA_REG_OFFSET, RSP, 16)),
    ("nop", op(DW_CFA_nop) * 3, lambda r: _cfa(r) == (CFA_REG_OFFSET, RSP, 8)),
    ("untracked_registers_ignored",
     op(DW_CFA_offset | 17, uleb(2)) + op(DW_CFA_offset_extended, uleb(40), uleb(3))
     + op(DW_CFA_register, uleb(33), uleb(1)),
     lambda r: all(r.rule(reg) == (RULE_SAME_VALUE, 0) for reg in (RBP, RBX, R12))),
    ("def_cfa_register_after_expression",
     op(DW_CFA_def_cfa_expression, uleb(2), bytes([DW_OP_breg0 + RSP, 8])) + op(DW_CFA_def_cfa_register, uleb(RBP)),
     lambda r: _cfa(r) == (CFA_REG_OFFSET, RBP, 8)),
])
def test_opcode(name, instructions, check):
    row = last_row(instructions)
    assert check(row), (name, row)


def test_no_rule_means_same_value_and_ra_undefined_marks_outermost():
    row = last_row(op(DW_CFA_undefined, uleb(RA)))
    for reg in (RBP, RBX, 12, 13, 14, 15):
        assert row.rule(reg) == (RULE_SAME_VALUE, 0)
    assert row.ra_kind == RULE_UNDEFINED


@pytest.mark.parametrize("advance, expected_end", [
    (op(DW_CFA_advance_loc | 5), 0x1005),
    (op(DW_CFA_advance_loc1, bytes([200])), 0x10C8),
    (op(DW_CFA_advance_loc2, struct.pack("<H", 0x1234)), 0x1000 + 0x1234),
    (op(DW_CFA_advance_loc4, struct.pack("<I", 0x12345)), 0x1000 + 0x12345),
    (op(DW_CFA_MIPS_advance_loc8, struct.pack("<Q", 0x777)), 0x1777),
    (op(DW_CFA_set_loc, struct.pack("<I", 0x1040)), 0x1040),  # CIE 'R' = udata4
])
def test_advance_opcodes(advance, expected_end):
    rows = single_fde(advance + op(DW_CFA_def_cfa_offset, uleb(16)), size=0x100000)
    assert [(s, e) for s, e, _ in rows] == [(0x1000, expected_end), (expected_end, 0x1000 + 0x100000)]
    assert rows[0][2].cfa_offset == 8 and rows[1][2].cfa_offset == 16


def test_code_alignment_factor_scales_advances():
    sec = Section()
    cie = sec.cie(X86_CIE, caf=4)
    fde = sec.fde(cie, 0x1000, 0x40, op(DW_CFA_advance_loc | 3) + op(DW_CFA_def_cfa_offset, uleb(16)))
    assert [(s, e) for s, e, _ in rows_of(sec, fde)] == [(0x1000, 0x100C), (0x100C, 0x1040)]


def test_advance_past_the_end_and_backwards():
    rows = single_fde(op(DW_CFA_advance_loc1, bytes([0xF0])) + op(DW_CFA_def_cfa_offset, uleb(16)), size=0x10)
    assert [(s, e) for s, e, _ in rows] == [(0x1000, 0x1010)]
    with pytest.raises(DWARFError):
        single_fde(op(DW_CFA_advance_loc | 4) + op(DW_CFA_set_loc, struct.pack("<I", 0x1001)))


def test_identical_rows_are_merged():
    rows = single_fde(op(DW_CFA_advance_loc | 4) + op(DW_CFA_nop) + op(DW_CFA_advance_loc | 4)
                      + op(DW_CFA_def_cfa_offset, uleb(16)), size=0x20)
    assert [(s, e) for s, e, _ in rows] == [(0x1000, 0x1008), (0x1008, 0x1020)]


def test_remember_restore_state_includes_cfa():
    instructions = (op(DW_CFA_advance_loc | 1) + op(DW_CFA_def_cfa_offset, uleb(16))
                    + op(DW_CFA_offset | RBX, uleb(2)) + op(DW_CFA_remember_state)
                    + op(DW_CFA_advance_loc | 1) + op(DW_CFA_def_cfa_offset, uleb(8))
                    + op(DW_CFA_restore | RBX)
                    + op(DW_CFA_advance_loc | 1) + op(DW_CFA_restore_state))
    rows = single_fde(instructions, size=0x10)
    by_start = {s: r for s, _, r in rows}
    assert by_start[0x1001].cfa_offset == 16 and by_start[0x1001].rule(RBX) == (RULE_OFFSET, -16)
    assert by_start[0x1002].cfa_offset == 8 and by_start[0x1002].rule(RBX) == (RULE_SAME_VALUE, 0)
    assert by_start[0x1003].cfa_offset == 16 and by_start[0x1003].rule(RBX) == (RULE_OFFSET, -16)


def test_restore_state_without_remember_fails_the_fde():
    with pytest.raises(DWARFError):
        single_fde(op(DW_CFA_restore_state))


def test_restore_returns_to_the_cie_rule():
    cie_instructions = X86_CIE + op(DW_CFA_offset | RBX, uleb(2))
    row = last_row(op(DW_CFA_offset | RBX, uleb(4)) + op(DW_CFA_restore | RBX), cie_instructions=cie_instructions)
    assert row.rule(RBX) == (RULE_OFFSET, -16)
    row = last_row(op(DW_CFA_undefined, uleb(RBX)) + op(DW_CFA_restore_extended, uleb(RBX)),
                   cie_instructions=cie_instructions)
    assert row.rule(RBX) == (RULE_OFFSET, -16)


@pytest.mark.parametrize("instructions", [
    op(0x3F),  # DW_CFA_hi_user: unknown
    op(DW_CFA_def_cfa, uleb(RBP)),  # operand missing (runs into padding/end)
    op(DW_CFA_offset_extended, b"\x80\x80\x80"),  # LEB128 runs off the end
])
def test_bad_instructions_raise_dwarf_error(instructions):
    sec = Section()
    cie = sec.cie(X86_CIE)
    # No padding, so the entry ends exactly where the instructions do.
    sec.address_size = 1
    fde = sec.fde(cie, 0x1000, 0x10, instructions)
    with pytest.raises(DWARFError):
        rows_of(sec, fde)


# --------------------------------------------------- PLT CFA expression

PLT_EXPRESSION = bytes([0x77, 0x08, 0x80, 0x00, 0x3F, 0x1A, 0x3B, 0x2A, 0x33, 0x24, 0x22])


def test_plt_expression_bytes_are_recognised():
    assert match_plt_expression(PLT_EXPRESSION) == (8, 11)
    lit10 = PLT_EXPRESSION[:6] + bytes([DW_OP_lit0 + 10]) + PLT_EXPRESSION[7:]
    assert match_plt_expression(lit10) == (8, 10)
    assert match_plt_expression(PLT_EXPRESSION[:-1]) is None
    assert match_plt_expression(PLT_EXPRESSION + b"\x22") is None
    assert match_plt_expression(bytes([0x77, 0x08, 0x06])) is None  # breg7 8; deref
    assert match_plt_expression(b"") is None and match_plt_expression(b"\x77") is None


def test_plt_expression_row_and_other_expressions_unsupported():
    instructions = (op(DW_CFA_def_cfa_offset, uleb(16)) + op(DW_CFA_advance_loc | 6)
                    + op(DW_CFA_def_cfa_offset, uleb(24)) + op(DW_CFA_advance_loc | 10)
                    + op(DW_CFA_def_cfa_expression, uleb(len(PLT_EXPRESSION)), PLT_EXPRESSION)
                    + op(DW_CFA_advance_loc1, bytes([0x30]))
                    + op(DW_CFA_def_cfa_expression, uleb(3), bytes([0x77, 0x08, 0x06]))
                    + op(DW_CFA_advance_loc1, bytes([0x10])) + op(DW_CFA_def_cfa, uleb(RSP), uleb(8)))
    rows = single_fde(instructions, size=0x100)
    kinds = [(s, r.cfa_kind) for s, _, r in rows]
    assert kinds == [(0x1000, CFA_REG_OFFSET), (0x1006, CFA_REG_OFFSET), (0x1010, CFA_PLT),
                     (0x1040, CFA_UNSUPPORTED), (0x1050, CFA_REG_OFFSET)]
    plt = rows[2][2]
    assert (plt.cfa_register, plt.cfa_offset, plt.cfa_plt_threshold) == (RSP, 8, 11)
    assert plt.rule(RA) == (RULE_OFFSET, -8)


def _plt_checks(path: str) -> int:
    from perfagent.elf import ELFFile
    elf = ELFFile.from_path(path)
    plt = elf.section(".plt")
    if plt is None or plt.sh_size < 32:
        pytest.skip("no .plt in %s" % path)
    table = CFITable.from_elf(elf)
    hits = 0
    for pc in range(plt.sh_addr + 16, plt.sh_addr + plt.sh_size):
        row = table.lookup(pc)
        if row is not None and row.cfa_kind == CFA_PLT:
            assert (row.cfa_register, row.cfa_offset, row.cfa_plt_threshold) == (RSP, 8, 11)
            assert row.rule(RA) == (RULE_OFFSET, -8)
            hits += 1
    return hits


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_plt_expression_in_a_lazy_binding_binary(tmp_path):
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "cfi_sample.c")
    out = str(tmp_path / "lazy")
    subprocess.run(["gcc", "-O2", "-Wl,-z,lazy", "-o", out, source], check=True)
    assert _plt_checks(out) > 0


@pytest.mark.skipif(not os.path.exists("/usr/lib/x86_64-linux-gnu/libc.so.6"), reason="no libc")
def test_plt_expression_in_libc():
    assert _plt_checks("/usr/lib/x86_64-linux-gnu/libc.so.6") > 0
