"""Walking a sampled user stack with the binaries' own call-frame information.

Each sample carries the user registers (bx, bp, sp, ip, r12-r15 on x86-64)
and a copy of the stack from sp upward.  Frame by frame: find the mapping of
the pc, the binary's compiled CFI row for it, compute the CFA, restore the
callee-saved registers and read the return address from the copy.

Modes (``--unwind``):

* ``dwarf``: CFI only; a frame-pointer step only for code that has no CFI at
  all (a binary without .eh_frame/.debug_frame, JIT code).
* ``auto``: CFI where the binary has a row for the pc, a frame-pointer step
  where it does not (hand-written assembly without FDEs, stripped CFI).

In both, every step is checked before its caller is appended: the stack
grows towards the caller and the caller's pc lies in an executable mapping.

Signal frames (an FDE whose CIE has 'S', such as glibc's ``__restore_rt``)
describe the kernel's ucontext with DWARF expressions (CFA = *(rsp + 160),
registers saved at rsp + offset); the walker restores the interrupted
registers from it and continues at the interrupted pc exactly.

CPython's perf trampolines (anonymous executable memory the interpreter's
perf map names ``py::...``) have neither CFI nor a frame pointer; they are
recognised by their exact code bytes, read once per address from the
target's memory, and unwound by their known shape (see perfagent.arch).

This is the per-frame hot path: registers live in local variables, the
stack copy is read with ``unpack_from`` on the bytes the parser produced,
tables are cached per binary (device+inode, then build id) across processes
and captures, the (mapping, binary, row) of a pc is cached per process (and
doubles as the caller's validation), and the only allocation per frame is
the appended address.
"""

from __future__ import annotations

import bisect
import os
import struct
import time
from array import array
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from perfagent.arch import x86_64 as X
from perfagent.budget import Budget, Cancelled
from perfagent.dwarf.rules import (
    CFA_PLT, CFA_REG_OFFSET, CFA_UNSUPPORTED, RULE_EXPRESSION, RULE_OFFSET, RULE_REGISTER,
    RULE_SAME_VALUE, RULE_UNDEFINED, RULE_VAL_EXPRESSION, RULE_VAL_OFFSET,
)
from perfagent.dwarf.cfi import CallFrameInfo, EHFrameHdr
from perfagent.dwarf.rules import SPAN_BYTES, cie_initial_state, fde_rows
from perfagent.dwarf.pointers import DWARFError
from perfagent.dwarf.table import elf_sources, load_eh_frame_hdr
from perfagent.elf.constants import EM_X86_64
from perfagent.elf import ELFFile, LoadMap
from perfagent.errors import ParseError

MAX_FRAMES = 256

#: Bytes of CFI (section bytes, search tables, decoded rows) the cache keeps
#: for binaries no longer in use before it forgets the least recently used.
DEFAULT_CACHE_BYTES = 64 << 20

# One FDE decoded lazily may take this long and produce this much; its rows
# are capped by perfagent.dwarf.rules.MAX_ROWS_PER_FDE anyway, and real
# FDEs decode in tens of microseconds.
LAZY_FDE_SECONDS = 2.0
LAZY_FDE_BYTES = 64 << 20

# Outcomes of one walk, counted for the end-of-capture summary.
OUTCOME_COMPLETE = 0    # reached the outermost frame (undefined return address)
OUTCOME_TRUNCATED = 1   # needed stack beyond the sampled copy
OUTCOME_NO_CFI = 2      # met code it could not unwind (no CFI, no usable frame pointer)
OUTCOME_BAD = 3         # a step failed a sanity check
OUTCOME_NAMES = ("complete", "truncated by the stack copy", "stopped at code without CFI",
                 "failed a sanity check")

_U64 = struct.Struct("<Q")
_unpack_u64 = _U64.unpack_from

# Offsets of the trampoline's instructions and, for a pc at each, where the
# return address is relative to sp and what the CFA is (sp + value).
#   +0 sub $8,%rsp | +4 call *%rcx | +6 add $8,%rsp | +10 ret
_TRAMPOLINE_STATES = ((0, 0, 8), (4, 8, 16), (6, 8, 16), (10, 0, 8))


