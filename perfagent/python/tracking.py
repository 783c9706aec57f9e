"""The CPython processes of a capture, for the in-kernel Python walk.

User space's half of perfagent.stackprog.python: it finds each process's
interpreter (perfagent.python.interpreter: the exact file it maps, version,
layout), registers it in the walk's maps, keeps the map of thread states
current, and names what the walk recorded (code object, instruction) as
``qualname``, file and line while the process lives, with
perfagent.python.reader (one reader per process, code objects cached and
revalidated, so a code object freed and its address reused is named anew).

Processes come and go during a capture: ones that exist at the start are
examined then (``add``); a child forked by a known one shares its
interpreter at the same addresses and is registered at once (``fork``);
a process that execs is examined again (``exec``); one that exits is
dropped (``exit``).  Skipped processes are counted by reason
(``not_python`` is only counted, never reported one by one).
"""

from __future__ import annotations

import os
import struct
import time
from typing import Dict, Optional, Tuple

from perfagent.records import NamedTuple
from perfagent import budget
from perfagent.python.interpreter import Interpreter, InterpreterSkip, find_interpreter
from perfagent.python.layout import FRAME_OBJECT
from perfagent.python.reader import RawFrame, Reader, ReaderError
from perfagent.stackprog import python as SP

#: Seconds between two refreshes of one process's thread states while it
#: starts threads (a thread was born since the refresh before last), and
#: while it does not: a refresh walks every thread state in the target's
#: memory (10 ms for 1,000 threads), and the thread states of threads that
#: exist do not move.  Threads created meanwhile are found by the program's
#: own search; the side band's FORK records say when (thread_born).  The
#: idle refresh is for thread states made without a new thread (a C thread
#: calling into Python).
THREAD_REFRESH = 1.0
THREAD_REFRESH_IDLE = 10.0

TGID = struct.Struct("<I")

#: Skip reason of the agent's own process (not counted in the summary).
SKIP_SELF = "self"


class PyName(NamedTuple):
    """A named Python frame."""

    qualname: str
    filename: str
    line: int          # the sampled line (0: unknown)
    firstlineno: int


UNKNOWN = PyName("<unknown>", "", 0, 0)
#: The outermost frame of a Python stack deeper than the walk's bound.
TRUNCATED_MARK = PyName("[more Python frames]", "", 0, 0)
#: A frame whose code object's address held another one by naming time.
REUSED = PyName("<freed code object>", "", 0, 0)


#: Exited processes whose last-read names are kept for counts collected after
#: their exit (the newest; ~64 KiB of names each at most, usually a few KiB).
GONE_KEPT = 256


class _Tracked:
    __slots__ = ("interp", "reader", "refreshed", "born", "names", "written", "lasting", "lasting_gen")

    def __init__(self, interp: Interpreter) -> None:
        self.interp = interp
        self.reader = Reader(interp)
        self.refreshed = 0.0
        self.born = 0.0        # when a thread of it was last seen born (side band)
        self.names: Dict[Tuple[int, int], PyName] = {}
        #: thread_id -> thread state address last written to the threads map
        self.written: Dict[int, int] = {}
        #: names as last read, kept across drain cycles: used only when the
        #: process can no longer be read (it exited before counts that waited
        #: in the kernel were collected); the key holds the co_firstlineno
        #: read at the sample's instant, so a reused address is not misnamed.
        self.lasting: Dict[Tuple[int, int, int], PyName] = {}
        #: bumped when ``lasting`` is emptied (a stack remembered as named
        #: must then be named again, to be in it: see codes_of)
        self.lasting_gen = 0


