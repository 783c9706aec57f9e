"""Compiled unwind tables: one sorted, searchable table per binary.

The walker looks up one row per unwound frame, thousands of times per second
of profile, so the table is built for that: parallel ``array('Q')`` of range
starts and ends searched with :func:`bisect.bisect_right`, and an
``array('I')`` of indexes into a list of deduplicated :class:`UnwindRow`
tuples.  A lookup allocates nothing: it returns a shared tuple.  Deduplication
also keeps memory small: a large library has ~100k ranges but a few thousand
distinct rows.

Building a table never raises and never leaves it half-built: one malformed
FDE costs only its own range (counted in :class:`CFIStats`), and a build
that fails as a whole (a section whose decoding exceeds the
:class:`~perfagent.budget.Budget`, an error outside any one FDE) leaves an
empty table with the error counted.
"""

from __future__ import annotations

import bisect
from array import array
from typing import Callable, Dict, List, Optional, Tuple

from ..budget import Budget, Cancelled
from ..elf.constants import EM_X86_64, SHT_NOBITS
from ..errors import ParseError
from .cfi import _MALFORMED, CallFrameInfo, EHFrameHdr
from .pointers import DWARFError
from .rules import ROW_LENGTH, RowSpan, RuleState, UnwindRow, cie_initial_state, fde_rows

# The table's arrays are unsigned 64-bit: a range must lie in [0, 2**64).
_ADDRESS_LIMIT = 1 << 64
# Bytes one indexed range costs (three array slots), charged to the budget.
_RANGE_BYTES = 20
# The index loop checks the budget once per this many ranges.
_BUDGET_CHECK_SPANS = 4096


class CFIStats:
    """What compiling a table met: counts, and the first few errors for logs."""

    MAX_KEPT_ERRORS = 20

    def __init__(self) -> None:
        self.fdes = 0  # FDEs decoded into rows
        self.errors = 0  # FDEs (or section tails) lost to malformed/unsupported data
        self.error_messages: List[str] = []
        self.debug_frame_fdes = 0  # .debug_frame FDEs merged in (not covered by .eh_frame)

    def add_errors(self, errors: List[DWARFError]) -> None:
        self.errors += len(errors)
        room = self.MAX_KEPT_ERRORS - len(self.error_messages)
        self.error_messages.extend(str(e) for e in errors[:max(room, 0)])

    def __repr__(self) -> str:
        return "<CFIStats fdes=%d errors=%d debug_frame_fdes=%d>" % (
            self.fdes, self.errors, self.debug_frame_fdes)


def section_rows(cfi: CallFrameInfo, stats: CFIStats, budget: Optional[Budget] = None) -> List[List[RowSpan]]:
    """Rows of every FDE in one section, one list per FDE; errors go to stats.

    A malformed FDE (or CIE) costs its own rows; ``budget`` running out
    raises BudgetExceeded (the caller treats the whole binary as malformed).
    """
    errors: List[DWARFError] = []
    initial_states: Dict[int, RuleState] = {}  # per CIE: shared by its FDEs
    shared: Dict[tuple, tuple] = {}  # identical rows of different FDEs: one tuple
    out: List[List[RowSpan]] = []
    try:
        for fde in cfi.iter_fdes(errors, budget):
            if fde.address_range == 0:
                continue
            try:
                initial = initial_states.get(fde.cie.offset)
                if initial is None:
                    initial = initial_states[fde.cie.offset] = cie_initial_state(cfi, fde.cie, budget)
                out.append(fde_rows(cfi, fde, initial, budget, shared))
                stats.fdes += 1
            except DWARFError as exc:
                errors.append(exc)
    finally:
        stats.add_errors(errors)
    return out


