"""pprof profiles: exact encodings, builder semantics, round trips, decoder errors."""

import gzip
import os
import random

import pytest

from perfagent.errors import ProfileFormatError
from perfagent.pprof import wire
from perfagent.pprof.profile import (
    Function,
    Label,
    Line,
    Location,
    Mapping,
    Profile,
    ProfileBuilder,
    Sample,
    ValueType,
    decode_profile,
    encode_profile,
    read_profile,
    sample_labels,
    write_profile,
)


def h(text: str) -> bytes:
    """Hex with spaces and # comments allowed, for readable expected encodings."""
    return bytes.fromhex(" ".join(line.split("#")[0] for line in text.splitlines()))


# A profile with one sample type, one function, one location and one sample,
# encoded by hand from profile.proto.
TINY_PROFILE = h(
    """
    0a 04                 # Profile.sample_type (1, LEN), 4 bytes
       08 01              #   ValueType.type (1) = string 1 "samples"
       10 02              #   ValueType.unit (2) = string 2 "count"
    12 06                 # Profile.sample (2, LEN), 6 bytes
       0a 01 01           #   Sample.location_id (1), packed: [1]
       12 01 03           #   Sample.value (2), packed: [3]
    22 0b                 # Profile.location (4, LEN), 11 bytes
       08 01              #   Location.id (1) = 1
       18 80 20           #   Location.address (3) = 0x1000
       22 04              #   Location.line (4, LEN), 4 bytes
          08 01           #     Line.function_id (1) = 1
          10 07           #     Line.line (2) = 7
    2a 04                 # Profile.function (5, LEN), 4 bytes
       08 01              #   Function.id (1) = 1
       10 03              #   Function.name (2) = string 3 "main"
    32 00                 # Profile.string_table (6): ""
    32 07 73 61 6d 70 6c 65 73  # "samples"
    32 05 63 6f 75 6e 74        # "count"
    32 04 6d 61 69 6e           # "main"
    """
)

TINY_MODEL = Profile(
    sample_type=[ValueType("samples", "count")],
    samples=[Sample([1], [3])],
    locations=[Location(1, address=0x1000, lines=[Line(1, 7)])],
    functions=[Function(1, "main")],
)

# Only the header fields 9-14 besides one sample type, to pin their encoding.
HEADER_PROFILE = h(
    """
    0a 04 08 01 10 02                 # sample_type {type: "samples", unit: "count"}
    32 00                             # string_table: ""
    32 07 73 61 6d 70 6c 65 73        #   "samples"
    32 05 63 6f 75 6e 74              #   "count"
    32 03 63 70 75                    #   "cpu"
    32 0b 6e 61 6e 6f 73 65 63 6f 6e 64 73  # "nanoseconds"
    32 03 6b 3d 76                    #   "k=v"
    48 e8 07                          # time_nanos (9) = 1000
    50 ff ff ff ff ff ff ff ff ff 01  # duration_nanos (10) = -1: int64, 10 bytes
    5a 04 08 03 10 04                 # period_type (11) {type: "cpu", unit: "nanoseconds"}
    60 92 c2 e8 04                    # period (12) = 10101010
    6a 01 05                          # comment (13), packed: ["k=v"]
    70 01                             # default_sample_type (14) = "samples"
    """
)


def tiny_builder() -> ProfileBuilder:
    b = ProfileBuilder(sample_types=[("samples", "count")])
    function_id = b.function_id("main")
    location_id = b.location_id(0, 0x1000, ((function_id, 7),))
    b.add_sample((location_id,), (3,))
    return b


def rich_builder() -> ProfileBuilder:
    """Two sample types, mappings, inlined frames, labels, merged samples."""
    b = ProfileBuilder(
        sample_types=[("samples", "count"), ("cpu", "nanoseconds")],
        period_type=("cpu", "nanoseconds"),
        period=10101010,
        time_nanos=1_700_000_000_000_000_000,
        comments=["perfagent", "k=v"],
        default_sample_type="cpu",
    )
    exe = b.add_mapping(0x400000, 0x500000, 0x1000, "/usr/bin/app", build_id="abcdef")
    libc = b.add_mapping(0x7F0000000000, 0x7F0000200000, 0, "/lib/libc.so.6")
    main = b.function_id("main", filename="app.c", start_line=10)
    work = b.function_id("work", filename="app.c", start_line=20)
    inlined = b.function_id("inlined_helper", "_Z14inlined_helperv", "app.h", 3)
    memcpy = b.function_id("memcpy")
    loc_main = b.location_id(exe, 0x401234, ((main, 15),))
    loc_work = b.location_id(exe, 0x402000, ((inlined, 4, 9), (work, 25)))
    loc_memcpy = b.location_id(libc, 0x7F0000001000, ((memcpy, 0),))
    for _ in range(3):
        b.add_sample((loc_memcpy, loc_work, loc_main), (1, 10101010), labels=(("pid", "42"), ("comm", "app")))
    b.add_sample((loc_work, loc_main), (1, 10101010), labels=(("pid", "42"),), num_labels=(("bytes", 64, "bytes"),))
    b.add_sample((loc_main,), (2, -5))
    b.set_duration(2_000_000_000)
    return b


