"""The decoded form of a pprof profile.

Mirrors profile.proto message for message, with one difference: every
string-table index is already resolved to its string, so callers never see
the string table and two profiles compare equal when they say the same
thing, whatever order their producers interned strings in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

LabelValue = Union[str, int]

# Names of the lazily built id indexes, dropped by Profile.reindex().
_INDEX_ATTRIBUTES = ("location_by_id", "function_by_id", "mapping_by_id")


@dataclass(frozen=True)
class ValueType:
    """What a Sample.value (or the period) counts: e.g. ("cpu", "nanoseconds")."""

    type: str
    unit: str


@dataclass
class Mapping:
    """An address range backed by one binary or pseudo-file such as [vdso]."""

    id: int
    memory_start: int = 0
    memory_limit: int = 0
    file_offset: int = 0
    filename: str = ""
    build_id: str = ""
    has_functions: bool = False
    has_filenames: bool = False
    has_line_numbers: bool = False
    has_inline_frames: bool = False


@dataclass
class Function:
    id: int
    name: str = ""
    system_name: str = ""
    filename: str = ""
    start_line: int = 0


@dataclass
class Line:
    """One frame at a location; several per location when calls were inlined."""

    function_id: int
    line: int = 0
    column: int = 0


@dataclass
class Location:
    """A code address; ``lines`` is leaf first, the last entry being the real caller."""

    id: int
    mapping_id: int = 0
    address: int = 0
    lines: List[Line] = field(default_factory=list)
    is_folded: bool = False


@dataclass
class Label:
    """A sample annotation: string-valued (``str``) or numeric (``num`` + ``num_unit``)."""

    key: str
    str: str = ""
    num: int = 0
    num_unit: str = ""


@dataclass
class Sample:
    """One stack (leaf first) with one value per Profile.sample_type entry."""

    location_ids: List[int]
    values: List[int]
    labels: List[Label] = field(default_factory=list)


@dataclass
class Profile:
    """A whole profile.

    The ``*_by_id`` dicts are built on first use and then cached, since
    callers look ids up once per frame; call ``reindex()`` after changing
    the mappings, locations or functions lists of a profile already indexed.
    """

    sample_type: List[ValueType] = field(default_factory=list)
    samples: List[Sample] = field(default_factory=list)
    mappings: List[Mapping] = field(default_factory=list)
    locations: List[Location] = field(default_factory=list)
    functions: List[Function] = field(default_factory=list)
    drop_frames: str = ""
    keep_frames: str = ""
    time_nanos: int = 0
    duration_nanos: int = 0
    period_type: Optional[ValueType] = None
    period: int = 0
    comments: List[str] = field(default_factory=list)
    default_sample_type: str = ""

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
        # dataclass field, so it takes no part in ==, repr or replace().
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
        return dataclasses.replace(
            self,
            sample_type=list(self.sample_type),
            samples=[
                Sample(list(s.location_ids), list(s.values), [dataclasses.replace(l) for l in s.labels])
                for s in self.samples
            ],
            mappings=[dataclasses.replace(m) for m in self.mappings],
            locations=[
                dataclasses.replace(loc, lines=[dataclasses.replace(ln) for ln in loc.lines])
                for loc in self.locations
            ],
            functions=[dataclasses.replace(f) for f in self.functions],
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
