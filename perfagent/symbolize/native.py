"""Function names for native code: per-binary symbol tables and their cache.

A sampled user-space address becomes a name in three steps:

1. the caller finds the mapping ``[start, end)`` with file offset ``pgoff``
   and computes the file offset ``addr - start + pgoff``;
2. :meth:`BinaryInfo.offset_to_vaddr` turns that into a link-time address
   using the real binary's PT_LOAD headers (see :mod:`perfagent.elf.loadmap`);
3. :meth:`SymbolTable.lookup` bisects the function ranges.

:class:`BinaryCache` makes sure each file is parsed once per run however
many processes map it and under whatever path.
"""

from __future__ import annotations

import itertools
import operator
import os
import threading
import zlib
from collections import Counter
from bisect import bisect_right
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from perfagent.records import NamedTuple
from ..elf import ELFFile, LoadMap
from ..elf.elffile import string_offsets, symbol_name
from ..elf.constants import (
    EM_ARM, SHF_EXECINSTR, SHN_LORESERVE, SHN_UNDEF, SHT_NOBITS, STB_GLOBAL, STB_LOCAL,
    STB_GNU_UNIQUE, STB_WEAK, STT_FUNC, STT_GNU_IFUNC, STT_NOTYPE,
)
from .. import budget
from ..errors import ELFError
from ..target.files import SeenFile, open_as_seen, open_untrusted, same_mount_namespace

DEFAULT_DEBUG_DIRS = ("/usr/lib/debug",)

_FUNCTION_TYPES = (STT_FUNC, STT_GNU_IFUNC)
_SYMBOL_SECTIONS = (".symtab", ".dynsym")

# Alias preference at one address, lower wins: a global name is what the
# programmer called the function; weak and local aliases are usually
# implementation names (__GI_memcpy, __libc_malloc).
_BIND_RANK = {STB_GLOBAL: 0, STB_GNU_UNIQUE: 0, STB_WEAK: 1}
_LOCAL_RANK = 2
#: The bind rank by st_bind (st_info >> 4), and the st_info values of a
#: function-like type: looked up per symbol, so lists and sets, not masks.
_BIND_RANKS = [_BIND_RANK.get(bind, _LOCAL_RANK) for bind in range(16)]
_FUNCTION_INFOS = frozenset(info for info in range(256) if info & 0xF in _FUNCTION_TYPES)
#: ELFFile.raw_symbols' ``infos``: the st_info values a candidate can have
#: (a function, or a label: STT_NOTYPE), marked before anything is unpacked.
_CANDIDATE_INFOS = bytes(1 if info in _FUNCTION_INFOS or info & 0xF == STT_NOTYPE else 0 for info in range(256))

_CRC_CHUNK = 1 << 20


