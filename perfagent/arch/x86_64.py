"""x86-64 facts: system call numbers, perf and DWARF register numbering.

Sources: arch/x86/entry/syscalls/syscall_64.tbl,
arch/x86/include/uapi/asm/perf_regs.h, and the System V x86-64 psABI
(DWARF register number mapping, figure 3.36).
"""

NAME = "x86_64"

# arch/x86/entry/syscalls/syscall_64.tbl
SYSCALLS = {
    "mmap": 9,
    "munmap": 11,
    "ioctl": 16,
    "ptrace": 101,
    "gettid": 186,
    "tgkill": 234,
    "perf_event_open": 298,
    "process_vm_readv": 310,
    "bpf": 321,
    "pidfd_open": 434,
}

# enum perf_event_x86_regs (asm/perf_regs.h): bit positions in
# perf_event_attr.sample_regs_user and the order of values in a sample.
PERF_REG_X86_AX = 0
PERF_REG_X86_BX = 1
PERF_REG_X86_CX = 2
PERF_REG_X86_DX = 3
PERF_REG_X86_SI = 4
PERF_REG_X86_DI = 5
PERF_REG_X86_BP = 6
PERF_REG_X86_SP = 7
PERF_REG_X86_IP = 8
PERF_REG_X86_FLAGS = 9
PERF_REG_X86_CS = 10
PERF_REG_X86_SS = 11
PERF_REG_X86_R8 = 16
PERF_REG_X86_R9 = 17
PERF_REG_X86_R10 = 18
PERF_REG_X86_R11 = 19
PERF_REG_X86_R12 = 20
PERF_REG_X86_R13 = 21
PERF_REG_X86_R14 = 22
PERF_REG_X86_R15 = 23

# psABI DWARF register numbers.
DWARF_RAX, DWARF_RDX, DWARF_RCX, DWARF_RBX = 0, 1, 2, 3
DWARF_RSI, DWARF_RDI, DWARF_RBP, DWARF_RSP = 4, 5, 6, 7
DWARF_R8, DWARF_R15 = 8, 15
DWARF_RA = 16  # the return address column

# Loads are not reordered with other loads on x86 (TSO), so reading the perf
# ring buffer's data_head and then the data needs no explicit barrier.
RING_LOADS_ORDERED = True

# The user registers a DWARF unwind needs, as sampled with
# PERF_SAMPLE_REGS_USER: the kernel writes them in increasing bit order, so a
# sample's register tuple is (bx, bp, sp, ip, r12, r13, r14, r15).
UNWIND_PERF_REGS = (PERF_REG_X86_BX, PERF_REG_X86_BP, PERF_REG_X86_SP, PERF_REG_X86_IP,
                    PERF_REG_X86_R12, PERF_REG_X86_R13, PERF_REG_X86_R14, PERF_REG_X86_R15)
UNWIND_REGS_MASK = sum(1 << r for r in UNWIND_PERF_REGS)
# DWARF register number of each value in that tuple (ip is the RA column).
UNWIND_DWARF_ORDER = (DWARF_RBX, DWARF_RBP, DWARF_RSP, DWARF_RA, 12, 13, 14, DWARF_R15)

# CPython's perf trampoline (Python/asm_trampoline.S), the whole function:
#     sub $8, %rsp ; call *%rcx ; add $8, %rsp ; ret
# so at a return address inside it the caller's return address is at sp+8,
# the CFA is sp+16 and no other register changes.
PY_TRAMPOLINE_CODE = bytes.fromhex("4883ec08" "ffd1" "4883c408" "c3")
PY_TRAMPOLINE_RA_OFFSET = 8
PY_TRAMPOLINE_CFA_OFFSET = 16
