"""aarch64 facts: system call numbers, perf and DWARF register numbering.

Sources: include/uapi/asm-generic/unistd.h (aarch64 uses the generic
table), arch/arm64/include/uapi/asm/perf_regs.h, and the DWARF for the Arm
64-bit architecture ABI (AADWARF64).
"""

NAME = "aarch64"

# include/uapi/asm-generic/unistd.h
SYSCALLS = {
    "mmap": 222,
    "munmap": 215,
    "ioctl": 29,
    "ptrace": 117,
    "gettid": 178,
    "tgkill": 131,
    "perf_event_open": 241,
    "process_vm_readv": 270,
    "process_vm_writev": 271,
    "rt_sigreturn": 139,
    "mprotect": 226,
    "bpf": 280,
    "pidfd_open": 434,
}

# enum perf_event_arm_regs: x0..x30 are 0..30, then sp and pc.
PERF_REG_ARM64_X29 = 29  # frame pointer
PERF_REG_ARM64_LR = 30
PERF_REG_ARM64_SP = 31
PERF_REG_ARM64_PC = 32

# AADWARF64: x0..x30 are 0..30, sp is 31.
DWARF_X29 = 29
DWARF_X30 = 30
DWARF_SP = 31

# The weakly ordered memory model lets loads pass loads: a reader of the perf
# ring buffer needs a barrier between data_head and the data (the interpreter's
# own locking between the two reads provides one in practice).
RING_LOADS_ORDERED = False

# The DWARF unwinder walks x86-64 register sets only for now.
UNWIND_REGS_MASK = None

# ---------------------------------------------------------------- ptrace
# Remote function calls (perfagent.python.inject) are x86-64 only for now;
# these placeholders name what an aarch64 port has to fill in
# (struct user_pt_regs: x0..x30, sp, pc, pstate; no red zone; svc is 4 bytes;
# the syscall number lives in x8 and is changed with NT_ARM_SYSTEM_CALL).
USER_REGS_FIELDS = None
REG_IP = "pc"
REG_SP = "sp"
REG_RETVAL = "x0"
REG_ARGS = ("x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7")
REG_ORIG_SYSCALL = None
REG_FLAGS = "pstate"
FLAGS_DF = 0
STACK_RED_ZONE = 0
STACK_ALIGN = 16
SYSCALL_INSN_LEN = 4
SYSCALLS["restart_syscall"] = 128
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
SYSCALL_RESTART_ERRNOS = (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK)
RESTART_BLOCK_WRITERS = (101, 115, 139, 128)  # nanosleep, clock_nanosleep, rt_sigreturn, restart_syscall
# Placeholders until remote calls are ported (see the x86-64 module).
BLOCKING_SYSCALLS = {"futex": 98, "read": 63, "write": 64, "ppoll": 73, "pselect6": 72,
                     "clock_nanosleep": 115, "epoll_pwait": 22, "wait4": 260}
FUTEX_WAIT_OPS = (0, 6, 9, 11, 13)
FUTEX_CMD_MASK = 0x7f
REG_SYSCALL_ARG2 = "x1"
# NT_PRFPREG: struct user_fpsimd_state (v0..v31, fpsr, fpcr).
NT_PRFPREG = 2
XSTATE_NOTES = ((NT_PRFPREG, 528),)
