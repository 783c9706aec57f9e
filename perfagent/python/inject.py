"""Switch CPython's perf trampoline on or off in a running process.

The statement ``__import__('sys').activate_stack_trampoline('perf')`` (or
``deactivate_stack_trampoline()``) is run in the target's main thread.  It
uses ``__import__`` rather than ``import sys`` because PyRun_SimpleString
runs in ``__main__``'s namespace and ``import sys`` would bind (or rebind)
a global there.

**CPython 3.14+** first gets the statement through the interpreter's own
safe point, PEP 768 (perfagent.python.remote_debug): a script file in the
target's root, its path and a pending flag written into the main thread's
``_PyRemoteDebuggerSupport``, the eval-breaker bit set; the interpreter
runs it between two bytecodes and the script removes its file.  No ptrace.
When remote debugging is disabled, another debugger's script is pending,
or the main thread does not take it in time (blocked in a system call),
the request is withdrawn and ptrace is used as for 3.12 and 3.13.

**How the thread is borrowed** (perfagent.ptrace.call, .stub): the main
thread is seized (PTRACE_SEIZE) and interrupted; at a safe point (below)
its state is saved into a signal frame on its own stack, a two-page stub
(code + slots) is mapped in the target once per :class:`Session` (remote
mmap/mprotect at a ``syscall; ret`` of the C library), the stub runs, and
the thread's registers, FPU state and signal mask are put back.  Every
register set the thread is given returns through ``rt_sigreturn`` on that
frame by itself, so **if the agent dies at any moment** (SIGKILL
included), the thread finishes what it was running, returns to exactly
where it was and re-executes its interrupted system call; what is left
behind is the stub mapping (two anonymous pages) and, if the statement had
started, the statement's effect (an active trampoline).  **Signals** sent
meanwhile stay queued in the kernel with their siginfo (every blockable
signal but the fault signals is blocked while our code runs) and are
delivered once the mask is back, exactly once.

**Safe points.**  Our code takes the GIL and runs Python: it must not run
on top of code that holds a lock it needs or has an object half updated
(a reference count loaded but not yet stored, a frame half built).  An
arbitrary instruction of the eval loop is such a point.  Two kinds of
point are safe, each with its own way in:

* *direct* -- the thread is blocked in a waiting system call (futex wait,
  sleep, poll/select, read ... : ``BLOCKING_SYSCALLS`` in the arch module)
  and none of its innermost frames, unwound with the DWARF walker, is a
  function that holds or waits for a lock our call needs (``take_gil``,
  the perf-map writer, finalization: ``UNSAFE_FRAME_SYMBOLS`` in detect.py).
  Typically time.sleep, I/O, Event.wait, with the GIL released.  The stub
  calls ``PyGILState_Ensure(); PyRun_SimpleString(text);
  PyGILState_Release()`` right there.
* *pending* -- the thread runs (Python code, or C code such as a long
  ``sum(range(n))``), or is blocked waiting for the GIL.  It is
  interrupted wherever it is, and made to call only
  ``Py_AddPendingCall(stub_function, slot)``, which touches no Python
  object (a lock-protected queue and an atomic eval-breaker bit; CPython
  itself called it from signal handlers up to 3.8), unless a frame
  anywhere on its stack holds the pending-calls lock or tears the
  interpreter down (``PENDING_UNSAFE_SYMBOLS``, checked for both kinds).  Its registers are put back at once and
  the interpreter runs the stub function at its next eval-breaker check --
  between two bytecodes, holding the GIL, where it runs signal handlers:
  the interpreter's own safe point, with no breakpoint and no stop.  A
  thread in C that never checks the eval breaker runs it when it returns
  to the eval loop.

A thread never seen at either within the timeout gives ``timeout``.

**Deadlines** bound the search for a safe point, never a call in progress:
a started call (PyGILState_Ensure waiting for a GIL another thread holds,
the statement running, a queued pending call) always runs to completion.
The agent watches it for at most ``call_timeout`` seconds; after that (or
on Ctrl-C) it stops watching -- the call goes on and returns by itself as
above -- and sets the slot's *cancel* word, so that a statement that has
not started yet is skipped (PyGILState_Release still runs).  The result is
``timeout``; ``InjectionError.may_have_run`` says whether the statement may
still take effect.  The stub mapping is unmapped (remote munmap) when the
session finishes, if no call of ours can still use it; otherwise it is
left in place, the only thing left behind.

Known limits: a Python-level signal handler that was already pending runs
inside our statement (direct path).  A thread borrowed in a relative sleep
or timed wait (ERESTART_RESTARTBLOCK) whose restart block our call touched
(a wait of ours interrupted by SIGSTOP or a cgroup freeze), or that the
agent left or lost mid-call, waits its whole timeout again instead of the
rest of it (perfagent.ptrace.call); one already inside restart_syscall
may then see EINTR (CPython retries those, PEP 475).

Failures raise :class:`~perfagent.python.detect.InjectionSkip` (nothing was
done: ``not_python``, ``python_too_old``, ``no_perf_trampoline``,
``no_libpython_symbols``, ``process_gone``, ``ptrace_eperm``,
``process_stopped``, ``unsupported_arch``) or :class:`InjectionError`
(``timeout``, ``python_error``, ``target_fault``, ``ptrace_failed``,
``detach_failed``); both carry ``reason`` and ``pid`` and print as
``pid=N reason=R: details``.  Every OSError of the machinery becomes one
of these.  In every case the thread has been restored (or is running a
call that restores itself) and is detached before the exception leaves.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from perfagent import arch
from perfagent.errors import CaptureError
from perfagent.ptrace import binding as B
from perfagent.ptrace import call as C
from perfagent.ptrace import stub as S
from perfagent.ptrace.call import (Gadgets, LeaveCall, RemoteCaller, in_syscall, locate_gadgets,
                                   temporary_sigmask, waiting_in_syscall)
from perfagent.ptrace.stack import unwind
from perfagent.ptrace.thread import PtraceError, TracedThread, eperm_hint, tracer_pid
from perfagent.python import remote_debug
from perfagent.python.detect import InjectionSkip, PythonTarget, detect
from perfagent.symbolize.procmaps import AddressSpace
from perfagent.target import memory, procfs

log = logging.getLogger("perfagent.python")

ACTIVATE_CODE = "__import__('sys').activate_stack_trampoline('perf')"
DEACTIVATE_CODE = "__import__('sys').deactivate_stack_trampoline()"

#: Pause between two interrupts while looking for a safe point.
SAFE_POINT_RETRY = 0.0005
#: Innermost frames examined for unsafe functions.
UNSAFE_FRAMES = 16
#: A pending call needs a stack unwound at least this deep: a CPython main
#: thread running Python is never shallower (_start, __libc_start_main,
#: main, Py_BytesMain, Py_RunMain, ..., _PyEval_EvalFrameDefault), so a
#: shorter walk means the unwind stopped early and the caller is unknown.
PENDING_MIN_FRAMES = 6
#: Polling interval while a pending call waits for the eval breaker.
PENDING_POLL = 0.001
#: How long to wait for the kernel to detach a thread whose tracing thread
#: ended (it happens as that thread exits: microseconds).
KERNEL_DETACH_WAIT = 2.0

#: Tests set this to a function called with a point name at each step
#: (in the thread that traces): to pause or kill the agent there.
TEST_HOOK: Optional[Callable[[str], None]] = None


def _hook(point: str) -> None:
    if TEST_HOOK is not None:
        TEST_HOOK(point)


class InjectionError(CaptureError):
    """The injection was attempted and failed; the target was restored.

    ``reason``: ``timeout`` (no safe point was found in time, or the agent
    stopped watching a call still in progress: see the module docstring),
    ``python_error`` (the statement raised; the target printed the
    traceback on its stderr), ``target_fault`` (the call crashed in the
    target), ``ptrace_failed``, ``detach_failed``.  ``may_have_run``: the
    statement may still take effect (it had started when the agent
    stopped watching).
    """

    def __init__(self, reason: str, message: str, pid: int = 0, may_have_run: bool = False) -> None:
        super().__init__("pid=%d reason=%s: %s" % (pid, reason, message))
        self.reason = reason
        self.pid = pid
        self.may_have_run = may_have_run


def as_injection_error(exc: BaseException, pid: int) -> CaptureError:
    """Any failure of the machinery as one InjectionSkip / InjectionError."""
    if isinstance(exc, (InjectionSkip, InjectionError)):
        return exc
    if isinstance(exc, PtraceError):
        msg = _strip_prefix(str(exc), pid, exc.reason)
        if exc.reason == "ptrace_eperm":
            # TracedThread's own message already names the cause (eperm_hint).
            return InjectionSkip("ptrace_eperm", msg, pid)
        if exc.reason in ("process_gone", "unsupported_arch"):
            return InjectionSkip(exc.reason, msg, pid)
        return InjectionError(exc.reason, msg, pid)
    if isinstance(exc, OSError):
        if exc.errno in (errno.ESRCH, errno.ENOENT) or isinstance(exc, ProcessLookupError):
            return InjectionSkip("process_gone", str(exc), pid)
        if exc.errno in (errno.EPERM, errno.EACCES):
            return InjectionSkip("ptrace_eperm", "%s (%s)" % (exc, eperm_hint(pid)), pid)
        return InjectionError("ptrace_failed", "%s: %s" % (type(exc).__name__, exc), pid)
    if isinstance(exc, CaptureError):
        return InjectionError("ptrace_failed", str(exc), pid)
    # A bug of ours: one line for the user, the traceback for a debug log.
    log.debug("pid=%d: unexpected error in the injection", pid, exc_info=exc)
    return InjectionError("ptrace_failed", "%s: %s" % (type(exc).__name__, exc), pid)


def _strip_prefix(msg: str, pid: int, reason: str) -> str:
    prefix = "pid=%d reason=%s: " % (pid, reason)
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _c_int(value: int) -> int:
    value &= 0xffffffff
    return value - (1 << 32) if value >= (1 << 31) else value


# ------------------------------------------------------------ safe points

def _in_ranges(pcs, ranges: List[Tuple[int, int]], limit: int = UNSAFE_FRAMES) -> bool:
    for i, pc in enumerate(pcs[:limit]):
        pc = pc if i == 0 else pc - 1  # a return address follows its call
        for start, end in ranges:
            if start <= pc < end:
                return True
    return False


def _out_of_libc(pcs, space: AddressSpace) -> bool:
    """Did the walk get out of the C library (where the futex/cond-wait
    frames are)?  Otherwise who is waiting is unknown."""
    for pc in pcs[1:]:
        entry = space.find(pc - 1)
        if entry is not None and not os.path.basename(entry.path).startswith(("libc.so", "libc-", "libpthread")):
            return True
    return False


def _classify(thread: TracedThread, target: PythonTarget, session: "Session", regs,
              space: AddressSpace, room: int) -> Optional[str]:
    """"direct", "pending" or None (not a safe point) for the stopped thread."""
    ip = regs.rip
    if session.page_contains(ip) or temporary_sigmask(regs):
        return None
    stack = space.find(regs.rsp)
    if stack is None or regs.rsp - room < stack.start:
        return None  # no room for the return frame in the mapping
    try:
        pcs = unwind(thread, regs, space)
    except Exception:  # an unwind that fails is "unknown", never an abort
        return None
    # Anywhere on the stack: our own stub (a call left running), the
    # pending-calls lock, finalization.
    if _in_ranges(pcs, target.pending_unsafe_ranges + session.page_ranges(), limit=len(pcs)):
        return None
    if waiting_in_syscall(regs) and _out_of_libc(pcs, space) and not _in_ranges(pcs, target.unsafe_ranges):
        return "direct"
    if target.pending_call is None or len(pcs) < PENDING_MIN_FRAMES:
        return None
    if in_syscall(regs) is not None and not _in_ranges(pcs, target.gil_wait_ranges):
        # Blocked elsewhere (in the kernel): the eval breaker may not be
        # checked for a long time; only a GIL waiter is about to run.
        return None
    return "pending"


def _stop_at_safe_point(thread: TracedThread, target: PythonTarget, session: "Session",
                        deadline: float, abort: threading.Event) -> Tuple[str, AddressSpace]:
    """Interrupt the thread until it stops at a safe point; which kind, and
    the address space seen then.

    Between attempts the thread runs freely (its signals delivered as
    usual) for :data:`SAFE_POINT_RETRY` seconds.
    """
    attempts = 0
    room = 0
    while True:
        attempts += 1
        try:
            st = thread.interrupt(max(deadline - time.monotonic(), 0.001))
        except PtraceError as exc:
            if exc.reason != "timeout":
                raise
            raise PtraceError("timeout", "pid=%d reason=timeout: the main thread did not stop when "
                              "interrupted (state %s: an uninterruptible or killable sleep)"
                              % (thread.tid, _thread_state(thread))) from None
        if st.is_group_stop:
            # Stopped by SIGSTOP/SIGTSTP: running our call would resume this
            # thread inside a stopped process, and another (stopped) thread
            # may hold the GIL.  Leave it as it is; detaching keeps it stopped.
            raise InjectionSkip("process_stopped", "the process is stopped (%s); send SIGCONT first"
                                % B.signal_name(st.stopsig), thread.tid)
        if not room:
            room = RemoteCaller.frame_bytes(session.xstate_size(thread))
        space = AddressSpace.from_pid(thread.tgid)
        kind = _classify(thread, target, session, thread.getregs(), space, room)
        if kind is not None:
            log.debug("pid=%d %s safe point after %d interrupt(s)", thread.tid, kind, attempts)
            return kind, space
        if time.monotonic() >= deadline or abort.is_set():
            raise PtraceError("timeout", "pid=%d reason=timeout: the main thread was never seen at a "
                              "safe point (blocked in a system call with the GIL released, or running "
                              "where a pending call can be queued) in %d attempts" % (thread.tid, attempts))
        thread.resume(0)
        time.sleep(SAFE_POINT_RETRY)


# -------------------------------------------------------------- sessions

class Session:
    """What the agent keeps about one process between injections: the stub
    mapping, the gadgets, and the slots a call may still use.

    :meth:`run` runs a statement; :meth:`finish` unmaps the stub if nothing
    can use it any more.  One session per process; not thread-safe.
    """

    def __init__(self, target: PythonTarget) -> None:
        self.target = target
        self.pid = target.pid
        self.page: Optional[int] = None
        self.gadgets: Optional[Gadgets] = None
        self._xstate_size: Optional[int] = None
        self._next_slot = 0
        #: slot address -> the phase that means "done with the page".
        self.outstanding: Dict[int, int] = {}
        #: The stub mapping could not be unmapped (a call may still use it).
        self.left_behind = False

    # ---- the stub mapping

    def page_ranges(self) -> List[Tuple[int, int]]:
        return [(self.page, self.page + S.MAPPING_SIZE)] if self.page is not None else []

    def page_contains(self, addr: int) -> bool:
        return self.page is not None and self.page <= addr < self.page + S.MAPPING_SIZE

    def xstate_size(self, thread: TracedThread) -> int:
        """Bytes of the thread's FP state (for the stack room a frame needs)."""
        if self._xstate_size is None:
            state = thread.get_xstate()
            self._xstate_size = len(state[1]) if state is not None else arch.current().XSTATE_NOTES[0][1]
        return self._xstate_size

    def _new_slot(self) -> int:
        self._refresh()
        for _ in range(S.SLOTS):
            addr = self.page + S.CODE_PAGES * S.PAGE_SIZE + (self._next_slot % S.SLOTS) * S.SLOT_SIZE
            self._next_slot += 1
            if addr not in self.outstanding:
                return addr
        raise InjectionError("ptrace_failed", "every slot of the stub is still in use", self.pid)

    def _refresh(self) -> None:
        """Forget outstanding slots whose call has finished with the page."""
        for addr, done in list(self.outstanding.items()):
            try:
                phase = S.parse_slot(memory.read_exact(self.pid, addr, 16))[0]
            except OSError:
                continue
            if phase >= done:
                del self.outstanding[addr]

    def busy(self) -> bool:
        self._refresh()
        return bool(self.outstanding)

    def _map_stub(self, caller: RemoteCaller) -> None:
        self.page = caller.map_stub()

    def _unmap_stub(self, caller: RemoteCaller) -> None:
        caller.unmap_stub(self.page)
        self.page = None
        self.outstanding.clear()
        self._next_slot = 0

    # ---- running

    def run(self, code: str, timeout: float, call_timeout: Optional[float] = None,
            finish: bool = False) -> None:
        """Run ``code`` in the main thread (see the module docstring).

        ``timeout`` bounds the search for a safe point; ``call_timeout``
        (default: ``timeout``) how long a started call is watched.  With
        ``finish`` the stub is unmapped afterwards when possible.
        """
        if len(code.encode("utf-8")) > S.SLOT_TEXT_MAX:
            raise ValueError("statement too long for the stub")
        call_timeout = timeout if call_timeout is None else call_timeout
        if self.target.version >= remote_debug.MIN_VERSION and _run_pep768(self, code, call_timeout):
            return
        if arch.current().NAME != "x86_64":
            raise InjectionSkip("unsupported_arch", "remote calls are not implemented on %s"
                                % arch.current().NAME, self.pid)
        job = _Job(self, code, timeout, call_timeout, finish)
        try:
            _in_tracer_thread(job)
        finally:
            if finish and self.page is not None:
                try:
                    self.finish()
                except Exception as exc:  # never hide the statement's own result
                    log.debug("pid=%d: finish: %s", self.pid, exc)

    def finish(self, timeout: float = 2.0) -> bool:
        """Unmap the stub if no call of ours can still use it; True if done
        (or nothing was mapped)."""
        if self.page is None:
            return True
        if self.busy():
            self.left_behind = True
            log.debug("pid=%d: the stub at %#x stays mapped (a call may still use it)", self.pid, self.page)
            return False
        job = _UnmapJob(self, timeout)
        try:
            _in_tracer_thread(job)
        except (InjectionSkip, InjectionError) as exc:
            if exc.reason != "process_gone":
                self.left_behind = True
                log.debug("pid=%d: the stub stays mapped: %s", self.pid, exc)
            return False
        return self.page is None


