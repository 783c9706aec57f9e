"""Sample filters applied before any view: --focus, --ignore, --pid, --tag-filter.

Like pprof's, they select whole samples (a stack is kept or dropped, never
cut), so every view's total shrinks consistently. Regexes are matched once
per distinct frame, not once per frame of every sample.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from perfagent.errors import UsageError
from perfagent.pprof.profile import Sample
from perfagent.report.stacks import StackSample, StackSet


class SampleFilter:
    """The filter flags of one report, validated."""

    def __init__(
        self,
        focus: Optional[str] = None,
        ignore: Optional[str] = None,
        pid: Optional[int] = None,
        tags: Sequence[Tuple[str, str]] = (),
    ) -> None:
        self.focus = _compile("--focus", focus)
        self.ignore = _compile("--ignore", ignore)
        self.pid = pid
        self.tags: List[Tuple[str, str]] = list(tags)
        if pid is not None:
            self.tags.append(("pid", str(pid)))

    def apply(self, stacks: StackSet) -> StackSet:
        keeps = self._predicates(stacks)
        if not keeps:
            return stacks
        kept = [s for s in stacks.samples if all(keep(s) for keep in keeps)]
        return stacks.with_samples(kept)

    def _predicates(self, stacks: StackSet) -> List[Callable[[StackSample], bool]]:
        keeps: List[Callable[[StackSample], bool]] = []
        if self.tags:
            tags = self.tags
            keeps.append(lambda s: _labels_match(s.sample, tags))
        if self.focus is not None:
            focused = _matching_frames(stacks, self.focus)
            keeps.append(lambda s: not focused.isdisjoint(s.stack))
        if self.ignore is not None:
            ignored = _matching_frames(stacks, self.ignore)
            keeps.append(lambda s: ignored.isdisjoint(s.stack))
        return keeps


def parse_tag_filter(text: str) -> Tuple[str, str]:
    """``key=value`` from --tag-filter; UsageError naming the flag otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError("--tag-filter: expected key=value, got %r" % text)
    return key.strip(), value


def _compile(flag: str, pattern: Optional[str]) -> Optional["re.Pattern"]:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise UsageError("%s: bad regular expression %r: %s" % (flag, pattern, error))


def _matching_frames(stacks: StackSet, pattern: "re.Pattern") -> frozenset:
    """Ids of the frames whose function name the pattern finds (re.search, as pprof)."""
    return frozenset(i for i, frame in enumerate(stacks.frames) if pattern.search(frame.name))


def _labels_match(sample: Sample, tags: List[Tuple[str, str]]) -> bool:
    """True when every key=value is one of the sample's labels (string or number)."""
    values: Dict[str, List[str]] = {}
    for label in sample.labels:
        text = label.str if label.str or not (label.num or label.num_unit) else str(label.num)
        values.setdefault(label.key, []).append(text)
    return all(value in values.get(key, ()) for key, value in tags)
