"""Parsing .eh_frame, .eh_frame_hdr and .debug_frame into CIEs and FDEs.

The two sections share the DWARF call-frame format but differ in details
(DWARF 5 section 6.4 vs. the LSB .eh_frame chapter): the CIE id (all ones vs.
0), what an FDE's CIE pointer means (a section offset vs. a distance back),
and how addresses are encoded (plain vs. DW_EH_PE with augmentations).
:class:`CallFrameInfo` handles both, entry by entry: every read goes through
:func:`_parsing`, which turns struct.error/IndexError/ValueError into
:class:`DWARFError`, and the section walkers catch that per entry so one
corrupt FDE costs one FDE.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import operator
import struct
from array import array
from typing import Dict, Iterator, List, Optional, Tuple, Union

from perfagent.records import NamedTuple
from ..budget import Budget
from .constants import (
    DW_CIE_ID_32, DW_CIE_ID_64, DW_EH_PE_absptr, DW_EH_PE_datarel, DW_EH_PE_FORMAT_MASK,
    DW_EH_PE_omit, DW_EH_PE_sdata4, DWARF64_ESCAPE, DWARF_RESERVED_LENGTH_MIN, EH_CIE_ID,
    EH_FRAME_HDR_VERSION,
)
from .pointers import (
    DWARFError, EncodedPointerReader, PointerReader, UnresolvablePointer, read_sleb128,
    read_uleb128,
)

# Exceptions that mean "the bytes are not what the headers claim".
_MALFORMED = (struct.error, IndexError, ValueError, OverflowError, KeyError)

# iter_fdes checks its budget once per this many entries (a clock read).
_BUDGET_CHECK_ENTRIES = 256
# What one decoded FDE costs in memory, charged to the budget: the FDE and
# _EntryHeader tuples and the augmentation bytes object.
_FDE_BYTES = 320

# CIE versions: 1 (DWARF 2 and .eh_frame), 3 (DWARF 3/4 .debug_frame, some
# .eh_frame), 4 (DWARF 4/5 .debug_frame, adds address and segment sizes).
_CIE_VERSIONS = (1, 3, 4)


@contextlib.contextmanager
def _parsing(what: str) -> Iterator[None]:
    """The choke point: any library exception from bad bytes becomes DWARFError."""
    try:
        yield
    except DWARFError:
        raise
    except _MALFORMED as exc:
        raise DWARFError("%s: malformed (%s: %s)" % (what, type(exc).__name__, exc)) from exc


class CIE(NamedTuple):
    """A Common Information Entry, fields named as in DWARF 5 6.4.1.

    ``instructions_start``/``instructions_end`` locate initial_instructions in
    the section's bytes (the interpreter runs in place, where DW_CFA_set_loc's
    pcrel base is the position in the section).
    """

    offset: int
    dwarf64: bool
    version: int
    augmentation: str
    address_size: int
    segment_selector_size: int
    code_alignment_factor: int
    data_alignment_factor: int
    return_address_register: int
    augmentation_data: bytes
    fde_encoding: int  # 'R'; DW_EH_PE_absptr without it
    lsda_encoding: int  # 'L'; DW_EH_PE_omit without it
    personality_encoding: int  # 'P'; DW_EH_PE_omit without it
    personality: Optional[int]  # None: absent or unresolvable (indirect)
    signal_frame: bool  # 'S'
    instructions_start: int
    instructions_end: int


class FDE(NamedTuple):
    """A Frame Description Entry covering [initial_location, +address_range)."""

    offset: int
    cie: CIE
    initial_location: int
    address_range: int
    lsda_pointer: Optional[int]
    augmentation_data: bytes
    instructions_start: int
    instructions_end: int

    @property
    def pc_end(self) -> int:
        return self.initial_location + self.address_range


class _EntryHeader(NamedTuple):
    offset: int
    end: int  # offset just past the entry
    id_pos: int  # offset of the CIE id / CIE pointer field
    body: int  # offset just past that field
    cie_id: int
    dwarf64: bool
    is_cie: bool


class CallFrameInfo:
    """One .eh_frame or .debug_frame section.

    ``section_addr`` is the section's link-time address (sh_addr): the pcrel
    base, and so what makes FDE addresses come out in the ELF's p_vaddr space.
    ``data_base``/``text_base``/``read_pointer`` resolve datarel, textrel and
    indirect pointers; leave them None when unknown (such FDEs then fail
    alone, and such personality routines read as None).
    """

    def __init__(self, data: bytes, section_addr: int, is_eh_frame: bool, address_size: int = 8,
                 little_endian: bool = True, data_base: Optional[int] = None,
                 text_base: Optional[int] = None, read_pointer: Optional[PointerReader] = None,
                 name: Optional[str] = None) -> None:
        self.data = bytes(data)  # bytes index to int fastest; memoryviews of mmaps die on close
        self.section_addr = section_addr
        self.is_eh_frame = is_eh_frame
        self.address_size = address_size
        self.name = name or (".eh_frame" if is_eh_frame else ".debug_frame")
        self.pointers = EncodedPointerReader(self.data, section_addr, address_size, little_endian,
                                             data_base, text_base, read_pointer)
        self.structs = self.pointers.structs
        self._sized = {2: self.structs.u16, 4: self.structs.u32, 8: self.structs.u64}
        self._cies: Dict[int, Union[CIE, DWARFError]] = {}
        self._fde_index: Optional[Tuple[List[int], List[FDE]]] = None

    # ------------------------------------------------------------ entry walk

    def entry_header(self, offset: int) -> Optional[_EntryHeader]:
        """The header of the entry at ``offset``; None at a terminator."""
        with _parsing("%s entry at %#x" % (self.name, offset)):
            return self._entry_header(offset)

    def _entry_header(self, offset: int) -> Optional[_EntryHeader]:
        if not 0 <= offset < len(self.data):
            # Also keeps negative offsets (a CIE pointer past its FDE) from
            # indexing from the end.
            raise DWARFError("%s: entry offset %#x outside the section" % (self.name, offset))
        s = self.structs
        length = s.u32.unpack_from(self.data, offset)[0]
        pos = offset + 4
        if length == 0:
            return None
        dwarf64 = length == DWARF64_ESCAPE
        if dwarf64:
            length = s.u64.unpack_from(self.data, pos)[0]
            pos += 8
        elif length >= DWARF_RESERVED_LENGTH_MIN:
            raise DWARFError("%s entry at %#x: reserved length %#x" % (self.name, offset, length))
        end = pos + length
        id_size = 8 if dwarf64 else 4
        if end > len(self.data) or length < id_size:
            raise DWARFError("%s entry at %#x: length %#x runs past the section"
                             % (self.name, offset, length))
        cie_id = (s.u64 if dwarf64 else s.u32).unpack_from(self.data, pos)[0]
        if self.is_eh_frame:
            is_cie = cie_id == EH_CIE_ID
        else:
            is_cie = cie_id == (DW_CIE_ID_64 if dwarf64 else DW_CIE_ID_32)
        return _EntryHeader(offset, end, pos, pos + id_size, cie_id, dwarf64, is_cie)

    def iter_headers(self) -> Iterator[_EntryHeader]:
        """Every entry's header in order; stops at a terminator or end.

        A bad length makes everything after it unreachable, so that raises
        DWARFError to the caller (which counts it) rather than guessing.
        """
        offset = 0
        size = len(self.data)
        while offset < size:
            header = self.entry_header(offset)
            if header is None:
                if self.is_eh_frame:
                    return  # the zero terminator
                offset += 4  # a zero-length pad in .debug_frame
                continue
            yield header
            offset = header.end

    # ------------------------------------------------------------------- CIE

    def cie_at(self, offset: int) -> CIE:
        """The CIE at ``offset`` (cached, errors too)."""
        cached = self._cies.get(offset)
        if cached is None:
            try:
                header = self.entry_header(offset)
                if header is None or not header.is_cie:
                    raise DWARFError("%s: no CIE at %#x" % (self.name, offset))
                with _parsing("%s CIE at %#x" % (self.name, offset)):
                    cached = self._parse_cie(header)
            except DWARFError as exc:
                cached = exc
            self._cies[offset] = cached
        if isinstance(cached, DWARFError):
            raise cached
        return cached

    def _parse_cie(self, h: _EntryHeader) -> CIE:
        data = self.data
        pos = h.body
        version = data[pos]
        pos += 1
        if version not in _CIE_VERSIONS:
            raise DWARFError("%s CIE at %#x: unsupported version %d" % (self.name, h.offset, version))
        nul = data.index(b"\0", pos, h.end)
        augmentation = data[pos:nul].decode("ascii")
        pos = nul + 1
        address_size, segment_selector_size = self.address_size, 0
        if augmentation.startswith("eh"):
            pos += address_size  # legacy GCC eh_data word, meaningless to us
        if version >= 4:
            address_size, segment_selector_size = data[pos], data[pos + 1]
            pos += 2
        code_alignment_factor, pos = read_uleb128(data, pos)
        data_alignment_factor, pos = read_sleb128(data, pos)
        if version == 1:
            return_address_register = data[pos]
            pos += 1
        else:
            return_address_register, pos = read_uleb128(data, pos)
        aug = _Augmentation()
        if augmentation.startswith("z"):
            pos = self._parse_cie_augmentation(augmentation, pos, h, aug)
        elif augmentation not in ("", "eh"):
            raise DWARFError("%s CIE at %#x: unsupported augmentation %r"
                             % (self.name, h.offset, augmentation))
        if pos > h.end:
            raise DWARFError("%s CIE at %#x: fields run past its end" % (self.name, h.offset))
        return CIE(h.offset, h.dwarf64, version, augmentation, address_size, segment_selector_size,
                   code_alignment_factor, data_alignment_factor, return_address_register,
                   aug.data, aug.fde_encoding, aug.lsda_encoding, aug.personality_encoding,
                   aug.personality, aug.signal_frame, pos, h.end)

    def _parse_cie_augmentation(self, augmentation: str, pos: int, h: _EntryHeader,
                                aug: "_Augmentation") -> int:
        """Read the 'z' augmentation data; returns the position after it.

        The length prefix is what lets a reader skip letters it does not
        know, so an unknown letter ends interpretation instead of failing.
        """
        length, pos = read_uleb128(self.data, pos)
        end = pos + length
        if end > h.end:
            raise DWARFError("%s CIE at %#x: augmentation data runs past its end" % (self.name, h.offset))
        aug.data = self.data[pos:end]
        for letter in augmentation[1:]:
            if letter == "L":
                aug.lsda_encoding = self.data[pos]
                pos += 1
            elif letter == "R":
                aug.fde_encoding = self.data[pos]
                pos += 1
            elif letter == "P":
                aug.personality_encoding = self.data[pos]
                pos = self._read_personality(pos + 1, aug)
            elif letter == "S":
                aug.signal_frame = True
            elif letter == "B":
                pass  # AArch64 BTI marker: no data, no effect on the rules
            else:
                break
        return end

    def _read_personality(self, pos: int, aug: "_Augmentation") -> int:
        try:
            aug.personality, pos = self.pointers.read(pos, aug.personality_encoding)
        except UnresolvablePointer:
            # Only the personality routine is lost, which unwinding never calls;
            # skip the value by its format to keep the letters after it.
            _, pos = self.pointers.read_value(pos, aug.personality_encoding & DW_EH_PE_FORMAT_MASK)
        return pos

    # ------------------------------------------------------------------- FDE

    def fde_at(self, offset: int) -> FDE:
        """The FDE at ``offset``; DWARFError if it (or its CIE) is bad."""
        header = self.entry_header(offset)
        if header is None or header.is_cie:
            raise DWARFError("%s: no FDE at %#x" % (self.name, offset))
        return self._fde(header)

    def _fde(self, header: _EntryHeader) -> FDE:
        cie = self.cie_at(self._cie_offset(header))
        with _parsing("%s FDE at %#x" % (self.name, header.offset)):
            return self._parse_fde(header, cie)

    def _cie_offset(self, h: _EntryHeader) -> int:
        if self.is_eh_frame:
            return h.id_pos - h.cie_id  # distance back from the pointer field
        return h.cie_id

    def _parse_fde(self, h: _EntryHeader, cie: CIE) -> FDE:
        pos = h.body
        if self.is_eh_frame or cie.augmentation.startswith("z"):
            initial_location, pos = self.pointers.read(pos, cie.fde_encoding)
            if initial_location is None:
                raise DWARFError("%s FDE at %#x: omitted initial_location" % (self.name, h.offset))
            # The range is a length: the encoding's format without its application.
            address_range, pos = self.pointers.read_value(pos, cie.fde_encoding & DW_EH_PE_FORMAT_MASK)
        else:
            pos += cie.segment_selector_size
            initial_location, pos = self._read_sized(pos, cie.address_size)
            address_range, pos = self._read_sized(pos, cie.address_size)
        lsda_pointer = None
        augmentation_data = b""
        if cie.augmentation.startswith("z"):
            length, pos = read_uleb128(self.data, pos)
            augmentation_data = self.data[pos:pos + length]
            if cie.lsda_encoding != DW_EH_PE_omit and length:
                lsda_pointer = self._read_lsda(pos, cie.lsda_encoding, initial_location)
            pos += length
        if pos > h.end:
            raise DWARFError("%s FDE at %#x: fields run past its end" % (self.name, h.offset))
        if address_range < 0 or initial_location + address_range >= self.pointers.address_limit:
            # A signed range format, or an end past the last address: no code
            # can be there, and the compiled table's unsigned 64-bit arrays
            # could not hold the end.
            raise DWARFError("%s FDE at %#x: range %#x+%#x is outside the address space"
                             % (self.name, h.offset, initial_location, address_range))
        return FDE(h.offset, cie, initial_location, address_range, lsda_pointer,
                   augmentation_data, pos, h.end)

    def _read_sized(self, pos: int, size: int) -> Tuple[int, int]:
        layouts = self._sized
        if size not in layouts:
            raise DWARFError("%s: unsupported address size %d" % (self.name, size))
        return layouts[size].unpack_from(self.data, pos)[0], pos + size

    def _read_lsda(self, pos: int, encoding: int, func_base: int) -> Optional[int]:
        try:
            return self.pointers.read(pos, encoding, func_base)[0]
        except UnresolvablePointer:
            return None

    def iter_fdes(self, errors: Optional[List[DWARFError]] = None,
                  budget: Optional[Budget] = None) -> Iterator[FDE]:
        """Every decodable FDE; each failure is appended to ``errors`` instead.

        A length that runs past the section ends the walk (nothing after it
        can be found) and is recorded the same way.  ``budget`` is checked
        every few hundred entries and charged for each FDE decoded; running
        out raises BudgetExceeded (the whole section is then malformed).
        """
        headers = self.iter_headers()
        count = 0
        while True:
            try:
                header = next(headers)
            except StopIteration:
                return
            except DWARFError as exc:
                _record(errors, exc)
                return
            count += 1
            if budget is not None and not count % _BUDGET_CHECK_ENTRIES:
                budget.check()
            if header.is_cie:
                continue
            try:
                fde = self._fde(header)
            except DWARFError as exc:
                _record(errors, exc)
                continue
            if budget is not None:
                budget.charge(_FDE_BYTES)
            yield fde

    def find_fde(self, pc: int, hdr: Optional["EHFrameHdr"] = None) -> Optional[FDE]:
        """The FDE covering ``pc``, or None.

        With an .eh_frame_hdr this decodes just that FDE (and its CIE); without
        one, the first call indexes every FDE's range.
        """
        if hdr is not None and len(hdr):
            address = hdr.find_fde_address(pc)
            if address is None:
                return None
            try:
                fde = self.fde_at(address - self.section_addr)
            except DWARFError:
                return None
        else:
            fde = self._find_fde_linear(pc)
        if fde is not None and fde.initial_location <= pc < fde.pc_end:
            return fde
        return None

    def _find_fde_linear(self, pc: int) -> Optional[FDE]:
        if self._fde_index is None:
            fdes = sorted(self.iter_fdes(budget=Budget(self.name)), key=lambda f: f.initial_location)
            self._fde_index = ([f.initial_location for f in fdes], fdes)
        starts, fdes = self._fde_index
        i = bisect.bisect_right(starts, pc) - 1
        return fdes[i] if i >= 0 else None

    def instructions(self, entry: Union[CIE, FDE]) -> bytes:
        """The raw DW_CFA bytes of a CIE (initial_instructions) or FDE."""
        return self.data[entry.instructions_start:entry.instructions_end]


class _Augmentation:
    """What a CIE's augmentation string and data say, as they are read."""

    __slots__ = ("data", "fde_encoding", "lsda_encoding", "personality_encoding", "personality",
                 "signal_frame")

    def __init__(self) -> None:
        self.data = b""
        self.fde_encoding = DW_EH_PE_absptr
        self.lsda_encoding = DW_EH_PE_omit
        self.personality_encoding = DW_EH_PE_omit
        self.personality: Optional[int] = None
        self.signal_frame = False