class _Job:
    """One statement run by a tracing thread (see _in_tracer_thread)."""

    def __init__(self, session: Session, code: str, timeout: float, call_timeout: float,
                 finish: bool) -> None:
        self.session = session
        self.code = code
        self.deadline = time.monotonic() + timeout
        self.call_timeout = call_timeout
        self.finish = finish
        self.abort = threading.Event()
        self.error: Optional[BaseException] = None
        self.left_traced = False      # the thread may still be traced by the ending tracer thread
        self.tracer_tid = 0
        self.pending_started = 0.0
        self.detach_note = ""

    def attach(self) -> TracedThread:
        pid = self.session.pid
        _check_tracer(pid)
        _check_shadow_stack(pid)
        thread = TracedThread(pid)
        thread.seize()
        return thread

    def __call__(self) -> None:
        s = self.session
        thread = self.attach()
        caller: Optional[RemoteCaller] = None
        pending_slot = 0
        try:
            kind, space = _stop_at_safe_point(thread, s.target, s, self.deadline, self.abort)
            _hook("safe_point")
            if s.gadgets is None:
                s.gadgets = locate_gadgets(s.pid, space.entries())
            caller = RemoteCaller(thread, s.gadgets)
            caller.hold()
            if s.page is None:
                s._map_stub(caller)
            if kind == "direct":
                self._direct(thread, caller)
            else:
                pending_slot = self._queue_pending(thread, caller)
            if self.finish and kind == "direct" and not s.busy():
                s._unmap_stub(caller)
        except LeaveCall:
            # The thread runs our call, which returns by itself.  Stopped at a
            # syscall stop: detach it there; running: never interrupt it (see
            # perfagent.ptrace.call), the tracer thread's end detaches it.
            if thread.stopped:
                try:
                    thread.detach(interrupt=False)
                    _hook("detached")
                    return
                except PtraceError:
                    pass
            self.left_traced = True
            return
        except BaseException as exc:
            self.error = exc
        if not self._let_go(thread, caller):
            return
        if pending_slot and self.error is None:
            self._wait_pending(pending_slot)

    def _let_go(self, thread: TracedThread, caller: Optional[RemoteCaller]) -> bool:
        """Restore and detach; False when the thread had to be left to the
        kernel (its tracer thread's end detaches it)."""
        try:
            if caller is not None:
                caller.release()
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            # A thread not restored is running our code or stopped in it:
            # it returns by itself once untraced.  Never detach it with a
            # signal or interrupt it again.
            if thread.attached:
                self.left_traced = True
                return False
        _hook("released")
        try:
            thread.detach()
        except PtraceError as exc:
            if exc.reason == "detach_failed":
                self.left_traced = True
                self.detach_note = ("%s; ended the tracing thread, which makes the kernel detach it"
                                    % _strip_prefix(str(exc), thread.tid, exc.reason))
                log.warning("pid=%d: %s", thread.tid, self.detach_note)
                if self.error is None:
                    self.error = exc
                return False
            if exc.reason != "process_gone" and self.error is None:
                self.error = exc
        _hook("detached")
        return True

    # ---- the two paths

    def _watch(self, started: float) -> Callable[[], None]:
        def watch() -> None:
            if self.abort.is_set() or time.monotonic() - started >= self.call_timeout:
                raise LeaveCall()
        return watch

    def _direct(self, thread: TracedThread, caller: RemoteCaller) -> None:
        s = self.session
        slot = s._new_slot()
        thread.write(slot, S.slot_bytes(self.code.encode("utf-8")))
        sym = s.target.symbols
        _hook("direct_call")
        started = time.monotonic()
        try:
            caller.run(s.page + S.LABELS["statement"], s.page + S.MARKER_OFFSET,
                       {"r12": sym["PyGILState_Ensure"], "r13": sym["PyRun_SimpleString"],
                        "r14": sym["PyGILState_Release"], "r15": slot},
                       watch=self._watch(started))
        except LeaveCall:
            self._leave(slot, S.PHASE_CALL_DONE, started)
            raise
        phase, _, rc = S.parse_slot(thread.read(slot, 16))
        if phase != S.PHASE_CALL_DONE:
            raise InjectionError("ptrace_failed", "the stub stopped in phase %d" % phase, s.pid)
        if _c_int(rc) != 0:
            raise InjectionError("python_error", "PyRun_SimpleString(%r) returned %d" % (self.code, _c_int(rc)),
                                 s.pid)

    def _queue_pending(self, thread: TracedThread, caller: RemoteCaller) -> int:
        s = self.session
        slot = s._new_slot()
        call_slot = s._new_slot()
        thread.write(slot, S.slot_bytes(self.code.encode("utf-8"), s.target.symbols["PyRun_SimpleString"]))
        thread.write(call_slot, S.slot_bytes(b""))
        started = time.monotonic()
        # Queued from here on (until the stub function ran): the page stays.
        s.outstanding[slot] = S.PHASE_PENDING_DONE
        try:
            caller.run(s.page + S.LABELS["call"], s.page + S.MARKER_OFFSET,
                       {"r12": s.target.pending_call, "rdi": s.page + S.LABELS["pending"], "rsi": slot,
                        "r15": call_slot},
                       watch=self._watch(started))
        except LeaveCall:
            self._leave(slot, S.PHASE_PENDING_DONE, started)
            raise
        rc = _c_int(S.parse_slot(thread.read(call_slot, 16))[2])
        if rc != 0:
            del s.outstanding[slot]
            raise InjectionError("python_error", "Py_AddPendingCall returned %d (queue full)" % rc, s.pid)
        self.pending_started = started
        _hook("pending_queued")
        return slot

    def _wait_pending(self, slot: int) -> None:
        """Wait (untraced) for the eval breaker to run the queued call."""
        s = self.session
        started = self.pending_started
        watch = self._watch(started)
        while True:
            _hook("pending_wait")
            try:
                phase, _, rc = S.parse_slot(memory.read_exact(s.pid, slot, 16))
            except OSError as exc:
                self.error = as_injection_error(exc, s.pid)
                return
            if phase == S.PHASE_PENDING_DONE:
                s.outstanding.pop(slot, None)
                if _c_int(rc) != 0:
                    self.error = InjectionError("python_error", "PyRun_SimpleString(%r) returned %d"
                                                % (self.code, _c_int(rc)), s.pid)
                return
            try:
                watch()
            except LeaveCall:
                self._leave(slot, S.PHASE_PENDING_DONE, started)
                return
            time.sleep(PENDING_POLL)

    def _leave(self, slot: int, done: int, started: float) -> None:
        """Stop watching a call in progress: cancel the statement if it has
        not started, note whether it may still run, keep the page."""
        s = self.session
        s.outstanding[slot] = done
        phase = S.PHASE_QUEUED
        try:
            memory.write(s.pid, slot + S.SLOT_CANCEL, b"\1\0\0\0")
            phase = S.parse_slot(memory.read_exact(s.pid, slot, 16))[0]
        except OSError:
            pass
        if done == S.PHASE_PENDING_DONE:
            may_run = phase == S.PHASE_RUNNING
            waiting = "the eval breaker" if phase == S.PHASE_QUEUED else "the statement"
        else:
            may_run = phase >= S.PHASE_GIL
            waiting = "PyGILState_Ensure (the GIL)" if phase == S.PHASE_QUEUED else "the statement"
        why = "interrupted" if self.abort.is_set() else "after %.1fs" % (time.monotonic() - started)
        self.error = InjectionError(
            "timeout", "stopped watching the call %s, still waiting for %s; it finishes by itself%s"
            % (why, waiting, "" if may_run else " without running the statement"), s.pid, may_have_run=may_run)


