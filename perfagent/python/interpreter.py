"""Find the CPython interpreter in a process, for reading its stacks from outside.

Everything is read without stopping or writing the target:

* the interpreter file from /proc/PID/maps: a ``libpython3.X[t|d...]``
  mapping (shared build), else the executable when it carries the
  interpreter (static build): a ``_PyRuntime`` symbol in ``.dynsym`` or
  ``.symtab``, or a ``.PyRuntime`` section (3.10+ put ``_PyRuntime`` there);
* the file is opened only through
  :func:`perfagent.target.files.open_as_seen` -- inside the process's root
  (containers), else its ``map_files`` entry (deleted files), accepted only
  when device and inode are the mapping's;
* the load bias from the mapping at file offset 0 and the first PT_LOAD, so
  PIE, non-PIE and shared objects all give ``_PyRuntime``'s run-time address;
* the version, first found of: the ``_Py_DebugOffsets`` at ``_PyRuntime``
  (3.13+), ``Py_Version`` read from memory (3.11+), the SONAME or mapped
  file name, and for a static 3.8-3.10 without either, the newest of three
  exported functions each of those versions added (``PyIter_Send`` 3.10,
  ``PyFrame_GetCode`` 3.9, ``PyCode_NewWithPosOnlyArgs`` 3.8);
* the :class:`~perfagent.python.layout.Layout`: the generated table for
  3.8-3.12, the interpreter's own debug offsets for 3.13+.

What comes from the file (symbols, SONAME, section, first PT_LOAD) is
cached per (device, inode, size, mtime), so many processes of one
interpreter parse it once.  Failures are :class:`InterpreterSkip` with a
``reason`` from :data:`REASONS`.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from typing import Dict, List, Optional, Tuple

from perfagent.records import NamedTuple
from perfagent import budget
from perfagent.elf import ELFFile
from perfagent.elf.constants import PT_LOAD
from perfagent.elf.elffile import string_offsets
from perfagent.errors import CaptureError, ELFError, ParseError
from perfagent.python import debug_offsets as dbg
from perfagent.python.layout import TABLE_VERSIONS, Layout, LayoutError, layout_for
from perfagent.symbolize.procmaps import MapEntry, parse_maps
from perfagent.target import files, memory, procfs

REASONS = ("not_python", "unknown_version", "free_threaded", "process_gone", "permission")

RUNTIME_SYMBOL = "_PyRuntime"
RUNTIME_SECTION = ".PyRuntime"
VERSION_SYMBOL = "Py_Version"          # const unsigned long Py_Version = PY_VERSION_HEX; (3.11+)
CODE_TYPE_SYMBOL = "PyCode_Type"       # ob_type of every code object

#: Exported functions first added in a version: (symbol, version), newest first.
VERSION_MARKERS = (("PyIter_Send", (3, 10)), ("PyFrame_GetCode", (3, 9)),
                   ("PyCode_NewWithPosOnlyArgs", (3, 8)))

#: glibc's libthread_db descriptor of ``struct pthread``'s ``tid`` member
#: (nptl_db/structs.def: DB_STRUCT_FIELD (pthread, tid)), a GLIBC_PRIVATE
#: export of libc.so.6: ``const uint32_t _thread_db_pthread_tid[3] =
#: { bits, count, offset }``.  pthread_t is the address of the thread's
#: struct pthread, so it turns PyThreadState.thread_id into a kernel tid
#: on versions without native_thread_id (3.8-3.10).
PTHREAD_TID_SYMBOL = "_thread_db_pthread_tid"
DB_DESC = struct.Struct("<III")

#: The eval loop: a native frame in it runs Python frames (for merging stacks).
EVAL_SYMBOL = "_PyEval_EvalFrameDefault"

WANTED = (RUNTIME_SYMBOL, VERSION_SYMBOL, CODE_TYPE_SYMBOL, EVAL_SYMBOL) + tuple(s for s, _ in VERSION_MARKERS)

#: libpython3.13.so.1.0, libpython3.13t.so.1.0, libpython3.12d.so, libpython3.7m.so ...
_LIBPYTHON_RE = re.compile(r"^libpython(\d+)\.(\d+)([a-z]*)\.so(\.[0-9.]*)?$")
#: libc.so.6, libc-2.31.so
_LIBC_RE = re.compile(r"^libc(\.so\.\d+|-[0-9.]+\.so)$")

_QWORD = struct.Struct("<Q")


class InterpreterSkip(CaptureError):
    """Process ``pid`` has no interpreter this reader can walk; ``reason`` in :data:`REASONS`."""

    def __init__(self, reason: str, message: str, pid: int = 0) -> None:
        super().__init__("pid=%d reason=%s: %s" % (pid, reason, message))
        self.reason = reason
        self.pid = pid


class FileInfo(NamedTuple):
    """What one interpreter file says about itself (cached per file)."""

    symbols: Dict[str, int]            # link-time values of WANTED found
    soname: Optional[str]
    runtime_section: Optional[int]     # sh_addr of .PyRuntime
    first_load: Tuple[int, int]        # (p_vaddr, p_offset) of the first PT_LOAD
    loads: Tuple[Tuple[int, int, int], ...]  # (p_offset, p_vaddr, p_filesz) of every PT_LOAD
    eval_size: int = 0                 # st_size of EVAL_SYMBOL (0 when not found)


class Interpreter:
    """A CPython found in a process (see the module docstring).

    ``runtime`` is the run-time address of ``_PyRuntime``; ``hexversion``
    is PY_VERSION_HEX when the process says it (3.11+), else 0; ``code_type``
    of ``PyCode_Type`` (0 when not exported); ``pthread_tid_offset`` the
    offset of ``tid`` in glibc's struct pthread, when libc exports it;
    ``eval_range`` the run-time [start, end) of ``_PyEval_EvalFrameDefault``
    (None when the file does not say).
    """

    __slots__ = ("pid", "start_time", "path", "opened_as", "shared", "mapping", "bias", "runtime",
                 "version", "hexversion", "abiflags", "layout", "code_type", "pthread_tid_offset",
                 "debug_offsets", "eval_range")

    def __init__(self, **kw) -> None:
        for name in self.__slots__:
            setattr(self, name, kw.pop(name, None))
        if kw:
            raise TypeError("unknown fields: %s" % ", ".join(kw))

    @property
    def free_threaded(self) -> bool:
        return False  # free-threaded builds are refused (InterpreterSkip free_threaded)

    def __repr__(self) -> str:
        return "<Interpreter pid=%d %s%s %s %s _PyRuntime=%#x>" % (
            self.pid, dbg.version_string(self.hexversion) if self.hexversion else "%d.%d" % self.version,
            self.abiflags, "shared" if self.shared else "static", self.path, self.runtime)


def libpython_version(name: str) -> Optional[Tuple[int, int, str]]:
    """(major, minor, abiflags) from a libpython file name or SONAME."""
    m = _LIBPYTHON_RE.match(os.path.basename(name))
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), m.group(3)


def _skip(pid: int, reason: str, message: str) -> InterpreterSkip:
    return InterpreterSkip(reason, message, pid)


def _os_skip(pid: int, exc: OSError, what: str) -> InterpreterSkip:
    if isinstance(exc, (FileNotFoundError, ProcessLookupError)) or exc.errno in (errno.ENOENT, errno.ESRCH):
        return _skip(pid, "process_gone", "%s: %s" % (what, exc.strerror or exc))
    if exc.errno in (errno.EPERM, errno.EACCES):
        return _skip(pid, "permission", "%s: %s (needs CAP_SYS_PTRACE or the same user)"
                     % (what, exc.strerror or exc))
    return _skip(pid, "not_python", "%s: %s" % (what, exc))


# ------------------------------------------------------------------ the file

_FILE_CACHE: Dict[Tuple[int, int, int, int], FileInfo] = {}
_FILE_CACHE_MAX = 64


def _file_info(pid: int, entry: MapEntry) -> Tuple[FileInfo, str]:
    """The FileInfo of the file ``entry`` maps, and the path it was opened as."""
    seen, why = files.open_as_seen(pid, entry.path, entry.dev_major, entry.dev_minor, entry.inode,
                                   entry.start, entry.end, entry.deleted)
    if seen is None:
        if "Permission denied" in why or "Operation not permitted" in why:
            raise OSError(errno.EACCES, why)
        raise OSError(errno.ENOENT, why)
    st = seen.st
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _FILE_CACHE.get(key)
    if hit is not None:
        os.close(seen.fd)
        return hit, seen.path
    opened_as = seen.path
    with ELFFile.from_seen(seen) as elf:  # takes the descriptor
        info = _read_file_info(elf, budget.Budget(opened_as))
    if len(_FILE_CACHE) >= _FILE_CACHE_MAX:
        _FILE_CACHE.clear()
    _FILE_CACHE[key] = info
    return info, opened_as


def _read_file_info(elf: ELFFile, work: budget.Budget) -> FileInfo:
    found: Dict[str, int] = {}
    eval_size = 0
    sec = elf.section(RUNTIME_SECTION)
    # .dynsym first: the exported symbols are there even in a stripped
    # file, and libpython's .symtab is ten times larger.  Every executable
    # of a whole machine comes here: the wanted names are looked for in
    # each table's strings first (one bytes.find each), and only the rows
    # naming one of them are looked at (decoding every symbol as an object
    # was 30-50 ms of a -a capture's start).  A file whose tables do not
    # name _PyRuntime (and that has no .PyRuntime section) is no
    # interpreter: no entry is unpacked and no other name searched for
    # (a Go binary's symbol strings run to megabytes).
    strings = {table: elf.symbol_strings(table, budget=work) for table in (".dynsym", ".symtab")}
    if sec is None and not any(string_offsets(s, RUNTIME_SYMBOL) for s in strings.values()):
        strings = {}
    for table in strings:
        offs = {off: name for name in WANTED if name not in found
                for off in string_offsets(strings[table], name)}
        if offs:
            rows, _ = elf.raw_symbols(table, budget=work)
            # (st_name, st_info, st_other, st_shndx, st_value, st_size)
            for r in [r for r in rows if r[0] in offs and r[3] != 0]:
                name = offs[r[0]]
                if name not in found:
                    found[name] = r[4]
                    if name == EVAL_SYMBOL:
                        eval_size = r[5]
        if RUNTIME_SYMBOL in found and VERSION_SYMBOL in found and EVAL_SYMBOL in found:
            break
    loads = tuple((s.p_offset, s.p_vaddr, s.p_filesz) for s in elf.segments if s.p_type == PT_LOAD)
    if not loads:
        raise ELFError("%s: no PT_LOAD segment" % elf.path)
    first = next(s for s in elf.segments if s.p_type == PT_LOAD)
    return FileInfo(found, elf.soname, sec.sh_addr if sec is not None and sec.sh_addr else None,
                    (first.p_vaddr, first.p_offset), loads, eval_size)


def load_bias(info: FileInfo, maps: List[MapEntry], entry: MapEntry) -> int:
    """Run-time minus link-time address for the file ``entry`` maps.

    The mapping at file offset 0 holds the first PT_LOAD (p_offset 0):
    bias = start - page_down(p_vaddr - p_offset).  Without one, any mapping
    of the file and the PT_LOAD covering its offset.  Non-PIE gives 0.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    for m in maps:
        if m.pgoff == 0 and m.inode == entry.inode and m.dev_major == entry.dev_major \
                and m.dev_minor == entry.dev_minor and m.path == entry.path:
            vaddr, offset = info.first_load
            return m.start - ((vaddr - offset) & ~(page - 1))
    for p_offset, p_vaddr, p_filesz in info.loads:
        if p_offset <= entry.pgoff < p_offset + max(p_filesz, 1):
            return entry.start - (p_vaddr + entry.pgoff - p_offset)
    raise ELFError("offset %#x of %s is not loaded" % (entry.pgoff, entry.path))