class LazyEhFrame:
    """Rows decoded one FDE at a time, found without decoding the others.

    A profile touches a few hundred of libpython's ten thousand FDEs (and of
    libLLVM's hundred thousand), so decoding only those costs milliseconds
    where compiling the whole table costs a fifth of a second per large
    binary, and 5-18 s and 300 MB for libLLVM.  The FDE of a pc is found by
    .eh_frame_hdr's binary search, or, without a header, in a sorted index
    of FDE ranges (start, end, offset: three array slots per FDE, no rows).

    A pc in a gap between .eh_frame FDEs (padding, code without CFI) is
    answered "no CFI" from that same search; only when the binary (or its
    debug file) has a .debug_frame is that section consulted, the same way
    (its FDEs that touch no .eh_frame range, as the merged table would).
    Nothing here ever decodes a whole section's rows.  Each FDE is decoded
    under its own :class:`~perfagent.budget.Budget`; a malformed or
    over-budget FDE costs only its own range.

    The counters say what it holds: ``fdes_decoded``, ``rows_built`` (row
    spans decoded), ``gap_lookups`` (pcs no .eh_frame FDE covers) and
    :meth:`nbytes` (an estimate of the memory held, section bytes included).
    """

    __slots__ = ("_cfi", "_hdr", "_fallback", "_fdes", "_initial", "_shared", "_ranges",
                 "fdes_decoded", "rows_built", "gap_lookups", "_rows_bytes", "provisional")

    def __init__(self, cfi: CallFrameInfo, hdr: Optional[EHFrameHdr] = None, full=None,
                 fallback: Optional[List[CallFrameInfo]] = None) -> None:
        """``cfi``: the .eh_frame; ``hdr``: its .eh_frame_hdr (None or empty:
        an index of FDE ranges is built on first use); ``fallback``: other
        sections (.debug_frame) for pcs .eh_frame does not cover, else those
        of ``full`` (a :class:`CFITable` of the same binary), whose rows are
        never compiled here."""
        self._cfi = cfi
        self._hdr = hdr if hdr is not None and len(hdr) else None
        if fallback is None:
            fallback = [src for src in (full.sources if full is not None else ()) if not src.is_eh_frame]
        self._fallback = fallback
        # (source, FDE offset) -> (row starts, row spans); per pc, the
        # walker's own cache sits in front of this.
        self._fdes: Dict[Tuple[int, int], Tuple[List[int], list]] = {}
        self._initial: Dict[Tuple[int, int], object] = {}  # (source, CIE offset) -> initial state
        self._shared: Dict[tuple, tuple] = {}  # identical rows of different FDEs: one tuple
        self._ranges: Dict[int, _FDERanges] = {}  # source -> FDE range index (no header)
        self.fdes_decoded = 0
        self.rows_built = 0
        self.gap_lookups = 0
        self._rows_bytes = 0
        # The last lookup's "no CFI" may change: an FDE index was still
        # being built (the walker does not cache such an answer).
        self.provisional = False

    def lookup(self, pc: int):
        self.provisional = False
        fde = self._find(0, self._cfi, pc)
        source, cfi = 0, self._cfi
        if fde is None:
            self.gap_lookups += 1
            fde = None
            for source, cfi in enumerate(self._fallback, 1):
                fde = self._find(source, cfi, pc)
                if fde is not None:
                    if self._covered_by_eh_frame(fde.initial_location, fde.pc_end):
                        return None  # the merged table would have dropped this FDE
                    break
            if fde is None:
                return None
        key = (source, fde.offset)
        decoded = self._fdes.get(key)
        if decoded is None:
            try:
                decoded = self._decode(source, cfi, fde)
            except Cancelled:
                return None  # the capture is stopping: no row, and nothing cached
            self._fdes[key] = decoded
        starts, spans = decoded
        i = bisect.bisect_right(starts, pc) - 1
        if i >= 0 and pc < spans[i][1]:
            return spans[i][2]
        return None

    @property
    def sources(self) -> List[CallFrameInfo]:
        """The sections it reads (.eh_frame first), e.g. for
        ``CFITable.from_sections`` where a whole table is wanted."""
        return [self._cfi] + list(self._fallback)

    def nbytes(self) -> int:
        """Memory held (estimate): section bytes, search arrays, decoded rows."""
        total = len(self._cfi.data) + sum(len(src.data) for src in self._fallback)
        if self._hdr is not None:
            total += self._hdr.nbytes()
        total += sum(r.nbytes() for r in self._ranges.values())
        return total + self._rows_bytes

    def _find(self, source: int, cfi: CallFrameInfo, pc: int):
        """The FDE of ``cfi`` covering ``pc`` (one FDE decoded), or None."""
        if source == 0 and self._hdr is not None:
            try:
                return cfi.find_fde(pc, self._hdr)
            except ParseError:
                return None
        ranges = self._index(source, cfi)
        if not ranges.ready():
            self.provisional = True
            return None
        offset = ranges.find(pc)
        if offset is None:
            return None
        try:
            return cfi.fde_at(offset)
        except ParseError:
            return None

    def _index(self, source: int, cfi: CallFrameInfo) -> "_FDERanges":
        ranges = self._ranges.get(source)
        if ranges is None:
            ranges = self._ranges[source] = _FDERanges(cfi)
        return ranges

    def _covered_by_eh_frame(self, lo: int, hi: int) -> bool:
        """Does [lo, hi) meet an .eh_frame FDE?  (Decodes at most one FDE.)"""
        if self._hdr is None:
            ranges = self._index(0, self._cfi)
            if not ranges.ready():
                self.provisional = True
                return True
            return ranges.overlaps(lo, hi)
        locations = self._hdr.initial_locations
        i = bisect.bisect_left(locations, hi) - 1  # the last FDE starting before hi
        if i < 0:
            return False
        if locations[i] >= lo:
            return True
        try:
            fde = self._cfi.fde_at(self._hdr.fde_addresses[i] - self._cfi.section_addr)
        except ParseError:
            return False
        return fde.pc_end > lo

    def _decode(self, source: int, cfi: CallFrameInfo, fde) -> Tuple[List[int], list]:
        budget = Budget("%s FDE at %#x" % (cfi.name, fde.offset), LAZY_FDE_SECONDS, LAZY_FDE_BYTES)
        try:
            key = (source, fde.cie.offset)
            initial = self._initial.get(key)
            if initial is None:
                initial = self._initial[key] = cie_initial_state(cfi, fde.cie, budget)
            spans = fde_rows(cfi, fde, initial, budget, self._shared)
        except Cancelled:
            raise
        except ParseError:
            spans = []  # a malformed FDE costs only its own range
        self.fdes_decoded += 1
        self.rows_built += len(spans)
        self._rows_bytes += SPAN_BYTES * len(spans) + _FDE_ENTRY_BYTES
        return [span[0] for span in spans], spans