# ---------------------------------------------------------------- exact bytes


def test_tiny_profile_bytes():
    assert tiny_builder().encode() == TINY_PROFILE


def test_tiny_profile_encode_profile_bytes():
    assert encode_profile(TINY_MODEL) == TINY_PROFILE


def test_tiny_profile_decodes():
    assert decode_profile(TINY_PROFILE) == TINY_MODEL


def test_header_fields_bytes():
    b = ProfileBuilder(
        sample_types=[("samples", "count")],
        period_type=("cpu", "nanoseconds"),
        period=10101010,
        time_nanos=1000,
        duration_nanos=-1,
        comments=["k=v"],
        default_sample_type="samples",
    )
    assert b.encode() == HEADER_PROFILE
    profile = decode_profile(HEADER_PROFILE)
    assert profile.period_type == ValueType("cpu", "nanoseconds")
    assert (profile.time_nanos, profile.duration_nanos, profile.period) == (1000, -1, 10101010)
    assert profile.comments == ["k=v"]
    assert profile.default_sample_type == "samples"


def test_negative_sample_value_bytes():
    b = ProfileBuilder(sample_types=[("delta", "bytes")])
    fid = b.function_id("f")
    b.add_sample((b.location_id(0, 1, ((fid, 0),)),), (-1,))
    encoded = b.encode()
    sample = h("12 0f 0a 01 01 12 0a ff ff ff ff ff ff ff ff ff 01")
    assert sample in encoded
    assert decode_profile(encoded).samples[0].values == [-1]


# ---------------------------------------------------------------- builder


def test_builder_dedupes_and_numbers_from_one():
    b = ProfileBuilder(sample_types=[("samples", "count")])
    m1 = b.add_mapping(0x1000, 0x2000, 0, "/a")
    assert b.add_mapping(0x1000, 0x2000, 0, "/a") == m1 == 1
    assert b.add_mapping(0x1000, 0x2000, 0, "/b") == 2
    f1 = b.function_id("f")
    assert b.function_id("f") == f1 == 1
    assert b.function_id("f", filename="other.c") == 2
    l1 = b.location_id(m1, 0x1100, ((f1, 1),))
    assert b.location_id(m1, 0x1100, ((f1, 99),)) == l1 == 1  # keyed by (mapping, address)
    assert b.location_id(2, 0x1100, ((f1, 1),)) == 2


def test_address_zero_locations_are_told_apart_by_lines():
    b = ProfileBuilder(sample_types=[("samples", "count")])
    first = b.location_id(0, 0, ((b.function_id("[kernel]"), 0),))
    second = b.location_id(0, 0, ((b.function_id("[unknown]"), 0),))
    assert first != second
    assert b.location_id(0, 0, [[1, 0]]) == first  # lists normalised on the slow path


def test_samples_merge_by_stack_and_labels():
    b = rich_builder()
    assert b.sample_count == 5
    assert b.distinct_sample_count == 3
    assert b.total_values() == [6, 4 * 10101010 - 5]
    profile = decode_profile(b.encode())
    first = profile.samples[0]
    assert first.values == [3, 3 * 10101010]
    assert profile.sample_labels(first) == {"pid": "42", "comm": "app"}
    assert sample_labels(profile.samples[1]) == {"pid": "42", "bytes": 64}
    assert profile.samples[1].labels[1] == Label("bytes", num=64, num_unit="bytes")
    assert profile.total_values() == b.total_values()


def test_labels_as_lists_merge_with_tuples():
    b = ProfileBuilder(sample_types=[("samples", "count")])
    loc = b.location_id(0, 1)
    b.add_sample([loc], [1], labels=[["pid", "1"]], num_labels=[["n", 2]])
    b.add_sample((loc,), (1,), labels=(("pid", "1"),), num_labels=(("n", 2),))
    assert b.distinct_sample_count == 1
    assert b.total_values() == [2]