class SymbolTable:
    """Function address ranges of one binary, searchable by link-time address.

    Sources are ELF files in order of preference (a separate debug file
    first, then the binary itself); from each, ``.symtab`` is preferred and
    ``.dynsym`` merged in.  Only function-like symbols are kept: STT_FUNC and
    STT_GNU_IFUNC, plus STT_NOTYPE labels in executable sections where no
    function covers them (hand-written assembly).  A zero-size symbol
    extends to the next symbol, but not past its section or a function
    that encloses it.  Unreadable symbol sections are skipped and described
    in :attr:`errors`; construction never raises ELFError.

    Built in bulk (libLLVM has 45k function symbols): the entries are
    unpacked with one ``iter_unpack`` per table and filtered on st_info and
    st_shndx in comprehensions; names are decoded only where aliases at one
    address must be ranked, and otherwise on the first :meth:`lookup` that
    returns them (``names`` holds an int key into the kept string tables
    until then).
    """

    __slots__ = ("starts", "ends", "names", "errors", "_count", "_strings", "partial", "_marks")

    def __init__(self, sources: Iterable[ELFFile] = (), work: Optional[budget.Budget] = None,
                 only: Optional[Iterable[int]] = None, marks: Sequence[str] = ()) -> None:
        self.errors: List[str] = []
        self._strings: List[bytes] = []  # string tables the lazy names point into
        candidates = []
        work = work or budget.default()
        # Kept .symtab rows, for .dynsym's twins; a partial table keeps the
        # twins (they never change a pick, see _same_symbol, and it ranks
        # only the few near its addresses).
        symtab: Optional[Dict[tuple, Tuple[int, bytes]]] = {} if only is None else None
        # A partial table (``only``): exact for those link-time addresses,
        # undefined for others; contains_name() answers for ``marks`` only.
        # Its candidates stay raw rows (parts) until _around has picked the
        # few it needs: only those become candidate tuples.
        parts: Optional[List[tuple]] = None if only is None else []
        for source_rank, elf in enumerate(sources):
            candidates.extend(self._candidates(elf, source_rank, work, symtab, parts))
        self.partial = only is not None
        self._marks: Dict[str, bool] = {}
        if parts is not None:
            self._marks = {name: self._names_a_candidate(parts, name) for name in marks}
            candidates = _around(parts, sorted(set(only)))
        # Every stage below is bulk work over all symbols (a debug file may
        # hold millions): the budget is checked between stages and chunks,
        # so a signal or the deadline stops the build within a chunk's time.
        check = work.check if candidates else _no_check  # (an empty table is no work)
        check()
        entries = _pick_aliases(candidates, check)
        check()
        self._count = len(entries)
        # Parallel arrays rather than objects: lookup is per sampled frame,
        # and bisect on a list of ints is the cheapest search Python offers.
        self.starts: List[int] = []
        self.ends: List[int] = []
        self.names: list = []
        self._flatten(entries, check)
        if all(name.__class__ is str for name in self.names):
            self._strings = []

    def __len__(self) -> int:
        """The number of distinct function addresses."""
        return self._count

    def __repr__(self) -> str:
        return "<SymbolTable %d functions>" % self._count

    def lookup(self, vaddr: int) -> Optional[str]:
        """The function containing link-time address ``vaddr``, or None."""
        # Hot path: one bisect and one compare, no allocation.  The ranges
        # are disjoint (see _flatten), so the last start <= vaddr decides.
        i = bisect_right(self.starts, vaddr) - 1
        if i >= 0 and vaddr < self.ends[i]:
            name = self.names[i]
            if name.__class__ is not str:  # not decoded (or its aliases not ranked) yet
                name = self.names[i] = self._decode(name)
            return name
        return None

    def contains_name(self, name: str) -> bool:
        """Is ``name`` one of the table's function names?  (Decodes the
        names only when the string tables hold it at all.)  A partial
        table knows this of the ``marks`` it was built with only."""
        if self.partial:
            if name not in self._marks:
                raise ValueError("a partial symbol table was not built to know %r" % name)
            return self._marks[name]
        # Every name, decoded or not, starts after a NUL of a kept table
        # (or at its start): one C-level search rules most binaries out.
        needle = name.encode()
        if self._strings and not any(strings.startswith(needle) or b"\0" + needle in strings
                                     for strings in self._strings):
            return False
        names = self.names
        for i, n in enumerate(names):
            if n.__class__ is not str:
                n = names[i] = self._decode(n)
            if n == name:
                return True
        return False

    def _decode(self, name) -> str:
        """The name of a lazy entry: a key (int), or an alias group to rank."""
        if name.__class__ is int:
            return self._name(name)
        return _best_alias(name, self._name)

    def _name(self, key: int) -> str:
        """The function name of a lazy key: (string table << 32) | st_name."""
        raw = symbol_name(self._strings[key >> 32], key & 0xFFFFFFFF) or ""
        # Versioned definitions keep their version in .symtab ("memcpy@@GLIBC_2.14");
        # the profile wants the function's name.
        return raw.split("@", 1)[0] or raw

    # ------------------------------------------------------------- building

    def _names_a_candidate(self, parts: List[tuple], name: str) -> bool:
        """Does a function-like candidate (a row of ``parts``) carry exactly
        ``name`` (its st_name at an offset of a kept string table that
        holds that string)?"""
        offsets: Dict[int, set] = {}
        for kept, _mask, _rank, key, _ends, _n in parts:
            table_id = key >> 32
            offs = offsets.get(table_id)
            if offs is None:
                offs = offsets[table_id] = set(string_offsets(self._strings[table_id], name))
            if offs and any(map(offs.__contains__, map(_NAME_OF, kept))):
                return True
        return False

    def _candidates(self, elf: ELFFile, source_rank: int, work: budget.Budget,
                    symtab: Optional[Dict[tuple, Tuple[int, bytes]]],
                    parts: Optional[List[tuple]] = None) -> List[tuple]:
        """(start, kind, bind rank, source rank, size, section end, name key)
        of the function-like symbols of ``elf``'s tables, without names.

        ``symtab`` collects the kept ``.symtab`` rows of this and the
        sources before (a separate debug file's): a ``.dynsym`` row that
        copies one is left out (see :func:`_same_symbol`); None keeps them.
        With ``parts`` the kept rows are appended there instead, as
        (rows, mask, source rank, name key, section ends, sections), for
        :func:`_candidate_tuples` to turn into tuples later (a partial table's few)."""
        sections = elf.sections
        thumb = elf.e_machine == EM_ARM
        n_sections = min(len(sections), SHN_LORESERVE)
        exec_sections = {i for i, sec in enumerate(sections[:n_sections]) if sec.sh_flags & SHF_EXECINSTR}
        section_ends = [sec.sh_addr + sec.sh_size for sec in sections[:n_sections]]
        out: List[tuple] = []
        for table_rank, table in enumerate(_SYMBOL_SECTIONS):
            try:
                # Charged to ``work`` and checked: a hostile table cannot
                # hold the capture (or a signal) for long.
                rows, strings = elf.raw_symbols(table, budget=work, infos=_CANDIDATE_INFOS)
            except ELFError as exc:  # BudgetExceeded is not one: it ends the whole parse
                self.errors.append(str(exc))
                continue
            if not rows:
                continue
            table_id = len(self._strings)
            self._strings.append(strings)
            n_strings = len(strings)
            rank = source_rank * 2 + table_rank
            key = table_id << 32
            mask = ~1 if thumb else ~0  # the Thumb bit is not an address bit
            for lo in range(0, len(rows), _CHUNK):
                work.check()
                # Hot loop, in comprehensions: (st_name, st_info, st_other,
                # st_shndx, st_value, st_size).  A named, defined function,
                # or a code label (STT_NOTYPE in an executable section).
                # The type test first: it rejects most rows (objects,
                # sections, files) at the cost of one set lookup.
                kept = [r for r in rows[lo:lo + _CHUNK]
                        if (r[1] in _FUNCTION_INFOS or (r[1] & 0xF == STT_NOTYPE and r[3] in exec_sections))
                        and r[3] != SHN_UNDEF and 0 < r[0] < n_strings and strings[r[0]]]
                if symtab is not None and table == ".symtab":
                    # (.dynsym holds no local symbols: none can be a twin)
                    symtab.update((r[1:], (r[0], strings)) for r in kept if r[1] >> 4 != STB_LOCAL)
                elif symtab:
                    kept = [r for r in kept if r[1:] not in symtab or not _same_symbol(r, strings, symtab)]
                part = (kept, mask, rank, key, section_ends, n_sections)
                if parts is not None:
                    parts.append(part)
                else:
                    out += _candidate_tuples(part, kept)
        return out

    def _flatten(self, entries: List[Tuple[int, int, str, int, Optional[int]]], check) -> None:
        """Turn possibly nested ranges into disjoint pieces.

        A function may contain another symbol (an inner entry point, a
        label).  After the inner range ends, the addresses belong to the
        outer function again, so a "resume" piece is emitted for it; that
        keeps lookup a single bisect.
        """
        if self._flatten_disjoint(entries, check):
            return
        starts, ends, names = self.starts, self.ends, self.names
        open_ranges: List[Tuple[int, str]] = []  # (end, name), innermost last

        def resume_until(limit: float) -> None:
            while open_ranges and ends and ends[-1] < limit:
                end, name = open_ranges[-1]
                if end <= ends[-1]:
                    open_ranges.pop()
                    continue
                cursor = ends[-1]
                piece_end = min(end, limit)
                starts.append(cursor)
                ends.append(piece_end)
                names.append(name)
                if piece_end == end:
                    open_ranges.pop()

        for index, (start, size, name, kind, section_end) in enumerate(entries):
            if not index & _CHECK_MASK:
                check()
            resume_until(start)
            while open_ranges and open_ranges[-1][0] <= start:
                open_ranges.pop()
            end = self._end_of(entries, index, start, size, section_end, open_ranges)
            if end <= start:
                continue
            if ends and ends[-1] > start:
                ends[-1] = start
            starts.append(start)
            ends.append(end)
            names.append(name)
            open_ranges.append((end, name))
        resume_until(float("inf"))

    def _flatten_disjoint(self, entries: list, check) -> bool:
        """The common case in bulk: no range reaches past the next start
        (nothing nested), so every range is its own piece.  False (nothing
        done) when some range does: :meth:`_flatten` then does it in order."""
        n = len(entries)
        if not n:
            return True
        # Each end as _end_of computes it with nothing open: the size, or
        # up to the next symbol (the last: its section's end), then clipped
        # to the section.
        nexts = [e[0] for e in entries[1:]]
        nexts.append(None)
        ends = [(start + size if size else (nxt if nxt is not None else (sec_end or start)))
                for (start, size, _name, _kind, sec_end), nxt in zip(entries, nexts)]
        check()
        ends = [min(end, e[4]) if e[4] is not None and e[4] > e[0] else end for end, e in zip(ends, entries)]
        if any(map(operator.gt, ends, nexts[:-1])):
            return False
        check()
        keep = [i for i in range(n) if ends[i] > entries[i][0]]
        self.starts = [entries[i][0] for i in keep]
        self.ends = [ends[i] for i in keep]
        self.names = [entries[i][2] for i in keep]
        return True

    @staticmethod
    def _end_of(entries, index: int, start: int, size: int, section_end: Optional[int],
                open_ranges: List[Tuple[int, str]]) -> int:
        if size:
            end = start + size
        else:
            end = entries[index + 1][0] if index + 1 < len(entries) else (section_end or start)
            if open_ranges:
                end = min(end, open_ranges[-1][0])
        if section_end is not None and section_end > start:
            end = min(end, section_end)
        return end


