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
from typing import Optional

import pytest

from perfagent.dwarf import (
    CFA_DEREF, CFA_PLT, CFA_REG_OFFSET, CFA_UNSUPPORTED, CFITable, CallFrameInfo, DWARFError,
    EHFrameHdr, RULE_EXPRESSION, RULE_OFFSET, RULE_REGISTER, RULE_SAME_VALUE, RULE_UNDEFINED,
    RULE_UNSUPPORTED, RULE_VAL_EXPRESSION, RULE_VAL_OFFSET, UnresolvablePointer, UnwindRow, fde_rows,
    load_eh_frame_hdr, match_plt_expression,
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
     lambda r: r.rule(RBP) == (RULE_EXPRESSION, 8) and r.rule_base(RBP) == RSP),
    ("val_expression", op(DW_CFA_val_expression, uleb(RBP), uleb(3), bytes([DW_OP_breg0 + RBX]) + sleb(-200)),
     lambda r: r.rule(RBP) == (RULE_VAL_EXPRESSION, -200) and r.rule_base(RBP) == RBX),
    ("expression_other", op(DW_CFA_expression, uleb(RBP), uleb(3), bytes([DW_OP_breg0 + RSP, 8, DW_OP_deref])),
     lambda r: r.rule(RBP) == (RULE_UNSUPPORTED, 0)),
    ("val_expression_other", op(DW_CFA_val_expression, uleb(RBP), uleb(1), bytes([DW_OP_lit0])),
     lambda r: r.rule(RBP) == (RULE_UNSUPPORTED, 0)),
    ("expression_then_offset", op(DW_CFA_expression, uleb(RBP), uleb(2), bytes([DW_OP_breg0 + RSP, 8]))
     + op(DW_CFA_offset | RBP, uleb(2)),
     lambda r: r.rule(RBP) == (RULE_OFFSET, -16) and r.rule_base(RBP) == 0),
    ("def_cfa_expression_deref", op(DW_CFA_def_cfa_expression, uleb(4), bytes([DW_OP_breg0 + RSP]) + sleb(160)
                                    + bytes([DW_OP_deref])),
     lambda r: _cfa(r) == (CFA_DEREF, RSP, 160)),
    ("def_cfa_expression_no_deref", op(DW_CFA_def_cfa_expression, uleb(2), bytes([DW_OP_breg0 + RSP, 8])),
     lambda r: r.cfa_kind == CFA_UNSUPPORTED),
    ("def_cfa_offset_after_deref", op(DW_CFA_def_cfa_expression, uleb(3), bytes([DW_OP_breg0 + RSP, 8, DW_OP_deref]))
     + op(DW_CFA_def_cfa_offset, uleb(16)),
     lambda r: r.cfa_kind == CFA_UNSUPPORTED),
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
                    + op(DW_CFA_advance_loc1, bytes([0x10]))
                    + op(DW_CFA_def_cfa_expression, uleb(4), bytes([0x77, 0x08, 0x06, 0x06]))  # deref twice
                    + op(DW_CFA_advance_loc1, bytes([0x10])) + op(DW_CFA_def_cfa, uleb(RSP), uleb(8)))
    rows = single_fde(instructions, size=0x100)
    kinds = [(s, r.cfa_kind) for s, _, r in rows]
    assert kinds == [(0x1000, CFA_REG_OFFSET), (0x1006, CFA_REG_OFFSET), (0x1010, CFA_PLT),
                     (0x1040, CFA_DEREF), (0x1050, CFA_UNSUPPORTED), (0x1060, CFA_REG_OFFSET)]
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


# ------------------------------------------------ entry formats and augmentations

def test_64bit_length_cie_and_fde_in_eh_frame():
    sec = Section()
    cie = sec.cie(X86_CIE, dwarf64=True)
    fde = sec.fde(cie, 0x2000, 0x20, op(DW_CFA_advance_loc | 4) + op(DW_CFA_def_cfa_offset, uleb(16)),
                  dwarf64=True)
    fde32 = sec.fde(cie, 0x3000, 0x20)  # a 32-bit FDE may use a 64-bit CIE
    cfi = sec.cfi()
    assert cfi.cie_at(cie).dwarf64
    rows = rows_of(sec, fde)
    assert [(s, e, r.cfa_offset) for s, e, r in rows] == [(0x2000, 0x2004, 8), (0x2004, 0x2020, 16)]
    assert cfi.fde_at(fde32).initial_location == 0x3000
    assert [f.offset for f in cfi.iter_fdes()] == [fde, fde32]


