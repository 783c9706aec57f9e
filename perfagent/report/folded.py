"""Brendan Gregg's folded stack format: ``root;caller;leaf count`` per line.

The format has no escaping, so a ";" inside a frame name (rare, but legal
in C++ operator names) is written as ":" and line breaks as spaces; names
may hold spaces, which is why readers split the count off the last space.
Kernel frames get the conventional ``_[k]`` suffix and JIT frames ``_[j]``.
Names arrive escaped (text.display: no control characters, no undecodable
bytes), so every line is valid UTF-8; with ``--lines`` they carry
``(file:line)``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

from perfagent.errors import ParseError
from perfagent.report.stacks import KIND_JIT, KIND_KERNEL, StackSet

_SUFFIX = {KIND_KERNEL: "_[k]", KIND_JIT: "_[j]"}
EMPTY_STACK_FRAME = "[unknown]"


def folded_frame_label(name: str, kind: str) -> str:
    label = name.replace(";", ":").replace("\n", " ").replace("\r", " ")
    return label + _SUFFIX.get(kind, "")


def folded_lines(stacks: StackSet) -> List[str]:
    """One line per distinct stack text, sorted, counts summed; zero counts dropped.

    Sorted so the output is deterministic and diffable between runs.
    """
    labels = [folded_frame_label(frame.name, frame.kind) for frame in stacks.frames]
    counts: Dict[str, int] = {}
    for stack, value in stacks.merged_stacks().items():
        text = ";".join([labels[frame_id] for frame_id in stack]) or EMPTY_STACK_FRAME
        counts[text] = counts.get(text, 0) + value
    return ["%s %d" % (text, value) for text, value in sorted(counts.items()) if value]


def read_folded(lines: Iterable[str]) -> Dict[Tuple[str, ...], int]:
    """Parse folded lines back to {stack root first: count}; blank lines skipped."""
    stacks: Dict[Tuple[str, ...], int] = {}
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        text, _, count = line.rpartition(" ")
        try:
            value = int(count)
        except ValueError:
            raise ParseError("folded line %d: no trailing count: %r" % (number, line[:80])) from None
        if not text:
            raise ParseError("folded line %d: no stack before the count" % number)
        stack = tuple(text.split(";"))
        stacks[stack] = stacks.get(stack, 0) + value
    return stacks
