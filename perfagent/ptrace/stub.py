"""The return path of remote calls: a signal frame, two libc gadgets, a stub.

A remote call borrows a thread: its registers point at code of ours until
the agent puts them back.  If the agent dies in between (SIGKILL, OOM
killer) nobody puts them back, so every register set the agent ever gives
a thread must lead, *without the agent*, back to exactly where the thread
was.  The kernel already has that operation: ``rt_sigreturn`` reloads every
general-purpose register, the flags, the blocked-signal mask and the
FPU/vector state (XRSTOR) from a signal frame in user memory.  So before
the first change the agent writes a frame holding the thread's saved state
onto the thread's stack, below the red zone (where a signal handler's frame
would go: nothing the interrupted code owns lives there), and everything
it makes the thread run ends in ``rt_sigreturn`` on that frame:

* a *system call* (mmap, mprotect, munmap of the stub page) runs at a
  ``syscall; ret`` sequence found in the C library, with the stack pointer
  on the frame's first word, which holds the address of glibc's (or
  musl's) ``__restore_rt`` -- ``mov $15, %rax; syscall`` -- so the ``ret``
  after the system call goes straight into rt_sigreturn;
* a *function call* runs :data:`CODE`, a few dozen bytes of machine code
  in a page the agent maps in the target (mmap via the gadget above, then
  mprotect to read+execute), which calls the function(s) and then does
  ``rt_sigreturn`` on the frame itself (``rbx`` holds its address).

The frame's registers are the saved ones, adjusted the way the kernel
adjusts them when it restarts an interrupted system call on the way out of
a signal (arch/x86/kernel/signal.c, ``arch_do_signal_or_restart``):
``-ERESTARTSYS``/``-ERESTARTNOINTR``/``-ERESTARTNOHAND`` -> ``rax = orig_rax``,
``rip -= 2``.  ``-ERESTART_RESTARTBLOCK`` gets the same: the system call
is re-executed with its own arguments, not through ``restart_syscall``,
because ``rt_sigreturn`` resets the thread's restart block
(``do_no_restart_syscall``) and ``restart_syscall`` would then return
-EINTR to a program that had no signal at all.  A relative sleep, poll or
futex wait so restarted waits its whole timeout again (longer, as the
kernel itself restarts ``epoll_wait``), never shorter, and an absolute
one ends when it was due.  A thread already inside ``restart_syscall``
keeps it: its original call is no longer known.  (That path restarts
even where the kernel, delivering a signal with a handler, would have
returned -EINTR; it is only taken when the agent is gone.  While the agent lives it catches the thread at the
stub's ``rt_sigreturn`` -- a syscall-enter-stop at a known address under
PTRACE_SYSCALL -- skips it, and restores through ptrace, which the kernel
then handles exactly: see perfagent.ptrace.call.)

Layout of the frame, ``struct rt_sigframe`` (arch/x86/include/asm/sigframe.h)
as ``rt_sigreturn`` reads it at ``rsp - 8``::

    struct rt_sigframe {
        char __user *pretcode;        /* 0: the gadget's return address */
        struct ucontext uc;           /* 8 */
        struct siginfo info;          /* 312: not read by rt_sigreturn */
        /* fp state follows, 64-byte aligned, pointed to by uc.uc_mcontext.fpstate */
    };
    struct ucontext {                 /* include/uapi/asm-generic/ucontext.h */
        unsigned long     uc_flags;   /* UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS */
        struct ucontext  *uc_link;
        stack_t           uc_stack;   /* { void *ss_sp; int ss_flags; size_t ss_size; } */
        struct sigcontext uc_mcontext;
        sigset_t          uc_sigmask; /* the mask rt_sigreturn installs */
    };
    struct sigcontext_64 {            /* arch/x86/include/uapi/asm/sigcontext.h */
        __u64 r8, r9, r10, r11, r12, r13, r14, r15;
        __u64 rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip;
        __u64 eflags;
        __u16 cs, gs, fs, ss;
        __u64 err, trapno, oldmask, cr2;
        __u64 fpstate;                /* the XSAVE image below */
        __u64 reserved1[8];
    };

``uc_stack`` is left zero: rt_sigreturn hands it to sigaltstack(), which
refuses a zero size (-ENOMEM, ignored by rt_sigreturn), so the thread's
alternate signal stack stays as it is.  The FP state is the XSAVE image
PTRACE_GETREGSET(NT_X86_XSTATE) returned (standard format), with its
``sw_reserved`` bytes (offset 464; ptrace puts XCR0 there) replaced by the
``struct _fpx_sw_bytes`` a signal frame carries (magic1
FP_XSTATE_MAGIC1, extended_size, xfeatures, xstate_size) and
FP_XSTATE_MAGIC2 after ``xstate_size`` bytes (see :func:`fp_image`); the
kernel restores it with XRSTOR.  Without magic1 (an FXSAVE-only machine) the kernel restores the
512-byte legacy area.

Limits: a thread using an x86 user shadow stack (CET, opt-in in glibc 2.39)
would fault on the gadget's unbalanced ``ret``; such targets are refused
(``unsupported_arch``).  Only x86-64 has this module's code and frame.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

from perfagent import arch
from perfagent.errors import CaptureError

_MASK64 = (1 << 64) - 1

# ------------------------------------------------------------- the frame

#: sizeof(struct rt_sigframe) before the FP state: pretcode + ucontext + siginfo.
RT_SIGFRAME_PRETCODE = 0
RT_SIGFRAME_UC = 8
UCONTEXT_SIZE = 304
SIGINFO_SIZE = 128
RT_SIGFRAME_SIZE = RT_SIGFRAME_UC + UCONTEXT_SIZE + SIGINFO_SIZE

# struct ucontext header: uc_flags, uc_link, uc_stack (ss_sp, ss_flags + pad, ss_size).
_UC_HEAD = struct.Struct("<QQQQQ")
# struct sigcontext_64: 18 u64 (r8..rip, eflags), 4 u16 (cs, gs, fs, ss),
# 4 u64 (err, trapno, oldmask, cr2), u64 fpstate, 8 u64 reserved1.
_SIGCONTEXT = struct.Struct("<18Q4H4QQ8Q")
_SIGMASK = struct.Struct("<Q")
SIGCONTEXT_REGS = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                   "rdi", "rsi", "rbp", "rbx", "rdx", "rax", "rcx", "rsp", "rip", "eflags")
assert _UC_HEAD.size + _SIGCONTEXT.size + _SIGMASK.size == UCONTEXT_SIZE

# arch/x86/include/uapi/asm/ucontext.h
UC_FP_XSTATE = 0x1
UC_SIGCONTEXT_SS = 0x2
UC_STRICT_RESTORE_SS = 0x4

# arch/x86/include/uapi/asm/sigcontext.h: struct _fpx_sw_bytes at offset 464
# of the FXSAVE area: { __u32 magic1; __u32 extended_size; __u64 xfeatures;
# __u32 xstate_size; __u32 padding[7]; }.
FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
FP_XSTATE_MAGIC2_SIZE = 4
FPX_SW_BYTES_OFFSET = 464
_FPX_SW_BYTES = struct.Struct("<IIQI")
FXSAVE_SIZE = 512
#: XRSTOR (and the kernel's copy of the FP state) need 64-byte alignment.
FPSTATE_ALIGN = 64


#: PTRACE_GETREGSET(NT_X86_XSTATE) puts the user XCR0 in the first word
#: of sw_reserved (arch/x86/include/asm/user.h, USER_XSTATE_XCR0_WORD),
#: where a signal frame has struct _fpx_sw_bytes instead.
PTRACE_XCR0_OFFSET = FPX_SW_BYTES_OFFSET
XSTATE_HEADER_OFFSET = 512
XSTATE_HEADER_SIZE = 64
NT_X86_XSTATE = 0x202
#: AMX tile data (XSAVE component 18): enabled per process on request
#: (arch_prctl ARCH_REQ_XCOMP_PERM), the last 8 KiB of the largest layout.
XFEATURE_XTILEDATA = 18
XTILEDATA_SIZE = 8192


def fp_image(xstate: Optional[Tuple[int, bytes]]) -> Tuple[bytes, bool]:
    """The FP state as a signal frame carries it, and whether it is XSAVE.

    ``xstate`` is what TracedThread.get_xstate returned.  For an XSAVE
    image the software-reserved bytes become the frame's ``_fpx_sw_bytes``
    (magic1, extended_size, xfeatures = the XCR0 ptrace reported,
    xstate_size) and FP_XSTATE_MAGIC2 follows the image.  ptrace returns
    the largest layout; a thread that has not asked for AMX has a smaller
    one, which the kernel insists on (a larger xstate_size makes it fall
    back to the legacy area only): then the unused tile data at the end is
    left out.
    """
    if xstate is None:
        raise CaptureError("no FPU state from ptrace: cannot build a signal frame")
    note, data = xstate
    if note == NT_X86_XSTATE and len(data) >= XSTATE_HEADER_OFFSET + XSTATE_HEADER_SIZE:
        xcr0 = struct.unpack_from("<Q", data, PTRACE_XCR0_OFFSET)[0]
        xstate_bv = struct.unpack_from("<Q", data, XSTATE_HEADER_OFFSET)[0]
        size = len(data)
        tiles = 1 << XFEATURE_XTILEDATA
        if xcr0 & tiles and not xstate_bv & tiles \
                and size - XTILEDATA_SIZE >= XSTATE_HEADER_OFFSET + XSTATE_HEADER_SIZE:
            size -= XTILEDATA_SIZE
            xcr0 &= ~tiles
        image = bytearray(data[:size])
        image[FPX_SW_BYTES_OFFSET:FXSAVE_SIZE] = bytes(FXSAVE_SIZE - FPX_SW_BYTES_OFFSET)
        _FPX_SW_BYTES.pack_into(image, FPX_SW_BYTES_OFFSET, FP_XSTATE_MAGIC1,
                                size + FP_XSTATE_MAGIC2_SIZE, xcr0, size)
        return bytes(image) + struct.pack("<I", FP_XSTATE_MAGIC2), True
    if len(data) < FXSAVE_SIZE:
        raise CaptureError("FPU state of %d bytes is shorter than an FXSAVE area" % len(data))
    # FXSAVE only: no magic1, so the kernel restores the legacy 512 bytes.
    image = bytearray(data[:FXSAVE_SIZE])
    image[FPX_SW_BYTES_OFFSET:FXSAVE_SIZE] = bytes(FXSAVE_SIZE - FPX_SW_BYTES_OFFSET)
    return bytes(image), False


def resume_registers(regs) -> Dict[str, int]:
    """The registers the thread must resume with if it returns alone.

    As the kernel would set them when leaving the stop without a signal
    handler to run: an interrupted restartable system call is re-executed,
    an ERESTART_RESTARTBLOCK one too (see the module docstring: the
    rt_sigreturn that restores these registers resets the restart block).
    """
    a = arch.current()
    values = {name: getattr(regs, name) for name in SIGCONTEXT_REGS}
    nr = regs.orig_rax
    nr = nr - (1 << 64) if nr >= 1 << 63 else nr
    ret = regs.rax
    ret = ret - (1 << 64) if ret >= 1 << 63 else ret
    if nr >= 0:
        if -ret in a.SYSCALL_RESTART_ERRNOS:
            values["rax"] = nr
            values["rip"] = (regs.rip - a.SYSCALL_INSN_LEN) & _MASK64
    return values


class Frame:
    """A signal frame holding a thread's saved state, and where it goes.

    ``top`` is the highest address the frame may use (the bottom of the red
    zone); ``address`` is the frame's start (the pretcode word), ``uc`` the
    ucontext (what rsp must be for rt_sigreturn), ``low`` the lowest byte
    written, ``stack`` the 16-byte aligned stack pointer for code run below
    it.
    """

    #: Room left between the frame and the stack of the code run below it.
    GAP = 64

    def __init__(self, regs, xstate, sigmask: int, top: int, restorer: int) -> None:
        image, xsave = fp_image(xstate)
        self.fpstate = (top - len(image)) & ~(FPSTATE_ALIGN - 1)
        self.address = (self.fpstate - RT_SIGFRAME_SIZE) & ~15
        self.uc = self.address + RT_SIGFRAME_UC
        self.low = self.address
        self.stack = (self.address - self.GAP) & ~15
        values = resume_registers(regs)
        flags = UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS | (UC_FP_XSTATE if xsave else 0)
        head = _UC_HEAD.pack(flags, 0, 0, 0, 0)
        sc = _SIGCONTEXT.pack(*[values[n] & _MASK64 for n in SIGCONTEXT_REGS],
                              regs.cs & 0xffff, 0, 0, regs.ss & 0xffff,
                              0, 0, 0, 0, self.fpstate, *([0] * 8))
        body = (struct.pack("<Q", restorer) + head + sc + _SIGMASK.pack(sigmask & _MASK64)
                + bytes(SIGINFO_SIZE))
        pad = bytes(self.fpstate - self.address - len(body))
        self.data = body + pad + image
        assert self.address + len(self.data) <= top
        self.resume = values


# ------------------------------------------------------------ the gadgets

#: ``__restore_rt`` of glibc and musl: ``mov $15, %rax; syscall`` (the
#: x86-64 rt_sigreturn number), and the same with a 32-bit immediate.
RESTORE_RT_PATTERNS = (bytes.fromhex("48c7c00f000000" "0f05"), bytes.fromhex("b80f000000" "0f05"))
#: ``syscall; ret``: the tail of many glibc system-call wrappers.
SYSCALL_RET = bytes.fromhex("0f05" "c3")


def find_gadgets(text: bytes) -> Tuple[Optional[int], Optional[int]]:
    """Offsets of ``syscall; ret`` and of a ``__restore_rt`` in ``text``."""
    restorer = None
    for pat in RESTORE_RT_PATTERNS:
        i = text.find(pat)
        if i >= 0:
            restorer = i
            break
    syscall_ret = text.find(SYSCALL_RET)
    return (syscall_ret if syscall_ret >= 0 else None), restorer


# ---------------------------------------------------------------- the code

# Register use of the stub (all callee-saved, so they survive the calls):
#   rbx  address of the frame's ucontext (rsp for rt_sigreturn)
#   r12  the function to call (entry CALL) / PyGILState_Ensure (entry STATEMENT)
#   r13  PyRun_SimpleString        r14  PyGILState_Release
#   r15  the slot: u32 phase, u32 cancel, s64 rc, u64 func, char text[]
# rsp is 16-byte aligned at either entry, so every callee sees rsp+8
# aligned as the psABI requires.

SLOT_PHASE = 0
SLOT_CANCEL = 4
SLOT_RC = 8
SLOT_FUNC = 16
SLOT_TEXT = 24
SLOT_SIZE = 256
SLOT_TEXT_MAX = SLOT_SIZE - SLOT_TEXT - 1

#: Phases a slot goes through (written by the stub, read by the agent).
PHASE_QUEUED = 0        # set by the agent before the call
PHASE_GIL = 1           # PyGILState_Ensure returned
PHASE_RUNNING = 2       # PyRun_SimpleString started
PHASE_RELEASING = 3     # PyGILState_Release called
PHASE_CALL_DONE = 4     # the call is over (entries STATEMENT and CALL)
PHASE_PENDING_DONE = 5  # the pending call ran and will not touch the page again


def _assemble(parts: List) -> Tuple[bytes, Dict[str, int]]:
    """Concatenate instruction bytes; ``("label", name)`` marks a position
    and ``("jmp8", opcode, name)`` is a short jump to a label."""
    labels: Dict[str, int] = {}
    size = 0
    for p in parts:
        if isinstance(p, bytes):
            size += len(p)
        elif p[0] == "label":
            labels[p[1]] = size
        else:
            size += 2
    out = bytearray()
    for p in parts:
        if isinstance(p, bytes):
            out += p
        elif p[0] == "jmp8":
            rel = labels[p[2]] - (len(out) + 2)
            assert -128 <= rel < 128
            out += bytes((p[1], rel & 0xff))
    return bytes(out), labels


def _movl_r15(value: int) -> bytes:
    return bytes.fromhex("41c707") + struct.pack("<I", value)      # movl $value, (%r15)


def _movl_rbx(value: int) -> bytes:
    return bytes.fromhex("c703") + struct.pack("<I", value)        # movl $value, (%rbx)


CODE, LABELS = _assemble([
    # STATEMENT: state = PyGILState_Ensure(); unless cancelled,
    # rc = PyRun_SimpleString(text); PyGILState_Release(state).
    ("label", "statement"),
    bytes.fromhex("41ffd4"),                  # call   *%r12
    bytes.fromhex("89c5"),                    # mov    %eax, %ebp
    _movl_r15(PHASE_GIL),
    bytes.fromhex("41837f0400"),              # cmpl   $0, 4(%r15)
    ("jmp8", 0x75, "release"),                # jne    release
    _movl_r15(PHASE_RUNNING),
    bytes.fromhex("498d7f18"),                # lea    24(%r15), %rdi
    bytes.fromhex("41ffd5"),                  # call   *%r13
    bytes.fromhex("4863c0"),                  # movslq %eax, %rax
    bytes.fromhex("49894708"),                # mov    %rax, 8(%r15)
    ("label", "release"),
    _movl_r15(PHASE_RELEASING),
    bytes.fromhex("89ef"),                    # mov    %ebp, %edi
    bytes.fromhex("41ffd6"),                  # call   *%r14
    _movl_r15(PHASE_CALL_DONE),
    ("label", "sigreturn"),
    bytes.fromhex("4889dc"),                  # mov    %rbx, %rsp
    bytes.fromhex("b80f000000"),              # mov    $15, %eax
    bytes.fromhex("0f05"),                    # syscall (rt_sigreturn)
    ("label", "after_sigreturn"),
    ("jmp8", 0xeb, "sigreturn"),              # jmp    sigreturn (if the agent skipped it, then died)
    # CALL: rc = r12(rdi, rsi, rdx, rcx, r8, r9).
    ("label", "call"),
    bytes.fromhex("41ffd4"),                  # call   *%r12
    bytes.fromhex("49894708"),                # mov    %rax, 8(%r15)
    _movl_r15(PHASE_CALL_DONE),
    ("jmp8", 0xeb, "sigreturn"),              # jmp    sigreturn
    # PENDING: int pending(void *slot), run by CPython's eval breaker
    # (Py_AddPendingCall) in the main thread, holding the GIL.
    ("label", "pending"),
    bytes.fromhex("53"),                      # push   %rbx
    bytes.fromhex("4889fb"),                  # mov    %rdi, %rbx
    _movl_rbx(PHASE_RUNNING),
    bytes.fromhex("837b0400"),                # cmpl   $0, 4(%rbx)
    ("jmp8", 0x75, "skip"),                   # jne    skip
    bytes.fromhex("488d7b18"),                # lea    24(%rbx), %rdi
    bytes.fromhex("ff5310"),                  # call   *16(%rbx)
    bytes.fromhex("4863c0"),                  # movslq %eax, %rax
    bytes.fromhex("48894308"),                # mov    %rax, 8(%rbx)
    ("label", "skip"),
    _movl_rbx(PHASE_PENDING_DONE),
    bytes.fromhex("31c0"),                    # xor    %eax, %eax
    bytes.fromhex("5b"),                      # pop    %rbx
    bytes.fromhex("c3"),                      # ret
])

#: Where the thread stops for the agent: the instruction after the
#: ``syscall`` of the stub's rt_sigreturn (the rip of its syscall-enter-stop).
MARKER_OFFSET = LABELS["after_sigreturn"]

#: The stub's mapping: one page of code (read+execute), one of slots (read+write).
PAGE_SIZE = 4096
CODE_PAGES = 1
DATA_PAGES = 1
MAPPING_SIZE = (CODE_PAGES + DATA_PAGES) * PAGE_SIZE
SLOTS = DATA_PAGES * PAGE_SIZE // SLOT_SIZE

# include/uapi/asm-generic/mman-common.h, mman.h
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20


def slot_bytes(text: bytes, func: int = 0) -> bytes:
    """A fresh slot: phase 0, not cancelled, rc -1, ``func``, the NUL-terminated text."""
    if len(text) > SLOT_TEXT_MAX:
        raise ValueError("statement of %d bytes is longer than %d" % (len(text), SLOT_TEXT_MAX))
    return struct.pack("<IIqQ", PHASE_QUEUED, 0, -1, func) + text + b"\0"


_SLOT_HEAD = struct.Struct("<IIq")


def parse_slot(data: bytes) -> Tuple[int, int, int]:
    """(phase, cancel, rc) of a slot's first 16 bytes."""
    return _SLOT_HEAD.unpack_from(data, 0)
