"""Protocol buffer wire format, just enough of it for pprof.

Written by hand because the agent may import nothing outside the standard
library. Facts come from the protobuf encoding specification: a message is a
sequence of (key, value) records where key = field_number << 3 | wire_type.

The encoder appends to a caller-owned ``bytearray`` instead of returning
``bytes`` so that building a large profile does not allocate one small
object per field. The decoder hands out ``memoryview`` slices so walking
nested messages copies nothing.
"""

from __future__ import annotations

import struct
from typing import Iterable, Iterator, List, Tuple, Union

from perfagent.errors import ProfileFormatError

# Wire types, named as the protobuf encoding specification names them.
VARINT = 0  # int32, int64, uint32, uint64, sint32, sint64, bool, enum
I64 = 1  # fixed64, sfixed64, double
LEN = 2  # string, bytes, embedded messages, packed repeated fields
SGROUP = 3  # group start (deprecated)
EGROUP = 4  # group end (deprecated)
I32 = 5  # fixed32, sfixed32, float

WIRE_TYPE_NAMES = {
    VARINT: "VARINT",
    I64: "I64",
    LEN: "LEN",
    SGROUP: "SGROUP",
    EGROUP: "EGROUP",
    I32: "I32",
}

# Field numbers are 29 bits; 0 is reserved.
MAX_FIELD_NUMBER = (1 << 29) - 1
# A varint carries at most 64 bits, so at most ceil(64 / 7) = 10 bytes.
MAX_VARINT_BYTES = 10

_UINT64_LIMIT = 1 << 64
_INT64_MIN = -(1 << 63)
_SIGN_BIT = 1 << 63

_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")

Buffer = Union[bytes, bytearray, memoryview]
FieldValue = Union[int, memoryview]


# ---------------------------------------------------------------- encoding


def append_varint(buf: bytearray, value: int) -> None:
    """Append ``value`` as a base-128 varint.

    Negative numbers are int64 values: protobuf sends them as their 64-bit
    two's complement, which always takes 10 bytes. Anything outside
    [-2**63, 2**64) cannot be represented and raises ValueError rather than
    being silently truncated.
    """
    if 0 <= value < 0x80:
        # By far the most common case in a profile (ids, small counts).
        buf.append(value)
        return
    if value < 0:
        if value < _INT64_MIN:
            raise ValueError("varint out of int64 range: %d" % value)
        value += _UINT64_LIMIT
    elif value >= _UINT64_LIMIT:
        raise ValueError("varint out of uint64 range: %d" % value)
    while value > 0x7F:
        buf.append((value & 0x7F) | 0x80)
        value >>= 7
    buf.append(value)


def encode_varint(value: int) -> bytes:
    """Return ``value`` as a varint; convenience for tests and one-off keys."""
    buf = bytearray()
    append_varint(buf, value)
    return bytes(buf)


def zigzag_encode(value: int) -> int:
    """Map a signed 64-bit int onto unsigned so small magnitudes stay short (sint64)."""
    return ((value << 1) ^ (value >> 63)) & (_UINT64_LIMIT - 1)


def zigzag_decode(value: int) -> int:
    """Inverse of zigzag_encode."""
    return (value >> 1) ^ -(value & 1)


def field_key(field_number: int, wire_type: int) -> int:
    """The record tag: field number in the high bits, wire type in the low 3."""
    if not 1 <= field_number <= MAX_FIELD_NUMBER:
        raise ValueError("field number out of range: %d" % field_number)
    return (field_number << 3) | wire_type


def append_key(buf: bytearray, field_number: int, wire_type: int) -> None:
    append_varint(buf, field_key(field_number, wire_type))


def append_varint_field(buf: bytearray, field_number: int, value: int) -> None:
    """Append a VARINT record, even when value is 0 (callers decide on proto3 defaults)."""
    append_varint(buf, (field_number << 3) | VARINT)
    append_varint(buf, value)


def append_len_field(buf: bytearray, field_number: int, payload: Buffer) -> None:
    """Append a LEN record: key, byte length, payload."""
    append_varint(buf, (field_number << 3) | LEN)
    append_varint(buf, len(payload))
    buf += payload