class _UnmapJob(_Job):
    """munmap of the stub at any stop (a system call at the gadget is safe
    wherever the thread is, like a signal handler's), unless the thread is
    in the stub or under a temporary signal mask."""

    def __init__(self, session: Session, timeout: float) -> None:
        super().__init__(session, "", timeout, timeout, True)

    def __call__(self) -> None:
        s = self.session
        thread = self.attach()
        caller: Optional[RemoteCaller] = None
        try:
            while True:
                st = thread.interrupt(max(self.deadline - time.monotonic(), 0.001))
                if st.is_group_stop:
                    raise InjectionSkip("process_stopped", "the process is stopped", s.pid)
                room = RemoteCaller.frame_bytes(s.xstate_size(thread))
                regs = thread.getregs()
                stack = AddressSpace.from_pid(s.pid).find(regs.rsp)
                if not s.page_contains(regs.rip) and not temporary_sigmask(regs) \
                        and stack is not None and regs.rsp - room >= stack.start:
                    break
                if time.monotonic() >= self.deadline:
                    raise PtraceError("timeout", "pid=%d reason=timeout: no stop outside the stub" % s.pid)
                thread.resume(0)
                time.sleep(SAFE_POINT_RETRY)
            caller = RemoteCaller(thread, s.gadgets)
            caller.hold()
            s._unmap_stub(caller)
        except BaseException as exc:
            self.error = exc
        self._let_go(thread, caller)


