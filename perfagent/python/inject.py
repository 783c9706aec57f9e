"""Switch CPython's perf trampoline on or off in a running process.

The target's main thread is seized and interrupted, then made to call::

    state = PyGILState_Ensure();
    PyRun_SimpleString("__import__('sys').activate_stack_trampoline('perf')");
    PyGILState_Release(state);

(:mod:`perfagent.ptrace.call` explains how a call is made and how an
interrupted system call is resumed), after which its registers and stack
bytes are put back and it is detached.  The statement uses ``__import__``
rather than ``import sys`` because PyRun_SimpleString runs in ``__main__``'s
namespace and ``import sys`` would bind (or rebind) a global there.

Choosing the moment: code that the interrupted thread was running may hold
a non-reentrant lock (the GIL's own mutex while it signals a condition
variable, malloc's arena lock, the perf map's lock) or be half-way through
updating allocator lists, and our call takes the GIL and allocates.  So
the thread is interrupted, and let go again for half a millisecond, until
it is stopped at a *safe point*:

* executing the eval loop itself (``_PyEval_EvalFrameDefault``, not a
  callee): it holds the GIL between bytecodes or C calls, and
  PyGILState_Ensure is then a no-op; or
* blocked in a waiting system call (futex wait, sleep, poll/select, read
  ...: see ``BLOCKING_SYSCALLS`` in the arch module) *and* none of its
  innermost frames, unwound with the DWARF walker, is a function that holds
  or waits for a lock our call needs (``take_gil``/``drop_gil`` -- a thread
  parked in the GIL's condition variable is a registered waiter that
  glibc makes the next signaller wait for --, the perf-map writer: see
  ``UNSAFE_FRAME_SYMBOLS`` in detect.py).  Typically: time.sleep, I/O,
  Event.wait, with the GIL released.

A thread never seen at one within the timeout gives ``timeout``.

Known limits: a call that times out after PyGILState_Ensure got the GIL
leaves the GIL taken when the registers are restored (the target then
stalls as it would under a debugger); a signal suppressed while our code
runs can make the kernel reuse the thread's restart block, so an
interrupted *relative-timeout* call restarted via restart_syscall may
return EINTR instead (CPython retries those, PEP 475); a Python-level
signal handler that was already pending runs inside our statement.

Failures raise :class:`~perfagent.python.detect.InjectionSkip` (nothing was
done: ``not_python``, ``python_too_old``, ``no_perf_trampoline``,
``no_libpython_symbols``, ``process_gone``, ``ptrace_eperm``,
``process_stopped``, ``unsupported_arch``) or
:class:`InjectionError` (``timeout``, ``python_error``, ``target_fault``,
``ptrace_failed``); both carry ``reason`` and ``pid`` and print as
``pid=N reason=R: details``.  In every case the thread has been restored
and detached before the exception leaves (or the process is gone).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from perfagent import arch
from perfagent.errors import CaptureError
from perfagent.ptrace import binding as B
from perfagent.ptrace.call import RemoteCaller, waiting_in_syscall
from perfagent.ptrace.stack import unwind
from perfagent.symbolize.procmaps import AddressSpace
from perfagent.ptrace.thread import PTRACE_EPERM_HINT, PtraceError, TracedThread, tracer_pid
from perfagent.python.detect import InjectionSkip, PythonTarget, detect

log = logging.getLogger("perfagent.python")

ACTIVATE_CODE = "__import__('sys').activate_stack_trampoline('perf')"
DEACTIVATE_CODE = "__import__('sys').deactivate_stack_trampoline()"

#: Pause between two interrupts while looking for a safe point.
SAFE_POINT_RETRY = 0.0005
#: Upper bound on the time to stop a thread that is running our call after a
#: timeout, so it can be restored.
_RESTORE_STOP_TIMEOUT = 2.0


class InjectionError(CaptureError):
    """The injection was attempted and failed; the target was restored.

    ``reason``: ``timeout`` (the thread did not stop, or a call -- usually
    PyGILState_Ensure waiting for a GIL that is never released -- did not
    return in time), ``python_error`` (the statement raised; the target
    printed the traceback on its stderr), ``target_fault`` (the call
    crashed in the target), ``ptrace_failed``.
    """

    def __init__(self, reason: str, message: str, pid: int = 0) -> None:
        super().__init__("pid=%d reason=%s: %s" % (pid, reason, message))
        self.reason = reason
        self.pid = pid


def _convert(exc: PtraceError, pid: int) -> CaptureError:
    msg = str(exc)
    prefix = "pid=%d reason=%s: " % (pid, exc.reason)
    if msg.startswith(prefix):
        msg = msg[len(prefix):]
    if exc.reason == "ptrace_eperm":
        if PTRACE_EPERM_HINT not in msg:
            msg += " (%s)" % PTRACE_EPERM_HINT
        return InjectionSkip("ptrace_eperm", msg, pid)
    if exc.reason == "process_gone":
        return InjectionSkip("process_gone", msg, pid)
    return InjectionError(exc.reason, msg, pid)


def _c_int(value: int) -> int:
    value &= 0xffffffff
    return value - (1 << 32) if value >= (1 << 31) else value


#: Innermost frames examined for UNSAFE_FRAME_SYMBOLS functions.
UNSAFE_FRAMES = 16


def _at_safe_point(thread: TracedThread, target: PythonTarget, regs) -> bool:
    ip = getattr(regs, arch.current().REG_IP)
    if target.eval_loop is not None and target.eval_loop[0] <= ip < target.eval_loop[1]:
        return True
    if not waiting_in_syscall(regs):
        return False
    space = AddressSpace.from_pid(thread.tgid)
    pcs = unwind(thread, regs, space)
    # The walk must get out of the C library (where the futex/cond-wait
    # frames are) to tell who is waiting; otherwise it is unknown.
    outside_libc = False
    for pc in pcs[1:]:
        entry = space.find(pc - 1)
        if entry is not None and not os.path.basename(entry.path).startswith(("libc.so", "libc-", "libpthread")):
            outside_libc = True
            break
    if not outside_libc:
        return False
    for i, pc in enumerate(pcs[:UNSAFE_FRAMES]):
        pc = pc if i == 0 else pc - 1  # a return address follows its call
        for start, end in target.unsafe_ranges:
            if start <= pc < end:
                return False
    return True


def _stop_at_safe_point(thread: TracedThread, target: PythonTarget, deadline: float) -> int:
    """Interrupt the thread until it stops at a safe point; the attempts made.

    Between attempts the thread runs freely (its signals delivered as
    usual) for :data:`SAFE_POINT_RETRY` seconds.
    """
    attempts = 1
    st = thread.interrupt(max(deadline - time.monotonic(), 0.001))
    if st.is_group_stop:
        # Stopped by SIGSTOP/SIGTSTP: running our call would resume this
        # thread inside a stopped process, and another (stopped) thread may
        # hold the GIL.  Leave it as it is; detaching keeps it stopped.
        raise InjectionSkip("process_stopped", "the process is stopped (%s); send SIGCONT first"
                            % B.signal_name(st.stopsig), thread.tid)
    while not _at_safe_point(thread, target, thread.getregs()):
        if time.monotonic() >= deadline:
            raise PtraceError("timeout", "pid=%d reason=timeout: the main thread was never seen "
                              "at a safe point (blocked in a system call or in the eval loop)"
                              % thread.tid)
        thread.resume(0)
        time.sleep(SAFE_POINT_RETRY)
        st = thread.interrupt(max(deadline - time.monotonic(), 0.001))
        if st.is_group_stop:
            raise InjectionSkip("process_stopped", "the process was stopped (%s)"
                                % B.signal_name(st.stopsig), thread.tid)
        attempts += 1
    return attempts


def run_statement(target: PythonTarget, code: str, timeout: float) -> None:
    """Run one Python statement in the target's main thread, via ptrace."""
    pid = target.pid
    if arch.current().USER_REGS_FIELDS is None:
        raise InjectionSkip("unsupported_arch", "remote calls are not implemented on %s"
                            % arch.current().NAME, pid)
    start = time.monotonic()
    deadline = start + timeout
    thread = TracedThread(pid)
    caller: Optional[RemoteCaller] = None
    error: Optional[BaseException] = None
    try:
        try:
            other = tracer_pid(pid)
        except OSError:
            other = 0
        if other and other != os.getpid():
            # PTRACE_SEIZE would fail with EPERM; say why instead.
            raise InjectionSkip("ptrace_eperm", "already traced by pid %d (a debugger?)" % other, pid)
        thread.seize()
        attempts = _stop_at_safe_point(thread, target, deadline)
        log.debug("pid=%d safe point after %d interrupt(s)", pid, attempts)
        caller = RemoteCaller(thread)
        caller.begin()
        payload = caller.push(code.encode("utf-8") + b"\0")
        sym = target.symbols
        state = _c_int(caller.call(sym["PyGILState_Ensure"], (), deadline, "PyGILState_Ensure"))
        rc = _c_int(caller.call(sym["PyRun_SimpleString"], (payload,), deadline, "PyRun_SimpleString"))
        caller.call(sym["PyGILState_Release"], (state,), deadline, "PyGILState_Release")
        if rc != 0:
            raise InjectionError("python_error", "PyRun_SimpleString(%r) returned %d" % (code, rc), pid)
    except PtraceError as exc:
        error = _convert(exc, pid)
    except BaseException as exc:  # KeyboardInterrupt too: restore first
        error = exc
    finally:
        try:
            if caller is not None and thread.attached:
                caller.restore()
        except PtraceError as exc:
            if error is None and exc.reason != "process_gone":
                error = _convert(exc, pid)
        finally:
            try:
                thread.detach()
            except PtraceError as exc:
                if error is None and exc.reason != "process_gone":
                    error = _convert(exc, pid)
    if error is not None:
        if isinstance(error, InjectionError) and error.reason == "timeout":
            log.debug("%s (after %.3fs)", error, time.monotonic() - start)
        raise error


def _run(pid: int, code: str, timeout: float) -> float:
    start = time.monotonic()
    target = detect(pid)
    remaining = timeout - (time.monotonic() - start)
    if remaining <= 0:
        raise InjectionError("timeout", "detection took longer than %.1fs" % timeout, pid)
    run_statement(target, code, remaining)
    return time.monotonic() - start


def activate(pid: int, timeout: float = 5.0) -> float:
    """Turn on the perf trampoline in CPython process ``pid``.

    Returns the elapsed seconds (detection + injection).  The target then
    appends ``py::`` entries to /tmp/perf-PID.map as it calls Python
    functions not yet compiled into trampolines.  Idempotent.  Raises
    InjectionSkip or InjectionError (see the module docstring); a caller in
    lenient mode logs ``str(exc)`` and goes on, in strict mode aborts.
    """
    return _run(pid, ACTIVATE_CODE, timeout)


def deactivate(pid: int, timeout: float = 5.0) -> float:
    """Turn the perf trampoline off again (also if it came from -X perf).

    A target that exited meanwhile gives InjectionSkip("process_gone"),
    which callers treat as harmless.
    """
    return _run(pid, DEACTIVATE_CODE, timeout)
