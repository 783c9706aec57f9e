"""Where a Python stack goes inside a native stack.

The interpreter runs Python frames in C-level calls of its eval loop,
``_PyEval_EvalFrameDefault``: each call runs a *run* of Python frames (one
frame in 3.8-3.10; in 3.11+ a Python-to-Python call does not recurse in C,
so one call runs every frame down to the next C boundary).  A merged stack
puts each run exactly where its eval call sits among the native frames.

Three ways to find that place:

* **By index (3.11+, walked in the kernel).**  The in-kernel user walk
  (perfagent.stackprog.kunwind) has already found the native frame holding
  each link, and replaced the link by that frame's index
  (PYFRAME_LINK_INDEX): the run goes there.  A link it left as an address
  lay below every frame, and its run goes at the root end, as below.
* **By link (3.11+, exact, no symbols needed).**  The in-kernel walk
  records, after each run, a link: the address of a local variable of that
  eval call's C frame (3.11 its ``_PyCFrame``, 3.12+ its entry frame).  A
  native frame owns the stack bytes [its sp, its CFA); the run goes at the
  native frame whose range holds the link.  Needs each native frame's sp,
  which the DWARF walker gives (``sps``).
* **By order (3.8-3.10, or without sps).**  The k-th run from the leaf goes
  at the k-th native frame inside the eval loop function (``is_eval``).

Runs that find no native frame (the native walk stopped early) go at the
root end, in order: they are the callers of everything that was found.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

from perfagent.stackprog.layout import PYFRAME_LINENO_MASK, PYFRAME_LINK, PYFRAME_LINK_INDEX

PyEntry = Tuple[int, int, int]            # (code or link address, instr, flags), leaf first
Run = Tuple[Tuple[int, int, int], ...]    # ((code, instr, co_firstlineno), ...) leaf first
#: A run, its link address (0: none) and its native frame's index (-1: not known).
LinkedRun = Tuple[Run, int, int]


def split_runs(entries: Sequence[PyEntry]) -> List[LinkedRun]:
    """The runs of a Python stack, leaf first, each with its link address
    (0: none) and, when the kernel placed it, its native frame's index
    (-1: not placed).

    In 3.8-3.10 (no links) every frame is its own run.  In 3.11+ the frames
    after the last link (a run whose link was not recorded: truncated) form
    a last run with link 0.
    """
    has_links = any(flags & PYFRAME_LINK for _, _, flags in entries)
    runs: List[LinkedRun] = []
    current: List[Tuple[int, int, int]] = []
    for code, instr, flags in entries:
        if flags & PYFRAME_LINK:
            if current:
                if flags & PYFRAME_LINK_INDEX:
                    runs.append((tuple(current), 0, code))
                else:
                    runs.append((tuple(current), code, -1))
                current = []
            continue
        current.append((code, instr, flags & PYFRAME_LINENO_MASK))
        if not has_links:
            runs.append((tuple(current), 0, -1))
            current = []
    if current:
        runs.append((tuple(current), 0, -1))
    return runs


Placement = Tuple[Tuple[int, Run], ...]   # ((native index to insert before, run), ...)


def place_runs(user_ips: Sequence[int], runs: List[LinkedRun],
               is_eval: Callable[[int], bool], sps: Optional[Sequence[int]] = None) -> Placement:
    """Where each run goes: before which native frame (an index into
    ``user_ips``, leaf first; ``len(user_ips)`` = after the root).

    ``is_eval(pc)`` tells a native frame of the eval loop (by address);
    ``sps[i]`` is native frame i's stack pointer (its CFA is ``sps[i+1]``).
    A run is placed *leafward* of its eval frame (the frames it runs are
    that C call's callees).  A stack walked in the kernel may mix placed
    runs and links (a walk left to the user-space walker part way: the
    frames placed so far are the same for both walkers).
    """
    out: List[Tuple[int, Run]] = []
    n = len(user_ips)
    pos = 0                      # native frames before pos are already passed
    use_links = sps is not None and len(sps) >= n and any(link for _, link, _ in runs)
    # A link the kernel left unplaced lay below every frame it walked.
    exact = use_links or any(index >= 0 for _, _, index in runs)
    for run, link, index in runs:
        found = -1
        if index >= 0:
            if pos <= index < n:
                found = index
        elif use_links and link:
            for i in range(pos, n):
                hi = sps[i + 1] if i + 1 < len(sps) else None
                if sps[i] <= link and (hi is None or link < hi):
                    found = i
                    break
        elif not (exact and link):
            for i in range(pos, n):
                # callers are return addresses: the call is at ip - 1
                if is_eval(user_ips[i] - 1 if i else user_ips[i]):
                    found = i
                    break
        if found < 0:
            out.append((n, run))
            pos = n
            continue
        out.append((found, run))
        pos = found + 1
    return tuple(out)