def _record(errors: Optional[List[DWARFError]], exc: DWARFError) -> None:
    if errors is not None:
        errors.append(exc)


# The encoding every GNU linker writes for the search table: 4-byte signed
# offsets from the start of .eh_frame_hdr.  Decoded in bulk with one Struct.
_HDR_TABLE_DATAREL_SDATA4 = DW_EH_PE_datarel | DW_EH_PE_sdata4


class EHFrameHdr:
    """.eh_frame_hdr: a sorted (initial_location, FDE address) search table.

    Lets :meth:`find_fde_address` locate the FDE for a pc by bisection
    without parsing .eh_frame.  A header without a table (fde_count omitted,
    or table encoding omit) has an empty table.
    """

    def __init__(self, data: bytes, section_addr: int, address_size: int = 8,
                 little_endian: bool = True, read_pointer: Optional[PointerReader] = None) -> None:
        data = bytes(data)
        # In .eh_frame_hdr, datarel means "relative to the start of the header".
        self._pointers = EncodedPointerReader(data, section_addr, address_size, little_endian,
                                              data_base=section_addr, read_pointer=read_pointer)
        # Unsigned 64-bit arrays, not lists of ints: libLLVM's 98k entries
        # take 1.6 MB instead of 8, and bisect searches them all the same.
        self.initial_locations = array("Q")
        self.fde_addresses = array("Q")
        with _parsing(".eh_frame_hdr"):
            self._parse(data, little_endian)

    def _parse(self, data: bytes, little_endian: bool) -> None:
        version, eh_frame_ptr_enc, fde_count_enc, table_enc = data[0], data[1], data[2], data[3]
        if version != EH_FRAME_HDR_VERSION:
            raise DWARFError(".eh_frame_hdr: unsupported version %d" % version)
        self.eh_frame_ptr, pos = self._pointers.read(4, eh_frame_ptr_enc)
        fde_count, pos = self._pointers.read(pos, fde_count_enc)
        if fde_count is None or table_enc == DW_EH_PE_omit:
            return
        if table_enc == _HDR_TABLE_DATAREL_SDATA4:
            self._read_table_fast(data, pos, fde_count, little_endian)
        else:
            self._read_table(pos, fde_count, table_enc)
        locations = self.initial_locations
        if any(map(operator.gt, locations, itertools.islice(locations, 1, None))):
            pairs = sorted(zip(locations, self.fde_addresses))
            self.initial_locations = array("Q", [p[0] for p in pairs])
            self.fde_addresses = array("Q", [p[1] for p in pairs])

    def _read_table_fast(self, data: bytes, pos: int, count: int, little_endian: bool) -> None:
        end = pos + 8 * count
        if end > len(data):
            raise DWARFError(".eh_frame_hdr: table of %d entries runs past the section" % count)
        base = self._pointers.section_addr
        flat = struct.unpack_from("%s%di" % ("<" if little_endian else ">", 2 * count), data, pos)
        self.initial_locations = _addresses([base + v for v in flat[0::2]])
        self.fde_addresses = _addresses([base + v for v in flat[1::2]])

    def _read_table(self, pos: int, count: int, encoding: int) -> None:
        read = self._pointers.read
        locations, addresses = [], []
        for _ in range(count):
            location, pos = read(pos, encoding)
            address, pos = read(pos, encoding)
            locations.append(location)
            addresses.append(address)
        self.initial_locations = _addresses(locations)
        self.fde_addresses = _addresses(addresses)

    def find_fde_address(self, pc: int) -> Optional[int]:
        """Address of the FDE whose initial_location is the greatest <= pc."""
        i = bisect.bisect_right(self.initial_locations, pc) - 1
        return self.fde_addresses[i] if i >= 0 else None

    def __len__(self) -> int:
        return len(self.initial_locations)

    def nbytes(self) -> int:
        """Memory held by the search table."""
        return 16 * len(self.initial_locations)


def _addresses(values) -> array:
    """An array('Q') of addresses; a value outside [0, 2**64) (a corrupt
    entry: a negative offset, an omitted pointer) becomes 0, which no FDE
    of a shared object or PIE covers, so it can only miss."""
    try:
        return array("Q", values)
    except (OverflowError, TypeError):
        return array("Q", [v if isinstance(v, int) and 0 <= v < (1 << 64) else 0 for v in values])
