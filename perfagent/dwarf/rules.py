"""Executing DW_CFA instructions into unwind rows (DWARF 5 section 6.4.2).

The output is not a general register-rule table but exactly what an x86-64
walker needs: the CFA rule, and the rules of the return address, rbp, rbx and
r12-r15 (:data:`~perfagent.dwarf.x86_64.UNWIND_REGISTERS`), packed as one
flat tuple of small ints (:class:`UnwindRow`) so compiled tables can share
identical rows and return them without allocating.

Rule semantics (DWARF 5 6.4.1): a register without a rule keeps its value
(RULE_SAME_VALUE, which is also the callee-saved convention of the psABI);
RULE_UNDEFINED for the return address marks the outermost frame;
DW_CFA_restore returns a register to the rule the CIE's initial
instructions gave it.

DWARF expressions are supported only in the shapes unwinders meet in
practice, recognised byte for byte: the x86-64 PLT CFA expression
(:data:`CFA_PLT`), and the signal-trampoline subset glibc's ``__restore_rt``
and the kernel vDSOs' sigreturn use: CFA = ``*(reg + off)``
(:data:`CFA_DEREF`), "saved at address reg + off" (:data:`RULE_EXPRESSION`)
and "value is reg + off" (:data:`RULE_VAL_EXPRESSION`), each a single
``DW_OP_breg<N> off`` (plus ``DW_OP_deref`` for the CFA).  Any other
expression is :data:`CFA_UNSUPPORTED` / :data:`RULE_UNSUPPORTED`.

Hostile input is bounded per FDE: at most :data:`MAX_REMEMBER_DEPTH`
nested DW_CFA_remember_state and :data:`MAX_ROWS_PER_FDE` rows, and the
instruction loop checks a :class:`~perfagent.budget.Budget` now and then.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from perfagent.records import NamedTuple
from ..budget import Budget
from .cfi import CIE, FDE, CallFrameInfo, _parsing
from .constants import (
    DW_CFA_advance_loc, DW_CFA_advance_loc1, DW_CFA_advance_loc2, DW_CFA_advance_loc4,
    DW_CFA_def_cfa, DW_CFA_def_cfa_expression, DW_CFA_def_cfa_offset, DW_CFA_def_cfa_offset_sf,
    DW_CFA_def_cfa_register, DW_CFA_def_cfa_sf, DW_CFA_expression, DW_CFA_GNU_args_size,
    DW_CFA_GNU_negative_offset_extended, DW_CFA_MIPS_advance_loc8, DW_CFA_nop, DW_CFA_offset,
    DW_CFA_offset_extended, DW_CFA_offset_extended_sf, DW_CFA_OPERAND_MASK, DW_CFA_PRIMARY_MASK,
    DW_CFA_register, DW_CFA_remember_state, DW_CFA_restore_extended,
    DW_CFA_restore_state, DW_CFA_same_value, DW_CFA_set_loc, DW_CFA_undefined,
    DW_CFA_val_expression, DW_CFA_val_offset, DW_CFA_val_offset_sf, DW_OP_and, DW_OP_breg0,
    DW_OP_breg31, DW_OP_deref, DW_OP_ge, DW_OP_lit0, DW_OP_plus, DW_OP_shl,
)
from .pointers import DWARFError, read_sleb128, read_uleb128
from .x86_64 import DWARF_RIP, DWARF_RSP, NUM_TRACKED_COLUMNS, UNWIND_REGISTERS

# --- register rule kinds (the *_kind fields of UnwindRow) -------------------
RULE_SAME_VALUE = 0  # caller's value = this frame's value (also: no rule)
RULE_UNDEFINED = 1  # not recoverable; for the return address: outermost frame
RULE_OFFSET = 2  # saved at address CFA + value
RULE_VAL_OFFSET = 3  # caller's value is CFA + value itself
RULE_REGISTER = 4  # saved in DWARF register number value
RULE_UNSUPPORTED = 5  # any other DW_CFA_expression / DW_CFA_val_expression
RULE_EXPRESSION = 6  # DW_CFA_expression DW_OP_breg<base> value: saved at address base + value
RULE_VAL_EXPRESSION = 7  # DW_CFA_val_expression DW_OP_breg<base> value: caller's value is base + value

RULE_NAMES = ("same_value", "undefined", "offset", "val_offset", "register", "unsupported",
              "expression", "val_expression")

# --- CFA rule kinds (UnwindRow.cfa_kind) ------------------------------------
CFA_REG_OFFSET = 0  # CFA = register cfa_register + cfa_offset
CFA_PLT = 1  # CFA = rsp + cfa_offset + (((rip & 15) >= cfa_plt_threshold) << 3)
CFA_UNSUPPORTED = 2  # any other DW_CFA_def_cfa_expression: no CFI here
CFA_DEREF = 3  # DW_OP_breg<cfa_register> cfa_offset; DW_OP_deref: CFA = *(register + offset)

CFA_NAMES = ("reg_offset", "plt", "unsupported", "deref")

# --- bounds on hostile input (per FDE) ---------------------------------------
# libgcc keeps remembered states on a small stack too; real CFI nests one or
# two deep.  Without a bound a 1 MiB run of DW_CFA_remember_state costs
# hundreds of MB of copied states.
MAX_REMEMBER_DEPTH = 64
# The most rows one FDE of the machine's largest binaries has is 6678 (gcc's
# cc1); ten times that is still a valid function, more is a hostile one.
MAX_ROWS_PER_FDE = 1 << 16
# The instruction loop checks the budget (a clock read) every this many bytes.
BUDGET_CHECK_BYTES = 1 << 16
# What decoded rows cost in memory, charged to the budget: a distinct row
# tuple (26 ints), and a span (its tuple, two address ints, a list slot).
ROW_BYTES = 264
SPAN_BYTES = 136


class UnwindRow(NamedTuple):
    """The rules in force over one pc range.

    A tuple so a compiled table can hand out the shared instance; callers on
    the hot path may index it with the ROW_* constants instead of names.
    Each register has three fields: its rule kind, the rule's value (an
    offset; for RULE_REGISTER the register holding the value) and its base
    (the DWARF register an expression rule is relative to, else 0).
    """

    cfa_kind: int
    cfa_register: int
    cfa_offset: int
    cfa_plt_threshold: int
    signal_frame: int  # 1: the CIE has 'S'; the caller's pc is exact (no -1)
    ra_kind: int
    ra_value: int
    ra_base: int
    rbp_kind: int
    rbp_value: int
    rbp_base: int
    rbx_kind: int
    rbx_value: int
    rbx_base: int
    r12_kind: int
    r12_value: int
    r12_base: int
    r13_kind: int
    r13_value: int
    r13_base: int
    r14_kind: int
    r14_value: int
    r14_base: int
    r15_kind: int
    r15_value: int
    r15_base: int

    def rule(self, dwarf_register: int) -> Tuple[int, int]:
        """(kind, value) of one of UNWIND_REGISTERS."""
        i = ROW_RULE_INDEX[dwarf_register]
        return self[i], self[i + 1]

    def rule_base(self, dwarf_register: int) -> int:
        """The base register of an expression rule (0 for other kinds)."""
        return self[ROW_RULE_INDEX[dwarf_register] + 2]


ROW_CFA_KIND, ROW_CFA_REGISTER, ROW_CFA_OFFSET, ROW_CFA_PLT_THRESHOLD, ROW_SIGNAL_FRAME = range(5)
_FIRST_RULE_INDEX = 5
ROW_FIELDS_PER_RULE = 3
# DWARF register -> index of its *_kind field (value and base follow it).
ROW_RULE_INDEX = {reg: _FIRST_RULE_INDEX + ROW_FIELDS_PER_RULE * i for i, reg in enumerate(UNWIND_REGISTERS)}
ROW_LENGTH = _FIRST_RULE_INDEX + ROW_FIELDS_PER_RULE * len(UNWIND_REGISTERS)

# The CFA expression gcc/binutils attach to x86-64 .plt entries: DW_OP_breg7
# (rsp) <off>; DW_OP_breg16 (rip) 0; DW_OP_lit15; DW_OP_and; DW_OP_lit<t>;
# DW_OP_ge; DW_OP_lit3; DW_OP_shl; DW_OP_plus.  Checked byte for byte; the
# two operands that vary (off, t) are parsed out.
_PLT_TAIL = bytes([DW_OP_breg0 + DWARF_RIP, 0, DW_OP_lit0 + 15, DW_OP_and])
_PLT_END = bytes([DW_OP_ge, DW_OP_lit0 + 3, DW_OP_shl, DW_OP_plus])


def match_plt_expression(expr: bytes) -> Optional[Tuple[int, int]]:
    """(rsp offset, threshold) if ``expr`` is the x86-64 PLT CFA expression."""
    if len(expr) < 2 or expr[0] != DW_OP_breg0 + DWARF_RSP:
        return None
    try:
        offset, pos = read_sleb128(expr, 1)
    except IndexError:
        return None
    tail = expr[pos:]
    if (len(tail) != len(_PLT_TAIL) + 1 + len(_PLT_END) or not tail.startswith(_PLT_TAIL)
            or not tail.endswith(_PLT_END)):
        return None
    lit = tail[len(_PLT_TAIL)] - DW_OP_lit0
    if not 0 <= lit <= 15:
        return None
    return offset, lit


def match_breg_expression(expr: bytes, deref: bool = False) -> Optional[Tuple[int, int]]:
    """(register, offset) if ``expr`` is exactly ``DW_OP_breg<N> offset``
    (followed by ``DW_OP_deref`` when ``deref``); None for anything else.

    The shapes of signal trampolines' CFI: glibc's x86-64 ``__restore_rt``
    has CFA ``DW_OP_breg7 (rsp) 160; DW_OP_deref`` and every register
    ``DW_OP_breg7 <offset in the ucontext>``; the kernel's vDSO sigreturn
    entries are written the same way.
    """
    if not expr or not DW_OP_breg0 <= expr[0] <= DW_OP_breg31:
        return None
    try:
        offset, pos = read_sleb128(expr, 1)
    except (IndexError, DWARFError):
        return None
    rest = expr[pos:]
    if rest != (bytes([DW_OP_deref]) if deref else b""):
        return None
    return expr[0] - DW_OP_breg0, offset


class RuleState:
    """The register-rule state machine's mutable state (one row in progress).

    ``cfa`` is [kind, register, offset, plt_threshold]; ``kinds``/``values``/
    ``bases`` hold rules for DWARF columns below NUM_TRACKED_COLUMNS.
    """

    __slots__ = ("cfa", "kinds", "values", "bases")

    def __init__(self, cfa: List[int], kinds: List[int], values: List[int], bases: List[int]) -> None:
        self.cfa = cfa
        self.kinds = kinds
        self.values = values
        self.bases = bases

    def copy(self) -> "RuleState":
        return RuleState(list(self.cfa), list(self.kinds), list(self.values), list(self.bases))


def _empty_state() -> RuleState:
    # Before the CIE's instructions: CFA unknown, every register "no rule".
    return RuleState([CFA_UNSUPPORTED, 0, 0, 0], [RULE_SAME_VALUE] * NUM_TRACKED_COLUMNS,
                     [0] * NUM_TRACKED_COLUMNS, [0] * NUM_TRACKED_COLUMNS)


def _snapshot(state: RuleState, ra_column: int, signal_frame: int) -> tuple:
    """The UnwindRow fields for the current state, as a plain tuple."""
    kinds, values, bases = state.kinds, state.values, state.bases
    out = list(state.cfa)
    out.append(signal_frame)
    for reg in UNWIND_REGISTERS:
        column = ra_column if reg == DWARF_RIP else reg
        if column < NUM_TRACKED_COLUMNS:
            out.append(kinds[column])
            out.append(values[column])
            out.append(bases[column])
        else:
            out.append(RULE_UNSUPPORTED)
            out.append(column)
            out.append(0)
    return tuple(out)


class _Interpreter:
    """Runs one instruction stream of a CIE or FDE over a RuleState.

    One object per stream; the opcode loop is a single method with an
    if-chain ordered by frequency (advance_loc, offset, def_cfa_offset are
    most of real CFI) because per-opcode method dispatch would double the
    cost of compiling a large library's tables.
    """

    def __init__(self, cfi: CallFrameInfo, cie: CIE, state: RuleState, initial: Optional[RuleState],
                 pc_end: int = 0, budget: Optional[Budget] = None) -> None:
        self.cfi = cfi
        self.cie = cie
        self.state = state
        self.initial = initial if initial is not None else _empty_state()
        self.boundaries: List[Tuple[int, tuple]] = []  # (row start, snapshot)
        self.record = initial is not None  # CIE instructions define no rows
        self.pc_end = pc_end  # rows starting at or past it are dropped anyway: not recorded
        self.budget = budget

    def _set(self, reg: int, kind: int, value: int, base: int = 0) -> None:
        if reg < NUM_TRACKED_COLUMNS:
            self.state.kinds[reg] = kind
            self.state.values[reg] = value
            self.state.bases[reg] = base

    def _restore(self, reg: int) -> None:
        # To the rule the CIE's initial instructions left (DWARF 5 6.4.2.3),
        # which is "no rule" (same value) only if the CIE gave it none.
        if reg < NUM_TRACKED_COLUMNS:
            self.state.kinds[reg] = self.initial.kinds[reg]
            self.state.values[reg] = self.initial.values[reg]
            self.state.bases[reg] = self.initial.bases[reg]

    def _advance(self, loc: int, new_loc: int) -> int:
        if new_loc < loc:
            raise DWARFError("location moves backwards (%#x -> %#x)" % (loc, new_loc))
        if self.record and new_loc > loc and loc < self.pc_end:
            if len(self.boundaries) >= MAX_ROWS_PER_FDE - 1:  # the final row comes after the loop
                raise DWARFError("more than %d rows in one FDE" % MAX_ROWS_PER_FDE)
            self.boundaries.append((loc, _snapshot(self.state, self.cie.return_address_register,
                                                   int(self.cie.signal_frame))))
        return new_loc

    def _block(self, pos: int) -> Tuple[bytes, int]:
        data = self.cfi.data
        length, pos = read_uleb128(data, pos)
        if pos + length > len(data):
            raise DWARFError("expression block runs past the section")
        return data[pos:pos + length], pos + length

    def run(self, pos: int, end: int, loc: int) -> int:
        """Execute [pos, end); returns the final location."""
        data = self.cfi.data
        s = self.cfi.structs
        caf = self.cie.code_alignment_factor
        daf = self.cie.data_alignment_factor
        state = self.state
        stack: List[RuleState] = []
        budget = self.budget
        # A clock read per instruction would cost more than the instruction:
        # check the budget once per BUDGET_CHECK_BYTES of instructions.
        next_check = pos + BUDGET_CHECK_BYTES if budget is not None else end
        while pos < end:
            if pos >= next_check:
                budget.check()
                next_check = pos + BUDGET_CHECK_BYTES
            op = data[pos]
            pos += 1
            primary = op & DW_CFA_PRIMARY_MASK
            if primary:
                operand = op & DW_CFA_OPERAND_MASK
                if primary == DW_CFA_advance_loc:
                    loc = self._advance(loc, loc + operand * caf)
                elif primary == DW_CFA_offset:
                    value, pos = read_uleb128(data, pos)
                    self._set(operand, RULE_OFFSET, value * daf)
                else:  # DW_CFA_restore
                    self._restore(operand)
                continue
            if op == DW_CFA_def_cfa_offset:
                value, pos = read_uleb128(data, pos)
                _set_cfa_offset(state, value)
            elif op == DW_CFA_nop:
                pass
            elif op == DW_CFA_advance_loc1:
                loc = self._advance(loc, loc + data[pos] * caf)
                pos += 1
            elif op == DW_CFA_advance_loc2:
                loc = self._advance(loc, loc + s.u16.unpack_from(data, pos)[0] * caf)
                pos += 2
            elif op == DW_CFA_advance_loc4:
                loc = self._advance(loc, loc + s.u32.unpack_from(data, pos)[0] * caf)
                pos += 4
            elif op == DW_CFA_MIPS_advance_loc8:
                loc = self._advance(loc, loc + s.u64.unpack_from(data, pos)[0] * caf)
                pos += 8
            elif op == DW_CFA_set_loc:
                new_loc, pos = self._read_set_loc(pos)
                loc = self._advance(loc, new_loc)
            elif op == DW_CFA_def_cfa:
                reg, pos = read_uleb128(data, pos)
                value, pos = read_uleb128(data, pos)
                state.cfa = [CFA_REG_OFFSET, reg, value, 0]
            elif op == DW_CFA_def_cfa_sf:
                reg, pos = read_uleb128(data, pos)
                value, pos = read_sleb128(data, pos)
                state.cfa = [CFA_REG_OFFSET, reg, value * daf, 0]
            elif op == DW_CFA_def_cfa_register:
                reg, pos = read_uleb128(data, pos)
                # Keeps the offset; like libgcc and readelf, also turns an
                # expression rule back into register+offset.
                state.cfa = [CFA_REG_OFFSET, reg, state.cfa[2], 0]
            elif op == DW_CFA_def_cfa_offset_sf:
                value, pos = read_sleb128(data, pos)
                _set_cfa_offset(state, value * daf)
            elif op == DW_CFA_def_cfa_expression:
                expr, pos = self._block(pos)
                state.cfa = self._cfa_expression(expr, state.cfa)
            elif op in (DW_CFA_offset_extended, DW_CFA_val_offset):
                reg, pos = read_uleb128(data, pos)
                value, pos = read_uleb128(data, pos)
                self._set(reg, RULE_OFFSET if op == DW_CFA_offset_extended else RULE_VAL_OFFSET, value * daf)
            elif op in (DW_CFA_offset_extended_sf, DW_CFA_val_offset_sf):
                reg, pos = read_uleb128(data, pos)
                value, pos = read_sleb128(data, pos)
                self._set(reg, RULE_OFFSET if op == DW_CFA_offset_extended_sf else RULE_VAL_OFFSET, value * daf)
            elif op == DW_CFA_GNU_negative_offset_extended:
                reg, pos = read_uleb128(data, pos)
                value, pos = read_uleb128(data, pos)
                self._set(reg, RULE_OFFSET, -value * daf)
            elif op == DW_CFA_restore_extended:
                reg, pos = read_uleb128(data, pos)
                self._restore(reg)
            elif op == DW_CFA_undefined:
                reg, pos = read_uleb128(data, pos)
                self._set(reg, RULE_UNDEFINED, 0)
            elif op == DW_CFA_same_value:
                reg, pos = read_uleb128(data, pos)
                self._set(reg, RULE_SAME_VALUE, 0)
            elif op == DW_CFA_register:
                reg, pos = read_uleb128(data, pos)
                other, pos = read_uleb128(data, pos)
                self._set(reg, RULE_REGISTER, other)
            elif op in (DW_CFA_expression, DW_CFA_val_expression):
                reg, pos = read_uleb128(data, pos)
                expr, pos = self._block(pos)
                breg = match_breg_expression(expr)
                if breg is None:
                    self._set(reg, RULE_UNSUPPORTED, 0)
                else:
                    kind = RULE_EXPRESSION if op == DW_CFA_expression else RULE_VAL_EXPRESSION
                    self._set(reg, kind, breg[1], breg[0])
            elif op == DW_CFA_remember_state:
                if len(stack) >= MAX_REMEMBER_DEPTH:
                    raise DWARFError("DW_CFA_remember_state nested deeper than %d" % MAX_REMEMBER_DEPTH)
                stack.append(state.copy())
            elif op == DW_CFA_restore_state:
                if not stack:
                    raise DWARFError("DW_CFA_restore_state with nothing remembered")
                state = self.state = stack.pop()  # the CFA rule is restored too, as in libgcc
            elif op == DW_CFA_GNU_args_size:
                _size, pos = read_uleb128(data, pos)
            else:
                raise DWARFError("unsupported call frame instruction %#x" % op)
        if pos != end:
            raise DWARFError("instruction operands run past the entry's end")
        return loc

    def _read_set_loc(self, pos: int) -> Tuple[int, int]:
        cie = self.cie
        if self.cfi.is_eh_frame or cie.augmentation.startswith("z"):
            value, pos = self.cfi.pointers.read(pos, cie.fde_encoding)
            if value is None:
                raise DWARFError("DW_CFA_set_loc with an omitted address")
            return value, pos
        return self.cfi._read_sized(pos, cie.address_size)

    @staticmethod
    def _cfa_expression(expr: bytes, cfa: List[int]) -> List[int]:
        plt = match_plt_expression(expr)
        if plt is not None:
            return [CFA_PLT, DWARF_RSP, plt[0], plt[1]]
        deref = match_breg_expression(expr, deref=True)
        if deref is not None:
            return [CFA_DEREF, deref[0], deref[1], 0]
        # Unsupported: keep the old register/offset so a later
        # DW_CFA_def_cfa_register behaves as in libgcc.
        return [CFA_UNSUPPORTED, cfa[1], cfa[2], 0]


def _set_cfa_offset(state: RuleState, offset: int) -> None:
    """DW_CFA_def_cfa_offset(_sf): only meaningful for a register+offset CFA
    (DWARF 5 6.4.2.2); applied to an expression rule it would silently change
    the expression's operand, so the CFA becomes unsupported instead."""
    cfa = state.cfa
    if cfa[0] == CFA_REG_OFFSET:
        cfa[2] = offset
    else:
        state.cfa = [CFA_UNSUPPORTED, cfa[1], offset, 0]