def _candidate_tuples(part: tuple, rows: List[tuple]) -> List[tuple]:
    """The candidate tuples (see SymbolTable._candidates) of ``rows`` of a
    part.  Hot loop (every function symbol of a whole table), in one
    comprehension."""
    _kept, mask, rank, key, section_ends, n_sections = part
    return [(r[4] & mask, 0 if r[1] in _FUNCTION_INFOS else 1, _BIND_RANKS[r[1] >> 4], rank, r[5],
             section_ends[r[3]] if r[3] < n_sections else None, key | r[0])
            for r in rows]


def _around(parts: List[tuple], only: List[int]) -> List[tuple]:
    """The candidates a table needs to name the sorted addresses ``only``
    exactly as the whole table would, as candidate tuples, sorted by start;
    ``parts`` hold the candidates as raw rows (SymbolTable._candidates).

    Sorted by start, the candidates fall into clusters: a cluster begins
    where no candidate before it reaches past its start (start + size;
    aliases at one address stay together).  What _pick_aliases and
    _flatten make of an address depends only on its own cluster, and on
    the next cluster's first start (where a zero-size symbol ends); so the
    clusters holding an asked address are kept, each with the first
    address group of the cluster after it.  A profile names a few hundred
    addresses of a binary: the alias ranking and flattening, most of a
    table's build, then run over a few hundred candidates instead of all,
    and only those become tuples.  The clusters are found on the rows'
    st_value and st_size columns, sorted and accumulated in C (a stable
    sort: aliases keep the order the whole table's sort gives them)."""
    starts: List[int] = []
    sizes: List[int] = []
    for kept, mask, _rank, _key, _ends, _n in parts:
        starts += map(_VALUE_OF, kept) if mask == ~0 else [r[4] & mask for r in kept]
        sizes += map(_ROW_SIZE_OF, kept)
    n = len(starts)
    if not n or not only:
        return []
    order = sorted(range(n), key=starts.__getitem__)
    starts = list(map(starts.__getitem__, order))
    reach = list(itertools.accumulate(map(operator.add, starts, map(sizes.__getitem__, order)), max))

    def boundary(i: int) -> bool:   # does a cluster begin at candidate i?
        return i == 0 or i == n or (reach[i - 1] <= starts[i] and starts[i] != starts[i - 1])

    clusters = {}   # first candidate -> one past the last (with the next group)
    # The addresses are sorted, so their clusters come in order and each
    # candidate is stepped over once however many addresses fall in its
    # cluster (one symbol spanning a hostile binary's whole text is one
    # cluster: linear, not addresses x candidates).
    core_end = 0    # where the last cluster found ends (a boundary)
    for addr in only:
        i = bisect_right(starts, addr) - 1
        if i < core_end:
            continue
        lo = i
        while lo > core_end and not boundary(lo):
            lo -= 1
        hi = i + 1
        while not boundary(hi):
            hi += 1
        core_end = hi
        if hi < n:      # the next cluster's first address group
            first = starts[hi]
            hi += 1
            while hi < n and starts[hi] == first:
                hi += 1
        clusters[lo] = hi
    # Sorted positions -> (part, row): the parts' rows are numbered in order.
    firsts = [0]
    firsts += itertools.accumulate(len(part[0]) for part in parts)
    out: List[tuple] = []
    end = 0
    for lo in sorted(clusters):
        for g in order[max(lo, end):clusters[lo]]:   # (a next group may be the next cluster's start)
            pi = bisect_right(firsts, g) - 1
            out += _candidate_tuples(parts[pi], [parts[pi][0][g - firsts[pi]]])
        end = max(end, clusters[lo])
    return out


