"""The stack walker on hand-built CFI rows and stack copies (no kernel involved)."""

from __future__ import annotations

import struct

from perfagent.dwarf.rules import CFA_REG_OFFSET, RULE_OFFSET, RULE_SAME_VALUE, RULE_UNDEFINED
from perfagent.dwarf.table import CFITable
from perfagent.symbolize.procmaps import AddressSpace, MapEntry
from perfagent.unwind.walker import (
    OUTCOME_BAD, OUTCOME_COMPLETE, OUTCOME_NO_CFI, OUTCOME_TRUNCATED, BinaryCFI, Walker,
)

S, U, O = RULE_SAME_VALUE, RULE_UNDEFINED, RULE_OFFSET


def row(cfa_off, ra=(O, -8), rbx=(S, 0), rbp=(S, 0)):
    """UnwindRow fields: CFA = rsp + cfa_off, the given rules, r12-r15 same value."""
    return (CFA_REG_OFFSET, 7, cfa_off, 0, 0, ra[0], ra[1], rbp[0], rbp[1], rbx[0], rbx[1],
            S, 0, S, 0, S, 0, S, 0)


class IdentityLoadMap:
    def offset_to_vaddr(self, off):
        return off + 0x1000


class Proc:
    pid = 0

    def __init__(self, entries):
        self.space = AddressSpace(entries)
        self.unwind_cache = {}


TABLE = CFITable.from_spans([
    (0x1000, 0x1100, row(8)),                       # leaf: nothing pushed yet
    (0x1100, 0x1200, row(16, rbx=(O, -16))),        # mid: rbx saved below the return address
    (0x1200, 0x1300, row(8, ra=(U, 0))),            # outer: undefined RA = outermost frame
])
BIN = MapEntry(0x1000, 0x2000, "r-xp", 0, 8, 1, 100, "/bin/x")
NOCFI = MapEntry(0x3000, 0x4000, "r-xp", 0, 8, 1, 101, "/bin/nocfi")


def binary_for(entry):
    if entry.path == "/bin/x":
        return BinaryCFI(TABLE, IdentityLoadMap(), True)
    return BinaryCFI(None, None, False)


def stack(*words):
    return struct.pack("<%dQ" % len(words), *words)


def regs(ip, sp=0x7000, bp=0, bx=0):
    return (bx, bp, sp, ip, 0, 0, 0, 0)


def test_walk_to_the_outermost_frame():
    w = Walker("dwarf")
    # [0x7000] ra into mid, [0x7008] saved rbx, [0x7010] ra into outer
    ips = w.walk(Proc([BIN]), binary_for, regs(0x1010), stack(0x1150, 0x42, 0x1250))
    assert ips == (0x1010, 0x1150, 0x1250)
    assert w.outcomes[OUTCOME_COMPLETE] == 1


def test_stack_copy_too_short_is_truncation():
    w = Walker("dwarf")
    ips = w.walk(Proc([BIN]), binary_for, regs(0x1010), stack(0x1150, 0x42))
    assert ips == (0x1010, 0x1150)
    assert w.outcomes[OUTCOME_TRUNCATED] == 1


def test_return_address_outside_any_mapping_fails_sanity():
    w = Walker("dwarf")
    ips = w.walk(Proc([BIN]), binary_for, regs(0x1010), stack(0x9999, 0, 0))
    assert ips == (0x1010, 0x9999)
    assert w.outcomes[OUTCOME_BAD] == 1


def test_frame_pointer_step_for_code_without_cfi():
    # pc in a binary without CFI; bp -> [saved bp, return address into mid]
    w = Walker("auto")
    words = stack(0, 0, 0x7030, 0x1150, 0x42, 0x1250)  # bp = 0x7010
    ips = w.walk(Proc([BIN, NOCFI]), binary_for, regs(0x3010, bp=0x7010), words)
    # fp step: ra 0x1150, CFA 0x7020; mid: CFA 0x7030, ra [0x7028] = 0x1250; outer: end
    assert ips == (0x3010, 0x1150, 0x1250)
    assert w.outcomes[OUTCOME_COMPLETE] == 1


def test_dwarf_mode_does_not_guess_inside_a_binary_with_cfi():
    # 0x1800 is inside /bin/x, which has CFI, but no row covers it
    w = Walker("dwarf")
    ips = w.walk(Proc([BIN]), binary_for, regs(0x1800, bp=0x7000), stack(0, 0x1150))
    assert ips == (0x1800,)
    assert w.outcomes[OUTCOME_NO_CFI] == 1
    w = Walker("auto")  # auto takes a frame-pointer step there
    ips = w.walk(Proc([BIN]), binary_for, regs(0x1800, bp=0x7000), stack(0x7010, 0x1150, 0, 0x1250))
    assert ips[:2] == (0x1800, 0x1150)


def test_summary_line():
    w = Walker("dwarf")
    w.walk(Proc([BIN]), binary_for, regs(0x1010), stack(0x1150, 0x42, 0x1250))
    assert w.summary() == ("unwound 1 user stacks: 1 complete, 0 truncated by the stack copy, "
                           "0 stopped at code without CFI, 0 failed a sanity check")
