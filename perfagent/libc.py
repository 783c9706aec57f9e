"""The C library, loaded once, and raw system calls by name.

Like python-ptrace's lowest layer: libc is opened once with
``use_errno=True`` so errno survives the call, argument types are declared,
and a failing call becomes ``OSError(errno, strerror)`` (or the matching
subclass such as PermissionError / ProcessLookupError, which ``OSError``
picks from the errno by itself).
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

from perfagent import arch

_libc: Optional[ctypes.CDLL] = None


def libc() -> ctypes.CDLL:
    """The process's C library, loaded on first use."""
    global _libc
    if _libc is None:
        try:
            # glibc's SONAME on every Linux architecture the agent runs on:
            # find_library would run ``ldconfig -p`` (a process) to say so.
            lib = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:  # another C library (musl): ask the system
            from ctypes.util import find_library
            lib = ctypes.CDLL(find_library("c") or "libc.so.6", use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.ioctl.restype = ctypes.c_int
        lib.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
        _libc = lib
    return _libc


def errno_error(what: str) -> OSError:
    """An OSError for the current errno, with the failing call in the message."""
    err = ctypes.get_errno()
    return OSError(err, "%s: %s" % (what, os.strerror(err)))


_syscall_numbers: dict = {}


def syscall_number(name: str) -> int:
    """This architecture's number for system call ``name`` (looked up once:
    every bpf() call asks, and finding the arch module each time cost a
    tenth of a millisecond per call -- 0.5 s of a drain cycle that wrote
    2,000 thread states)."""
    n = _syscall_numbers.get(name)
    if n is None:
        n = _syscall_numbers[name] = arch.current().SYSCALLS[name]
    return n


def ioctl(fd: int, request: int, arg: int = 0) -> int:
    """ioctl(2) with an integer argument; raises OSError on failure."""
    ret = libc().ioctl(fd, request, arg)
    if ret < 0:
        raise errno_error("ioctl")
    return ret


def pidfd_open(pid: int) -> int:
    """A pidfd for process ``pid`` (Linux 5.3+): poll() says POLLIN once the
    process has exited (a zombie counts), so a drain loop can sleep long and
    still hear of its target's end at once.  OSError when the kernel has no
    pidfd_open, or ``pid`` is not a running process's leader."""
    ret = libc().syscall(syscall_number("pidfd_open"), ctypes.c_int(pid), ctypes.c_uint(0))
    if ret < 0:
        raise errno_error("pidfd_open")
    return ret