def _pick_aliases(candidates: List[tuple],
                  check=lambda: None) -> List[Tuple[int, int, object, int, Optional[int]]]:
    """One entry per address, sorted: (start, size, name, kind, section_end).

    The preferred alias names the address, in a deterministic order:
    (kind, bind rank, leading underscores, source rank, name), kind 0 for
    STT_FUNC/STT_GNU_IFUNC and 1 for an STT_NOTYPE code label; no name is
    decoded here: a lone symbol's entry keeps its lazy key, and aliases tied
    on (kind, bind rank) are ranked by name when their address is looked
    up (see :func:`_rank_aliases`).  The size
    is the largest any alias of the same kind claims (a zero-size alias must
    not shrink a sized function).  STT_NOTYPE labels inside a function are
    dropped: they would split it.
    """
    candidates.sort(key=_START_OF)
    check()
    # Addresses with one symbol (most of them) go through in bulk; those
    # with aliases are ranked in bulk too: one sort of their rank keys.
    counts = Counter(map(_START_OF, candidates))
    check()
    if len(counts) < len(candidates):
        group_entries = _rank_aliases([c for c in candidates if counts[c[0]] > 1])
        check()
    else:
        group_entries = {}
    # In address order: a lone symbol's entry, or its address's group entry
    # at the group's first alias (popped there, so the others are skipped).
    entries = [(c[0], c[4], c[6], c[1], c[5]) if counts[c[0]] == 1 else group_entries.pop(c[0])
               for c in candidates if counts[c[0]] == 1 or c[0] in group_entries]
    if not any(e[3] for e in entries):
        return entries
    check()
    # Labels inside a sized function (its end, as a running maximum over
    # the functions before) are dropped.
    function_ends = list(itertools.accumulate(
        ((e[0] + e[1]) if not e[3] and e[1] else -1 for e in entries), max))
    return [e for e, end in zip(entries, [-1] + function_ends[:-1]) if not (e[3] and e[0] < end)]


