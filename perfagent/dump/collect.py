"""Collect one process's threads and stacks, leaving the process as it was.

Order of work, chosen so that each thread is stopped as briefly as possible
and only when native frames are asked for:

1. /proc: the process, its threads, each one's name, state and tracer;
   the mappings.  A process that cannot be read at all is an error here.
2. Python (:mod:`perfagent.python.reader`, memory reads only): the
   interpreter, its thread states, which one holds the GIL.
3. Per thread, one at a time: its kernel stack (/proc/PID/task/TID/stack,
   root only), then, for native frames, a snapshot
   (:func:`perfagent.ptrace.snapshot.snapshot`: registers, up to
   ``stack_bytes`` of stack and the thread's raw Python frame chain, all
   read in one stop of a few hundred microseconds; the Python chain is read
   in the stop so that it matches the native stack it is merged into).
   Threads that must not or cannot be stopped -- traced by someone else
   (a debugger), stopped (SIGSTOP, job control), in an uninterruptible
   sleep, or a zombie -- are not: the saved sp and pc of a blocked thread
   (/proc/PID/task/TID/syscall, no stop needed) still give its innermost
   native frames where the call-frame information does not need the other
   registers, and every such thread says why its native frames are
   missing or partial.
4. With every thread running again: code objects decoded into names and
   lines, native stacks unwound and named, the two merged
   (:mod:`perfagent.dump.merge`).

Without native frames (the default for a Python process) nothing is
stopped or traced at all: the Python stacks and kernel stacks are read from
memory and /proc while the process runs.
"""

from __future__ import annotations

import bisect
import os
import time
from typing import Dict, List, Optional, Tuple

from perfagent.records import NamedTuple
from perfagent.dump import merge as merging
from perfagent.dump.model import (
    KERNEL_MODULE, KIND_KERNEL, KIND_PYTHON, Dump, Frame, Process, Thread,
)
from perfagent.errors import CaptureError
from perfagent.ptrace import snapshot as snap
from perfagent.python import debug_offsets as dbg
from perfagent.python.interpreter import InterpreterSkip, find_interpreter
from perfagent.python.reader import RawFrame, Reader, ReaderError, ThreadState
from perfagent.symbolize.procmaps import MapEntry, read_maps
from perfagent.target import memory, procfs
from perfagent.target import process as target_process

STACK_BYTES = snap.STACK_BYTES

#: Thread states that are never stopped with ptrace, and why.
_NOT_STOPPED = {
    "T": "it is stopped by SIGSTOP or job control",
    "t": "it is stopped by a tracer",
    "D": "it is in an uninterruptible sleep and would not stop",
}
_GONE_STATES = ("Z", "X")


class DumpError(CaptureError):
    """The process cannot be dumped at all (no such process, no permission)."""


class _Task(NamedTuple):
    tid: int
    ns_tid: int
    name: str
    state: str
    tracer: int


class _Held(NamedTuple):
    """What was read of one thread before the names (native part optional)."""

    regs: Optional[Tuple]
    stack: bytes
    raws: Optional[List[RawFrame]]
    truncated: str
    stop_us: Optional[float]
    notes: List[str]
    wait_us: Optional[float] = None


def permission_message(pid: int) -> str:
    if os.geteuid() == 0:
        return ("the kernel does not let this agent read process %d, even as root (a security module, "
                "or the process has capabilities the agent lacks)" % pid)
    uid = procfs.real_uid(procfs.status(pid))
    if uid == os.getuid():
        return ("not allowed to read process %d although it is yours: set kernel.yama.ptrace_scope to 0, "
                "or run as root or with CAP_SYS_PTRACE" % pid)
    return ("not allowed to read process %d of uid %d: run as root or with CAP_SYS_PTRACE"
            % (pid, uid))


