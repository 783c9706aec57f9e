"""The top table: flat and cumulative value per function, like ``pprof -top``."""

from __future__ import annotations

from typing import Dict, List

from perfagent.records import NamedTuple
from perfagent.report.stacks import PYTHON_FIRST_NOTE, StackSet
from perfagent.report.units import ValueFormatter, format_percent

# pprof's -nodefraction default: functions with cum at most 0.5% of the total are dropped.
DEFAULT_NODE_FRACTION = 0.005


class FunctionTotals(NamedTuple):
    name: str
    flat: int  # value of samples whose leaf frame is this function
    cum: int  # value of samples with this function anywhere in the stack


def function_totals(stacks: StackSet) -> List[FunctionTotals]:
    """Flat and cum per function name, in no particular order.

    A function counts once per sample towards cum even when it recurses, so
    cum never exceeds the total.
    """
    names = [frame.name for frame in stacks.frames]
    flat: Dict[str, int] = {}
    cum: Dict[str, int] = {}
    for stack, value in stacks.merged_stacks().items():
        if not stack:
            continue
        leaf = names[stack[-1]]
        flat[leaf] = flat.get(leaf, 0) + value
        # Per distinct stack: a set dedupes recursive frames in one C-level pass.
        for name in {names[frame_id] for frame_id in stack}:
            cum[name] = cum.get(name, 0) + value
    return [FunctionTotals(name, flat.get(name, 0), value) for name, value in cum.items()]


def sort_totals(totals: List[FunctionTotals], by_cum: bool) -> List[FunctionTotals]:
    """pprof's order: by flat (or cum) descending, the other one next, then name."""
    if by_cum:
        return sorted(totals, key=lambda t: (-t.cum, -t.flat, t.name))
    return sorted(totals, key=lambda t: (-t.flat, -t.cum, t.name))


def format_top(stacks: StackSet, limit: int, by_cum: bool = False,
               node_fraction: float = DEFAULT_NODE_FRACTION) -> List[str]:
    """The table's lines: a header like pprof's, then at most ``limit`` rows.

    As pprof does, functions whose cum is at most ``node_fraction`` of the
    total are dropped first (and counted in a "Dropped" line).
    """
    total = stacks.total()
    rows = sort_totals(function_totals(stacks), by_cum)
    cutoff = abs(total) * node_fraction
    kept = [r for r in rows if abs(r.cum) > cutoff] if node_fraction > 0 else rows
    shown = kept[:limit] if limit > 0 else kept
    formatter = ValueFormatter(stacks.unit, [r.flat for r in shown] or [r.cum for r in shown] or [total])
    shown_flat = sum(r.flat for r in shown)
    lines = ["Type: %s" % stacks.value_type]
    if stacks.python_first:
        lines.append(PYTHON_FIRST_NOTE)
    lines += [
        "Showing nodes accounting for %s, %s of %s total"
        % (formatter.format(shown_flat), format_percent(shown_flat, total), formatter.format(total)),
    ]
    if len(kept) < len(rows):
        lines.append("Dropped %d nodes (cum <= %s)" % (len(rows) - len(kept), formatter.format(int(cutoff))))
    if len(shown) < len(kept):
        lines.append("Showing top %d nodes out of %d" % (len(shown), len(kept)))
    lines.append("%10s %6s %6s %10s %6s" % ("flat", "flat%", "sum%", "cum", "cum%"))
    running = 0
    for row in shown:
        running += row.flat
        lines.append("%10s %6s %6s %10s %6s  %s" % (
            formatter.format(row.flat), format_percent(row.flat, total), format_percent(running, total),
            formatter.format(row.cum), format_percent(row.cum, total), row.name))
    return lines
