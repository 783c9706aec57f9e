"""A profile reduced to what the report views need: stacks of named frames.

Every view works on the same reduction, done once:

* a *frame* is one (function name, kind) pair, plus the file (and first
  line) for Python functions, and the line with ``--lines``; inlined calls
  give several frames per location, unsymbolized locations one ``0x...``
  frame; a Python frame is a function whose file is a ``.py`` file (or a
  CPython perf-map symbol), whatever mapping it is in;
* a *stack* is a tuple of frame ids, root first;
* each sample keeps its stack, the value of the chosen sample type and the
  sample itself (for label filters).

Frames are interned to small ints so stacks are cheap tuples to hash,
compare and walk, which matters with 100k distinct stacks.

``python_first`` then turns the stacks into the Python-first view (the
report's default for profiles with Python frames).
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Tuple

from perfagent.records import NamedTuple
from perfagent.errors import UsageError
from perfagent.pprof.profile import Function, Location, Mapping, Profile, Sample
from perfagent.report.text import display

KIND_NATIVE = "native"
KIND_PYTHON = "python"
KIND_KERNEL = "kernel"
KIND_JIT = "jit"

_KERNEL_MAPPINGS = frozenset(("[kernel]", "[kernel.kallsyms]"))
_JIT_MAPPINGS = frozenset(("[jit]",))
PY_PERF_MAP_PREFIX = "py::"  # CPython's perf trampoline symbols: py::qualname:file
_FROZEN_PREFIX = "<frozen "  # co_filename of the code of frozen modules (importlib, os, ...)
# Where installed Python packages and the standard library live: the path
# after these is the module path (what py-spy and tracebacks users know).
_PACKAGE_DIRS = ("/site-packages/", "/dist-packages/")
_STDLIB_DIR = re.compile(r"/lib/(?:pypy|python)\d+(?:\.\d+)?[a-z]*/")
# The header line of the table and the tree in the Python-first view.
PYTHON_FIRST_NOTE = ("View: Python first (native frames under a Python function count as its own time; "
                     "--native shows them)")


class Frame(NamedTuple):
    name: str  # escaped for display; with --lines it carries "(file:line)"
    kind: str
    file: str = ""  # Python frames (and, with --lines, frames with a line): the file as recorded
    line: int = 0  # with --lines the sampled line, else a Python function's first line (0: unknown)


class StackSample(NamedTuple):
    stack: Tuple[int, ...]  # frame ids, root first
    value: int
    sample: Sample


class StackSet:
    """The interned frames plus one StackSample per profile sample.

    ``python_first`` is True when python_first() moved native time onto
    Python frames (the views say so in their header).
    """

    def __init__(self, frames: List[Frame], samples: List[StackSample], value_type: str, unit: str) -> None:
        self.frames = frames
        self.samples = samples
        self.value_type = value_type
        self.unit = unit
        self.python_first = False

    def total(self) -> int:
        return sum(s.value for s in self.samples)

    def with_samples(self, samples: List[StackSample]) -> "StackSet":
        """The same frames over another list of samples (what filters return)."""
        result = StackSet(self.frames, samples, self.value_type, self.unit)
        result.python_first = self.python_first
        return result

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
    raise UsageError("--sample-index: no sample type %r in this profile (it has: %s)"
                     % (name, ", ".join(display(n) for n in names)))


def load_stacks(profile: Profile, sample_index: int, lines: bool = False) -> StackSet:
    """Reduce ``profile`` to a StackSet of the values at ``sample_index``.

    With ``lines``, a frame is a function at one line (``name (file:line)``)
    wherever the profile records the line, as ``pprof -lines``; otherwise
    one function is one frame. Strings are escaped for display here, once
    per location (see text.py), so no view ever meets an unprintable name.
    Time and memory are linear in the profile: stacks are built as lists
    (no tuple concatenation per frame) and share the per-location tuples'
    int objects.
    """
    table = FrameTable(lines)
    # Per location, its frames root first (reverse of pprof's leaf-first lines),
    # computed once: samples then only extend a list with these tuples.
    location_frames: Dict[int, Tuple[int, ...]] = {}
    functions = profile.function_by_id
    mappings = profile.mapping_by_id
    for location in profile.locations:
        location_frames[location.id] = table.location_frames(location, functions.get,
                                                              mappings.get(location.mapping_id))

    samples: List[StackSample] = []
    append = samples.append
    empty: Tuple[int, ...] = ()
    for sample in profile.samples:
        # Hot path (once per sample): leaf-first location ids walked backwards,
        # each location's root-first frames appended in place: linear in the
        # depth, where `stack += ...` on a tuple was quadratic.
        stack: List[int] = []
        extend = stack.extend
        get = location_frames.get
        for location_id in reversed(sample.location_ids):
            extend(get(location_id, empty))
        value = sample.values[sample_index] if sample_index < len(sample.values) else 0
        append(StackSample(tuple(stack), value, sample))
    value_type = profile.sample_type[sample_index]
    return StackSet(table.frames, samples, display(value_type.type), display(value_type.unit))


class FrameTable:
    """Interned frames, and the frames of each pprof location (root first).

    ``load_stacks`` fills one for a whole profile; perf-agent top keeps one
    for a whole capture and feeds it each location once, as it appears.
    """

    def __init__(self, lines: bool = False) -> None:
        self.lines = lines
        self.frames: List[Frame] = []
        self._ids: Dict[Frame, int] = {}
        # A function has many locations (one per sampled address): its frame
        # (names escaped, kind decided) is made once per line it needs.
        self._line_frames: Dict[Tuple[int, int, str], Optional[int]] = {}

    def intern(self, frame: Frame) -> int:
        frame_id = self._ids.get(frame)
        if frame_id is None:
            frame_id = self._ids[frame] = len(self.frames)
            self.frames.append(frame)
        return frame_id

    def location_frames(self, location: Location, function_of: Callable[[int], Optional[Function]],
                        mapping: Optional[Mapping]) -> Tuple[int, ...]:
        """The frame ids of ``location``, root first (pprof lists its lines
        leaf first); ``function_of(id)``: the Function of a line."""
        mapping_kind = _mapping_kind(mapping.filename if mapping is not None else "")
        line_frames = self._line_frames
        ids = []
        for line in location.lines:
            key = (line.function_id, line.line if self.lines else 0, mapping_kind)
            if key in line_frames:
                frame_id = line_frames[key]
            else:
                frame = _line_frame(function_of(line.function_id), line.line, mapping_kind, self.lines)
                frame_id = line_frames[key] = self.intern(frame) if frame is not None else None
            if frame_id is not None:
                ids.append(frame_id)
        if not ids:
            ids.append(self.intern(Frame("0x%x" % location.address, mapping_kind)))
        return tuple(reversed(ids))


def _line_frame(function: Optional[Function], line: int, mapping_kind: str, lines: bool) -> Optional[Frame]:
    """The frame of one pprof Line, or None when its function has no name."""
    if function is None:
        return None
    name = function.name or function.system_name
    if not name:
        return None
    name = display(name)
    filename = display(function.filename)
    if mapping_kind != KIND_KERNEL and _is_python(function):
        if lines:
            where = short_python_path(filename) + (":%d" % line if line > 0 else "")
            return Frame("%s (%s)" % (name, where), KIND_PYTHON, filename, line)
        # One frame per function; the first line is only shown on hover (SVG).
        return Frame(name, KIND_PYTHON, filename, max(function.start_line, 0))
    if lines and filename and line > 0:
        return Frame("%s (%s:%d)" % (name, filename, line), mapping_kind, filename, line)
    return Frame(name, mapping_kind)


def _is_python(function: Function) -> bool:
    """A Python function: its file is a .py file or a frozen module's
    (``<frozen importlib._bootstrap>``), or it is a CPython perf-map symbol
    (``py::qualname:file``)."""
    filename = function.filename
    return (filename.endswith(".py") or filename.startswith(_FROZEN_PREFIX)
            or function.system_name.startswith(PY_PERF_MAP_PREFIX))


def short_python_path(path: str) -> str:
    """A Python file as a module path where that is unambiguous, as py-spy shows it.

    ``.../site-packages/flask/app.py`` -> ``flask/app.py`` and
    ``/usr/lib/python3.11/json/encoder.py`` -> ``json/encoder.py``; any
    other path (the application's own files) as recorded.
    """
    for marker in _PACKAGE_DIRS:
        index = path.rfind(marker)
        if index >= 0 and index + len(marker) < len(path):
            return path[index + len(marker):]
    match = _STDLIB_DIR.search(path)
    if match is not None and match.end() < len(path):
        return path[match.end():]
    return path


def python_first(stacks: StackSet) -> StackSet:
    """The Python-first view (py-spy's): native time goes to the Python frame that caused it.

    In each stack that has Python frames: frames rootward of the outermost
    Python frame stay (``main``, ``Py_RunMain``); between the outermost and
    the innermost Python frame only Python frames stay (the interpreter's
    eval loop, vectorcall helpers and C code calling back into Python are
    the calling Python function's doing); everything leafward of the
    innermost Python frame (C code it called, the eval loop, the kernel) is
    cut, so its time becomes that Python function's self time. Stacks
    without a Python frame are unchanged, so a profile without Python frames
    reads the same in both views.
    """
    is_python = bytearray(len(stacks.frames))
    for frame_id, frame in enumerate(stacks.frames):
        if frame.kind == KIND_PYTHON:
            is_python[frame_id] = 1
    if not any(is_python):
        return stacks
    # Samples with one stack share one cut: equal stacks hash in C, which is
    # cheaper than the per-frame Python loop below.
    cut: Dict[Tuple[int, ...], Tuple[int, ...]] = {}
    samples: List[StackSample] = []
    has_python = False
    for stack, value, sample in stacks.samples:
        new = cut.get(stack)
        if new is None:
            positions = [index for index, frame_id in enumerate(stack) if is_python[frame_id]]
            if positions:
                new = stack[:positions[0]] + tuple([stack[index] for index in positions])
            else:
                new = stack
            cut[stack] = new
        if new is not stack:
            has_python = True
        samples.append(StackSample(new, value, sample))
    result = stacks.with_samples(samples)
    result.python_first = has_python
    return result


def _mapping_kind(filename: str) -> str:
    if filename in _KERNEL_MAPPINGS:
        return KIND_KERNEL
    if filename in _JIT_MAPPINGS:
        return KIND_JIT
    return KIND_NATIVE
