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
    "process_vm_writev": 311,
    "rt_sigreturn": 15,
    "mprotect": 10,
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

# The same registers as members of the kernel's struct pt_regs
# (arch/x86/include/asm/ptrace.h), which a BPF program reads through
# bpf_task_pt_regs(): the user registers saved when the thread entered the
# kernel.  Offsets come from BTF.
UNWIND_PT_REGS = ("bx", "bp", "sp", "ip", "r12", "r13", "r14", "r15")

# CPython's perf trampoline (Python/asm_trampoline.S), the whole function:
#     sub $8, %rsp ; call *%rcx ; add $8, %rsp ; ret
# so at a return address inside it the caller's return address is at sp+8,
# the CFA is sp+16 and no other register changes.
PY_TRAMPOLINE_CODE = bytes.fromhex("4883ec08" "ffd1" "4883c408" "c3")
PY_TRAMPOLINE_RA_OFFSET = 8
PY_TRAMPOLINE_CFA_OFFSET = 16

# ---------------------------------------------------------------- ptrace
# struct user_regs_struct (arch/x86/include/asm/user_64.h, sys/user.h), the
# layout PTRACE_GETREGS and PTRACE_GETREGSET(NT_PRSTATUS) read and write:
#     struct user_regs_struct {
#         unsigned long r15, r14, r13, r12, rbp, rbx, r11, r10;
#         unsigned long r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax;
#         unsigned long rip, cs, eflags, rsp, ss, fs_base, gs_base;
#         unsigned long ds, es, fs, gs;
#     };
USER_REGS_FIELDS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10",
    "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax",
    "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base",
    "ds", "es", "fs", "gs",
)
REG_IP = "rip"
REG_SP = "rsp"
REG_RETVAL = "rax"
# System V psABI integer argument registers, in order.
REG_ARGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
# The system call number as the kernel saw it on entry; -1 outside a syscall.
REG_ORIG_SYSCALL = "orig_rax"
REG_FLAGS = "eflags"
# The psABI requires the direction flag clear on function entry.
FLAGS_DF = 0x400
# Bytes below the stack pointer a leaf function may use without moving it
# (psABI 3.2.2 "The Red Zone"): injected data goes below it.
STACK_RED_ZONE = 128
# rsp + 8 is a multiple of 16 on function entry (psABI 3.2.2).
STACK_ALIGN = 16
# Length of the `syscall` instruction (0f 05): the kernel backs rip up by
# this much to restart an interrupted system call.
SYSCALL_INSN_LEN = 2
SYSCALLS["restart_syscall"] = 219

# include/linux/errno.h: kernel-internal "restart me" results a thread shows
# in rax (negated) when it is stopped on its way out of an interrupted
# system call; the kernel turns them into a restart or -EINTR when the
# thread leaves the stop (arch/x86/kernel/signal.c).
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
SYSCALL_RESTART_ERRNOS = (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK)
# System calls that change a thread's restart block (struct restart_block,
# which restart_syscall runs to resume an ERESTART_RESTARTBLOCK call) even
# when they are not interrupted: nanosleep and clock_nanosleep set its fn to
# do_no_restart_syscall on entry (kernel/time/hrtimer.c, posix-timers.c),
# rt_sigreturn resets it, restart_syscall runs it.  Any call that returns
# -ERESTART_RESTARTBLOCK has also just written it.
RESTART_BLOCK_WRITERS = (35, 230, 15, 219)   # nanosleep, clock_nanosleep, rt_sigreturn, restart_syscall
# System calls in which a thread is *waiting* (for the GIL, a lock, time,
# I/O) rather than in the middle of work: a remote call made while it is
# stopped in one does not re-enter code that holds a lock or has data
# structures half updated (arch/x86/entry/syscalls/syscall_64.tbl).
BLOCKING_SYSCALLS = {
    "read": 0, "write": 1, "poll": 7, "pread64": 17, "readv": 19, "writev": 20,
    "select": 23, "pause": 34, "nanosleep": 35, "connect": 42, "accept": 43,
    "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47, "wait4": 61,
    "rt_sigtimedwait": 128, "rt_sigsuspend": 130, "futex": 202,
    "clock_nanosleep": 230, "epoll_wait": 232, "waitid": 247, "pselect6": 270,
    "ppoll": 271, "epoll_pwait": 281, "accept4": 288, "recvmmsg": 299,
    "epoll_pwait2": 441, "futex_waitv": 449,
    # Not waits, but stateless queries whose libc wrappers take no lock: a
    # thread that spins on time.thread_time() is stopped almost only on its
    # way out of these, so refusing them would never find a safe point.
    "gettimeofday": 96, "getrusage": 98, "times": 100, "clock_gettime": 228,
    "clock_getres": 229, "getpid": 39, "gettid": 186,
}
# futex(2) is a wait only for these operations (op & FUTEX_CMD_MASK): a
# FUTEX_WAKE is typically issued with a lock held (pthread_cond_signal under
# the GIL's mutex), so it is no place to call into the interpreter.
# include/uapi/linux/futex.h: FUTEX_WAIT 0, FUTEX_LOCK_PI 6,
# FUTEX_WAIT_BITSET 9, FUTEX_WAIT_REQUEUE_PI 11, FUTEX_LOCK_PI2 13.
FUTEX_WAIT_OPS = (0, 6, 9, 11, 13)
FUTEX_CMD_MASK = 0x7f
# The register holding a system call's second argument (futex's op).
REG_SYSCALL_ARG2 = "rsi"
# Register sets holding the FPU/SSE/AVX state, best first, with a buffer size
# big enough for each (include/uapi/linux/elf.h): NT_X86_XSTATE is the XSAVE
# area (a few KiB with AVX-512, AMX tile data makes it ~11 KiB),
# NT_PRFPREG the 512-byte FXSAVE area (struct user_fpregs_struct).
NT_X86_XSTATE = 0x202
NT_PRFPREG = 2
XSTATE_NOTES = ((NT_X86_XSTATE, 16384), (NT_PRFPREG, 512))