def test_builder_rejects_bad_input():
    b = ProfileBuilder(sample_types=[("samples", "count"), ("cpu", "nanoseconds")])
    with pytest.raises(ValueError):
        b.add_sample((1,), (1,))  # one value for two sample types
    with pytest.raises(ValueError):
        b.location_id(0, 0x10, ((7, 1),))  # no function 7
    with pytest.raises(ValueError):
        b.location_id(3, 0x10)  # no mapping 3
    with pytest.raises(ValueError):
        b.add_mapping(-1, 0, 0, "x")
    with pytest.raises(ValueError):
        b.add_sample((1,), (1, 1), labels=(("pid", 1),))  # string label with an int
    with pytest.raises(ValueError):
        ProfileBuilder(sample_types=[("samples", "count")], default_sample_type="cpu")
    with pytest.raises(ValueError):
        ProfileBuilder(sample_types=[])
    b.add_sample((5,), (1, 1))  # location ids are checked at encode time
    with pytest.raises(ValueError, match="unknown location id 5"):
        b.encode()


def test_builder_encoding_is_deterministic(tmp_path):
    first, second = rich_builder(), rich_builder()
    assert first.encode() == second.encode()
    first.write(str(tmp_path / "a.pb.gz"))
    second.write(str(tmp_path / "b.pb.gz"))
    a = (tmp_path / "a.pb.gz").read_bytes()
    assert a == (tmp_path / "b.pb.gz").read_bytes()
    assert a[:2] == b"\x1f\x8b"
    assert a[4:8] == b"\0\0\0\0"  # gzip MTIME
    assert gzip.decompress(a) == first.encode()


def test_write_is_atomic_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "cpu.pb.gz"
    path.write_bytes(b"old")
    b = rich_builder()
    b.write(str(path))
    assert read_profile(str(path)) == b.to_profile()
    assert os.listdir(str(tmp_path)) == ["cpu.pb.gz"]
    assert (os.stat(str(path)).st_mode & 0o777) == 0o644

    def failing_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failing_replace)
    before = path.read_bytes()
    with pytest.raises(OSError, match="disk on fire"):
        tiny_builder().write(str(path))
    assert path.read_bytes() == before
    assert os.listdir(str(tmp_path)) == ["cpu.pb.gz"]


def test_set_duration_and_add_comment():
    b = tiny_builder()
    b.set_duration(123)
    b.add_comment("late")
    profile = decode_profile(b.encode())
    assert profile.duration_nanos == 123
    assert profile.comments == ["late"]


# ---------------------------------------------------------------- round trips


def test_builder_round_trip():
    b = rich_builder()
    profile = decode_profile(b.encode())
    assert profile == b.to_profile()
    work = profile.location_by_id[2]
    assert [profile.function_by_id[line.function_id].name for line in work.lines] == ["inlined_helper", "work"]
    assert work.lines[0] == Line(3, 4, 9)
    assert profile.function_by_id[3].system_name == "_Z14inlined_helperv"
    assert profile.mapping_by_id[1] == Mapping(1, 0x400000, 0x500000, 0x1000, "/usr/bin/app", "abcdef", True)
    assert profile.default_sample_type == "cpu"
    assert profile.duration_nanos == 2_000_000_000


def test_decode_encode_decode_is_stable():
    data = rich_builder().encode()
    profile = decode_profile(data)
    again = encode_profile(profile)
    assert decode_profile(again) == profile
    assert encode_profile(decode_profile(again)) == again


def test_write_profile_and_read_profile(tmp_path):
    path = str(tmp_path / "p.pb.gz")
    write_profile(TINY_MODEL, path)
    assert read_profile(path) == TINY_MODEL


def test_decode_accepts_raw_and_gzip():
    assert decode_profile(gzip.compress(TINY_PROFILE)) == decode_profile(TINY_PROFILE)


def test_extreme_values_round_trip():
    profile = Profile(
        sample_type=[ValueType("v", "count")],
        samples=[Sample([1], [-(2**63)]), Sample([1], [2**63 - 1])],
        mappings=[Mapping(2**64 - 1, 0, 2**64 - 1, 2**64 - 1, "m", has_inline_frames=True)],
        locations=[Location(1, 2**64 - 1, 2**64 - 1, [Line(1, -3, 2**63 - 1)], is_folded=True)],
        functions=[Function(1, "f", start_line=-(2**63))],
        time_nanos=-5,
        period=-(2**63),
    )
    assert decode_profile(encode_profile(profile)) == profile


