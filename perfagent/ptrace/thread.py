"""One traced thread: seize, interrupt, registers, memory, resume, detach.

The middle layer between the raw binding and a feature such as remote
function calls.  It attaches with PTRACE_SEIZE (not PTRACE_ATTACH) so no
SIGSTOP is sent: the only stop is the one PTRACE_INTERRUPT asks for, and a
group-stop is told apart from it by the signal in the event stop.  Every
wait is a WNOHANG poll against a deadline: a thread that never stops (stuck
in an uninterruptible sleep) or never comes back (a remote call that blocks)
costs a timeout, never a hung agent.  Memory goes through
perfagent.target.memory (process_vm_readv/writev), /proc through
perfagent.target.procfs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from typing import Callable, Dict, Optional

from perfagent import arch
from perfagent.errors import CaptureError
from perfagent.ptrace import binding as B
from perfagent.target import memory, procfs


class PtraceError(CaptureError):
    """A ptrace operation failed; ``reason`` is a short machine-readable word.

    Reasons: ``ptrace_eperm`` (not allowed to trace), ``process_gone``
    (the thread exited), ``timeout`` (it did not stop in time),
    ``detach_failed`` (it never stopped to be detached: see
    :meth:`TracedThread.detach`), ``ptrace_failed`` (anything else).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


PTRACE_EPERM_HINT = ("set kernel.yama.ptrace_scope to 0 or 1, "
                     "or grant CAP_SYS_PTRACE")


