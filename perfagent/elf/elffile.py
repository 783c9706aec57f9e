"""A small, strict, read-only ELF reader (ELF32/ELF64, either byte order).

The profiler meets arbitrary files: half-written binaries, files truncated by
a full disk, deliberately odd ones.  So every byte the reader looks at is
fetched through one choke point (:meth:`ELFFile._span`, :meth:`ELFFile._unpack`
and :class:`_StringTable`, all run inside :meth:`ELFFile._parsing`), which
bounds-checks and turns ``struct.error``, ``IndexError``, ``ValueError``
(including ``UnicodeDecodeError``), ``OverflowError`` and ``zlib.error`` into
:class:`~perfagent.errors.ELFError`.  A malformed file raises nothing else,
except :class:`~perfagent.budget.BudgetExceeded` (also a ParseError) when
the work it asks for exceeds the caller's :class:`~perfagent.budget.Budget`.

Sizes come from the file, so none is trusted to size an allocation: a
compressed section may inflate to at most :data:`MAX_INFLATE_RATIO` times
its compressed bytes (real sections compress 2-6x), inflated incrementally so
a zlib bomb stops at that cap, and every inflated byte and decoded symbol is
charged to the budget.

Files are mmapped read-only when possible so that a 30 MB libpython is not
copied into the heap just to read its headers and symbol table.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
import zlib
from typing import Dict, Iterator, List, Optional, Tuple, Union

from perfagent.records import NamedTuple
from .. import budget as _budget
from ..budget import Budget
from ..errors import ELFError
from .constants import (
    EI_ABIVERSION, EI_CLASS, EI_DATA, EI_NIDENT, EI_OSABI, EI_VERSION,
    ELF_NOTE_GNU, ELFCLASS32, ELFCLASS64, ELFCOMPRESS_ZLIB, ELFDATA2LSB,
    ELFDATA2MSB, ELFMAG, DT_NULL, DT_SONAME, DT_STRSZ, DT_STRTAB,
    NT_GNU_BUILD_ID, PN_XNUM, PT_DYNAMIC, PT_NOTE, SHF_COMPRESSED, SHN_UNDEF,
    SHN_XINDEX, SHT_DYNAMIC, SHT_DYNSYM, SHT_NOBITS, SHT_NOTE, SHT_SYMTAB,
)
from .loadmap import LoadMap
from .structs import ElfLayouts, layouts_for

# Exceptions that mean "the bytes are not what the headers claim".
_MALFORMED = (struct.error, IndexError, ValueError, OverflowError, zlib.error)

#: A compressed section may inflate to at most this many times its compressed
#: size, and all inflation of one file together (each call counts: section
#: headers may alias) to this many times the file's size.  zlib reaches ~1000x
#: on zeros, so without a cap a 1 MB section could ask for a gigabyte; real
#: debug sections and symbol tables compress 2-6x.
MAX_INFLATE_RATIO = 64

#: ... but a tiny section may always inflate to this much.
MIN_INFLATE_CAP = 1 << 20

#: And no section ever inflates beyond this.
_MAX_DECOMPRESSED = 1 << 30

#: Bytes inflated per zlib call: the unit of budget checks while inflating.
_INFLATE_CHUNK = 1 << 20

#: Bytes charged to the budget per decoded symbol: the Symbol tuple, its
#: fields and its name string, roughly (so a symbol table that would not fit
#: in the budget's memory fails instead of being decoded).
SYMBOL_COST = 160

#: Bytes charged per raw symbol row (a 6-int tuple) by ELFFile.raw_symbols.
RAW_SYMBOL_COST = 100

#: Symbols decoded between two budget checks.
_SYMBOLS_PER_CHECK = 4096

#: Note segments (or note sections) read per file.
MAX_NOTE_SOURCES = 64

#: Bytes of .gnu_debuglink looked at: a PATH_MAX name, padding, the CRC.
_DEBUGLINK_MAX = 4096 + 8

#: Names longer than this are charged to the budget by their length.
_LONG_NAME = 256

#: How many times its own size a string table may hand out in long names.
_LONG_NAME_RATIO = 8

#: Longest symbol or section name returned; longer ones are cut.  (The
#: longest C++ names of a distribution are a few KiB; without a cap, many
#: symbols pointing into one long NUL-less run would each copy all of it.)
MAX_NAME_BYTES = 1 << 16

_EMPTY = memoryview(b"")


class ELFHeader(NamedTuple):
    """Elf32_Ehdr / Elf64_Ehdr, raw values as stored in the file."""

    e_ident: bytes
    e_type: int
    e_machine: int
    e_version: int
    e_entry: int
    e_phoff: int
    e_shoff: int
    e_flags: int
    e_ehsize: int
    e_phentsize: int
    e_phnum: int
    e_shentsize: int
    e_shnum: int
    e_shstrndx: int


class Segment(NamedTuple):
    """One program header (Elf32_Phdr / Elf64_Phdr)."""

    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_align: int


class Section(NamedTuple):
    """One section header (Elf32_Shdr / Elf64_Shdr) plus its resolved name."""

    name: str
    sh_name: int
    sh_type: int
    sh_flags: int
    sh_addr: int
    sh_offset: int
    sh_size: int
    sh_link: int
    sh_info: int
    sh_addralign: int
    sh_entsize: int


class Symbol(NamedTuple):
    """One Elf32_Sym / Elf64_Sym with st_info split into type and binding."""

    name: str
    st_value: int
    st_size: int
    st_type: int
    st_bind: int
    st_shndx: int
    st_other: int


class Note(NamedTuple):
    """One Elf_Nhdr record; ``n_name`` without its terminating NUL."""

    n_name: bytes
    n_type: int
    n_desc: bytes


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


class _StringTable:
    """NUL-terminated strings of one SHT_STRTAB, read in place.

    ``buf`` is the file's own buffer (bytes or mmap, both have ``find``) so no
    multi-megabyte .strtab is copied; ``[base, end)`` bounds the table.
    ``long_bytes`` counts the bytes of names longer than
    :data:`_LONG_NAME`, for the symbol decoder to charge to its budget
    (short names are covered by :data:`SYMBOL_COST`).  Entries may point
    into the middle of other strings (linkers merge common tails), but
    never so often that the names handed out outgrow the table many times
    over: past :data:`_LONG_NAME_RATIO` times the table's size (at least
    :data:`MAX_NAME_BYTES` x 16) the table is treated as malformed, so
    offsets aimed again and again into one long string cannot turn a small
    file into gigabytes of names.
    """

    __slots__ = ("_buf", "_base", "_end", "_what", "long_bytes", "_long_cap")

    def __init__(self, buf, base: int, end: int, what: str) -> None:
        self._buf = buf
        self._base = base
        self._end = end
        self._what = what
        self.long_bytes = 0
        self._long_cap = max(16 * MAX_NAME_BYTES, _LONG_NAME_RATIO * (end - base))

    def _slice(self, offset: int):
        # Per-symbol hot path: one find over a bounded window, one slice.
        if offset == 0:
            return b""  # index 0 is the empty string by definition
        start = self._base + offset
        end = self._end
        if start >= end:
            raise ELFError("%s: string offset %d past the end of the table" % (self._what, offset))
        limit = start + MAX_NAME_BYTES
        if limit < end:
            # A NUL further on than the window only means a name longer than
            # any real one: it is cut rather than copied whole.
            nul = self._buf.find(b"\0", start, limit)
            if nul < 0:
                nul = limit
        else:
            nul = self._buf.find(b"\0", start, end)
            if nul < 0:
                raise ELFError("%s: string at offset %d has no terminating NUL" % (self._what, offset))
        if nul - start > _LONG_NAME:
            self.long_bytes += nul - start
            if self.long_bytes > self._long_cap:
                raise ELFError("%s: names overlap far more than a linker's tail merging would "
                               "(%d bytes of long names from a %d-byte table)"
                               % (self._what, self.long_bytes, self._end - self._base))
        return self._buf[start:nul]

    def get_bytes(self, offset: int) -> bytes:
        return bytes(self._slice(offset))  # no copy when the buffer is bytes

    def copy(self) -> bytes:
        """The whole table, as bytes of its own (for names decoded later)."""
        return bytes(self._buf[self._base:self._end])

    def get(self, offset: int) -> str:
        # Symbol and section names are display strings: one odd byte must not
        # make a whole table unreadable, nor leak surrogates into the profile.
        return self._slice(offset).decode("utf-8", "replace")


def string_offsets(strings: bytes, name: str) -> List[int]:
    """Every offset of a NUL-terminated string table (ELF's, BTF's) whose
    string is ``name``: its own start, and any longer string it is the tail
    of (linkers and pahole share tails)."""
    needle = name.encode() + b"\0"
    offs = []
    pos = strings.find(needle)
    while pos >= 0:
        offs.append(pos)
        pos = strings.find(needle, pos + 1)
    return offs


def symbol_name(strings: bytes, offset: int) -> Optional[str]:
    """The name at ``offset`` of a string table copied by
    :meth:`ELFFile.raw_symbols`: cut at :data:`MAX_NAME_BYTES`, odd bytes
    replaced; None when the offset is outside the table or the string has
    no terminating NUL (a malformed entry costs that symbol only)."""
    if offset == 0:
        return ""
    end = len(strings)
    if offset >= end:
        return None
    limit = offset + MAX_NAME_BYTES
    nul = strings.find(b"\0", offset, min(limit, end))
    if nul < 0:
        if limit >= end:
            return None
        nul = limit
    return strings[offset:nul].decode("utf-8", "replace")


class ELFFile:
    """A parsed ELF image.

    Construction parses the ELF header, program headers and section headers;
    everything else (symbols, notes, .dynamic) is read on demand.  Attributes
    named after header fields (``e_type``, ``e_shnum``, ...) hold the raw
    header values; ``num_segments``, ``num_sections`` and ``shstrndx`` hold
    the real counts after resolving extended numbering (PN_XNUM, e_shnum 0,
    SHN_XINDEX via section header 0).

    An instance made by :meth:`from_path` may hold an mmap (and the
    descriptor mmap keeps); call :meth:`close` or use it as a context
    manager.  Memoryviews returned by :meth:`section_data` are only valid
    until then.

    ``budget`` bounds the lazily parsed parts (inflating sections, decoding
    symbols); methods that do such work also take a ``budget`` argument
    that overrides it for one call.  The default,
    :func:`perfagent.budget.default`, only honours cancellation: the size
    caps above still hold.
    """

    def __init__(self, data: Union[bytes, bytearray, mmap.mmap], path: Optional[str] = None,
                 _mmap: Optional[mmap.mmap] = None, budget: Optional[Budget] = None) -> None:
        self.path = path
        self.budget = budget if budget is not None else _budget.default()
        self._data = data
        self._mmap = _mmap
        self._view = memoryview(data)
        self._size = len(self._view)
        self._section_index: Optional[Dict[str, Section]] = None
        self._build_id: Optional[str] = None
        self._build_id_done = False
        # All inflation of this file together: see MAX_INFLATE_RATIO.
        self._inflate_left = max(MIN_INFLATE_CAP, MAX_INFLATE_RATIO * self._size)
        try:
            with self._parsing():
                self._read_header()
                section_zero = self._read_section_zero()
                self._resolve_counts(section_zero)
                self.segments: List[Segment] = self._read_segments()
                self.sections: List[Section] = self._read_sections()
        except BaseException:
            self._view.release()
            raise
        self.load_map = LoadMap(self.segments)

    # ------------------------------------------------------------------ opening

    @classmethod
    def from_path(cls, path: str) -> "ELFFile":
        """Open ``path``; OSError if it can't be read, ELFError if not ELF.

        Opened with perfagent.target.files.open_untrusted: never blocks on a
        FIFO, refuses anything but a regular file, and maps the file only
        when no other user can truncate it (otherwise a bounded copy is read,
        so a file shrunk under us is malformed input rather than SIGBUS).
        """
        from perfagent.target.files import NotRegularFile, open_untrusted
        try:
            seen = open_untrusted(path, own_namespace=not path.startswith("/proc/"))
        except NotRegularFile as exc:
            raise ELFError(exc.strerror) from None
        return cls.from_seen(seen)

    @classmethod
    def from_seen(cls, seen, budget: Optional[_budget.Budget] = None) -> "ELFFile":
        """Parse an opened file (a perfagent.target.files.SeenFile); takes its fd."""
        from perfagent.target.files import load_contents
        try:
            data = load_contents(seen)
        except OSError as exc:
            raise ELFError("%s: %s" % (seen.path, exc.strerror or exc)) from None
        if not data:
            raise ELFError("%s: empty file" % seen.path)
        mapped = data if isinstance(data, mmap.mmap) else None
        try:
            return cls(data, path=seen.path, _mmap=mapped, budget=budget)
        except BaseException:
            _close_mmap(mapped)
            raise

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview], path: Optional[str] = None,
                   budget: Optional[Budget] = None) -> "ELFFile":
        """Parse an in-memory image, e.g. the [vdso] read from /proc/PID/mem."""
        if not isinstance(data, bytes):
            data = bytes(data)  # immutable, and slices that os.fsdecode accepts
        if not data:
            raise ELFError("%s: empty image" % (path or "<bytes>"))
        return cls(data, path=path, budget=budget)

    def close(self) -> None:
        """Release the buffer (and the mmap with its descriptor)."""
        self._view.release()
        _close_mmap(self._mmap)
        self._mmap = None

    def __enter__(self) -> "ELFFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<ELFFile %s ELF%d %s e_type=%d>" % (
            self.path or "<bytes>", self.elfclass,
            "LSB" if self.little_endian else "MSB", self.e_type)

    # ------------------------------------------------------------ choke point

    @contextlib.contextmanager
    def _parsing(self) -> Iterator[None]:
        """Turn any library exception raised by bad bytes into ELFError."""
        try:
            yield
        except ELFError:
            raise
        except _MALFORMED as exc:
            raise ELFError("%s: malformed ELF (%s: %s)" % (self._label, type(exc).__name__, exc)) from exc

    @property
    def _label(self) -> str:
        return self.path or "<bytes>"

    def _error(self, message: str) -> ELFError:
        return ELFError("%s: %s" % (self._label, message))

    def _check_range(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or size < 0 or offset + size > self._size:
            raise self._error("%s at offset %#x size %#x lies outside the file (size %#x)"
                              % (what, offset, size, self._size))

    def _span(self, offset: int, size: int, what: str) -> memoryview:
        """A bounds-checked zero-copy view of ``size`` bytes at ``offset``."""
        self._check_range(offset, size, what)
        return self._view[offset:offset + size]

    def _unpack(self, layout: struct.Struct, offset: int, what: str) -> tuple:
        self._check_range(offset, layout.size, what)
        return layout.unpack_from(self._view, offset)

    def _table(self, offset: int, entsize: int, count: int, layout: struct.Struct,
               what: str) -> List[tuple]:
        """``count`` fixed-size entries of ``layout`` spaced ``entsize`` apart."""
        if count == 0:
            return []
        if entsize < layout.size:
            raise self._error("%s entry size %d is smaller than %d" % (what, entsize, layout.size))
        self._check_range(offset, entsize * count, what)
        view = self._view
        return [layout.unpack_from(view, offset + i * entsize) for i in range(count)]

    # ---------------------------------------------------------------- headers

    def _read_header(self) -> None:
        if self._size < EI_NIDENT:
            raise self._error("file too short for e_ident (%d bytes)" % self._size)
        ident = bytes(self._view[:EI_NIDENT])
        if ident[:4] != ELFMAG:
            raise self._error("not an ELF file (bad magic %r)" % ident[:4])
        if ident[EI_CLASS] not in (ELFCLASS32, ELFCLASS64):
            raise self._error("bad EI_CLASS %d" % ident[EI_CLASS])
        if ident[EI_DATA] not in (ELFDATA2LSB, ELFDATA2MSB):
            raise self._error("bad EI_DATA %d" % ident[EI_DATA])
        self.little_endian = ident[EI_DATA] == ELFDATA2LSB
        self.elfclass = 64 if ident[EI_CLASS] == ELFCLASS64 else 32
        self.ei_version = ident[EI_VERSION]
        self.ei_osabi = ident[EI_OSABI]
        self.ei_abiversion = ident[EI_ABIVERSION]
        self._layouts: ElfLayouts = layouts_for(ident[EI_CLASS], self.little_endian)
        self.header = ELFHeader(*self._unpack(self._layouts.Ehdr, 0, "ELF header"))
        h = self.header
        self.e_ident = h.e_ident
        self.e_type = h.e_type
        self.e_machine = h.e_machine
        self.e_version = h.e_version
        self.e_entry = h.e_entry
        self.e_phoff = h.e_phoff
        self.e_shoff = h.e_shoff
        self.e_flags = h.e_flags
        self.e_ehsize = h.e_ehsize
        self.e_phentsize = h.e_phentsize
        self.e_phnum = h.e_phnum
        self.e_shentsize = h.e_shentsize
        self.e_shnum = h.e_shnum
        self.e_shstrndx = h.e_shstrndx

    def _read_section_zero(self) -> Optional[tuple]:
        """Section header 0, which carries the overflow of extended numbering."""
        if self.e_shoff == 0:
            return None
        Shdr = self._layouts.Shdr
        if self.e_shentsize < Shdr.size:
            raise self._error("e_shentsize %d is smaller than %d" % (self.e_shentsize, Shdr.size))
        return self._unpack(Shdr, self.e_shoff, "section header 0")

    def _resolve_counts(self, section_zero: Optional[tuple]) -> None:
        # Elf_Shdr field positions: sh_size 5, sh_link 6, sh_info 7.
        num_segments = self.e_phnum if self.e_phoff else 0
        if section_zero is None:
            # No section header table (e_shoff 0, as sstrip leaves it): any
            # section count in the header is meaningless.
            if num_segments == PN_XNUM:
                raise self._error("e_phnum is PN_XNUM but there is no section header 0")
            num_sections, shstrndx = 0, SHN_UNDEF
        else:
            num_sections = self.e_shnum or section_zero[5]
            shstrndx = section_zero[6] if self.e_shstrndx == SHN_XINDEX else self.e_shstrndx
            if num_segments == PN_XNUM:
                num_segments = section_zero[7]
        self.num_sections = num_sections
        self.num_segments = num_segments
        self.shstrndx = shstrndx

    def _read_segments(self) -> List[Segment]:
        L = self._layouts
        rows = self._table(self.e_phoff, self.e_phentsize, self.num_segments, L.Phdr, "program header table")
        order = L.phdr_order
        return [Segment(*[row[i] for i in order]) for row in rows]

    def _read_sections(self) -> List[Section]:
        L = self._layouts
        rows = self._table(self.e_shoff, self.e_shentsize, self.num_sections, L.Shdr, "section header table")
        if not rows:
            return []
        names = None
        if self.shstrndx != SHN_UNDEF:
            if self.shstrndx >= len(rows):
                raise self._error("e_shstrndx %d out of range (%d sections)" % (self.shstrndx, len(rows)))
            names = self._string_table_at(rows[self.shstrndx], "section name string table")
        return [Section(names.get(row[0]) if names is not None else "", *row) for row in rows]

    # --------------------------------------------------------------- sections

    def section(self, name: str) -> Optional[Section]:
        """The first section called ``name``, or None."""
        if self._section_index is None:
            index: Dict[str, Section] = {}
            for sec in self.sections:
                index.setdefault(sec.name, sec)
            self._section_index = index
        return self._section_index.get(name)

    def section_data(self, sec: Section, budget: Optional[Budget] = None) -> memoryview:
        """The section's contents, decompressed if SHF_COMPRESSED.

        SHT_NOBITS sections (.bss, and everything a debug-only file stripped)
        have no bytes in the file and yield an empty view.  Inflated bytes
        are charged to ``budget`` (default: the file's).
        """
        if sec.sh_type == SHT_NOBITS or sec.sh_size == 0:
            return _EMPTY
        if budget is None:
            budget = self.budget
        with self._parsing():
            raw = self._span(sec.sh_offset, sec.sh_size, "section %r" % sec.name)
            if sec.sh_flags & SHF_COMPRESSED:
                return memoryview(self._decompress(raw, sec.name, budget))
            if sec.name.startswith(".zdebug") and raw[:4] == b"ZLIB":
                return memoryview(self._decompress_zdebug(raw, sec.name, budget))
            return raw

    def _decompress(self, raw: memoryview, name: str, budget: Budget) -> bytearray:
        """Inflate an Elf_Chdr-prefixed SHF_COMPRESSED section."""
        L = self._layouts
        if len(raw) < L.Chdr.size:
            raise self._error("section %r too short for its compression header" % name)
        chdr = L.Chdr.unpack_from(raw, 0)
        if self.elfclass == 64:
            ch_type, _reserved, ch_size, _align = chdr
        else:
            ch_type, ch_size, _align = chdr
        if ch_type != ELFCOMPRESS_ZLIB:
            raise self._error("section %r uses unsupported compression type %d" % (name, ch_type))
        return self._inflate(raw[L.Chdr.size:], ch_size, name, budget)

    def _decompress_zdebug(self, raw: memoryview, name: str, budget: Budget) -> bytearray:
        """The pre-SHF_COMPRESSED GNU format: b"ZLIB", 8-byte big-endian size."""
        if len(raw) < 12:
            raise self._error("section %r too short for its ZLIB header" % name)
        size = int.from_bytes(raw[4:12], "big")
        return self._inflate(raw[12:], size, name, budget)

    def _inflate(self, payload: memoryview, size: int, name: str, budget: Budget) -> bytearray:
        """Inflate ``payload`` to exactly ``size`` bytes, never allocating more.

        ``size`` comes from the file, so it is checked against the payload
        (see :data:`MAX_INFLATE_RATIO`) and charged to the budget before
        anything is inflated; zlib then inflates a chunk at a time (budget
        checks in between) into an output that grows as bytes arrive, and
        may not produce a byte more.
        """
        cap = min(_MAX_DECOMPRESSED, max(MIN_INFLATE_CAP, MAX_INFLATE_RATIO * len(payload)))
        if size > cap:
            raise self._error("section %r claims %d decompressed bytes from %d compressed "
                              "(more than %dx)" % (name, size, len(payload), MAX_INFLATE_RATIO))
        if size > self._inflate_left:
            # Many section headers can point at the same compressed bytes.
            raise self._error("section %r: inflating it would take the file's sections past "
                              "%dx the file's size" % (name, MAX_INFLATE_RATIO))
        if size == 0:
            return bytearray()
        budget.charge(size)
        self._inflate_left -= size
        out = bytearray()  # grown as bytes arrive: a header that lies costs nothing
        inflater = zlib.decompressobj()
        pending = payload
        while len(out) < size:
            budget.check()
            chunk = inflater.decompress(pending, min(_INFLATE_CHUNK, size - len(out)))
            if not chunk:
                break  # the stream ended (or was cut) early
            out += chunk
            pending = inflater.unconsumed_tail
        if len(out) != size:
            raise self._error("section %r inflates to %d bytes, header says %d" % (name, len(out), size))
        if not inflater.eof and inflater.decompress(pending, 1):
            raise self._error("section %r inflates to more than the %d bytes its header says"
                              % (name, size))
        return out

    def _string_table_at(self, row_or_section, what: str) -> _StringTable:
        """A string table from a raw Elf_Shdr tuple or a Section."""
        if isinstance(row_or_section, Section):
            sec = row_or_section
            sh_type, sh_flags, sh_offset, sh_size = sec.sh_type, sec.sh_flags, sec.sh_offset, sec.sh_size
        else:
            _n, sh_type, sh_flags, _a, sh_offset, sh_size = row_or_section[:6]
        if sh_type == SHT_NOBITS:
            return _StringTable(b"", 0, 0, what)
        if sh_flags & SHF_COMPRESSED:
            data = self._decompress(self._span(sh_offset, sh_size, what), what, self.budget)
            return _StringTable(data, 0, len(data), "%s: %s" % (self._label, what))
        self._check_range(sh_offset, sh_size, what)
        return _StringTable(self._data, sh_offset, sh_offset + sh_size, "%s: %s" % (self._label, what))

    def _linked_section(self, sec: Section) -> Section:
        if not 0 < sec.sh_link < len(self.sections):
            raise self._error("section %r sh_link %d out of range" % (sec.name, sec.sh_link))
        return self.sections[sec.sh_link]

    # ---------------------------------------------------------------- symbols

    def iter_symbols(self, section_name: str, budget: Optional[Budget] = None) -> Iterator[Symbol]:
        """Every entry of ``.symtab`` or ``.dynsym`` (including entry 0).

        A missing or SHT_NOBITS table yields nothing.  The symbols are
        charged to ``budget`` (default: the file's) before decoding starts,
        :data:`SYMBOL_COST` bytes each, and the budget is checked every few
        thousand symbols.
        """
        sec = self.section(section_name)
        if sec is None or sec.sh_type == SHT_NOBITS:
            return iter(())
        return self._iter_symbols_of(sec, budget if budget is not None else self.budget)

    def _iter_symbols_of(self, sec: Section, budget: Budget) -> Iterator[Symbol]:
        with self._parsing():
            if sec.sh_type not in (SHT_SYMTAB, SHT_DYNSYM):
                raise self._error("section %r is not a symbol table (sh_type %d)" % (sec.name, sec.sh_type))
            strtab = self._string_table_at(self._linked_section(sec), "string table of %s" % sec.name)
            yield from self._decode_symbols(self.section_data(sec, budget), sec.sh_entsize, strtab, budget)

    def _decode_symbols(self, data: memoryview, entsize: int, strtab: _StringTable,
                        budget: Budget) -> Iterator[Symbol]:
        # Whole symbol tables are decoded once per binary (tens of thousands
        # of entries for libpython), so this loop avoids per-field work:
        # iter_unpack over the memoryview when entries are packed, and
        # positional indexes precomputed for the class's field order.  The
        # budget is checked per batch of symbols, not per symbol.
        Sym = self._layouts.Sym
        entsize = entsize or Sym.size
        if entsize < Sym.size:
            raise self._error("symbol entry size %d is smaller than %d" % (entsize, Sym.size))
        count = len(data) // entsize  # what the section's bytes can hold, whatever sh_info says
        budget.charge(count * SYMBOL_COST)
        i_name, i_info, i_other, i_shndx, i_value, i_size = self._layouts.sym_order
        name_of = strtab.get
        charged_names = 0
        for first in range(0, count, _SYMBOLS_PER_CHECK):
            budget.check()
            if strtab.long_bytes != charged_names:
                budget.charge(strtab.long_bytes - charged_names)
                charged_names = strtab.long_bytes
            last = min(count, first + _SYMBOLS_PER_CHECK)
            if entsize == Sym.size:
                rows = Sym.iter_unpack(data[first * entsize:last * entsize])
            else:
                rows = (Sym.unpack_from(data, i * entsize) for i in range(first, last))
            for row in rows:
                info = row[i_info]
                yield Symbol(name_of(row[i_name]), row[i_value], row[i_size],
                             info & 0xF, info >> 4, row[i_shndx], row[i_other])

    def symbol_strings(self, section_name: str, budget: Optional[Budget] = None) -> bytes:
        """A copy of the string table linked to ``.symtab`` or ``.dynsym``
        (b"" without the table), no entry unpacked: a caller after a few
        names (is this file a Python interpreter?) searches it first and
        unpacks the entries (:meth:`raw_symbols`) only when one is there."""
        sec = self.section(section_name)
        if sec is None or sec.sh_type == SHT_NOBITS:
            return b""
        work = budget if budget is not None else self.budget
        with self._parsing():
            strtab = self._symbol_strtab(sec)
            work.charge(strtab._end - strtab._base)
            work.check()
            return strtab.copy()

    def _symbol_strtab(self, sec: Section):
        if sec.sh_type not in (SHT_SYMTAB, SHT_DYNSYM):
            raise self._error("section %r is not a symbol table (sh_type %d)" % (sec.name, sec.sh_type))
        return self._string_table_at(self._linked_section(sec), "string table of %s" % sec.name)

    def raw_symbols(self, section_name: str, budget: Optional[Budget] = None,
                    infos: Optional[bytes] = None) -> Tuple[list, bytes]:
        """(rows, strings) of ``.symtab`` or ``.dynsym``, decoded in bulk.

        ``rows`` are the raw entries as tuples in the spec's field order
        (st_name, st_info, st_other, st_shndx, st_value, st_size), unpacked
        by one ``iter_unpack`` over the section (no per-symbol Python work:
        callers filter on st_info/st_shndx in a comprehension); ``strings``
        is a copy of the linked string table, for names decoded later with
        :func:`symbol_name` only where they are needed.  A missing or
        SHT_NOBITS table gives ([], b"").  Charged to ``budget`` like
        :meth:`iter_symbols`.

        ``infos``, a 256-byte ``bytes.translate`` table, keeps only the
        entries whose st_info it maps to a non-zero byte, chosen before
        any entry is unpacked: the st_info column is sliced out of the
        section and translated, and only the marked entries unpacked, all
        in C (a function table keeps a third of libpython's .symtab).
        """
        sec = self.section(section_name)
        if sec is None or sec.sh_type == SHT_NOBITS:
            return [], b""
        work = budget if budget is not None else self.budget
        with self._parsing():
            strtab = self._symbol_strtab(sec)
            data = self.section_data(sec, work)
            Sym = self._layouts.Sym
            entsize = sec.sh_entsize or Sym.size
            if entsize < Sym.size:
                raise self._error("symbol entry size %d is smaller than %d" % (entsize, Sym.size))
            count = len(data) // entsize
            work.charge(count * RAW_SYMBOL_COST + (strtab._end - strtab._base))
            work.check()
            if infos is not None:
                info_off = self._layouts.sym_info_off
                marks = bytes(data[info_off:count * entsize:entsize]).translate(infos)
                unpack_from = Sym.unpack_from
                rows = [unpack_from(data, i * entsize) for i in itertools.compress(range(count), marks)]
            elif entsize == Sym.size:
                rows = list(Sym.iter_unpack(data[:count * entsize]))
            else:
                rows = [Sym.unpack_from(data, i * entsize) for i in range(count)]
            if self._layouts.sym_order != tuple(range(6)):
                order = self._layouts.sym_order
                rows = [tuple(row[i] for i in order) for row in rows]
            work.check()
            return rows, strtab.copy()

    # ------------------------------------------------------------------ notes

    def iter_notes(self) -> Iterator[Note]:
        """Notes from the PT_NOTE segments, or the SHT_NOTE sections if none."""
        sources = self._segment_note_sources() or self._section_note_sources()
        return self._iter_notes_in(sources)

    def _segment_note_sources(self) -> List[Tuple[Segment, int, int]]:
        return _distinct_sources((s, s.p_offset, s.p_filesz) for s in self.segments
                                 if s.p_type == PT_NOTE and s.p_filesz)

    def _section_note_sources(self) -> List[Tuple[Section, int, int]]:
        return _distinct_sources((s, s.sh_offset, s.sh_size) for s in self.sections
                                 if s.sh_type == SHT_NOTE and s.sh_size)

    def _iter_notes_in(self, sources) -> Iterator[Note]:
        with self._parsing():
            for header, offset, size in sources:
                self.budget.check()
                if isinstance(header, Section):
                    data, align = self.section_data(header), header.sh_addralign
                else:
                    data, align = self._span(offset, size, "note segment"), header.p_align
                yield from self._parse_notes(data, 8 if align == 8 else 4)

    def _parse_notes(self, data: memoryview, align: int) -> Iterator[Note]:
        Nhdr = self._layouts.Nhdr
        end = len(data)
        offset = 0
        while offset + Nhdr.size <= end:
            n_namesz, n_descsz, n_type = Nhdr.unpack_from(data, offset)
            name_at = offset + Nhdr.size
            desc_at = _align_up(name_at + n_namesz, align)
            if desc_at + n_descsz > end:
                raise self._error("note at offset %d runs past its container" % offset)
            name = bytes(data[name_at:name_at + n_namesz]).split(b"\0", 1)[0]
            yield Note(name, n_type, bytes(data[desc_at:desc_at + n_descsz]))
            offset = _align_up(desc_at + n_descsz, align)

    @property
    def build_id(self) -> Optional[str]:
        """NT_GNU_BUILD_ID as lowercase hex, from PT_NOTE or the note sections."""
        if not self._build_id_done:
            self._build_id = self._find_build_id()
            self._build_id_done = True
        return self._build_id

    def _find_build_id(self) -> Optional[str]:
        # Debug-only files keep the note sections but their PT_NOTE may point
        # at nothing useful, so sections are the fallback, not an alternative.
        for sources in (self._segment_note_sources(), self._section_note_sources()):
            for note in self._iter_notes_in(sources):
                if note.n_type == NT_GNU_BUILD_ID and note.n_name == ELF_NOTE_GNU and note.n_desc:
                    return note.n_desc.hex()
        return None

    # -------------------------------------------------------- debuglink, soname

    @property
    def debuglink(self) -> Optional[Tuple[str, int]]:
        """(file name, CRC32) from .gnu_debuglink, or None."""
        sec = self.section(".gnu_debuglink")
        if sec is None or sec.sh_type == SHT_NOBITS:
            return None
        with self._parsing():
            # The name is a file name (at most PATH_MAX), then the CRC: no
            # need to copy a section that claims to be larger.
            data = bytes(self.section_data(sec)[:_DEBUGLINK_MAX])
            nul = data.find(b"\0")
            if nul < 0:
                raise self._error(".gnu_debuglink name has no terminating NUL")
            (crc,) = self._layouts.Word.unpack_from(data, _align_up(nul + 1, 4))
            return os.fsdecode(data[:nul]), crc

    def iter_dynamic(self) -> Iterator[Tuple[int, int]]:
        """(d_tag, d_val) pairs of the dynamic section, up to DT_NULL."""
        with self._parsing():
            data, _strtab = self._dynamic_table()
            Dyn = self._layouts.Dyn
            for i in range(len(data) // Dyn.size):
                d_tag, d_val = Dyn.unpack_from(data, i * Dyn.size)
                if d_tag == DT_NULL:
                    return
                yield d_tag, d_val

    def _dynamic_table(self) -> Tuple[memoryview, Optional[_StringTable]]:
        """The Elf_Dyn array and, when sections say so, its string table.

        Prefer the SHT_DYNAMIC section (its sh_link names .dynstr); binaries
        stripped of section headers still have PT_DYNAMIC, whose strings are
        found through DT_STRTAB, an address.
        """
        for sec in self.sections:
            if sec.sh_type == SHT_DYNAMIC:
                strtab = self._string_table_at(self._linked_section(sec), ".dynamic string table")
                return self.section_data(sec), strtab
        for seg in self.segments:
            if seg.p_type == PT_DYNAMIC and seg.p_filesz:
                return self._span(seg.p_offset, seg.p_filesz, "PT_DYNAMIC"), None
        return _EMPTY, None

    @property
    def soname(self) -> Optional[str]:
        """DT_SONAME, or None for files without one (most executables)."""
        entries = dict(self.iter_dynamic())
        if DT_SONAME not in entries:
            return None
        with self._parsing():
            _data, strtab = self._dynamic_table()
            if strtab is None:
                strtab = self._string_table_from_dt(entries)
            return os.fsdecode(strtab.get_bytes(entries[DT_SONAME]))

    def _string_table_from_dt(self, entries: Dict[int, int]) -> _StringTable:
        if DT_STRTAB not in entries or DT_STRSZ not in entries:
            raise self._error("dynamic section has DT_SONAME but no DT_STRTAB/DT_STRSZ")
        offset = self.vaddr_to_offset(entries[DT_STRTAB])
        if offset is None:
            raise self._error("DT_STRTAB %#x is not in any PT_LOAD" % entries[DT_STRTAB])
        self._check_range(offset, entries[DT_STRSZ], "DT_STRTAB")
        return _StringTable(self._data, offset, offset + entries[DT_STRSZ], "%s: DT_STRTAB" % self._label)

    # ------------------------------------------------------ address translation

    def offset_to_vaddr(self, file_offset: int) -> Optional[int]:
        """The link-time address of ``file_offset``; see :mod:`.loadmap`."""
        return self.load_map.offset_to_vaddr(file_offset)

    def vaddr_to_offset(self, vaddr: int) -> Optional[int]:
        """The file offset of link-time address ``vaddr``, or None."""
        return self.load_map.vaddr_to_offset(vaddr)


def _distinct_sources(sources) -> list:
    """Note containers without repeats, at most :data:`MAX_NOTE_SOURCES`.

    Files have one to three PT_NOTE segments and a few note sections; many
    headers aimed at the same bytes (or tens of thousands of them) would make
    every build-id lookup re-read the file that many times.
    """
    seen = set()
    out = []
    for source in sources:
        key = source[1:]
        if key not in seen:
            seen.add(key)
            out.append(source)
            if len(out) == MAX_NOTE_SOURCES:
                break
    return out


def _close_mmap(mapped: Optional[mmap.mmap]) -> None:
    if mapped is None:
        return
    try:
        mapped.close()
    except BufferError:
        # A caller still holds a section_data() view; the mapping is unmapped
        # when the last view goes away.
        pass
