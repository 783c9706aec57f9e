"""Remote calls: borrow a stopped thread, run code of ours in it, give it back.

:class:`RemoteCaller` works on a thread stopped in an interrupt stop
(PTRACE_INTERRUPT under PTRACE_SEIZE).  :meth:`~RemoteCaller.hold` saves
its registers, FPU/vector state and blocked-signal mask and writes a
signal frame holding them below its red zone (perfagent.ptrace.stub);
:meth:`~RemoteCaller.syscall` runs one system call at a ``syscall; ret``
gadget of the C library, :meth:`~RemoteCaller.run` runs the stub (a
function call, or PyGILState_Ensure / PyRun_SimpleString /
PyGILState_Release), and :meth:`~RemoteCaller.release` puts everything
back.  Three rules make this safe for the target:

* **Every register set the thread is given returns by itself.**  Whatever
  runs ends in ``rt_sigreturn`` on the frame, which restores the saved
  state: if the agent dies at any point (SIGKILL included), the kernel
  detaches the thread, it finishes what it was running and goes back to
  where it was interrupted, its interrupted system call re-executed.
  Order matters and is kept: the registers are pointed at our code
  *before* the signal mask is changed, and the mask is put back *before*
  the registers, so a thread never runs its own code with our mask.
* **Signals stay queued, with their siginfo.**  While the thread runs our
  code every blockable signal is blocked (PTRACE_SETSIGMASK): a signal sent
  meanwhile stays pending in the kernel with its siginfo (sender, si_code,
  the value of a sigqueue), to be delivered once the original mask is
  back -- never dequeued by us and re-sent as a copy.  SIGSTOP cannot be
  blocked: it is passed on (the group-stop happens; the call goes on, and
  the detach re-traps the thread into the stop).  The fault signals
  (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS) are not blocked: the
  kernel would reset the target's handler of a blocked one that a fault
  raises.  A fault in our code is reported as ``target_fault`` and
  suppressed; one of those signals sent by a process is passed on.
* **A call in progress is never cut short.**  Deadlines apply to finding a
  stop, never to :meth:`~RemoteCaller.run`: its ``watch`` callback may
  only decide to *stop watching* (:class:`LeaveCall`).  The thread then
  keeps running our code untraced once its tracer thread exits and
  returns through the frame on its own -- the same path as an agent that
  died.  It is never interrupted while in our code (an interrupt in a
  timed wait would overwrite the restart block the interrupted system
  call needs).

Restoring while the agent lives is kernel-exact: the thread is caught at
the stub's ``rt_sigreturn`` (its syscall-enter-stop, under PTRACE_SYSCALL),
the system call is skipped (``orig_rax = -1``) and the thread brought to an
interrupt stop on its way out; there the saved registers go back verbatim,
``orig_rax`` and an ``-ERESTART*`` in ``rax`` included, and the kernel's
signal-exit path (arch_do_signal_or_restart) does what it would have done
had we never been there: restart the interrupted system call, or -- if a
signal with a handler is delivered first -- return -EINTR or restart
according to SA_RESTART, with restart_syscall for ERESTART_RESTARTBLOCK.
One exception: restart_syscall resumes from the thread's restart block,
which our code overwrites if it sleeps (nanosleep and clock_nanosleep
reset it on entry) or has a wait of its own interrupted.  Every system
call our code makes is seen at its stops, and when one of them touched the
block (``RESTART_BLOCK_WRITERS`` in the arch module, or an
``-ERESTART_RESTARTBLOCK`` result) an ERESTART_RESTARTBLOCK call is handed
back as ``-ERESTARTNOHAND``: the kernel re-executes it with its own
arguments (a relative timeout starts again: longer, never shorter) or
returns -EINTR if a handler runs, as it would have.

Threads stopped in a system call that installs a temporary signal mask
(rt_sigsuspend, ppoll/pselect6/epoll_pwait with a mask) are not borrowed:
PTRACE_SETSIGMASK would discard the mask the kernel restores after them
(:func:`temporary_sigmask`).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

from perfagent import arch
from perfagent.ptrace import stub
from perfagent.ptrace.thread import PtraceError, TracedThread, copy_regs, signed

_MASK64 = (1 << 64) - 1

#: Signals a fault raises.  They are left unblocked: a fault with its
#: signal blocked makes the kernel reset the process's handler to SIG_DFL
#: (force_sig_info_to_task), which would change the target for good.  A
#: fault in our code is then a signal-delivery-stop we suppress; the same
#: signal *sent* by someone (si_code <= 0) is passed on, with its siginfo.
FAULT_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGTRAP,
                 signal.SIGSYS)

#: Blocked while our code runs: everything else (the kernel never blocks
#: SIGKILL and SIGSTOP, whatever the mask says).
BLOCK_ALL = _MASK64 & ~sum(1 << (int(s) - 1) for s in FAULT_SIGNALS)

#: The longest a thread on its way out of a system call may take to reach
#: the interrupt stop release() needs (it is microseconds in practice).
RELEASE_STOP_TIMEOUT = 2.0

#: How often a call in progress is shown to its ``watch`` callback.
WATCH_INTERVAL = 0.02

#: A hook called with a point name at each step, for tests that kill the
#: agent there (perfagent.python.inject sets it from its own).
TEST_HOOK: Optional[Callable[[str], None]] = None


def _hook(point: str) -> None:
    if TEST_HOOK is not None:
        TEST_HOOK(point)


class LeaveCall(Exception):
    """Raised by a ``watch`` callback: stop watching the call in progress.

    The thread keeps running it; the caller must end the tracing thread
    (which detaches it) without touching the thread again.
    """


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


#: x86-64 system calls that install a temporary blocked mask and leave the
#: original in the kernel's saved_sigmask (TIF_RESTORE_SIGMASK), with the
#: register holding the mask pointer (None: always).  arch/x86/entry/syscalls/syscall_64.tbl.
_TEMP_MASK_SYSCALLS = {130: None,        # rt_sigsuspend
                       270: "r9",        # pselect6(..., sigmask-and-size struct)
                       271: "r10",       # ppoll(fds, n, timeout, sigmask, size)
                       281: "r8",        # epoll_pwait(epfd, events, max, timeout, sigmask, size)
                       441: "r8"}        # epoll_pwait2


def temporary_sigmask(regs) -> bool:
    """True when the thread sits in a system call running under a temporary
    signal mask (see the module docstring)."""
    nr = in_syscall(regs)
    if nr is None or nr not in _TEMP_MASK_SYSCALLS:
        return False
    reg = _TEMP_MASK_SYSCALLS[nr]
    return reg is None or getattr(regs, reg) != 0


class Gadgets:
    """Addresses of ``syscall; ret`` and ``__restore_rt`` in one process."""

    def __init__(self, syscall_ret: int, restorer: int) -> None:
        self.syscall_ret = syscall_ret
        self.restorer = restorer


class RemoteCaller:
    """Runs system calls and the stub in a stopped :class:`TracedThread`.

    ``hold(stack_room_ok)`` first; then any number of ``syscall()`` and
    ``run()``; then ``release()`` (always, in a ``finally``, unless a
    :class:`LeaveCall` ended the watch: then the thread must be let go
    without touching it).
    """

    def __init__(self, thread: TracedThread, gadgets: Gadgets) -> None:
        if arch.current().NAME != "x86_64":
            raise PtraceError("unsupported_arch", "pid=%d reason=unsupported_arch: remote calls are "
                              "implemented for x86-64 only" % thread.tid)
        self.thread = thread
        self.gadgets = gadgets
        self.saved = None
        self.saved_xstate = None
        self.saved_mask = 0
        self.frame: Optional[stub.Frame] = None
        self._stack_backup: Optional[Tuple[int, bytes]] = None
        self._masked = False
        self._next_watch = 0.0
        #: True once a LeaveCall let the thread go on without us.
        self.left = False
        #: True once a system call of ours may have changed the thread's
        #: restart block (see the module docstring).
        self.restart_block_touched = False

    # ------------------------------------------------------------------ hold

    def hold(self) -> None:
        """Save the thread's state and write the return frame; no change yet
        to what the thread runs."""
        t = self.thread
        if not (t.stopped and t.last_status is not None and t.last_status.is_event_stop):
            raise PtraceError("ptrace_failed", "pid=%d reason=ptrace_failed: thread not in an "
                              "interrupt stop" % t.tid)
        self.saved = t.getregs()
        # The called code clobbers vector/x87 registers the interrupted code
        # may have live (memcpy keeps data in ymm registers, compilers spill
        # into xmm): the extended state is saved and restored too.
        self.saved_xstate = t.get_xstate()
        self.saved_mask = t.getsigmask()
        top = self.saved.rsp - arch.current().STACK_RED_ZONE
        self.frame = stub.Frame(self.saved, self.saved_xstate, self.saved_mask, top, self.gadgets.restorer)
        low = self.frame.low
        self._stack_backup = (low, t.read(low, top - low))
        t.write(low, self.frame.data)
        _hook("held")

    @staticmethod
    def frame_bytes(xstate_size: int) -> int:
        """Stack bytes below rsp a hold needs (for the caller's room check)."""
        return (arch.current().STACK_RED_ZONE + stub.RT_SIGFRAME_SIZE + stub.FPSTATE_ALIGN
                + xstate_size + stub.FP_XSTATE_MAGIC2_SIZE + stub.Frame.GAP + 16)

    def _enter(self, regs) -> None:
        """Point the thread at our code; block its signals (in that order)."""
        t = self.thread
        t.setregs(regs)
        if not self._masked:
            t.setsigmask(BLOCK_ALL)
            self._masked = True

    def _regs(self, ip: int, sp: int) -> object:
        regs = copy_regs(self.saved)
        regs.rip = ip
        regs.rsp = sp
        regs.orig_rax = _MASK64     # -1: not in a system call, nothing to restart
        regs.eflags &= ~arch.current().FLAGS_DF
        return regs

    # ------------------------------------------------------------- syscalls

    def syscall(self, nr: int, args: Sequence[int] = ()) -> int:
        """Run system call ``nr`` in the thread (at the gadget); its result.

        The gadget's ``ret`` pops the frame's first word, ``__restore_rt``:
        without the agent the thread would go on into rt_sigreturn.
        """
        regs = self._regs(self.gadgets.syscall_ret, self.frame.address)
        regs.rax = nr
        for reg, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, reg, value & _MASK64)
        self._enter(regs)
        _hook("syscall_set")
        t = self.thread
        t.resume(0, syscall=True)
        after = self.gadgets.syscall_ret + arch.current().SYSCALL_INSN_LEN
        entered = False
        while True:
            st = self._wait_stop(None)
            if st.is_syscall_stop:
                now = t.getregs()
                self._note_restart_block(now)
                if now.rip == after:
                    if entered:
                        _hook("syscall_exit")
                        return signed(now.rax)
                    entered = True
            t.resume(0, syscall=True)

    # ------------------------------------------------------------------ stub

    def run(self, entry: int, marker: int, regs_values: Dict[str, int],
            watch: Optional[Callable[[], None]] = None) -> None:
        """Run the stub from ``entry`` until it reaches its rt_sigreturn at
        ``marker``; ``regs_values`` sets the registers it reads (rbx is set
        to the frame's ucontext here).

        ``watch`` is called about every WATCH_INTERVAL while the call runs; it may
        raise :class:`LeaveCall` (then ``self.left`` is set and the thread
        is in our code, running, or stopped at a syscall stop it may be
        detached from: see the class docstring) but nothing ends the call
        itself.
        """
        regs = self._regs(entry, self.frame.stack)
        regs.rbx = self.frame.uc
        for name, value in regs_values.items():
            setattr(regs, name, value & _MASK64)
        self._enter(regs)
        _hook("stub_set")
        t = self.thread
        t.resume(0, syscall=True)
        first = True
        while True:
            st = self._wait_stop(watch)
            if st.is_syscall_stop:
                now = t.getregs()
                if now.rip == marker and signed(now.orig_rax) == arch.current().SYSCALLS["rt_sigreturn"]:
                    _hook("marker")
                    return
                self._note_restart_block(now)
                if first:
                    first = False
                    _hook("in_call")
                # A busy call (a GIL wait polls futex every 5 ms) is watched
                # here too; leaving at a stop lets the caller detach at once.
                self._watch(watch)
            t.resume(0, syscall=True)

    def _note_restart_block(self, regs) -> None:
        """Remember a system call of ours that changed the restart block."""
        a = arch.current()
        if (signed(regs.orig_rax) in a.RESTART_BLOCK_WRITERS
                or signed(regs.rax) == -a.ERESTART_RESTARTBLOCK):
            self.restart_block_touched = True

    def _watch(self, watch: Optional[Callable[[], None]], force: bool = False) -> None:
        now = time.monotonic()
        if watch is not None and (force or now >= self._next_watch):
            self._next_watch = now + WATCH_INTERVAL
            try:
                watch()
            except LeaveCall:
                self.left = True
                raise

    def _wait_stop(self, watch: Optional[Callable[[], None]]):
        """The next stop of the thread running our code, handling the ones
        that are not ours to act on: SIGSTOP is passed on, a group-stop is
        resumed (our call goes on inside the stopped process), a fault
        raises target_fault.  Never times out; ``watch`` may leave while
        the thread runs (see run() for the stops in between)."""
        t = self.thread
        while True:
            try:
                st = t.wait(time.monotonic() + WATCH_INTERVAL)
            except PtraceError as exc:
                if exc.reason != "timeout":
                    raise
                self._watch(watch, force=True)
                continue
            if st.is_syscall_stop:
                return st
            if st.is_signal_delivery:
                if st.stopsig in FAULT_SIGNALS and t.siginfo().si_code > 0:
                    now = t.getregs()
                    raise PtraceError("target_fault", "pid=%d reason=target_fault: %s at %#x while "
                                      "running injected code" % (t.tid, signal.Signals(st.stopsig).name,
                                                                 now.rip))
                # SIGSTOP (the group-stop happens) or a fault signal someone
                # sent: delivered now, with its siginfo.
                t.resume(st.stopsig, syscall=True)
                continue
            # A group-stop (or a stray event stop): keep running our code.
            t.resume(0, syscall=True)

    # ------------------------------------------------------ the stub mapping

    def map_stub(self) -> int:
        """mmap the stub (read+write), write its code, mprotect the code page
        read+execute; the mapping's address."""
        nr = arch.current().SYSCALLS
        addr = self.syscall(nr["mmap"], (0, stub.MAPPING_SIZE, stub.PROT_READ | stub.PROT_WRITE,
                                         stub.MAP_PRIVATE | stub.MAP_ANONYMOUS, -1, 0))
        if -4096 < addr < 0:
            raise PtraceError("ptrace_failed", "pid=%d reason=ptrace_failed: mmap in the target failed: %s"
                              % (self.thread.tid, os.strerror(-addr)))
        self.thread.write(addr, stub.CODE)
        ret = self.syscall(nr["mprotect"], (addr, stub.CODE_PAGES * stub.PAGE_SIZE,
                                            stub.PROT_READ | stub.PROT_EXEC))
        if ret != 0:
            self.syscall(nr["munmap"], (addr, stub.MAPPING_SIZE))
            raise PtraceError("ptrace_failed", "pid=%d reason=ptrace_failed: mprotect in the target "
                              "failed: %s" % (self.thread.tid, os.strerror(-ret)))
        return addr

    def unmap_stub(self, addr: int) -> None:
        ret = self.syscall(arch.current().SYSCALLS["munmap"], (addr, stub.MAPPING_SIZE))
        if ret != 0:
            raise PtraceError("ptrace_failed", "pid=%d reason=ptrace_failed: munmap in the target "
                              "failed: %s" % (self.thread.tid, os.strerror(-ret)))

    # --------------------------------------------------------------- release

    def release(self) -> None:
        """Put the thread back as it was (see the module docstring).

        Safe to call after any failure short of :class:`LeaveCall`; a no-op
        before hold() or after the process is gone.
        """
        if self.saved is None or self.left:
            return
        t = self.thread
        if not t.attached:
            return
        st = t.last_status
        if not (t.stopped and st is not None and st.is_event_stop):
            if t.stopped and st is not None and st.is_syscall_stop:
                now = t.getregs()
                now.orig_rax = _MASK64      # skip the system call we stand at
                t.setregs(now)
            # From a syscall stop or a fault's signal-delivery-stop (the
            # fault is suppressed), on to an interrupt stop inside the
            # kernel's signal-exit path, where restored registers are
            # handled as they would have been without us.
            t.request_interrupt()
            t.resume(0)
            t.wait_event_stop(time.monotonic() + RELEASE_STOP_TIMEOUT)
        _hook("release_stop")
        if self.saved_xstate is not None:
            t.set_xstate(self.saved_xstate)
        if self._masked:
            t.setsigmask(self.saved_mask)
            self._masked = False
        t.setregs(self._restored_registers())
        _hook("restored")
        if self._stack_backup is not None:
            addr, data = self._stack_backup
            t.write(addr, data)
            self._stack_backup = None
        self.saved = None

    def _restored_registers(self):
        """The saved registers, with an ERESTART_RESTARTBLOCK call handed
        back as ERESTARTNOHAND if our code touched the restart block (a
        thread already in restart_syscall keeps it: its call is unknown)."""
        a = arch.current()
        nr = signed(self.saved.orig_rax)
        if (not self.restart_block_touched or nr < 0 or nr == a.SYSCALLS["restart_syscall"]
                or signed(self.saved.rax) != -a.ERESTART_RESTARTBLOCK):
            return self.saved
        regs = copy_regs(self.saved)
        regs.rax = -a.ERESTARTNOHAND & _MASK64
        return regs