def eperm_hint(pid: int) -> str:
    """What refused ptrace, and the fix, for this agent and this target.

    The usual advice (ptrace_scope, CAP_SYS_PTRACE) is wrong for root, whom
    neither stops: then it is Yama's scope 3 (no attaching at all), another
    tracer, or a security module.
    """
    from perfagent.target import procfs
    scope = procfs.ptrace_scope()
    if os.geteuid() != 0:
        return PTRACE_EPERM_HINT
    if scope == 3:
        return ("kernel.yama.ptrace_scope is 3: nobody may attach, root included, until a reboot "
                "with a lower setting")
    tracer = procfs.tracer_pid(pid)
    if tracer:
        return "already traced by pid %d (a debugger?)" % tracer
    return "the kernel refused root: a security module (AppArmor, SELinux) or a container's seccomp policy"


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

    ptrace ties a tracee to the tracing *thread*, not process: every
    request, and the waits, must come from the thread that seized.  When
    that thread exits, the kernel detaches its tracees itself and cancels a
    PTRACE_INTERRUPT still pending (``__ptrace_unlink``), which is the last
    resort :meth:`detach` leaves to its caller (see there).
    """

    #: Options given to PTRACE_SEIZE: syscall stops report SIGTRAP|0x80, so
    #: they are never confused with a real SIGTRAP.
    SEIZE_OPTIONS = B.PTRACE_O_TRACESYSGOOD

    def __init__(self, tgid: int, tid: Optional[int] = None) -> None:
        self.tgid = tgid
        self.tid = tgid if tid is None else tid
        self.attached = False
        self.stopped = False
        self.last_status: Optional[B.WaitStatus] = None

    # ------------------------------------------------------------ attach/stop

    def _fail(self, exc: OSError, what: str) -> PtraceError:
        if exc.errno == errno.EPERM:
            return PtraceError("ptrace_eperm", "pid=%d reason=ptrace_eperm: %s (%s)"
                               % (self.tid, what, eperm_hint(self.tgid)))
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
        self._ptrace(B.PTRACE_SEIZE, 0, self.SEIZE_OPTIONS)
        self.attached = True

    def interrupt(self, timeout: float) -> B.WaitStatus:
        """PTRACE_INTERRUPT and wait for the resulting stop.

        Signal-delivery-stops met on the way are passed straight on with
        the same signal number, which makes the kernel deliver the original
        siginfo (sender, si_code, queued value): the thread handles its
        signal, then the pending interrupt traps it.  The returned status is
        a PTRACE_EVENT_STOP: the interrupt's, or a group-stop's.
        """
        self._ptrace(B.PTRACE_INTERRUPT)
        return self.wait_event_stop(time.monotonic() + timeout)

    def request_interrupt(self) -> None:
        """PTRACE_INTERRUPT without waiting: the thread traps at its next
        chance (for a stopped thread: right after it is resumed)."""
        self._ptrace(B.PTRACE_INTERRUPT)

    def wait_event_stop(self, deadline: float,
                        sleep: Optional[Callable[[float], None]] = None) -> B.WaitStatus:
        """Wait for a PTRACE_EVENT_STOP, passing signals on (see interrupt)."""
        while True:
            st = self.wait(deadline, sleep)
            if st.is_event_stop:
                # The interrupt trap, or a group-stop (someone sent SIGSTOP)
                # which, under PTRACE_SEIZE, is just as good a stop to work
                # from: the caller sees which in st.is_group_stop.
                return st
            if st.is_signal_delivery:
                self.resume(st.stopsig)
                continue
            self.resume(0)

    #: Polls of waitpid before the first sleep: a stop that is microseconds
    #: away (a syscall stop in a remote call) is seen without sleeping.
    SPIN_POLLS = 200

    def wait(self, deadline: Optional[float],
             sleep: Optional[Callable[[float], None]] = None) -> B.WaitStatus:
        """The thread's next stop, polling with WNOHANG until ``deadline``.

        Raises PtraceError("process_gone") when it exits and
        PtraceError("timeout") when the deadline passes first (``None``:
        one poll round only, for callers that check other things between
        polls).  Between polls it spins briefly, then sleeps with a growing
        back-off; ``sleep(seconds)`` replaces both for a caller that can
        sleep until the stop's SIGCHLD instead (perfagent.ptrace.snapshot).
        """
        delay = 0.00005
        spins = self.SPIN_POLLS if sleep is None else 0
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
            if spins > 0:
                spins -= 1
                continue
            now = time.monotonic()
            if deadline is None or now >= deadline:
                raise PtraceError("timeout", "pid=%d reason=timeout: thread did not stop" % self.tid)
            if sleep is not None:
                sleep(deadline - now)
                continue
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.002)

    def resume(self, sig: int = 0, syscall: bool = False, listen: bool = False) -> None:
        """PTRACE_CONT, PTRACE_SYSCALL (stop at the next syscall entry or
        exit) or PTRACE_LISTEN (a group-stop), injecting ``sig``."""
        if listen:
            self._ptrace(B.PTRACE_LISTEN, 0, 0)
        else:
            self._ptrace(B.PTRACE_SYSCALL if syscall else B.PTRACE_CONT, 0, sig)
        self.stopped = False

    #: Seconds given to each attempt to stop a running thread for
    #: PTRACE_DETACH (which needs a stopped tracee), and the attempts.
    DETACH_ATTEMPTS = (0.2, 0.5, 1.0)

    def detach(self, interrupt: bool = True) -> None:
        """PTRACE_DETACH, retried; safe to call twice.

        A running thread is interrupted first (PTRACE_DETACH only works on
        a stopped tracee); a signal-delivery-stop met meanwhile hands its
        signal (with its siginfo) to the detach, which delivers it.  A
        thread that does not stop in any attempt -- an uninterruptible or
        killable sleep, e.g. a vfork parent -- cannot be detached by
        ptrace: PtraceError("detach_failed") is raised and ``attached``
        stays True.  The caller must then end the thread that traces it
        (the kernel detaches the tracees of an exiting tracer and cancels
        the pending interrupt), never leave it traced: once it wakes, it
        would stop for good.  Never call this on a thread running a remote
        call (see perfagent.ptrace.call: an interrupt there can cost the
        interrupted system call its restart state); ``interrupt=False``
        detaches a thread stopped in it, once, never interrupting.
        """
        if not self.attached:
            return
        last: Optional[PtraceError] = None
        for slice_ in self.DETACH_ATTEMPTS if interrupt else (0.0,):
            if not interrupt and not self.stopped:
                break
            sig = 0
            try:
                if not self.stopped:
                    self._ptrace(B.PTRACE_INTERRUPT)
                    st = self.wait(time.monotonic() + slice_)
                    if st.is_signal_delivery:
                        sig = st.stopsig
                elif self.last_status is not None and self.last_status.is_signal_delivery:
                    sig = self.last_status.stopsig
                self._ptrace(B.PTRACE_DETACH, 0, sig)
                self.attached = self.stopped = False
                return
            except PtraceError as exc:
                if exc.reason == "process_gone" and (not self.attached or not _alive(self.tgid, self.tid)):
                    self.attached = self.stopped = False
                    return
                # ESRCH from PTRACE_DETACH also means "not stopped" (it was
                # resumed by SIGKILL or SIGCONT): try again.
                self.stopped = False
                last = exc
        raise PtraceError("detach_failed", "pid=%d reason=detach_failed: the thread did not stop to be "
                          "detached in %d attempts (%.1fs; state %s): %s"
                          % (self.tid, len(self.DETACH_ATTEMPTS), sum(self.DETACH_ATTEMPTS),
                             _state(self.tgid, self.tid) or "?", last))

    def __enter__(self) -> "TracedThread":
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    # ---------------------------------------------------------------- signals

    def getsigmask(self) -> int:
        try:
            return B.getsigmask(self.tid)
        except OSError as exc:
            raise self._fail(exc, "PTRACE_GETSIGMASK") from None

    def setsigmask(self, mask: int) -> None:
        try:
            B.setsigmask(self.tid, mask)
        except OSError as exc:
            raise self._fail(exc, "PTRACE_SETSIGMASK") from None

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

    def read(self, addr: int, size: int) -> bytes:
        """Exactly ``size`` bytes of the thread's memory (process_vm_readv)."""
        try:
            return memory.read_exact(self.tgid, addr, size)
        except OSError as exc:
            raise self._fail(exc, "read %d bytes at %#x" % (size, addr)) from None

    def write(self, addr: int, data: bytes) -> None:
        """Write into memory the thread may write itself (process_vm_writev)."""
        try:
            memory.write(self.tgid, addr, data)
        except OSError as exc:
            raise self._fail(exc, "write %d bytes at %#x" % (len(data), addr)) from None


def _state(tgid: int, tid: int) -> str:
    st = procfs.stat(tgid, tid)
    return st.state if st is not None else ""


def _alive(tgid: int, tid: int) -> bool:
    return _state(tgid, tid) not in ("", "Z", "X")


def tracer_pid(pid: int, tid: Optional[int] = None) -> int:
    """TracerPid of process ``pid`` (or its thread ``tid``): the tracing
    *thread's* id, 0 when nobody traces it or it is gone."""
    fields = procfs.status(pid, tid)
    try:
        return int(fields.get("TracerPid", "0").split()[0])
    except (ValueError, IndexError):
        return 0


def thread_states(pid: int) -> Dict[int, str]:
    """tid -> the state letter of /proc/PID/task/TID/stat (R, S, D, t, T ...)."""
    states = {}
    try:
        tids = procfs.threads(pid)
    except ProcessLookupError:
        return states
    for tid in tids:
        st = procfs.stat(pid, tid)
        if st is not None:
            states[tid] = st.state
    return states
