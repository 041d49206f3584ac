"""A search tree built from sampled completions that share prefixes (a radix tree of token paths).

A rollout that forks complete samples (:class:`~tsd.rollouts.eptree.EPTreeRollout`: chains, then new
continuations from points inside them) produces *paths*, whole completions whose first tokens
another path already generated. :func:`tree_from_paths` turns them into the
:class:`~tsd.rollouts.tree.SearchTree` every tree emission reads
(:class:`~tsd.rollouts.tree_targets.TreePaths`, TreeRL's advantages): one node per maximal run of
tokens that the same set of paths shares, so a node ends exactly where two paths part (a *branch
point*), and each path ends in its own terminal node. Identical paths end in the same node (one
distinct answer, paid for twice). Pure logic, no model: ``tests/test_path_tree.py`` checks it by
hand.

Nodes here are token segments, not reasoning steps: a fork inside a step splits it. The tree's
values (``V(n)``: the mean reward of the graded terminals below ``n``) do not care.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tsd.rollouts.tree import Node, SearchTree

#: no depth limit: a segment tree's depth is the number of times its paths part, not a budget
UNBOUNDED_DEPTH = 1 << 30


def tree_from_paths(
    prompt_ids: Sequence[int], paths: Sequence[Any], max_tokens: int
) -> tuple[SearchTree, list[Node]]:
    """The radix tree of ``paths`` (objects with ``token_ids``, ``logprobs``, ``finish_reason``: whole
    completions of the prompt, each at most ``max_tokens`` long) and, for each path, the terminal
    node it ends in.

    Built top-down over the whole set, so node ids stay topological (a parent is created before its
    children, as :func:`~tsd.rollouts.tree_targets.subtree_values` needs), and children in the
    order their first path came. A shared segment keeps the log-probs of the first path through it
    (they are the same tokens sampled once from the same state). Internal segments get finish
    reason ``step`` (not terminal); each leaf the finish reason of its path. Priors are the share
    of the parent's distinct paths that go through the child. Raises if a path is empty, longer than
    ``max_tokens``, or a strict prefix of another (a complete sample cannot be: it ends with an
    answer, EOS or the token cap).
    """
    if not paths:
        raise ValueError("tree_from_paths: no paths")
    for k, p in enumerate(paths):
        if not p.token_ids or len(p.token_ids) > max_tokens:
            raise ValueError(f"tree_from_paths: path {k} has {len(p.token_ids)} tokens (1..{max_tokens})")
    tree = SearchTree(prompt_ids, max_depth=UNBOUNDED_DEPTH, max_tokens=max_tokens)
    ends: list[Node | None] = [None] * len(paths)
    # distinct paths (identical ones share their end), first-seen order
    first: dict[tuple[int, ...], int] = {}
    for k, p in enumerate(paths):
        first.setdefault(tuple(p.token_ids), k)
    distinct = list(first.values())
    # (parent node, the paths below it, tokens of those paths already in the tree)
    todo: list[tuple[Node, list[int], int]] = [(tree.root, distinct, 0)]
    while todo:
        parent, group, offset = todo.pop(0)  # breadth-first: ids are topological and deterministic
        for sub in _by_next_token(paths, group, offset):
            lead = paths[sub[0]]
            end = offset + _common_length(paths, sub, offset)
            ids, lps = list(lead.token_ids[offset:end]), list(lead.logprobs[offset:end])
            ending = [k for k in sub if len(paths[k].token_ids) == end]
            if ending and len(ending) < len(sub):
                raise ValueError(f"tree_from_paths: path {ending[0]} is a strict prefix of another path")
            prior = len(sub) / len(group)
            if ending:  # one distinct path ends here: its terminal
                node = tree.add_child(parent, ids, lps, str(paths[sub[0]].finish_reason), prior)
                if not node.terminal:  # a whole completion ends here whatever its finish reason says
                    node.terminal, node.terminal_reason = True, node.finish_reason
                ends[sub[0]] = node
            else:
                node = tree.add_child(parent, ids, lps, "step", prior)
                todo.append((node, sub, end))
            parent.samples += 1
    for k, p in enumerate(paths):  # identical paths: the end of their first copy
        ends[k] = ends[first[tuple(p.token_ids)]]
    assert all(e is not None for e in ends)
    return tree, [e for e in ends if e is not None]


def _by_next_token(paths: Sequence[Any], group: list[int], offset: int) -> list[list[int]]:
    """``group`` split by each path's token at ``offset``, in first-seen order."""
    subs: dict[int, list[int]] = {}
    for k in group:
        subs.setdefault(int(paths[k].token_ids[offset]), []).append(k)
    return list(subs.values())


def _common_length(paths: Sequence[Any], group: list[int], offset: int) -> int:
    """Tokens from ``offset`` on that every path of ``group`` shares (they share the first)."""
    seqs = [paths[k].token_ids for k in group]
    shortest = min(len(s) for s in seqs)
    n = 1
    while offset + n < shortest and all(s[offset + n] == seqs[0][offset + n] for s in seqs):
        n += 1
    return n


def branch_points(tree: SearchTree) -> list[Node]:
    """Nodes with two or more children: where paths part (the root included when it does)."""
    return [n for n in tree.nodes if len(n.children) >= 2]