# ------------------------------------------------------------------ the process

def _read_maps(pid: int) -> List[MapEntry]:
    return parse_maps(procfs.maps_bytes(pid).decode("utf-8", "surrogateescape"))


def _candidates(pid: int, maps: List[MapEntry]) -> List[Tuple[MapEntry, Optional[Tuple[int, int, str]]]]:
    """Interpreter file candidates: libpython mappings, then the executable."""
    out: List[Tuple[MapEntry, Optional[Tuple[int, int, str]]]] = []
    seen = set()
    for m in maps:
        v = libpython_version(m.path)
        if v is not None and (m.dev_major, m.dev_minor, m.inode) not in seen:
            seen.add((m.dev_major, m.dev_minor, m.inode))
            out.append((m, v))
    exe = procfs.exe_path(pid)
    for m in maps:
        if m.path == exe and m.pgoff == 0:
            out.append((m, None))
            break
    else:
        for m in maps:
            if m.path.startswith("/"):
                out.append((m, None))
                break
    return out


def _read_memory(pid: int, addr: int, size: int) -> bytes:
    try:
        return memory.read(pid, addr, size)
    except OSError as exc:
        raise _os_skip(pid, exc, "memory of process %d" % pid) from None


def _libc_tid_offset(pid: int, maps: List[MapEntry], interp_info: FileInfo, bias: int) -> Optional[int]:
    """Offset of ``tid`` in glibc's struct pthread, read from the target's libc."""
    for m in maps:
        if _LIBC_RE.match(os.path.basename(m.path)):
            try:
                info, _ = _libc_info(pid, m)
                addr = info.symbols.get(PTHREAD_TID_SYMBOL)
                if addr is None:
                    return None
                raw = memory.read(pid, addr + load_bias(info, maps, m), DB_DESC.size)
            except budget.Cancelled:
                raise
            except (OSError, ParseError):
                return None
            return _tid_offset_from_desc(raw)
    return None