@pytest.mark.parametrize("dwarf64", [False, True])
@pytest.mark.parametrize("version", [1, 3, 4])
def test_debug_frame_cie_id_and_versions(dwarf64, version):
    sec = Section(eh=False)
    cie = sec.cie(X86_CIE, augmentation=b"", version=version, dwarf64=dwarf64)
    fde = sec.fde(cie, 0x401000, 0x30, op(DW_CFA_advance_loc | 1) + op(DW_CFA_def_cfa_offset, uleb(16)),
                  dwarf64=dwarf64, address_fmt="<Q", aug_data=None)
    cfi = sec.cfi(section_addr=0)
    c = cfi.cie_at(cie)
    assert (c.version, c.dwarf64, c.return_address_register) == (version, dwarf64, RA)
    f = cfi.fde_at(fde)
    assert (f.initial_location, f.address_range, f.cie.offset) == (0x401000, 0x30, cie)
    assert rows_of(sec, fde)[1][2].cfa_offset == 16


def test_debug_frame_fde_pointer_is_a_section_offset():
    sec = Section(eh=False)
    first = sec.cie(X86_CIE, augmentation=b"", daf=-8)
    second = sec.cie(X86_CIE, augmentation=b"", daf=-4)
    fde = sec.fde(first, 0x1000, 0x10, op(DW_CFA_offset | RBX, uleb(2)), address_fmt="<Q", aug_data=None)
    fde2 = sec.fde(second, 0x2000, 0x10, op(DW_CFA_offset | RBX, uleb(2)), address_fmt="<Q", aug_data=None)
    assert rows_of(sec, fde)[0][2].rule(RBX) == (RULE_OFFSET, -16)
    assert rows_of(sec, fde2)[0][2].rule(RBX) == (RULE_OFFSET, -8)


def test_eh_frame_pcrel_fde_addresses():
    sec = Section()
    cie = sec.cie(X86_CIE, aug_data=bytes([DW_EH_PE_pcrel | DW_EH_PE_sdata4]))
    # initial_location is the field's address plus the stored value.
    field_addr = 0x10000 + len(sec.buf) + 8
    target = 0x1234
    fde = sec.fde(cie, 0, 0, raw_addresses=struct.pack("<iI", target - field_addr, 0x40))
    f = sec.cfi(section_addr=0x10000).fde_at(fde)
    assert (f.initial_location, f.address_range) == (target, 0x40)


def test_augmentation_data_personality_lsda_and_unknown_letters():
    sec = Section()
    personality_field = 0x10000 + 4 + 4 + 1 + len(b"zPLRX\0") + 3 + 1 + 1  # after the 'P' encoding byte
    aug = (bytes([DW_EH_PE_pcrel | DW_EH_PE_sdata4]) + struct.pack("<i", 0x500 - personality_field)
           + bytes([DW_EH_PE_udata4]) + bytes([DW_EH_PE_udata4]) + b"\x99\x99")  # X's data: skipped
    cie = sec.cie(X86_CIE, augmentation=b"zPLRX", aug_data=aug)
    fde = sec.fde(cie, 0x1000, 0x10, op(DW_CFA_def_cfa_offset, uleb(16)),
                  aug_data=struct.pack("<I", 0xABCD))
    cfi = sec.cfi(section_addr=0x10000)
    c = cfi.cie_at(cie)
    assert c.personality == 0x500 and c.lsda_encoding == DW_EH_PE_udata4
    assert c.fde_encoding == DW_EH_PE_udata4 and c.augmentation_data == aug
    f = cfi.fde_at(fde)
    assert f.lsda_pointer == 0xABCD
    assert rows_of(sec, fde, section_addr=0x10000)[0][2].cfa_offset == 16


def test_indirect_personality_is_unresolvable_but_harmless():
    sec = Section()
    aug = bytes([DW_EH_PE_indirect | DW_EH_PE_pcrel | DW_EH_PE_sdata4]) + struct.pack("<i", 0x40) \
        + bytes([DW_EH_PE_udata4])
    cie = sec.cie(X86_CIE, augmentation=b"zPR", aug_data=aug)
    fde = sec.fde(cie, 0x1000, 0x10)
    cfi = sec.cfi()
    assert cfi.cie_at(cie).personality is None
    assert cfi.fde_at(fde).initial_location == 0x1000
    resolved = sec.cfi(read_pointer=lambda addr: 0x7000).cie_at(cie)
    assert resolved.personality == 0x7000


