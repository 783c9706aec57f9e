"""Python frames put where the interpreter runs them in the native stack.

CPython runs Python code in calls of ``_PyEval_EvalFrameDefault``; one such
C call runs a *run* of Python frames (innermost first):

* 3.8-3.10: exactly one Python frame per eval call.  The k-th eval-loop
  native frame from the inside runs the k-th Python frame (matched by the
  function's name, so it needs the interpreter's symbols; every CPython
  exports ``_PyEval_EvalFrameDefault``).
* 3.11+: Python-to-Python calls stay in one eval call; C code that calls
  back into Python starts another.  The reader marks the outermost frame of
  each run (``FRAME_ENTRY``) with ``link``, the address of a local of that
  eval call (3.11: its ``_PyCFrame``; 3.12+: its entry frame), which lies
  between that native frame's stack pointer and its CFA: the native frame
  holding it is the run's host (:meth:`NativeUnwinder.frame_of`), whatever
  the function is called, stripped binaries included.

The merged stack replaces each host frame by its run.  Hosts must go
outwards as the runs do; a run that cannot be placed (its marker is not in
the stack copy, the thread moved between two reads, a walk that stopped
early) goes just inside the next placed run, or after the last native
frame, so the Python frames always keep their own order.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

from perfagent.dump.model import Frame
from perfagent.python.reader import FRAME_ENTRY, RawFrame

EVAL_FUNCTION = "_PyEval_EvalFrameDefault"


def runs_of(raws: Sequence[RawFrame], frames: Sequence[Frame]) -> List[Tuple[int, List[Frame]]]:
    """Split a thread's Python frames into eval-call runs: [(link, frames innermost first)].

    A run ends at a FRAME_ENTRY frame; frames after the last one form a
    final run with link 0.
    """
    out: List[Tuple[int, List[Frame]]] = []
    current: List[Frame] = []
    for raw, frame in zip(raws, frames):
        current.append(frame)
        if raw.flags & FRAME_ENTRY:
            out.append((raw.link, current))
            current = []
    if current:
        out.append((0, current))
    return out


def place_runs(runs: Sequence[Tuple[int, List[Frame]]], native: Sequence[Frame],
               frame_of: Callable[[int], Optional[int]]) -> List[Optional[int]]:
    """The native frame index hosting each run (None: not placed).

    By link where the runs have links (3.11+), else by the order of the
    eval-loop frames; then only a strictly outward sequence is kept.
    """
    if any(link for link, _ in runs):
        hosts = [frame_of(link) if link else None for link, _ in runs]
    else:
        evals = [i for i, f in enumerate(native) if f.name == EVAL_FUNCTION]
        hosts = [evals[k] if k < len(evals) else None for k in range(len(runs))]
    last = -1
    for r, h in enumerate(hosts):
        if h is None:
            continue
        if h > last:
            last = h
        else:
            hosts[r] = None
    return hosts


def merge(native: Sequence[Frame], runs: Sequence[Tuple[int, List[Frame]]],
          hosts: Sequence[Optional[int]]) -> Tuple[List[Frame], int]:
    """(merged frames innermost first, number of Python frames not placed by their host)."""
    at = {h: r for r, h in enumerate(hosts) if h is not None}
    out: List[Frame] = []
    emitted = 0     # runs [0, emitted) are out
    unplaced = 0
    for i, frame in enumerate(native):
        r = at.get(i)
        if r is None:
            out.append(frame)
            continue
        while emitted < r:  # unplaced runs inside this one
            unplaced += len(runs[emitted][1])
            out.extend(runs[emitted][1])
            emitted += 1
        out.extend(runs[r][1])
        emitted = r + 1
    for r in range(emitted, len(runs)):
        unplaced += len(runs[r][1])
        out.extend(runs[r][1])
    return out, unplaced