class CFITable:
    """A binary's unwind rows over link-time addresses (the ELF's p_vaddr space).

    Build with :meth:`from_elf` (lazy: nothing is decoded until the first
    :meth:`lookup`) or :meth:`from_spans`.  Ranges never overlap; where FDEs
    do, the one starting first wins.
    """

    def __init__(self, builder: Callable[[CFIStats, Budget], List[RowSpan]], name: str = "CFI",
                 sources: Optional[List[CallFrameInfo]] = None) -> None:
        self._builder: Optional[Callable[[CFIStats, Budget], List[RowSpan]]] = builder
        self.name = name
        self.sources: List[CallFrameInfo] = sources or []  # the sections it is built from
        self.stats = CFIStats()
        self.starts = array("Q")
        self.ends = array("Q")
        self.row_ids = array("I")
        self.rows: List[UnwindRow] = []

    @classmethod
    def from_spans(cls, spans: List[RowSpan]) -> "CFITable":
        table = cls(lambda stats, budget: spans, "spans")
        table.compile()
        return table

    @classmethod
    def from_sections(cls, sources: List[CallFrameInfo], name: str = "CFI") -> "CFITable":
        """The table of one binary's sections (.eh_frame first, then
        .debug_frame), compiled on first use; see :meth:`from_elf`."""
        return cls(lambda stats, budget: _merge_sources(sources, stats, budget), name, sources)

    @classmethod
    def from_elf(cls, elf, debug_elf=None, read_pointer=None) -> "CFITable":
        """The table for an :class:`~perfagent.elf.ELFFile`, compiled on first use.

        Prefers .eh_frame and adds .debug_frame FDEs for code it does not
        cover, from ``debug_elf`` (the separate debug file, same link-time
        addresses) when given, else from ``elf``.  Section bytes are copied
        now, so the files may be closed.  ``read_pointer`` resolves
        DW_EH_PE_indirect (default: the file's own bytes at that address).
        Raises DWARFError for a machine other than x86-64: the row layout
        names x86-64 registers.
        """
        if elf.e_machine != EM_X86_64:
            raise DWARFError("%s: CFI tables support x86-64 only (e_machine %d)"
                             % (elf.path or "<bytes>", elf.e_machine))
        sources = _elf_sources(elf, read_pointer, ".eh_frame")
        sources += _elf_sources(debug_elf if debug_elf is not None else elf, read_pointer, ".debug_frame")
        return cls.from_sections(sources, elf.path or "<bytes>")

    # --------------------------------------------------------------- building

    def compile(self, budget: Optional[Budget] = None) -> None:
        """Decode and index now (otherwise the first lookup does it).

        Runs under ``budget`` (default: a fresh :class:`Budget` for this
        table, started now).  Never raises: whatever goes wrong beyond one
        FDE leaves the table empty, with the error counted in :attr:`stats`.
        """
        if self._builder is None:
            return
        if budget is None:
            budget = Budget("CFI of %s" % self.name)
        builder, self._builder = self._builder, None  # never rebuilt after a failure...
        self.stats = CFIStats()
        try:
            budget.check()
            spans = sorted(builder(self.stats, budget), key=lambda span: span[0])
            # Into fresh arrays, published only when complete.
            self.starts, self.ends, self.row_ids, self.rows = _index(spans, self.stats, budget, self.name)
        except Cancelled:
            self._builder = builder  # ...except a stop request: empty now, built if asked again
        except (ParseError,) + _MALFORMED as exc:
            self.stats.add_errors([DWARFError("%s: unwind table not built (%s: %s)"
                                              % (self.name, type(exc).__name__, exc))])

    # ---------------------------------------------------------------- queries

    def lookup(self, pc: int) -> Optional[UnwindRow]:
        """The row whose [pc_start, pc_end) holds ``pc``, or None (no CFI).

        For a return address the caller should look up ``pc - 1`` (the call
        may be a function's last instruction) unless the frame below was a
        signal frame.
        """
        if self._builder is not None:
            self.compile()
        # Hot path, once per unwound frame: one C-level bisect over a flat
        # array and three indexings; the row returned is shared, not built.
        i = bisect.bisect_right(self.starts, pc) - 1
        if i < 0 or pc >= self.ends[i]:
            return None
        return self.rows[self.row_ids[i]]

    def lookup_range(self, pc: int) -> Optional[Tuple[int, int, UnwindRow]]:
        """(pc_start, pc_end, row) around ``pc`` (allocates; for tests and tools)."""
        if self._builder is not None:
            self.compile()
        i = bisect.bisect_right(self.starts, pc) - 1
        if i < 0 or pc >= self.ends[i]:
            return None
        return self.starts[i], self.ends[i], self.rows[self.row_ids[i]]

    def __len__(self) -> int:
        if self._builder is not None:
            self.compile()
        return len(self.starts)


def _index(spans: List[RowSpan], stats: CFIStats, budget: Budget, name: str):
    """(starts, ends, row_ids, rows) of sorted ``spans``: overlaps clipped
    (the range starting first wins), identical rows stored once.  A span
    that is not a valid range of 64-bit addresses or whose row is not an
    UnwindRow's fields is dropped and counted."""
    interned: Dict[tuple, int] = {}
    starts, ends, row_ids = array("Q"), array("Q"), array("I")
    rows: List[UnwindRow] = []
    bad: List[DWARFError] = []
    last_end = 0
    for n, (start, end, fields) in enumerate(spans):
        if not n % _BUDGET_CHECK_SPANS:
            budget.check()
            budget.charge(_RANGE_BYTES * _BUDGET_CHECK_SPANS)
        if not (0 <= start < end <= _ADDRESS_LIMIT - 1) or len(fields) != ROW_LENGTH:
            bad.append(DWARFError("%s: dropped an invalid range %#x-%#x" % (name, start, end)))
            continue
        if start < last_end:  # overlaps the previous range: clip it
            start = last_end
            if start >= end:
                continue
        row_id = interned.get(fields)
        if row_id is None:
            row_id = interned[fields] = len(rows)
            rows.append(UnwindRow(*fields))
        starts.append(start)
        ends.append(end)
        row_ids.append(row_id)
        last_end = end
    stats.add_errors(bad)
    return starts, ends, row_ids, rows