def test_non_utf8_strings_survive_a_round_trip():
    data = TINY_PROFILE.replace(h("32 04 6d 61 69 6e"), h("32 04 6d ff 69 6e"))
    profile = decode_profile(data)
    assert profile.functions[0].name == "m\udcffin"
    assert encode_profile(profile) == data


def test_index_caches_follow_reindex():
    profile = decode_profile(TINY_PROFILE)
    assert set(profile.function_by_id) == {1}
    profile.functions.append(Function(2, "g"))
    profile.reindex()
    assert set(profile.function_by_id) == {1, 2}
    assert profile == profile.copy()


# ---------------------------------------------------------------- wire variants


def test_decodes_unpacked_repeated_fields():
    data = h(
        """
        0a 04 08 01 10 02        # sample_type samples/count
        12 09                    # sample, 9 bytes
           08 01                 #   location_id 1, unpacked
           0a 01 02              #   location_id [2], packed
           08 01                 #   location_id 1, unpacked again
           10 05                 #   value 5, unpacked
        22 02 08 01              # location 1
        22 02 08 02              # location 2
        32 00 32 07 73 61 6d 70 6c 65 73 32 05 63 6f 75 6e 74  # "", samples, count
        68 01 68 02              # comment (13) unpacked: "samples", "count"
        """
    )
    profile = decode_profile(data)
    assert profile.samples == [Sample([1, 2, 1], [5])]
    assert profile.comments == ["samples", "count"]


def test_string_table_may_come_first_and_fields_in_any_order():
    data = h(
        """
        32 00 32 07 73 61 6d 70 6c 65 73 32 05 63 6f 75 6e 74 32 04 6d 61 69 6e
        2a 04 08 01 10 03
        22 0b 08 01 18 80 20 22 04 08 01 10 07
        12 06 0a 01 01 12 01 03
        0a 04 08 01 10 02
        """
    )
    assert decode_profile(data) == TINY_MODEL


def _with_unknown_fields(number: int) -> bytes:
    """Unknown records of every wire type, to be skipped wherever they appear."""
    buf = bytearray()
    wire.append_varint_field(buf, number, 2**64 - 1)
    wire.append_fixed64_field(buf, number + 1, 7)
    wire.append_string_field(buf, number + 2, "ignored")
    wire.append_fixed32_field(buf, number + 3, 7)
    wire.append_key(buf, number + 4, wire.SGROUP)
    wire.append_varint_field(buf, 1, 1)
    wire.append_key(buf, number + 4, wire.EGROUP)
    return bytes(buf)


def _rebuild_with_unknowns(message: bytes, nested_fields: dict) -> bytes:
    """Copy a message, recursing into the LEN fields named by nested_fields
    ({field: nested_fields of the submessage}), with unknown records after every record."""
    out = bytearray()
    for number, wire_type, value in wire.iter_fields(message):
        if wire_type == wire.LEN:
            payload = bytes(value)
            if number in nested_fields:
                payload = _rebuild_with_unknowns(payload, nested_fields[number])
            wire.append_len_field(out, number, payload)
        else:
            wire.append_varint_field(out, number, value)
        out += _with_unknown_fields(20)
    return bytes(out)


def test_unknown_fields_of_every_wire_type_are_skipped_everywhere():
    data = rich_builder().encode()
    # Profile -> sample_type, sample (-> label), mapping, location (-> line), function, period_type
    nested = {1: {}, 2: {3: {}}, 3: {}, 4: {4: {}}, 5: {}, 11: {}}
    noisy = _rebuild_with_unknowns(data, nested)
    assert len(noisy) > 2 * len(data)
    assert decode_profile(noisy) == decode_profile(data)


# ---------------------------------------------------------------- errors


def test_every_truncation_is_a_format_error_or_a_profile():
    data = rich_builder().encode()
    for size in range(len(data)):
        try:
            result = decode_profile(data[:size])
        except ProfileFormatError:
            continue
        assert isinstance(result, Profile)


def test_every_gzip_truncation_is_a_format_error():
    data = gzip.compress(rich_builder().encode(), mtime=0)
    for size in range(2, len(data)):
        with pytest.raises(ProfileFormatError):
            decode_profile(data[:size])