def test_signal_frame_and_bti_augmentations():
    sec = Section()
    cie = sec.cie(X86_CIE, augmentation=b"zRSB", aug_data=bytes([DW_EH_PE_udata4]))
    fde = sec.fde(cie, 0x1000, 0x10)
    assert sec.cfi().cie_at(cie).signal_frame
    assert rows_of(sec, fde)[0][2].signal_frame == 1


def test_legacy_eh_augmentation_skips_eh_data():
    sec = Section(eh=False)
    cie = sec.cie(X86_CIE, augmentation=b"eh", extra=struct.pack("<Q", 0xDEAD))
    fde = sec.fde(cie, 0x1000, 0x10, address_fmt="<Q", aug_data=None)
    assert rows_of(sec, fde)[0][2].cfa_offset == 8


def test_zero_terminator_ends_eh_frame():
    sec = Section()
    cie = sec.cie(X86_CIE)
    first = sec.fde(cie, 0x1000, 0x10)
    sec.terminate()
    sec.fde(cie, 0x2000, 0x10)  # beyond the terminator: not part of the table
    assert [f.offset for f in sec.cfi().iter_fdes()] == [first]


# --------------------------------------------------- malformed entry isolation

def _stats(sec: Section, **kw):
    stats = CFIStats()
    per_fde = section_rows(sec.cfi(**kw), stats)
    return stats, per_fde


def test_corrupt_fde_in_the_middle_only_costs_itself():
    sec = Section()
    cie = sec.cie(X86_CIE)
    sec.fde(cie, 0x1000, 0x10, op(DW_CFA_def_cfa_offset, uleb(16)))
    sec.fde(cie, 0x2000, 0x10, op(0x3F) + op(DW_CFA_def_cfa_offset, uleb(16)))  # unknown opcode
    sec.fde(cie, 0x3000, 0x10, op(DW_CFA_restore_state))  # nothing remembered
    bad_cie_pointer = len(sec.buf)
    sec.fde(cie, 0x4000, 0x10)
    sec.buf[bad_cie_pointer + 4:bad_cie_pointer + 8] = struct.pack("<I", 0x7FFF)  # points nowhere
    sec.fde(cie, 0x5000, 0x10, op(DW_CFA_def_cfa_offset, uleb(32)))
    stats, per_fde = _stats(sec)
    assert stats.errors == 3 and stats.fdes == 2, stats.error_messages
    table = CFITable.from_spans([span for rows in per_fde for span in rows])
    assert table.lookup(0x1004).cfa_offset == 16 and table.lookup(0x5004).cfa_offset == 32
    assert table.lookup(0x2004) is None and table.lookup(0x4004) is None


def test_bad_cie_costs_its_fdes_only():
    sec = Section()
    good = sec.cie(X86_CIE)
    bad = sec.cie(X86_CIE, augmentation=b"xyz")  # unknown augmentation without 'z'
    sec.fde(bad, 0x1000, 0x10)
    sec.fde(bad, 0x2000, 0x10)
    sec.fde(good, 0x3000, 0x10)
    stats, per_fde = _stats(sec)
    assert (stats.fdes, stats.errors) == (1, 2)
    assert "augmentation" in stats.error_messages[0]


def test_length_past_the_end_stops_the_walk_and_counts():
    sec = Section()
    cie = sec.cie(X86_CIE)
    sec.fde(cie, 0x1000, 0x10)
    sec.buf += struct.pack("<I", 0x1000) + b"\0" * 8  # claims 4 KB
    stats, per_fde = _stats(sec)
    assert (stats.fdes, stats.errors) == (1, 1)


@pytest.mark.parametrize("tail", [
    struct.pack("<I", 0xFFFFFFF5) + b"\0" * 8,  # reserved length
    b"\x05\x00",  # truncated length
    struct.pack("<IQ", DWARF64_ESCAPE, 2 ** 63),  # 64-bit length way past the end
])
def test_bad_lengths(tail):
    sec = Section()
    cie = sec.cie(X86_CIE)
    sec.fde(cie, 0x1000, 0x10)
    sec.buf += tail
    stats, _ = _stats(sec)
    assert (stats.fdes, stats.errors) == (1, 1)


