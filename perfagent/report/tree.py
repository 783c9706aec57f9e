"""The --tree view: the call tree indented, callers above their callees.

Each line is one call path (not one function, unlike the top table), so
the same function can appear under several callers. Paths below
``min_percent`` of the total are pruned, and a ``...`` line says how much
was left out under each node so the numbers still add up.

Indentation stops growing at MAX_INDENT_LEVELS; deeper lines carry their
depth as ``[N]`` instead, so every line has a bounded prefix and a
50,000-frame stack prints 50,000 short lines, not 2.5 billion spaces.
"""

from __future__ import annotations

from typing import Iterator, List

from perfagent.report.calltree import NO_NODE, ROOT, CallTree, build_call_tree
from perfagent.report.stacks import PYTHON_FIRST_NOTE, StackSet
from perfagent.report.units import ValueFormatter, format_percent

INDENT = "  "
MAX_INDENT_LEVELS = 64


def format_tree(stacks: StackSet, min_percent: float = 1.0) -> List[str]:
    """The tree's lines: a header, then one line per kept call path."""
    return list(iter_tree(stacks, min_percent))


def iter_tree(stacks: StackSet, min_percent: float = 1.0) -> Iterator[str]:
    """format_tree's lines one at a time (the tree of a deep profile is long)."""
    tree = build_call_tree(stacks.merged_stacks(), len(stacks.frames))
    total = tree.total[ROOT]
    threshold = total * min_percent / 100.0
    formatter = ValueFormatter(stacks.unit, _kept_values(tree, threshold))
    yield "Type: %s" % stacks.value_type
    if stacks.python_first:
        yield PYTHON_FIRST_NOTE
    yield "Total: %s (paths below %g%% of the total pruned)" % (formatter.format(total), min_percent)
    yield "%10s %7s %10s %7s  %s" % ("cum", "cum%", "flat", "flat%", "call path")
    for node, pruned, level in _walk(stacks, tree, threshold):
        indent = indentation(level)
        if node is None:
            yield "%10s %7s %10s %7s  %s..." % (formatter.format(pruned), format_percent(pruned, total), "", "",
                                                indent)
            continue
        value, own = tree.total[node], tree.self_value[node]
        yield "%10s %7s %10s %7s  %s%s" % (
            formatter.format(value), format_percent(value, total),
            formatter.format(own), format_percent(own, total),
            indent, stacks.frames[tree.frame[node]].name)


def indentation(level: int) -> str:
    """The call path column's prefix at ``level``: bounded however deep the tree."""
    if level <= MAX_INDENT_LEVELS:
        return INDENT * level
    return INDENT * MAX_INDENT_LEVELS + "[%d] " % level


def _walk(stacks: StackSet, tree: CallTree, threshold: float) -> Iterator[tuple]:
    """Depth-first, pre-order; iterative since stacks can outgrow the recursion limit.

    Yields (node, 0, level) for call paths to print and (None, pruned value,
    level) for the "..." line of a pruned remainder.
    """
    pending: List[tuple] = []
    _push_children(pending, stacks, tree, ROOT, 0, threshold)
    while pending:
        node, pruned, level = pending.pop()
        yield node, pruned, level
        if node is not None:
            _push_children(pending, stacks, tree, node, level + 1, threshold)


def _push_children(pending: List[tuple], stacks: StackSet, tree: CallTree, node: int, level: int,
                   threshold: float) -> None:
    """Queue ``node``'s kept children (biggest first) and the pruned remainder."""
    frames, frame, total = stacks.frames, tree.frame, tree.total
    children = tree.sorted_children(node, lambda child: (-total[child], frames[frame[child]].name))
    kept: List[tuple] = [(child, 0, level) for child in children if total[child] and total[child] >= threshold]
    pruned = sum(total[child] for child in children) - sum(total[child] for child, _, _ in kept)
    items: List[tuple] = kept + ([(None, pruned, level)] if pruned else [])
    pending.extend(reversed(items))  # reversed: the stack pops them in order


def _kept_values(tree: CallTree, threshold: float) -> List[int]:
    """Totals of the paths the tree will print: the formatter picks its unit from them."""
    total, first_child, next_sibling = tree.total, tree.first_child, tree.next_sibling
    values: List[int] = []
    pending = [ROOT]
    while pending:
        child = first_child[pending.pop()]
        while child != NO_NODE:
            value = total[child]
            if value and value >= threshold:
                values.append(value)
                pending.append(child)
            child = next_sibling[child]
    return values
