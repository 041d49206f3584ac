"""The Gumbel root with Sequential Halving (tsd.rollouts.gumbel): the keys by hand and in law, the
root's draws without replacement and the halving's budget with the scripted policy of test_mcts.

    python -m pytest tests/test_gumbel.py -q
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
from test_mcts import PROBLEM, CountingEnv, ScriptedSampler

from tsd.rollouts.gumbel import GumbelMCTSRollout, sequential_keys
from tsd.rollouts.tree import SearchTree
from tsd.rollouts.tree_targets import TreePaths, TreeRLAdvantage

EULER = 0.5772156649


def test_sequential_keys_by_hand():
    # K1 = -log(-log 0.5) = 0.36651; mu2 = log(1 - 0.5); F(K1) = exp(-exp(-(K1 - mu2))) = 0.70711;
    # K2 = mu2 - log(-log(0.5 * 0.70711)) = -0.69315 - log(1.03972) = -0.73210
    k1, k2 = sequential_keys([0.5, 0.3], [0.5, 0.5])
    assert k1 == pytest.approx(-math.log(-math.log(0.5)))
    top = math.exp(-math.exp(-(k1 - math.log(0.5))))
    assert top == pytest.approx(math.sqrt(0.5), rel=1e-6)
    assert k2 == pytest.approx(math.log(0.5) - math.log(-math.log(0.5 * top)))
    assert k2 == pytest.approx(-0.73210, abs=1e-4)
    # a repeated draw (no mass left) cannot be ranked
    assert sequential_keys([1.0, 0.0], [0.5, 0.5])[1] == -math.inf


def test_keys_are_gumbel_top_k_in_law():
    """The first key is a standard Gumbel (mean Euler's constant); each next key is a Gumbel on the
    mass left, truncated below the one before: the keys decrease, and the second's mean matches
    direct Gumbel-top-2 of the same two-step distribution conditioned on the draw order."""
    rng = random.Random(0)
    p = [0.6, 0.4]
    ks = [sequential_keys(p, [rng.random(), rng.random()]) for _ in range(20000)]
    assert all(a > b for a, b in ks)
    assert statistics.fmean(a for a, _ in ks) == pytest.approx(EULER, abs=0.03)
    # direct: keys log p_i + G_i, keep the draws where step 0 comes first (the order we condition on)
    direct = []
    while len(direct) < 20000:
        g = [math.log(pi) - math.log(-math.log(rng.random())) for pi in p]
        if g[0] > g[1]:
            direct.append(g[1])
    ours = [b for a, b in ks]
    assert statistics.fmean(ours) == pytest.approx(statistics.fmean(direct), abs=0.04)


def test_select_leaf_from_a_root_child_only():
    t = SearchTree([1])
    a = t.add_child(t.root, [5], [-0.1], "step", 1.0)
    b = t.add_child(a, [6], [-0.1], "answer", 1.0)
    assert t.select_leaf(a)[:2] == [t.root, a]
    with pytest.raises(ValueError, match="not a child of the root"):
        t.select_leaf(b)


def test_gumbel_root_draws_distinct_steps_and_halving_spends_the_budget(char_tokenizer):
    sampler = ScriptedSampler(char_tokenizer, cycle=True)
    env = CountingEnv()
    rollout = GumbelMCTSRollout(
        root_actions=3, workers=2, iterations=4, completions_per_node=2, max_step_tokens=32,
        max_new_tokens=128, rollout_mix=1.0, record_trees=True,
        emission=TreePaths(TreeRLAdvantage()),
    )  # fmt: skip
    out = rollout.run([PROBLEM], sampler, env)
    (tree,) = rollout.trees
    # three draws at the root, one state each, each excluding the steps drawn before it
    assert sampler.sample_calls[:3] == [(1, 1, "step")] * 3
    assert sampler.exclude_calls[:3] == [[0], [1], [2]]
    kids = tree.root.children
    assert len(kids) == 3 and len({tuple(k.token_ids) for k in kids}) == 3
    # the budget: workers x iterations simulations, all below a root action
    assert tree.root.visits == 8
    # P = ceil(log2 3) = 2 phases; phase 1: 8 // (2 * 3) = 1 simulation each, then the better 2
    # survive and share the rest: the one halved away keeps its single visit
    visits = sorted(k.visits for k in kids)
    assert visits[0] == 1 and sum(visits) == 8 and visits[1] >= 3
    assert out.stats["search/halvings"] == 1 and out.stats["search/root_actions"] == 3
    assert out.trajectories and all(t.token_advantages is not None for t in out.trajectories)
    for key in ("search/branching_factor", "rollout/nonzero_advantage_token_fraction"):
        assert key in out.stats


def test_gumbel_bad_config_names_the_field():
    with pytest.raises(ValueError, match="GumbelMCTSRollout.root_actions"):
        GumbelMCTSRollout(root_actions=0)
    with pytest.raises(ValueError, match="GumbelMCTSRollout.c_scale"):
        GumbelMCTSRollout(c_scale=0.0)
