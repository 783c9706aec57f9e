"""The protobuf wire format, byte for byte against hand-computed encodings."""

import pytest

from perfagent.errors import ProfileFormatError
from perfagent.pprof import wire
from perfagent.pprof.wire import EGROUP, I32, I64, LEN, SGROUP, VARINT


def h(text: str) -> bytes:
    """Hex with spaces and # comments allowed, for readable expected encodings."""
    return bytes.fromhex(" ".join(line.split("#")[0] for line in text.splitlines()))


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "80 01"),
        (150, "96 01"),  # the protobuf encoding guide's example
        (300, "ac 02"),
        (16383, "ff 7f"),
        (16384, "80 80 01"),
        (2**32, "80 80 80 80 10"),
        (2**63 - 1, "ff ff ff ff ff ff ff ff 7f"),
        (2**63, "80 80 80 80 80 80 80 80 80 01"),
        (2**64 - 1, "ff ff ff ff ff ff ff ff ff 01"),
        # int64 negatives: 64-bit two's complement, always 10 bytes.
        (-1, "ff ff ff ff ff ff ff ff ff 01"),
        (-2, "fe ff ff ff ff ff ff ff ff 01"),
        (-(2**63), "80 80 80 80 80 80 80 80 80 01"),
    ],
)
def test_varint_encoding(value, encoded):
    assert wire.encode_varint(value) == h(encoded)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 150, 300, 2**35 + 7, 2**63, 2**64 - 1])
def test_varint_decodes_back(value):
    data = wire.encode_varint(value)
    assert wire.read_varint(data, 0, len(data)) == (value, len(data))


@pytest.mark.parametrize("value", [-1, -2, -150, -(2**63)])
def test_negative_varint_decodes_as_int64(value):
    data = wire.encode_varint(value)
    raw, end = wire.read_varint(data, 0, len(data))
    assert end == 10
    assert wire.to_int64(raw) == value


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1])
def test_varint_out_of_range_is_refused(value):
    with pytest.raises(ValueError):
        wire.encode_varint(value)


@pytest.mark.parametrize("value, encoded", [(0, 0), (-1, 1), (1, 2), (-2, 3), (2**63 - 1, 2**64 - 2), (-(2**63), 2**64 - 1)])
def test_zigzag(value, encoded):
    assert wire.zigzag_encode(value) == encoded
    assert wire.zigzag_decode(encoded) == value


def test_field_keys():
    assert wire.field_key(1, VARINT) == 0x08
    assert wire.field_key(2, LEN) == 0x12
    assert wire.field_key(6, LEN) == 0x32
    assert wire.field_key(1, I64) == 0x09
    assert wire.field_key(1, I32) == 0x0D
    assert wire.field_key(16, VARINT) == 0x80  # needs a two-byte key
    buf = bytearray()
    wire.append_key(buf, 16, VARINT)
    assert bytes(buf) == h("80 01")
    with pytest.raises(ValueError):
        wire.field_key(0, VARINT)
    with pytest.raises(ValueError):
        wire.field_key(2**29, VARINT)


def test_scalar_and_len_fields():
    buf = bytearray()
    wire.append_varint_field(buf, 1, 150)
    wire.append_string_field(buf, 2, "testing")
    wire.append_len_field(buf, 3, b"")
    wire.append_fixed64_field(buf, 4, 1)
    wire.append_fixed32_field(buf, 5, 0xDEADBEEF)
    assert bytes(buf) == h(
        """
        08 96 01                    # field 1 VARINT 150
        12 07 74 65 73 74 69 6e 67  # field 2 LEN "testing"
        1a 00                       # field 3 LEN empty
        21 01 00 00 00 00 00 00 00  # field 4 I64 1, little endian
        2d ef be ad de              # field 5 I32 0xdeadbeef
        """
    )


def test_packed_varints():
    buf = bytearray()
    wire.append_packed_varints(buf, 4, [3, 270, 86942])  # the encoding guide's packed example
    assert bytes(buf) == h("22 06 03 8e 02 9e a7 05")
    buf = bytearray()
    wire.append_packed_varints(buf, 2, [-1, 1])
    assert bytes(buf) == h("12 0b ff ff ff ff ff ff ff ff ff 01 01")
    buf = bytearray()
    wire.append_packed_varints(buf, 2, [])
    assert bytes(buf) == b""  # an empty repeated field is absent


def test_iter_fields_every_wire_type():
    data = h(
        """
        08 96 01                    # 1 VARINT 150
        12 03 61 62 63              # 2 LEN "abc"
        19 ff ff ff ff ff ff ff ff  # 3 I64
        25 01 02 03 04              # 4 I32
        2b                          # 5 SGROUP
          08 01  12 01 78  33 34    #   nested fields and an inner group 6
          3d 00 00 00 00            #   an I32 inside the group
        2c                          # 5 EGROUP
        30 07                       # 6 VARINT 7
        """
    )
    fields = [(n, t, bytes(v) if t == LEN else v) for n, t, v in wire.iter_fields(data)]
    assert fields == [
        (1, VARINT, 150),
        (2, LEN, b"abc"),
        (3, I64, 2**64 - 1),
        (4, I32, 0x04030201),
        (6, VARINT, 7),
    ]


def test_len_values_are_views_not_copies():
    data = bytearray(h("0a 02 01 02"))
    (_, _, value), = wire.iter_fields(data)
    assert isinstance(value, memoryview)
    data_view = memoryview(data)
    (_, _, value), = wire.iter_fields(data_view)
    assert value.obj is data


def test_repeated_varints_packed_and_unpacked():
    out = []
    for number, wire_type, value in wire.iter_fields(h("08 01 0a 02 02 03 08 04")):
        wire.extend_repeated_varints(out, number, wire_type, value)
    assert out == [1, 2, 3, 4]
    with pytest.raises(ProfileFormatError):
        wire.extend_repeated_varints(out, 1, I32, 5)


@pytest.mark.parametrize(
    "data, message",
    [
        ("80", "truncated varint"),
        ("08", "truncated varint"),
        ("08 80 80", "truncated varint"),
        ("08 80 80 80 80 80 80 80 80 80 80 01", "longer than 10 bytes"),
        ("08 ff ff ff ff ff ff ff ff ff 02", "overflows 64 bits"),
        ("0a 05 01 02", "runs past the end"),
        ("0a ff ff ff ff 0f", "runs past the end"),
        ("09 01 02 03", "truncated I64"),
        ("0d 01 02", "truncated I32"),
        ("0e", "invalid wire type 6"),
        ("0f", "invalid wire type 7"),
        ("00 01", "invalid field number 0"),
        ("0c", "unmatched EGROUP"),
        ("0b 08 01", "group not closed"),
        ("0b 14", "mismatched EGROUP"),
        ("0b 0a 09 00", "runs past the end"),
        ("0b 09 00", "truncated value"),
    ],
)
def test_malformed_input(data, message):
    with pytest.raises(ProfileFormatError, match=message):
        list(wire.iter_fields(h(data)))


def test_expect_wire_type():
    assert wire.expect_varint(1, VARINT, 5) == 5
    with pytest.raises(ProfileFormatError, match="expected wire type VARINT, got LEN"):
        wire.expect_varint(1, LEN, memoryview(b""))
    with pytest.raises(ProfileFormatError, match="expected wire type LEN, got I64"):
        wire.expect_len(1, I64, 0)
    assert (SGROUP, EGROUP) == (3, 4)
