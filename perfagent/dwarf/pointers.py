"""Reading DW_EH_PE-encoded pointers and LEB128 numbers.

Both .eh_frame and .eh_frame_hdr describe addresses with a one-byte encoding
(format in the low nibble, application in bits 4-6, an "indirect" bit); this
module decodes them so the two parsers share one implementation.
"""

from __future__ import annotations

import struct
from typing import Callable, Optional, Tuple

from ..errors import ParseError
from .constants import (
    DW_EH_PE_absptr, DW_EH_PE_aligned, DW_EH_PE_APPLICATION_MASK, DW_EH_PE_datarel,
    DW_EH_PE_FORMAT_MASK, DW_EH_PE_funcrel, DW_EH_PE_indirect, DW_EH_PE_omit, DW_EH_PE_pcrel,
    DW_EH_PE_sdata2, DW_EH_PE_sdata4, DW_EH_PE_sdata8, DW_EH_PE_signed, DW_EH_PE_sleb128,
    DW_EH_PE_textrel, DW_EH_PE_udata2, DW_EH_PE_udata4, DW_EH_PE_udata8, DW_EH_PE_uleb128,
)


class DWARFError(ParseError):
    """Malformed, truncated or unsupported DWARF call-frame data.

    Raised per entry: the section parsers catch it around each CIE/FDE so one
    bad entry costs only that entry.
    """


class UnresolvablePointer(DWARFError):
    """An encoded pointer whose base (datarel, textrel, indirect) is unknown.

    A separate class because the caller decides: fatal for an FDE's address,
    harmless for a personality routine or LSDA the profiler never calls.
    """


# A callback reading one target pointer at a link-time virtual address (for
# DW_EH_PE_indirect), or None when the address is not in the image.
PointerReader = Callable[[int], Optional[int]]


class Structs:
    """Precompiled fixed-size readers for one byte order."""

    __slots__ = ("u8", "u16", "u32", "u64", "s16", "s32", "s64")

    def __init__(self, little_endian: bool) -> None:
        order = "<" if little_endian else ">"
        self.u8 = struct.Struct(order + "B")
        self.u16 = struct.Struct(order + "H")
        self.u32 = struct.Struct(order + "I")
        self.u64 = struct.Struct(order + "Q")
        self.s16 = struct.Struct(order + "h")
        self.s32 = struct.Struct(order + "i")
        self.s64 = struct.Struct(order + "q")


STRUCTS_LE = Structs(True)
STRUCTS_BE = Structs(False)


def structs_for(little_endian: bool) -> Structs:
    return STRUCTS_LE if little_endian else STRUCTS_BE


# No CFI operand exceeds 64 bits (10 LEB128 bytes).  Without a cap a crafted
# run of 0x80 bytes would build ever larger ints: quadratic time.
_MAX_LEB128_SHIFT = 70


def read_uleb128(data: bytes, pos: int) -> Tuple[int, int]:
    """(value, new position).  IndexError past the end (the choke point maps it)."""
    byte = data[pos]
    pos += 1
    if byte < 0x80:  # one-byte values are the overwhelming majority in CFI
        return byte, pos
    result = byte & 0x7F
    shift = 7
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > _MAX_LEB128_SHIFT:
            raise DWARFError("LEB128 number at %d longer than 64 bits" % pos)


def read_sleb128(data: bytes, pos: int) -> Tuple[int, int]:
    """(value, new position) of a signed LEB128 number."""
    result = 0
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            if byte & 0x40:
                result -= 1 << shift
            return result, pos
        if shift > _MAX_LEB128_SHIFT:
            raise DWARFError("LEB128 number at %d longer than 64 bits" % pos)