_LIBC_CACHE: Dict[Tuple[int, int, int, int], FileInfo] = {}


def _libc_info(pid: int, entry: MapEntry) -> Tuple[FileInfo, str]:
    seen, why = files.open_as_seen(pid, entry.path, entry.dev_major, entry.dev_minor, entry.inode,
                                   entry.start, entry.end, entry.deleted)
    if seen is None:
        raise OSError(errno.ENOENT, why)
    st = seen.st
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _LIBC_CACHE.get(key)
    if hit is not None:
        os.close(seen.fd)
        return hit, seen.path
    work = budget.Budget(seen.path)
    with ELFFile.from_seen(seen) as elf:  # takes the descriptor
        value = None
        for n, sym in enumerate(elf.iter_symbols(".dynsym")):
            if not n & 4095:
                work.check()
            if sym.name == PTHREAD_TID_SYMBOL and sym.st_shndx != 0:
                value = sym.st_value
                break
        loads = tuple((s.p_offset, s.p_vaddr, s.p_filesz) for s in elf.segments if s.p_type == PT_LOAD)
        if not loads:
            raise ELFError("%s: no PT_LOAD segment" % seen.path)
        first = next(s for s in elf.segments if s.p_type == PT_LOAD)
        info = FileInfo({PTHREAD_TID_SYMBOL: value} if value is not None else {}, None, None,
                        (first.p_vaddr, first.p_offset), loads)
    if len(_LIBC_CACHE) >= _FILE_CACHE_MAX:
        _LIBC_CACHE.clear()
    _LIBC_CACHE[key] = info
    return info, seen.path


