"""A profile reduced to what the report views need: stacks of named frames.

Every view works on the same reduction, done once:

* a *frame* is one (function name, kind) pair; inlined calls give several
  frames per location, unsymbolized locations one ``0x...`` frame;
* a *stack* is a tuple of frame ids, root first;
* each sample keeps its stack, the value of the chosen sample type and the
  sample itself (for label filters).

Frames are interned to small ints so stacks are cheap tuples to hash,
compare and walk, which matters with 100k distinct stacks.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

from perfagent.errors import UsageError
from perfagent.pprof.profile import Profile, Sample

KIND_NATIVE = "native"
KIND_PYTHON = "python"
KIND_KERNEL = "kernel"
KIND_JIT = "jit"

_KERNEL_MAPPINGS = frozenset(("[kernel]", "[kernel.kallsyms]"))
_JIT_MAPPINGS = frozenset(("[jit]",))


class Frame(NamedTuple):
    name: str
    kind: str


class StackSample(NamedTuple):
    stack: Tuple[int, ...]  # frame ids, root first
    value: int
    sample: Sample


class StackSet:
    """The interned frames plus one StackSample per profile sample."""

    def __init__(self, frames: List[Frame], samples: List[StackSample], value_type: str, unit: str) -> None:
        self.frames = frames
        self.samples = samples
        self.value_type = value_type
        self.unit = unit

    def total(self) -> int:
        return sum(s.value for s in self.samples)

    def with_samples(self, samples: List[StackSample]) -> "StackSet":
        """The same frames over another list of samples (what filters return)."""
        return StackSet(self.frames, samples, self.value_type, self.unit)

    def merged_stacks(self) -> Dict[Tuple[int, ...], int]:
        """Total value per distinct stack, in first-seen order; zero totals dropped."""
        totals: Dict[Tuple[int, ...], int] = {}
        get = totals.get
        for stack, value, _ in self.samples:
            totals[stack] = get(stack, 0) + value
        return {stack: value for stack, value in totals.items() if value}


def choose_sample_index(profile: Profile, name: Optional[str]) -> int:
    """The index into Sample.values to report: ``name``, else pprof's default.

    pprof's default is the profile's default_sample_type, else the last
    sample type (e.g. inuse_space for a Go heap profile).
    """
    names = [vt.type for vt in profile.sample_type]
    if not names:
        raise UsageError("the profile has no sample types")
    if name is None:
        if profile.default_sample_type in names:
            return names.index(profile.default_sample_type)
        return len(names) - 1
    if name in names:
        return names.index(name)
    if name.isdigit() and int(name) < len(names):
        return int(name)
    raise UsageError("--sample-index: no sample type %r in this profile (it has: %s)" % (name, ", ".join(names)))


def load_stacks(profile: Profile, sample_index: int) -> StackSet:
    """Reduce ``profile`` to a StackSet of the values at ``sample_index``."""
    frame_ids: Dict[Frame, int] = {}
    frames: List[Frame] = []

    def intern(frame: Frame) -> int:
        frame_id = frame_ids.get(frame)
        if frame_id is None:
            frame_id = frame_ids[frame] = len(frames)
            frames.append(frame)
        return frame_id

    # Per location, its frames root first (reverse of pprof's leaf-first lines),
    # computed once: samples then only concatenate these tuples.
    location_frames: Dict[int, Tuple[int, ...]] = {}
    functions = profile.function_by_id
    mappings = profile.mapping_by_id
    for location in profile.locations:
        mapping = mappings.get(location.mapping_id)
        mapping_kind = _mapping_kind(mapping.filename if mapping is not None else "")
        ids = []
        for line in location.lines:
            function = functions.get(line.function_id)
            name = (function.name or function.system_name) if function is not None else ""
            if not name:
                continue
            kind = mapping_kind
            if kind == KIND_NATIVE and function.filename.endswith(".py"):
                kind = KIND_PYTHON
            ids.append(intern(Frame(name, kind)))
        if not ids:
            ids.append(intern(Frame("0x%x" % location.address, mapping_kind)))
        location_frames[location.id] = tuple(reversed(ids))

    samples: List[StackSample] = []
    for sample in profile.samples:
        stack: Tuple[int, ...] = ()
        # Hot path (once per sample): leaf-first ids walked backwards, so the
        # stack is built root first from the precomputed per-location tuples.
        for location_id in reversed(sample.location_ids):
            stack += location_frames.get(location_id, ())
        value = sample.values[sample_index] if sample_index < len(sample.values) else 0
        samples.append(StackSample(stack, value, sample))
    value_type = profile.sample_type[sample_index]
    return StackSet(frames, samples, value_type.type, value_type.unit)


def _mapping_kind(filename: str) -> str:
    if filename in _KERNEL_MAPPINGS:
        return KIND_KERNEL
    if filename in _JIT_MAPPINGS:
        return KIND_JIT
    return KIND_NATIVE