def test_random_corruption_only_raises_dwarf_error():
    """Flip bytes of a real-looking section: nothing but DWARFError escapes."""
    sec = Section()
    cie = sec.cie(X86_CIE, augmentation=b"zPLR",
                  aug_data=bytes([DW_EH_PE_udata4]) + struct.pack("<I", 1) + bytes([DW_EH_PE_udata4, DW_EH_PE_udata4]))
    for i in range(6):
        sec.fde(cie, 0x1000 * (i + 1), 0x40,
                op(DW_CFA_advance_loc | 1) + op(DW_CFA_def_cfa_offset, uleb(16)) + op(DW_CFA_remember_state)
                + op(DW_CFA_offset | RBX, uleb(2)) + op(DW_CFA_advance_loc1, b"\x10") + op(DW_CFA_restore_state),
                aug_data=struct.pack("<I", 0))
    rng = random.Random(1234)
    original = bytes(sec.buf)
    for _ in range(400):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cfi = CallFrameInfo(bytes(data), 0x10000, True, 8, True)
        stats = CFIStats()
        per_fde = section_rows(cfi, stats)
        CFITable.from_spans([span for rows in per_fde for span in rows]).lookup(0x1010)
        for offset in range(0, len(data), 7):
            try:
                cfi.fde_at(offset)
            except DWARFError:
                pass


# ------------------------------------------------------------- compiled table

def test_table_lookup_returns_shared_rows_and_none_in_gaps():
    sec = Section()
    cie = sec.cie(X86_CIE)
    sec.fde(cie, 0x1000, 0x10, op(DW_CFA_advance_loc | 4) + op(DW_CFA_def_cfa_offset, uleb(16)))
    sec.fde(cie, 0x2000, 0x10, op(DW_CFA_advance_loc | 4) + op(DW_CFA_def_cfa_offset, uleb(16)))
    stats, per_fde = _stats(sec)
    table = CFITable.from_spans([span for rows in per_fde for span in rows])
    assert len(table) == 4 and len(table.rows) == 2  # identical rows stored once
    assert table.lookup(0x1004) is table.lookup(0x2008)
    assert table.lookup(0xFFF) is None and table.lookup(0x1010) is None and table.lookup(0x3000) is None
    assert table.lookup_range(0x2005) == (0x2004, 0x2010, table.lookup(0x2005))
    row = table.lookup(0x1000)
    assert row[0] == row.cfa_kind and isinstance(row, tuple)


def test_overlapping_fdes_first_wins():
    spans = [(0x1000, 0x1010, (CFA_REG_OFFSET, RSP, 8, 0, 0) + (RULE_OFFSET, -8, 0) + (RULE_SAME_VALUE, 0, 0) * 6),
             (0x1008, 0x1020, (CFA_REG_OFFSET, RSP, 16, 0, 0) + (RULE_OFFSET, -8, 0) + (RULE_SAME_VALUE, 0, 0) * 6)]
    table = CFITable.from_spans(spans)
    assert table.lookup(0x100C).cfa_offset == 8 and table.lookup(0x1010).cfa_offset == 16


# -------------------------------------------------------------- .eh_frame_hdr