def _tid_offset_from_desc(raw: bytes) -> Optional[int]:
    """A db_desc_t {bits, count, offset} for a 32-bit pid_t field; None otherwise."""
    if len(raw) != DB_DESC.size:
        return None
    bits, count, offset = DB_DESC.unpack(raw)
    if bits != 32 or count != 1 or offset > 1 << 16:
        return None
    return offset


def find_interpreter(pid: int, maps: Optional[List[MapEntry]] = None) -> Interpreter:
    """The CPython interpreter of process ``pid``; InterpreterSkip when there
    is none to read.  ``maps``: its mappings, when the caller just read them."""
    start = procfs.start_time(pid)
    if start is None:
        raise _skip(pid, "process_gone", "no such process")
    if maps is None:
        try:
            maps = _read_maps(pid)
        except OSError as exc:
            raise _os_skip(pid, exc, "/proc/%d/maps" % pid) from None
    if not maps:
        raise _skip(pid, "process_gone", "no mappings (zombie or kernel thread)")
    last: Optional[InterpreterSkip] = None
    for entry, name_version in _candidates(pid, maps):
        try:
            return _examine(pid, start, maps, entry, name_version)
        except InterpreterSkip as exc:
            if exc.reason != "not_python":
                raise
            last = exc
    raise last or _skip(pid, "not_python", "no file mappings")


