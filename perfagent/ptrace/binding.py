"""Raw ptrace(2) and waitpid(2) through ctypes, plus wait-status decoding.

The lowest layer, in the spirit of python-ptrace's ``binding``: the C calls
with their argument types declared, constants named as <sys/ptrace.h> and
<linux/ptrace.h> spell them, and a failing call turned into ``OSError``
(``ProcessLookupError`` for ESRCH, ``PermissionError`` for EPERM, which
``OSError`` selects from the errno by itself).  Nothing here knows about
threads or registers; :mod:`perfagent.ptrace.thread` builds on it.
"""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Tuple

from perfagent.libc import errno_error, libc

# enum __ptrace_request (<sys/ptrace.h>, include/uapi/linux/ptrace.h).
PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_GETSIGINFO = 0x4202
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
# Linux 3.11+: the tracee's blocked-signal mask (addr = sizeof(sigset_t)).
PTRACE_GETSIGMASK = 0x420a
PTRACE_SETSIGMASK = 0x420b

#: The kernel's sigset_t is one 64-bit word (_NSIG 64 on x86-64 and aarch64).
SIGSET_SIZE = 8

# PTRACE_SETOPTIONS / PTRACE_SEIZE option bits.
PTRACE_O_TRACESYSGOOD = 0x01

# Event numbers found in bits 16..23 of a wait status.
PTRACE_EVENT_STOP = 128

# include/uapi/linux/elf.h: the general-purpose register set for GETREGSET.
NT_PRSTATUS = 1

# <sys/wait.h> / include/uapi/linux/wait.h.
WNOHANG = 1
__WALL = 0x40000000
# The same, under a name usable inside a class body (no name mangling).
WALL = __WALL

# Signals whose PTRACE_EVENT_STOP is a group-stop (ptrace(2), "Group-stop").
STOP_SIGNALS = frozenset((signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU))


class iovec(ctypes.Structure):
    """struct iovec { void *iov_base; size_t iov_len; };"""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class siginfo_t(ctypes.Structure):
    """The head of siginfo_t (include/uapi/asm-generic/siginfo.h)::

        int si_signo; int si_errno; int si_code;
        union { ... void *si_addr (SIGSEGV/SIGBUS) ...; } _sifields;

    The union starts at offset 16 on 64-bit (after 4 bytes of padding); the
    whole structure is 128 bytes.
    """

    _fields_ = [("si_signo", ctypes.c_int), ("si_errno", ctypes.c_int), ("si_code", ctypes.c_int),
                ("_pad0", ctypes.c_int), ("si_addr", ctypes.c_void_p),
                ("_rest", ctypes.c_char * (128 - 24))]


_declared = False


def _lib() -> ctypes.CDLL:
    global _declared
    lib = libc()
    if not _declared:
        # long ptrace(enum __ptrace_request request, pid_t pid, void *addr, void *data);
        lib.ptrace.restype = ctypes.c_long
        lib.ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        # pid_t waitpid(pid_t pid, int *wstatus, int options);
        lib.waitpid.restype = ctypes.c_int
        lib.waitpid.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int)
        _declared = True
    return lib


def ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    """ptrace(2) for requests whose result is 0 or -1 (not the PEEK family).

    Raises OSError with the request in the message on failure.
    """
    ctypes.set_errno(0)
    ret = _lib().ptrace(request, pid, addr or None, data or None)
    if ret == -1:
        raise errno_error("ptrace(%s, %d)" % (_REQUEST_NAMES.get(request, request), pid))
    return ret


def waitpid(pid: int, options: int) -> Tuple[int, int]:
    """waitpid(2): (pid, status); (0, 0) when WNOHANG found nothing.

    EINTR is retried (the agent may have signal handlers of its own).
    """
    status = ctypes.c_int(0)
    while True:
        ret = _lib().waitpid(pid, ctypes.byref(status), options)
        if ret >= 0:
            return ret, status.value
        if ctypes.get_errno() != 4:  # EINTR
            raise errno_error("waitpid(%d)" % pid)


