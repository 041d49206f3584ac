"""Distilling the whole tree (tsd.rollouts.tree_targets): every path's per-token advantage under
each rule, on small trees written out by hand; the emission through MCTSRollout; the record that
carries the advantages (validated, through the collate and the loss as given)."""

from __future__ import annotations

import math

import pytest
import torch
from test_mcts import PROBLEM, CountingEnv, ScriptedSampler, _small

from tsd.data.collate import collate_trajectories
from tsd.rl.trajectory import Trajectory, TrajectoryError
from tsd.rollouts.tree import SearchTree
from tsd.rollouts.tree_targets import (
    QDifferenceAdvantage,
    TreeGroupAdvantage,
    TreePaths,
    TreeRLAdvantage,
    subtree_values,
)


def _node(tree, parent, n_tokens, *, terminal_reward=None, visits=0.0, value_sum=0.0):
    tokens = list(range(10, 10 + n_tokens))
    node = tree.add_child(
        parent, tokens, [-0.25] * n_tokens, "answer" if terminal_reward is not None else "step", 0.5
    )
    if terminal_reward is not None:
        node.reward, node.correct = terminal_reward, terminal_reward == 1.0
    node.visits, node.value_sum = visits, value_sum
    return node


def tree_one() -> tuple[SearchTree, dict]:
    """root -> A (3 tokens) -> {A1: r = 1 (2 tokens), A2: r = -1 (1 token)}; root -> B: r = 0.5 (4 tokens).
    Created in the order A, B, A1, A2. Visits / values: root 4 / 1.5, A 3 / 1, A1 2 / 2, A2 1 / -1, B 1 / 0.5."""
    t = SearchTree([1, 2, 3])
    t.root.visits, t.root.value_sum = 4.0, 1.5
    a = _node(t, t.root, 3, visits=3.0, value_sum=1.0)
    b = _node(t, t.root, 4, terminal_reward=0.5, visits=1.0, value_sum=0.5)
    a1 = _node(t, a, 2, terminal_reward=1.0, visits=2.0, value_sum=2.0)
    a2 = _node(t, a, 1, terminal_reward=-1.0, visits=1.0, value_sum=-1.0)
    return t, {"A": a, "B": b, "A1": a1, "A2": a2}


def tree_two() -> tuple[SearchTree, dict]:
    """root -> A -> {A1: a step with nothing graded below, A2: r = 1, graded but never visited (the
    article's search grades every terminal at the end)}; root -> B: r = -1.
    Visits / values: root 2 / -0.8, A 1 / 0.2 (a value-head leaf), B 1 / -1."""
    t = SearchTree([1, 2])
    t.root.visits, t.root.value_sum = 2.0, -0.8
    a = _node(t, t.root, 2, visits=1.0, value_sum=0.2)
    b = _node(t, t.root, 1, terminal_reward=-1.0, visits=1.0, value_sum=-1.0)
    a1 = _node(t, a, 2)
    a2 = _node(t, a, 3, terminal_reward=1.0)
    return t, {"A": a, "B": b, "A1": a1, "A2": a2}


def steps(targets):
    """{terminal id: step advantages} of emitted targets."""
    return {t.path[-1].id: t.step_advantages for t in targets}


# ---------------------------------------------------------------------------- values
def test_subtree_values_hand_computed():
    t, n = tree_one()
    v = subtree_values(t)
    assert (v[0].mean, v[0].count) == (pytest.approx(1 / 6), 3)  # (1 - 1 + 0.5) / 3
    assert (v[n["A"].id].mean, v[n["A"].id].count) == (0.0, 2)
    assert (v[n["B"].id].mean, v[n["A1"].id].mean, v[n["A2"].id].mean) == (0.5, 1.0, -1.0)
    t2, m = tree_two()
    v2 = subtree_values(t2)
    assert m["A1"].id not in v2  # nothing graded below it
    assert (v2[m["A"].id].mean, v2[m["A"].id].count, v2[0].mean) == (1.0, 1, 0.0)


