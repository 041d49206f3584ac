"""Training targets from a whole search tree: every graded answer's path, each step with an
advantage computed from the tree itself (DESIGN.md, "Distilling the tree").

    python train.py experiment=tree_countdown                       # rollout/emission=tree
    python train.py experiment=tree_countdown rollout/emission/advantage=q_diff  # another rule

The article distils one path per search (:mod:`tsd.rollouts.selection`). The tree holds much more:
~30 graded answers per problem at the laptop default's budget, sharing their first steps, and for
every node how the answers below it scored. That is a Monte-Carlo process reward, and it costs
nothing extra. :class:`TreePaths` emits the path of every graded terminal (up to ``max_paths``)
as a trajectory whose tokens carry the advantage of the step they belong to.

Values (pure tree logic, no model; hand-computed tests in ``tests/test_tree_targets.py``):

- ``V(n)``: the mean dense reward of the distinct graded terminals in the subtree of ``n`` (a
  graded terminal: its own reward), from every graded terminal of the tree. Exact from the tree, no
  value head.
- ``L(n)``: the number of *emitted* paths through ``n`` (the graded terminals below ``n`` that
  ``max_paths`` kept): how many copies of ``n``'s step the batch trains. With every terminal
  emitted (the default: ``max_paths`` 64, ~16 answers per tree) it is the number of graded
  terminals below ``n``, TreeRL's ``|L(n)|``; terminals that ``max_paths`` dropped are not trained
  and are not counted.
- ``Q(n)``: the search's own backed-up mean ``W(n) / N(n)`` (with rollout values: the mean reward of
  the simulations through ``n``, counting a terminal as often as simulations reached it); a graded
  terminal never visited (the article's search grades every terminal at the end) has its reward.

Advantage rules (a step's advantage applies to every token of the step):

- :class:`TreeRLAdvantage` (Hou et al. 2025, "TreeRL", ACL; THUDM/TreeRL): global
  ``V(n) - V(root)`` plus local ``V(n) - V(parent(n))``, divided by ``sqrt(L(n))`` (TreeRL's,
  ``sqrt_scale``): a prefix shared by ``L(n)`` trained paths then weighs ``sqrt(L(n))`` times its
  advantage in total rather than ``L(n)`` times (TreeRL's compromise: more than one copy, less
  than one per path);
- :class:`QDifferenceAdvantage`: ``Q(n) - Q(parent(n))``;
- :class:`TreeGroupAdvantage`: the answer's reward normalised over the tree's graded terminals
  (GRPO with the tree as the group; TreeRPO, Tree-GRPO), the same for every token of the path.

**What a shared prefix weighs** (``shared_prefix``). A step on ``k = L(n)`` emitted paths is in
``k`` trajectories, each copy with its own tokens in the batch. Write ``A`` for the rule's advantage
of the step and ``len_p`` for the completion tokens of path ``p``:

- ``"per_path"`` (default; TreeRL's): every copy carries the rule's advantage. The policy-gradient
  weight of one of the step's tokens, summed over its copies, is ``k * A / N`` under token
  normalisation (``N``: the batch's completion tokens, every copy counted) and
  ``A / S * sum_p 1 / len_p`` under sequence normalisation (``S`` sequences); with TreeRL's sqrt
  scale ``A`` already holds ``1 / sqrt(k)``, so the total is ``sqrt(k)`` copies' worth.
- ``"once"``: every copy carries ``A / k``: summed over its copies the step's policy-gradient
  weight is one copy's, ``A / N`` (token) or ``A / S * mean_p 1 / len_p`` (sequence: one copy whose
  length normalisation is the mean of its paths'). Only the policy-gradient numerator is
  de-duplicated: the token normaliser ``N`` and the KL term still count every copy (they are
  per-token means over the batch as it is), so under token normalisation the whole batch's step is
  smaller by ``N_distinct / N`` than a batch with the prefix once would give, and the KL weighs a
  shared step ``k`` times. ``"once"`` is a correction for the same multiplicity as TreeRL's sqrt
  scale, so the two are not combined: ``once`` with a rule that divides by ``sqrt(L(n))`` is
  refused (it would divide twice, by ``k`` and by ``sqrt(k)``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from tsd.config import check_bool, check_choice, check_int, check_number, require
from tsd.envs.base import Problem
from tsd.rl.trajectory import Trajectory
from tsd.rollouts.tree import Node, SearchTree

SHARED_PREFIX = ("per_path", "once")


@dataclass(frozen=True)
class SubtreeValue:
    """``V(n)``: the mean reward of the distinct graded terminals below ``n`` (itself included when
    it is one), ``count`` of them; and ``L(n)``: the emitted paths through ``n`` (``paths``)."""

    mean: float
    count: int
    #: emitted paths through the node: ``L(n)``, the copies of its step the batch trains
    paths: int


def subtree_values(tree: SearchTree, emitted: Sequence[Node] | None = None) -> dict[int, SubtreeValue]:
    """:class:`SubtreeValue` of every node with at least one graded terminal below it, by node id:
    ``mean`` and ``count`` from every graded terminal, ``paths`` from the graded terminals in
    ``emitted`` (``None``: all of them). One pass from the leaves up (a node is created after its
    parent, so ids are topological)."""
    kept = None if emitted is None else {n.id for n in emitted}
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    paths: dict[int, int] = {}
    for node in reversed(tree.nodes):
        if node.terminal and node.reward is not None:
            sums[node.id] = sums.get(node.id, 0.0) + node.reward
            counts[node.id] = counts.get(node.id, 0) + 1
            paths[node.id] = paths.get(node.id, 0) + (kept is None or node.id in kept)
        if node.parent is not None and node.id in counts:
            pid = node.parent.id
            sums[pid] = sums.get(pid, 0.0) + sums[node.id]
            counts[pid] = counts.get(pid, 0) + counts[node.id]
            paths[pid] = paths.get(pid, 0) + paths[node.id]
    return {i: SubtreeValue(sums[i] / counts[i], counts[i], paths[i]) for i in counts}


def graded_terminals(tree: SearchTree) -> list[Node]:
    """The tree's graded terminals in the order the search created them."""
    return [n for n in tree.nodes if n.terminal and n.reward is not None]