#: Symbols per bulk step between two budget checks (a signal stops a build
#: within one step: a few tens of milliseconds).
_CHUNK = 1 << 16
_CHECK_MASK = _CHUNK - 1


def _same_symbol(row: tuple, strings: bytes, symtab: Dict[tuple, Tuple[int, bytes]]) -> bool:
    """Is ``.dynsym`` row ``row`` an exact copy of a kept ``.symtab`` row of
    the same file or of its debug file (every field equal, the same name
    bytes)?

    Every exported function is in both tables; such a copy ranks after
    its twin on every key (the source rank last) and claims the same size,
    so it can never change what :func:`_pick_aliases` picks.  Dropping it before the
    ranking spares the name decoding and ranking of an alias group for
    each exported function (libpython: ~1500 of its ~8000 addresses)."""
    twin = symtab.get(row[1:])
    if twin is None:
        return False
    name_off, twin_strings = twin
    end = strings.find(b"\0", row[0])
    twin_end = twin_strings.find(b"\0", name_off)
    return (end >= 0 and twin_end >= 0 and end - row[0] == twin_end - name_off
            and strings[row[0]:end] == twin_strings[name_off:twin_end])


def _no_check() -> None:
    pass


#: A candidate's start, size, and (kind, bind rank), as sort keys (in C:
#: no Python call per symbol).
_START_OF = operator.itemgetter(0)
_SIZE_OF = operator.itemgetter(4)
#: Raw symbol rows (st_name, st_info, st_other, st_shndx, st_value, st_size).
_NAME_OF = operator.itemgetter(0)
_VALUE_OF = operator.itemgetter(4)
_ROW_SIZE_OF = operator.itemgetter(5)
_KIND_BIND_OF = operator.itemgetter(1, 2)


def _rank_aliases(aliases: List[tuple]) -> Dict[int, tuple]:
    """The entry (start, size, name, kind, section_end) of each address of
    ``aliases`` (every candidate at an address with more than one, in
    address order).

    The rank key is ``(kind, bind rank, leading underscores, source rank,
    name)``, then the alias's position (the first of equal keys wins).  The
    integer part (kind, bind rank) is settled here in bulk; where several
    aliases tie on it, the entry's name is the group of their (source rank,
    name key), ranked by name only when the address is looked up
    (:func:`_best_alias`): a profile names a few hundred addresses of a
    binary, and decoding and sorting the names of all its ties (libc's
    debug symbols: ~3,000 at ~1,400 addresses) was most of its table's
    build.
    """
    # Dict comprehensions over sorted copies, the last write wins: per
    # (start, kind) the largest size; per start the least kind * 4 + bind
    # rank (the bind rank is at most _LOCAL_RANK < 4).
    sizes = {(c[0], c[1]): c[4] for c in sorted(aliases, key=_SIZE_OF)}
    leading = {c[0]: c[1] * 4 + c[2] for c in sorted(aliases, key=_KIND_BIND_OF, reverse=True)}
    groups: Dict[int, list] = {}   # address -> its tied aliases, in candidate order
    for c in aliases:
        if c[1] * 4 + c[2] == leading[c[0]]:
            groups.setdefault(c[0], []).append(c)
    # (kind and section end: the tied aliases share the kind; aliases of one
    # address lie in one section)
    return {start: (start, sizes[start, g[0][1]],
                    g[0][6] if len(g) == 1 else tuple((c[3], c[6]) for c in g), g[0][1], g[0][5])
            for start, g in groups.items()}


def _best_alias(group: tuple, name_of) -> str:
    """The preferred name of an alias group ((source rank, name key), ...,
    tied on kind and bind rank): fewest leading underscores, then the
    lowest source rank, then the name, then the first."""
    names = [name_of(key) for _rank, key in group]
    best = min(range(len(group)), key=lambda i: (
        len(names[i]) - len(names[i].lstrip("_")), group[i][0], names[i], i))
    return names[best]


# ----------------------------------------------------------------- per binary