def test_synthetic_eh_frame_hdr():
    hdr_addr = 0x8000
    entries = [(0x3000, 0x9300), (0x1000, 0x9100), (0x2000, 0x9200)]  # unsorted on purpose
    data = bytes([1, DW_EH_PE_pcrel | DW_EH_PE_sdata4, DW_EH_PE_udata4, DW_EH_PE_datarel | DW_EH_PE_sdata4])
    data += struct.pack("<i", 0x9000 - (hdr_addr + 4)) + struct.pack("<I", len(entries))
    for loc, fde in entries:
        data += struct.pack("<ii", loc - hdr_addr, fde - hdr_addr)
    hdr = EHFrameHdr(data, hdr_addr)
    assert hdr.eh_frame_ptr == 0x9000 and len(hdr) == 3
    assert hdr.find_fde_address(0x2FFF) == 0x9200 and hdr.find_fde_address(0x3000) == 0x9300
    assert hdr.find_fde_address(0xFFF) is None
    # The same table through the generic (non-datarel/sdata4) path.
    generic = bytes([1, DW_EH_PE_udata8, DW_EH_PE_udata4, DW_EH_PE_udata8]) + struct.pack("<QI", 0x9000, 3)
    for loc, fde in entries:
        generic += struct.pack("<QQ", loc, fde)
    assert list(EHFrameHdr(generic, hdr_addr).fde_addresses) == [0x9100, 0x9200, 0x9300]
    with pytest.raises(DWARFError):
        EHFrameHdr(bytes([2]) + data[1:], hdr_addr)
    with pytest.raises(DWARFError):
        EHFrameHdr(data[:-4], hdr_addr)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_eh_frame_hdr_finds_every_fde_of_a_real_binary(tmp_path):
    from perfagent.elf import ELFFile
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "cfi_sample.c")
    out = str(tmp_path / "prog")
    subprocess.run(["gcc", "-O2", "-o", out, source], check=True)
    elf = ELFFile.from_path(out)
    hdr = load_eh_frame_hdr(elf)
    sec = elf.section(".eh_frame")
    cfi = CallFrameInfo(elf.section_data(sec), sec.sh_addr, True)
    assert hdr is not None and hdr.eh_frame_ptr == sec.sh_addr
    fdes = [f for f in cfi.iter_fdes() if f.address_range]
    assert len(hdr) == len(fdes) > 3
    for f in fdes:
        for pc in (f.initial_location, f.pc_end - 1):
            assert cfi.find_fde(pc, hdr).offset == f.offset
            assert cfi.find_fde(pc).offset == f.offset  # the linear index agrees
    assert cfi.find_fde(0, hdr) is None


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_from_elf_merges_a_separate_debug_file(tmp_path):
    """.eh_frame from the stripped binary, .debug_frame from the debug file."""
    from perfagent.elf import ELFFile
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "cfi_sample.c")
    full = str(tmp_path / "full")
    subprocess.run(["gcc", "-O1", "-g", "-fno-asynchronous-unwind-tables", "-o", full, source], check=True)
    stripped = str(tmp_path / "stripped")
    subprocess.run(["strip", "-g", "-o", stripped, full], check=True)
    plain = CFITable.from_elf(ELFFile.from_path(stripped))
    merged = CFITable.from_elf(ELFFile.from_path(stripped), debug_elf=ELFFile.from_path(full))
    merged.compile()
    assert merged.stats.debug_frame_fdes > 0
    assert len(merged) > len(plain)


def test_from_elf_refuses_other_machines():
    class FakeELF:
        e_machine = 183  # EM_AARCH64
        path = "fake"
    with pytest.raises(DWARFError):
        CFITable.from_elf(FakeELF())  # type: ignore[arg-type]


def test_overlong_leb128_is_rejected_quickly():
    with pytest.raises(DWARFError):
        read_uleb128(b"\x80" * 100000 + b"\x01", 0)
    with pytest.raises(DWARFError):
        read_sleb128(b"\xff" * 100000 + b"\x7f", 0)


def test_cie_pointer_outside_the_section():
    sec = Section()
    cie = sec.cie(X86_CIE)
    fde = sec.fde(cie, 0x1000, 0x10)
    sec.buf[fde + 4:fde + 8] = struct.pack("<I", 0x7FFFFFF0)  # far before offset 0
    with pytest.raises(DWARFError):
        sec.cfi().fde_at(fde)
    fde2 = sec.fde(cie, 0x2000, 0x10)
    sec.buf[fde2 + 4:fde2 + 8] = struct.pack("<i", -8)  # "back" to after itself
    with pytest.raises(DWARFError):
        sec.cfi().fde_at(fde2)
    with pytest.raises(DWARFError):
        sec.cfi().fde_at(-4)