def _tasks(pid: int) -> List[_Task]:
    try:
        tids = procfs.threads(pid)
    except ProcessLookupError:
        raise DumpError("process %d exited" % pid) from None
    out = []
    for tid in tids:
        st = procfs.stat(pid, tid)
        if st is None:
            continue  # exited meanwhile
        fields = procfs.status(pid, tid)
        ns = procfs.ns_pids(fields)
        out.append(_Task(tid, ns[-1] if ns else tid, procfs.comm(pid, tid) or st.comm, st.state,
                         procfs.tracer_of(fields)))
    # The main thread first, then the others by tid.
    out.sort(key=lambda t: (t.tid != pid, t.tid))
    return out


def _kernel_frames(pid: int, tid: int, notes: List[str]) -> List[Frame]:
    try:
        stack = procfs.kernel_stack(pid, tid)
    except PermissionError:
        if not any(n.startswith("kernel stack") for n in notes):
            notes.append("kernel stack not readable: needs root")
        return []
    except OSError:
        return []
    return [Frame(KIND_KERNEL, k.name, module="[%s]" % k.module if k.module else KERNEL_MODULE,
                  address=k.address or None, offset=k.offset) for k in stack]


class Collector:
    """One dump of process ``pid`` (see the module docstring)."""

    def __init__(self, pid: int, native: Optional[bool] = None, stack_bytes: int = STACK_BYTES,
                 kernel: bool = True) -> None:
        self.pid = pid
        self.native_requested = native
        self.stack_bytes = stack_bytes
        self.kernel = kernel
        self.notes: List[str] = []
        self.permission_denied = False

    # ------------------------------------------------------------ the whole dump

    def collect(self) -> Dump:
        t0 = time.monotonic()
        pid = self.pid
        view = target_process.view(pid)
        if view is None:
            raise DumpError("no process with pid %d" % pid)
        tasks = _tasks(pid)
        if view.kernel_thread:
            return self._kernel_thread(view, tasks, t0)
        try:
            maps = read_maps(pid)
        except PermissionError:
            raise DumpError(permission_message(pid)) from None
        except (FileNotFoundError, ProcessLookupError):
            raise DumpError("process %d exited" % pid) from None
        if not maps:
            self.notes.append("the process has no memory (a zombie): no user-space frames")
        reader, python, missing = self._python(pid) if maps else (None, None, None)
        tstates, holders = self._thread_states(reader)
        if reader is None and missing and missing.startswith("permission"):
            self.permission_denied = True
        native = self.native_requested if self.native_requested is not None else reader is None
        native = native and bool(maps)
        held, kernel = self._read_threads(tasks, tstates, reader, native, maps)
        threads = self._assemble(tasks, tstates, holders, reader, held, kernel, native, maps, view)
        if self.permission_denied and not any(t.frames for t in threads):
            raise DumpError(permission_message(pid))
        process = Process(pid, view.ns_pid, view.comm, procfs.exe_path(pid), procfs.cmdline(pid), False,
                          python, missing)
        stops = [t.stop_us for t in threads if t.stop_us is not None]
        waits = [t.stop_wait_us for t in threads if t.stop_wait_us is not None]
        return Dump(process, threads, native, self.notes, (time.monotonic() - t0) * 1000.0,
                    max(stops) if stops else None, len(stops), max(waits) if waits else None)

    def _kernel_thread(self, view, tasks: List[_Task], t0: float) -> Dump:
        threads = []
        for t in tasks:
            threads.append(Thread(t.tid, t.ns_tid, t.name, procfs.STATE_WORDS.get(t.state, ""), t.state,
                                  None, False, _kernel_frames(self.pid, t.tid, self.notes) if self.kernel else [],
                                  [], None, None))
        self.notes.insert(0, "kernel thread: no user-space stack")
        process = Process(self.pid, view.ns_pid, view.comm, "", [], True, None, None)
        return Dump(process, threads, False, self.notes, (time.monotonic() - t0) * 1000.0, None, 0, None)

    # ------------------------------------------------------------ Python

    def _python(self, pid: int):
        """(reader, python description, why no Python frames) -- reader None when not readable."""
        try:
            interp = find_interpreter(pid)
            reader = Reader(interp)
        except InterpreterSkip as exc:
            if exc.reason == "not_python":
                return None, None, None
            return None, None, "%s: %s" % (exc.reason, str(exc).split(": ", 1)[-1])
        except ReaderError as exc:
            return None, None, "%s: %s" % (exc.reason, exc)
        version = dbg.version_string(interp.hexversion) if interp.hexversion else "%d.%d" % interp.version
        return reader, {"version": version, "path": interp.path, "shared": bool(interp.shared)}, None

    def _thread_states(self, reader: Optional[Reader]) -> Tuple[Dict[Optional[int], List[ThreadState]], set]:
        """{host tid (None: unknown): its thread states, sub-interpreters first}, GIL holders."""
        if reader is None:
            return {}, set()
        try:
            states = reader.threads()
            holders = reader.gil_holders()
        except ReaderError as exc:
            self.notes.append("Python threads not readable: %s" % exc)
            if exc.reason == "permission":
                self.permission_denied = True
            return {}, set()
        out: Dict[Optional[int], List[ThreadState]] = {}
        for ts in states:
            out.setdefault(ts.tid, []).append(ts)
        for lst in out.values():
            lst.sort(key=lambda ts: ts.interp_id == 0)  # the main interpreter's stack is outermost
        return out, holders

    @staticmethod
    def _raw_python(reader: Reader, states: List[ThreadState]) -> Tuple[List[RawFrame], str]:
        """The raw Python frames of a kernel thread's thread states, innermost first."""
        raws: List[RawFrame] = []
        why = ""
        for ts in states:
            frames, truncated = reader.raw_stack(ts.addr)
            raws.extend(frames)
            why = why or truncated
        return raws, why

    @staticmethod
    def _tops(reader: Reader, states: List[ThreadState]) -> List[Tuple[Tuple[int, int, int], ...]]:
        """The innermost TOP_FRAMES frames of each thread state: (frame, code, instr).

        Read in the stop instead of the whole chain (a few reads, not one
        per frame): when they are what was read just before the stop, the
        thread has not left its innermost frames, so the frames below them
        (which only change once those return) are the ones read before.
        """
        saved = reader.max_frames
        reader.max_frames = TOP_FRAMES
        try:
            return [_top(reader.raw_stack(ts.addr)[0]) for ts in states]
        finally:
            reader.max_frames = saved

    # ------------------------------------------------------------ per thread

    def _read_threads(self, tasks: List[_Task], tstates, reader: Optional[Reader], native: bool,
                      maps: List[MapEntry]) -> Tuple[Dict[int, _Held], Dict[int, List[Frame]]]:
        held: Dict[int, _Held] = {}
        kernel: Dict[int, List[Frame]] = {}
        stack_ends = sorted((m.start, m.end) for m in maps)
        try:
            for t in tasks:
                # The kernel stack before any stop (a held thread's would show ptrace_stop).
                kernel[t.tid] = _kernel_frames(self.pid, t.tid, self.notes) if self.kernel else []
                states = tstates.get(t.tid, [])
                if native:
                    held[t.tid] = self._native(t, states, reader, stack_ends)
                else:
                    held[t.tid] = self._python_only(states, reader)
        finally:
            late = snap.release_late()
            if late:
                self.notes.append("threads %s did not stop within %d ms and stay attached until perf-agent "
                                  "exits (the kernel then releases them)"
                                  % (", ".join(map(str, late)), snap.STOP_TIMEOUT * 1000))
        return held, kernel

    def _python_only(self, states: List[ThreadState], reader: Optional[Reader]) -> _Held:
        if reader is None or not states:
            return _Held(None, b"", None, "", None, [])
        try:
            raws, why = self._raw_python(reader, states)
        except ReaderError as exc:
            return _Held(None, b"", None, "", None, ["Python frames not readable: %s" % exc])
        return _Held(None, b"", raws, why, None, [])

    def _native(self, t: _Task, states: List[ThreadState], reader: Optional[Reader],
                stack_ends: List[Tuple[int, int]]) -> _Held:
        notes: List[str] = []
        if t.state in _GONE_STATES:
            return _Held(None, b"", None, "", None, ["zombie: no frames"])
        # Looked at again just before the stop: a debugger may have attached,
        # or a SIGSTOP arrived, since the thread list was read.
        fields = procfs.status(self.pid, t.tid)
        state, tracer = fields.get("State", t.state)[:1], procfs.tracer_of(fields)
        why = None
        if not fields:
            why = "it exited during the dump"
        elif tracer:
            why = "it is traced by pid %d (a debugger?)" % tracer
        elif state in _NOT_STOPPED:
            why = _NOT_STOPPED[state]
        elif t.tid == os.getpid() or self.pid == os.getpid():
            why = "it is the agent's own thread"
        if why is None:
            try:
                s = snap.snapshot(self.pid, t.tid, self.stack_bytes, lambda sp: _mapping_end(stack_ends, sp),
                                  self._python_reading(reader, states))
            except snap.SnapshotError as exc:
                if exc.reason == "ptrace_eperm":
                    self.permission_denied = True
                why = _snapshot_failure(exc)
            else:
                raws, truncated = None, ""
                if isinstance(s.extra, ReaderError):
                    notes.append("Python frames not readable: %s" % s.extra)
                elif s.extra is not None:
                    raws, truncated = s.extra
                if s.group_stop:
                    notes.append("a group-stop (SIGSTOP) began during the dump: the thread stays stopped")
                return _Held(s.regs, s.stack, raws, truncated, s.held_ns / 1000.0, notes, s.wait_ns / 1000.0)
        # Not stopped: the Python frames as they are, native frames from the saved sp/pc if any.
        py = self._python_only(states, reader)
        notes.extend(py.notes)
        regs, stack, partial = self._saved_regs(t, stack_ends)
        if partial:
            notes.append("not stopped: %s; native frames unwound from the stack pointer and pc the "
                         "kernel saved, without its other registers" % why)
        else:
            notes.append("native frames missing: %s" % why)
        return _Held(regs, stack, py.raws, py.truncated, None, notes)

    def _python_reading(self, reader: Optional[Reader], states: List[ThreadState]):
        """What the snapshot calls in the stop: the thread's raw Python frames.

        The chain is read now, before the stop; in the stop only its
        innermost frames are read (see _tops), and the whole chain again
        only when the thread has moved since.  Returns (raws, truncated),
        or the ReaderError.
        """
        if reader is None or not states:
            return None
        try:
            pre = [reader.raw_stack(ts.addr) for ts in states]
        except ReaderError:
            pre = None

        def in_the_stop():
            try:
                if pre is not None and self._tops(reader, states) == [_top(r) for r, _ in pre]:
                    return [f for r, _ in pre for f in r], next((w for _, w in pre if w), "")
                return self._raw_python(reader, states)
            except ReaderError as exc:
                return exc
        return in_the_stop

    def _saved_regs(self, t: _Task, stack_ends) -> Tuple[Optional[Tuple], bytes, bool]:
        """sp and pc of a thread that is not running, from /proc (no stop), and its stack."""
        try:
            saved = procfs.syscall_regs(self.pid, t.tid)
        except OSError:
            return None, b"", False
        if saved is None or not saved.pc:
            return None, b"", False
        end = _mapping_end(stack_ends, saved.sp)
        size = self.stack_bytes if not end or end <= saved.sp else min(self.stack_bytes, end - saved.sp)
        try:
            stack = memory.read(self.pid, saved.sp, size)
        except OSError:
            return None, b"", False
        return (None, None, saved.sp, saved.pc, None, None, None, None), stack, True

    # ------------------------------------------------------------ names and merge

    def _assemble(self, tasks, tstates, holders, reader, held, kernel, native, maps, view) -> List[Thread]:
        unwinder = None
        if native:
            from perfagent.dump.native import NativeUnwinder
            unwinder = NativeUnwinder(self.pid, maps, _PerfMapOwner(view))
        threads = []
        for t in tasks:
            h = held.get(t.tid) or _Held(None, b"", None, "", None, [])
            states = tstates.get(t.tid, [])
            frames, notes = self._frames(reader, h, kernel.get(t.tid, []), unwinder)
            if reader is not None and not states and not native and t.state not in _GONE_STATES:
                notes.append("no Python thread state: --native shows its native frames")
            holds = any(ts.addr in holders for ts in states) if reader is not None else None
            threads.append(Thread(t.tid, t.ns_tid, t.name, procfs.STATE_WORDS.get(t.state, ""), t.state,
                                  holds, bool(states), frames, notes, h.stop_us, h.wait_us))
        for ts in tstates.get(None, []):  # thread states whose kernel thread is unknown
            h = self._python_only([ts], reader)
            frames, notes = self._frames(reader, h, [], None)
            threads.append(Thread(None, None, "", "", "", ts.addr in holders, True, frames,
                                  notes + ["kernel thread id unknown (thread id %#x)" % ts.thread_id], None, None))
        return threads

    def _frames(self, reader: Optional[Reader], h: _Held, kernel: List[Frame],
                unwinder) -> Tuple[List[Frame], List[str]]:
        """One thread's frames, innermost first (kernel, then native and Python merged), and notes."""
        notes = list(h.notes)
        pyframes = self._named(reader, h.raws, notes) if h.raws else []
        if h.truncated:
            notes.append("Python stack cut short: %s" % h.truncated)
        frames = list(kernel)
        if unwinder is None or h.regs is None:
            return frames + pyframes, notes
        u = unwinder.unwind(h.regs, h.stack, self.stack_bytes)
        if u.ending:
            notes.append(u.ending)
        runs = merging.runs_of(h.raws or [], pyframes)
        hosts = merging.place_runs(runs, u.frames, lambda a: unwinder.frame_of(u, a))
        merged, unplaced = merging.merge(u.frames, runs, hosts)
        if unplaced and u.ending is None:
            notes.append("%d Python frames could not be placed in the native stack" % unplaced)
        return frames + merged, notes

    @staticmethod
    def _named(reader: Reader, raws: List[RawFrame], notes: List[str]) -> List[Frame]:
        out = []
        try:
            for raw in raws:
                f = reader.frame(raw)
                out.append(Frame(KIND_PYTHON, f.qualname, file=f.filename, line=f.line))
        except ReaderError as exc:
            notes.append("Python frames not readable: %s" % exc)
        return out


