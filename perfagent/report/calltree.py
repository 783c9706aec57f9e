"""The call tree (a trie of stacks, root first) shared by --tree and --svg.

Stacks that share a prefix share its nodes, so the tree has at most one
node per frame of the distinct stacks: linear in the profile's size,
however deep the stacks are. Nodes are rows of parallel arrays rather than
objects: a 50,000-frame stack is 50,000 nodes, and a row costs a few
machine words where a list plus a children dict per node cost some 300
bytes. Children are kept as linked lists (first child, next sibling), and
the trie's edges live in one dict keyed by ``parent * stride + frame id``
(an int: smaller than a tuple key), used only while building.
"""

from __future__ import annotations

from array import array
from typing import Callable, Dict, List, Tuple

ROOT = 0
NO_NODE = -1


class CallTree:
    """Node ``n``: ``frame[n]`` (frame id; -1 for the root), ``total[n]`` and
    ``self_value[n]`` (sample values: Python ints, they may outgrow int64),
    children through ``first_child`` / ``next_sibling``."""

    __slots__ = ("frame", "total", "self_value", "first_child", "next_sibling")

    def __init__(self) -> None:
        self.frame = array("q", [NO_NODE])
        self.total: List[int] = [0]
        self.self_value: List[int] = [0]
        self.first_child = array("q", [NO_NODE])
        self.next_sibling = array("q", [NO_NODE])

    def __len__(self) -> int:
        return len(self.frame)

    def children(self, node: int) -> List[int]:
        """``node``'s children, in no particular order."""
        out = []
        child = self.first_child[node]
        next_sibling = self.next_sibling
        while child != NO_NODE:
            out.append(child)
            child = next_sibling[child]
        return out

    def sorted_children(self, node: int, key: Callable[[int], object]) -> List[int]:
        return sorted(self.children(node), key=key)


def build_call_tree(stack_totals: Dict[Tuple[int, ...], int], frame_count: int) -> CallTree:
    """The trie of ``stack_totals``' stacks (frame ids below ``frame_count``)."""
    tree = CallTree()
    frame, total, self_value = tree.frame, tree.total, tree.self_value
    first_child, next_sibling = tree.first_child, tree.next_sibling
    stride = frame_count + 1
    edges: Dict[int, int] = {}
    get = edges.get
    for stack, value in stack_totals.items():
        # Hot path: one multiply-add, one dict lookup and one addition per frame.
        node = ROOT
        total[ROOT] += value
        for frame_id in stack:
            key = node * stride + frame_id
            child = get(key)
            if child is None:
                child = edges[key] = len(total)
                frame.append(frame_id)
                total.append(0)
                self_value.append(0)
                first_child.append(NO_NODE)
                next_sibling.append(first_child[node])
                first_child[node] = child
            total[child] += value
            node = child
        self_value[node] += value
    return tree
