"""One traced thread: seize, interrupt, registers, memory, resume, detach.

The middle layer between the raw binding and a feature such as remote
function calls.  It attaches with PTRACE_SEIZE (not PTRACE_ATTACH) so no
SIGSTOP is sent: the only stop is the one PTRACE_INTERRUPT asks for, and a
group-stop is told apart from it by the signal in the event stop.  Every
wait is a WNOHANG poll against a deadline: a thread that never stops (stuck
in an uninterruptible sleep) or never comes back (a remote call that blocks)
costs a timeout, never a hung agent.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from typing import Dict, List, Optional

from perfagent import arch
from perfagent.errors import CaptureError
from perfagent.ptrace import binding as B


class PtraceError(CaptureError):
    """A ptrace operation failed; ``reason`` is a short machine-readable word.

    Reasons: ``ptrace_eperm`` (not allowed to trace), ``process_gone``
    (the thread exited), ``timeout`` (it did not stop in time),
    ``ptrace_failed`` (anything else).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


PTRACE_EPERM_HINT = ("set kernel.yama.ptrace_scope to 0 or 1, "
                     "or grant CAP_SYS_PTRACE")


def _regs_struct() -> type:
    fields = arch.current().USER_REGS_FIELDS
    if fields is None:
        raise CaptureError("remote register access is not implemented for %s" % arch.current().NAME)
    return type("user_regs_struct", (ctypes.Structure,),
                {"_fields_": [(name, ctypes.c_ulong) for name in fields]})


_REGS_TYPE: Optional[type] = None


def regs_type() -> type:
    """ctypes mirror of this architecture's ``struct user_regs_struct``.

    Built from the field list in the arch module (where the C struct is
    quoted), so the layout is stated once.
    """
    global _REGS_TYPE
    if _REGS_TYPE is None:
        _REGS_TYPE = _regs_struct()
    return _REGS_TYPE


def copy_regs(regs: ctypes.Structure) -> ctypes.Structure:
    new = regs_type()()
    ctypes.memmove(ctypes.addressof(new), ctypes.addressof(regs), ctypes.sizeof(new))
    return new


def signed(value: int) -> int:
    """A register's unsigned 64-bit value read as a C long."""
    return value - (1 << 64) if value >= (1 << 63) else value