class BinaryInfo:
    """What the profiler keeps about one file on disk once it is parsed.

    Holds no file descriptor or mapping.  A file that could not be read or
    parsed still gets a BinaryInfo, with no symbols and ``error`` set, so
    its frames fall back to addresses.
    """

    __slots__ = ("path", "build_id", "soname", "symbols", "load_map", "debug_path",
                 "e_type", "e_machine", "error", "cancelled")

    def __init__(self, path: str, symbols: Optional[SymbolTable] = None,
                 load_map: Optional[LoadMap] = None, build_id: Optional[str] = None,
                 soname: Optional[str] = None, debug_path: Optional[str] = None,
                 e_type: Optional[int] = None, e_machine: Optional[int] = None,
                 error: Optional[str] = None, cancelled: bool = False) -> None:
        self.path = path
        # Parsing stopped on a signal: not a property of the file, not cached.
        self.cancelled = cancelled
        self.symbols = symbols if symbols is not None else SymbolTable()
        self.load_map = load_map if load_map is not None else LoadMap(())
        self.build_id = build_id
        self.soname = soname
        self.debug_path = debug_path
        self.e_type = e_type
        self.e_machine = e_machine
        self.error = error

    def __repr__(self) -> str:
        return "<BinaryInfo %s build_id=%s %d symbols%s>" % (
            self.path, self.build_id, len(self.symbols),
            " error=%r" % self.error if self.error else "")

    def offset_to_vaddr(self, file_offset: int) -> Optional[int]:
        """Link-time address of a file offset, from the real binary's PT_LOADs."""
        return self.load_map.offset_to_vaddr(file_offset)

    def symbolize_offset(self, file_offset: int) -> Optional[str]:
        """The function at ``file_offset`` (= addr - map start + pgoff)."""
        vaddr = self.load_map.offset_to_vaddr(file_offset)
        if vaddr is None:
            return None
        return self.symbols.lookup(vaddr)

    def symbolize_vaddr(self, vaddr: int) -> Optional[str]:
        """The function at a link-time address."""
        return self.symbols.lookup(vaddr)

    def at_path(self, path: str) -> "BinaryInfo":
        """The same parsed data reported under another path (shares tables)."""
        if path == self.path:
            return self
        return BinaryInfo(path, self.symbols, self.load_map, self.build_id, self.soname,
                          self.debug_path, self.e_type, self.e_machine, self.error)


class MappedFile(NamedTuple):
    """What identifies the file behind a mapping (a MappingRecord or MapEntry
    has these attributes): the process, the path it shows, and the device
    and inode that say which file it really is."""

    pid: int
    path: str
    dev_major: int
    dev_minor: int
    inode: int
    start: int
    end: int
    deleted: bool


def file_key(dev_major: int, dev_minor: int, inode: int) -> Tuple[int, int]:
    """The cache key of a mapped file: (st_dev as the kernel encodes it, inode)."""
    return os.makedev(dev_major, dev_minor), inode


#: Files kept open (pinned) so that a process that exits, or a file that is
#: replaced, can still be symbolized at the end of the capture.  Bounded so
#: that a machine with many distinct binaries cannot exhaust descriptors.
MAX_PINNED = 1024