def _thread_state(thread: TracedThread) -> str:
    st = procfs.stat(thread.tgid, thread.tid)
    return st.state if st is not None else "?"


# ---------------------------------------------------------------- PEP 768

#: Where the script goes inside the target's root, first usable first.
SCRIPT_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
#: How long the main thread is given to take the script before ptrace is
#: used: one that is not running (blocked in a system call, maybe for good)
#: checks no eval breaker; one running Python checks it within microseconds
#: (a build without remote-debug support never takes it; one running long C
#: code takes it late, and the ptrace path waits for it as well).
PEP768_BLOCKED_WAIT = 0.1
PEP768_RUNNING_WAIT = 1.0
#: After withdrawing a script: time for one taken at that instant to show.
PEP768_CANCEL_GRACE = 0.05


def _fs_ids(pid: int) -> Tuple[int, int]:
    """The process's filesystem uid and gid (what its open() checks)."""
    fields = procfs.status(pid)
    try:
        return int(fields["Uid"].split()[3]), int(fields["Gid"].split()[3])
    except (KeyError, IndexError, ValueError):
        raise InjectionSkip("process_gone", "no uid in /proc/%d/status" % pid, pid) from None


def _run_pep768(session: Session, code: str, call_timeout: float) -> bool:
    """Run ``code`` through PEP 768; False when it cannot be used (then
    nothing was left in the target and ptrace is used instead)."""
    from perfagent.python.interpreter import InterpreterSkip, find_interpreter
    from perfagent.target import files
    pid = session.pid
    try:
        interp = find_interpreter(pid)
        rd = remote_debug.RemoteDebug.locate(pid, interp.runtime, interp.debug_offsets)
        if rd.pending() != 0:
            raise remote_debug.Unavailable("busy", "another debugger's script is pending")
        uid, gid = _fs_ids(pid)
    except (remote_debug.Unavailable, InterpreterSkip, OSError, CaptureError) as exc:
        log.debug("pid=%d: no PEP 768 remote exec (%s); using ptrace", pid, exc)
        _hook("pep768_unavailable")
        return False
    name = "perfagent-%d-%s.py" % (pid, secrets.token_hex(8))
    placed = None
    for directory in SCRIPT_DIRS:
        target_path = directory + "/" + name
        script = "%s\n__import__('os').unlink(%r)\n" % (code, target_path)
        try:
            files.create_in_root(pid, directory, name, script.encode("utf-8"), uid, gid)
        except OSError as exc:
            log.debug("pid=%d: cannot place a script in %s: %s", pid, directory, exc)
            continue
        placed = directory
        break
    if placed is None:
        _hook("pep768_unavailable")
        return False
    taken = False
    try:
        rd.submit(placed + "/" + name)
        _hook("pep768_submitted")
        st = procfs.stat(pid, pid)
        running = st is not None and st.state == "R"
        deadline = time.monotonic() + min(PEP768_RUNNING_WAIT if running else PEP768_BLOCKED_WAIT, call_timeout)
        while time.monotonic() < deadline:
            if rd.pending() == 0:
                taken = True
                break
            time.sleep(PENDING_POLL)
        if not taken:
            rd.cancel()
            time.sleep(PEP768_CANCEL_GRACE)
            if not files.exists_in_root(pid, placed, name, uid):
                taken = True      # taken just before the cancel, and run
            else:
                files.remove_in_root(pid, placed, name, uid)
                log.debug("pid=%d: the main thread did not take the PEP 768 script in time; using ptrace", pid)
                _hook("pep768_fallback")
                return False
        _hook("pep768_taken")
        # The script unlinks itself last: its file gone means it ran.
        deadline = time.monotonic() + call_timeout
        while files.exists_in_root(pid, placed, name, uid):
            if time.monotonic() >= deadline:
                files.remove_in_root(pid, placed, name, uid)
                raise InjectionError("python_error", "the PEP 768 script %s did not complete (the target "
                                     "printed why on its stderr)" % (placed + "/" + name), pid)
            time.sleep(PENDING_POLL)
        _hook("pep768_done")
        return True
    except BaseException as exc:
        if not taken:
            try:
                rd.cancel()
                files.remove_in_root(pid, placed, name, uid)
            except OSError:
                pass
        if isinstance(exc, (InjectionSkip, InjectionError)) or not isinstance(exc, Exception):
            raise
        raise as_injection_error(exc, pid) from None


