"""Encoding pprof profiles: the message writers shared by encode_profile and
ProfileBuilder, and the deterministic, atomic gzip'd file write.

Records go out in profile.proto field-number order, scalars equal to their
proto3 default (0, "", false) are omitted, and repeated scalars are packed,
which is what Go's runtime/pprof and pprof itself write. The string table
(field 6) must list every string used by fields 1-5 and 7-14, so the strings
of the later fields are interned just before it is written.
"""

from __future__ import annotations

import gzip
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from perfagent.pprof import schema as S
from perfagent.pprof.model import Profile
from perfagent.pprof.wire import append_len_field, append_packed_varints, append_string_field, append_varint

# (key, str, num, num_unit) of one Label, with strings not yet interned.
LabelTuple = Tuple[str, str, int, str]
# (function_id, line, column) of one Line.
LineTuple = Tuple[int, int, int]

# Level 6 is zlib's default: level 9 takes about twice as long on a large
# profile for a few percent less size.
GZIP_LEVEL = 6
# Profiles are for reading by whoever runs pprof later, not secrets.
PROFILE_FILE_MODE = 0o644


class StringTable:
    """Interns strings in first-use order; index 0 is always ""."""

    __slots__ = ("strings", "_index")

    def __init__(self) -> None:
        self.strings: List[str] = [""]
        self._index: Dict[str, int] = {"": 0}

    def intern(self, text: str) -> int:
        index = self._index.get(text)
        if index is None:
            index = len(self.strings)
            self._index[text] = index
            self.strings.append(text)
        return index


class ProfileEncoder:
    """Appends Profile records to one buffer; call the methods in field order.

    Each submessage is assembled in a reusable scratch buffer and then copied
    behind its key and length, so encoding N samples does not allocate N
    bytearrays.
    """

    def __init__(self) -> None:
        self.out = bytearray()
        self.strings = StringTable()
        self._body = bytearray()
        self._inner = bytearray()

    # -- fields 1-5

    def value_type(self, field_number: int, type_name: str, unit: str) -> None:
        body = self._body
        del body[:]
        _append_int_if_set(body, S.VALUE_TYPE_TYPE, self.strings.intern(type_name))
        _append_int_if_set(body, S.VALUE_TYPE_UNIT, self.strings.intern(unit))
        append_len_field(self.out, field_number, body)

    def sample(self, location_ids: Sequence[int], values: Sequence[int], labels: Iterable[LabelTuple]) -> None:
        body = self._body
        del body[:]
        append_packed_varints(body, S.SAMPLE_LOCATION_ID, location_ids)
        append_packed_varints(body, S.SAMPLE_VALUE, values)
        for key, text, num, num_unit in labels:
            self._label(body, key, text, num, num_unit)
        append_len_field(self.out, S.PROFILE_SAMPLE, body)

    def _label(self, body: bytearray, key: str, text: str, num: int, num_unit: str) -> None:
        inner = self._inner
        del inner[:]
        intern = self.strings.intern
        _append_int_if_set(inner, S.LABEL_KEY, intern(key))
        _append_int_if_set(inner, S.LABEL_STR, intern(text))
        _append_int_if_set(inner, S.LABEL_NUM, num)
        _append_int_if_set(inner, S.LABEL_NUM_UNIT, intern(num_unit))
        append_len_field(body, S.SAMPLE_LABEL, inner)

    def mapping(
        self,
        mapping_id: int,
        memory_start: int,
        memory_limit: int,
        file_offset: int,
        filename: str,
        build_id: str,
        has_functions: bool,
        has_filenames: bool,
        has_line_numbers: bool,
        has_inline_frames: bool,
    ) -> None:
        body = self._body
        del body[:]
        intern = self.strings.intern
        _append_int_if_set(body, S.MAPPING_ID, mapping_id)
        _append_int_if_set(body, S.MAPPING_MEMORY_START, memory_start)
        _append_int_if_set(body, S.MAPPING_MEMORY_LIMIT, memory_limit)
        _append_int_if_set(body, S.MAPPING_FILE_OFFSET, file_offset)
        _append_int_if_set(body, S.MAPPING_FILENAME, intern(filename))
        _append_int_if_set(body, S.MAPPING_BUILD_ID, intern(build_id))
        _append_int_if_set(body, S.MAPPING_HAS_FUNCTIONS, int(has_functions))
        _append_int_if_set(body, S.MAPPING_HAS_FILENAMES, int(has_filenames))
        _append_int_if_set(body, S.MAPPING_HAS_LINE_NUMBERS, int(has_line_numbers))
        _append_int_if_set(body, S.MAPPING_HAS_INLINE_FRAMES, int(has_inline_frames))
        append_len_field(self.out, S.PROFILE_MAPPING, body)

    def location(
        self, location_id: int, mapping_id: int, address: int, lines: Iterable[LineTuple], is_folded: bool
    ) -> None:
        body = self._body
        del body[:]
        _append_int_if_set(body, S.LOCATION_ID, location_id)
        _append_int_if_set(body, S.LOCATION_MAPPING_ID, mapping_id)
        _append_int_if_set(body, S.LOCATION_ADDRESS, address)
        inner = self._inner
        for function_id, line, column in lines:
            del inner[:]
            _append_int_if_set(inner, S.LINE_FUNCTION_ID, function_id)
            _append_int_if_set(inner, S.LINE_LINE, line)
            _append_int_if_set(inner, S.LINE_COLUMN, column)
            append_len_field(body, S.LOCATION_LINE, inner)
        _append_int_if_set(body, S.LOCATION_IS_FOLDED, int(is_folded))
        append_len_field(self.out, S.PROFILE_LOCATION, body)

    def function(self, function_id: int, name: str, system_name: str, filename: str, start_line: int) -> None:
        body = self._body
        del body[:]
        intern = self.strings.intern
        _append_int_if_set(body, S.FUNCTION_ID, function_id)
        _append_int_if_set(body, S.FUNCTION_NAME, intern(name))
        _append_int_if_set(body, S.FUNCTION_SYSTEM_NAME, intern(system_name))
        _append_int_if_set(body, S.FUNCTION_FILENAME, intern(filename))
        _append_int_if_set(body, S.FUNCTION_START_LINE, start_line)
        append_len_field(self.out, S.PROFILE_FUNCTION, body)

    # -- fields 6-14

    def finish(
        self,
        drop_frames: str,
        keep_frames: str,
        time_nanos: int,
        duration_nanos: int,
        period_type: Optional[Tuple[str, str]],
        period: int,
        comments: Sequence[str],
        default_sample_type: str,
    ) -> bytes:
        """Write the string table and the trailing scalar fields; return the profile."""
        intern = self.strings.intern
        drop_index = intern(drop_frames)
        keep_index = intern(keep_frames)
        if period_type is not None:
            intern(period_type[0])
            intern(period_type[1])
        comment_indexes = [intern(comment) for comment in comments]
        default_index = intern(default_sample_type)

        out = self.out
        for text in self.strings.strings:
            append_string_field(out, S.PROFILE_STRING_TABLE, text)
        _append_int_if_set(out, S.PROFILE_DROP_FRAMES, drop_index)
        _append_int_if_set(out, S.PROFILE_KEEP_FRAMES, keep_index)
        _append_int_if_set(out, S.PROFILE_TIME_NANOS, time_nanos)
        _append_int_if_set(out, S.PROFILE_DURATION_NANOS, duration_nanos)
        if period_type is not None:
            # Written even when both strings are "": presence is the information.
            self.value_type(S.PROFILE_PERIOD_TYPE, period_type[0], period_type[1])
        _append_int_if_set(out, S.PROFILE_PERIOD, period)
        append_packed_varints(out, S.PROFILE_COMMENT, comment_indexes)
        _append_int_if_set(out, S.PROFILE_DEFAULT_SAMPLE_TYPE, default_index)
        return bytes(out)


