"""Decoding pprof profiles (gzip'd or raw protobuf) into the model.

Two passes: the top-level records are first sorted by field, because the
string table may come after the messages that index into it (profile.proto
fixes no order on the wire); then each message is decoded with strings
resolved and checked on the spot. Any malformation ends as one
ProfileFormatError with a one-line message, never another exception.

Time and memory are linear in the input: a gzip'd profile may inflate to at
most :data:`MAX_INFLATE_RATIO` times its size (profiles compress 1.5-10x; a
deflate bomb reaches 1000x), inflated a chunk at a time so a bomb stops at
the cap, and decoding is a fixed number of passes with no recursion.
"""

from __future__ import annotations

import zlib
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from perfagent.budget import Budget

from perfagent.errors import ProfileFormatError
from perfagent.pprof import schema as S
from perfagent.pprof.model import Function, Label, Line, Location, Mapping, Profile, Sample, ValueType
from perfagent.pprof.wire import expect_len, expect_varint, extend_repeated_varints, iter_fields, to_int64

GZIP_MAGIC = b"\x1f\x8b"

#: A gzip'd profile inflates to at most this many times its own size ...
MAX_INFLATE_RATIO = 64

#: ... or this many bytes, whichever is more (small files).
MIN_INFLATE_CAP = 16 << 20

# Bytes inflated per zlib call (the unit of budget checks).
_INFLATE_CHUNK = 1 << 20

# wbits for zlib.decompressobj: a gzip header and trailer (CRC-32, ISIZE).
_GZIP_WBITS = 16 + zlib.MAX_WBITS

Strings = Callable[[int, str], str]


def read_profile(path: str) -> Profile:
    """Read and decode a profile file; OSError from opening it passes through."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_profile(data)


def decode_profile(data: bytes, budget: Optional[Budget] = None) -> Profile:
    """Decode a profile, gunzipping first when the data starts with the gzip magic.

    Inflated bytes are charged to ``budget`` when one is given.
    """
    if data[:2] == GZIP_MAGIC:
        data = _gunzip(data, budget)
    return _decode_profile_message(memoryview(data))


def _gunzip(data: bytes, budget: Optional[Budget] = None) -> bytearray:
    """Every gzip member of ``data`` (zero padding allowed after the last, as
    gzip(1) and the gzip module accept), at most the inflation cap."""
    limit = max(MIN_INFLATE_CAP, MAX_INFLATE_RATIO * len(data))
    out = bytearray()
    rest = bytes(data)
    try:
        while rest:
            inflater = zlib.decompressobj(_GZIP_WBITS)
            pending = rest
            while not inflater.eof:
                if budget is not None:
                    budget.check()
                before = len(pending)
                chunk = inflater.decompress(pending, min(_INFLATE_CHUNK, limit + 1 - len(out)))
                if len(out) + len(chunk) > limit:
                    raise ProfileFormatError(
                        "gzip stream inflates to more than %d bytes (%dx its size); not a profile"
                        % (limit, MAX_INFLATE_RATIO))
                if budget is not None:
                    budget.charge(len(chunk))
                out += chunk
                pending = inflater.unconsumed_tail
                if not chunk and len(pending) == before:
                    raise ProfileFormatError("not a valid gzip stream: truncated")
            rest = inflater.unused_data.lstrip(b"\0")
            if rest and rest[:2] != GZIP_MAGIC:
                raise ProfileFormatError("not a valid gzip stream: data after the last member")
    except zlib.error as error:
        raise ProfileFormatError("not a valid gzip stream: %s" % error) from None
    return out


def _decode_profile_message(view: memoryview) -> Profile:
    by_field: Dict[int, List[tuple]] = {}
    for field_number, wire_type, value in iter_fields(view):
        by_field.setdefault(field_number, []).append((wire_type, value))

    strings = _string_resolver(_decode_string_table(by_field.get(S.PROFILE_STRING_TABLE, ())))

    profile = Profile()
    profile.sample_type = [
        _decode_value_type(payload, strings, "sample_type")
        for payload in _messages(by_field, S.PROFILE_SAMPLE_TYPE)
    ]
    profile.mappings = [_decode_mapping(p, strings) for p in _messages(by_field, S.PROFILE_MAPPING)]
    profile.functions = [_decode_function(p, strings) for p in _messages(by_field, S.PROFILE_FUNCTION)]
    profile.locations = [_decode_location(p) for p in _messages(by_field, S.PROFILE_LOCATION)]
    profile.samples = [_decode_sample(p, strings) for p in _messages(by_field, S.PROFILE_SAMPLE)]

    profile.drop_frames = strings(_last_int64(by_field, S.PROFILE_DROP_FRAMES), "drop_frames")
    profile.keep_frames = strings(_last_int64(by_field, S.PROFILE_KEEP_FRAMES), "keep_frames")
    profile.time_nanos = _last_int64(by_field, S.PROFILE_TIME_NANOS)
    profile.duration_nanos = _last_int64(by_field, S.PROFILE_DURATION_NANOS)
    period_types = _messages(by_field, S.PROFILE_PERIOD_TYPE)
    if period_types:
        # A repeated non-repeated message field merges; the last one wins for scalars.
        profile.period_type = _decode_value_type(period_types[-1], strings, "period_type")
    profile.period = _last_int64(by_field, S.PROFILE_PERIOD)
    profile.comments = [
        strings(to_int64(index), "comment")
        for index in _repeated_varints(by_field, S.PROFILE_COMMENT)
    ]
    profile.default_sample_type = strings(
        _last_int64(by_field, S.PROFILE_DEFAULT_SAMPLE_TYPE), "default_sample_type"
    )
    _check_references(profile)
    return profile


# ------------------------------------------------------------ top-level helpers


def _messages(by_field: Dict[int, List[tuple]], field_number: int) -> List[memoryview]:
    return [expect_len(field_number, wire_type, value) for wire_type, value in by_field.get(field_number, ())]


def _last_int64(by_field: Dict[int, List[tuple]], field_number: int) -> int:
    """A singular scalar's value; protobuf says the last record wins."""
    records = by_field.get(field_number)
    if not records:
        return 0
    wire_type, value = records[-1]
    return to_int64(expect_varint(field_number, wire_type, value))


