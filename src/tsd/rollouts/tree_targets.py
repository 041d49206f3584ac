"""Training targets from a whole search tree: every graded answer's path, each step with an
advantage computed from the tree itself (DESIGN.md, "Distilling the tree").

    python train.py experiment=tree_countdown                       # rollout/emission=tree
    python train.py rollout/emission=tree rollout/advantage=q_diff  # another advantage rule

The article distils one path per search (:mod:`tsd.rollouts.selection`). The tree holds much more:
~30 graded answers per problem at the laptop default's budget, sharing their first steps, and for
every node how the answers below it scored. That is a Monte-Carlo process reward, and it costs
nothing extra. :class:`TreePaths` emits the path of every graded terminal (up to ``max_paths``)
as a trajectory whose tokens carry the advantage of the step they belong to.

Values (pure tree logic, no model; hand-computed tests in ``tests/test_tree_targets.py``):

- ``V(n)``: the mean dense reward of the distinct graded terminals in the subtree of ``n`` (a
  graded terminal: its own reward), and ``L(n)`` their number. Exact from the tree, no value head.
- ``Q(n)``: the search's own backed-up mean ``W(n) / N(n)`` (with rollout values: the mean reward of
  the simulations through ``n``, counting a terminal as often as simulations reached it); a graded
  terminal never visited (the article's search grades every terminal at the end) has its reward.

Advantage rules (a step's advantage applies to every token of the step):

- :class:`TreeRLAdvantage` (Hou et al. 2025, "TreeRL", ACL; THUDM/TreeRL): global
  ``V(n) - V(root)`` plus local ``V(n) - V(parent(n))``, optionally divided by ``sqrt(L(n))`` so
  that a prefix shared by many answers, which is trained once per answer, is not weighted by their
  number;
- :class:`QDifferenceAdvantage`: ``Q(n) - Q(parent(n))``;
- :class:`TreeGroupAdvantage`: the answer's reward normalised over the tree's graded terminals
  (GRPO with the tree as the group; TreeRPO, Tree-GRPO), the same for every token of the path.

Shared prefixes: by default (``shared_prefix="per_path"``) a step shared by k emitted paths is
trained k times, once per path, as TreeRL does. ``"once"`` divides the step's advantage by k, so
the policy-gradient weight of its tokens summed over the paths is that of one copy (the KL term
still sees every copy).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from tsd.config import check_bool, check_choice, check_int, check_number, require
from tsd.rollouts.tree import Node, SearchTree

SHARED_PREFIX = ("per_path", "once")


@dataclass(frozen=True)
class SubtreeValue:
    """``V(n)`` and ``L(n)``: the mean reward of the distinct graded terminals below ``n`` (itself
    included when it is one) and how many there are."""

    mean: float
    count: int


def subtree_values(tree: SearchTree) -> dict[int, SubtreeValue]:
    """:class:`SubtreeValue` of every node with at least one graded terminal below it, by node id.
    One pass from the leaves up (a node is created after its parent, so ids are topological)."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for node in reversed(tree.nodes):
        if node.terminal and node.reward is not None:
            sums[node.id] = sums.get(node.id, 0.0) + node.reward
            counts[node.id] = counts.get(node.id, 0) + 1
        if node.parent is not None and node.id in counts:
            pid = node.parent.id
            sums[pid] = sums.get(pid, 0.0) + sums[node.id]
            counts[pid] = counts.get(pid, 0) + counts[node.id]
    return {i: SubtreeValue(sums[i] / counts[i], counts[i]) for i in counts}


def graded_terminals(tree: SearchTree) -> list[Node]:
    """The tree's graded terminals in the order the search created them."""
    return [n for n in tree.nodes if n.terminal and n.reward is not None]


class AdvantageRule:
    """``rule(tree, path, values) -> one advantage per step of path[1:]`` (``path`` runs from the
    root to a graded terminal; ``values`` is :func:`subtree_values` of the tree)."""

    def __call__(
        self, tree: SearchTree, path: Sequence[Node], values: dict[int, SubtreeValue]
    ) -> list[float]:
        raise NotImplementedError


class TreeRLAdvantage(AdvantageRule):
    """TreeRL's step reward: ``(g * (V(n) - V(root)) + l * (V(n) - V(parent))) / sqrt(L(n))``."""

    def __init__(
        self, global_weight: float = 1.0, local_weight: float = 1.0, sqrt_scale: bool = True
    ) -> None:
        """
        Args:
            global_weight: weight of ``V(n) - V(root)`` (TreeRL: 1), ``>= 0``.
            local_weight: weight of ``V(n) - V(parent(n))`` (TreeRL: 1), ``>= 0``.
            sqrt_scale: divide by ``sqrt(L(n))``, the number of graded terminals below ``n``
                (TreeRL: yes), so that a prefix shared by many answers does not weigh as many.
        """
        o = "TreeRLAdvantage"
        self.global_weight = check_number(global_weight, f"{o}.global_weight", low=0)
        self.local_weight = check_number(local_weight, f"{o}.local_weight", low=0)
        self.sqrt_scale = check_bool(sqrt_scale, f"{o}.sqrt_scale")

    def __call__(
        self, tree: SearchTree, path: Sequence[Node], values: dict[int, SubtreeValue]
    ) -> list[float]:
        root = values[path[0].id].mean
        out = []
        for parent, node in zip(path, path[1:]):
            v = values[node.id]
            a = self.global_weight * (v.mean - root) + self.local_weight * (v.mean - values[parent.id].mean)
            out.append(a / math.sqrt(v.count) if self.sqrt_scale else a)
        return out