def cie_initial_state(cfi: CallFrameInfo, cie: CIE, budget: Optional[Budget] = None) -> RuleState:
    """The state after the CIE's initial_instructions (what DW_CFA_restore restores)."""
    with _parsing("%s CIE at %#x instructions" % (cfi.name, cie.offset)):
        interp = _Interpreter(cfi, cie, _empty_state(), None, 0, budget)
        interp.run(cie.instructions_start, cie.instructions_end, 0)
        return interp.state


RowSpan = Tuple[int, int, tuple]  # (pc_start, pc_end, UnwindRow fields)


def fde_rows(cfi: CallFrameInfo, fde: FDE, initial: Optional[RuleState] = None,
             budget: Optional[Budget] = None, shared: Optional[Dict[tuple, tuple]] = None) -> List[RowSpan]:
    """The rows of one FDE as (pc_start, pc_end, row tuple), adjacent equal rows merged.

    ``initial`` is the CIE's state from :func:`cie_initial_state` (pass it
    to share the work between the FDEs of one CIE).  ``shared`` interns row
    tuples across FDEs: a large library has ~900k ranges but a few thousand
    distinct rows, so the spans of a whole binary then cost a fifth of the
    memory.  Rows beyond the FDE's range (an advance past pc_end) are
    dropped.  Raises DWARFError for a malformed FDE (also one nesting
    DW_CFA_remember_state deeper than MAX_REMEMBER_DEPTH or with more than
    MAX_ROWS_PER_FDE rows), and BudgetExceeded when ``budget`` runs out (the
    spans and rows kept are charged to it).
    """
    if initial is None:
        initial = cie_initial_state(cfi, fde.cie, budget)
    with _parsing("%s FDE at %#x instructions" % (cfi.name, fde.offset)):
        interp = _Interpreter(cfi, fde.cie, initial.copy(), initial, fde.pc_end, budget)
        loc = interp.run(fde.instructions_start, fde.instructions_end, fde.initial_location)
    boundaries = interp.boundaries
    boundaries.append((loc, _snapshot(interp.state, fde.cie.return_address_register,
                                      int(fde.cie.signal_frame))))
    spans = _spans(boundaries, fde.pc_end)
    new_rows = len(spans)
    if shared is not None:
        new_rows = 0
        for i, (start, end, row) in enumerate(spans):
            kept = shared.get(row)
            if kept is None:
                kept = shared[row] = row
                new_rows += 1
            spans[i] = (start, end, kept)
    if budget is not None:
        budget.charge(SPAN_BYTES * len(spans) + ROW_BYTES * new_rows)
    return spans


def _spans(boundaries: List[Tuple[int, tuple]], pc_end: int) -> List[RowSpan]:
    spans: List[RowSpan] = []
    for i, (start, row) in enumerate(boundaries):
        end = boundaries[i + 1][0] if i + 1 < len(boundaries) else pc_end
        end = min(end, pc_end)
        if start >= end:
            continue
        if spans and spans[-1][1] == start and spans[-1][2] == row:
            spans[-1] = (spans[-1][0], end, row)
        else:
            spans.append((start, end, row))
    return spans