class PythonProcesses:
    """See the module docstring.  ``maps`` are the walk's kernel maps."""

    def __init__(self, maps: "SP.PyWalkMaps") -> None:
        self.maps = maps
        self._procs: Dict[int, _Tracked] = {}
        #: exited processes' names as last read (see _Tracked.lasting)
        self._gone: Dict[int, _Tracked] = {}
        self.skipped: Dict[str, int] = {}
        self.reasons: Dict[int, str] = {}       # pid -> why it was skipped (not not_python)
        self.versions: Dict[str, int] = {}      # "3.12" -> processes walked
        # Samples (or episodes) whose walk was truncated at its bound, met an
        # unreadable pointer, or found no thread state (a thread not started
        # by Python, or one that exited).
        self.truncated = self.bad_reads = self.no_thread = 0
        self.reused = 0   # frames not named: their code object was freed and its address reused

    # -- processes -----------------------------------------------------------

    def add(self, pid: int, maps=None) -> Optional[str]:
        """Examine process ``pid`` (``maps``: its mappings, if just read);
        its skip reason, or None when it is walked."""
        if pid == os.getpid():
            # The agent itself (-a): its samples keep only their sampled pc
            # (perfagent.stackprog.kunwind.UW_PROC_SELF), no Python stack.
            return self._skip(pid, SKIP_SELF, "the agent itself")
        try:
            interp = find_interpreter(pid, maps)
            packed = SP.pack_proc(interp.runtime, interp.layout)
        except InterpreterSkip as exc:
            return self._skip(pid, exc.reason, str(exc))
        except ValueError as exc:   # a layout the walk cannot read
            return self._skip(pid, "unknown_version", str(exc))
        except budget.Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug costs this process's Python frames, not the run
            return self._skip(pid, "error", "%s: %s" % (type(exc).__name__, exc))
        try:
            self._register(pid, interp, packed)
        except OSError as exc:    # the procs map is full
            return self._skip(pid, "map_full", str(exc))
        return None

    def _skip(self, pid: int, reason: str, message: str) -> str:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if reason != "not_python":
            self.reasons[pid] = message
        return reason

    def _register(self, pid: int, interp: Interpreter, packed: bytes) -> None:
        self.maps.procs.update(TGID.pack(pid), packed)
        tracked = self._procs[pid] = _Tracked(interp)
        v = "%d.%d" % interp.version
        self.versions[v] = self.versions.get(v, 0) + 1
        self._refresh(pid, tracked)

    def fork(self, pid: int, ppid: int) -> None:
        """A child of ``ppid``: the same interpreter at the same addresses."""
        parent = self._procs.get(ppid)
        if parent is None or pid in self._procs:
            return
        kw = {name: getattr(parent.interp, name) for name in Interpreter.__slots__}
        kw["pid"] = pid
        interp = Interpreter(**kw)
        self._register(pid, interp, SP.pack_proc(interp.runtime, interp.layout))

    def exec(self, pid: int) -> None:
        """The process replaced its image: examine it again."""
        self.exit(pid)
        self.add(pid)

    def exit(self, pid: int) -> None:
        tracked = self._procs.pop(pid, None)
        if tracked is not None:
            # Kept for naming what was counted before the exit (bounded: the
            # oldest go first).
            tracked.reader = None
            tracked.names = {}
            self._gone[pid] = tracked
            while len(self._gone) > GONE_KEPT:
                self._gone.pop(next(iter(self._gone)))
            try:
                self.maps.procs.delete(TGID.pack(pid))
            except OSError:
                pass

    def walked(self, pid: int) -> bool:
        return pid in self._procs

    def __len__(self) -> int:
        return len(self._procs)

    # -- thread states ---------------------------------------------------------

    def thread_born(self, pid: int) -> None:
        """A thread of ``pid`` was created (a FORK record): its thread state
        is written at the next refresh that is due (THREAD_REFRESH)."""
        tracked = self._procs.get(pid)
        if tracked is not None:
            tracked.born = time.monotonic()

    def refresh(self, force: bool = False) -> None:
        """Bring the thread-state map up to date (each process every
        THREAD_REFRESH seconds while threads are born -- once more after the
        last one, whose thread state may not have said its thread yet --,
        else every THREAD_REFRESH_IDLE; all now with ``force``)."""
        now = time.monotonic()
        for pid, tracked in list(self._procs.items()):
            recent = tracked.born >= tracked.refreshed - THREAD_REFRESH
            if force or now - tracked.refreshed >= (THREAD_REFRESH if recent else THREAD_REFRESH_IDLE):
                self._refresh(pid, tracked)

    def _refresh(self, pid: int, tracked: _Tracked) -> None:
        tracked.refreshed = time.monotonic()
        try:
            threads = tracked.reader.threads()
        except ReaderError:
            return
        # Only what changed is written, in one batch: a process with 2,000
        # threads cost 2,000 bpf() calls every refresh (seen as a 5.9 s
        # drain cycle on a busy machine).
        current = {ts.thread_id: ts.addr for ts in threads}
        written = tracked.written
        changed = [(SP.PY_THREAD_KEY.pack(pid, 0, tid), SP.U64.pack(addr))
                   for tid, addr in current.items() if written.get(tid) != addr]
        tracked.written = current
        if changed:
            try:
                self.maps.threads.update_many(changed)
            except OSError:
                tracked.written = {}

    # -- names -----------------------------------------------------------------

    def eval_check(self, pid: int):
        """``is_eval(pc)`` for process ``pid``: is pc in the eval loop function."""
        tracked = self._procs.get(pid) or self._gone.get(pid)
        rng = tracked.interp.eval_range if tracked is not None else None
        if rng is None:
            return lambda pc: False
        lo, hi = rng
        return lambda pc: lo <= pc < hi

    def name(self, pid: int, code: int, instr: int, firstlineno: int = 0) -> PyName:
        """The frame (code object ``code`` at instruction ``instr``, whose
        co_firstlineno was ``firstlineno`` when the walk read it) named.

        UNKNOWN when it cannot be read (the process is gone, the code object
        was freed) and REUSED when the address now holds another code object
        (its first line differs from the one read at the sample's instant):
        a frame is never named after a different function.
        """
        tracked = self._procs.get(pid)
        if tracked is None:
            tracked = self._gone.get(pid)
            if tracked is None:
                return UNKNOWN
            return tracked.lasting.get((code, instr, firstlineno), UNKNOWN)
        key = (code, instr, firstlineno)
        got = tracked.names.get(key)
        if got is not None:
            return got
        reader = tracked.reader
        layout = reader.layout
        if layout.frame_model == FRAME_OBJECT:
            raw = RawFrame(0, code, instr if instr < 1 << 31 else instr - (1 << 32), 0, 0)
        else:
            # The walk stored the byte offset; the reader wants the pointer.
            offset = instr if instr < 1 << 31 else instr - (1 << 32)
            raw = RawFrame(0, code, code + (layout.code_adaptive or 0) + offset, 0, 0)
        try:
            frame = reader.frame(raw)
        except ReaderError:
            return tracked.lasting.get(key, UNKNOWN)
        if firstlineno and frame.firstlineno != firstlineno and frame.filename != "?":
            self.reused += 1
            return REUSED
        name = PyName(frame.qualname, frame.filename, frame.line, frame.firstlineno)
        if len(tracked.names) > 1 << 16:
            tracked.names.clear()
        if len(tracked.lasting) > 1 << 16:
            tracked.lasting.clear()
            tracked.lasting_gen += 1
        tracked.names[key] = name
        tracked.lasting[key] = name
        return name

    def codes_of(self, pid: int, entries) -> Optional[tuple]:
        """What the names of a Python stack (raw entries, just named by
        :meth:`name`) were read from, for :meth:`same_codes`: the process's
        tracking, and each code object as decoded; None when a frame was not
        named from a code object of the live process (unknown, reused, gone)."""
        from perfagent.stackprog.layout import PYFRAME_LINENO_MASK, PYFRAME_LINK
        tracked = self._procs.get(pid)
        if tracked is None:
            return None
        codes = tracked.reader.decoded
        pairs = {}
        for code, _instr, flags in entries:
            if flags & PYFRAME_LINK:
                continue
            decoded = codes.get(code)
            firstlineno = flags & PYFRAME_LINENO_MASK
            if decoded is None or (firstlineno and decoded.firstlineno != firstlineno):
                return None
            pairs[code] = decoded
        return tracked, tracked.lasting_gen, tuple(pairs.items())

    def same_codes(self, pid: int, codes: tuple) -> bool:
        """Would the stack that gave ``codes`` (codes_of) be named the same
        now: the process is tracked as then, and every code object is the one
        decoded then (each validated once per drain cycle, as naming does)."""
        tracked, gen, pairs = codes
        if self._procs.get(pid) is not tracked or tracked.lasting_gen != gen:
            return False
        current = tracked.reader.is_current
        try:
            for addr, decoded in pairs:
                if not current(addr, decoded):
                    return False
        except (ReaderError, struct.error):
            return False
        return True

    def new_drain(self) -> None:
        """A drain cycle begins: names cached by (code, instr) stay valid only
        while the code object is the same; revalidate them once per cycle."""
        for tracked in self._procs.values():
            tracked.names.clear()
            tracked.reader.snapshot()

    def count_flags(self, flags: int, weight: int) -> None:
        """Account the walk's PYSTACK_* flags of ``weight`` samples."""
        from perfagent.stackprog.layout import PYSTACK_BAD_READ, PYSTACK_NO_THREAD, PYSTACK_TRUNCATED
        if flags & PYSTACK_TRUNCATED:
            self.truncated += weight
        if flags & PYSTACK_BAD_READ:
            self.bad_reads += weight
        if flags & PYSTACK_NO_THREAD:
            self.no_thread += weight

    def summary(self, target: Optional[int] = None) -> str:
        """One line: what is walked, what was skipped ("" when there was no
        CPython at all).  With ``target`` (--pid), what happened to that
        process says so by name."""
        walked = ", ".join("%s: %d" % kv for kv in sorted(self.versions.items()))
        skipped = " ".join("%s=%d" % kv for kv in sorted(self.skipped.items())
                           if kv[0] not in ("not_python", SKIP_SELF))
        if target is not None and target in self.reasons:
            return "python: no Python frames for pid %d: %s" % (target, self.reasons[target])
        if target is not None and target in self._procs:
            interp = self._procs[target].interp
            line = ("python: pid %d is CPython %d.%d; its Python frames were read from the "
                    "interpreter's memory" % ((target,) + tuple(interp.version)))
            if len(self.versions) > 1 or sum(self.versions.values()) > 1:
                line += " (%s CPython processes in all: %s)" % (sum(self.versions.values()), walked)
            return line + self._counts()
        if not walked and not skipped:
            return ""
        line = "python: walked the stacks of %d CPython process%s" % (
            sum(self.versions.values()), "" if sum(self.versions.values()) == 1 else "es")
        if walked:
            line += " (%s)" % walked
        if skipped:
            line += "; skipped %s" % skipped
        return line + self._counts()

    def _counts(self) -> str:
        from perfagent.stackprog.layout import PY_MAX_FRAMES
        line = ""
        if self.truncated:
            line += "; %d samples with more than %d Python frames (outermost cut)" % (
                self.truncated, PY_MAX_FRAMES)
        if self.bad_reads:
            line += "; %d stacks ended at an unreadable frame" % self.bad_reads
        return line