def _check_tracer(pid: int) -> None:
    other = tracer_pid(pid)
    if not other:
        return
    if _own_thread(other):
        # One of our tracing threads is ending: the kernel detaches as it exits.
        _wait_untraced(pid, pid, other)
        if not tracer_pid(pid):
            return
    # PTRACE_SEIZE would fail with EPERM; say why instead.
    raise InjectionSkip("ptrace_eperm", "already traced by pid %d (a debugger?)" % other, pid)


def _check_shadow_stack(pid: int) -> None:
    features = procfs.status(pid).get("x86_Thread_features", "")
    if "shstk" in features.split():
        raise InjectionSkip("unsupported_arch", "the main thread uses a shadow stack (CET), which remote "
                            "calls would violate", pid)


def _own_thread(tid: int) -> bool:
    try:
        return tid in procfs.threads(os.getpid())
    except ProcessLookupError:
        return False


def _wait_untraced(pid: int, tid: int, tracer: int) -> None:
    deadline = time.monotonic() + KERNEL_DETACH_WAIT
    while time.monotonic() < deadline and tracer_pid(pid, tid) == tracer:
        time.sleep(0.001)


def _in_tracer_thread(job: _Job) -> None:
    """Run ``job`` in a thread of its own, which is the tracer.

    ptrace binds a tracee to the tracing thread: when that thread ends,
    the kernel detaches whatever it still traces (and cancels a pending
    PTRACE_INTERRUPT).  That makes "stop watching a call" and "a detach
    that cannot complete" safe: the job just returns.  Ctrl-C while
    joining asks the job to wrap up (a call in progress is left to finish
    by itself), then is re-raised.
    """
    def body() -> None:
        job.tracer_tid = threading.get_native_id() if hasattr(threading, "get_native_id") else 0
        try:
            job()
        except BaseException as exc:
            job.error = exc

    worker = threading.Thread(target=body, name="perfagent-ptrace-%d" % job.session.pid, daemon=True)
    worker.start()
    interrupted: Optional[BaseException] = None
    while worker.is_alive():
        try:
            worker.join(0.05)
        except BaseException as exc:  # KeyboardInterrupt: wrap up, then re-raise
            job.abort.set()
            interrupted = exc
    pid = job.session.pid
    if job.left_traced and job.tracer_tid:
        _wait_untraced(pid, pid, job.tracer_tid)
        still = tracer_pid(pid, pid)
        if still == job.tracer_tid:
            log.warning("pid=%d: still traced by the ended thread %d", pid, still)
    if interrupted is not None:
        raise interrupted
    if job.error is not None:
        err = as_injection_error(job.error, pid)
        if job.detach_note and job.detach_note not in str(err):
            err = type(err)(err.reason, "%s (%s)" % (_strip_prefix(str(err), pid, err.reason),
                                                     job.detach_note), pid)
        if isinstance(err, InjectionError) and err.reason == "timeout":
            log.debug("%s", err)
        raise err from None