class BinaryCache:
    """Parses each binary once per run, however it is reached.

    Files a process maps are found with :func:`perfagent.target.files.open_as_seen`
    (through the process's root, else its map_files entry, and only when
    device and inode are the mapping's: never "whatever is at that path
    now"), keyed by (device, inode), and by build id so one build at two
    paths shares one symbol table.  ``pin()`` opens such a file while its
    process is alive and keeps the descriptor, so names can be resolved at
    the end of the capture even after the process exited or the file was
    replaced.  ``load()`` parses a path of the agent's own file system
    (tests, tools).  ``parse_count`` counts full parses.
    """

    def __init__(self, debug_dirs: Optional[Sequence[str]] = None,
                 seconds_per_binary: float = budget.DEFAULT_SECONDS) -> None:
        self.debug_dirs: Tuple[str, ...] = tuple(DEFAULT_DEBUG_DIRS if debug_dirs is None else debug_dirs)
        self.seconds_per_binary = seconds_per_binary
        self.parse_count = 0
        self._by_inode: Dict[Tuple[int, int], BinaryInfo] = {}
        self._by_build_id: Dict[str, BinaryInfo] = {}
        self._pinned: Dict[Tuple[int, int], SeenFile] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------- mapped files

    def pin(self, m) -> None:
        """Open the file of mapping ``m`` now (its process may not live until
        the end) and keep it; nothing if it is known, pinned, or unreachable."""
        if not m.inode or m.pid <= 0:
            return
        key = file_key(m.dev_major, m.dev_minor, m.inode)
        if key in self._by_inode or key in self._pinned or len(self._pinned) >= MAX_PINNED:
            return
        seen, _why = open_as_seen(m.pid, m.path, m.dev_major, m.dev_minor, m.inode,
                                  m.start, m.end, m.deleted)
        if seen is not None:
            self._pinned[key] = seen

    def open_mapped(self, m) -> Tuple[Optional[SeenFile], str]:
        """The file of mapping ``m``: a pinned descriptor (duplicated) or a
        fresh open_as_seen; (None, why) when it cannot be the same file."""
        key = file_key(m.dev_major, m.dev_minor, m.inode)
        pinned = self._pinned.get(key)
        if pinned is not None:
            return pinned._replace(fd=os.dup(pinned.fd)), ""
        if m.pid <= 0:
            return None, "%s: no process to open it through" % m.path
        return open_as_seen(m.pid, m.path, m.dev_major, m.dev_minor, m.inode, m.start, m.end, m.deleted)

    def load_mapped(self, m, offsets: Optional[Iterable[int]] = None, marks: Sequence[str] = ()) -> BinaryInfo:
        """The BinaryInfo of the file mapping ``m`` maps; never raises.

        A file that is not the mapped one (replaced, a container's other
        file at the same path, a process gone with its deleted file) gets no
        symbols and an ``error``: its frames keep their addresses.

        With ``offsets`` (file offsets), unless the whole table is cached
        already, the symbol table is a partial one, exact for those offsets
        only and knowing only ``marks`` by name (SymbolTable's ``only``):
        not cached, the caller keeps it (building a profile names a few
        hundred addresses of each binary).
        """
        try:
            with self._lock:
                key = file_key(m.dev_major, m.dev_minor, m.inode) if m.inode else None
                if key is not None:
                    cached = self._by_inode.get(key)
                    if cached is not None:
                        return cached.at_path(m.path)
                seen, why = self.open_mapped(m)
                if seen is None:
                    return BinaryInfo(m.path, error="%s: not symbolized: %s" % (m.path, why))
                if offsets is not None:
                    return self._parse_seen(m.path, seen, m.pid, (offsets, marks))
                info = self._parse_seen(m.path, seen, m.pid)
                if key is not None and not info.cancelled:
                    self._by_inode[key] = info
                    pinned = self._pinned.pop(key, None)
                    if pinned is not None:
                        os.close(pinned.fd)
                return info
        except Exception as exc:  # a symbolizer bug must cost one binary's names, not the profile
            return BinaryInfo(m.path, error="%s: %s: %s" % (m.path, type(exc).__name__, exc))

    def close(self) -> None:
        """Close the pinned descriptors."""
        pinned, self._pinned = self._pinned, {}
        for seen in pinned.values():
            try:
                os.close(seen.fd)
            except OSError:
                pass

    # ----------------------------------------------------------- own paths

    def load(self, path: str, st_dev: Optional[int] = None, st_ino: Optional[int] = None,
             open_path: Optional[str] = None) -> BinaryInfo:
        """The BinaryInfo for a file of the agent's own file system; never raises.

        ``open_path`` is what to actually open when ``path`` (the name to
        report) is not reachable as is.
        """
        try:
            with self._lock:
                return self._load(path, st_dev, st_ino, open_path or path)
        except Exception as exc:  # a symbolizer bug must cost one binary's names, not the profile
            return BinaryInfo(path, error="%s: %s: %s" % (path, type(exc).__name__, exc))

    def _load(self, path: str, st_dev: Optional[int], st_ino: Optional[int], open_path: str) -> BinaryInfo:
        if st_dev is not None and st_ino is not None:
            cached = self._by_inode.get((st_dev, st_ino))
            if cached is not None:
                return cached.at_path(path)
        try:
            seen = open_untrusted(open_path, own_namespace=not open_path.startswith("/proc/"))
        except OSError as exc:
            return BinaryInfo(path, error="%s: %s" % (path, exc.strerror or exc))
        key = (seen.st.st_dev, seen.st.st_ino)
        if st_dev is not None and st_ino is not None:
            key = (st_dev, st_ino)
        cached = self._by_inode.get(key)
        if cached is not None:
            os.close(seen.fd)
            return cached.at_path(path)
        info = self._parse_seen(path, seen, 0)
        if not info.cancelled:
            self._by_inode[key] = info
        return info

    # -------------------------------------------------------------- parsing

    def _parse_seen(self, path: str, seen: SeenFile, pid: int, partial=None) -> BinaryInfo:
        """Parse an opened file (``partial``: (file offsets, marks) for a
        partial table, see load_mapped: not cached)."""
        work = budget.Budget(path, seconds=self.seconds_per_binary)
        try:
            elf = ELFFile.from_seen(seen, work)  # inflated sections and symbols charged to ``work``
        except (OSError, ELFError) as exc:
            return BinaryInfo(path, error=str(exc), cancelled=isinstance(exc, budget.Cancelled))
        with elf:
            build_id = _quietly(lambda: elf.build_id)
            if build_id is not None and build_id in self._by_build_id:
                return self._by_build_id[build_id].at_path(path)
            try:
                info = self._build(elf, path, build_id, pid, work, partial)
            except budget.BudgetExceeded as exc:
                return BinaryInfo(path, error=str(exc), cancelled=isinstance(exc, budget.Cancelled))
        if build_id is not None and partial is None:
            self._by_build_id[build_id] = info
        return info

    def _build(self, elf: ELFFile, path: str, build_id: Optional[str], pid: int,
               work: budget.Budget, partial=None) -> BinaryInfo:
        self.parse_count += 1
        debug = None
        if not _has_symtab(elf):
            debug = self.find_debug_file(elf, path, build_id, pid, work)
        try:
            sources = [debug[1], elf] if debug is not None else [elf]
            if partial is None:
                symbols = SymbolTable(sources, work)
            else:
                offsets, marks = partial
                to_vaddr = elf.load_map.offset_to_vaddr
                vaddrs = [v for v in map(to_vaddr, offsets) if v is not None]
                symbols = SymbolTable(sources, work, only=vaddrs, marks=marks)
        finally:
            if debug is not None:
                debug[1].close()
        return BinaryInfo(
            path, symbols=symbols, load_map=elf.load_map, build_id=build_id,
            soname=_quietly(lambda: elf.soname),
            debug_path=debug[0] if debug is not None else None,
            e_type=elf.e_type, e_machine=elf.e_machine,
            error="; ".join(symbols.errors) or None)

    # ---------------------------------------------------------- debug files

    def find_debug_file(self, elf: ELFFile, path: str, build_id: Optional[str], pid: int = 0,
                        work: Optional[budget.Budget] = None) -> Optional[Tuple[str, ELFFile]]:
        """A separate debug file: by build id first, then by .gnu_debuglink.

        The caller closes the returned ELFFile.  Looked up beside the binary
        *as process ``pid`` sees it* (inside its root) and in the debug
        directories, on the host and inside the process's root.  A
        debuglink name is a file name: one with a '/' (or "." / "..") is
        refused, so a hostile binary cannot point the agent at /dev/zero or
        anywhere else.
        """
        work = work or budget.default()
        roots = self._roots(pid)
        if build_id is not None and len(build_id) > 2:
            for root in roots:
                for debug_dir in self.debug_dirs:
                    candidate = root + os.path.join(debug_dir, ".build-id", build_id[:2],
                                                    build_id[2:] + ".debug")
                    debug = _open_elf(candidate)
                    if debug is not None:
                        if _quietly(lambda: debug.build_id) == build_id:
                            return candidate, debug
                        debug.close()
        link = _quietly(lambda: elf.debuglink)
        if link is None:
            return None
        name, crc = link
        if not _valid_debuglink_name(name):
            return None
        for candidate in self._debuglink_candidates(name, path, roots):
            work.check()
            if elf.path and _same_file(candidate, elf.path):
                continue
            if _file_crc32(candidate, work) != crc:
                continue
            debug = _open_elf(candidate)
            if debug is not None:
                return candidate, debug
        return None

    @staticmethod
    def _roots(pid: int) -> List[str]:
        """Path prefixes of the file systems to look in: the process's root
        (when it is not ours), then the agent's own."""
        if pid > 0 and not same_mount_namespace(pid):
            return ["/proc/%d/root" % pid, ""]
        return [""]

    def _debuglink_candidates(self, name: str, path: str, roots: Sequence[str]) -> List[str]:
        """GDB's search order: beside the binary, its .debug/, the debug dirs."""
        out = []
        binary_dir = os.path.dirname(path)
        for root in roots:
            if path.startswith("/"):
                out.append(root + os.path.join(binary_dir, name))
                out.append(root + os.path.join(binary_dir, ".debug", name))
            for debug_dir in self.debug_dirs:
                out.append(root + os.path.join(debug_dir, binary_dir.lstrip("/"), name))
        return out


def _valid_debuglink_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def _has_symtab(elf: ELFFile) -> bool:
    sec = elf.section(".symtab")
    return sec is not None and sec.sh_size > 0 and sec.sh_type != SHT_NOBITS


def _open_elf(path: str) -> Optional[ELFFile]:
    try:
        return ELFFile.from_path(path)
    except (OSError, ELFError):
        return None


def _quietly(getter):
    """A metadata value, or None if that part of the file is malformed."""
    try:
        return getter()
    except ELFError:
        return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _file_crc32(path: str, work: budget.Budget) -> Optional[int]:
    """zlib.crc32 of a whole regular file (the .gnu_debuglink checksum), or None.

    Bounded by the file's size at open time and by ``work``: a device, a
    FIFO or a file that keeps growing cannot keep the agent here.
    """
    try:
        seen = open_untrusted(path)
    except OSError:
        return None
    crc = 0
    try:
        left = seen.st.st_size
        offset = 0
        while left > 0:
            work.check()
            chunk = os.pread(seen.fd, min(_CRC_CHUNK, left), offset)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            offset += len(chunk)
            left -= len(chunk)
        return crc
    except OSError:
        return None
    finally:
        os.close(seen.fd)
