"""x86-64 facts the CFI tables need (System V psABI, figure 3.36).

These mirror the DWARF_* names in :mod:`perfagent.arch.x86_64`; they are
repeated here rather than imported so the compiled table's column layout is
defined in one place next to the code that depends on it.
"""

DWARF_RAX, DWARF_RDX, DWARF_RCX, DWARF_RBX = 0, 1, 2, 3
DWARF_RSI, DWARF_RDI, DWARF_RBP, DWARF_RSP = 4, 5, 6, 7
DWARF_R8, DWARF_R9, DWARF_R10, DWARF_R11 = 8, 9, 10, 11
DWARF_R12, DWARF_R13, DWARF_R14, DWARF_R15 = 12, 13, 14, 15
DWARF_RIP = 16
DWARF_RA = 16  # the return-address column is the rip column

# Registers whose rules the interpreter keeps.  The column numbers of every
# register the unwinder restores fit below this, so a flat list indexed by
# DWARF number holds the state; higher columns (xmm, st, ...) are parsed and
# dropped.
NUM_TRACKED_COLUMNS = 17

# The registers an x86-64 walker restores from CFI, in the order the compiled
# row stores them: the return address first, then the callee-saved registers
# perf samples.  rsp is not here: by definition the caller's rsp is the CFA.
UNWIND_REGISTERS = (DWARF_RA, DWARF_RBP, DWARF_RBX, DWARF_R12, DWARF_R13, DWARF_R14, DWARF_R15)

REGISTER_NAMES = {
    DWARF_RAX: "rax", DWARF_RDX: "rdx", DWARF_RCX: "rcx", DWARF_RBX: "rbx",
    DWARF_RSI: "rsi", DWARF_RDI: "rdi", DWARF_RBP: "rbp", DWARF_RSP: "rsp",
    DWARF_R8: "r8", DWARF_R9: "r9", DWARF_R10: "r10", DWARF_R11: "r11",
    DWARF_R12: "r12", DWARF_R13: "r13", DWARF_R14: "r14", DWARF_R15: "r15",
    DWARF_RIP: "rip",
}