# ------------------------------------------------------------ entry points

def run_statement(target: PythonTarget, code: str, timeout: float,
                  call_timeout: Optional[float] = None, session: Optional[Session] = None) -> None:
    """Run one Python statement in the target's main thread.

    Without ``session`` a temporary one is used and its stub unmapped
    afterwards (when no call can still use it).
    """
    if session is None:
        Session(target).run(code, timeout, call_timeout, finish=True)
    else:
        session.run(code, timeout, call_timeout)


def _run(pid: int, code: str, timeout: float, call_timeout: Optional[float],
         session: Optional[Session]) -> float:
    start = time.monotonic()
    try:
        target = session.target if session is not None else detect(pid)
    except (InjectionSkip, InjectionError):
        raise
    except Exception as exc:
        raise as_injection_error(exc, pid) from None
    remaining = timeout - (time.monotonic() - start)
    if remaining <= 0:
        raise InjectionError("timeout", "detection took longer than %.1fs" % timeout, pid)
    run_statement(target, code, remaining, call_timeout, session)
    return time.monotonic() - start


def activate(pid: int, timeout: float = 5.0, call_timeout: Optional[float] = None,
             session: Optional[Session] = None) -> float:
    """Turn on the perf trampoline in CPython process ``pid``.

    Returns the elapsed seconds (detection + injection).  The target then
    appends ``py::`` entries to /tmp/perf-PID.map as it calls Python
    functions not yet compiled into trampolines.  Idempotent.  Raises
    InjectionSkip or InjectionError (see the module docstring); a caller in
    lenient mode logs ``str(exc)`` and goes on, in strict mode aborts.
    """
    return _run(pid, ACTIVATE_CODE, timeout, call_timeout, session)


def deactivate(pid: int, timeout: float = 5.0, call_timeout: Optional[float] = None,
               session: Optional[Session] = None) -> float:
    """Turn the perf trampoline off again (also if it came from -X perf).

    A target that exited meanwhile gives InjectionSkip("process_gone"),
    which callers treat as harmless.
    """
    return _run(pid, DEACTIVATE_CODE, timeout, call_timeout, session)


def open_session(pid: int) -> Session:
    """Detect ``pid`` and start a session for repeated injections."""
    try:
        return Session(detect(pid))
    except (InjectionSkip, InjectionError):
        raise
    except Exception as exc:
        raise as_injection_error(exc, pid) from None


def _set_call_hook() -> None:
    C.TEST_HOOK = _hook


_set_call_hook()