def locate_gadgets(pid: int, maps) -> Gadgets:
    """Find ``syscall; ret`` and ``__restore_rt`` in the process's executable
    file mappings, the C library first (read from its memory: what it runs).

    Offsets are cached per mapped file (device, inode, offset, size).
    """
    from perfagent.target import memory
    candidates = [m for m in maps if m.perms.startswith("r") and "x" in m.perms and m.path.startswith("/")]
    candidates.sort(key=lambda m: 0 if _is_libc(m.path) else 1)
    syscall_ret = restorer = None
    for m in candidates:
        key = (m.dev_major, m.dev_minor, m.inode, m.pgoff, m.end - m.start)
        hit = _GADGET_CACHE.get(key)
        if hit is None:
            text = memory.read(pid, m.start, min(m.end - m.start, MAX_TEXT_SCAN))
            hit = stub.find_gadgets(text)
            if len(_GADGET_CACHE) > 256:
                _GADGET_CACHE.clear()
            _GADGET_CACHE[key] = hit
        if syscall_ret is None and hit[0] is not None:
            syscall_ret = m.start + hit[0]
        if restorer is None and hit[1] is not None:
            restorer = m.start + hit[1]
        if syscall_ret is not None and restorer is not None:
            return Gadgets(syscall_ret, restorer)
    raise PtraceError("unsupported_arch", "pid=%d reason=unsupported_arch: no `syscall; ret` and "
                      "__restore_rt in the process's code (not a glibc or musl program?)" % pid)


#: Largest executable mapping scanned for gadgets.
MAX_TEXT_SCAN = 64 << 20
_GADGET_CACHE: Dict[Tuple[int, int, int, int, int], Tuple[Optional[int], Optional[int]]] = {}


def _is_libc(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith(("libc.so", "libc-", "ld-musl", "libc.musl"))


__all__ = ["RemoteCaller", "Gadgets", "LeaveCall", "locate_gadgets", "in_syscall", "waiting_in_syscall",
           "interrupted_syscall", "temporary_sigmask", "BLOCK_ALL", "TEST_HOOK"]
