"""Remote function calls: make a stopped thread call a function and come back.

The thread's registers are saved once; each call loads the arguments into
the psABI argument registers, points the instruction pointer at the
function and the stack pointer at a fake return address of 0.  When the
function returns it jumps to address 0, faults, and the SIGSEGV shows up
as a signal-delivery-stop that we recognise (rip == 0 and rsp just above
our slot) and suppress; the return value is in rax.

Data the call needs (a C string) and the return slot go on the thread's own
stack *below the red zone* (the 128 bytes under rsp a leaf function may use
without moving rsp), so nothing the interrupted code owns is overwritten;
the original bytes are saved and written back by :meth:`RemoteCaller.restore`
together with the registers.

Why restoring the registers verbatim also resumes an interrupted system
call: a thread stopped on its way out of a blocking call shows
``orig_rax >= 0`` and ``rax == -ERESTART*``.  For the remote calls we set
``orig_rax = -1``, which tells the kernel there is no system call to
restart.  When we put the original registers back and the thread leaves the
stop, the kernel's signal-exit path (arch_do_signal_or_restart) sees the
original ``orig_rax``/``rax`` and does what it would have done had we never
been there: back rip up over the ``syscall`` instruction and reload rax
(or use restart_syscall for ERESTART_RESTARTBLOCK), or -- if a signal with a
handler is being delivered, e.g. one we deferred -- return -EINTR /
restart according to SA_RESTART.  Rewriting rip/rax ourselves instead would
restart the call even when a handler runs, which delays Python signal
handlers until the blocking call ends.
"""

from __future__ import annotations

import signal
from typing import List, Optional, Sequence, Tuple

from perfagent import arch
from perfagent.ptrace.thread import PtraceError, TracedThread, copy_regs, signed

_MASK64 = (1 << 64) - 1

#: The return address every remote call returns to: executing it faults.
RETURN_TRAP_ADDRESS = 0


def in_syscall(regs) -> Optional[int]:
    """The number of the system call the stopped thread is inside, or None."""
    a = arch.current()
    nr = signed(getattr(regs, a.REG_ORIG_SYSCALL))
    return nr if nr >= 0 else None


def waiting_in_syscall(regs) -> bool:
    """True when the stopped thread is blocked in a waiting system call.

    See ``BLOCKING_SYSCALLS`` in the arch module: such a thread is parked
    at a well-defined point, not half-way through an update of something a
    remote call might use.  futex counts only for its wait operations.
    """
    a = arch.current()
    nr = in_syscall(regs)
    if nr is None or nr not in a.BLOCKING_SYSCALLS.values():
        return False
    if nr == a.BLOCKING_SYSCALLS["futex"]:
        op = getattr(regs, a.REG_SYSCALL_ARG2) & a.FUTEX_CMD_MASK
        return op in a.FUTEX_WAIT_OPS
    return True


def interrupted_syscall(regs) -> Optional[Tuple[int, int]]:
    """(syscall number, ERESTART* code) when the thread is stopped on the way
    out of an interrupted system call the kernel will restart, else None."""
    a = arch.current()
    nr = in_syscall(regs)
    if nr is None:
        return None
    ret = -signed(getattr(regs, a.REG_RETVAL))
    if ret in a.SYSCALL_RESTART_ERRNOS:
        return nr, ret
    return None


