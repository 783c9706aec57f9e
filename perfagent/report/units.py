"""Human-readable sample values, scaled the way pprof scales them.

pprof picks one output unit per report (from the smallest non-zero value,
so small entries do not all print as 0.00MB) and prints at most two
decimals with ".00" trimmed; doing the same keeps our tables comparable
with ``go tool pprof -top`` line by line.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

# (suffix, size in the base unit), smallest first.
_BYTE_SCALE: List[Tuple[str, int]] = [("B", 1), ("kB", 1024), ("MB", 1024 ** 2), ("GB", 1024 ** 3),
                                      ("TB", 1024 ** 4), ("PB", 1024 ** 5)]
_NANOSECOND_SCALE: List[Tuple[str, int]] = [("ns", 1), ("us", 1000), ("ms", 1000 ** 2), ("s", 1000 ** 3)]

_SCALES = {
    "bytes": _BYTE_SCALE,
    "byte": _BYTE_SCALE,
    "b": _BYTE_SCALE,
    "nanoseconds": _NANOSECOND_SCALE,
    "nanosecond": _NANOSECOND_SCALE,
    "ns": _NANOSECOND_SCALE,
}
# Units given coarser than the base of their scale, converted to it first.
_BASE_FACTORS = {"microseconds": ("nanoseconds", 1000), "milliseconds": ("nanoseconds", 1000 ** 2),
                 "seconds": ("nanoseconds", 1000 ** 3)}


class ValueFormatter:
    """Formats values of one sample type in a single unit chosen up front.

    The unit follows pprof's "minimum" rule: the unit of the smallest
    non-zero value, unless the largest value needs a bigger unit and is
    over 100 times the smallest, in which case the unit of 100 x the
    smallest (so the smallest still shows as at least 0.01).
    """

    def __init__(self, unit: str, values: Iterable[int]) -> None:
        base_unit, self.factor = _BASE_FACTORS.get(unit.lower(), (unit.lower(), 1))
        scale = _SCALES.get(base_unit)
        # Counts and unknown units print as plain numbers, as pprof prints them.
        self.suffix, self.divisor = ("", 1) if scale is None else scale[0]
        magnitudes = [abs(v) * self.factor for v in values if v]
        if scale is not None and magnitudes:
            smallest, largest = min(magnitudes), max(magnitudes)
            self.suffix, self.divisor = _unit_of(scale, smallest)
            if _unit_of(scale, largest)[0] != self.suffix and smallest * 100 < largest:
                self.suffix, self.divisor = _unit_of(scale, smallest * 100)

    def format(self, value: int) -> str:
        if value == 0:
            return "0"
        text = "%.2f" % (value * self.factor / self.divisor)
        if text.endswith(".00"):
            text = text[:-3]
        return text + self.suffix


def _unit_of(scale: List[Tuple[str, int]], value: int) -> Tuple[str, int]:
    """The largest unit in which ``value`` is still at least 1."""
    chosen = scale[0]
    for suffix, size in scale:
        if value >= size:
            chosen = (suffix, size)
    return chosen


def format_percent(part: float, total: float) -> str:
    """pprof's percentage: "100%" when within rounding of it, two decimals
    from 1% up, two significant digits below (0.11%, 0.0074%), "0%" for nothing."""
    ratio = abs(part / total) * 100.0 if total else 0.0
    if 99.95 <= ratio <= 100.05:
        return "100%"
    if ratio >= 1.0:
        return "%.2f%%" % ratio
    return "%.2g%%" % ratio
