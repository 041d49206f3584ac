"""Shape statistics of search trees and of what a tree emission trains: where the trees branch,
how wide, how deep, and how many trained tokens carry a policy gradient at all.

    search/branch_points_per_tree   nodes with >= 2 children (the root included when it has several)
    search/branching_factor         children per branch point, mean over all trees' branch points
    search/branch_depth_tokens      completion tokens above a non-root branch point (how late paths part)
    search/leaves_per_1k_tokens     graded answers per 1,000 generated tokens
    rollout/nonzero_advantage_token_fraction   trained tokens whose advantage is not 0

A tree that is a group of chains has one branch point (the root) and branch depth 0; a token whose
advantage is 0 (a group whose rewards are all equal, a step whose value equals its parent's and the
root's) trains nothing but the KL term. Logged by the forking rollouts
(:class:`~tsd.rollouts.eptree.EPTreeRollout`, :class:`~tsd.rollouts.gumbel.GumbelMCTSRollout`) and
the group baseline, and read by the screening (``scripts/screen_branching.py``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from tsd.rl.trajectory import Trajectory
from tsd.rollouts.base import problem_means, problem_stats
from tsd.rollouts.tree import SearchTree
from tsd.rollouts.tree_targets import graded_terminals


def shape_stats(trees: Sequence[SearchTree]) -> dict[str, float]:
    """``search/*`` shape figures of ``trees`` (each with ``generated_tokens`` set)."""
    if not trees:
        return {}
    points = [n for t in trees for n in t.nodes if len(n.children) >= 2]
    inner = [n.num_tokens for n in points if n.parent is not None]
    leaves = sum(sum(1 for n in t.nodes if n.terminal and n.reward is not None) for t in trees)
    tokens = sum(t.generated_tokens for t in trees)
    return {
        "search/branch_points_per_tree": len(points) / len(trees),
        "search/branching_factor": statistics.fmean(len(n.children) for n in points) if points else 0.0,
        "search/branch_depth_tokens": statistics.fmean(inner) if inner else 0.0,
        "search/inner_branch_points_per_tree": len(inner) / len(trees),
        "search/leaves_per_1k_tokens": 1000.0 * leaves / max(1, tokens),
    }


def nonzero_advantage_fraction(trajectories: Sequence[Trajectory], eps: float = 1e-9) -> float:
    """Share of the trained completion tokens whose advantage is not 0 (per-token advantages where a
    trajectory has them, else its sequence advantage; a trajectory with neither is trained with the
    value baseline, whose advantage is not fixed here: counted as non-zero)."""
    total = nonzero = 0
    for t in trajectories:
        n = len(t.completion_ids)
        total += n
        if t.token_advantages is not None:
            nonzero += sum(abs(a) > eps for a in t.token_advantages)
        elif t.advantage is not None:
            nonzero += n if abs(t.advantage) > eps else 0
        else:
            nonzero += n
    return nonzero / total if total else 0.0


def whole_tree_stats(
    trees: Sequence[SearchTree], trajectories: Sequence[Trajectory], n: int
) -> dict[str, float]:
    """The ``rollout/*`` figures of a rollout that trains on whole trees (MCTS's tree emission,
    EPTree): per problem from the ``trees`` (each with ``generated_tokens`` set), per path from the
    emitted ``trajectories``, over ``n`` problems."""
    ends = [graded_terminals(t) for t in trees]
    advs = [a for t in trajectories for a in (t.token_advantages or [])]
    return {
        "rollout/reward_mean": statistics.fmean(t.reward for t in trajectories) if trajectories else 0.0,
        "rollout/correct_mean": statistics.fmean(float(t.correct) for t in trajectories)
        if trajectories
        else 0.0,
        **problem_means(
            [
                problem_stats(t.generated_tokens, any(x.correct for x in e), len(e))
                for t, e in zip(trees, ends)
            ]
        ),
        "rollout/paths_per_problem": len(trajectories) / n,
        # completion tokens the trainer will see (a shared step once per path through it)
        "rollout/path_tokens_per_problem": sum(t.num_tokens for t in trajectories) / n,
        "rollout/token_advantage_abs_mean": statistics.fmean(abs(a) for a in advs) if advs else 0.0,
    }