def _repeated_varints(by_field: Dict[int, List[tuple]], field_number: int) -> List[int]:
    values: List[int] = []
    for wire_type, value in by_field.get(field_number, ()):
        extend_repeated_varints(values, field_number, wire_type, value)
    return values


def _decode_string_table(records: Iterable[tuple]) -> List[str]:
    table: List[str] = []
    for wire_type, value in records:
        payload = expect_len(S.PROFILE_STRING_TABLE, wire_type, value)
        # surrogateescape: a producer's non-UTF-8 bytes survive a re-encode unchanged.
        table.append(bytes(payload).decode("utf-8", "surrogateescape"))
    if not table:
        raise ProfileFormatError('string_table is empty; string_table[0] must be ""')
    if table[0] != "":
        raise ProfileFormatError('string_table[0] must be "", got %r' % table[0])
    return table


def _string_resolver(table: Sequence[str]) -> Strings:
    """Return strings(index, where) -> table[index], raising on a bad index."""
    size = len(table)

    def strings(index: int, where: str) -> str:
        if 0 <= index < size:
            return table[index]
        raise ProfileFormatError(
            "%s: string index %d out of range (string_table has %d entries)" % (where, index, size)
        )

    return strings


# ------------------------------------------------------------ messages


def _decode_value_type(view: memoryview, strings: Strings, where: str) -> ValueType:
    type_index = unit_index = 0
    for field_number, wire_type, value in iter_fields(view):
        if field_number == S.VALUE_TYPE_TYPE:
            type_index = to_int64(expect_varint(field_number, wire_type, value))
        elif field_number == S.VALUE_TYPE_UNIT:
            unit_index = to_int64(expect_varint(field_number, wire_type, value))
    return ValueType(strings(type_index, where + ".type"), strings(unit_index, where + ".unit"))


def _decode_sample(view: memoryview, strings: Strings) -> Sample:
    location_ids: List[int] = []
    raw_values: List[int] = []
    labels: List[Label] = []
    for field_number, wire_type, value in iter_fields(view):
        if field_number == S.SAMPLE_LOCATION_ID:
            extend_repeated_varints(location_ids, field_number, wire_type, value)
        elif field_number == S.SAMPLE_VALUE:
            extend_repeated_varints(raw_values, field_number, wire_type, value)
        elif field_number == S.SAMPLE_LABEL:
            labels.append(_decode_label(expect_len(field_number, wire_type, value), strings))
    return Sample(location_ids, [to_int64(v) for v in raw_values], labels)


def _decode_label(view: memoryview, strings: Strings) -> Label:
    key = str_index = num = num_unit = 0
    for field_number, wire_type, value in iter_fields(view):
        if field_number == S.LABEL_KEY:
            key = to_int64(expect_varint(field_number, wire_type, value))
        elif field_number == S.LABEL_STR:
            str_index = to_int64(expect_varint(field_number, wire_type, value))
        elif field_number == S.LABEL_NUM:
            num = to_int64(expect_varint(field_number, wire_type, value))
        elif field_number == S.LABEL_NUM_UNIT:
            num_unit = to_int64(expect_varint(field_number, wire_type, value))
    return Label(
        key=strings(key, "label.key"),
        str=strings(str_index, "label.str"),
        num=num,
        num_unit=strings(num_unit, "label.num_unit"),
    )


