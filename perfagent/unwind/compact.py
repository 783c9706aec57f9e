"""Compact unwind tables: a binary's CFI as the rows a BPF program can walk.

The user-space walker (:mod:`perfagent.unwind.walker`) interprets
:class:`~perfagent.dwarf.rules.UnwindRow` tuples: seven registers' rules,
expressions and all.  A BPF program walking stacks in the kernel needs far
less, and needs it flat: per pc range, how to find the CFA, where the return
address is, and what becomes of rbp (the only register an x86-64 CFA rule
other than rsp ever uses).  :func:`compile_rows` turns a compiled
:class:`~perfagent.dwarf.table.CFITable` into sorted 16-byte rows, one per
range start, with the gaps between FDEs made explicit:

    struct unwind_row {
        __u32 pc;          0   first address of the range, minus the table's base
                               (the next row's pc ends it; the last row is UW_CFA_NONE)
        __u8  cfa_kind;    4   UW_CFA_* below
        __u8  rbp_kind;    5   UW_RBP_* below
        __u8  flags;       6   UW_ROW_SIGNAL, UW_ROW_RA_RSP
        __u8  plt;         7   UW_CFA_PLT: the threshold on (pc & 15)
        __s32 cfa_off;     8
        __s16 ra_off;      12  return address saved at cfa + ra_off (rsp + ra_off with UW_ROW_RA_RSP)
        __s16 rbp_off;     14
    };                     16

The kinds mirror the walker's step exactly (a pc in a row of kind
UW_CFA_NONE is where the walker has no row or an unsupported CFA rule: it
tries the frame pointer under ``--unwind auto`` and stops under ``dwarf``).
What a row cannot express -- a CFA on another register, a return address or
rbp kept in a register or behind any other expression, offsets beyond the
fields -- becomes UW_CFA_FALLBACK: a walk that meets it is handed to the
user-space walker whole, so the in-kernel walk never guesses.
"""

from __future__ import annotations

import struct
from typing import List, Optional, Tuple

from perfagent.records import NamedTuple
from perfagent.dwarf.rules import (
    CFA_DEREF, CFA_PLT, CFA_REG_OFFSET, CFA_UNSUPPORTED, RULE_EXPRESSION, RULE_OFFSET,
    RULE_SAME_VALUE, RULE_UNDEFINED, RULE_VAL_OFFSET,
)
from perfagent.dwarf.x86_64 import DWARF_RBP, DWARF_RSP

UNWIND_ROW = struct.Struct("<IBBBBihh")
assert UNWIND_ROW.size == 16

# unwind_row.cfa_kind
UW_CFA_NONE = 0        # no CFI here: a frame-pointer step (auto, or a binary without CFI), else stop
UW_CFA_RSP = 1         # CFA = rsp + cfa_off
UW_CFA_RBP = 2         # CFA = rbp + cfa_off
UW_CFA_PLT = 3         # CFA = rsp + cfa_off + ((pc & 15) >= plt ? 8 : 0)
UW_CFA_DEREF_RSP = 4   # CFA = *(rsp + cfa_off)   (a signal frame's saved rsp)
UW_CFA_DEREF_RBP = 5   # CFA = *(rbp + cfa_off)
UW_CFA_END = 6         # the return address is undefined: the outermost frame
UW_CFA_FALLBACK = 7    # cannot be expressed here: the user-space walker takes the sample
CFA_KIND_NAMES = ("none", "rsp", "rbp", "plt", "deref_rsp", "deref_rbp", "end", "fallback")

# unwind_row.rbp_kind
UW_RBP_SAME = 0        # the caller's rbp is this frame's
UW_RBP_OFFSET = 1      # saved at cfa + rbp_off (below the leaf's sp: already popped, keep it)
UW_RBP_UNDEFINED = 2   # unknown from here on
UW_RBP_EXPR_RSP = 3    # saved at rsp + rbp_off (a signal frame's ucontext)
UW_RBP_VAL_OFFSET = 4  # the caller's rbp is cfa + rbp_off

# unwind_row.flags
UW_ROW_SIGNAL = 1      # a signal frame (CIE 'S'): the caller's pc is exact
UW_ROW_RA_RSP = 2      # the return address is saved at rsp + ra_off (signal frame)

S16 = (-(1 << 15), (1 << 15) - 1)
S32 = (-(1 << 31), (1 << 31) - 1)
U32_LIMIT = 1 << 32


