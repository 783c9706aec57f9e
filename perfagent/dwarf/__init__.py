"""DWARF call-frame information: .eh_frame/.debug_frame decoding and the
compiled per-binary unwind tables an x86-64 stack walker consults.

Layers: :mod:`.cfi` parses CIEs/FDEs, :mod:`.rules` executes their DW_CFA
instructions into :class:`UnwindRow` s, :mod:`.table` indexes the rows of a
whole binary for O(log n) allocation-free lookups.
"""

from .cfi import CIE, FDE, CallFrameInfo, EHFrameHdr
from .pointers import DWARFError, UnresolvablePointer
from .rules import (
    CFA_DEREF, CFA_PLT, CFA_REG_OFFSET, CFA_UNSUPPORTED, MAX_REMEMBER_DEPTH, MAX_ROWS_PER_FDE,
    ROW_CFA_KIND, ROW_CFA_OFFSET, ROW_CFA_PLT_THRESHOLD, ROW_CFA_REGISTER, ROW_LENGTH, ROW_RULE_INDEX,
    ROW_SIGNAL_FRAME, RULE_EXPRESSION, RULE_OFFSET, RULE_REGISTER, RULE_SAME_VALUE, RULE_UNDEFINED,
    RULE_UNSUPPORTED, RULE_VAL_EXPRESSION, RULE_VAL_OFFSET, UnwindRow, cie_initial_state, fde_rows,
    match_breg_expression, match_plt_expression,
)
from .table import CFIStats, CFITable, load_eh_frame_hdr

__all__ = [
    "CIE", "FDE", "CallFrameInfo", "EHFrameHdr", "DWARFError", "UnresolvablePointer",
    "CFA_DEREF", "CFA_PLT", "CFA_REG_OFFSET", "CFA_UNSUPPORTED", "MAX_REMEMBER_DEPTH",
    "MAX_ROWS_PER_FDE", "ROW_CFA_KIND", "ROW_CFA_OFFSET", "ROW_CFA_PLT_THRESHOLD",
    "ROW_CFA_REGISTER", "ROW_LENGTH", "ROW_RULE_INDEX", "ROW_SIGNAL_FRAME", "RULE_EXPRESSION",
    "RULE_OFFSET", "RULE_REGISTER", "RULE_SAME_VALUE", "RULE_UNDEFINED", "RULE_UNSUPPORTED",
    "RULE_VAL_EXPRESSION", "RULE_VAL_OFFSET", "UnwindRow", "cie_initial_state", "fde_rows",
    "match_breg_expression", "match_plt_expression",
    "CFIStats", "CFITable", "load_eh_frame_hdr",
]
