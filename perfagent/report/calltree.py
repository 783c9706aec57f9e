"""The call tree (a trie of stacks, root first) shared by --tree and --svg.

Nodes are plain lists rather than objects: building the tree touches one
node per frame of every distinct stack (millions of steps for 100k deep
stacks), and list indexing is the cheapest mutable record CPython has.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

# Node layout: [total value, self value, {frame id: child node}]
TOTAL = 0
SELF = 1
CHILDREN = 2

Node = list


def build_call_tree(stack_totals: Dict[Tuple[int, ...], int]) -> Node:
    """The root node (no frame) of the trie of ``stack_totals``' stacks."""
    root: Node = [0, 0, {}]
    for stack, value in stack_totals.items():
        # Hot path: one dict lookup and one addition per frame.
        node = root
        node[TOTAL] += value
        for frame_id in stack:
            children = node[CHILDREN]
            child = children.get(frame_id)
            if child is None:
                child = children[frame_id] = [0, 0, {}]
            child[TOTAL] += value
            node = child
        node[SELF] += value
    return root


def sorted_children(node: Node, key) -> List[Tuple[int, Node]]:
    """(frame id, child) pairs of ``node`` ordered by ``key(frame_id, child)``."""
    return sorted(node[CHILDREN].items(), key=lambda item: key(item[0], item[1]))
