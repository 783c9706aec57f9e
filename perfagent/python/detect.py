"""Is process PID a CPython 3.12+ whose perf trampoline we can switch on?

Everything is read from outside the process, without stopping it:

* /proc/PID/maps names the interpreter: a ``libpython3.X[t|d...].so``
  mapping (shared build) or, failing that, the executable itself when its
  symbol tables carry the interpreter (static build, e.g. ``python3.13``
  without ``--enable-shared``);
* the ELF file is the one the *process* maps (perfagent.target.files.
  open_as_seen: through ``/proc/PID/root/<path>``, so an interpreter in
  another mount namespace, e.g. a container, is found from the host, then
  ``/proc/PID/map_files/<start>-<end>``, which also covers a deleted file;
  either only when its device and inode are the mapping's);
* the version comes from the SONAME (``libpython3.13.so.1.0``) or else from
  ``Py_Version`` (the PY_VERSION_HEX constant, 3.11+) read out of the
  target's memory at the symbol's run-time address;
* the functions the injection calls are resolved to run-time addresses with
  the load bias of the file's mapping at offset 0.

Failures are :class:`InjectionSkip` with a ``reason`` callers log as
``pid=N reason=...`` and use to choose strict (abort) or lenient (skip).
"""

from __future__ import annotations

import errno
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

from perfagent.elf import ELFFile
from perfagent.elf.constants import PT_LOAD
from perfagent.errors import CaptureError, ELFError
from perfagent.symbolize.procmaps import MapEntry, read_maps
from perfagent.target import memory, procfs
from perfagent.target.files import open_as_seen
from perfagent.target.memory import MemoryReadError

#: First CPython with sys.activate_stack_trampoline().
MIN_VERSION = (3, 12)

#: The functions the injection calls.
CALL_SYMBOLS = ("PyGILState_Ensure", "PyRun_SimpleString", "PyGILState_Release")

#: Any one of these in an executable's symbol tables means it embeds the
#: interpreter (rather than merely linking libpython, which maps it).
INTERPRETER_SYMBOLS = ("Py_Initialize", "_PyEval_EvalFrameDefault", "PyGILState_Ensure")

#: Present only when CPython was configured with the perf trampoline
#: (--enable-perf-trampoline, the default on x86-64/aarch64 Linux).  In
#: 3.12 and 3.13 ``_Py_trampoline_func_start`` (the label in
#: Python/asm_trampoline.S) is a global, exported symbol, while
#: ``_PyPerfTrampoline_SetCallbacks`` is local (.symtab only).
TRAMPOLINE_SYMBOLS = ("_Py_trampoline_func_start", "_PyPerfTrampoline_SetCallbacks")

VERSION_SYMBOL = "Py_Version"

#: Schedules a function to run in the main thread at its next eval-breaker
#: check (the point between bytecodes where CPython itself runs signal
#: handlers): the injection's path into a thread that is running Python.
PENDING_CALL_SYMBOL = "Py_AddPendingCall"

#: Functions during which the interpreter is being torn down: no call into
#: it is safe then (PyGILState_Ensure may even end the calling thread).
FINALIZATION_SYMBOLS = ("Py_FinalizeEx", "Py_Finalize", "_Py_Finalize", "Py_Exit", "Py_EndInterpreter",
                        "finalize_interp_clear", "finalize_interp_delete", "_PyRuntime_Finalize")

#: Functions that must not be on the stack of a thread we make call into
#: the interpreter, because they hold or wait for a lock our call takes:
#:
#: * the GIL's own code: a thread parked in the GIL's condition variable is
#:   registered as a waiter, and glibc makes the next signaller wait for it
#:   -- while we hold it, a deadlock;
#: * the perf-map writer: it holds the (non-reentrant) perf map lock, and
#:   with the trampoline on, our statement's own code object is written to
#:   the map too.
#:
#: The static ones (take_gil, perf_map_write_entry ...) are in .symtab
#: only; their exported callers still catch a build without .symtab one
#: frame further out.
UNSAFE_FRAME_SYMBOLS = (
    "take_gil", "drop_gil", "PyEval_RestoreThread", "PyEval_SaveThread",
    "PyEval_AcquireThread", "PyEval_ReleaseThread", "PyEval_AcquireLock",
    "PyEval_ReleaseLock", "_PyEval_AcquireLock", "PyGILState_Ensure",
    "PyGILState_Release", "_Py_HandlePending", "_PyEval_ReInitThreads",
    "PyUnstable_WritePerfMapEntry", "perf_map_write_entry", "perf_map_jit_write_entry",
    "PyUnstable_PerfMapState_Init", "PyUnstable_PerfMapState_Fini", "perf_map_init_state",
    "PyUnstable_CopyPerfMapFile", "_PyPerfTrampoline_SetCallbacks", "_PyPerfTrampoline_Init",
    "_PyPerfTrampoline_Fini", "_PyPerfTrampoline_FreeArenas", "_PyPerfTrampoline_AfterFork_Child",
    "compile_trampoline", "new_code_arena",
)

