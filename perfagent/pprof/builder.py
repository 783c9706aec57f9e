"""ProfileBuilder: accumulates a capture's samples and writes the pprof file.

The capture calls ``add_sample`` once per perf sample, and ``location_id``
once per frame of each, hundreds of thousands of times in a system-wide
run; those two are kept to one tuple build and one dict lookup on the
common path. Everything else (validation, string interning, label
normalisation) happens only when something new is seen, or at encode time.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from perfagent.pprof import schema as S
from perfagent.pprof.encode import LineTuple, ProfileEncoder, finish_with_header, write_gzipped_atomically
from perfagent.pprof.model import Function, Label, Line, Location, Mapping, Profile, Sample, ValueType

_UINT64_LIMIT = 1 << 64

StrLabels = Tuple[Tuple[str, str], ...]
# (key, num) or (key, num, num_unit)
NumLabels = Tuple[Tuple, ...]
SampleKey = Tuple[Tuple[int, ...], StrLabels, NumLabels]


class ProfileBuilder:
    """Builds one profile; ids handed out are 1-based and stable.

    Mappings, functions and locations are deduplicated, and samples with the
    same stack and labels are merged by summing their values, which is how
    pprof itself aggregates (Sample.value: "the element-wise sum").
    """

    def __init__(
        self,
        sample_types: Sequence[Tuple[str, str]],
        period_type: Optional[Tuple[str, str]] = None,
        period: int = 0,
        time_nanos: int = 0,
        duration_nanos: int = 0,
        comments: Sequence[str] = (),
        default_sample_type: Optional[str] = None,
        drop_frames: str = "",
        keep_frames: str = "",
    ) -> None:
        if not sample_types:
            raise ValueError("a profile needs at least one sample type")
        self.sample_types: List[ValueType] = [ValueType(t, u) for t, u in sample_types]
        type_names = [vt.type for vt in self.sample_types]
        if default_sample_type and default_sample_type not in type_names:
            raise ValueError("default_sample_type %r is not one of %r" % (default_sample_type, type_names))
        self.period_type: Optional[ValueType] = None if period_type is None else ValueType(*period_type)
        self.period = period
        self.time_nanos = time_nanos
        self.duration_nanos = duration_nanos
        self.comments: List[str] = list(comments)
        self.default_sample_type = default_sample_type or ""
        self.drop_frames = drop_frames
        self.keep_frames = keep_frames

        self._value_count = len(self.sample_types)
        self._mapping_ids: Dict[tuple, int] = {}
        self._mappings: List[tuple] = []
        self._function_ids: Dict[Tuple[str, str, str, int], int] = {}
        self._functions: List[Tuple[str, str, str, int]] = []
        self._location_ids: Dict[tuple, int] = {}
        # (mapping_id, address, lines as LineTuples, is_folded), index = id - 1
        self._locations: List[Tuple[int, int, Tuple[LineTuple, ...], bool]] = []
        # Insertion-ordered, so encoding is deterministic for a given call sequence.
        self._samples: Dict[SampleKey, List[int]] = {}
        self._sample_count = 0

    # ------------------------------------------------------------ tables

    def add_mapping(
        self,
        memory_start: int,
        memory_limit: int,
        file_offset: int,
        filename: str,
        build_id: str = "",
        has_functions: bool = True,
        has_filenames: bool = False,
        has_line_numbers: bool = False,
        has_inline_frames: bool = False,
    ) -> int:
        """Return the id of this mapping, adding it unless an identical one exists.

        has_functions defaults to True because the agent symbolizes itself:
        it tells pprof not to try symbolizing these addresses again.
        """
        key = (memory_start, memory_limit, file_offset, filename, build_id,
               bool(has_functions), bool(has_filenames), bool(has_line_numbers), bool(has_inline_frames))  # fmt: skip
        mapping_id = self._mapping_ids.get(key)
        if mapping_id is None:
            for name, value in (("memory_start", memory_start), ("memory_limit", memory_limit),
                                ("file_offset", file_offset)):  # fmt: skip
                _check_uint64(name, value)
            self._mappings.append(key)
            mapping_id = self._mapping_ids[key] = len(self._mappings)
        return mapping_id

    def function_id(self, name: str, system_name: str = "", filename: str = "", start_line: int = 0) -> int:
        """Return the id of the function with exactly these attributes, adding it if new."""
        key = (name, system_name, filename, start_line)
        function_id = self._function_ids.get(key)
        if function_id is None:
            self._functions.append(key)
            function_id = self._function_ids[key] = len(self._functions)
        return function_id

    def location_id(self, mapping_id: int, address: int, lines: Sequence = (), is_folded: bool = False,
                    by_lines: bool = False) -> int:
        """Return the id of the location at (mapping_id, address), adding it if new.

        ``lines`` holds (function_id, line) or (function_id, line, column)
        entries, leaf (innermost inlined) first; it is only read when the
        location is new, so a later call with other lines gets the first
        call's location. Address 0 means "no address" (a synthetic frame),
        so such locations are told apart by their lines instead. Pass a
        tuple of tuples for address 0 locations; other sequences work but
        take a slower path. ``by_lines`` tells locations at one address apart
        by their lines too: JIT code memory is reused, so one address can hold
        different functions over a capture.
        """
        # Per frame of every sample: one small tuple and one dict lookup.
        key = (mapping_id, address) if address and not by_lines else (mapping_id, address, lines)
        try:
            location_id = self._location_ids.get(key)
        except TypeError:  # unhashable lines (a list): take the slow path
            location_id = None
            key = None
        if location_id is None:
            location_id = self._add_location(key, mapping_id, address, lines, is_folded, by_lines)
        return location_id

    def _add_location(
        self, key: Optional[tuple], mapping_id: int, address: int, lines: Sequence, is_folded: bool,
        by_lines: bool = False,
    ) -> int:
        """Register a location under its canonical key, and ``key`` as an alias of it.

        For address 0 the canonical key holds the normalised lines, so
        ((f, 0),), ((f, 0, 0),) and [[f, 0]] all name one location; the alias
        keeps later calls spelled like this one on the fast path.
        """
        normalised = _normalise_lines(lines)
        canonical = (mapping_id, address) if address and not by_lines else (mapping_id, address, normalised)
        location_id = self._location_ids.get(canonical)
        if location_id is None:
            location_id = self._new_location(mapping_id, address, normalised, is_folded)
            self._location_ids[canonical] = location_id
        if key is not None:
            self._location_ids[key] = location_id
        return location_id

    def _new_location(self, mapping_id: int, address: int, lines: Tuple[LineTuple, ...], is_folded: bool) -> int:
        if mapping_id and not 0 < mapping_id <= len(self._mappings):
            raise ValueError("location refers to unknown mapping id %d" % mapping_id)
        _check_uint64("address", address)
        for function_id, _, _ in lines:
            if not 0 < function_id <= len(self._functions):
                raise ValueError("location line refers to unknown function id %d" % function_id)
        self._locations.append((mapping_id, address, lines, bool(is_folded)))
        return len(self._locations)

    # ------------------------------------------------------------ samples

    def add_sample(
        self,
        location_ids: Sequence[int],
        values: Sequence[int],
        labels: StrLabels = (),
        num_labels: NumLabels = (),
    ) -> None:
        """Record one sample; stack leaf first, one value per sample type.

        labels are (key, string) pairs and num_labels (key, number) or
        (key, number, unit) entries, both as tuples so they can key the
        merge dict (lists work, on a slower path). Location ids are checked
        when the profile is encoded, not here.
        """
        if len(values) != self._value_count:
            raise ValueError("sample has %d values, expected %d" % (len(values), self._value_count))
        self._sample_count += 1
        # Hot path: tuple() returns a tuple argument itself, so the key is the
        # only new object; an existing stack is summed in place, no new list.
        key = (tuple(location_ids), labels, num_labels)
        try:
            totals = self._samples.get(key)
        except TypeError:  # labels given as lists
            key = (key[0], _normalise_labels(labels), _normalise_labels(num_labels))
            totals = self._samples.get(key)
        if totals is None:
            self._add_new_sample(key, values)
            return
        index = 0
        for value in values:
            totals[index] += value
            index += 1

    def _add_new_sample(self, key: SampleKey, values: Sequence[int]) -> None:
        for label in key[1]:
            if len(label) != 2 or not isinstance(label[0], str) or not isinstance(label[1], str):
                raise ValueError("string label must be a (key, str) pair, got %r" % (label,))
        for label in key[2]:
            if len(label) not in (2, 3) or not isinstance(label[0], str) or not isinstance(label[1], int):
                raise ValueError("numeric label must be (key, num) or (key, num, unit), got %r" % (label,))
        self._samples[key] = list(values)

    # ------------------------------------------------------------ accessors

    @property
    def sample_count(self) -> int:
        """How many add_sample calls there were (before merging)."""
        return self._sample_count

    @property
    def distinct_sample_count(self) -> int:
        """How many samples the profile will hold after merging."""
        return len(self._samples)

    def total_values(self) -> List[int]:
        """Sum of every sample's values, one per sample type."""
        totals = [0] * self._value_count
        for values in self._samples.values():
            for index, value in enumerate(values):
                totals[index] += value
        return totals

    def set_duration(self, duration_nanos: int) -> None:
        """Set duration_nanos; the capture knows it only when it stops."""
        self.duration_nanos = duration_nanos

    def add_comment(self, comment: str) -> None:
        self.comments.append(comment)

    def location(self, location_id: int) -> Location:
        """Location ``location_id`` as the profile will hold it (a live view
        reads each new location back once, as a decoded profile's)."""
        mapping_id, address, lines, is_folded = self._locations[location_id - 1]
        return Location(location_id, mapping_id, address, [Line(*line) for line in lines], is_folded)

    def function(self, function_id: int) -> Optional[Function]:
        if not 0 < function_id <= len(self._functions):
            return None
        return Function(function_id, *self._functions[function_id - 1])

    def mapping(self, mapping_id: int) -> Optional[Mapping]:
        if not 0 < mapping_id <= len(self._mappings):
            return None
        return Mapping(mapping_id, *self._mappings[mapping_id - 1])

    # ------------------------------------------------------------ output

    def encode(self) -> bytes:
        """The profile as uncompressed protobuf; deterministic for a given call sequence."""
        encoder = ProfileEncoder()
        for vt in self.sample_types:
            encoder.value_type(S.PROFILE_SAMPLE_TYPE, vt.type, vt.unit)
        location_count = len(self._locations)
        for (location_ids, labels, num_labels), values in self._samples.items():
            for location_id in location_ids:
                if not 0 < location_id <= location_count:
                    raise ValueError("sample refers to unknown location id %r" % (location_id,))
            encoder.sample(location_ids, values, _label_tuples(labels, num_labels))
        for mapping_id, mapping in enumerate(self._mappings, 1):
            encoder.mapping(mapping_id, *mapping)
        for location_id, (mapping_id, address, lines, is_folded) in enumerate(self._locations, 1):
            encoder.location(location_id, mapping_id, address, lines, is_folded)
        for function_id, (name, system_name, filename, start_line) in enumerate(self._functions, 1):
            encoder.function(function_id, name, system_name, filename, start_line)
        return finish_with_header(encoder, self)

    def write(self, path: str) -> None:
        """Write the gzip'd profile to ``path`` atomically (temp file + os.replace)."""
        write_gzipped_atomically(path, self.encode())

    def to_profile(self) -> Profile:
        """The model form of what encode() would write (for inspection and tests)."""
        return Profile(
            sample_type=list(self.sample_types),
            samples=[
                Sample(list(location_ids), list(values), [Label(*t) for t in _label_tuples(labels, num_labels)])
                for (location_ids, labels, num_labels), values in self._samples.items()
            ],
            mappings=[Mapping(mapping_id, *mapping) for mapping_id, mapping in enumerate(self._mappings, 1)],
            locations=[
                Location(location_id, mapping_id, address, [Line(*line) for line in lines], is_folded)
                for location_id, (mapping_id, address, lines, is_folded) in enumerate(self._locations, 1)
            ],
            functions=[Function(function_id, *f) for function_id, f in enumerate(self._functions, 1)],
            drop_frames=self.drop_frames,
            keep_frames=self.keep_frames,
            time_nanos=self.time_nanos,
            duration_nanos=self.duration_nanos,
            period_type=self.period_type,
            period=self.period,
            comments=list(self.comments),
            default_sample_type=self.default_sample_type,
        )


def _label_tuples(labels: StrLabels, num_labels: NumLabels) -> List[Tuple[str, str, int, str]]:
    """(key, str, num, num_unit) for every label: string ones first, then numeric."""
    out = [(key, text, 0, "") for key, text in labels]
    for label in num_labels:
        out.append((label[0], "", label[1], label[2] if len(label) > 2 else ""))
    return out


def _normalise_lines(lines: Iterable) -> Tuple[LineTuple, ...]:
    out = []
    for entry in lines:
        if len(entry) == 2:
            out.append((entry[0], entry[1], 0))
        elif len(entry) == 3:
            out.append(tuple(entry))
        else:
            raise ValueError("a line is (function_id, line) or (function_id, line, column), got %r" % (entry,))
    return tuple(out)


def _normalise_labels(labels: Iterable) -> tuple:
    return tuple(tuple(label) for label in labels)


def _check_uint64(name: str, value: int) -> None:
    if not 0 <= value < _UINT64_LIMIT:
        raise ValueError("%s out of uint64 range: %r" % (name, value))
