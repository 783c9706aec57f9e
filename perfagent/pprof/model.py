"""The decoded form of a pprof profile.

Mirrors profile.proto message for message, with one difference: every
string-table index is already resolved to its string, so callers never see
the string table and two profiles compare equal when they say the same
thing, whatever order their producers interned strings in.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

LabelValue = Union[str, int]

# Names of the lazily built id indexes, dropped by Profile.reindex().
_INDEX_ATTRIBUTES = ("location_by_id", "function_by_id", "mapping_by_id")


class _Record:
    """Value semantics for the messages below: keyword or positional
    construction, ``==`` and ``repr`` over the fields in declaration order
    (as dataclasses give them), unhashable since they are mutable.

    Plain classes rather than ``@dataclass``: the dataclasses module
    imports inspect (with ast, dis, tokenize) and compiles each class's
    methods at import time, ~15-20 ms of every capture's start-up for
    eight small classes."""

    __slots__ = ()
    _fields: Tuple[str, ...] = ()

    def _values(self) -> tuple:
        return tuple([getattr(self, name) for name in self._fields])

    def __eq__(self, other: object):
        if other.__class__ is self.__class__:
            return self._values() == other._values()  # type: ignore[attr-defined]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "%s(%s)" % (type(self).__qualname__, ", ".join(
            "%s=%r" % (name, getattr(self, name)) for name in self._fields))

    def _replace(self, **changes):
        """A shallow copy with ``changes`` applied (dataclasses.replace)."""
        values = {name: getattr(self, name) for name in self._fields}
        values.update(changes)
        return type(self)(**values)


class ValueType(_Record):
    """What a Sample.value (or the period) counts: e.g. ("cpu", "nanoseconds").
    Immutable and hashable."""

    __slots__ = ("type", "unit")
    _fields = __slots__

    def __init__(self, type: str, unit: str) -> None:  # noqa: A002 (profile.proto's name)
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "unit", unit)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("cannot assign to field %r of a ValueType" % name)

    def __delattr__(self, name: str) -> None:
        raise AttributeError("cannot delete field %r of a ValueType" % name)

    def __hash__(self) -> int:
        return hash((self.type, self.unit))

    def __reduce__(self):
        # copy and pickle rebuild it through __init__ (__setattr__ refuses).
        return ValueType, (self.type, self.unit)


class Mapping(_Record):
    """An address range backed by one binary or pseudo-file such as [vdso]."""

    _fields = ("id", "memory_start", "memory_limit", "file_offset", "filename", "build_id",
               "has_functions", "has_filenames", "has_line_numbers", "has_inline_frames")

    def __init__(self, id: int, memory_start: int = 0, memory_limit: int = 0,  # noqa: A002
                 file_offset: int = 0, filename: str = "", build_id: str = "",
                 has_functions: bool = False, has_filenames: bool = False,
                 has_line_numbers: bool = False, has_inline_frames: bool = False) -> None:
        self.id = id
        self.memory_start = memory_start
        self.memory_limit = memory_limit
        self.file_offset = file_offset
        self.filename = filename
        self.build_id = build_id
        self.has_functions = has_functions
        self.has_filenames = has_filenames
        self.has_line_numbers = has_line_numbers
        self.has_inline_frames = has_inline_frames


class Function(_Record):
    _fields = ("id", "name", "system_name", "filename", "start_line")

    def __init__(self, id: int, name: str = "", system_name: str = "",  # noqa: A002
                 filename: str = "", start_line: int = 0) -> None:
        self.id = id
        self.name = name
        self.system_name = system_name
        self.filename = filename
        self.start_line = start_line


class Line(_Record):
    """One frame at a location; several per location when calls were inlined."""

    _fields = ("function_id", "line", "column")

    def __init__(self, function_id: int, line: int = 0, column: int = 0) -> None:
        self.function_id = function_id
        self.line = line
        self.column = column


class Location(_Record):
    """A code address; ``lines`` is leaf first, the last entry being the real caller."""

    _fields = ("id", "mapping_id", "address", "lines", "is_folded")

    def __init__(self, id: int, mapping_id: int = 0, address: int = 0,  # noqa: A002
                 lines: Optional[List[Line]] = None, is_folded: bool = False) -> None:
        self.id = id
        self.mapping_id = mapping_id
        self.address = address
        self.lines: List[Line] = [] if lines is None else lines
        self.is_folded = is_folded


class Label(_Record):
    """A sample annotation: string-valued (``str``) or numeric (``num`` + ``num_unit``)."""

    _fields = ("key", "str", "num", "num_unit")

    def __init__(self, key: str, str: str = "", num: int = 0, num_unit: str = "") -> None:  # noqa: A002
        self.key = key
        self.str = str
        self.num = num
        self.num_unit = num_unit


class Sample(_Record):
    """One stack (leaf first) with one value per Profile.sample_type entry."""

    _fields = ("location_ids", "values", "labels")

    def __init__(self, location_ids: List[int], values: List[int],
                 labels: Optional[List[Label]] = None) -> None:
        self.location_ids = location_ids
        self.values = values
        self.labels: List[Label] = [] if labels is None else labels


class Profile(_Record):
    """A whole profile.

    The ``*_by_id`` dicts are built on first use and then cached, since
    callers look ids up once per frame; call ``reindex()`` after changing
    the mappings, locations or functions lists of a profile already indexed.
    """

    _fields = ("sample_type", "samples", "mappings", "locations", "functions", "drop_frames",
               "keep_frames", "time_nanos", "duration_nanos", "period_type", "period", "comments",
               "default_sample_type")

    def __init__(self, sample_type: Optional[List[ValueType]] = None,
                 samples: Optional[List[Sample]] = None,
                 mappings: Optional[List[Mapping]] = None,
                 locations: Optional[List[Location]] = None,
                 functions: Optional[List[Function]] = None,
                 drop_frames: str = "", keep_frames: str = "",
                 time_nanos: int = 0, duration_nanos: int = 0,
                 period_type: Optional[ValueType] = None, period: int = 0,
                 comments: Optional[List[str]] = None, default_sample_type: str = "") -> None:
        self.sample_type: List[ValueType] = [] if sample_type is None else sample_type
        self.samples: List[Sample] = [] if samples is None else samples
        self.mappings: List[Mapping] = [] if mappings is None else mappings
        self.locations: List[Location] = [] if locations is None else locations
        self.functions: List[Function] = [] if functions is None else functions
        self.drop_frames = drop_frames
        self.keep_frames = keep_frames
        self.time_nanos = time_nanos
        self.duration_nanos = duration_nanos
        self.period_type = period_type
        self.period = period
        self.comments: List[str] = [] if comments is None else comments
        self.default_sample_type = default_sample_type

    @property
    def location_by_id(self) -> Dict[int, Location]:
        return self._index("location_by_id", self.locations)

    @property
    def function_by_id(self) -> Dict[int, Function]:
        return self._index("function_by_id", self.functions)

    @property
    def mapping_by_id(self) -> Dict[int, Mapping]:
        return self._index("mapping_by_id", self.mappings)

    def _index(self, name: str, items: list) -> dict:
        # Stored in the instance __dict__ under a name that is not a
        # field, so it takes no part in ==, repr or _replace().
        cache_name = "_cache_" + name
        cached = self.__dict__.get(cache_name)
        if cached is None:
            cached = {item.id: item for item in items}
            self.__dict__[cache_name] = cached
        return cached

    def reindex(self) -> None:
        """Forget the cached id indexes (after mutating the lists)."""
        for name in _INDEX_ATTRIBUTES:
            self.__dict__.pop("_cache_" + name, None)

    def sample_labels(self, sample: Sample) -> Dict[str, LabelValue]:
        return sample_labels(sample)

    def sample_type_index(self, type_name: str) -> int:
        """Index into Sample.values of the sample type called ``type_name``."""
        for index, value_type in enumerate(self.sample_type):
            if value_type.type == type_name:
                return index
        raise KeyError(type_name)

    def total_values(self) -> List[int]:
        """Element-wise sum of every sample's values, one per sample_type."""
        totals = [0] * len(self.sample_type)
        for sample in self.samples:
            for index, value in enumerate(sample.values):
                totals[index] += value
        return totals

    def copy(self) -> "Profile":
        """A deep copy, with no cached indexes."""
        return self._replace(
            sample_type=list(self.sample_type),
            samples=[
                Sample(list(s.location_ids), list(s.values), [l._replace() for l in s.labels])
                for s in self.samples
            ],
            mappings=[m._replace() for m in self.mappings],
            locations=[
                loc._replace(lines=[ln._replace() for ln in loc.lines])
                for loc in self.locations
            ],
            functions=[f._replace() for f in self.functions],
            comments=list(self.comments),
        )


def sample_labels(sample: Sample) -> Dict[str, LabelValue]:
    """A sample's labels as a dict: the string value, or the number for numeric labels.

    pprof allows a key to repeat; the last occurrence wins here. Use
    ``sample.labels`` directly when repeats or units matter.
    """
    labels: Dict[str, LabelValue] = {}
    for label in sample.labels:
        labels[label.key] = label.str if label.str or not (label.num or label.num_unit) else label.num
    return labels
