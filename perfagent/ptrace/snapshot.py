"""A copy of one thread's registers and stack, taken in a stop of tens of microseconds.

``perf-agent dump`` unwinds every thread's native stack, which needs the
registers and the stack bytes *of one moment*.  This module takes them:

    PTRACE_SEIZE          trace without stopping and without a SIGSTOP
    PTRACE_INTERRUPT      ask for a stop; sleep until its SIGCHLD (a deadline)
    PTRACE_GETREGSET      the general-purpose registers
    process_vm_readv      up to ``stack_bytes`` from the stack pointer up
    (``while_stopped``)   whatever else the caller must read at that moment
    PTRACE_DETACH         the thread runs again, untraced

one thread at a time: only the thread being copied is ever stopped, for
the time of those few system calls, and every other thread keeps running.
The unwinding and naming happen afterwards, with every thread running.
From the interrupt to the detach the agent runs at nice -20 when it may
(root, CAP_SYS_NICE), so that a busy machine does not preempt it while it
holds a thread; its priority is restored right after.

Signals.  A stop for PTRACE_INTERRUPT consumes no signal: one that arrives
while the thread is held stays pending and is delivered when PTRACE_DETACH
lets it run.  A signal that reaches the thread between PTRACE_SEIZE and the
interrupt's stop shows up as a signal-delivery-stop first; it is passed on
with the PTRACE_CONT that resumes from that stop (:func:`interrupt`), so the
thread handles it exactly once, and then stops for the interrupt.  A
group-stop (SIGSTOP, SIGTSTP...) that begins meanwhile is reported as the
stop instead; PTRACE_DETACH then leaves the thread in the group-stop, as the
signal asked.  Nothing is ever sent with kill/tgkill and nothing is written.

A thread that does not stop before the deadline (it entered an
uninterruptible sleep after the caller looked) cannot be detached until it
stops: it is kept in :data:`LATE` and :func:`release_late` detaches it when
it has stopped; whatever is still attached when the agent exits is detached
by the kernel (exit_ptrace), pending interrupt included.

Test hooks (environment, milliseconds): ``PERFAGENT_DUMP_HOLD_MS`` keeps each
thread stopped that much longer, ``PERFAGENT_DUMP_SEIZE_MS`` waits that long
between PTRACE_SEIZE and PTRACE_INTERRUPT (traced but running), so that a
test can send signals into either window.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, List, Optional, Tuple

from perfagent.records import NamedTuple
from perfagent import arch
from perfagent.errors import CaptureError
from perfagent.ptrace import binding as B
from perfagent.ptrace.thread import PtraceError, TracedThread
from perfagent.target import memory

#: Default bytes of stack copied from the stack pointer up.
STACK_BYTES = 64 * 1024
#: How long to wait for a thread to reach the interrupt's stop.  A running or
#: sleeping thread stops in microseconds once it has a CPU (on a loaded
#: machine that can take tens of milliseconds, during which it is not
#: stopped, only waiting to run); one that takes longer is in an
#: uninterruptible sleep, and waiting for it would only delay the others.
STOP_TIMEOUT = 1.0
#: Longest sleep between two looks for the stop (see :func:`_wait_stop`).  A
#: thread still on its way to the stop is usually waiting for a CPU; a poll
#: this sparse costs it next to nothing.
WAIT_SLICE = 0.00025
#: Test hooks: extra milliseconds each thread is held stopped / traced but running.
HOLD_ENV = "PERFAGENT_DUMP_HOLD_MS"
SEIZE_ENV = "PERFAGENT_DUMP_SEIZE_MS"

#: Signals the agent defers while it holds a thread, so that Ctrl-C cannot
#: land between the stop and the detach (it is handled right after).
_DEFERRED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
_SIGCHLD_SET = {signal.SIGCHLD}
_HAS_SIGTIMEDWAIT = hasattr(signal, "sigtimedwait")

#: Threads whose interrupt stop did not come in time: attached, not stopped.
LATE: List[TracedThread] = []


class Snapshot(NamedTuple):
    """Registers and stack of one thread at one moment."""

    tid: int
    regs: Tuple[int, ...]   # the walker's order: bx, bp, sp, ip, r12, r13, r14, r15
    stack: bytes            # from regs sp upward (shorter at the end of the stack mapping)
    wait_ns: int            # PTRACE_INTERRUPT sent -> the stop seen (the thread gets there)
    held_ns: int            # the stop seen -> PTRACE_DETACH returned (the thread is held)
    group_stop: bool        # the stop was a group-stop (the thread stays stopped)
    extra: object           # what ``while_stopped`` returned (None without one)


class SnapshotError(CaptureError):
    """No snapshot of this thread; ``reason`` is one of PtraceError's reasons
    (ptrace_eperm, process_gone, timeout, ptrace_failed) or ``unsupported``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def walker_regs(regs) -> Tuple[int, ...]:
    """The registers the DWARF walker takes, from a user_regs_struct (x86-64)."""
    return (regs.rbx, regs.rbp, regs.rsp, regs.rip, regs.r12, regs.r13, regs.r14, regs.r15)


def supported() -> bool:
    """Native snapshots need the register layout (and the walker: x86-64)."""
    return arch.current().NAME == "x86_64" and arch.current().USER_REGS_FIELDS is not None


def _hook_seconds(name: str) -> float:
    try:
        return max(0.0, float(os.environ.get(name, "0"))) / 1000.0
    except ValueError:
        return 0.0