class CompactRow(NamedTuple):
    """One row as the program reads it (fields of ``struct unwind_row``)."""

    pc: int
    cfa_kind: int
    rbp_kind: int
    flags: int
    plt: int
    cfa_off: int
    ra_off: int
    rbp_off: int

    def pack(self) -> bytes:
        return UNWIND_ROW.pack(*self)


NONE_ROW = (UW_CFA_NONE, UW_RBP_SAME, 0, 0, 0, 0, 0)
FALLBACK_ROW = (UW_CFA_FALLBACK, UW_RBP_SAME, 0, 0, 0, 0, 0)


class TableRefused(ValueError):
    """A binary whose whole table cannot be used in the kernel."""


def _fits(v: int, bounds) -> bool:
    return bounds[0] <= v <= bounds[1]


def compact_fields(row) -> tuple:
    """The compact fields (all but pc) of one UnwindRow, or FALLBACK_ROW.

    Mirrors the walker's CFI step (perfagent.unwind.walker.Walker.walk):
    what it computes from rsp, rbp and the stack, the row expresses; what it
    would compute from other registers, the row refuses.
    """
    cfa_kind, cfa_reg, cfa_off, plt, signal = row[0], row[1], row[2], row[3], row[4]
    ra_kind, ra_value, ra_base = row[5], row[6], row[7]
    rbp_kind, rbp_value, rbp_base = row[8], row[9], row[10]
    if cfa_kind == CFA_UNSUPPORTED:
        return NONE_ROW                  # the walker has no usable row either
    if cfa_kind == CFA_REG_OFFSET:
        kind = {DWARF_RSP: UW_CFA_RSP, DWARF_RBP: UW_CFA_RBP}.get(cfa_reg)
    elif cfa_kind == CFA_PLT:
        kind = UW_CFA_PLT if cfa_reg == DWARF_RSP and 0 <= plt <= 255 else None
    elif cfa_kind == CFA_DEREF:
        kind = {DWARF_RSP: UW_CFA_DEREF_RSP, DWARF_RBP: UW_CFA_DEREF_RBP}.get(cfa_reg)
    else:
        kind = None
    if kind is None or not _fits(cfa_off, S32):
        return FALLBACK_ROW
    flags = UW_ROW_SIGNAL if signal else 0
    if ra_kind == RULE_UNDEFINED:
        return (UW_CFA_END, UW_RBP_SAME, flags, 0, 0, 0, 0)
    if ra_kind == RULE_OFFSET:
        ra_off = ra_value
    elif ra_kind == RULE_EXPRESSION and ra_base == DWARF_RSP:
        ra_off = ra_value
        flags |= UW_ROW_RA_RSP
    else:
        return FALLBACK_ROW
    if rbp_kind == RULE_SAME_VALUE:
        rk, rbp_off = UW_RBP_SAME, 0
    elif rbp_kind == RULE_OFFSET:
        rk, rbp_off = UW_RBP_OFFSET, rbp_value
    elif rbp_kind == RULE_UNDEFINED:
        rk, rbp_off = UW_RBP_UNDEFINED, 0
    elif rbp_kind == RULE_EXPRESSION and rbp_base == DWARF_RSP:
        rk, rbp_off = UW_RBP_EXPR_RSP, rbp_value
    elif rbp_kind == RULE_VAL_OFFSET:
        rk, rbp_off = UW_RBP_VAL_OFFSET, rbp_value
    else:
        return FALLBACK_ROW
    if not (_fits(ra_off, S16) and _fits(rbp_off, S16)):
        return FALLBACK_ROW
    return (kind, rk, flags, plt if kind == UW_CFA_PLT else 0, cfa_off, ra_off, rbp_off)


class CompactTable(NamedTuple):
    """A binary's rows: ``base`` is the link-time address of rows[0] (pc 0)."""

    base: int
    rows: List[CompactRow]
    fallback_rows: int       # rows the kernel cannot follow (UW_CFA_FALLBACK)

    def pack(self) -> bytes:
        return b"".join(UNWIND_ROW.pack(*r) for r in self.rows)

    def lookup(self, vaddr: int) -> Optional[CompactRow]:
        """The row for link-time address ``vaddr`` (what the program's
        binary search finds): for tests and tools."""
        import bisect
        rel = vaddr - self.base
        if rel < 0 or rel >= U32_LIMIT:
            return self.rows[-1]
        pcs = _PCS.get(id(self.rows))
        if pcs is None or len(pcs) != len(self.rows):
            _PCS.clear()
            pcs = _PCS[id(self.rows)] = [r.pc for r in self.rows]
        i = bisect.bisect_right(pcs, rel) - 1
        return self.rows[max(i, 0)]


_PCS: dict = {}   # CompactTable.lookup's search keys, for the last table looked up