class EncodedPointerReader:
    """Decodes DW_EH_PE pointers found in one section's bytes.

    ``section_addr`` is the section's link-time address, the base of
    DW_EH_PE_pcrel; ``data_base`` and ``text_base`` are the bases of datarel
    and textrel (None: unknown, which makes such pointers unresolvable).
    """

    def __init__(self, data: bytes, section_addr: int, address_size: int, little_endian: bool,
                 data_base: Optional[int] = None, text_base: Optional[int] = None,
                 read_pointer: Optional[PointerReader] = None) -> None:
        if address_size not in (2, 4, 8):
            raise DWARFError("unsupported address size %d" % address_size)
        self.data = data
        self.section_addr = section_addr
        self.address_size = address_size
        self.structs = structs_for(little_endian)
        self.data_base = data_base
        self.text_base = text_base
        self.read_pointer = read_pointer
        self._mask = (1 << (8 * address_size)) - 1
        self.address_limit = 1 << (8 * address_size)  # one past the highest address
        s = self.structs
        self._absptr = {2: s.u16, 4: s.u32, 8: s.u64}[address_size]
        self._signed_absptr = {2: s.s16, 4: s.s32, 8: s.s64}[address_size]
        self._fixed = {
            DW_EH_PE_udata2: s.u16, DW_EH_PE_udata4: s.u32, DW_EH_PE_udata8: s.u64,
            DW_EH_PE_sdata2: s.s16, DW_EH_PE_sdata4: s.s32, DW_EH_PE_sdata8: s.s64,
            DW_EH_PE_absptr: self._absptr, DW_EH_PE_signed: self._signed_absptr,
        }

    def read_address(self, pos: int) -> Tuple[int, int]:
        """A plain target address (.debug_frame's initial_location, ...)."""
        return self._absptr.unpack_from(self.data, pos)[0], pos + self.address_size

    def read_value(self, pos: int, fmt: int) -> Tuple[int, int]:
        """The raw value of format ``fmt`` (low nibble of an encoding), unapplied."""
        if fmt == DW_EH_PE_uleb128:
            return read_uleb128(self.data, pos)
        if fmt == DW_EH_PE_sleb128:
            return read_sleb128(self.data, pos)
        layout = self._fixed.get(fmt)
        if layout is None:
            raise DWARFError("bad DW_EH_PE format %#x" % fmt)
        return layout.unpack_from(self.data, pos)[0], pos + layout.size

    def read(self, pos: int, encoding: int, func_base: Optional[int] = None) -> Tuple[Optional[int], int]:
        """(pointer, new position); (None, pos) for DW_EH_PE_omit.

        Raises UnresolvablePointer when the application's base is unknown.
        """
        if encoding == DW_EH_PE_omit:
            return None, pos
        application = encoding & DW_EH_PE_APPLICATION_MASK
        fmt = encoding & DW_EH_PE_FORMAT_MASK
        if application == DW_EH_PE_aligned:
            # The value is an absptr stored at the next address_size boundary.
            pos += -(self.section_addr + pos) % self.address_size
            fmt = DW_EH_PE_absptr
        value, new_pos = self.read_value(pos, fmt)
        value = (value + self._base(application, pos, func_base)) & self._mask
        if encoding & DW_EH_PE_indirect:
            value = self._dereference(value)
        return value, new_pos

    def _base(self, application: int, pos: int, func_base: Optional[int]) -> int:
        if application in (DW_EH_PE_absptr, DW_EH_PE_aligned):
            return 0
        if application == DW_EH_PE_pcrel:
            return self.section_addr + pos
        bases = {DW_EH_PE_datarel: self.data_base, DW_EH_PE_textrel: self.text_base,
                 DW_EH_PE_funcrel: func_base}
        if application not in bases:
            raise DWARFError("bad DW_EH_PE application %#x" % application)
        base = bases[application]
        if base is None:
            raise UnresolvablePointer("DW_EH_PE application %#x has no known base" % application)
        return base

    def _dereference(self, address: int) -> int:
        value = self.read_pointer(address) if self.read_pointer is not None else None
        if value is None:
            raise UnresolvablePointer("DW_EH_PE_indirect pointer at %#x is not readable" % address)
        return value