def append_string_field(buf: bytearray, field_number: int, text: str) -> None:
    """Append a string as UTF-8; surrogateescape round-trips undecodable input bytes."""
    append_len_field(buf, field_number, text.encode("utf-8", "surrogateescape"))


def append_packed_varints(buf: bytearray, field_number: int, values: Iterable[int]) -> None:
    """Append a packed repeated varint field: one LEN record holding all values.

    Nothing is written for an empty sequence, which is how proto3 spells an
    empty repeated field.
    """
    payload = bytearray()
    for value in values:
        append_varint(payload, value)
    if payload:
        append_len_field(buf, field_number, payload)


def append_fixed64_field(buf: bytearray, field_number: int, value: int) -> None:
    """Append an I64 record (pprof has none; used to test that decoders skip them)."""
    append_varint(buf, (field_number << 3) | I64)
    buf += _FIXED64.pack(value & (_UINT64_LIMIT - 1))


def append_fixed32_field(buf: bytearray, field_number: int, value: int) -> None:
    """Append an I32 record (pprof has none; used to test that decoders skip them)."""
    append_varint(buf, (field_number << 3) | I32)
    buf += _FIXED32.pack(value & 0xFFFFFFFF)


# ---------------------------------------------------------------- decoding


def to_int64(value: int) -> int:
    """Reinterpret a decoded 64-bit varint as int64 (two's complement)."""
    return value - _UINT64_LIMIT if value & _SIGN_BIT else value


def read_varint(buf: Buffer, pos: int, end: int) -> Tuple[int, int]:
    """Decode one varint starting at ``pos``; return (value, position after it).

    Rejects varints running past ``end``, longer than 10 bytes, or whose
    10th byte carries bits beyond the 64th, as the reference decoders do.
    """
    if pos < end:
        byte = buf[pos]
        if byte < 0x80:  # the common one-byte case, without the loop
            return byte, pos + 1
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise ProfileFormatError("truncated varint at offset %d" % pos)
        byte = buf[pos]
        pos += 1
        if shift == 63 and byte > 1:
            if byte & 0x80:
                raise ProfileFormatError(
                    "varint longer than %d bytes at offset %d" % (MAX_VARINT_BYTES, pos - MAX_VARINT_BYTES)
                )
            raise ProfileFormatError("varint overflows 64 bits at offset %d" % (pos - MAX_VARINT_BYTES))
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def iter_fields(data: Buffer) -> Iterator[Tuple[int, int, FieldValue]]:
    """Walk the records of one message: yield (field_number, wire_type, value).

    VARINT, I64 and I32 values come back as unsigned ints; LEN values as a
    memoryview slice of ``data`` (no copy). Groups (SGROUP..EGROUP) are
    skipped whole, since no pprof field is a group but a producer may still
    send one as an unknown field. Offsets in error messages are relative to
    ``data``.
    """
    view = data if isinstance(data, memoryview) else memoryview(data)
    pos = 0
    end = len(view)
    while pos < end:
        key_pos = pos
        key, pos = read_varint(view, pos, end)
        field_number = key >> 3
        wire_type = key & 7
        if not 1 <= field_number <= MAX_FIELD_NUMBER:
            raise ProfileFormatError("invalid field number %d at offset %d" % (field_number, key_pos))
        if wire_type == VARINT:
            value, pos = read_varint(view, pos, end)
            yield field_number, wire_type, value
        elif wire_type == LEN:
            length, pos = read_varint(view, pos, end)
            if length > end - pos:
                raise ProfileFormatError(
                    "field %d: length %d at offset %d runs past the end of the message"
                    % (field_number, length, key_pos)
                )
            yield field_number, wire_type, view[pos : pos + length]
            pos += length
        elif wire_type == I64:
            if end - pos < 8:
                raise ProfileFormatError("field %d: truncated I64 at offset %d" % (field_number, key_pos))
            yield field_number, wire_type, _FIXED64.unpack_from(view, pos)[0]
            pos += 8
        elif wire_type == I32:
            if end - pos < 4:
                raise ProfileFormatError("field %d: truncated I32 at offset %d" % (field_number, key_pos))
            yield field_number, wire_type, _FIXED32.unpack_from(view, pos)[0]
            pos += 4
        elif wire_type == SGROUP:
            pos = _skip_group(view, pos, end, field_number)
        elif wire_type == EGROUP:
            raise ProfileFormatError("field %d: unmatched EGROUP at offset %d" % (field_number, key_pos))
        else:
            raise ProfileFormatError("invalid wire type %d at offset %d" % (wire_type, key_pos))