def compile_rows(table, max_rows: int = 1 << 20) -> CompactTable:
    """The compact rows of a compiled CFITable (``table.starts``,
    ``table.ends``, ``table.row_ids``, ``table.rows``).

    Adjacent ranges with equal compact fields merge (the compact row drops
    the rbx/r12-r15 rules that split them); a gap between ranges becomes a
    UW_CFA_NONE row, and so does the end of the last range.  Raises
    TableRefused when the rows would not fit ``max_rows`` or the binary
    spans 4 GiB or more (pc is a u32 offset).
    """
    if getattr(table, "_builder", None) is not None:
        table.compile()
    starts, ends, row_ids, rows = table.starts, table.ends, table.row_ids, table.rows
    if not len(starts):
        return CompactTable(0, [CompactRow(0, *NONE_ROW)], 0)
    base = starts[0]
    if ends[len(ends) - 1] - base >= U32_LIMIT:
        raise TableRefused("the CFI spans %#x bytes (more than 4 GiB)" % (ends[len(ends) - 1] - base))
    fields_of = [compact_fields(r) for r in rows]   # per distinct row: a few thousand, not per range
    out: List[Tuple[int, tuple]] = []
    last_end = base
    for i in range(len(starts)):
        start, end = starts[i], ends[i]
        if start > last_end and out and out[-1][1] != NONE_ROW:
            out.append((last_end - base, NONE_ROW))
        fields = fields_of[row_ids[i]]
        if not out or out[-1][1] != fields:
            out.append((start - base, fields))
        last_end = end
    out.append((last_end - base, NONE_ROW))
    if len(out) > max_rows:
        raise TableRefused("%d rows, more than the %d the kernel tables hold" % (len(out), max_rows))
    compact = [CompactRow(pc, *f) for pc, f in out]
    return CompactTable(base, compact, sum(1 for r in compact if r.cfa_kind == UW_CFA_FALLBACK))


def compile_spans(spans, gap: tuple = FALLBACK_ROW, max_rows: int = 1 << 20) -> CompactTable:
    """The compact rows of part of a binary's CFI: ``spans`` are (start, end,
    UnwindRow) of the FDEs decoded so far (the user-space walker decodes
    them lazily), in any order; what lies between and around them is
    ``gap`` -- UW_CFA_FALLBACK: not known yet, so the kernel hands such a pc
    to the user-space walker, which decodes its FDE, and the next rebuild
    has it.  Rows start at pc 0 (base 0: the row pc is the link-time
    address); TableRefused as for :func:`compile_rows`."""
    spans = sorted(spans, key=lambda sp: sp[0])
    if spans and spans[-1][1] >= U32_LIMIT:
        raise TableRefused("code at %#x, beyond 4 GiB" % spans[-1][1])
    fields_of: dict = {}
    out: List[Tuple[int, tuple]] = [(0, gap)]
    last_end = 0
    for start, end, row in spans:
        if start < last_end:           # overlapping FDEs: the first one wins, as in CFITable
            start = last_end
            if start >= end:
                continue
        if start > last_end and out[-1][1] != gap:
            out.append((last_end, gap))
        fields = fields_of.get(id(row))
        if fields is None:
            fields = fields_of[id(row)] = compact_fields(row)
        if out[-1][0] == start:
            out[-1] = (start, fields)
        elif out[-1][1] != fields:
            out.append((start, fields))
        last_end = end
    if out[-1][1] != gap:
        out.append((last_end, gap))
    if len(out) > max_rows:
        raise TableRefused("%d rows, more than the %d the kernel tables hold" % (len(out), max_rows))
    compact = [CompactRow(pc, *f) for pc, f in out]
    return CompactTable(0, compact, sum(1 for r in compact if r.cfa_kind == UW_CFA_FALLBACK))


def describe(row: CompactRow) -> str:
    """A row as text, close to readelf's frames-interp columns (for tests)."""
    k = row.cfa_kind
    if k in (UW_CFA_RSP, UW_CFA_RBP):
        cfa = "%s%+d" % ("rsp" if k == UW_CFA_RSP else "rbp", row.cfa_off)
    elif k == UW_CFA_PLT:
        cfa = "plt(rsp%+d,%d)" % (row.cfa_off, row.plt)
    elif k in (UW_CFA_DEREF_RSP, UW_CFA_DEREF_RBP):
        cfa = "*(%s%+d)" % ("rsp" if k == UW_CFA_DEREF_RSP else "rbp", row.cfa_off)
    else:
        cfa = CFA_KIND_NAMES[k]
    return cfa
