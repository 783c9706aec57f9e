"""Every thread's Python stack, read from the interpreter's memory from outside.

The walk, all through :mod:`perfagent.target.memory` (process_vm_readv: the
target is never stopped, traced or written):

    _PyRuntime.interpreters.head -> PyInterpreterState.next ...   (subinterpreters too)
      interp->tstate_head / threads.head -> PyThreadState.next ...
        the thread's current frame -> the frame chain:
          3.8-3.10  tstate->frame (PyFrameObject), f_back
          3.11      tstate->cframe->current_frame, previous; is_entry marks
                    the first frame of each C-level eval call, whose
                    _PyCFrame (a local of _PyEval_EvalFrameDefault) is
                    found on the tstate->cframe->previous chain
          3.12      the same, and each eval call pushes an entry frame
                    (owner FRAME_OWNED_BY_CSTACK), a local of
                    _PyEval_EvalFrameDefault: skipped, its address kept
          3.13+     tstate->current_frame, previous; f_executable (a
                    _PyStackRef in 3.14+: tag bits masked), instr_ptr;
                    entry/base frames (owner >= the layout's shim value)
                    skipped, addresses kept

Each Python frame gives a :class:`RawFrame` -- what the in-kernel walker
records too: the frame's address, its code object's address, the raw
instruction position (f_lasti, or the prev_instr/instr_ptr pointer), and
for the first frame of each eval-loop call the ENTRY flag plus ``link``,
the C-stack address that ties the run to its native frame (3.11: the
_PyCFrame; 3.12+: the entry frame; 3.8-3.10: 0, one eval call per frame).

Code objects are decoded once per (process, address) and kept with a
fingerprint (ob_type, co_firstlineno, the name/qualname/filename/line-table
pointers and the line table's size) that is re-read, in the same system
call as the line table's size, each time the address is met again: a code
object freed and another allocated at its address is decoded anew.

The target's memory is hostile and changes under us: every pointer is
checked (non-NULL, aligned, user space), every chain is bounded and
cycle-safe, every length is capped.  A bad pointer ends that stack early
(``truncated`` says why); the only exception raised is :class:`ReaderError`
(the process is gone, or reading it is not allowed).
"""

from __future__ import annotations

import struct
from typing import Dict, Iterable, List, Optional, Set, Tuple

from perfagent.records import NamedTuple
from perfagent import budget
from perfagent.errors import CaptureError
from perfagent.python import linetable
from perfagent.python.interpreter import Interpreter
from perfagent.python.layout import FRAME_OBJECT, Layout
from perfagent.target import memory, procfs

#: Default bound on one thread's Python frames.
MAX_FRAMES = 1024
#: Bounds on the interpreter and thread lists (cycle-safe anyway).
MAX_INTERPRETERS = 1024
MAX_THREADS = 1 << 16
#: Longest name or file name decoded, in characters (longer ones are cut).
MAX_STRING_CHARS = 4096
#: Largest line table read (a real one is a few KB).
MAX_LINETABLE = 1 << 20
#: Largest code object header read.
MAX_CODE_SIZE = 4096

#: Highest user-space address on x86-64/aarch64 with 4-level page tables and
#: 5-level ones alike (47/56 bits): anything above is not a target pointer.
USER_LIMIT = 1 << 56
POINTER_ALIGN = 8

#: RawFrame.flags
FRAME_ENTRY = 1        # first Python frame of an eval-loop call (its caller is C code)

#: PyUnicode kinds (Include/cpython/unicodeobject.h: enum PyUnicode_Kind)
PyUnicode_1BYTE_KIND = 1
PyUnicode_2BYTE_KIND = 2
PyUnicode_4BYTE_KIND = 4
_KIND_CODEC = {PyUnicode_1BYTE_KIND: "latin-1", PyUnicode_2BYTE_KIND: "utf-16-le",
               PyUnicode_4BYTE_KIND: "utf-32-le"}

_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")