def getsiginfo(pid: int) -> siginfo_t:
    """PTRACE_GETSIGINFO: what caused the current signal-delivery-stop."""
    info = siginfo_t()
    ptrace(PTRACE_GETSIGINFO, pid, 0, ctypes.addressof(info))
    return info


def getsigmask(pid: int) -> int:
    """PTRACE_GETSIGMASK: the tracee's blocked signals (bit N-1 for signal N)."""
    mask = ctypes.c_uint64(0)
    ptrace(PTRACE_GETSIGMASK, pid, SIGSET_SIZE, ctypes.addressof(mask))
    return mask.value


def setsigmask(pid: int, mask: int) -> None:
    """PTRACE_SETSIGMASK (the kernel drops SIGKILL and SIGSTOP from it)."""
    value = ctypes.c_uint64(mask & ((1 << 64) - 1))
    ptrace(PTRACE_SETSIGMASK, pid, SIGSET_SIZE, ctypes.addressof(value))


_REQUEST_NAMES = {
    PTRACE_CONT: "PTRACE_CONT", PTRACE_DETACH: "PTRACE_DETACH", PTRACE_SYSCALL: "PTRACE_SYSCALL",
    PTRACE_GETSIGINFO: "PTRACE_GETSIGINFO", PTRACE_GETREGSET: "PTRACE_GETREGSET",
    PTRACE_SETREGSET: "PTRACE_SETREGSET", PTRACE_SEIZE: "PTRACE_SEIZE",
    PTRACE_INTERRUPT: "PTRACE_INTERRUPT", PTRACE_LISTEN: "PTRACE_LISTEN",
    PTRACE_GETSIGMASK: "PTRACE_GETSIGMASK", PTRACE_SETSIGMASK: "PTRACE_SETSIGMASK",
}


class WaitStatus:
    """A decoded wait status (the WIFSTOPPED/WSTOPSIG/... macros).

    ``event`` is the PTRACE_EVENT_* number from bits 16..23 (0 for none):
    with PTRACE_SEIZE, a stop caused by PTRACE_INTERRUPT or a group-stop
    reports PTRACE_EVENT_STOP, while a signal-delivery-stop reports 0.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: int) -> None:
        self.raw = raw

    @property
    def exited(self) -> bool:
        return os.WIFEXITED(self.raw) or os.WIFSIGNALED(self.raw)

    @property
    def stopped(self) -> bool:
        return os.WIFSTOPPED(self.raw)

    @property
    def stopsig(self) -> int:
        return os.WSTOPSIG(self.raw) if self.stopped else 0

    @property
    def event(self) -> int:
        return (self.raw >> 16) & 0xff if self.stopped else 0

    @property
    def is_event_stop(self) -> bool:
        """A PTRACE_EVENT_STOP: interrupt trap or group-stop."""
        return self.event == PTRACE_EVENT_STOP

    @property
    def is_group_stop(self) -> bool:
        return self.is_event_stop and self.stopsig in STOP_SIGNALS

    @property
    def is_syscall_stop(self) -> bool:
        """A syscall-enter- or -exit-stop (PTRACE_O_TRACESYSGOOD sets bit 7)."""
        return self.stopped and self.event == 0 and self.stopsig == (signal.SIGTRAP | 0x80)

    @property
    def is_signal_delivery(self) -> bool:
        """A signal about to be delivered; the tracer decides whether it is."""
        return self.stopped and self.event == 0 and self.stopsig != (signal.SIGTRAP | 0x80)

    def __repr__(self) -> str:
        if os.WIFEXITED(self.raw):
            return "<exited %d>" % os.WEXITSTATUS(self.raw)
        if os.WIFSIGNALED(self.raw):
            return "<killed by signal %d>" % os.WTERMSIG(self.raw)
        if self.stopped:
            return "<stopped sig=%d event=%d>" % (self.stopsig, self.event)
        return "<status %#x>" % self.raw


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)

