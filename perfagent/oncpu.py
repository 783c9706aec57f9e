"""Turning a capture's counted stacks into an on-CPU pprof profile.

One pprof Mapping per mapped file segment (plus ``[kernel]`` and ``[jit]``),
one Location per (mapping, address), one Function per distinct name.  The
Location address is the address that was looked up: the exact pc for the
leaf frame and ``return address - 1`` for callers, so it always lies inside
its mapping's [memory_start, memory_limit).
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

from perfagent.capture import (
    KERNEL_MAPPING, KIND_FILE, KIND_JIT, KIND_KERNEL, KIND_VDSO, PYTHON_FRAME, CaptureState,
    MappingRecord, sample_label_tuples,
)
from perfagent import budget
from perfagent.pprof.builder import ProfileBuilder
from perfagent.symbolize.symbolizer import Symbolizer

ON_CPU_SAMPLE_TYPES = (("samples", "count"), ("cpu", "nanoseconds"))

# Frame classes for hiding the interpreter's plumbing between Python frames.
FRAME_OTHER = 0
FRAME_PYTHON = 1       # a Python frame read from the interpreter's memory (the in-kernel walk)
FRAME_INTERPRETER = 2  # native code of the interpreter itself (libpython or a static python)
FRAME_TRAMPOLINE = 3   # a CPython perf-trampoline frame named py::qualname:file.py (--inject-python)

PY_PERF_MAP_PREFIX = "py::"
# A binary holding this symbol is a CPython interpreter (shared or static).
INTERPRETER_MARKER = "_PyEval_EvalFrameDefault"


def split_python_symbol(symbol: str) -> Tuple[str, str]:
    """(qualname, file) of a CPython perf-map symbol ``py::qualname:/path/file.py``."""
    rest = symbol[len(PY_PERF_MAP_PREFIX):]
    qualname, sep, filename = rest.partition(":")
    return (qualname, filename) if sep else (rest, "")


def hide_interpreter_frames(frames: Sequence, classes: Sequence[int]) -> list:
    """Drop interpreter frames lying between two Python frames (leaf-first lists).

    Frames rootward of the outermost Python frame (Py_RunMain, main) and
    leafward of the innermost one (the C code Python called: time_sleep,
    hashlib, a C extension, and the eval loop that called it) stay, as do
    native frames of other binaries between Python frames (a C extension
    calling back into Python).
    """
    py = [i for i, c in enumerate(classes) if c == FRAME_PYTHON]
    if len(py) < 2:
        return list(frames)
    lo, hi = py[0], py[-1]
    return [f for i, f in enumerate(frames)
            if not (lo < i < hi and classes[i] == FRAME_INTERPRETER)]


class LocationTable:
    """Symbolizes each distinct (mapping, address) once and hands out pprof ids."""

    def __init__(self, builder: ProfileBuilder, state: CaptureState, symbolizer: Symbolizer) -> None:
        self.builder = builder
        self.state = state
        self.symbolizer = symbolizer
        self._mapping_ids: Dict[int, int] = {}
        self._locations: Dict[Tuple[int, int], int] = {}
        self._classes: Dict[Tuple[int, int], int] = {}
        self._interpreter_mappings: Dict[int, bool] = {}
        self._binaries: Dict[int, object] = {}  # mapping index -> BinaryInfo
        self.unsymbolized = 0

    def stack(self, frames: Sequence[tuple], keep_native_frames: bool = False) -> List[int]:
        """The location ids of one captured stack (leaf first), as the
        profile records it: every frame named (once per distinct frame),
        perf-trampoline frames dropped where the in-kernel walk named the
        Python frames, the interpreter's frames between Python frames hidden
        unless ``keep_native_frames``."""
        location_ids: List[int] = [self.location(f) for f in frames]
        classes = [self.frame_class(f) for f in frames]
        if FRAME_PYTHON in classes:
            # The walk named this stack: perf-trampoline frames (from
            # --inject-python) would only repeat its frames without lines.
            if FRAME_TRAMPOLINE in classes:
                keep = [i for i, c in enumerate(classes) if c != FRAME_TRAMPOLINE]
                location_ids = [location_ids[i] for i in keep]
                classes = [classes[i] for i in keep]
        elif FRAME_TRAMPOLINE in classes:
            classes = [FRAME_PYTHON if c == FRAME_TRAMPOLINE else c for c in classes]
        if not keep_native_frames and FRAME_PYTHON in classes:
            location_ids = hide_interpreter_frames(location_ids, classes)
        return location_ids

    def frame_class(self, frame: Tuple[int, int]) -> int:
        """FRAME_PYTHON / FRAME_INTERPRETER / FRAME_OTHER (after location() named it)."""
        return self._classes.get(frame, FRAME_OTHER)

    def location(self, frame: Tuple[int, int]) -> int:
        # Keyed by the whole frame: a JIT address reused by another function
        # is another location (the pprof location id differs, the address not).
        lid = self._locations.get(frame)
        if lid is None:
            lid = self._locations[frame] = self._new_location(frame)
        return lid

    def _new_location(self, frame: tuple) -> int:
        index, addr = frame[0], frame[1]
        if index == PYTHON_FRAME:
            # A frame the in-kernel walk read from the interpreter: a Function
            # per (qualname, file, first line), shared by every process; a
            # Location per sampled line (no address: it is not native code).
            _, qualname, filename, line, firstlineno = frame
            self._classes[frame] = FRAME_PYTHON
            fid = self.builder.function_id(qualname, qualname, filename, firstlineno)
            return self.builder.location_id(0, 0, ((fid, line),))
        if index < 0:
            self.unsymbolized += 1
            return self.builder.location_id(0, addr)
        rec = self.state.mappings[index]
        if len(frame) == 3:  # a JIT frame named during the capture
            name, filename = frame[2], "[jit]"
        else:
            name, filename = self._name(rec, addr)
        mapping_id = self._mapping_id(rec)
        if name is None:
            self.unsymbolized += 1
            return self.builder.location_id(mapping_id, addr)
        if rec.kind == KIND_JIT and name.startswith(PY_PERF_MAP_PREFIX):
            qualname, pyfile = split_python_symbol(name)
            self._classes[frame] = FRAME_TRAMPOLINE
            fid = self.builder.function_id(qualname, name, pyfile)
        else:
            if rec.kind == KIND_FILE and self._is_interpreter(rec):
                self._classes[frame] = FRAME_INTERPRETER
            fid = self.builder.function_id(name, name, filename)
        return self.builder.location_id(mapping_id, addr, ((fid, 0),), by_lines=len(frame) == 3)

    def prepare(self, frames) -> None:
        """Parse each binary that ``frames`` (the distinct frame tuples of the
        profile's stacks) name, before they are named, with a symbol table
        of just the addresses named in it
        (BinaryCache.load_mapped's ``offsets``), once per file however many
        processes map it: a profile names a few hundred addresses of a
        binary, and the whole table's alias ranking and flattening was most
        of a profile's build (libc with its debug symbols: 20 ms whole, 9 ms
        for the profile's addresses).  A binary whose table is already
        whole keeps it; a mapping left out here is parsed whole when named."""
        if budget.cancelled():
            return
        mappings = self.state.mappings
        by_index: Dict[int, set] = {}
        for frame in frames:
            index = frame[0]
            if index > KERNEL_MAPPING and len(frame) == 2:
                addrs = by_index.get(index)
                if addrs is None:
                    addrs = by_index[index] = set()
                addrs.add(frame[1])
        groups: Dict[tuple, Tuple[List[MappingRecord], set]] = {}
        for index, addrs in by_index.items():
            rec = mappings[index]
            if rec.kind != KIND_FILE or index in self._binaries:
                continue
            key = (rec.dev_major, rec.dev_minor, rec.inode) if rec.inode else (-1, index, 0)
            group = groups.get(key)
            if group is None:
                group = groups[key] = ([], set())
            group[0].append(rec)
            group[1].update(a - rec.start + rec.pgoff for a in addrs)
        for recs, offsets in groups.values():
            info = self.symbolizer.binary(recs[0], offsets, (INTERPRETER_MARKER,))
            if info.error and not len(info.symbols) and len(recs) > 1:
                continue    # (through another process's view, each on its own)
            for rec in recs:
                self._binaries[rec.index] = info.at_path(rec.path)

    def _binary(self, rec: MappingRecord):
        """The mapping's parsed file, looked up once per mapping (the path
        checks behind it stat files: not something to repeat per location)."""
        info = self._binaries.get(rec.index)
        if info is None:
            info = self._binaries[rec.index] = self.symbolizer.binary(rec)
        return info

    def _is_interpreter(self, rec: MappingRecord) -> bool:
        known = self._interpreter_mappings.get(rec.index)
        if known is None:
            info = self._binary(rec)
            known = self._interpreter_mappings[rec.index] = (
                info.symbols is not None and info.symbols.contains_name(INTERPRETER_MARKER))
        return known

    def _name(self, rec: MappingRecord, addr: int) -> Tuple[Optional[str], str]:
        if budget.cancelled():
            return None, rec.path  # stopped by a signal: addresses from here on
        sym = self.symbolizer
        if rec.kind == KIND_KERNEL:
            return sym.kernel_name(addr)
        if rec.kind == KIND_FILE:
            info = self._binary(rec)
            return info.symbolize_offset(addr - rec.start + rec.pgoff), rec.path
        if rec.kind == KIND_JIT:
            proc = self.state.process_info(rec.pid)
            if proc is None:
                return None, "[jit]"
            return sym.jit_name(proc, addr), "[jit]"
        if rec.kind == KIND_VDSO:
            return sym.vdso_name(addr - rec.start), "[vdso]"
        return None, rec.path

    def _mapping_id(self, rec: MappingRecord) -> int:
        mid = self._mapping_ids.get(rec.index)
        if mid is None:
            build_id = ""
            filename = rec.path
            if rec.kind == KIND_FILE:
                info = self._binary(rec)
                build_id = info.build_id or ""
            elif rec.kind == KIND_JIT:
                filename = "[jit]"
            mid = self._mapping_ids[rec.index] = self.builder.add_mapping(
                rec.start, rec.end, rec.pgoff, filename, build_id, has_functions=True)
        return mid


def sample_labels(state: CaptureState, pid: int, tid: int) -> Tuple[tuple, tuple]:
    """The (string, numeric) labels of a thread's samples.

    Numbers are numeric labels, as pprof's own producers write them, so
    ``go tool pprof -tagfocus=pid=1234`` selects exactly that process:
    ``pid``, ``tid``, and ``ns_pid`` (the pid inside its own pid namespace)
    when it differs from the host's.  Strings: ``comm`` (the thread's name)
    and ``process`` always; for a process in a container ``container_id``
    (from its cgroup: docker, containerd, cri-o, podman layouts) and
    ``pod_uid`` when the cgroup names a Kubernetes pod.
    """
    process = state.process_comm(pid)
    thread = state.thread_comm.get(tid, "") or process
    proc = state.process_info(pid)
    if proc is None:
        return sample_label_tuples(pid, tid, thread, process, pid, "", "")
    return sample_label_tuples(pid, tid, thread, process, proc.ns_pid, proc.container_id, proc.pod_uid)


def distinct_frames(stacks) -> set:
    """The distinct frame tuples of ``stacks`` (gathered in C), for the
    passes that prepare naming: each frame once, however many stacks."""
    return set(itertools.chain.from_iterable(stacks))


def kernel_addresses(frames) -> set:
    """Every kernel address among ``frames`` (frame tuples), to name at once."""
    return {f[1] for f in frames if f[0] == KERNEL_MAPPING}


OFF_CPU_SAMPLE_TYPES = (("blocks", "count"), ("offcpu", "nanoseconds"))


def build_profile(state: CaptureState, symbolizer: Symbolizer, sample_rate: int,
                  time_nanos: int, duration_nanos: int, comments: Sequence[str] = (),
                  keep_native_frames: bool = False, offcpu: bool = False
                  ) -> Tuple[ProfileBuilder, LocationTable]:
    """The on-CPU profile (samples/count, cpu/nanoseconds) of a capture, or
    with ``offcpu`` its off-CPU profile (blocks/count, offcpu/nanoseconds)."""
    builder = ProfileBuilder(
        sample_types=OFF_CPU_SAMPLE_TYPES if offcpu else ON_CPU_SAMPLE_TYPES,
        period_type=("offcpu", "nanoseconds") if offcpu else ("cpu", "nanoseconds"),
        period=1 if offcpu else 1_000_000_000 // sample_rate,
        time_nanos=time_nanos,
        duration_nanos=duration_nanos,
        comments=comments,
    )
    table = LocationTable(builder, state, symbolizer)
    labels_cache: Dict[Tuple[int, int], tuple] = {}
    stacks = state.offcpu_stacks if offcpu else state.stacks
    # Released processes' counts first (packed, see CaptureState.released_counts),
    # then the live ones: the same samples as before they were packed.
    released = list(state.released_counts(offcpu))
    frames = distinct_frames([r[1] for r in released] + [key[2] for key in stacks])
    symbolizer.prefetch_kernel(kernel_addresses(frames))
    table.prepare(frames)
    for labels, frames, count, period in released:
        builder.add_sample(table.stack(frames, keep_native_frames), (count, period), labels[0], labels[1])
    for (pid, tid, frames), (count, period) in stacks.items():
        labels = labels_cache.get((pid, tid))
        if labels is None:
            labels = labels_cache[(pid, tid)] = sample_labels(state, pid, tid)
        builder.add_sample(table.stack(frames, keep_native_frames), (count, period), labels[0], labels[1])
    return builder, table