# What one decoded FDE costs besides its spans: the dict entry, key and lists.
_FDE_ENTRY_BYTES = 200

# Indexing a section without a search table: at most this long per lookup
# that needs the index (one drain cycle is 100 ms), FDEs between clock
# reads, and the whole walk's deadline (it is spread over drain cycles).
INDEX_STEP_SECONDS = 0.02
_INDEX_CHECK_FDES = 256
INDEX_SECONDS = 120.0
# Indexing time allowed per drain cycle, all binaries together (see
# Walker.new_cycle); None outside a capture's drain loop: no limit.
INDEX_CYCLE_SECONDS = 0.03
_index_allowance: List[Optional[float]] = [None]


class _FDERanges:
    """Every FDE's [start, end) and section offset, sorted, for a section
    without a search table (.debug_frame, .eh_frame without a header).

    Holds three array slots per FDE and no rows.  Built by walking the
    section's entries once; in a capture's drain loop a slice of at most
    :data:`INDEX_STEP_SECONDS` per lookup that needs it, within the cycle's
    allowance (:meth:`Walker.new_cycle`): a debug file with a hundred thousand FDEs
    spreads its indexing over several drain cycles instead of holding one
    (until it is complete such a lookup answers "no CFI", counted in
    ``pending_lookups``).  Where FDEs overlap, the one starting last before
    a pc is the one found.
    """

    __slots__ = ("_cfi", "starts", "ends", "offsets", "_ends_max", "_walk", "_entries",
                 "pending_lookups", "steps")

    def __init__(self, cfi: CallFrameInfo) -> None:
        self._cfi = cfi
        self.starts = self.ends = self.offsets = self._ends_max = None
        self._walk = None
        self._entries: list = []
        self.pending_lookups = 0
        self.steps = 0

    def _build(self, seconds: float) -> bool:
        """One slice of the walk, about ``seconds`` long; True once the
        index is complete."""
        if self._walk is None:
            # A generous deadline: the walk is spread over drain cycles, and
            # each slice is bounded on its own.
            self._walk = self._cfi.iter_fdes(budget=Budget("%s FDE index" % self._cfi.name,
                                                           INDEX_SECONDS))
        self.steps += 1
        entries = self._entries
        deadline = time.monotonic() + seconds
        try:
            for n, fde in enumerate(self._walk, 1):
                if fde.address_range:
                    entries.append((fde.initial_location, fde.pc_end, fde.offset))
                if not n % _INDEX_CHECK_FDES and time.monotonic() > deadline:
                    return False
        except Cancelled:
            self._walk = None  # the capture is stopping: start over if asked again
            self._entries = []
            raise
        except ParseError:
            pass  # what was indexed before the budget ran out stays usable
        self._finish(entries)
        return True

    def _finish(self, entries: list) -> None:
        entries.sort()
        self.starts = array("Q", [e[0] for e in entries])
        self.ends = array("Q", [e[1] for e in entries])
        self.offsets = array("Q", [e[2] for e in entries])
        ends_max, best = array("Q"), 0
        for end in self.ends:
            best = end if end > best else best
            ends_max.append(best)
        self._ends_max = ends_max
        self._walk = None
        self._entries = []

    def ready(self) -> bool:
        """Is the index complete (after one more slice of work, when the
        drain cycle's allowance has time left)?"""
        if self.starts is not None:
            return True
        left = _index_allowance[0]
        if left is not None and left <= 0:
            self.pending_lookups += 1
            return False
        started = time.monotonic()
        # Outside a drain loop (dump, ptrace snapshots) the index is built
        # whole (its Budget still bounds it): nothing would come back for it.
        done = self._build(INDEX_SECONDS if left is None else min(INDEX_STEP_SECONDS, left))
        if left is not None:
            _index_allowance[0] = left - (time.monotonic() - started)
        if not done:
            self.pending_lookups += 1
        return done

    def find(self, pc: int) -> Optional[int]:
        """The section offset of the FDE covering ``pc``, or None."""
        if not self.ready():
            return None
        i = bisect.bisect_right(self.starts, pc) - 1
        if i >= 0 and pc < self.ends[i]:
            return self.offsets[i]
        return None

    def overlaps(self, lo: int, hi: int) -> bool:
        """Does [lo, hi) meet any indexed FDE?  (True while the index is
        incomplete: nothing is claimed for .debug_frame before it is known
        that .eh_frame does not cover it.)"""
        if not self.ready():
            return True
        i = bisect.bisect_left(self.starts, hi) - 1
        return i >= 0 and self._ends_max[i] > lo

    def nbytes(self) -> int:
        return 40 * len(self._entries) if self.starts is None else 32 * len(self.starts)