#: A thread with one of these on its stack, blocked in a system call, is
#: waiting for the GIL: it will be back in the eval loop (and run a pending
#: call) as soon as it gets it.
GIL_WAIT_SYMBOLS = ("take_gil", "drop_gil", "PyEval_RestoreThread", "PyEval_AcquireThread",
                    "_PyThreadState_Attach", "PyEval_AcquireLock", "_PyEval_AcquireLock")

#: Functions that must not be anywhere on the stack of a thread we call
#: into: they hold (or wait for) the pending-calls lock that
#: Py_AddPendingCall and the eval breaker take, set the queue up or tear
#: the interpreter down.  Static ones are in .symtab only; inlined ones are
#: covered by their callers' ranges.
PENDING_UNSAFE_SYMBOLS = (
    "Py_AddPendingCall", "_PyEval_AddPendingCall", "_push_pending_call", "_pop_pending_call",
    "_next_pending_call", "make_pending_calls", "_make_pending_calls", "_PyEval_MakePendingCalls",
    "Py_MakePendingCalls", "_Py_FinishPendingCalls", "_PyEval_InitState", "_PyEval_FiniState",
    "_PyEval_ReInitThreads", "PyOS_AfterFork_Child", "_PyRuntimeState_ReInitThreads",
    "_PyInterpreterState_ReinitRunningMain",
) + FINALIZATION_SYMBOLS

#: libpython3.13.so.1.0, libpython3.13t.so.1.0, libpython3.12d.so ...
_LIBPYTHON_RE = re.compile(r"^libpython(\d+)\.(\d+)([a-z]*)\.so(\.[0-9.]*)?$")

REASONS = ("not_python", "python_too_old", "no_perf_trampoline", "no_libpython_symbols",
           "process_gone", "ptrace_eperm", "process_stopped", "unsupported_arch")


class InjectionSkip(CaptureError):
    """The target cannot (or need not) be injected; nothing was changed.

    ``reason`` is one of :data:`REASONS`; ``str(exc)`` starts with
    ``pid=N reason=R``.
    """

    def __init__(self, reason: str, message: str, pid: int = 0) -> None:
        super().__init__("pid=%d reason=%s: %s" % (pid, reason, message))
        self.reason = reason
        self.pid = pid


class PythonTarget:
    """A detected CPython process.

    ``symbols`` maps the names in :data:`CALL_SYMBOLS` to run-time
    addresses in the target; ``path`` is the interpreter file as the target
    names it and ``opened_as`` the host path we read it through.
    """

    def __init__(self, pid: int, version: Tuple[int, int], path: str, opened_as: str,
                 bias: int, symbols: Dict[str, int], shared: bool, abiflags: str = "") -> None:
        self.pid = pid
        self.version = version
        self.path = path
        self.opened_as = opened_as
        self.bias = bias
        self.symbols = symbols
        self.shared = shared
        self.abiflags = abiflags
        #: [start, end) of each UNSAFE_FRAME_SYMBOLS function found, at run time.
        self.unsafe_ranges: List[Tuple[int, int]] = []
        #: The same for PENDING_UNSAFE_SYMBOLS.
        self.pending_unsafe_ranges: List[Tuple[int, int]] = []
        #: The same for GIL_WAIT_SYMBOLS.
        self.gil_wait_ranges: List[Tuple[int, int]] = []
        #: Run-time address of Py_AddPendingCall, if exported.
        self.pending_call: Optional[int] = None

    def __repr__(self) -> str:
        return "<PythonTarget pid=%d %d.%d%s %s %s>" % (
            self.pid, self.version[0], self.version[1], self.abiflags,
            "shared" if self.shared else "static", self.path)


def _skip(pid: int, reason: str, message: str) -> InjectionSkip:
    return InjectionSkip(reason, message, pid)