def test_big_endian_eh_frame():
    cie_body = (struct.pack(">I", EH_CIE_ID) + b"\x01zR\0" + uleb(1) + sleb(-8) + bytes([RA])
                + uleb(1) + bytes([DW_EH_PE_udata4]) + X86_CIE)
    cie_body += bytes([DW_CFA_nop]) * (-len(cie_body) % 4)
    data = struct.pack(">I", len(cie_body)) + cie_body
    fde_offset = len(data)
    fde_body = (struct.pack(">III", fde_offset + 4, 0x1000, 0x10) + uleb(0)
                + op(DW_CFA_advance_loc | 1) + op(DW_CFA_def_cfa_offset, uleb(16))
                + op(DW_CFA_advance_loc2, struct.pack(">H", 0x3)) + op(DW_CFA_offset | RBX, uleb(2)))
    data += struct.pack(">I", len(fde_body)) + fde_body
    cfi = CallFrameInfo(data, 0, True, 8, little_endian=False)
    fde = cfi.fde_at(fde_offset)
    assert (fde.initial_location, fde.address_range) == (0x1000, 0x10)
    rows = [(s, e, UnwindRow(*f)) for s, e, f in fde_rows(cfi, fde)]
    assert [(s, e) for s, e, _ in rows] == [(0x1000, 0x1001), (0x1001, 0x1004), (0x1004, 0x1010)]
    assert rows[2][2].rule(RBX) == (RULE_OFFSET, -16) and rows[2][2].cfa_offset == 16


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_elf_pointer_reader_after_close(tmp_path):
    from perfagent.dwarf.table import elf_pointer_reader
    from perfagent.elf import ELFFile
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "cfi_sample.c")
    out = str(tmp_path / "prog")
    subprocess.run(["gcc", "-O2", "-o", out, source], check=True)
    elf = ELFFile.from_path(out)
    read = elf_pointer_reader(elf)
    text = elf.section(".text")
    first = bytes(elf.section_data(text)[:8])
    assert read(text.sh_addr) == int.from_bytes(first, "little")
    assert read(0) is None
    table = CFITable.from_elf(elf)
    elf.close()
    assert read(text.sh_addr) is None
    assert len(table) > 0 and table.stats.errors == 0  # compiled lazily from copied bytes


# ------------------------------------------- hostile input: bounds, isolation

def _debug_frame_with(bad_start: int, bad_size: int) -> Section:
    """A .debug_frame (DWARF 5 6.4.1: CIE id 0xffffffff, absolute 8-byte
    initial_location/address_range) with good FDEs around one given range."""
    sec = Section(eh=False)
    cie = sec.cie(X86_CIE, augmentation=b"", version=4)
    sec.fde(cie, 0x1000, 0x10, op(DW_CFA_def_cfa_offset, uleb(16)), address_fmt="<Q", aug_data=None)
    sec.fde(cie, bad_start, bad_size, op(DW_CFA_def_cfa_offset, uleb(24)), address_fmt="<Q", aug_data=None)
    sec.fde(cie, 0x3000, 0x10, op(DW_CFA_def_cfa_offset, uleb(32)), address_fmt="<Q", aug_data=None)
    return sec


@pytest.mark.parametrize("bad_start, bad_size", [
    (0xFFFFFFFFFFFFF000, 0x2000),  # start + range passes 2**64
    (0xFFFFFFFFFFFFFFF0, 0x10),  # ends exactly at 2**64: not representable
    (0x2000, 0xFFFFFFFFFFFFFFFF),
])
def test_fde_range_past_the_address_space_costs_only_itself(bad_start, bad_size):
    """Issue 11: such an FDE raised OverflowError out of the table's index
    and left a half-built table that raised IndexError on every lookup."""
    sec = _debug_frame_with(bad_start, bad_size)
    cfi = sec.cfi(section_addr=0)
    with pytest.raises(DWARFError, match="outside the address space"):
        cfi.fde_at(cfi_offsets(cfi)[1])
    table = CFITable.from_sections([cfi], "crafted")
    for _ in range(2):  # the first lookup builds, the second must see the same table
        assert table.lookup(0x1004).cfa_offset == 16 and table.lookup(0x3004).cfa_offset == 32
        assert table.lookup(0xFFFFFFFFFFFFF800) is None and table.lookup(2 ** 64 + 5) is None
    assert (table.stats.fdes, table.stats.errors) == (2, 1), table.stats.error_messages
    assert len(table) == 2


def cfi_offsets(cfi: CallFrameInfo):
    return [h.offset for h in cfi.iter_headers() if not h.is_cie]


def test_eh_frame_signed_range_is_rejected():
    sec = Section()
    cie = sec.cie(X86_CIE, aug_data=bytes([DW_EH_PE_sdata4]))
    fde = sec.fde(cie, 0x2000, 0, raw_addresses=struct.pack("<ii", 0x2000, -0x100))
    with pytest.raises(DWARFError, match="outside the address space"):
        sec.cfi().fde_at(fde)