class TracedThread:
    """A thread this process traces (one tid of process ``tgid``).

    Use as a context manager or call :meth:`detach` in a ``finally``: a
    thread left traced by a dead tracer is detached by the kernel, but one
    left *stopped* by a live tracer stays stopped.
    """

    def __init__(self, tgid: int, tid: Optional[int] = None) -> None:
        self.tgid = tgid
        self.tid = tgid if tid is None else tid
        self.attached = False
        self.stopped = False
        self.last_status: Optional[B.WaitStatus] = None
        # Signals that arrived while we held the thread, to hand back on detach.
        self.pending_signals: List[int] = []
        self._mem_fd: Optional[int] = None

    # ------------------------------------------------------------ attach/stop

    def _fail(self, exc: OSError, what: str) -> PtraceError:
        if exc.errno == errno.EPERM:
            return PtraceError("ptrace_eperm", "pid=%d reason=ptrace_eperm: %s (%s)"
                               % (self.tid, what, PTRACE_EPERM_HINT))
        if exc.errno == errno.ESRCH:
            return PtraceError("process_gone", "pid=%d reason=process_gone: %s" % (self.tid, what))
        return PtraceError("ptrace_failed", "pid=%d reason=ptrace_failed: %s: %s" % (self.tid, what, exc))

    def _ptrace(self, request: int, addr: int = 0, data: int = 0) -> int:
        try:
            return B.ptrace(request, self.tid, addr, data)
        except OSError as exc:
            raise self._fail(exc, str(exc)) from None

    def seize(self) -> None:
        """PTRACE_SEIZE: trace without stopping (and without a SIGSTOP)."""
        self._ptrace(B.PTRACE_SEIZE, 0, 0)
        self.attached = True

    def interrupt(self, timeout: float, defer_signals: bool = False) -> B.WaitStatus:
        """PTRACE_INTERRUPT and wait for the resulting stop.

        Signal-delivery-stops met on the way are passed straight on (the
        thread handles its signal, then the pending interrupt traps it) or,
        with ``defer_signals`` (the thread is running code of ours), kept
        in ``pending_signals`` for detach.  The returned status is a
        PTRACE_EVENT_STOP: the interrupt's, or a group-stop's.
        """
        self._ptrace(B.PTRACE_INTERRUPT)
        deadline = time.monotonic() + timeout
        while True:
            st = self.wait(deadline)
            if st.is_event_stop:
                # The interrupt trap, or a group-stop (someone sent SIGSTOP)
                # which, under PTRACE_SEIZE, is just as good a stop to work
                # from: the caller sees which in st.is_group_stop.
                return st
            if st.is_signal_delivery:
                if defer_signals:
                    self.pending_signals.append(st.stopsig)
                    self.resume(0)
                else:
                    self.resume(st.stopsig)
                continue
            self.resume(0)

    def wait(self, deadline: float) -> B.WaitStatus:
        """The thread's next stop, polling with WNOHANG until ``deadline``.

        Raises PtraceError("process_gone") when it exits and
        PtraceError("timeout") when the deadline passes first.
        """
        delay = 0.0001
        while True:
            try:
                pid, raw = B.waitpid(self.tid, B.WNOHANG | B.WALL)
            except OSError as exc:
                self.attached = self.stopped = False
                raise self._fail(exc if exc.errno != errno.ECHILD else OSError(errno.ESRCH, "gone"),
                                 "waitpid") from None
            if pid == self.tid:
                st = B.WaitStatus(raw)
                self.last_status = st
                if st.exited:
                    self.attached = self.stopped = False
                    raise PtraceError("process_gone", "pid=%d reason=process_gone: %r" % (self.tid, st))
                self.stopped = True
                return st
            now = time.monotonic()
            if now >= deadline:
                raise PtraceError("timeout", "pid=%d reason=timeout: thread did not stop" % self.tid)
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.005)

    def resume(self, sig: int = 0, listen: bool = False) -> None:
        """PTRACE_CONT (or PTRACE_LISTEN for a group-stop), injecting ``sig``."""
        if listen:
            self._ptrace(B.PTRACE_LISTEN, 0, 0)
        else:
            self._ptrace(B.PTRACE_CONT, 0, sig)
        self.stopped = False

    def detach(self) -> None:
        """Hand deferred signals back and PTRACE_DETACH; safe to call twice.

        If the thread is running (a failed remote call), it is interrupted
        first: PTRACE_DETACH only works on a stopped tracee.  The first
        deferred signal rides on the detach itself; any others are queued
        with tgkill while the thread is still stopped, so it handles all of
        them as soon as it runs.
        """
        if self._mem_fd is not None:
            os.close(self._mem_fd)
            self._mem_fd = None
        if not self.attached:
            return
        try:
            if not self.stopped:
                try:
                    self.interrupt(2.0)
                except PtraceError as exc:
                    if exc.reason == "process_gone":
                        self.attached = False
                        return
                    raise
            sigs: List[int] = []
            for sig in self.pending_signals:
                if sig not in sigs:
                    sigs.append(sig)
            # A signal given to PTRACE_DETACH is only reliably delivered from
            # a signal-delivery-stop (ptrace(2)); from other stops, queue it.
            ride = None
            st = self.last_status
            if sigs and st is not None and st.is_signal_delivery:
                ride = sigs.pop(0)
            for sig in sigs:
                try:
                    B.tgkill(self.tgid, self.tid, sig)
                except OSError:
                    pass
            self._ptrace(B.PTRACE_DETACH, 0, ride or 0)
        except PtraceError as exc:
            if exc.reason != "process_gone":
                raise
        finally:
            self.attached = self.stopped = False
            self.pending_signals = []

    def __enter__(self) -> "TracedThread":
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    # -------------------------------------------------------------- registers

    def getregs(self) -> ctypes.Structure:
        """PTRACE_GETREGSET(NT_PRSTATUS): the general-purpose registers."""
        regs = regs_type()()
        iov = B.iovec(ctypes.addressof(regs), ctypes.sizeof(regs))
        self._ptrace(B.PTRACE_GETREGSET, B.NT_PRSTATUS, ctypes.addressof(iov))
        return regs

    def setregs(self, regs: ctypes.Structure) -> None:
        """PTRACE_SETREGSET(NT_PRSTATUS)."""
        iov = B.iovec(ctypes.addressof(regs), ctypes.sizeof(regs))
        self._ptrace(B.PTRACE_SETREGSET, B.NT_PRSTATUS, ctypes.addressof(iov))

    def get_xstate(self):
        """The FPU/vector register state as an opaque (note type, bytes) pair.

        PTRACE_GETREGSET with the arch's extended note (NT_X86_XSTATE: the
        XSAVE area with AVX/AVX-512 state), else NT_PRFPREG (the 512-byte
        FXSAVE area).  The kernel shortens iov_len to what it wrote.
        """
        for note, size in arch.current().XSTATE_NOTES:
            buf = ctypes.create_string_buffer(size)
            iov = B.iovec(ctypes.addressof(buf), size)
            try:
                B.ptrace(B.PTRACE_GETREGSET, self.tid, note, ctypes.addressof(iov))
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENODEV, errno.EIO):
                    continue
                raise self._fail(exc, "PTRACE_GETREGSET(%#x)" % note) from None
            return note, buf.raw[:iov.iov_len]
        return None

    def set_xstate(self, state) -> None:
        """Write back what :meth:`get_xstate` returned."""
        note, data = state
        buf = ctypes.create_string_buffer(data, len(data))
        iov = B.iovec(ctypes.addressof(buf), len(data))
        self._ptrace(B.PTRACE_SETREGSET, note, ctypes.addressof(iov))

    def siginfo(self) -> B.siginfo_t:
        try:
            return B.getsiginfo(self.tid)
        except OSError as exc:
            raise self._fail(exc, "PTRACE_GETSIGINFO") from None

    # ----------------------------------------------------------------- memory

    def _mem(self) -> int:
        # /proc/PID/mem writes go through the ptrace access check, which
        # our attachment satisfies; one pread/pwrite replaces a loop of
        # word-sized PTRACE_PEEKDATA/POKEDATA calls.
        if self._mem_fd is None:
            try:
                self._mem_fd = os.open("/proc/%d/mem" % self.tid, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise self._fail(exc, "open /proc/%d/mem" % self.tid) from None
        return self._mem_fd

    def read(self, addr: int, size: int) -> bytes:
        try:
            data = os.pread(self._mem(), size, addr)
        except OSError as exc:
            raise self._fail(exc, "read %d bytes at %#x" % (size, addr)) from None
        if len(data) != size:
            raise PtraceError("ptrace_failed", "pid=%d reason=ptrace_failed: short read at %#x"
                              % (self.tid, addr))
        return data

    def write(self, addr: int, data: bytes) -> None:
        try:
            n = os.pwrite(self._mem(), data, addr)
        except OSError as exc:
            raise self._fail(exc, "write %d bytes at %#x" % (len(data), addr)) from None
        if n != len(data):
            raise PtraceError("ptrace_failed", "pid=%d reason=ptrace_failed: short write at %#x"
                              % (self.tid, addr))


def tracer_pid(pid: int) -> int:
    """TracerPid from /proc/PID/status (0 when nobody traces it)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def thread_states(pid: int) -> Dict[int, str]:
    """tid -> the state letter of /proc/PID/task/TID/stat (R, S, D, t, T ...)."""
    states = {}
    for name in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/stat" % (pid, name)) as f:
                text = f.read()
        except OSError:
            continue
        states[int(name)] = text[text.rindex(")") + 2]
    return states
