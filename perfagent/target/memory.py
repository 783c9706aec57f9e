"""Reading (and, for the injection, writing) a target's memory: process_vm_readv(2).

One system call copies from the target's address space into ours; the
target is not stopped, traced or written (it needs the same ptrace access
check as /proc/PID/mem, PTRACE_MODE_ATTACH_REALCREDS, which root passes).
A read that meets an unmapped page returns what was copied before it: the
caller gets a short result, never an exception for a bad address, because
addresses here come from the target's own (possibly changing, possibly
hostile) data structures.

    ssize_t process_vm_readv(pid_t pid,
                             const struct iovec *local_iov, unsigned long liovcnt,
                             const struct iovec *remote_iov, unsigned long riovcnt,
                             unsigned long flags);

Kernels without the call (ENOSYS: before 3.2, or seccomp'd) fall back to
pread on /proc/PID/mem, which has the same semantics for our purposes.

:func:`write` is the one way the agent changes a target's memory (the
Python injection's call stub, its statement text, a stack frame it
borrows, PEP 768 fields): process_vm_writev(2), which, unlike a write to
/proc/PID/mem, respects page protections (no FOLL_FORCE), so only memory
the target itself could write is ever changed::

    ssize_t process_vm_writev(pid_t pid,
                              const struct iovec *local_iov, unsigned long liovcnt,
                              const struct iovec *remote_iov, unsigned long riovcnt,
                              unsigned long flags);
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Dict, List, Optional, Sequence, Tuple

from perfagent import libc as _libc


class iovec(ctypes.Structure):
    # struct iovec { void *iov_base; size_t iov_len; };
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


#: Largest single read we do: a hostile size field must not make us allocate
#: gigabytes (callers read structures, strings and line tables).
MAX_READ = 16 << 20

_syscall_ok: Optional[bool] = None
_mem_fds: Dict[int, int] = {}


class MemoryReadError(OSError):
    """A read of target memory failed or came back short."""


class MemoryWriteError(OSError):
    """A write to target memory failed or was short (nothing is retried)."""


def _vm_readv(pid: int, local: ctypes.Array, remote: ctypes.Array, count: int) -> int:
    nr = _libc.syscall_number("process_vm_readv")
    lib = _libc.libc()
    ret = lib.syscall(nr, ctypes.c_long(pid), local, ctypes.c_ulong(count),
                      remote, ctypes.c_ulong(count), ctypes.c_ulong(0))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def read(pid: int, addr: int, size: int) -> bytes:
    """Up to ``size`` bytes at ``addr`` in process ``pid``; short at a hole.

    Raises ProcessLookupError when the process is gone and PermissionError
    when we may not read it; an unmapped or invalid address gives b"".
    """
    if size <= 0 or addr <= 0 or addr + size > 1 << 64:
        return b""
    size = min(size, MAX_READ)
    global _syscall_ok
    if _syscall_ok is not False:
        buf = ctypes.create_string_buffer(size)
        local = (iovec * 1)(iovec(ctypes.addressof(buf), size))
        remote = (iovec * 1)(iovec(addr, size))
        try:
            n = _vm_readv(pid, local, remote, 1)
            _syscall_ok = True
            return buf.raw[:n]
        except OSError as exc:
            if exc.errno == errno.EFAULT or exc.errno == errno.EIO:
                return _read_partial(pid, addr, size)
            if exc.errno == errno.ESRCH:
                raise ProcessLookupError(errno.ESRCH, "process %d is gone" % pid) from None
            if exc.errno == errno.EPERM:
                raise PermissionError(errno.EPERM, "not allowed to read the memory of process %d" % pid) from None
            if exc.errno != errno.ENOSYS:
                raise
            _syscall_ok = False
    return _read_procmem(pid, addr, size)


def _read_partial(pid: int, addr: int, size: int) -> bytes:
    """The readable prefix of [addr, addr+size) when it crosses a hole: page by page."""
    out = []
    page = 4096
    cur = addr
    end = addr + size
    while cur < end:
        chunk = min(end, (cur // page + 1) * page) - cur
        buf = ctypes.create_string_buffer(chunk)
        local = (iovec * 1)(iovec(ctypes.addressof(buf), chunk))
        remote = (iovec * 1)(iovec(cur, chunk))
        try:
            n = _vm_readv(pid, local, remote, 1)
        except OSError:
            break
        out.append(buf.raw[:n])
        if n < chunk:
            break
        cur += chunk
    return b"".join(out)


def _read_procmem(pid: int, addr: int, size: int) -> bytes:
    fd = _mem_fds.get(pid)
    if fd is None:
        try:
            fd = os.open("/proc/%d/mem" % pid, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ProcessLookupError(errno.ESRCH, "process %d is gone" % pid) from None
        if len(_mem_fds) > 64:
            forget_all()
        _mem_fds[pid] = fd
    try:
        return os.pread(fd, size, addr)
    except OSError as exc:
        if exc.errno in (errno.EIO, errno.EFAULT):
            return b""
        raise


def forget(pid: int) -> None:
    """Close what was kept open for ``pid`` (call when it exits)."""
    fd = _mem_fds.pop(pid, None)
    if fd is not None:
        os.close(fd)


def forget_all() -> None:
    for pid in list(_mem_fds):
        forget(pid)


def read_exact(pid: int, addr: int, size: int) -> bytes:
    """Exactly ``size`` bytes at ``addr``, or MemoryReadError."""
    data = read(pid, addr, size)
    if len(data) != size:
        raise MemoryReadError(errno.EFAULT, "cannot read %d bytes at %#x in process %d" % (size, addr, pid))
    return data


def read_many(pid: int, spans: Sequence[Tuple[int, int]]) -> List[bytes]:
    """Several reads in one system call: the bytes of each (addr, size) span.

    A span that cannot be read (or that follows one that could not: the
    kernel stops at the first bad remote segment) comes back short or empty.
    """
    spans = [(a, min(max(s, 0), MAX_READ)) for a, s in spans]
    total = sum(s for _, s in spans)
    if not spans or total == 0 or _syscall_ok is False or len(spans) > 1024:
        return [read(pid, a, s) for a, s in spans]
    buf = ctypes.create_string_buffer(total)
    base = ctypes.addressof(buf)
    local = (iovec * len(spans))()
    remote = (iovec * len(spans))()
    off = 0
    for i, (a, s) in enumerate(spans):
        local[i] = iovec(base + off, s)
        remote[i] = iovec(a, s)
        off += s
    try:
        n = _vm_readv(pid, local, remote, len(spans))
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise ProcessLookupError(errno.ESRCH, "process %d is gone" % pid) from None
        if exc.errno == errno.EPERM:
            raise PermissionError(errno.EPERM, "not allowed to read the memory of process %d" % pid) from None
        return [read(pid, a, s) for a, s in spans]
    raw = buf.raw
    out = []
    off = 0
    for a, s in spans:
        if off + s <= n:
            out.append(raw[off:off + s])
        elif off < n:
            out.append(raw[off:n])
        else:
            out.append(read(pid, a, s))  # after the first bad span: each on its own
        off += s
    return out


def write(pid: int, addr: int, data: bytes) -> None:
    """Write ``data`` at ``addr`` in process ``pid``, all of it or raise.

    ProcessLookupError when the process is gone, PermissionError when we
    may not write it, MemoryWriteError for an unmapped or read-only
    address or a short write (a write that crosses into such a page has
    changed the bytes before it: callers write only what they own).
    """
    size = len(data)
    if size == 0:
        return
    if addr <= 0 or addr + size > 1 << 64 or size > MAX_READ:
        raise MemoryWriteError(errno.EFAULT, "bad write of %d bytes at %#x in process %d" % (size, addr, pid))
    buf = ctypes.create_string_buffer(bytes(data), size)
    local = (iovec * 1)(iovec(ctypes.addressof(buf), size))
    remote = (iovec * 1)(iovec(addr, size))
    nr = _libc.syscall_number("process_vm_writev")
    ret = _libc.libc().syscall(nr, ctypes.c_long(pid), local, ctypes.c_ulong(1),
                               remote, ctypes.c_ulong(1), ctypes.c_ulong(0))
    if ret < 0:
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise ProcessLookupError(errno.ESRCH, "process %d is gone" % pid)
        if err == errno.EPERM:
            raise PermissionError(errno.EPERM, "not allowed to write the memory of process %d" % pid)
        if err == errno.ENOSYS:
            _write_procmem(pid, addr, data)
            return
        raise MemoryWriteError(err, "cannot write %d bytes at %#x in process %d: %s"
                               % (size, addr, pid, os.strerror(err)))
    if ret != size:
        raise MemoryWriteError(errno.EFAULT, "short write at %#x in process %d (%d of %d bytes)"
                               % (addr, pid, ret, size))


def _write_procmem(pid: int, addr: int, data: bytes) -> None:
    # Without process_vm_writev: /proc/PID/mem (which would also write
    # read-only pages; our callers only write pages the target may write).
    try:
        fd = os.open("/proc/%d/mem" % pid, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, "process %d is gone" % pid) from None
    try:
        n = os.pwrite(fd, data, addr)
    except OSError as exc:
        raise MemoryWriteError(exc.errno or errno.EFAULT, "cannot write at %#x in process %d: %s"
                               % (addr, pid, exc.strerror)) from None
    finally:
        os.close(fd)
    if n != len(data):
        raise MemoryWriteError(errno.EFAULT, "short write at %#x in process %d" % (addr, pid))