# ---------------------------------------------------------------------------- the three rules, tree one
def test_treerl_advantages_tree_one():
    t, n = tree_one()
    got = steps(TreePaths(TreeRLAdvantage())(t))
    s2 = math.sqrt(2)
    # A: (V(A) - V(root)) + (V(A) - V(root)) = 2 * (0 - 1/6), over sqrt(2 answers below)
    a = 2 * (0 - 1 / 6) / s2
    assert got[n["A1"].id] == pytest.approx([a, (1 - 1 / 6) + (1 - 0)])
    assert got[n["A2"].id] == pytest.approx([a, (-1 - 1 / 6) + (-1 - 0)])
    assert got[n["B"].id] == pytest.approx([2 * (0.5 - 1 / 6)])
    # without the sqrt scale, global only, local only
    assert steps(TreePaths(TreeRLAdvantage(sqrt_scale=False))(t))[n["A1"].id][0] == pytest.approx(-1 / 3)
    g = steps(TreePaths(TreeRLAdvantage(local_weight=0.0, sqrt_scale=False))(t))
    assert g[n["A1"].id] == pytest.approx([-1 / 6, 5 / 6])
    loc = steps(TreePaths(TreeRLAdvantage(global_weight=0.0, sqrt_scale=False))(t))
    assert loc[n["A1"].id] == pytest.approx([-1 / 6, 1.0])


def test_q_difference_advantages_tree_one():
    t, n = tree_one()
    got = steps(TreePaths(QDifferenceAdvantage())(t))
    q_root, q_a = 1.5 / 4, 1 / 3
    assert got[n["A1"].id] == pytest.approx([q_a - q_root, 1.0 - q_a])
    assert got[n["A2"].id] == pytest.approx([q_a - q_root, -1.0 - q_a])
    assert got[n["B"].id] == pytest.approx([0.5 - q_root])


def test_tree_group_advantages_tree_one():
    t, n = tree_one()
    got = steps(TreePaths(TreeGroupAdvantage())(t))
    mean, std = 1 / 6, math.sqrt(((5 / 6) ** 2 + (7 / 6) ** 2 + (1 / 3) ** 2) / 3)
    assert got[n["A1"].id] == pytest.approx([(1 - mean) / (std + 1e-4)] * 2)  # the same on every step
    assert got[n["A2"].id] == pytest.approx([(-1 - mean) / (std + 1e-4)] * 2)
    assert got[n["B"].id] == pytest.approx([(0.5 - mean) / (std + 1e-4)])
    plain = steps(TreePaths(TreeGroupAdvantage(scale_by_std=False))(t))
    assert plain[n["B"].id] == pytest.approx([0.5 - mean])


# ---------------------------------------------------------------------------- tree two: holes
def test_the_rules_on_tree_two():
    t, n = tree_two()
    # only graded answers are emitted, in the order they were created: B, then A2
    targets = TreePaths(TreeRLAdvantage())(t)
    assert [x.path[-1].id for x in targets] == [n["B"].id, n["A2"].id]
    got = steps(targets)
    assert got[n["A2"].id] == pytest.approx([(1 - 0) + (1 - 0), (1 - 0) + (1 - 1)])  # L(A) = 1: no scale
    assert got[n["B"].id] == pytest.approx([-2.0])
    q = steps(TreePaths(QDifferenceAdvantage())(t))
    # A2 was never visited: its Q is its reward
    assert q[n["A2"].id] == pytest.approx([0.2 - (-0.4), 1.0 - 0.2])
    assert q[n["B"].id] == pytest.approx([-1.0 - (-0.4)])
    grp = steps(TreePaths(TreeGroupAdvantage())(t))
    assert grp[n["A2"].id] == pytest.approx([1 / 1.0001] * 2) and grp[n["B"].id] == pytest.approx(
        [-1 / 1.0001]
    )
    empty = SearchTree([1])
    _node(empty, empty.root, 2)  # a step, nothing graded
    assert TreePaths(TreeRLAdvantage())(empty) == []


# ---------------------------------------------------------------------------- tokens, caps, shared prefixes
def test_token_advantages_repeat_each_steps_value_over_its_tokens():
    t, n = tree_one()
    by_end = {x.path[-1].id: x for x in TreePaths(TreeRLAdvantage())(t)}
    a, a1 = by_end[n["A1"].id].step_advantages
    assert by_end[n["A1"].id].token_advantages() == [a, a, a, a1, a1]  # A: 3 tokens, A1: 2
    assert len(by_end[n["B"].id].token_advantages()) == 4


def test_shared_prefix_once_divides_by_the_paths_through_a_step_and_max_paths_caps():
    t, n = tree_one()
    per_path = steps(TreePaths(TreeRLAdvantage())(t))
    once = steps(TreePaths(TreeRLAdvantage(), shared_prefix="once")(t))
    # A is on two emitted paths: half its advantage on each; the leaves are on one
    assert once[n["A1"].id] == pytest.approx([per_path[n["A1"].id][0] / 2, per_path[n["A1"].id][1]])
    assert once[n["B"].id] == pytest.approx(per_path[n["B"].id])
    # summed over the paths, A's policy-gradient weight is that of one copy
    assert once[n["A1"].id][0] + once[n["A2"].id][0] == pytest.approx(per_path[n["A1"].id][0])
    # max_paths 2: the first two answers found (B, A1); A is then on one emitted path only
    capped = steps(TreePaths(TreeRLAdvantage(), max_paths=2, shared_prefix="once")(t))
    assert sorted(capped) == sorted([n["B"].id, n["A1"].id])
    assert capped[n["A1"].id] == pytest.approx(per_path[n["A1"].id])  # values still from every answer


