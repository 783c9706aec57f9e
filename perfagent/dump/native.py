"""Native frames of a dump: unwind the copied stacks, name the frames.

Runs after every thread is running again.  The copies are walked with the
capture's DWARF walker (``auto``: CFI, a checked frame-pointer step where a
binary has none, CPython's perf trampolines); the return addresses are
named like a profile's frames: ELF symbols of the mapped file (found as the
process sees it, debug files included), the vDSO from the agent's own
image, JIT code from the process's perf map.

:meth:`NativeUnwinder.frame_of` answers "which native frame holds this
stack address": the walker appends a caller only when its return-address
slot lies inside the copy, so walking a copy cut just above the address
yields exactly the frames whose slots are below it, and the last of them is
the frame whose locals hold the address.  That places a CPython eval call's
C-stack marker (see :mod:`perfagent.dump.merge`) without any per-version
knowledge of the interpreter's frame layout.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

from perfagent.capture import KIND_FILE, KIND_JIT, KIND_VDSO, mapped_file, mapping_kind
from perfagent.dump.model import KIND_NATIVE, Frame
from perfagent.symbolize.procmaps import AddressSpace, MapEntry
from perfagent.symbolize.symbolizer import Symbolizer
from perfagent.unwind.walker import OUTCOME_NAMES, OUTCOME_TRUNCATED, CFICache, Walker

#: Walker outcome index -> the note a thread gets when its walk ends that way.
_ENDINGS = {1: "native stack truncated by the %d-byte stack copy",
            2: "native unwinding stopped at code without call-frame information",
            3: "native unwinding stopped at an implausible frame"}
_COMPLETE = 0


class Unwound:
    """One thread's unwound native stack."""

    __slots__ = ("ips", "frames", "outcome", "ending", "regs", "stack")

    def __init__(self, ips: Tuple[int, ...], frames: List[Frame], outcome: int, ending: Optional[str],
                 regs: Tuple, stack: bytes) -> None:
        self.ips = ips            # walker output: pc, then return addresses
        self.frames = frames      # named, innermost first (one per ip)
        self.outcome = outcome    # the walker's OUTCOME_* for this walk
        self.ending = ending      # None when the walk reached the outermost frame, else why not
        self.regs = regs
        self.stack = stack


class NativeUnwinder:
    """Unwinds and names the native stacks of one process."""

    def __init__(self, pid: int, maps: Sequence[MapEntry], process_view=None,
                 symbolizer: Optional[Symbolizer] = None) -> None:
        self.pid = pid
        self.symbolizer = symbolizer or Symbolizer()
        cfi = CFICache(self.symbolizer.binaries)
        self.walker = Walker("auto", cfi)
        # A second walker for the placement walks, so their truncated
        # endings do not count in the first one's outcomes.
        self._placer = Walker("auto", cfi)
        # The walker checks return addresses against executable mappings only.
        self._proc = SimpleNamespace(pid=pid, space=AddressSpace(m for m in maps if m.is_exec),
                                     unwind_cache={})
        self._binary_cfi: Dict[tuple, object] = {}
        self._names: Dict[int, Frame] = {}
        self._view = process_view

    # ------------------------------------------------------------ walking

    def _binary_for(self, entry: MapEntry):
        key = (entry.dev_major, entry.dev_minor, entry.inode, entry.path, entry.start)
        if key not in self._binary_cfi:
            kind = mapping_kind(entry)
            binary = None
            if kind == KIND_FILE:
                binary = self.walker.cache.get(mapped_file(self.pid, entry))
            elif kind == KIND_VDSO:
                binary = self.walker.cache.get_vdso()
            self._binary_cfi[key] = binary
        return self._binary_cfi[key]

    def unwind(self, regs: Tuple, stack: bytes, stack_bytes: int) -> Unwound:
        before = list(self.walker.outcomes)
        ips = self.walker.walk(self._proc, self._binary_for, regs, stack)
        outcome = next((i for i, (a, b) in enumerate(zip(before, self.walker.outcomes)) if a != b), _COMPLETE)
        ending = None
        if outcome != _COMPLETE:
            ending = _ENDINGS.get(outcome, OUTCOME_NAMES[outcome])
            if "%d" in ending:
                ending = ending % stack_bytes
        frames = [self.name(ip if i == 0 else ip - 1) for i, ip in enumerate(ips)]
        return Unwound(ips, frames, outcome, ending, regs, stack)

    def frame_of(self, u: Unwound, addr: int) -> Optional[int]:
        """Index of the frame of ``u`` whose stack frame holds ``addr``; None if none does."""
        sp = u.regs[2]
        if not u.ips or not sp <= addr < sp + len(u.stack) - 8:
            return None
        cut = addr - sp + 8
        ips = self._placer.walk(self._proc, self._binary_for, u.regs, u.stack[:cut])
        index = len(ips) - 1
        if index < 0 or index >= len(u.ips) or ips != u.ips[:len(ips)]:
            return None
        if index == len(u.ips) - 1 and u.outcome != OUTCOME_TRUNCATED:
            # The outermost frame of a complete walk hosts nothing; the last
            # frame of a walk that failed has no known extent.  Only a walk
            # cut by the copy's end vouches for its last frame up to there.
            return None
        return index

    # ------------------------------------------------------------ naming

    def name(self, addr: int) -> Frame:
        """The native frame for ``addr`` (a pc, or a return address - 1)."""
        hit = self._names.get(addr)
        if hit is None:
            hit = self._names[addr] = self._name(addr)
        return hit

    def _name(self, addr: int) -> Frame:
        entry = self._proc.space.find(addr)
        if entry is None:
            return Frame(KIND_NATIVE, None, address=addr)
        kind = mapping_kind(entry)
        offset = addr - entry.start + entry.pgoff
        if kind == KIND_FILE:
            info = self.symbolizer.binary(mapped_file(self.pid, entry))
            return Frame(KIND_NATIVE, info.symbolize_offset(offset), module=entry.path, address=addr,
                         offset=offset)
        if kind == KIND_VDSO:
            return Frame(KIND_NATIVE, self.symbolizer.vdso_name(addr - entry.start), module="[vdso]",
                         address=addr, offset=addr - entry.start)
        if kind == KIND_JIT and self._view is not None:
            name = self.symbolizer.jit_name(self._view, addr)
            return Frame(KIND_NATIVE, name, module="[jit]", address=addr, offset=None)
        return Frame(KIND_NATIVE, None, module=entry.path or "[anon]", address=addr, offset=None)


def module_label(module: Optional[str]) -> str:
    """The short form of a frame's module for the text view."""
    if not module:
        return "?"
    return module if module.startswith("[") else os.path.basename(module)