def test_corrupted_bytes_never_raise_anything_else():
    data = rich_builder().encode()
    rng = random.Random(1234)
    for position in range(len(data)):
        for byte in (0x00, 0xFF, 0x80, rng.randrange(256)):
            corrupted = data[:position] + bytes([byte]) + data[position + 1 :]
            try:
                decode_profile(corrupted)
            except ProfileFormatError:
                pass


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x1f\x8b" + b"not really gzip", "not a valid gzip stream"),
        (gzip.compress(TINY_PROFILE)[:-4] + b"\0\0\0\0", "not a valid gzip stream"),  # wrong length
        (b"", "string_table is empty"),
        (h("32 01 78"), r'string_table\[0\] must be ""'),
        (h("32 00 0a 04 08 05 10 00"), r"sample_type.type: string index 5 out of range \(string_table has 1 entries\)"),
        (h("32 00 2a 0d 08 01 10 ff ff ff ff ff ff ff ff ff 01"), "function.name: string index -1 out of range"),
        (h("32 00 38 02"), "drop_frames: string index 2 out of range"),
        (h("32 00 12 03 0a 01 01"), "sample 0 refers to location 1, which does not exist"),
        (h("32 00 22 04 08 01 10 02"), "location 1 refers to mapping 2, which does not exist"),
        (h("32 00 22 06 08 01 22 02 08 09"), "location 1 refers to function 9, which does not exist"),
        (h("32 00 2a 02 08 01 2a 02 08 01"), "duplicate function id 1"),
        (h("32 00 1a 00"), "mapping with id 0"),
        (h("32 00 12 03 12 01 01"), "sample 0 has 1 values but the profile has 0 sample types"),
        (h("32 00 08 01"), "field 1: expected wire type LEN, got VARINT"),
        (h("32 00 48 00 00 00 00"), "truncated varint|invalid field number"),
        (b"this is a text file, not a profile\n", "."),
    ],
)
def test_format_errors(data, message):
    with pytest.raises(ProfileFormatError, match=message):
        decode_profile(data)


def test_read_profile_of_a_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(ProfileFormatError):
        read_profile(str(path))


def test_location_by_lines_keeps_reused_jit_addresses_apart():
    b = ProfileBuilder(sample_types=[("samples", "count")])
    m = b.add_mapping(0x1000, 0x2000, 0, "[jit]")
    f1 = b.function_id("first")
    f2 = b.function_id("second")
    a = b.location_id(m, 0x1010, ((f1, 0),), by_lines=True)
    assert b.location_id(m, 0x1010, ((f1, 0),), by_lines=True) == a
    c = b.location_id(m, 0x1010, ((f2, 0),), by_lines=True)
    assert c != a
    assert b.location_id(m, 0x1010, ((f2, 0),)) == b.location_id(m, 0x1010)  # default: by address


# ---------------------------------------------------------------- hostile gzip (issue 11)


def gzip_of_zeros(mib: int) -> bytes:
    """A gzip member inflating to ``mib`` MiB of zeros, from ~1 KB per MiB:
    one MiB deflated and full-flushed (byte-aligned, self-contained) and
    repeated.  The trailer's CRC is not computed: a decoder that stops at
    its cap never reaches it."""
    import zlib
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = raw.compress(bytes(1 << 20)) + raw.flush(zlib.Z_FULL_FLUSH)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + chunk * mib + b"\x03\x00" + b"\0" * 8


def test_gzip_bomb_stops_at_the_inflation_cap():
    import tracemalloc
    from perfagent.pprof import decode as D
    bomb = gzip_of_zeros(1024)  # 1 GiB from ~1 MB
    cap = max(D.MIN_INFLATE_CAP, D.MAX_INFLATE_RATIO * len(bomb))
    assert cap < 100 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ProfileFormatError, match="inflates to more than %d bytes" % cap):
            decode_profile(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < cap * 1.3


def test_gzip_members_padding_and_budget():
    from perfagent.budget import Budget, BudgetExceeded
    encoded = rich_builder().encode()
    half = len(encoded) // 2
    two_members = gzip.compress(encoded[:half]) + gzip.compress(encoded[half:]) + b"\0" * 16
    assert decode_profile(two_members) == decode_profile(encoded)
    with pytest.raises(ProfileFormatError, match="data after the last member"):
        decode_profile(gzip.compress(encoded) + b"junk")
    with pytest.raises(BudgetExceeded):
        decode_profile(gzip.compress(encoded), budget=Budget("tiny", max_bytes=len(encoded) - 1))
    assert decode_profile(gzip.compress(encoded), budget=Budget("enough", max_bytes=len(encoded))) \
        == decode_profile(encoded)