class ReaderError(CaptureError):
    """The process cannot be read any more: ``reason`` is process_gone or permission."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ThreadState(NamedTuple):
    """One PyThreadState."""

    addr: int
    interp: int                # its PyInterpreterState
    interp_id: int
    thread_id: int             # pthread_t (PyThreadState.thread_id)
    native_thread_id: Optional[int]   # kernel tid in the target's pid namespace:
                                      # native_thread_id (3.11+), else via glibc's struct pthread
    tid: Optional[int]         # the same thread's tid in the agent's pid namespace


class RawFrame(NamedTuple):
    """One Python frame as the walker records it (no names yet)."""

    frame: int     # PyFrameObject / _PyInterpreterFrame address
    code: int      # PyCodeObject address
    instr: int     # f_lasti (3.8-3.10), else the prev_instr / instr_ptr pointer
    flags: int     # FRAME_ENTRY
    link: int      # ENTRY frames: _PyCFrame (3.11) / entry frame (3.12+) address; else 0


class Code(NamedTuple):
    """A decoded code object."""

    qualname: str
    name: str
    filename: str
    firstlineno: int
    linetable: bytes
    fingerprint: Tuple[int, ...]


class Frame(NamedTuple):
    """A named Python frame: ``line`` is the sampled line (0 when unknown)."""

    qualname: str
    filename: str
    line: int
    firstlineno: int
    raw: RawFrame


class ThreadStack(NamedTuple):
    thread: ThreadState
    frames: List[Frame]          # innermost first
    truncated: str               # "" when the chain ended cleanly, else why it stopped
    holds_gil: bool


def _ok(ptr: int) -> bool:
    return 0 < ptr < USER_LIMIT and not ptr & (POINTER_ALIGN - 1)


class Reader:
    """Reads the Python stacks of one interpreter (one process).

    Not thread-safe; one per process.  ``max_frames`` bounds each stack.
    """

    def __init__(self, interp: Interpreter, max_frames: int = MAX_FRAMES) -> None:
        self.interp = interp
        self.pid = interp.pid
        self.layout: Layout = interp.layout
        self.max_frames = max_frames
        self._codes: Dict[int, Code] = {}
        #: code address -> (the Code decoded there, {byte offset: line}):
        #: a line table is decoded once per sampled instruction, not once per
        #: drain cycle (names are revalidated every cycle; a long function's
        #: table decoded from its start each time cost 0.1-0.4 ms a frame).
        #: Valid while ``code`` is the object the address still holds.
        self._lines: Dict[int, Tuple[Code, Dict[int, int]]] = {}
        self.code_decodes = 0        # how many code objects were decoded (tests, stats)
        #: Code addresses already validated during the current stacks() call:
        #: one snapshot checks each code object once, however many frames run it.
        self._fresh: Set[int] = set()
        self._snapshot = False
        #: None: same pid namespace as the agent (tids are ours); else
        #: {tid in the target's namespace: our tid}, refreshed on a miss.
        self._ns_tids: Optional[Dict[int, int]] = None
        self._other_pid_ns = len(procfs.ns_pids(procfs.status(self.pid))) > 1
        L = self.layout
        frame_fields = [L.frame_back, L.frame_code, L.frame_instr]
        frame_fields += [o for o in (L.frame_owner, L.frame_is_entry, L.frame_lineno) if o is not None]
        #: One read per frame covers every field the walk uses.
        self._frame_span = max(frame_fields) + 8
        ts_fields = [L.tstate_next, L.tstate_interp, L.tstate_thread_id]
        ts_fields += [o for o in (L.tstate_native_thread_id, L.tstate_frame, L.tstate_cframe) if o is not None]
        self._tstate_span = max(ts_fields) + 8
        code_fields = [L.code_name, L.code_filename, L.code_firstlineno, L.code_linetable, L.ob_type]
        if L.code_qualname is not None:
            code_fields.append(L.code_qualname)
        self._code_span = min(max(code_fields) + 8, MAX_CODE_SIZE)

    # ------------------------------------------------------------ memory

    def _read(self, addr: int, size: int) -> bytes:
        try:
            return memory.read(self.pid, addr, size)
        except (ProcessLookupError, FileNotFoundError):
            raise ReaderError("process_gone", "process %d is gone" % self.pid) from None
        except PermissionError as exc:
            raise ReaderError("permission", "reading process %d: %s" % (self.pid, exc.strerror)) from None
        except OSError as exc:
            raise ReaderError("process_gone", "reading process %d: %s" % (self.pid, exc)) from None

    def _read_many(self, spans: List[Tuple[int, int]]) -> List[bytes]:
        try:
            return memory.read_many(self.pid, spans)
        except (ProcessLookupError, FileNotFoundError):
            raise ReaderError("process_gone", "process %d is gone" % self.pid) from None
        except PermissionError as exc:
            raise ReaderError("permission", "reading process %d: %s" % (self.pid, exc.strerror)) from None
        except OSError as exc:
            raise ReaderError("process_gone", "reading process %d: %s" % (self.pid, exc)) from None

    def _ptr(self, addr: int) -> int:
        data = self._read(addr, 8)
        return _U64.unpack(data)[0] if len(data) == 8 else 0

    # ------------------------------------------------------------ interpreters and threads

    def interpreters(self) -> List[Tuple[int, int]]:
        """(PyInterpreterState address, id) of every interpreter, main last."""
        L = self.layout
        out: List[Tuple[int, int]] = []
        seen: Set[int] = set()
        addr = self._ptr(self.interp.runtime + L.runtime_interpreters_head)
        while _ok(addr) and addr not in seen and len(out) < MAX_INTERPRETERS:
            seen.add(addr)
            nxt, ident = self._read_many([(addr + L.interp_next, 8), (addr + L.interp_id, 8)])
            if len(nxt) != 8 or len(ident) != 8:
                break
            out.append((addr, _I64.unpack(ident)[0]))
            addr = _U64.unpack(nxt)[0]
        return out

    def threads(self) -> List[ThreadState]:
        """Every thread state of every interpreter."""
        out: List[ThreadState] = []
        for interp_addr, interp_id in self.interpreters():
            out.extend(self._threads_of(interp_addr, interp_id))
            if len(out) >= MAX_THREADS:
                break
        return out

    def _threads_of(self, interp_addr: int, interp_id: int) -> Iterable[ThreadState]:
        L = self.layout
        seen: Set[int] = set()
        addr = self._ptr(interp_addr + L.interp_threads_head)
        while _ok(addr) and addr not in seen and len(seen) < MAX_THREADS:
            seen.add(addr)
            data = self._read(addr, self._tstate_span)
            if len(data) < self._tstate_span:
                break
            thread_id = _U64.unpack_from(data, L.tstate_thread_id)[0]
            if L.tstate_native_thread_id is not None:
                native: Optional[int] = _U64.unpack_from(data, L.tstate_native_thread_id)[0]
            else:
                native = self._tid_of_pthread(thread_id)
            yield ThreadState(addr, _U64.unpack_from(data, L.tstate_interp)[0], interp_id, thread_id,
                              native, self._host_tid(native))
            addr = _U64.unpack_from(data, L.tstate_next)[0]

    def _host_tid(self, ns_tid: Optional[int]) -> Optional[int]:
        """Our tid for a tid of the target's pid namespace (NSpid of /proc/PID/task/*/status)."""
        if ns_tid is None or not self._other_pid_ns:
            return ns_tid
        if self._ns_tids is None or ns_tid not in self._ns_tids:
            mapping: Dict[int, int] = {}
            try:
                tids = procfs.threads(self.pid)
            except ProcessLookupError:
                raise ReaderError("process_gone", "process %d is gone" % self.pid) from None
            for tid in tids:
                ids = procfs.ns_pids(procfs.status(self.pid, tid))
                if ids:
                    mapping[ids[-1]] = tid
            self._ns_tids = mapping
        return self._ns_tids.get(ns_tid)

    def _tid_of_pthread(self, pthread: int) -> Optional[int]:
        """The kernel tid of a glibc pthread_t (3.8-3.10), when libc says where it is."""
        off = self.interp.pthread_tid_offset
        if off is None or not _ok(pthread):
            return None
        data = self._read(pthread + off, 4)
        if len(data) != 4:
            return None
        tid = _I32.unpack(data)[0]
        return tid if tid > 0 else None

    def gil_holders(self) -> Set[int]:
        """Thread-state addresses holding a GIL now (racy by nature: a snapshot)."""
        L = self.layout
        if L.runtime_gil_locked is not None:
            return self._gil_at(self.interp.runtime + L.runtime_gil_locked,
                                self.interp.runtime + L.runtime_gil_last_holder)
        holders: Set[int] = set()
        if L.interp_gil_locked is not None:
            for addr, _ in self.interpreters():
                holders |= self._gil_at(addr + L.interp_gil_locked, addr + L.interp_gil_last_holder)
        return holders

    def _gil_at(self, locked_addr: int, holder_addr: int) -> Set[int]:
        locked, holder = self._read_many([(locked_addr, 4), (holder_addr, 8)])
        if len(locked) != 4 or len(holder) != 8 or not _I32.unpack(locked)[0]:
            return set()
        h = _U64.unpack(holder)[0]
        return {h} if _ok(h) else set()

    # ------------------------------------------------------------ frames

    def raw_stack(self, tstate: int) -> Tuple[List[RawFrame], str]:
        """The Python frames of one thread state, innermost first, and why the walk stopped early ("" if not)."""
        L = self.layout
        if L.frame_model == FRAME_OBJECT:
            return self._walk_frame_objects(self._ptr(tstate + L.tstate_frame))
        cframes: List[Tuple[int, int]] = []
        if L.tstate_cframe is not None:  # 3.11, 3.12
            cframes = self._cframes(self._ptr(tstate + L.tstate_cframe))
            top = cframes[0][1] if cframes else 0
        else:
            top = self._ptr(tstate + L.tstate_frame)
        return self._walk_interpreter_frames(top, cframes)

    def _cframes(self, cframe: int) -> List[Tuple[int, int]]:
        """[(_PyCFrame address, its current_frame)] from tstate->cframe outwards."""
        L = self.layout
        out: List[Tuple[int, int]] = []
        seen: Set[int] = set()
        span = max(L.cframe_current_frame, L.cframe_previous) + 8
        while _ok(cframe) and cframe not in seen and len(out) < self.max_frames:
            seen.add(cframe)
            data = self._read(cframe, span)
            if len(data) < span:
                break
            out.append((cframe, _U64.unpack_from(data, L.cframe_current_frame)[0]))
            cframe = _U64.unpack_from(data, L.cframe_previous)[0]
        return out

    def _walk_frame_objects(self, frame: int) -> Tuple[List[RawFrame], str]:
        """3.8-3.10: PyFrameObject.f_back; every frame is its own eval call."""
        L = self.layout
        out: List[RawFrame] = []
        seen: Set[int] = set()
        span = self._frame_span
        while frame:
            if not _ok(frame):
                return out, "bad frame pointer %#x" % frame
            if frame in seen:
                return out, "frame chain cycle at %#x" % frame
            if len(out) >= self.max_frames:
                return out, "more than %d frames" % self.max_frames
            seen.add(frame)
            data = self._read(frame, span)
            if len(data) < span:
                return out, "unreadable frame %#x" % frame
            code = _U64.unpack_from(data, L.frame_code)[0]
            lasti = _I32.unpack_from(data, L.frame_instr)[0]
            out.append(RawFrame(frame, code, lasti, FRAME_ENTRY, 0))
            frame = _U64.unpack_from(data, L.frame_back)[0]
        return out, ""

    def _walk_interpreter_frames(self, frame: int, cframes: List[Tuple[int, int]]) -> Tuple[List[RawFrame], str]:
        """3.11+: _PyInterpreterFrame.previous, C-stack markers skipped and kept as links."""
        L = self.layout
        out: List[RawFrame] = []
        seen: Set[int] = set()
        span = self._frame_span
        shim = L.frame_owner_shim
        tag_mask = ~L.code_tag_mask
        # 3.11: the k-th run of frames (ending at an is_entry frame) belongs
        # to the _PyCFrame whose current_frame is the run's first frame.
        cframe_of = {current: cf for cf, current in cframes}
        while frame:
            if not _ok(frame):
                return out, "bad frame pointer %#x" % frame
            if frame in seen:
                return out, "frame chain cycle at %#x" % frame
            if len(out) >= self.max_frames:
                return out, "more than %d frames" % self.max_frames
            seen.add(frame)
            data = self._read(frame, span)
            if len(data) < span:
                return out, "unreadable frame %#x" % frame
            previous = _U64.unpack_from(data, L.frame_back)[0]
            owner = data[L.frame_owner]
            if shim is not None and owner >= shim:
                # An entry (or base) frame: the preceding Python frame began this eval call.
                if out and not out[-1].flags & FRAME_ENTRY:
                    last = out[-1]
                    out[-1] = last._replace(flags=last.flags | FRAME_ENTRY, link=frame)
                frame = previous
                continue
            code = _U64.unpack_from(data, L.frame_code)[0] & tag_mask
            instr = _U64.unpack_from(data, L.frame_instr)[0]
            flags = 0
            link = 0
            if L.frame_is_entry is not None and data[L.frame_is_entry]:
                flags = FRAME_ENTRY
            out.append(RawFrame(frame, code, instr, flags, link))
            frame = previous
        if L.frame_is_entry is not None:
            self._link_cframes(out, cframe_of)
        return out, ""

    @staticmethod
    def _link_cframes(frames: List[RawFrame], cframe_of: Dict[int, int]) -> None:
        """3.11: give each run's ENTRY frame the _PyCFrame whose current_frame began the run."""
        run_first = 0
        for i, f in enumerate(frames):
            if f.flags & FRAME_ENTRY:
                cf = cframe_of.get(frames[run_first].frame, 0)
                frames[i] = f._replace(link=cf)
                run_first = i + 1

    # ------------------------------------------------------------ code objects

    def code(self, addr: int) -> Optional[Code]:
        """The decoded code object at ``addr`` (cached and revalidated); None if it is not one."""
        if not _ok(addr):
            return None
        L = self.layout
        cached = self._codes.get(addr)
        if cached is not None and addr in self._fresh:
            return cached
        if cached is not None:
            head, size = self._read_many([(addr, self._code_span),
                                          (cached.fingerprint[5] + L.bytes_ob_size, 8)])
            if len(head) == self._code_span and len(size) == 8 \
                    and self._fingerprint(head, _I64.unpack(size)[0]) == cached.fingerprint:
                if self._snapshot:
                    self._fresh.add(addr)
                return cached
            del self._codes[addr]
        else:
            head = self._read(addr, self._code_span)
        if len(head) < self._code_span:
            return None  # unreadable now (freed, or the pid is another process)
        code = self._decode_code(head)
        if code is not None:
            if len(self._codes) > 1 << 16:
                self._codes.clear()
                self._lines.clear()
            self._codes[addr] = code
            if self._snapshot:
                self._fresh.add(addr)
        return code

    def is_current(self, addr: int, decoded: Code) -> bool:
        """Is ``decoded`` still the code object at ``addr`` (validated once
        per snapshot, as :meth:`code` does)?"""
        if addr in self._fresh:
            return self._codes.get(addr) is decoded
        return self.code(addr) is decoded

    @property
    def decoded(self) -> Dict[int, Code]:
        """address -> the code object decoded there (as last validated)."""
        return self._codes

    def _fingerprint(self, head: bytes, linetable_size: int) -> Tuple[int, ...]:
        L = self.layout
        return (_U64.unpack_from(head, L.ob_type)[0],
                _I32.unpack_from(head, L.code_firstlineno)[0],
                _U64.unpack_from(head, L.code_name)[0],
                _U64.unpack_from(head, L.code_qualname)[0] if L.code_qualname is not None else 0,
                _U64.unpack_from(head, L.code_filename)[0],
                _U64.unpack_from(head, L.code_linetable)[0],
                linetable_size)

    def _decode_code(self, head: bytes) -> Optional[Code]:
        L = self.layout
        ob_type = _U64.unpack_from(head, L.ob_type)[0]
        if self.interp.code_type and ob_type != self.interp.code_type:
            return None
        self.code_decodes += 1
        table_ptr = _U64.unpack_from(head, L.code_linetable)[0]
        table, size = self._bytes(table_ptr, MAX_LINETABLE)
        fp = self._fingerprint(head, size)
        name = self.string(fp[2]) or "?"
        qualname = self.string(fp[3]) if L.code_qualname is not None else ""
        return Code(qualname or name, name, self.string(fp[4]) or "?", fp[1], table, fp)

    def _bytes(self, addr: int, limit: int) -> Tuple[bytes, int]:
        """(contents, ob_size) of the PyBytesObject at addr; (b"", -1) if unreadable."""
        L = self.layout
        if not _ok(addr):
            return b"", -1
        data = self._read(addr + L.bytes_ob_size, 8)
        if len(data) != 8:
            return b"", -1
        size = _I64.unpack(data)[0]
        if not 0 <= size <= limit:
            return b"", size
        return self._read(addr + L.bytes_ob_sval, size), size

    def string(self, addr: int, limit: int = MAX_STRING_CHARS) -> str:
        """A str object's text: compact ASCII, compact latin-1/UCS-2/UCS-4, or legacy; "" if unreadable."""
        L = self.layout
        if not _ok(addr):
            return ""
        # A compact ASCII string may end before the longer compact header would.
        head = self._read(addr, L.unicode_compact_data)
        if len(head) < L.unicode_ascii_data:
            return ""
        length = _I64.unpack_from(head, L.unicode_length)[0]
        state = _U32.unpack_from(head, L.unicode_state)[0]
        kind = (state >> L.unicode_kind_shift) & 7
        compact = (state >> L.unicode_compact_shift) & 1
        ascii_ = (state >> L.unicode_ascii_shift) & 1
        codec = _KIND_CODEC.get(kind)
        if codec is None or length < 0 or (not ascii_ and len(head) < L.unicode_compact_data):
            return ""
        n = min(length, limit)
        if compact:
            data_addr = addr + (L.unicode_ascii_data if ascii_ else L.unicode_compact_data)
        else:
            legacy = self._read(addr + L.unicode_legacy_data, 8)
            if len(legacy) != 8:
                return ""
            data_addr = _U64.unpack(legacy)[0]
            if not 0 < data_addr < USER_LIMIT:
                return ""
        raw = self._read(data_addr, n * kind)
        return raw[:len(raw) - len(raw) % kind].decode("ascii" if ascii_ else codec, "replace")

    # ------------------------------------------------------------ lines and names

    def addrq(self, raw: RawFrame) -> int:
        """The frame's bytecode offset in bytes (what PyCode_Addr2Line takes)."""
        L = self.layout
        if L.frame_model == FRAME_OBJECT:
            return raw.instr * L.lasti_unit
        return raw.instr - (raw.code + L.code_adaptive)

    def line(self, code: Code, raw: RawFrame) -> int:
        """The source line being executed in the frame; 0 when the table has none."""
        addrq = self.addrq(raw)
        known = self._lines.get(raw.code)
        if known is None or known[0] is not code:
            if len(self._lines) > 1 << 16:
                self._lines.clear()
            known = self._lines[raw.code] = (code, {})
        line = known[1].get(addrq)
        if line is None:
            line = linetable.line_for(self.layout.linetable_format, code.linetable, code.firstlineno, addrq)
            line = known[1][addrq] = line if line is not None and line > 0 else 0
        return line

    def frame(self, raw: RawFrame) -> Frame:
        """``raw`` named; a code object that cannot be read or decoded (short
        read, hostile contents) gives an unknown frame, never an exception."""
        try:
            code = self.code(raw.code)
            if code is not None:
                return Frame(code.qualname, code.filename, self.line(code, raw), code.firstlineno, raw)
        except struct.error:
            pass  # memory the target controls: a short or odd read is a bad pointer
        return Frame("<unknown code %#x>" % raw.code, "?", 0, 0, raw)

    def snapshot(self) -> None:
        """From now on each code object is validated once (then trusted)
        until the next call: for a caller naming many frames of one
        instant (a drain cycle), one read per code object, not per frame."""
        self._fresh.clear()
        self._snapshot = True

    def stacks(self) -> List[ThreadStack]:
        """Every thread of every interpreter with its named Python stack."""
        holders = self.gil_holders()
        out = []
        self._fresh.clear()
        self._snapshot = True
        try:
            for ts in self.threads():
                budget.check_cancelled()  # thousands of threads: stop promptly on SIGINT
                raws, truncated = self.raw_stack(ts.addr)
                out.append(ThreadStack(ts, [self.frame(r) for r in raws], truncated, ts.addr in holders))
        finally:
            self._snapshot = False
            self._fresh.clear()
        return out