def _append_int_if_set(buf: bytearray, field_number: int, value: int) -> None:
    """A VARINT record, left out when value is the proto3 default 0."""
    if value:
        append_varint(buf, (field_number << 3))  # wire type VARINT is 0
        append_varint(buf, value)


def encode_profile(profile: Profile) -> bytes:
    """Encode a model Profile as uncompressed protobuf (see ProfileBuilder for captures)."""
    encoder = ProfileEncoder()
    for value_type in profile.sample_type:
        encoder.value_type(S.PROFILE_SAMPLE_TYPE, value_type.type, value_type.unit)
    for sample in profile.samples:
        encoder.sample(
            sample.location_ids,
            sample.values,
            [(label.key, label.str, label.num, label.num_unit) for label in sample.labels],
        )
    for m in profile.mappings:
        encoder.mapping(
            m.id, m.memory_start, m.memory_limit, m.file_offset, m.filename, m.build_id,
            m.has_functions, m.has_filenames, m.has_line_numbers, m.has_inline_frames,
        )  # fmt: skip
    for location in profile.locations:
        lines = [(line.function_id, line.line, line.column) for line in location.lines]
        encoder.location(location.id, location.mapping_id, location.address, lines, location.is_folded)
    for f in profile.functions:
        encoder.function(f.id, f.name, f.system_name, f.filename, f.start_line)
    return finish_with_header(encoder, profile)


def finish_with_header(encoder: "ProfileEncoder", source) -> bytes:
    """Finish with the profile-level fields of ``source``: a decoded Profile
    or a ProfileBuilder, which spell them alike."""
    period_type = source.period_type
    return encoder.finish(
        drop_frames=source.drop_frames,
        keep_frames=source.keep_frames,
        time_nanos=source.time_nanos,
        duration_nanos=source.duration_nanos,
        period_type=None if period_type is None else (period_type.type, period_type.unit),
        period=source.period,
        comments=source.comments,
        default_sample_type=source.default_sample_type,
    )


def gzip_profile(data: bytes) -> bytes:
    """Gzip with mtime 0 and no file name, so equal profiles give equal files."""
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


def write_profile(profile: Profile, path: str) -> None:
    """Encode, gzip and atomically write a model Profile."""
    write_gzipped_atomically(path, encode_profile(profile))


#: Names tried before make_temp_file gives up (tempfile's TMP_MAX).
TEMP_ATTEMPTS = 10000


def make_temp_file(directory: str, prefix: str, suffix: str = "") -> Tuple[int, str]:
    """(fd, path) of a new file in ``directory``, created 0600 with O_EXCL
    (what tempfile.mkstemp does, whose module imports shutil, random, bz2
    and lzma: several ms of every start-up for this one call)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
    for _ in range(TEMP_ATTEMPTS):
        path = os.path.join(directory, prefix + os.urandom(6).hex() + suffix)
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError("no unused temporary name in %s" % directory)


def write_gzipped_atomically(path: str, data: bytes) -> None:
    """Gzip ``data`` into ``path`` so that readers see the old file or the whole new one.

    The temporary file lives in the target directory because os.replace is
    only atomic within one file system.
    """
    compressed = gzip_profile(data)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp_path = make_temp_file(directory, "." + os.path.basename(path) + ".", ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(compressed)
            f.flush()
            os.fsync(f.fileno())
            # mkstemp creates 0600; a profile is meant to be read by others.
            os.fchmod(f.fileno(), PROFILE_FILE_MODE)
        os.replace(temp_path, path)
    except BaseException:
        try:
            os.unlink(temp_path)
        except OSError:
            pass
        raise
