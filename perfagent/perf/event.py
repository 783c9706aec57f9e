"""perf_event_open(2) and the event ioctls, through ctypes.

The raw layer: one function per kernel entry point, errno turned into
OSError subclasses.  ``explain_open_error`` turns those into the one-line
messages the CLI prints (which capability or sysctl fixes it).
"""

from __future__ import annotations

import ctypes
import errno
import os

from perfagent import libc as _libc

# include/uapi/linux/perf_event.h: _IO('$', n) and _IOW('$', n, ...)
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_REFRESH = 0x2402
PERF_EVENT_IOC_RESET = 0x2403
PERF_EVENT_IOC_SET_OUTPUT = 0x2405
PERF_EVENT_IOC_ID = 0x80082407
PERF_EVENT_IOC_SET_BPF = 0x40042408

PERF_FLAG_FD_NO_GROUP = 1 << 0
PERF_FLAG_FD_OUTPUT = 1 << 1
PERF_FLAG_PID_CGROUP = 1 << 2
PERF_FLAG_FD_CLOEXEC = 1 << 3

_PARANOID_PATH = "/proc/sys/kernel/perf_event_paranoid"


def perf_event_open(attr: bytes, pid: int, cpu: int, group_fd: int = -1,
                    flags: int = PERF_FLAG_FD_CLOEXEC) -> int:
    """Open one event; returns its fd or raises OSError with the kernel's errno."""
    lib = _libc.libc()
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = lib.syscall(
        ctypes.c_long(_libc.syscall_number("perf_event_open")),
        buf, ctypes.c_int(pid), ctypes.c_int(cpu), ctypes.c_int(group_fd),
        ctypes.c_ulong(flags),
    )
    if fd < 0:
        raise _libc.errno_error("perf_event_open")
    return fd


def enable(fd: int) -> None:
    _libc.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)


def disable(fd: int) -> None:
    _libc.ioctl(fd, PERF_EVENT_IOC_DISABLE, 0)


def set_output(fd: int, target_fd: int) -> None:
    """Send ``fd``'s records into ``target_fd``'s ring buffer (same CPU only)."""
    _libc.ioctl(fd, PERF_EVENT_IOC_SET_OUTPUT, target_fd)


def paranoid_level() -> int:
    try:
        with open(_PARANOID_PATH) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 2


def explain_open_error(exc: OSError, what: str) -> str:
    """One line naming why perf_event_open failed for ``what`` and the fix."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            "perf_event_open refused for %s (%s): run as root or grant CAP_PERFMON "
            "(CAP_SYS_ADMIN before Linux 5.8), or lower kernel.perf_event_paranoid "
            "(now %d; -a needs <= 0, --pid of another user's process needs CAP_PERFMON "
            "or <= 1)" % (what, os.strerror(exc.errno), paranoid_level())
        )
    if exc.errno == errno.ESRCH:
        return "perf_event_open failed for %s: the process no longer exists" % what
    if exc.errno == errno.EMFILE:
        return ("perf_event_open failed for %s: too many open files; raise the "
                "limit with 'ulimit -n'" % what)
    if exc.errno in (errno.ENOENT, errno.EOPNOTSUPP):
        return "perf_event_open failed for %s: the event is not supported by this kernel or machine" % what
    if exc.errno == errno.ENODEV:
        return "perf_event_open failed for %s: no such CPU or the event is not supported on it" % what
    return "perf_event_open failed for %s: %s" % (what, os.strerror(exc.errno or 0))
