"""The --tree view: the call tree indented, callers above their callees.

Each line is one call path (not one function, unlike the top table), so
the same function can appear under several callers. Paths below
``min_percent`` of the total are pruned, and a ``...`` line says how much
was left out under each node so the numbers still add up.
"""

from __future__ import annotations

from typing import List

from perfagent.report.calltree import CHILDREN, SELF, TOTAL, Node, build_call_tree, sorted_children
from perfagent.report.stacks import StackSet
from perfagent.report.units import ValueFormatter, format_percent

INDENT = "  "


def format_tree(stacks: StackSet, min_percent: float = 1.0) -> List[str]:
    """The tree's lines: a header, then one line per kept call path."""
    root = build_call_tree(stacks.merged_stacks())
    total = root[TOTAL]
    threshold = total * min_percent / 100.0
    formatter = ValueFormatter(stacks.unit, _kept_values(root, threshold))
    lines = [
        "Type: %s" % stacks.value_type,
        "Total: %s (paths below %g%% of the total pruned)" % (formatter.format(total), min_percent),
        "%10s %7s %10s %7s  %s" % ("cum", "cum%", "flat", "flat%", "call path"),
    ]
    _append_children(lines, stacks, root, 0, threshold, total, formatter)
    return lines


def _append_children(lines: List[str], stacks: StackSet, root: Node, depth: int,
                     threshold: float, total: int, formatter: ValueFormatter) -> None:
    """Depth-first, pre-order; iterative since stacks can outgrow the recursion limit.

    ``pending`` holds (frame id, node, depth) for call paths still to print,
    and (None, pruned value, depth) for the "..." line of a pruned remainder.
    """
    pending: List[tuple] = []
    _push_children(pending, stacks, root, depth, threshold)
    while pending:
        frame_id, item, level = pending.pop()
        if frame_id is None:
            lines.append("%10s %7s %10s %7s  %s..." % (
                formatter.format(item), format_percent(item, total), "", "", INDENT * level))
            continue
        lines.append("%10s %7s %10s %7s  %s%s" % (
            formatter.format(item[TOTAL]), format_percent(item[TOTAL], total),
            formatter.format(item[SELF]), format_percent(item[SELF], total),
            INDENT * level, stacks.frames[frame_id].name))
        _push_children(pending, stacks, item, level + 1, threshold)


def _push_children(pending: List[tuple], stacks: StackSet, node: Node, level: int, threshold: float) -> None:
    """Queue ``node``'s kept children (biggest first) and the pruned remainder."""
    frames = stacks.frames
    children = sorted_children(node, lambda fid, child: (-child[TOTAL], frames[fid].name))
    kept = [(fid, child, level) for fid, child in children if child[TOTAL] and child[TOTAL] >= threshold]
    pruned = sum(child[TOTAL] for _, child in children) - sum(child[TOTAL] for _, child, _ in kept)
    items = kept + ([(None, pruned, level)] if pruned else [])
    pending.extend(reversed(items))  # reversed: the stack pops them in order


def _kept_values(root: Node, threshold: float) -> List[int]:
    """Totals of the paths the tree will print: the formatter picks its unit from them."""
    values: List[int] = []
    pending = [root]
    while pending:
        node = pending.pop()
        for child in node[CHILDREN].values():
            if child[TOTAL] and child[TOTAL] >= threshold:
                values.append(child[TOTAL])
                pending.append(child)
    return values
