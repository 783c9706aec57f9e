"""In-kernel DWARF unwinding: the compact tables, the BPF walk, and its
agreement with the user-space walker (the reference)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from perfagent.dwarf.rules import (
    CFA_DEREF, CFA_PLT, CFA_REG_OFFSET, CFA_UNSUPPORTED, RULE_EXPRESSION, RULE_OFFSET, RULE_REGISTER,
    RULE_SAME_VALUE, RULE_UNDEFINED,
)
from perfagent.dwarf.table import CFITable
from perfagent.elf import ELFFile
from perfagent.unwind import compact as K

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


def row(cfa=(CFA_REG_OFFSET, 7, 16, 0), signal=0, ra=(RULE_OFFSET, -8, 0), rbp=(RULE_SAME_VALUE, 0, 0)):
    rest = (RULE_SAME_VALUE, 0, 0) * 5
    return tuple(cfa) + (signal,) + tuple(ra) + tuple(rbp) + rest


# -- the table compiler -----------------------------------------------------------

def test_rows_the_kernel_can_follow():
    assert K.compact_fields(row()) == (K.UW_CFA_RSP, K.UW_RBP_SAME, 0, 0, 16, -8, 0)
    assert K.compact_fields(row(cfa=(CFA_REG_OFFSET, 6, 16, 0), rbp=(RULE_OFFSET, -16, 0))) == \
        (K.UW_CFA_RBP, K.UW_RBP_OFFSET, 0, 0, 16, -8, -16)
    assert K.compact_fields(row(cfa=(CFA_PLT, 7, 8, 11))) == (K.UW_CFA_PLT, K.UW_RBP_SAME, 0, 11, 8, -8, 0)
    # glibc's __restore_rt: CFA = *(rsp + 160), rip and rbp saved in the ucontext
    sig = row(cfa=(CFA_DEREF, 7, 160, 0), signal=1, ra=(RULE_EXPRESSION, 168, 7),
              rbp=(RULE_EXPRESSION, 120, 7))
    assert K.compact_fields(sig) == (K.UW_CFA_DEREF_RSP, K.UW_RBP_EXPR_RSP,
                                     K.UW_ROW_SIGNAL | K.UW_ROW_RA_RSP, 0, 160, 168, 120)
    # _start: the return address is undefined
    assert K.compact_fields(row(ra=(RULE_UNDEFINED, 0, 0)))[0] == K.UW_CFA_END


def test_rows_the_kernel_refuses_or_leaves_to_the_frame_pointer():
    # What the walker has no row for (an unsupported CFA expression): "no CFI here".
    assert K.compact_fields(row(cfa=(CFA_UNSUPPORTED, 7, 8, 0))) == K.NONE_ROW
    refused = [
        row(cfa=(CFA_REG_OFFSET, 10, 8, 0)),                  # CFA on r10 (stack realignment)
        row(cfa=(CFA_DEREF, 3, 8, 0)),                        # *(rbx + 8)
        row(ra=(RULE_REGISTER, 0, 0)),                        # return address in a register
        row(ra=(RULE_EXPRESSION, 8, 3)),                      # ... saved relative to rbx
        row(rbp=(RULE_REGISTER, 12, 0)),                      # rbp kept in r12
        row(cfa=(CFA_REG_OFFSET, 7, 1 << 40, 0)),             # offsets beyond the fields
        row(rbp=(RULE_OFFSET, -(1 << 20), 0)),
    ]
    for r in refused:
        assert K.compact_fields(r) == K.FALLBACK_ROW, r


def test_gaps_merges_and_the_end_are_explicit():
    a = row()
    b = row(cfa=(CFA_REG_OFFSET, 7, 24, 0))
    c = b[:11] + (RULE_OFFSET, -24, 0) + (RULE_SAME_VALUE, 0, 0) * 4  # b, and rbx saved
    table = CFITable.from_spans([(0x1000, 0x1004, a), (0x1004, 0x1010, b), (0x1010, 0x1020, c),
                                 (0x1040, 0x1050, a)])
    t = K.compile_rows(table)
    assert t.base == 0x1000
    got = [(r.pc, r.cfa_kind, r.cfa_off) for r in t.rows]
    # b and c differ only in rbx: one compact row; the gap and the end are NONE rows.
    assert got == [(0, K.UW_CFA_RSP, 16), (4, K.UW_CFA_RSP, 24), (0x20, K.UW_CFA_NONE, 0),
                   (0x40, K.UW_CFA_RSP, 16), (0x50, K.UW_CFA_NONE, 0)]
    assert t.lookup(0x1030).cfa_kind == K.UW_CFA_NONE and t.lookup(0x100).cfa_kind == K.UW_CFA_NONE
    assert len(t.pack()) == 16 * len(t.rows)
    with pytest.raises(K.TableRefused):
        K.compile_rows(table, max_rows=3)
    with pytest.raises(K.TableRefused):
        K.compile_rows(CFITable.from_spans([(0x1000, 0x1004, a), (0x1000 + (1 << 33), 0x1001 + (1 << 33), a)]))


_FDE = re.compile(r"^[0-9a-f]+ [0-9a-f]+ [0-9a-f]+ FDE cie=[0-9a-f]+ pc=([0-9a-f]+)\.\.([0-9a-f]+)")


def readelf_rows(path):
    """(loc, cfa text, {column: rule text}) of every row readelf interprets."""
    out = subprocess.run(["readelf", "--debug-dump=frames-interp", path], stdout=subprocess.PIPE,
                         text=True).stdout  # exit status 1 on notes it cannot decode
    rows, columns, in_fde = [], None, False
    for line in out.splitlines():
        if " CIE " in line or _FDE.match(line):
            columns, in_fde = None, " FDE " in line
            continue
        parts = line.split()
        if parts[:2] == ["LOC", "CFA"] and in_fde:
            columns = parts[2:]
            continue
        if columns and len(parts) == len(columns) + 2 and re.fullmatch(r"[0-9a-f]{16}", parts[0]):
            rows.append((int(parts[0], 16), parts[1], dict(zip(columns, parts[2:]))))
        elif not parts:
            columns = None
    return rows


@pytest.mark.parametrize("path", [LIBC, "/usr/bin/python3.11"])
def test_compiler_matches_readelf_frames_interp(path):
    if not os.path.exists(path):
        pytest.skip("no " + path)
    with ELFFile.from_path(path) as elf:
        table = CFITable.from_elf(elf)
        t = K.compile_rows(table)
    rows = readelf_rows(path)
    assert len(rows) > 1000
    checked = 0
    for loc, cfa, regs in rows:
        r = t.lookup(loc)
        m = re.fullmatch(r"(rsp|rbp)\+(\d+)", cfa)
        if re.fullmatch(r"r(ax|bx|cx|dx|si|di|[0-9]+)[+-]\d+", cfa):   # CFA on another register
            assert r.cfa_kind == K.UW_CFA_FALLBACK, (hex(loc), cfa, r)
            continue
        if m is None:
            assert cfa == "exp" and r.cfa_kind in (K.UW_CFA_PLT, K.UW_CFA_DEREF_RSP, K.UW_CFA_NONE,
                                                   K.UW_CFA_FALLBACK), (hex(loc), cfa, r)
            continue
        ra = regs.get("ra")
        if ra == "u":
            assert r.cfa_kind in (K.UW_CFA_END, K.UW_CFA_FALLBACK), (hex(loc), r)
            continue
        want_kind = K.UW_CFA_RSP if m.group(1) == "rsp" else K.UW_CFA_RBP
        assert (r.cfa_kind, r.cfa_off) == (want_kind, int(m.group(2))), (hex(loc), cfa, r)
        assert ra == "c%+d" % r.ra_off, (hex(loc), regs, r)
        rbp = regs.get("rbp", "u")
        if rbp == "u":
            assert r.rbp_kind == K.UW_RBP_SAME, (hex(loc), regs, r)
        elif rbp.startswith("c"):
            assert (r.rbp_kind, "c%+d" % r.rbp_off) == (K.UW_RBP_OFFSET, rbp), (hex(loc), regs, r)
        checked += 1
    assert checked > 0.9 * len(rows), (checked, len(rows))
    assert t.fallback_rows < 0.01 * len(t.rows), (t.fallback_rows, len(t.rows))