def snapshot(tgid: int, tid: int, stack_bytes: int = STACK_BYTES,
             stack_end: Optional[Callable[[int], int]] = None,
             while_stopped: Optional[Callable[[], object]] = None,
             timeout: float = STOP_TIMEOUT) -> Snapshot:
    """Stop thread ``tid`` of process ``tgid``, copy its registers and stack, let it go.

    ``stack_end(sp)``: the end of the mapping that holds the stack pointer
    (0: unknown), so the copy does not run into the next mapping.  ``while_stopped`` is
    called while the thread is held (keep it short); its result is
    :attr:`Snapshot.extra` and its exceptions propagate after the detach.
    Raises :class:`SnapshotError`; the thread is running (or back in its
    group-stop) whenever this returns or raises, except for a thread that
    did not stop in time, which is left in :data:`LATE`.
    """
    if not supported():
        raise SnapshotError("unsupported", "native stacks are only read on x86-64")
    t = TracedThread(tgid, tid)
    hold = _hook_seconds(HOLD_ENV)
    seized_wait = _hook_seconds(SEIZE_ENV)
    # Block Ctrl-C and friends between the stop and the detach (restored
    # before returning: a pending one is raised then).
    masked = _block(_DEFERRED)
    nice = _raise_priority()
    try:
        try:
            t.seize()
        except PtraceError as exc:
            raise SnapshotError(exc.reason, str(exc)) from None
        late = False
        try:
            if seized_wait:
                time.sleep(seized_wait)
            asked = time.monotonic_ns()
            try:
                status = interrupt(t, timeout)
            except PtraceError as exc:
                late = exc.reason == "timeout"
                if late:
                    LATE.append(t)   # a thread that is not stopped cannot be detached
                raise SnapshotError(exc.reason, str(exc)) from None
            start = time.monotonic_ns()
            try:
                regs = walker_regs(t.getregs())
                sp = regs[2]
                end = stack_end(sp) if stack_end is not None else 0
                size = stack_bytes if end <= sp else min(stack_bytes, end - sp)
                stack = memory.read(tgid, sp, size) if size > 0 else b""
                extra = while_stopped() if while_stopped is not None else None
                if hold:
                    time.sleep(hold)
            except PtraceError as exc:
                raise SnapshotError(exc.reason, str(exc)) from None
            except OSError as exc:
                raise SnapshotError("process_gone", "reading thread %d: %s" % (tid, exc)) from None
        finally:
            if not late:
                _detach_quietly(t)
        held = time.monotonic_ns() - start
        return Snapshot(tid, regs, stack, start - asked, held, status.is_group_stop, extra)
    finally:
        _restore_priority(nice)
        _restore_signals(masked)


def interrupt(t: TracedThread, timeout: float) -> B.WaitStatus:
    """PTRACE_INTERRUPT and wait for the stop, as ``TracedThread.interrupt`` but with a tight wait.

    The thread is held from the moment it stops until we see the stop, so
    the wait must notice it at once without taking the CPU it needs to get
    there: it sleeps in sigtimedwait until the SIGCHLD the stop sends us
    (a poll every :data:`WAIT_SLICE` at worst), never in a fixed sleep.
    Signal-delivery-stops met on the way are passed on with the PTRACE_CONT
    that resumes them (the thread handles the signal once, then stops for
    the interrupt); a group-stop is returned as the stop.
    """
    masked = _block(_SIGCHLD_SET)  # sigtimedwait takes it only while it is blocked
    try:
        t.request_interrupt()
        return t.wait_event_stop(time.monotonic() + timeout, _sleep_until_child_event)
    finally:
        _restore_signals(masked)


def _sleep_until_child_event(seconds: float) -> None:
    # A stop of a tracee sends its tracer SIGCHLD (do_notify_parent_cldstop),
    # which the caller keeps blocked: sigtimedwait sleeps until then.  The
    # WAIT_SLICE cap covers a SIGCHLD that was already pending, merged with
    # ours, or taken by another thread of a program that embeds the agent
    # (then this is a WAIT_SLICE poll).
    seconds = min(seconds, WAIT_SLICE)
    if _HAS_SIGTIMEDWAIT:
        signal.sigtimedwait(_SIGCHLD_SET, seconds)
    else:
        time.sleep(min(seconds, 50e-6))


def _detach_quietly(t: TracedThread) -> None:
    try:
        t.detach()
    except PtraceError:
        pass  # gone meanwhile; anything else is released when the agent exits


def release_late(timeout: float = 1.0) -> List[int]:
    """Detach the threads that stopped late; the tids still not stopped.

    Each gets what is left of ``timeout`` to reach its stop.
    """
    deadline = time.monotonic() + timeout
    left: List[TracedThread] = []
    for t in LATE:
        try:
            t.wait(deadline)
        except PtraceError as exc:
            if exc.reason == "timeout":
                left.append(t)
            continue
        _detach_quietly(t)
    LATE[:] = left
    return [t.tid for t in left]


def _raise_priority():
    try:
        old = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, -20)
        return old
    except OSError:
        return None


def _restore_priority(old) -> None:
    if old is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, old)
        except OSError:
            pass


def _block(signals):
    """Block ``signals`` in this thread; the previous mask (None when not possible)."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    try:
        return signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    except (OSError, ValueError):
        return None


def _restore_signals(old) -> None:
    if old is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