class RemoteCaller:
    """Calls functions in a stopped :class:`TracedThread`.

    ``begin()`` saves the registers; ``push()`` places data on the scratch
    stack; ``call()`` runs one function to completion; ``restore()`` puts
    memory and registers back (always call it, in a ``finally``).
    """

    def __init__(self, thread: TracedThread) -> None:
        self.thread = thread
        self.arch = arch.current()
        self.saved = None
        self.saved_xstate = None
        self._cursor = 0
        self._undo: List[Tuple[int, bytes]] = []

    def begin(self) -> None:
        if not self.thread.stopped:
            raise PtraceError("ptrace_failed", "pid=%d reason=ptrace_failed: thread not stopped"
                              % self.thread.tid)
        self.saved = self.thread.getregs()
        # The called code clobbers vector/x87 registers the interrupted code
        # may have live (memcpy keeps data in ymm registers, compilers spill
        # into xmm): the extended state is saved and restored too.
        self.saved_xstate = self.thread.get_xstate()
        self._cursor = getattr(self.saved, self.arch.REG_SP) - self.arch.STACK_RED_ZONE
        self._undo = []

    def _write_saving(self, addr: int, data: bytes) -> None:
        self._undo.append((addr, self.thread.read(addr, len(data))))
        self.thread.write(addr, data)

    def push(self, data: bytes) -> int:
        """Copy ``data`` onto the scratch stack; its address in the target."""
        addr = (self._cursor - len(data)) & ~7
        self._write_saving(addr, data)
        self._cursor = addr
        return addr

    def call(self, func: int, args: Sequence[int], deadline: float, name: str = "") -> int:
        """Call ``func(*args)`` in the thread; its return value (unsigned).

        Signals that arrive meanwhile are recorded on the thread (delivered
        at detach), never handed to the target while it runs our call, so
        no handler runs on a half-built state.  PtraceError("timeout") if
        the function has not returned by ``deadline``; the thread is then
        still running our call and ``restore()`` stops it first.
        """
        a = self.arch
        if len(args) > len(a.REG_ARGS):
            raise ValueError("too many arguments")
        # On entry rsp + 8 must be a multiple of 16: the return slot sits
        # just below a 16-byte boundary.
        slot = ((self._cursor & ~(a.STACK_ALIGN - 1)) - 8)
        self._write_saving(slot, RETURN_TRAP_ADDRESS.to_bytes(8, "little"))
        regs = copy_regs(self.saved)
        for reg, value in zip(a.REG_ARGS, args):
            setattr(regs, reg, value & _MASK64)
        setattr(regs, a.REG_IP, func)
        setattr(regs, a.REG_SP, slot)
        setattr(regs, a.REG_ORIG_SYSCALL, _MASK64)  # -1: not in a system call
        setattr(regs, a.REG_RETVAL, 0)  # %al = 0 vector registers for varargs
        setattr(regs, a.REG_FLAGS, getattr(regs, a.REG_FLAGS) & ~a.FLAGS_DF)
        t = self.thread
        t.setregs(regs)
        t.resume(0)
        while True:
            try:
                st = t.wait(deadline)
            except PtraceError as exc:
                if exc.reason == "timeout":
                    raise PtraceError("timeout", "pid=%d reason=timeout: remote call of %s did not "
                                      "return in time" % (t.tid, name or hex(func))) from None
                raise
            if st.is_signal_delivery and st.stopsig == signal.SIGSEGV:
                now = t.getregs()
                if (getattr(now, a.REG_IP) == RETURN_TRAP_ADDRESS
                        and getattr(now, a.REG_SP) == slot + 8):
                    return getattr(now, a.REG_RETVAL)
                raise PtraceError("target_fault", "pid=%d reason=target_fault: SIGSEGV at %#x during "
                                  "remote call of %#x" % (t.tid, getattr(now, a.REG_IP), func))
            if st.is_signal_delivery:
                if st.stopsig in (signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGTRAP):
                    now = t.getregs()
                    raise PtraceError("target_fault", "pid=%d reason=target_fault: signal %d at %#x "
                                      "during remote call" % (t.tid, st.stopsig, getattr(now, a.REG_IP)))
                t.pending_signals.append(st.stopsig)
            elif st.is_group_stop:
                # Someone stopped the process while we hold this thread: let
                # our call finish, then stop it again at detach.
                t.pending_signals.append(st.stopsig)
            t.resume(0)

    def restore(self) -> None:
        """Stop the thread if it runs, write back memory and registers."""
        if self.saved is None:
            return
        t = self.thread
        if not t.attached:
            return
        if not t.stopped:
            t.interrupt(2.0, defer_signals=True)
        for addr, data in reversed(self._undo):
            t.write(addr, data)
        self._undo = []
        t.setregs(self.saved)
        if self.saved_xstate is not None:
            t.set_xstate(self.saved_xstate)
        self.saved = None