def _os_skip(pid: int, exc: OSError, what: str) -> InjectionSkip:
    if exc.errno in (errno.ENOENT, errno.ESRCH):
        return _skip(pid, "process_gone", "%s: %s" % (what, exc.strerror))
    if exc.errno in (errno.EPERM, errno.EACCES):
        from perfagent.ptrace.thread import eperm_hint
        return _skip(pid, "ptrace_eperm", "%s: %s (%s)" % (what, exc.strerror, eperm_hint(pid)))
    return _skip(pid, "not_python", "%s: %s" % (what, exc))


def libpython_version(name: str) -> Optional[Tuple[int, int, str]]:
    """(major, minor, abiflags) from a libpython file name or SONAME."""
    m = _LIBPYTHON_RE.match(os.path.basename(name))
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), m.group(3)


def _open_elf(pid: int, entry: MapEntry) -> Tuple[ELFFile, str, os.stat_result]:
    """The mapped file exactly (perfagent.target.files.open_as_seen: through
    the target's root, else its map_files link, same device and inode)."""
    seen, why = open_as_seen(pid, entry.path, entry.dev_major, entry.dev_minor, entry.inode,
                             entry.start, entry.end, entry.deleted)
    if seen is None:
        raise OSError(errno.ENOENT, "library not found on disk: %s (%s)" % (entry.path, why))
    st = seen.st
    return ELFFile.from_seen(seen), seen.path, st