def test_invalid_spans_are_dropped_when_indexing():
    good = (CFA_REG_OFFSET, RSP, 8, 0, 0) + (RULE_OFFSET, -8, 0) + (RULE_SAME_VALUE, 0, 0) * 6
    table = CFITable.from_spans([(0x1000, 0x1010, good), (0xFFFFFFFFFFFFFFF0, 2 ** 64 + 16, good),
                                 (-16, 0x10, good), (0x2000, 0x2010, good[:-1]), (0x3000, 0x3010, good)])
    assert list(table.starts) == [0x1000, 0x3000] and table.stats.errors == 3
    assert table.lookup(0x3008).cfa_offset == 8


def test_a_table_that_fails_to_build_is_empty_not_half_built():
    from perfagent.budget import Budget
    sec = Section()
    cie = sec.cie(X86_CIE)
    for i in range(50):
        sec.fde(cie, 0x1000 * (i + 1), 0x10, op(DW_CFA_advance_loc | 1) + op(DW_CFA_def_cfa_offset, uleb(16)))
    table = CFITable.from_sections([sec.cfi()], "crafted")
    table.compile(Budget("test", max_bytes=10000))  # room for a few FDEs, not 50
    assert len(table) == 0 and table.lookup(0x1000) is None and table.lookup(0x32000) is None
    assert table.stats.errors == 1 and "memory" in table.stats.error_messages[0]
    table.compile()  # built once: not retried
    assert len(table) == 0
    late = CFITable.from_sections([sec.cfi()], "crafted")
    late.compile(Budget("test", seconds=-1))  # out of time before it starts
    assert len(late) == 0 and "longer than" in late.stats.error_messages[0]
    assert len(CFITable.from_sections([sec.cfi()], "crafted")) == 100  # the default budget is plenty


def test_cancelled_build_is_retried_not_cached():
    from perfagent import budget
    sec = Section()
    cie = sec.cie(X86_CIE)
    sec.fde(cie, 0x1000, 0x10)
    table = CFITable.from_sections([sec.cfi()], "crafted")
    budget.cancel()
    try:
        assert table.lookup(0x1004) is None
    finally:
        budget.reset()
    assert table.lookup(0x1004).cfa_offset == 8


def remember_fde(depth: int, size: int = 0x100) -> Section:
    sec = Section()
    cie = sec.cie(X86_CIE)
    sec.fde(cie, 0x1000, 0x10, op(DW_CFA_def_cfa_offset, uleb(16)))
    sec.fde(cie, 0x2000, size, op(DW_CFA_remember_state) * depth + op(DW_CFA_restore_state) * depth)
    sec.fde(cie, 0x3000, 0x10, op(DW_CFA_def_cfa_offset, uleb(32)))
    return sec


def test_remember_state_depth_is_bounded():
    from perfagent.dwarf import MAX_REMEMBER_DEPTH
    assert MAX_REMEMBER_DEPTH == 64
    sec = remember_fde(MAX_REMEMBER_DEPTH)
    stats, per_fde = _stats(sec)
    assert (stats.fdes, stats.errors) == (3, 0)
    sec = remember_fde(MAX_REMEMBER_DEPTH + 1)
    stats, per_fde = _stats(sec)
    assert (stats.fdes, stats.errors) == (2, 1) and "deeper than 64" in stats.error_messages[0]


def test_megabyte_of_remember_state_is_one_cheap_error():
    """Issue 11: a 1 MiB FDE of DW_CFA_remember_state took 2.2 s and +290 MB."""
    import tracemalloc
    sec = Section()
    cie = sec.cie(X86_CIE)
    sec.fde(cie, 0x2000, 0x100, op(DW_CFA_remember_state) * (1 << 20))
    data = bytes(sec.buf)
    tracemalloc.start()
    try:
        table = CFITable.from_sections([CallFrameInfo(data, 0x10000, True)], "crafted")
        assert table.lookup(0x2000) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert table.stats.errors == 1 and "deeper than" in table.stats.error_messages[0]
    assert peak < 4 << 20, peak  # the section's own copy is 1 MiB


def test_rows_per_fde_are_bounded():
    from perfagent.dwarf import MAX_ROWS_PER_FDE
    sec = Section()
    cie = sec.cie(X86_CIE)
    sec.fde(cie, 0x100000, 0x100000, op(DW_CFA_advance_loc | 1) * (MAX_ROWS_PER_FDE - 1))
    sec.fde(cie, 0x200000, 0x100000, op(DW_CFA_advance_loc | 1) * MAX_ROWS_PER_FDE)
    # Advances past the end of the range make no rows: not counted.
    sec.fde(cie, 0x300000, 0x10, op(DW_CFA_advance_loc | 1) * (2 * MAX_ROWS_PER_FDE))
    stats, per_fde = _stats(sec)
    assert (stats.fdes, stats.errors) == (2, 1) and "more than 65536 rows" in stats.error_messages[0]