def test_tree_paths_arguments_are_checked():
    with pytest.raises(ValueError, match="TreePaths.max_paths"):
        TreePaths(TreeRLAdvantage(), max_paths=0)
    with pytest.raises(ValueError, match="TreePaths.shared_prefix"):
        TreePaths(TreeRLAdvantage(), shared_prefix="dedupe")
    with pytest.raises(ValueError, match="TreeRLAdvantage.local_weight"):
        TreeRLAdvantage(local_weight=-1)


# ---------------------------------------------------------------------------- through the rollout
def test_mcts_emits_every_graded_answer_with_exact_logprobs_and_token_advantages(char_tokenizer):
    sampler = ScriptedSampler(char_tokenizer, cycle=True)
    rollout = _small(workers=1, completions_per_node=2, iterations=3, rollout_mix=1.0, record_trees=True,
                     emission=TreePaths(TreeRLAdvantage()))  # fmt: skip
    out = rollout.run([PROBLEM], sampler, CountingEnv())
    (tree,) = rollout.trees
    ends = [x for x in tree.nodes if x.terminal and x.reward is not None]
    assert len(out.trajectories) == len(ends) == 3  # the hand trace of test_rollout_values_hand_traced
    expected = {x.path[-1].id: x for x in TreePaths(TreeRLAdvantage())(tree)}
    for traj, end in zip(out.trajectories, ends):
        assert traj.completion_ids == end.completion_ids()
        assert traj.behaviour_logprobs == end.completion_logprobs()  # the sampler's, as recorded
        assert traj.reward == end.reward and traj.advantage is None
        assert traj.token_advantages == expected[end.id].token_advantages()
    assert out.stats["rollout/paths_per_problem"] == 3
    assert out.stats["rollout/path_tokens_per_problem"] == sum(t.num_tokens for t in out.trajectories)
    assert out.stats["rollout/distinct_completions"] == 3 and out.stats["search/trees_without_answer"] == 0


def test_a_tree_batch_trains_with_the_token_advantages_as_given():
    from tsd.rl.losses import CISPOLoss, RLObjective

    adv = [0.5, 0.5, -1.0]
    t = Trajectory(problem_id=0, prompt_ids=[1, 2], completion_ids=[3, 4, 5], behaviour_logprobs=[-1.0] * 3,
                   reward=0.2, correct=False, policy_version=0, rollout="mcts", token_advantages=adv)  # fmt: skip
    batch = collate_trajectories([t], pad_id=0)
    assert batch.advantages.tolist() == [[0.0, 0.5, 0.5, -1.0]]  # targets x[1:]: the prompt's last, then 3
    # the loss uses them as given (no value baseline): CISPO's gradient on logp is -w * A / N
    logp = torch.full((1, 4), -1.0, requires_grad=True)
    out = RLObjective(CISPOLoss(), c_value=0.0, c_kl=0.0)(
        logp=logp, behaviour_logp=batch.behaviour_logp, rewards=batch.rewards, mask=batch.mask,
        advantages=batch.advantages,
    )  # fmt: skip
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5 / 3, -0.5 / 3, 1.0 / 3])


def test_token_advantages_are_validated():
    base = dict(problem_id=0, prompt_ids=[1], completion_ids=[3, 4], behaviour_logprobs=[-1.0, -1.0], reward=0.0,
                correct=False, policy_version=0, rollout="mcts")  # fmt: skip
    with pytest.raises(
        TrajectoryError, match="token_advantages: expected null or one float per completion token"
    ):
        Trajectory(**base, token_advantages=[1.0])
    with pytest.raises(TrajectoryError, match="token_advantages: each must be a float"):
        Trajectory(**base, token_advantages=[1.0, float("nan")])
    with pytest.raises(TrajectoryError, match="token_advantages: each must be a float"):
        Trajectory(**base, token_advantages=[1.0, 1e7])
    with pytest.raises(TrajectoryError, match="one or the other"):
        Trajectory(**base, token_advantages=[1.0, 2.0], advantage=0.5)
    ok = Trajectory(**base, token_advantages=[0.1 + 0.2, -1 / 3])
    back = Trajectory.from_json(ok.to_json())
    assert back.token_advantages == ok.token_advantages  # exact floats through JSON