def _skip_group(view: memoryview, pos: int, end: int, group_field: int) -> int:
    """Return the position after the EGROUP that closes ``group_field``.

    Iterative with an explicit stack so a hostile input of deeply nested
    groups cannot exhaust Python's recursion limit.
    """
    open_groups: List[int] = [group_field]
    while open_groups:
        if pos >= end:
            raise ProfileFormatError("field %d: group not closed before end of message" % group_field)
        key_pos = pos
        key, pos = read_varint(view, pos, end)
        field_number = key >> 3
        wire_type = key & 7
        if wire_type == VARINT:
            _, pos = read_varint(view, pos, end)
        elif wire_type == LEN:
            length, pos = read_varint(view, pos, end)
            if length > end - pos:
                raise ProfileFormatError("field %d: length %d at offset %d runs past the end" % (field_number, length, key_pos))
            pos += length
        elif wire_type == I64:
            pos += 8
        elif wire_type == I32:
            pos += 4
        elif wire_type == SGROUP:
            open_groups.append(field_number)
        elif wire_type == EGROUP:
            if open_groups.pop() != field_number:
                raise ProfileFormatError("field %d: mismatched EGROUP at offset %d" % (field_number, key_pos))
        else:
            raise ProfileFormatError("invalid wire type %d at offset %d" % (wire_type, key_pos))
        if pos > end:
            raise ProfileFormatError("field %d: truncated value at offset %d" % (field_number, key_pos))
    return pos


def unpack_varints(payload: memoryview) -> List[int]:
    """Decode the body of a packed repeated varint field."""
    values: List[int] = []
    append = values.append
    pos = 0
    end = len(payload)
    while pos < end:
        byte = payload[pos]
        if byte < 0x80:
            # One-byte values (small ids and counts) dominate: skip the call.
            append(byte)
            pos += 1
        else:
            value, pos = read_varint(payload, pos, end)
            append(value)
    return values


def extend_repeated_varints(out: List[int], field_number: int, wire_type: int, value: FieldValue) -> None:
    """Add one record of a repeated scalar field to ``out``, packed or not.

    Proto3 producers pack repeated scalars, but parsers must accept both
    forms and Go's runtime/pprof writes some fields unpacked.
    """
    if wire_type == VARINT:
        out.append(value)  # type: ignore[arg-type]
    elif wire_type == LEN:
        out.extend(unpack_varints(value))  # type: ignore[arg-type]
    else:
        raise ProfileFormatError(
            "field %d: wire type %s is not valid for a repeated varint field"
            % (field_number, WIRE_TYPE_NAMES.get(wire_type, str(wire_type)))
        )


def expect_varint(field_number: int, wire_type: int, value: FieldValue) -> int:
    """Return a scalar field's value, or raise if it was sent with another wire type."""
    if wire_type != VARINT:
        raise ProfileFormatError(
            "field %d: expected wire type VARINT, got %s"
            % (field_number, WIRE_TYPE_NAMES.get(wire_type, str(wire_type)))
        )
    return value  # type: ignore[return-value]


def expect_len(field_number: int, wire_type: int, value: FieldValue) -> memoryview:
    """Return a message/string field's payload, or raise on another wire type."""
    if wire_type != LEN:
        raise ProfileFormatError(
            "field %d: expected wire type LEN, got %s"
            % (field_number, WIRE_TYPE_NAMES.get(wire_type, str(wire_type)))
        )
    return value  # type: ignore[return-value]