def _examine(pid: int, start: int, maps: List[MapEntry], entry: MapEntry,
             name_version: Optional[Tuple[int, int, str]]) -> Interpreter:
    shared = name_version is not None
    try:
        info, opened_as = _file_info(pid, entry)
        bias = load_bias(info, maps, entry)
    except OSError as exc:
        raise _os_skip(pid, exc, entry.path) from None
    except budget.Cancelled:
        raise
    except ParseError as exc:  # a malformed ELF file, or one over its parse budget
        raise _skip(pid, "not_python", "%s: %s" % (entry.path, exc)) from None
    link_runtime = info.symbols.get(RUNTIME_SYMBOL, info.runtime_section)
    if link_runtime is None:
        raise _skip(pid, "not_python", "%s has no %s (symbol or %s section)"
                    % (entry.path, RUNTIME_SYMBOL, RUNTIME_SECTION))
    if name_version is None and info.soname:
        name_version = libpython_version(info.soname)
    abiflags = name_version[2] if name_version else ""
    runtime = link_runtime + bias
    if "t" in abiflags:
        raise _skip(pid, "free_threaded", "%s is a free-threaded build" % entry.path)

    head = _read_memory(pid, runtime, dbg.MAX_SIZE)
    if len(head) < dbg.HEAD.size:
        raise _skip(pid, "process_gone", "cannot read _PyRuntime at %#x" % runtime)
    debug: Optional[dbg.DebugOffsets] = None
    hexversion = 0
    version: Optional[Tuple[int, int]] = None
    if dbg.has_cookie(head):
        try:
            debug = dbg.parse(head)
        except dbg.DebugOffsetsError as exc:
            raise _skip(pid, exc.reason, "%s: %s" % (entry.path, exc)) from None
        hexversion, version = debug.hexversion, debug.version
    if VERSION_SYMBOL in info.symbols:
        raw = _read_memory(pid, info.symbols[VERSION_SYMBOL] + bias, 4)
        if len(raw) != 4:
            raise _skip(pid, "process_gone", "cannot read %s" % VERSION_SYMBOL)
        py_version = int.from_bytes(raw, "little")
        mm = (py_version >> 24, (py_version >> 16) & 0xFF)
        if version is not None and mm != version:
            raise _skip(pid, "unknown_version", "%s says %s, _Py_DebugOffsets %s" % (
                VERSION_SYMBOL, dbg.version_string(py_version), dbg.version_string(hexversion)))
        hexversion, version = py_version, mm
    if version is None and name_version is not None:
        version = name_version[:2]
    if version is None:
        version = next((v for s, v in VERSION_MARKERS if s in info.symbols), None)
    if version is None:
        raise _skip(pid, "unknown_version", "%s: cannot tell its CPython version (older than 3.8?)" % entry.path)
    if name_version is not None and name_version[:2] != version:
        raise _skip(pid, "unknown_version", "%s is named %d.%d but runs %d.%d"
                    % ((entry.path,) + name_version[:2] + version))

    layout = _layout(pid, entry, version, abiflags, debug)
    tid_offset = None
    if layout.tstate_native_thread_id is None:
        tid_offset = _libc_tid_offset(pid, maps, info, bias)
    code_type = info.symbols.get(CODE_TYPE_SYMBOL)
    eval_start = info.symbols.get(EVAL_SYMBOL)
    eval_range = (eval_start + bias, eval_start + bias + info.eval_size) \
        if eval_start is not None and info.eval_size else None
    return Interpreter(pid=pid, eval_range=eval_range, start_time=start, path=entry.path, opened_as=opened_as, shared=shared,
                       mapping=entry, bias=bias, runtime=runtime, version=version, hexversion=hexversion,
                       abiflags=abiflags, layout=layout,
                       code_type=code_type + bias if code_type is not None else 0,
                       pthread_tid_offset=tid_offset, debug_offsets=debug)


def _layout(pid: int, entry: MapEntry, version: Tuple[int, int], abiflags: str,
            debug: Optional[dbg.DebugOffsets]) -> Layout:
    vs = "%d.%d" % version
    if version < TABLE_VERSIONS[0]:
        raise _skip(pid, "unknown_version", "CPython %s is older than 3.8" % vs)
    try:
        if version <= TABLE_VERSIONS[1]:
            if "d" in abiflags:
                # The table is for release builds; Py_DEBUG changes structures.
                raise _skip(pid, "unknown_version", "%s is a debug build (no offset table)" % entry.path)
            return layout_for(version)
        if debug is None:
            raise _skip(pid, "unknown_version", "CPython %s without _Py_DebugOffsets at _PyRuntime" % vs)
        return dbg.layout_from_debug_offsets(debug)
    except LayoutError as exc:
        raise _skip(pid, exc.reason, str(exc)) from None