class QDifferenceAdvantage(AdvantageRule):
    """The search's own backed-up values: ``Q(n) - Q(parent(n))`` (a graded terminal that no
    simulation visited has its reward as Q)."""

    def __call__(
        self, tree: SearchTree, path: Sequence[Node], values: dict[int, SubtreeValue]
    ) -> list[float]:
        def q(n: Node) -> float:
            if n.visits > 0:
                return n.value_sum / n.visits
            if n.terminal and n.reward is not None:
                return n.reward
            return values[n.id].mean  # (not reached on a path that a simulation built)

        return [q(node) - q(parent) for parent, node in zip(path, path[1:])]


class TreeGroupAdvantage(AdvantageRule):
    """GRPO with the tree as the group: ``(r - mean) / (std + eps)`` over the rewards of the tree's
    graded terminals (``scale_by_std=False``: ``r - mean``, Dr. GRPO), the same on every step."""

    def __init__(self, scale_by_std: bool = True, eps: float = 1e-4) -> None:
        """
        Args:
            scale_by_std: divide by the rewards' standard deviation (GRPO; population std).
            eps: added to the standard deviation, ``> 0``.
        """
        self.scale_by_std = check_bool(scale_by_std, "TreeGroupAdvantage.scale_by_std")
        self.eps = check_number(eps, "TreeGroupAdvantage.eps", low=0, low_open=True)

    def __call__(
        self, tree: SearchTree, path: Sequence[Node], values: dict[int, SubtreeValue]
    ) -> list[float]:
        rewards = [float(n.reward) for n in graded_terminals(tree) if n.reward is not None]
        end = path[-1].reward
        assert end is not None  # a path ends at a graded terminal
        a = end - statistics.fmean(rewards)
        if self.scale_by_std:
            a /= statistics.pstdev(rewards) + self.eps
        return [a] * (len(path) - 1)


@dataclass
class PathTarget:
    """One emitted path: its nodes (root ... graded terminal) and one advantage per step."""

    path: list[Node]
    step_advantages: list[float]

    def token_advantages(self) -> list[float]:
        """Each step's advantage repeated over the step's tokens (completion order)."""
        return [a for node, a in zip(self.path[1:], self.step_advantages) for _ in node.token_ids]


class TreePaths:
    """The tree's emission: every graded terminal's path (the first ``max_paths`` the search
    found), each step with the advantage ``rule`` gives it."""

    def __init__(
        self, advantage: AdvantageRule, max_paths: int = 64, shared_prefix: str = "per_path"
    ) -> None:
        """
        Args:
            advantage: the step-advantage rule (:class:`TreeRLAdvantage`,
                :class:`QDifferenceAdvantage`, :class:`TreeGroupAdvantage`).
            max_paths: most paths emitted per tree, ``>= 1``: the first graded terminals in the
                order the search created them (not the best: that would bias the advantages).
            shared_prefix: ``"per_path"`` (a step shared by k emitted paths is trained k times,
                TreeRL's) or ``"once"`` (its advantage divided by k on each path).
        """
        require(callable(advantage), "TreePaths.advantage", "an advantage rule", type(advantage).__name__)
        self.advantage = advantage
        self.max_paths = check_int(max_paths, "TreePaths.max_paths", low=1)
        self.shared_prefix = str(check_choice(shared_prefix, "TreePaths.shared_prefix", SHARED_PREFIX))

    def __call__(self, tree: SearchTree) -> list[PathTarget]:
        ends = graded_terminals(tree)[: self.max_paths]
        if not ends:
            return []
        values = subtree_values(tree)
        targets = [PathTarget(end.path(), []) for end in ends]
        for t in targets:
            t.step_advantages = [float(a) for a in self.advantage(tree, t.path, values)]
        if self.shared_prefix == "once":
            through: dict[int, int] = {}  # node id -> emitted paths through it
            for t in targets:
                for node in t.path[1:]:
                    through[node.id] = through.get(node.id, 0) + 1
            for t in targets:
                t.step_advantages = [a / through[n.id] for n, a in zip(t.path[1:], t.step_advantages)]
        return targets