# Mapping fields that are plain uint64 / bool / string index, for a table-driven decode.
_MAPPING_UINT64 = {
    S.MAPPING_ID: "id",
    S.MAPPING_MEMORY_START: "memory_start",
    S.MAPPING_MEMORY_LIMIT: "memory_limit",
    S.MAPPING_FILE_OFFSET: "file_offset",
}
_MAPPING_BOOL = {
    S.MAPPING_HAS_FUNCTIONS: "has_functions",
    S.MAPPING_HAS_FILENAMES: "has_filenames",
    S.MAPPING_HAS_LINE_NUMBERS: "has_line_numbers",
    S.MAPPING_HAS_INLINE_FRAMES: "has_inline_frames",
}
_MAPPING_STRING = {S.MAPPING_FILENAME: "filename", S.MAPPING_BUILD_ID: "build_id"}


def _decode_mapping(view: memoryview, strings: Strings) -> Mapping:
    mapping = Mapping(id=0)
    for field_number, wire_type, value in iter_fields(view):
        if field_number in _MAPPING_UINT64:
            setattr(mapping, _MAPPING_UINT64[field_number], expect_varint(field_number, wire_type, value))
        elif field_number in _MAPPING_BOOL:
            setattr(mapping, _MAPPING_BOOL[field_number], expect_varint(field_number, wire_type, value) != 0)
        elif field_number in _MAPPING_STRING:
            name = _MAPPING_STRING[field_number]
            index = to_int64(expect_varint(field_number, wire_type, value))
            setattr(mapping, name, strings(index, "mapping." + name))
    return mapping


def _decode_function(view: memoryview, strings: Strings) -> Function:
    function = Function(id=0)
    for field_number, wire_type, value in iter_fields(view):
        if field_number == S.FUNCTION_ID:
            function.id = expect_varint(field_number, wire_type, value)
        elif field_number == S.FUNCTION_NAME:
            function.name = strings(to_int64(expect_varint(field_number, wire_type, value)), "function.name")
        elif field_number == S.FUNCTION_SYSTEM_NAME:
            index = to_int64(expect_varint(field_number, wire_type, value))
            function.system_name = strings(index, "function.system_name")
        elif field_number == S.FUNCTION_FILENAME:
            function.filename = strings(to_int64(expect_varint(field_number, wire_type, value)), "function.filename")
        elif field_number == S.FUNCTION_START_LINE:
            function.start_line = to_int64(expect_varint(field_number, wire_type, value))
    return function


def _decode_location(view: memoryview) -> Location:
    location = Location(id=0)
    for field_number, wire_type, value in iter_fields(view):
        if field_number == S.LOCATION_ID:
            location.id = expect_varint(field_number, wire_type, value)
        elif field_number == S.LOCATION_MAPPING_ID:
            location.mapping_id = expect_varint(field_number, wire_type, value)
        elif field_number == S.LOCATION_ADDRESS:
            location.address = expect_varint(field_number, wire_type, value)
        elif field_number == S.LOCATION_LINE:
            location.lines.append(_decode_line(expect_len(field_number, wire_type, value)))
        elif field_number == S.LOCATION_IS_FOLDED:
            location.is_folded = expect_varint(field_number, wire_type, value) != 0
    return location


def _decode_line(view: memoryview) -> Line:
    line = Line(function_id=0)
    for field_number, wire_type, value in iter_fields(view):
        if field_number == S.LINE_FUNCTION_ID:
            line.function_id = expect_varint(field_number, wire_type, value)
        elif field_number == S.LINE_LINE:
            line.line = to_int64(expect_varint(field_number, wire_type, value))
        elif field_number == S.LINE_COLUMN:
            line.column = to_int64(expect_varint(field_number, wire_type, value))
    return line


# ------------------------------------------------------------ validation


def _check_references(profile: Profile) -> None:
    """Enforce the id rules profile.proto states, as Go's pprof does on parse."""
    mapping_ids = _unique_ids(profile.mappings, "mapping")
    function_ids = _unique_ids(profile.functions, "function")
    location_ids = _unique_ids(profile.locations, "location")
    for location in profile.locations:
        if location.mapping_id and location.mapping_id not in mapping_ids:
            raise ProfileFormatError(
                "location %d refers to mapping %d, which does not exist" % (location.id, location.mapping_id)
            )
        for line in location.lines:
            if line.function_id and line.function_id not in function_ids:
                raise ProfileFormatError(
                    "location %d refers to function %d, which does not exist" % (location.id, line.function_id)
                )
    value_count = len(profile.sample_type)
    for index, sample in enumerate(profile.samples):
        if len(sample.values) != value_count:
            raise ProfileFormatError(
                "sample %d has %d values but the profile has %d sample types"
                % (index, len(sample.values), value_count)
            )
        for location_id in sample.location_ids:
            if location_id not in location_ids:
                raise ProfileFormatError(
                    "sample %d refers to location %d, which does not exist" % (index, location_id)
                )


def _unique_ids(items: Sequence, kind: str) -> set:
    ids = set()
    for item in items:
        if item.id == 0:
            raise ProfileFormatError("%s with id 0 (ids must be nonzero)" % kind)
        if item.id in ids:
            raise ProfileFormatError("duplicate %s id %d" % (kind, item.id))
        ids.add(item.id)
    return ids
