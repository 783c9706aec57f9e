"""The sliding window of ``perf-agent top``: what the CPU did lately, per function.

A capture keeps accumulating its counted stacks (CaptureState.stacks) for
the profile it may write at the end.  The live view needs only what is
recent, so it asks the capture state for the *increments* of each interval
(CaptureState.take_increments: the stacks counted since the last call),
turns each into a bucket of report stacks, and keeps the last buckets of
the window together with their running sum.  A refresh then costs what the
window holds: the new bucket and the expired one are added and subtracted,
and the totals are computed over the window's distinct stacks -- never over
the whole capture.

Naming is incremental and shared with the profile writer: one
perfagent.oncpu.LocationTable for the whole run (each frame symbolized
once, with the same per-stack rules as the written profile: trampoline
frames, the interpreter's frames between Python frames) and one
perfagent.report.stacks.FrameTable (each pprof location turned into report
frames once, exactly as ``perf-agent report`` does on the written file).
Per-function totals are the report's own: python_first() and
function_totals().
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Tuple

from perfagent.records import NamedTuple
from perfagent.oncpu import ON_CPU_SAMPLE_TYPES, LocationTable
from perfagent.pprof.builder import ProfileBuilder
from perfagent.report.stacks import FrameTable, StackSample, StackSet, python_first
from perfagent.report.top import FunctionTotals, function_totals, sort_totals

# Counts of one report stack: [samples, CPU nanoseconds].
Counts = Dict[Tuple[int, ...], List[int]]

SORT_SELF = "self"
SORT_TOTAL = "total"
SORT_NAME = "name"
SORT_KEYS = (SORT_SELF, SORT_TOTAL, SORT_NAME)


class LiveNames:
    """Captured stacks -> report stacks (frame ids, root first), named once.

    The LocationTable's ProfileBuilder only stores the names (functions,
    locations, mappings): it never receives a sample.  Converted stacks are
    cached in two generations (``new_generation``), so a stack that stays
    hot is converted once while the cache holds at most the stacks of the
    last two windows.
    """

    def __init__(self, state, symbolizer, lines: bool = False, keep_native_frames: bool = False) -> None:
        self._builder = ProfileBuilder(ON_CPU_SAMPLE_TYPES)
        self._locations = LocationTable(self._builder, state, symbolizer)
        self.frames = FrameTable(lines)
        self._keep_native_frames = keep_native_frames
        self._location_frames: List[Tuple[int, ...]] = [()]  # by location id (ids start at 1)
        self._recent: Dict[tuple, Tuple[int, ...]] = {}
        self._older: Dict[tuple, Tuple[int, ...]] = {}

    def stack(self, frames: tuple) -> Tuple[int, ...]:
        """The report stack of a captured stack (``frames``: leaf first)."""
        # Per distinct stack of each interval: one or two dict lookups when known.
        found = self._recent.get(frames)
        if found is None:
            found = self._older.get(frames)
            if found is None:
                found = self._convert(frames)
            self._recent[frames] = found
        return found

    def new_generation(self) -> None:
        """Forget the stacks not seen since the previous call."""
        self._older, self._recent = self._recent, {}

    def _convert(self, frames: tuple) -> Tuple[int, ...]:
        location_ids = self._locations.stack(frames, self._keep_native_frames)
        known = self._location_frames
        out: List[int] = []
        for location_id in reversed(location_ids):
            if location_id >= len(known):
                self._read_new_locations(location_id)
            out.extend(known[location_id])
        return tuple(out)

    def _read_new_locations(self, up_to: int) -> None:
        """Locations the table added since the last call (ids are dense)."""
        builder = self._builder
        known = self._location_frames
        for location_id in range(len(known), up_to + 1):
            location = builder.location(location_id)
            known.append(self.frames.location_frames(location, builder.function,
                                                     builder.mapping(location.mapping_id)))


def bucket_of(increments: dict, names: LiveNames) -> Counts:
    """One interval's increments ((pid, tid, frames) -> [samples, ns]) by report stack."""
    bucket: Counts = {}
    stack_of = names.stack
    for (_pid, _tid, frames), (samples, period) in increments.items():
        stack = stack_of(frames)
        slot = bucket.get(stack)
        if slot is None:
            bucket[stack] = [samples, period]
        else:
            slot[0] += samples
            slot[1] += period
    return bucket


class SlidingWindow:
    """The buckets of the last ``seconds`` and their running sum.

    A bucket is kept while it started at most ``seconds`` (plus a quarter
    of an interval of scheduling slack) before the newest one ended.
    """

    def __init__(self, seconds: float, interval: float) -> None:
        self.seconds = seconds
        self._slack = interval / 4.0
        self._buckets: Deque[Tuple[float, float, Counts]] = deque()
        self.counts: Counts = {}
        self.samples = 0
        self.nanoseconds = 0

    def push(self, start: float, end: float, bucket: Counts) -> None:
        self._add(bucket, 1)
        self._buckets.append((start, end, bucket))
        while self._buckets and end - self._buckets[0][0] > self.seconds + self._slack:
            self._add(self._buckets.popleft()[2], -1)

    def _add(self, bucket: Counts, sign: int) -> None:
        counts = self.counts
        for stack, (samples, period) in bucket.items():
            self.samples += sign * samples
            self.nanoseconds += sign * period
            slot = counts.get(stack)
            if slot is None:
                if sign > 0:
                    counts[stack] = [samples, period]
                continue
            slot[0] += sign * samples
            slot[1] += sign * period
            if slot[0] <= 0:
                del counts[stack]

    @property
    def span(self) -> float:
        """Seconds the window covers now."""
        if not self._buckets:
            return 0.0
        return self._buckets[-1][1] - self._buckets[0][0]


class WindowView(NamedTuple):
    """What one refresh shows."""

    rows: List[FunctionTotals]   # every function of the window, unsorted
    samples: int
    nanoseconds: int
    span: float                  # seconds the window covers
    python_first: bool           # the Python-first cut changed something


def window_view(window: SlidingWindow, names: LiveNames, native: bool) -> WindowView:
    """Self (flat) and total (cum) CPU nanoseconds per function over the window."""
    stacks = StackSet(names.frames.frames,
                      [StackSample(stack, counts[1], None) for stack, counts in window.counts.items()],
                      "cpu", "nanoseconds")
    if not native:
        stacks = python_first(stacks)
    return WindowView(function_totals(stacks), window.samples, window.nanoseconds, window.span,
                      stacks.python_first)


def sorted_rows(rows: List[FunctionTotals], key: str) -> List[FunctionTotals]:
    """By self time (then total, name), by total time (then self, name), or by name."""
    if key == SORT_NAME:
        return sorted(rows, key=lambda t: (t.name, -t.flat, -t.cum))
    return sort_totals(rows, by_cum=key == SORT_TOTAL)