def test_instruction_loop_checks_the_budget():
    from perfagent.budget import Budget, BudgetExceeded
    sec = Section()
    cie = sec.cie(X86_CIE)
    fde = sec.fde(cie, 0x1000, 0x10, op(DW_CFA_nop) * (1 << 17))
    cfi = sec.cfi()
    with pytest.raises(BudgetExceeded):
        fde_rows(cfi, cfi.fde_at(fde), budget=Budget("test", seconds=-1))
    assert len(fde_rows(cfi, cfi.fde_at(fde), budget=Budget("test"))) == 1
    with pytest.raises(BudgetExceeded):  # rows are charged
        fde_rows(cfi, cfi.fde_at(fde), budget=Budget("test", max_bytes=10))


def test_iter_fdes_checks_and_charges_the_budget():
    from perfagent.budget import Budget, BudgetExceeded
    sec = Section()
    cie = sec.cie(X86_CIE)
    for i in range(600):
        sec.fde(cie, 0x1000 * (i + 1), 0x10)
    cfi = sec.cfi()
    assert len(list(cfi.iter_fdes(budget=Budget("test")))) == 600
    with pytest.raises(BudgetExceeded):
        list(cfi.iter_fdes(budget=Budget("test", seconds=-1)))
    with pytest.raises(BudgetExceeded):
        list(cfi.iter_fdes(budget=Budget("test", max_bytes=1000)))


# ------------------------------------------- signal-frame expressions (glibc)

# The CFI glibc's sysdeps/unix/sysv/linux/x86_64/libc_sigaction.c writes for
# __restore_rt (readelf --debug-dump=frames): CFA = *(rsp + 160), every
# register saved at rsp + its offset in the ucontext_t.
UCONTEXT_GREGS = 40  # uc_flags, uc_link, uc_stack (stack_t: 24)
REG_ORDER = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx",
             "rdx", "rax", "rcx", "rsp", "rip")  # <sys/ucontext.h> REG_R8 .. REG_RIP
DWARF_NUMBERS = {"rax": 0, "rdx": 1, "rcx": 2, "rbx": 3, "rsi": 4, "rdi": 5, "rbp": 6, "rsp": 7,
                 "r8": 8, "r9": 9, "r10": 10, "r11": 11, "r12": 12, "r13": 13, "r14": 14, "r15": 15,
                 "rip": 16}


def restore_rt_instructions() -> bytes:
    out = op(DW_CFA_def_cfa_expression, uleb(4), bytes([DW_OP_breg0 + RSP]) + sleb(UCONTEXT_GREGS + 8 * 15)
             + bytes([DW_OP_deref]))
    for i, name in enumerate(REG_ORDER):
        expr = bytes([DW_OP_breg0 + RSP]) + sleb(UCONTEXT_GREGS + 8 * i)
        out += op(DW_CFA_expression, uleb(DWARF_NUMBERS[name]), uleb(len(expr)), expr)
    return out


def test_restore_rt_expressions():
    sec = Section()
    cie = sec.cie(b"", augmentation=b"zRS", aug_data=bytes([DW_EH_PE_pcrel | DW_EH_PE_sdata4]))
    field = 0x10000 + len(sec.buf) + 8
    fde = sec.fde(cie, 0, 0, restore_rt_instructions(),
                  raw_addresses=struct.pack("<iI", 0x3C04F - field, 10))
    rows = rows_of(sec, fde)
    assert len(rows) == 1 and rows[0][:2] == (0x3C04F, 0x3C059)
    row = rows[0][2]
    assert (row.cfa_kind, row.cfa_register, row.cfa_offset, row.signal_frame) == (CFA_DEREF, RSP, 160, 1)
    expected = {16: 168, RBP: 120, RBX: 128, 12: 72, 13: 80, 14: 88, 15: 96}
    for reg, offset in expected.items():
        assert row.rule(reg) == (RULE_EXPRESSION, offset) and row.rule_base(reg) == RSP, reg
