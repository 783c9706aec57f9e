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
    return (CFA_REG_OFFSET, 7, cfa_off, 0, 0, ra[0], ra[1], 0, rbp[0], rbp[1], 0, rbx[0], rbx[1], 0,
            S, 0, 0, S, 0, 0, S, 0, 0, S, 0, 0)


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
    """The bad return address is not appended: no garbage root frame."""
    w = Walker("dwarf")
    ips = w.walk(Proc([BIN]), binary_for, regs(0x1010), stack(0x9999, 0, 0))
    assert ips == (0x1010,)
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


# ---------------------------------------------------------------------------
# Walks through tables built from .eh_frame bytes (see test_dwarf_cfi.Section).

from test_dwarf_cfi import RBP, RBX, RSP, X86_CIE, Section, op, restore_rt_instructions, sleb, uleb  # noqa: E402
from perfagent.dwarf.constants import (  # noqa: E402
    DW_CFA_advance_loc, DW_CFA_def_cfa, DW_CFA_def_cfa_offset, DW_CFA_def_cfa_sf, DW_CFA_offset,
    DW_CFA_offset_extended_sf, DW_CFA_restore, DW_CFA_undefined, DW_EH_PE_udata4,
)

RA = 16


class LoadMapAt:
    """File offset -> link-time address for a mapping of a binary linked at ``base``."""

    def __init__(self, base):
        self.base = base

    def offset_to_vaddr(self, off):
        return off + self.base


def binaries(*specs):
    """(MapEntry, BinaryCFI) pairs -> binary_for."""
    by_path = {entry.path: cfi for entry, cfi in specs}
    return lambda entry: by_path.get(entry.path)


def eh_table(build) -> CFITable:
    sec = Section()
    build(sec)
    return CFITable.from_sections([sec.cfi()], "crafted")


PROG = MapEntry(0x1000, 0x2000, "r-xp", 0, 8, 1, 200, "/bin/prog")
LIBC = MapEntry(0x5000, 0x6000, "r-xp", 0, 8, 1, 201, "/lib/libc.so.6")
DATA = MapEntry(0x8000, 0x9000, "rw-p", 0, 8, 1, 202, "/bin/data")

# The program: handler [0x1000,0x1100) CFA rsp+8; interrupted [0x1100,0x1200)
# CFA rsp+8 (a leaf loop); outer [0x1200,0x1300) CFA rbp+16, ra at CFA-8;
# root [0x1300,0x1400) undefined return address.
PROG_TABLE = eh_table(lambda sec: (
    sec.fde(sec.cie(X86_CIE), 0x1000, 0x100),
    sec.fde(0, 0x1100, 0x100),
    sec.fde(0, 0x1200, 0x100, op(DW_CFA_def_cfa, uleb(RBP), uleb(16))),
    sec.fde(0, 0x1300, 0x100, op(DW_CFA_undefined, uleb(RA))),
))


def _libc_table():
    # glibc's __restore_rt: its FDE starts one byte before the function, so
    # that the lookup of "return address - 1" finds it.
    sec = Section()
    cie = sec.cie(b"", augmentation=b"zRS", aug_data=bytes([DW_EH_PE_udata4]))
    sec.fde(cie, 0x504F, 10, restore_rt_instructions())
    return CFITable.from_sections([sec.cfi()], "libc")


SIGNAL_BINARIES = binaries((PROG, BinaryCFI(PROG_TABLE, LoadMapAt(0x1000), True)),
                           (LIBC, BinaryCFI(_libc_table(), LoadMapAt(0x5000), True)))


def ucontext(rsp, rip, rbp=0, rbx=0, r12=0, r13=0, r14=0, r15=0):
    """The words of a ucontext_t up to gregs[REG_RIP] (uc_flags, uc_link,
    uc_stack, then r8..r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip)."""
    return [0, 0, 0, 0, 0] + [0, 0, 0, 0, r12, r13, r14, r15, 0, 0, rbp, rbx, 0, 0, 0, rsp, rip]