# ------------------------------------------------------------------ ELF glue

def _section_bytes(elf, name: str):
    sec = elf.section(name)
    if sec is None or sec.sh_type == SHT_NOBITS or sec.sh_size == 0:
        return None, None
    return sec, bytes(elf.section_data(sec))


def elf_pointer_reader(elf) -> Callable[[int], Optional[int]]:
    """A DW_EH_PE_indirect reader over the file's own bytes (link-time values).

    Good enough for the personality/LSDA pointers that use indirect; a GOT
    slot filled by the dynamic linker reads as its unrelocated content.
    Reads nothing (None) once ``elf`` is closed or where it is malformed:
    an unresolvable pointer costs at most one FDE, an exception here would
    escape the per-FDE isolation.
    """
    size = elf.elfclass // 8
    order = "little" if elf.little_endian else "big"
    spans = [(sec.sh_addr, sec.sh_addr + sec.sh_size, sec) for sec in elf.sections
             if sec.sh_addr and sec.sh_type != SHT_NOBITS and sec.sh_size]

    def read_pointer(address: int) -> Optional[int]:
        for lo, hi, sec in spans:
            if lo <= address and address + size <= hi:
                try:
                    data = elf.section_data(sec)
                    off = address - lo
                    return int.from_bytes(bytes(data[off:off + size]), order)
                except (ParseError, ValueError):
                    return None
        return None

    return read_pointer


def _elf_sources(elf, read_pointer, *names: str) -> List[CallFrameInfo]:
    """CallFrameInfo for each of ``names`` (default .eh_frame, .debug_frame) present."""
    names = names or (".eh_frame", ".debug_frame")
    address_size = elf.elfclass // 8
    reader = read_pointer if read_pointer is not None else elf_pointer_reader(elf)
    text = elf.section(".text")
    got = elf.section(".got")
    text_base = text.sh_addr if text is not None else None
    data_base = got.sh_addr if got is not None else None
    sources: List[CallFrameInfo] = []
    for name in names:
        sec, data = _section_bytes(elf, name)
        if sec is not None:
            is_eh_frame = name == ".eh_frame"
            sources.append(CallFrameInfo(data, sec.sh_addr if is_eh_frame else 0, is_eh_frame,
                                         address_size, elf.little_endian, data_base, text_base,
                                         reader, name))
    return sources


#: The sections of a binary as CallFrameInfo (the walker's lazy tables use them directly).
elf_sources = _elf_sources


def load_eh_frame_hdr(elf) -> Optional[EHFrameHdr]:
    """The parsed .eh_frame_hdr of ``elf``, or None if absent or malformed."""
    sec, data = _section_bytes(elf, ".eh_frame_hdr")
    if sec is None:
        return None
    try:
        return EHFrameHdr(data, sec.sh_addr, elf.elfclass // 8, elf.little_endian)
    except DWARFError:
        return None


def _merge_sources(sources: List[CallFrameInfo], stats: CFIStats, budget: Budget) -> List[RowSpan]:
    """All .eh_frame rows, plus .debug_frame FDEs that touch no .eh_frame range."""
    merged: List[RowSpan] = []
    covered_starts: List[int] = []
    covered_ends: List[int] = []
    for cfi in sources:
        per_fde = section_rows(cfi, stats, budget)
        if not cfi.is_eh_frame:
            per_fde = [rows for rows in per_fde
                       if rows and not _overlaps(covered_starts, covered_ends, rows[0][0], rows[-1][1])]
            stats.debug_frame_fdes += len(per_fde)
        for rows in per_fde:
            merged.extend(rows)
        if cfi.is_eh_frame:
            covered = sorted((rows[0][0], rows[-1][1]) for rows in per_fde if rows)
            covered_starts = [c[0] for c in covered]
            covered_ends = _running_max([c[1] for c in covered])
    return merged


def _running_max(values: List[int]) -> List[int]:
    out, best = [], 0
    for v in values:
        best = max(best, v)
        out.append(best)
    return out


def _overlaps(starts: List[int], ends_max: List[int], lo: int, hi: int) -> bool:
    """Does [lo, hi) meet any covered range?  ``ends_max`` is a running max of ends."""
    i = bisect.bisect_left(starts, hi) - 1  # last range starting before hi
    return i >= 0 and ends_max[i] > lo