class AdvantageRule:
    """``rule(tree, path, values) -> one advantage per step of path[1:]`` (``path`` runs from the
    root to a graded terminal; ``values`` is :func:`subtree_values` of the tree and the emitted
    paths)."""

    #: whether the rule divides a step's advantage by ``sqrt(L(n))`` (then ``shared_prefix="once"``,
    #: a correction for the same multiplicity, is refused)
    scales_by_paths: bool = False

    def __call__(
        self, tree: SearchTree, path: Sequence[Node], values: dict[int, SubtreeValue]
    ) -> list[float]:
        raise NotImplementedError


class TreeRLAdvantage(AdvantageRule):
    """TreeRL's step reward: ``(g * (V(n) - V(root)) + l * (V(n) - V(parent))) / sqrt(L(n))``
    (``L(n)``: the emitted paths through ``n``)."""

    def __init__(
        self, global_weight: float = 1.0, local_weight: float = 1.0, sqrt_scale: bool = True
    ) -> None:
        """
        Args:
            global_weight: weight of ``V(n) - V(root)`` (TreeRL: 1), ``>= 0``.
            local_weight: weight of ``V(n) - V(parent(n))`` (TreeRL: 1), ``>= 0``.
            sqrt_scale: divide by ``sqrt(L(n))``, the number of emitted paths through ``n``
                (TreeRL: yes): trained once per path (``shared_prefix="per_path"``), a prefix
                shared by ``L(n)`` answers then weighs ``sqrt(L(n))`` copies, not ``L(n)``.
        """
        o = "TreeRLAdvantage"
        self.global_weight = check_number(global_weight, f"{o}.global_weight", low=0)
        self.local_weight = check_number(local_weight, f"{o}.local_weight", low=0)
        self.sqrt_scale = check_bool(sqrt_scale, f"{o}.sqrt_scale")
        self.scales_by_paths = self.sqrt_scale

    def __call__(
        self, tree: SearchTree, path: Sequence[Node], values: dict[int, SubtreeValue]
    ) -> list[float]:
        root = values[path[0].id].mean
        out = []
        for parent, node in zip(path, path[1:]):
            v = values[node.id]
            a = self.global_weight * (v.mean - root) + self.local_weight * (v.mean - values[parent.id].mean)
            out.append(a / math.sqrt(v.paths) if self.sqrt_scale else a)
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
            shared_prefix: ``"per_path"`` (a step on k emitted paths is trained k times, each copy
                with the rule's advantage: TreeRL's) or ``"once"`` (each copy with the advantage
                divided by k: one copy's policy-gradient weight in total; the token normaliser and
                the KL term still count every copy). Module docstring: what each weighs under
                token and sequence normalisation. ``"once"`` with a rule that divides by
                ``sqrt(L(n))`` is refused (it would divide twice).
        """
        require(callable(advantage), "TreePaths.advantage", "an advantage rule", type(advantage).__name__)
        self.advantage = advantage
        self.max_paths = check_int(max_paths, "TreePaths.max_paths", low=1)
        self.shared_prefix = str(check_choice(shared_prefix, "TreePaths.shared_prefix", SHARED_PREFIX))
        require(
            not (self.shared_prefix == "once" and getattr(advantage, "scales_by_paths", False)),
            "TreePaths.shared_prefix",
            "per_path with an advantage that divides by sqrt(L(n)) (TreeRL's sqrt_scale); 'once' divides by "
            "L(n) itself, so it needs rollout.emission.advantage.sqrt_scale=false",
            self.shared_prefix,
        )

    def __call__(self, tree: SearchTree) -> list[PathTarget]:
        ends = graded_terminals(tree)[: self.max_paths]
        if not ends:
            return []
        values = subtree_values(tree, ends)
        targets = [PathTarget(end.path(), []) for end in ends]
        for t in targets:
            t.step_advantages = [float(a) for a in self.advantage(tree, t.path, values)]
        if self.shared_prefix == "once":  # each of a step's L(n) copies carries 1 / L(n) of it
            for t in targets:
                t.step_advantages = [a / values[n.id].paths for n, a in zip(t.path[1:], t.step_advantages)]
        return targets


def tree_trajectories(
    problem: Problem, tree: SearchTree, emission: TreePaths, version: int, rollout: str, visits: bool = False
) -> list[Trajectory]:
    """A tree's graded answers as trajectories (``emission`` picks them and gives each token its
    advantage): each the path root ... terminal with the behaviour log-probs its nodes recorded.
    No completion is sampled: only graded terminals are emitted, and a tree without one emits
    nothing. ``visits``: also log the terminal's visit count (a search's; path trees have none)."""
    targets = emission(tree)
    tree.chosen = targets[0].path if targets else []
    out = []
    for target in targets:
        end = target.path[-1]
        assert end.reward is not None and end.correct is not None
        stats = {"search/path_depth": float(end.depth)}
        if visits:
            stats["search/path_visits"] = float(end.visits)
        out.append(
            Trajectory(
                problem_id=problem.id,
                prompt_ids=list(tree.prompt_ids),
                completion_ids=end.completion_ids(),
                behaviour_logprobs=[float(v) for v in end.completion_logprobs()],
                reward=float(end.reward),
                correct=bool(end.correct),
                policy_version=version,
                rollout=rollout,
                token_advantages=target.token_advantages(),
                finish_reason=str(end.terminal_reason),
                group_id=problem.id,
                stats=stats,
            )
        )
    return out