def test_walk_through_a_signal_frame():
    """handler -> __restore_rt -> the interrupted function (exact pc) -> callers.

    The interrupted pc is the first byte of its function, so ``pc - 1`` would
    land in the handler's FDE: it must be looked up exactly.  rbp is restored
    from the ucontext (the outer frame's CFA is rbp-based), and passes through
    the interrupted frame, which has no rule for it (same value)."""
    sp = 0x7000
    interrupted_sp = 0x7400
    words = [0x5050] + ucontext(interrupted_sp, 0x1100, rbp=0x7500)
    words += [0] * ((interrupted_sp - sp) // 8 - len(words))
    words += [0x1250]                       # [0x7400] interrupted's return address, into outer
    words += [0] * ((0x7508 - 0x7408) // 8)
    words += [0x1350]                       # [0x7508] outer's return address (CFA 0x7510 - 8)
    words += [0, 0]
    w = Walker("dwarf")
    ips = w.walk(Proc([PROG, LIBC]), SIGNAL_BINARIES, regs(0x1010, sp=sp), stack(*words))
    # __restore_rt and the interrupted frame carry exact pcs, reported + 1.
    assert ips == (0x1010, 0x5051, 0x1101, 0x1250, 0x1350)
    assert w.outcomes == [1, 0, 0, 0]


def test_signal_frame_needs_the_ucontext_in_the_copy():
    w = Walker("dwarf")
    ips = w.walk(Proc([PROG, LIBC]), SIGNAL_BINARIES, regs(0x1010), stack(0x5050, 0, 0, 0))
    assert ips == (0x1010, 0x5051)
    assert w.outcomes[OUTCOME_TRUNCATED] == 1


def test_zero_return_address_ends_the_walk_cleanly():
    w = Walker("dwarf")
    ips = w.walk(Proc([PROG]), SIGNAL_BINARIES, regs(0x1010), stack(0, 0))
    assert ips == (0x1010,)  # no 0 frame
    assert w.outcomes == [1, 0, 0, 0]


def test_no_rule_means_same_value_across_frames():
    """rbx has no rule in the leaf: the caller, whose CFA is rbx-based, sees
    the sampled rbx."""
    table = eh_table(lambda sec: (
        sec.fde(sec.cie(X86_CIE), 0x1000, 0x100),                                   # leaf
        sec.fde(0, 0x1100, 0x100, op(DW_CFA_def_cfa, uleb(RBX), uleb(16))),           # caller
        sec.fde(0, 0x1200, 0x100, op(DW_CFA_undefined, uleb(RA))),                    # root
    ))
    bins = binaries((PROG, BinaryCFI(table, LoadMapAt(0x1000), True)))
    w = Walker("dwarf")
    # [0x7000] leaf's ra; the caller's CFA = rbx + 16 = 0x7030, its ra at 0x7028
    ips = w.walk(Proc([PROG]), bins, regs(0x1010, bx=0x7020), stack(0x1150, 0, 0, 0, 0, 0x1250, 0, 0))
    assert ips == (0x1010, 0x1150, 0x1250)
    assert w.outcomes == [1, 0, 0, 0]


def test_restore_returns_to_the_cie_rule_in_a_walk():
    """The CIE saves rbx at CFA-16; the FDE moves it to CFA-24, then
    DW_CFA_restore: the rule is the CIE's again, not "no rule".  The caller's
    CFA is rbx-based, so only the right rule completes the walk."""
    cie_instructions = X86_CIE + op(DW_CFA_offset | RBX, uleb(2))
    table = eh_table(lambda sec: (
        sec.fde(sec.cie(cie_instructions), 0x1000, 0x100,
                op(DW_CFA_def_cfa_offset, uleb(24)) + op(DW_CFA_offset | RBX, uleb(3))
                + op(DW_CFA_advance_loc | 8) + op(DW_CFA_restore | RBX)),
        sec.fde(0, 0x1100, 0x100, op(DW_CFA_def_cfa, uleb(RBX), uleb(16))),
        sec.fde(0, 0x1200, 0x100, op(DW_CFA_undefined, uleb(RA))),
    ))
    assert table.lookup(0x1004).rule(RBX) == (RULE_OFFSET, -24)
    assert table.lookup(0x1010).rule(RBX) == (RULE_OFFSET, -16)
    bins = binaries((PROG, BinaryCFI(table, LoadMapAt(0x1000), True)))
    # sp 0x7000, CFA 0x7018: [0x7000] what CFA-24 would read, [0x7008] rbx
    # (CFA-16), [0x7010] ra; the caller's CFA = rbx + 16 = 0x7050, ra [0x7048].
    words = stack(0xBAD, 0x7040, 0x1150, 0, 0, 0, 0, 0, 0, 0x1250, 0, 0)
    w = Walker("dwarf")
    ips = w.walk(Proc([PROG]), bins, regs(0x1010, bx=0x9999), words)
    assert ips == (0x1010, 0x1150, 0x1250)
    assert w.outcomes == [1, 0, 0, 0]


def test_return_address_in_a_data_mapping_is_not_appended():
    w = Walker("dwarf")
    ips = w.walk(Proc([PROG, DATA]), SIGNAL_BINARIES, regs(0x1010), stack(0x8010, 0, 0))
    assert ips == (0x1010,)
    assert w.outcomes[OUTCOME_BAD] == 1


def test_stack_that_does_not_grow_is_not_appended():
    """CFA = rsp - 8 with the return address readable at CFA + 16: a good
    address, but the stack would shrink."""
    table = eh_table(lambda sec: sec.fde(
        sec.cie(X86_CIE), 0x1000, 0x100,
        op(DW_CFA_def_cfa_sf, uleb(RSP), sleb(1)) + op(DW_CFA_offset_extended_sf, uleb(RA), sleb(-2))))
    bins = binaries((PROG, BinaryCFI(table, LoadMapAt(0x1000), True)))
    w = Walker("dwarf")
    ips = w.walk(Proc([PROG]), bins, regs(0x1010), stack(0, 0x1150, 0))
    assert ips == (0x1010,)
    assert w.outcomes[OUTCOME_BAD] == 1