class BinaryCFI:
    """A binary's CFI table and load map (file offset -> link-time address)."""

    __slots__ = ("table", "load_map", "has_cfi")

    def __init__(self, table, load_map: Optional[LoadMap], has_cfi: bool) -> None:
        self.table = table
        self.load_map = load_map
        self.has_cfi = has_cfi


class CFICache:
    """One compiled table per binary, shared by every process that maps it.

    Files are reached through ``binaries`` (the symbolizer's BinaryCache,
    shared so each file is opened and examined once): the exact file the
    process maps (open_as_seen: device and inode checked, pinned while the
    process lives), and its separate debug file, whose .debug_frame covers
    code the binary's own .eh_frame does not; finding that file does not
    build a symbol table.
    """

    def __init__(self, binaries=None, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if binaries is None:
            from perfagent.symbolize.native import BinaryCache
            binaries = BinaryCache()
        self.binaries = binaries
        # Least recently used first; bounded by max_bytes (what the tables
        # hold, section bytes and decoded rows), checked as binaries load.
        self._by_inode: "OrderedDict[tuple, BinaryCFI]" = OrderedDict()
        self._by_build_id: Dict[str, BinaryCFI] = {}
        self.max_bytes = max_bytes
        self.evicted = 0
        self.errors: List[str] = []

    def get(self, m) -> BinaryCFI:
        """The CFI of the file mapping ``m`` maps (a MappedFile: pid, path,
        device, inode, range); an empty BinaryCFI when it cannot be read."""
        key = self.key_of(m)
        cfi = self._by_inode.get(key)
        if cfi is None:
            cfi = self._by_inode[key] = self._load_mapped(m)
            self._evict()
        else:
            self._by_inode.move_to_end(key)
        return cfi

    def binaries_held(self) -> int:
        return len({id(cfi) for cfi in self._by_inode.values()})

    def bytes_held(self) -> int:
        """What the cached tables hold (section bytes and decoded rows)."""
        seen = {}
        for cfi in self._by_inode.values():
            seen[id(cfi)] = cfi.table.nbytes() if cfi.table is not None else 0
        return sum(seen.values())

    def _evict(self) -> None:
        """Drop least recently used binaries while over ``max_bytes`` (never
        the one just loaded).  A process still unwinding through an evicted
        binary keeps it through its own per-pc cache until its mappings
        change; a later miss loads it again."""
        if len(self._by_inode) < 2:
            return
        total = self.bytes_held()
        while total > self.max_bytes and len(self._by_inode) > 1:
            key, cfi = self._by_inode.popitem(last=False)
            total -= self._dropped(cfi)

    def _dropped(self, cfi: BinaryCFI) -> int:
        """``cfi`` was taken out of ``_by_inode``: forget it unless another
        inode shares it (one build at two paths); the bytes it freed."""
        if any(other is cfi for other in self._by_inode.values()):
            return 0
        self.evicted += 1
        for build_id, other in list(self._by_build_id.items()):
            if other is cfi:
                del self._by_build_id[build_id]
        return cfi.table.nbytes() if cfi.table is not None else 0

    def retain(self, mapped) -> int:
        """Forget the binaries no live process maps (``mapped``: the keys,
        as :meth:`key_of` makes them, of every live process's file
        mappings): in a long run where processes come and go, a library
        loaded by processes that exited is dead weight until one maps it
        again (then it is loaded again).  The vDSO stays.  Returns the
        bytes freed."""
        freed = 0
        for key in [k for k in self._by_inode if k not in mapped and k != ("[vdso]", 0)]:
            freed += self._dropped(self._by_inode.pop(key))
        return freed

    @staticmethod
    def key_of(m) -> tuple:
        """The cache key of the file behind mapping ``m`` (a MappedFile or
        MapEntry-like with pid)."""
        return (m.dev_major, m.dev_minor, m.inode) if m.inode else (m.path, m.pid, m.start)

    def get_vdso(self) -> BinaryCFI:
        """The vDSO's CFI, from the agent's own image (the same kernel's)."""
        cfi = self._by_inode.get(("[vdso]", 0))
        if cfi is None:
            try:
                elf = _own_vdso()
            except (OSError, ParseError) as exc:
                return self._failed("[vdso]", exc)
            cfi = self._by_inode[("[vdso]", 0)] = self._from_elf(elf, "[vdso]", 0)
        return cfi

    def _load_mapped(self, m) -> BinaryCFI:
        seen, why = self.binaries.open_mapped(m)
        if seen is None:
            if len(self.errors) < 20:
                self.errors.append(why)
            return BinaryCFI(None, None, False)
        try:
            elf = ELFFile.from_seen(seen)
        except (OSError, ParseError) as exc:
            return self._failed(m.path, exc)
        return self._from_elf(elf, m.path, m.pid)

    def _failed(self, what: str, exc: Exception) -> BinaryCFI:
        if len(self.errors) < 20:
            self.errors.append("%s: %s" % (what, exc))
        return BinaryCFI(None, None, False)

    def _from_elf(self, elf: ELFFile, path: str, pid: int) -> BinaryCFI:
        try:
            with elf:
                build_id = elf.build_id
                if build_id and build_id in self._by_build_id:
                    return self._by_build_id[build_id]
                debug = None
                if path != "[vdso]" and elf.section(".debug_frame") is None:
                    debug = self.binaries.find_debug_file(elf, path, build_id, pid)
                debug_elf = debug[1] if debug is not None else None
                try:
                    # Section bytes are read once (copied out of the file);
                    # nothing is decoded until a pc asks.
                    table = _lazy_table(elf, debug_elf)
                finally:
                    if debug_elf is not None:
                        debug_elf.close()
                has_cfi = table is not None
                load_map = LoadMap(elf.segments)
        except (OSError, ParseError) as exc:
            return self._failed(path, exc)
        cfi = BinaryCFI(table, load_map, has_cfi)
        if build_id:
            self._by_build_id[build_id] = cfi
        return cfi


def _lazy_table(elf: ELFFile, debug_elf: Optional[ELFFile]) -> Optional[LazyEhFrame]:
    """The binary's :class:`LazyEhFrame`: its .eh_frame (and .eh_frame_hdr),
    with .debug_frame (from the debug file when there is one) for what
    .eh_frame does not cover; None when it has no CFI at all."""
    if elf.e_machine != EM_X86_64:
        raise DWARFError("%s: CFI tables support x86-64 only (e_machine %d)"
                         % (elf.path or "<bytes>", elf.e_machine))
    eh = elf_sources(elf, None, ".eh_frame")
    debug = elf_sources(debug_elf if debug_elf is not None else elf, None, ".debug_frame")
    if eh:
        return LazyEhFrame(eh[0], load_eh_frame_hdr(elf), fallback=debug)
    if debug:
        return LazyEhFrame(debug[0], None)
    return None


class Walker:
    """Unwinds the samples of one capture (``mode`` is "dwarf" or "auto")."""

    def __init__(self, mode: str, cfi_cache: Optional[CFICache] = None) -> None:
        self.mode = mode
        self.cache = cfi_cache or CFICache()
        self.outcomes = [0, 0, 0, 0]
        self._trampolines: Dict[int, Dict[int, int]] = {}  # pid -> pc -> state index or -1

    # The frame step needs: the mapping lookup, the per-binary table, the
    # trampoline check.  ``proc`` supplies ``space.find`` and ``pid``;
    # ``binary_for(entry)`` returns the BinaryCFI of a file mapping or None
    # for anonymous (JIT) memory.
    def walk(self, proc, binary_for, regs: tuple, stack: Optional[bytes],
             sps: Optional[list] = None) -> Tuple[int, ...]:
        """The sample's user frames, leaf first, as return addresses.

        The leaf is the sampled pc.  Every later entry ``a`` is such that
        ``a - 1`` lies in the frame's current instruction, which is how
        consumers symbolize callers: a return address (just after its call),
        or, where the frame's pc is exact, that pc + 1 (a signal trampoline
        such as ``__restore_rt``, which is "returned to" at its first
        instruction, and the frame a signal interrupted).

        A caller is appended only once it is validated: its address lies in
        an executable mapping of the process and the stack grew towards it.
        A walk that meets anything else stops there (counted in
        :attr:`outcomes`) without a garbage frame; a return address of 0
        (the psABI's outermost-frame marker) or an undefined return-address
        rule ends it as complete.

        ``sps``, when given, receives each frame's stack pointer (a frame
        owns the stack bytes from its sp up to the next frame's sp, its
        CFA): what places Python frames among native ones.
        """
        bx, bp, sp, pc, r12, r13, r14, r15 = regs
        if pc == 0:
            return ()
        ips = [pc]
        if sps is not None:
            sps.append(sp)
        if not stack:
            self.outcomes[OUTCOME_TRUNCATED] += 1
            return tuple(ips)
        base = sp
        limit = base + len(stack) - 8
        find = proc.space.find
        cache = proc.unwind_cache
        auto = self.mode == "auto"
        # Frames repeat across samples: mapping, binary and row are looked
        # up once per distinct pc of a process (the cache is dropped when
        # its mappings change).  The leaf's pc is exact.
        hit = cache.get(pc)
        if hit is None:
            hit = self._step_info(find, binary_for, pc, cache)
        outcome = OUTCOME_TRUNCATED  # if MAX_FRAMES runs out
        first = True
        for _ in range(MAX_FRAMES):
            entry, binary, row = hit
            if entry is None:  # only the leaf: callers are validated below
                outcome = OUTCOME_NO_CFI
                break
            signal = 0
            if row is not None and row[0] != CFA_UNSUPPORTED:
                # -- a CFI step --------------------------------------------------
                # Row layout (perfagent.dwarf.rules.UnwindRow): 0 cfa_kind,
                # 1 cfa_register, 2 cfa_offset, 3 plt threshold, 4 signal
                # frame, then (kind, value, base) for ra 5, rbp 8, rbx 11,
                # r12 14, r13 17, r14 20, r15 23.  Literal indexes: a global
                # constant lookup per field would cost more than the step.
                kind = row[0]
                if kind == CFA_REG_OFFSET:
                    reg = row[1]
                    if reg == 7:
                        cfa = sp + row[2]
                    elif reg == 6:
                        cfa = bp + row[2] if bp is not None else None
                    else:
                        cfa = _reg_value(reg, sp, bx, bp, r12, r13, r14, r15)
                        cfa = cfa + row[2] if cfa is not None else None
                elif kind == CFA_PLT:
                    cfa = sp + row[2] + (8 if (pc & 15) >= row[3] else 0)
                else:  # CFA_DEREF: a signal frame's saved stack pointer
                    cfa = _deref(_reg_value(row[1], sp, bx, bp, r12, r13, r14, r15), row[2],
                                 stack, base, limit)
                    if cfa is None:
                        outcome = OUTCOME_TRUNCATED
                        break
                if cfa is None:
                    outcome = OUTCOME_BAD
                    break
                ra_kind = row[5]
                if ra_kind == RULE_OFFSET:
                    addr = cfa + row[6]
                elif ra_kind == RULE_UNDEFINED:
                    outcome = OUTCOME_COMPLETE
                    break
                elif ra_kind == RULE_EXPRESSION:  # a signal frame's saved rip
                    addr = _reg_value(row[7], sp, bx, bp, r12, r13, r14, r15)
                    if addr is None:
                        outcome = OUTCOME_BAD
                        break
                    addr += row[6]
                else:
                    outcome = OUTCOME_BAD
                    break
                if addr < base or addr > limit:
                    outcome = OUTCOME_TRUNCATED
                    break
                ra = _unpack_u64(stack, addr - base)[0]
                # Callee-saved registers, all from this frame's values: offset
                # rules read the copy (an address past it leaves the register
                # unknown, None; one below it, i.e. below the leaf's sp, was
                # popped by the leaf's epilogue already, whose rows GCC leaves
                # as they were: the register holds the caller's value); no
                # rule means the same value.
                k = row[8]
                if k == RULE_OFFSET:  # the common case, inline: saved in the frame
                    a = cfa + row[9]
                    new_bp = _unpack_u64(stack, a - base)[0] if base <= a <= limit else (bp if a < base else None)
                elif k:
                    new_bp = _restore(k, row[9], row[10], cfa, bp, stack, base, limit, sp, bx, bp, r12, r13, r14, r15)
                else:
                    new_bp = bp
                k = row[11]
                if k == RULE_OFFSET:
                    a = cfa + row[12]
                    new_bx = _unpack_u64(stack, a - base)[0] if base <= a <= limit else (bx if a < base else None)
                elif k:
                    new_bx = _restore(k, row[12], row[13], cfa, bx, stack, base, limit, sp, bx, bp, r12, r13, r14, r15)
                else:
                    new_bx = bx
                k = row[14]
                if k == RULE_OFFSET:
                    a = cfa + row[15]
                    n12 = _unpack_u64(stack, a - base)[0] if base <= a <= limit else (r12 if a < base else None)
                elif k:
                    n12 = _restore(k, row[15], row[16], cfa, r12, stack, base, limit, sp, bx, bp, r12, r13, r14, r15)
                else:
                    n12 = r12
                k = row[17]
                if k == RULE_OFFSET:
                    a = cfa + row[18]
                    n13 = _unpack_u64(stack, a - base)[0] if base <= a <= limit else (r13 if a < base else None)
                elif k:
                    n13 = _restore(k, row[18], row[19], cfa, r13, stack, base, limit, sp, bx, bp, r12, r13, r14, r15)
                else:
                    n13 = r13
                k = row[20]
                if k == RULE_OFFSET:
                    a = cfa + row[21]
                    n14 = _unpack_u64(stack, a - base)[0] if base <= a <= limit else (r14 if a < base else None)
                elif k:
                    n14 = _restore(k, row[21], row[22], cfa, r14, stack, base, limit, sp, bx, bp, r12, r13, r14, r15)
                else:
                    n14 = r14
                k = row[23]
                if k == RULE_OFFSET:
                    a = cfa + row[24]
                    n15 = _unpack_u64(stack, a - base)[0] if base <= a <= limit else (r15 if a < base else None)
                elif k:
                    n15 = _restore(k, row[24], row[25], cfa, r15, stack, base, limit, sp, bx, bp, r12, r13, r14, r15)
                else:
                    n15 = r15
                bp, bx, r12, r13, r14, r15 = new_bp, new_bx, n12, n13, n14, n15
                signal = row[4]  # a signal frame (CIE 'S'): the caller's pc is exact
            else:
                state = self._trampoline_state(proc.pid, pc, entry) if binary is None else -1
                if state >= 0:
                    # -- a CPython perf trampoline -----------------------------
                    _, ra_off, cfa_off = _TRAMPOLINE_STATES[state]
                    addr = sp + ra_off
                    if addr > limit:
                        outcome = OUTCOME_TRUNCATED
                        break
                    ra = _unpack_u64(stack, addr - base)[0]
                    cfa = sp + cfa_off
                else:
                    # -- a frame-pointer step ----------------------------------
                    if not (auto or binary is None or not binary.has_cfi) or bp is None:
                        outcome = OUTCOME_NO_CFI
                        break
                    if bp < sp or bp + 8 > limit:
                        outcome = OUTCOME_NO_CFI if bp < sp else OUTCOME_TRUNCATED
                        break
                    ra = _unpack_u64(stack, bp + 8 - base)[0]
                    cfa = bp + 16
                    bp = _unpack_u64(stack, bp - base)[0]
            if ra == 0:
                outcome = OUTCOME_COMPLETE  # the psABI's outermost-frame marker
                break
            if cfa <= sp and not first or cfa < sp:
                outcome = OUTCOME_BAD  # the stack must grow towards the caller
                break
            # Validate the caller before it becomes a frame: its pc (ra - 1,
            # inside the call, unless this was a signal frame) must lie in an
            # executable mapping.  The lookup is the next step's, so it costs
            # nothing extra.
            lookup = ra if signal else ra - 1
            hit = cache.get(lookup)
            if hit is None:
                hit = self._step_info(find, binary_for, lookup, cache)
            if hit[0] is None:
                outcome = OUTCOME_BAD
                break
            next_row = hit[2]
            # +1 where the pc is exact (see the docstring): the interrupted
            # frame, and a signal trampoline entered at its first byte.
            ips.append(ra + 1 if signal or (next_row is not None and next_row[4]) else ra)
            if sps is not None:
                sps.append(cfa)
            sp = cfa
            pc = ra
            first = False
        self.outcomes[outcome] += 1
        return tuple(ips)

    @staticmethod
    def _step_info(find, binary_for, lookup: int, cache: dict) -> tuple:
        """(mapping, binary CFI, row) of a pc, stored in the process's
        ``cache`` unless the table's answer is provisional."""
        entry = find(lookup)
        if entry is None or not entry.is_exec:
            hit = cache[lookup] = (None, None, None)
            return hit
        binary = binary_for(entry)
        row = None
        if binary is not None and binary.has_cfi:
            vaddr = binary.load_map.offset_to_vaddr(lookup - entry.start + entry.pgoff)
            if vaddr is not None:
                row = binary.table.lookup(vaddr)
                if row is None and getattr(binary.table, "provisional", False):
                    return (entry, binary, row)
        hit = cache[lookup] = (entry, binary, row)
        return hit

    def _trampoline_state(self, pid: int, pc: int, entry) -> int:
        """Which trampoline instruction ``pc`` is at, or -1 when not in one."""
        known = self._trampolines.get(pid)
        if known is None:
            known = self._trampolines[pid] = {}
        state = known.get(pc)
        if state is None:
            state = known[pc] = _match_trampoline(pid, pc)
        return state

    @staticmethod
    def new_cycle(seconds: Optional[float] = INDEX_CYCLE_SECONDS) -> None:
        """A drain cycle's walks start: FDE indexes of sections without a
        search table may take ``seconds`` of it, all binaries together
        (None: no limit, outside the drain loop)."""
        _index_allowance[0] = seconds

    def forget(self, pid: int) -> None:
        """Drop what was learnt about process ``pid`` (it exited)."""
        self._trampolines.pop(pid, None)

    def summary(self) -> str:
        total = sum(self.outcomes)
        parts = ", ".join("%d %s" % (n, OUTCOME_NAMES[i]) for i, n in enumerate(self.outcomes))
        return "unwound %d user stacks: %s" % (total, parts)


def _own_vdso() -> ELFFile:
    from perfagent.symbolize.procmaps import read_maps
    from perfagent.target import memory
    for entry in read_maps("self"):
        if entry.path == "[vdso]":
            return ELFFile.from_bytes(memory.read_exact(os.getpid(), entry.start, entry.end - entry.start))
    raise OSError("no [vdso] mapping")


def _reg_value(reg: int, sp, bx, bp, r12, r13, r14, r15):
    """The value in this frame of a DWARF register the walker tracks (None
    for others, or when unknown)."""
    if reg == 7:
        return sp
    if reg == 6:
        return bp
    if reg == 3:
        return bx
    if 12 <= reg <= 15:
        return (r12, r13, r14, r15)[reg - 12]
    return None


def _deref(value, offset: int, stack: bytes, base: int, limit: int):
    """The word at ``value + offset`` in the stack copy, or None."""
    if value is None:
        return None
    addr = value + offset
    if base <= addr <= limit:
        return _unpack_u64(stack, addr - base)[0]
    return None


def _restore(kind: int, value: int, breg: int, cfa: int, current, stack: bytes, base: int, limit: int,
             sp, bx, bp, r12, r13, r14, r15):
    """The caller's value of one callee-saved register (None: unknown)."""
    if kind == RULE_SAME_VALUE:
        return current
    if kind == RULE_OFFSET:
        return current if cfa + value < base else _deref(cfa, value, stack, base, limit)
    if kind == RULE_VAL_OFFSET:
        return cfa + value
    if kind == RULE_REGISTER:
        return _reg_value(value, sp, bx, bp, r12, r13, r14, r15)
    if kind == RULE_EXPRESSION:  # saved at breg + value (a signal frame's ucontext)
        return _deref(_reg_value(breg, sp, bx, bp, r12, r13, r14, r15), value, stack, base, limit)
    if kind == RULE_VAL_EXPRESSION:
        b = _reg_value(breg, sp, bx, bp, r12, r13, r14, r15)
        return b + value if b is not None else None
    return None  # undefined / unsupported: unknown from here on


def _match_trampoline(pid: int, pc: int) -> int:
    from perfagent.target import memory
    code = X.PY_TRAMPOLINE_CODE
    back = _TRAMPOLINE_STATES[-1][0]
    try:
        # One read covers every candidate position of pc in the trampoline,
        # unless the window starts in an unmapped page (a trampoline at the
        # start of its arena): then each candidate is read on its own.
        window = memory.read(pid, pc - back, back + len(code))
        for index, (offset, _ra, _cfa) in enumerate(_TRAMPOLINE_STATES):
            at = back - offset
            if len(window) == back + len(code):
                candidate = window[at:at + len(code)]
            else:
                candidate = memory.read(pid, pc - offset, len(code))
            if candidate == code:
                return index
    except OSError:
        pass
    return -1