def _symbols(elf: ELFFile, names: Iterable[str], sizes: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Link-time values of ``names`` from .dynsym, then .symtab (defined ones).

    ``sizes``, when given, receives each found symbol's st_size.
    """
    wanted = set(names)
    found: Dict[str, int] = {}
    for section in (".dynsym", ".symtab"):
        if elf.section(section) is None:
            continue
        for sym in elf.iter_symbols(section):
            if sym.name in wanted and sym.name not in found and sym.st_shndx != 0:
                found[sym.name] = sym.st_value
                if sizes is not None:
                    sizes[sym.name] = sym.st_size
        if len(found) == len(wanted):
            break
    return found


#: (st_dev, st_ino, st_size, st_mtime_ns) -> (symbols, sizes, soname): the
#: symbol scan is the slow part of detection (tens of ms in pure Python for
#: libpython's .symtab) and activate/deactivate of one process, or many
#: processes of one interpreter, read the same file.
_SYMBOL_CACHE: Dict[Tuple[int, int, int, int], Tuple[Dict[str, int], Dict[str, int], Optional[str]]] = {}
_SYMBOL_CACHE_MAX = 64


def _cached_symbols(elf: ELFFile, st: os.stat_result, wanted: Iterable[str]):
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _SYMBOL_CACHE.get(key)
    if hit is not None:
        return hit
    sizes: Dict[str, int] = {}
    syms = _symbols(elf, wanted, sizes)
    result = (syms, sizes, elf.soname)
    if len(_SYMBOL_CACHE) >= _SYMBOL_CACHE_MAX:
        _SYMBOL_CACHE.clear()
    _SYMBOL_CACHE[key] = result
    return result


def load_bias(elf: ELFFile, maps: List[MapEntry], entry: MapEntry) -> int:
    """Run-time address minus link-time address for the file of ``entry``.

    The mapping that starts at file offset 0 holds the first PT_LOAD (whose
    p_offset is 0): bias = map.start - page_down(p_vaddr).  A non-PIE
    executable links at its run-time address, giving 0.
    """
    first = None
    for seg in elf.segments:
        if seg.p_type == PT_LOAD:
            first = seg
            break
    if first is None:
        raise ELFError("no PT_LOAD segment")
    base_map = None
    for m in maps:
        if m.inode == entry.inode and m.path == entry.path and m.dev_major == entry.dev_major \
                and m.dev_minor == entry.dev_minor and m.pgoff == 0:
            base_map = m
            break
    if base_map is None:
        # No offset-0 mapping: derive from any mapping of the file.
        vaddr = elf.offset_to_vaddr(entry.pgoff)
        if vaddr is None:
            raise ELFError("offset %#x of %s is not loaded" % (entry.pgoff, entry.path))
        return entry.start - vaddr
    page = os.sysconf("SC_PAGE_SIZE")
    return base_map.start - ((first.p_vaddr - first.p_offset) & ~(page - 1))


def _exe_entry(pid: int, maps: List[MapEntry]) -> Optional[MapEntry]:
    exe = procfs.exe_path(pid)
    for m in maps:
        if m.path == exe and m.pgoff == 0:
            return m
    for m in maps:  # first file mapping is the executable
        if m.path.startswith("/"):
            return m
    return None


def detect(pid: int) -> PythonTarget:
    """Find the CPython interpreter in process ``pid``; raise InjectionSkip if none fits."""
    try:
        maps = read_maps(pid)
    except OSError as exc:
        raise _os_skip(pid, exc, "/proc/%d/maps" % pid) from None
    if not maps:
        raise _skip(pid, "process_gone", "no mappings (zombie or kernel thread)")

    entry: Optional[MapEntry] = None
    name_version: Optional[Tuple[int, int, str]] = None
    for m in maps:
        v = libpython_version(m.path)
        if v is not None:
            entry, name_version = m, v
            break
    shared = entry is not None
    if entry is None:
        entry = _exe_entry(pid, maps)
        if entry is None:
            raise _skip(pid, "not_python", "no file mappings")

    try:
        elf, opened_as, st = _open_elf(pid, entry)
    except ELFError as exc:
        raise _skip(pid, "not_python", "%s: %s" % (entry.path, exc)) from None
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES, errno.ESRCH):
            raise _os_skip(pid, exc, entry.path) from None
        if shared:
            raise _skip(pid, "not_python", "cannot read %s: %s" % (entry.path, exc)) from None
        raise _skip(pid, "not_python", "cannot read executable %s: %s" % (entry.path, exc)) from None
    try:
        wanted = (set(CALL_SYMBOLS) | set(INTERPRETER_SYMBOLS) | set(TRAMPOLINE_SYMBOLS)
                  | {VERSION_SYMBOL, PENDING_CALL_SYMBOL} | set(UNSAFE_FRAME_SYMBOLS)
                  | set(PENDING_UNSAFE_SYMBOLS) | set(GIL_WAIT_SYMBOLS))
        try:
            syms, sizes, soname = _cached_symbols(elf, st, wanted)
            if name_version is None:
                if soname:
                    name_version = libpython_version(soname)
            if not shared and not any(s in syms for s in INTERPRETER_SYMBOLS):
                raise _skip(pid, "not_python", "%s carries no CPython interpreter" % entry.path)
            bias = load_bias(elf, maps, entry)
        except ELFError as exc:
            raise _skip(pid, "not_python", "%s: %s" % (entry.path, exc)) from None
    finally:
        elf.close()

    abiflags = ""
    if name_version is not None:
        version = name_version[:2]
        abiflags = name_version[2]
    elif VERSION_SYMBOL in syms:
        try:
            raw = memory.read_exact(pid, syms[VERSION_SYMBOL] + bias, 4)
        except MemoryReadError:
            raise _skip(pid, "process_gone", "could not read Py_Version") from None
        except OSError as exc:
            raise _os_skip(pid, exc, "memory of process %d" % pid) from None
        hexversion = int.from_bytes(raw, "little")
        version = (hexversion >> 24, (hexversion >> 16) & 0xff)
    else:
        # Py_Version appeared in 3.11: an interpreter without it is older.
        raise _skip(pid, "python_too_old", "%s: no %s symbol (CPython < 3.11)" % (entry.path, VERSION_SYMBOL))

    if version < MIN_VERSION:
        raise _skip(pid, "python_too_old", "CPython %d.%d < %d.%d: no sys.activate_stack_trampoline"
                    % (version + MIN_VERSION))
    if not any(s in syms for s in TRAMPOLINE_SYMBOLS):
        raise _skip(pid, "no_perf_trampoline", "%s: built without --enable-perf-trampoline" % entry.path)
    missing = [s for s in CALL_SYMBOLS if s not in syms]
    if missing:
        raise _skip(pid, "no_libpython_symbols", "%s: missing %s" % (entry.path, ", ".join(missing)))
    target = PythonTarget(pid, version, entry.path, opened_as, bias,
                          {s: syms[s] + bias for s in CALL_SYMBOLS}, shared, abiflags)
    target.unsafe_ranges = _ranges(syms, sizes, bias, UNSAFE_FRAME_SYMBOLS)
    target.pending_unsafe_ranges = _ranges(syms, sizes, bias, PENDING_UNSAFE_SYMBOLS)
    target.gil_wait_ranges = _ranges(syms, sizes, bias, GIL_WAIT_SYMBOLS)
    if PENDING_CALL_SYMBOL in syms:
        target.pending_call = syms[PENDING_CALL_SYMBOL] + bias
    return target


def _ranges(syms: Dict[str, int], sizes: Dict[str, int], bias: int,
            names: Iterable[str]) -> List[Tuple[int, int]]:
    return sorted((syms[s] + bias, syms[s] + bias + sizes[s]) for s in names if sizes.get(s))