class _PerfMapOwner:
    """What Symbolizer.perf_map needs to know of the process (see capture.ProcessInfo)."""

    def __init__(self, view) -> None:
        self.pid = view.pid
        self.start = view.identity.start
        self.ns_pid = view.ns_pid
        self.uid = view.uid


def _mapping_end(stack_ends: List[Tuple[int, int]], sp: int) -> int:
    """End of the mapping holding ``sp`` (0 when unknown): the stack copy stops there."""
    i = bisect.bisect_right(stack_ends, (sp, 1 << 64)) - 1
    if i >= 0 and stack_ends[i][0] <= sp < stack_ends[i][1]:
        return stack_ends[i][1]
    return 0


#: Innermost Python frames compared in the stop (see Collector._tops).
TOP_FRAMES = 2


def _top(raws: List[RawFrame]) -> Tuple[Tuple[int, int, int], ...]:
    return tuple((r.frame, r.code, r.instr) for r in raws[:TOP_FRAMES])


def _snapshot_failure(exc: snap.SnapshotError) -> str:
    if exc.reason == "ptrace_eperm":
        return "perf-agent may not trace it (ptrace refused)"
    if exc.reason == "timeout":
        return "it did not stop within %d ms (an uninterruptible sleep?)" % (snap.STOP_TIMEOUT * 1000)
    if exc.reason == "process_gone":
        return "it exited during the dump"
    if exc.reason == "unsupported":
        return str(exc)
    return "ptrace failed: %s" % exc


def collect(pid: int, native: Optional[bool] = None, stack_bytes: int = STACK_BYTES,
            kernel: bool = True) -> Dump:
    """Dump process ``pid`` (see the module docstring); raises DumpError."""
    return Collector(pid, native, stack_bytes, kernel).collect()
