"""Distilling the whole tree (tsd.rollouts.tree_targets): every path's per-token advantage under
each rule, on small trees written out by hand; the emission through MCTSRollout; the record that
carries the advantages (validated, through the collate and the loss as given)."""

from __future__ import annotations

import math

import pytest
import torch
from test_mcts import PROBLEM, CountingEnv, ScriptedSampler, _small

from tsd.config import ConfigError
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
    assert (v[0].mean, v[0].count, v[0].paths) == (pytest.approx(1 / 6), 3, 3)  # (1 - 1 + 0.5) / 3
    assert (v[n["A"].id].mean, v[n["A"].id].count, v[n["A"].id].paths) == (0.0, 2, 2)
    # two of the three answers emitted (B, A1): L counts the emitted paths, V every answer
    kept = subtree_values(t, [n["B"], n["A1"]])
    assert (kept[n["A"].id].mean, kept[n["A"].id].count, kept[n["A"].id].paths) == (0.0, 2, 1)
    assert (kept[0].paths, kept[n["A2"].id].paths, kept[n["A2"].id].mean) == (2, 0, -1.0)
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
    plain = TreeRLAdvantage(sqrt_scale=False)
    # A: 2 * (0 - 1/6) = -1/3 on each of its two paths; once: -1/6 on each, -1/3 together
    assert steps(TreePaths(plain)(t))[n["A1"].id] == pytest.approx([-1 / 3, 5 / 6 + 1])
    once = steps(TreePaths(plain, shared_prefix="once")(t))
    assert once[n["A1"].id] == pytest.approx([-1 / 6, 5 / 6 + 1]) and once[n["A2"].id][0] == pytest.approx(
        -1 / 6
    )
    assert once[n["B"].id] == pytest.approx([2 * (0.5 - 1 / 6)])  # a leaf step: on one path
    # max_paths 2: the first two answers found (B, A1); A is then on one emitted path only
    capped = steps(TreePaths(plain, max_paths=2, shared_prefix="once")(t))
    assert sorted(capped) == sorted([n["B"].id, n["A1"].id])
    assert capped[n["A1"].id] == pytest.approx([-1 / 3, 5 / 6 + 1])  # values still from every answer


def test_treerl_sqrt_scale_counts_only_the_emitted_paths():
    """L(n) is the number of trained copies of n's step: with A2 dropped by max_paths, A is on one
    emitted path and its advantage is not divided (it was divided by sqrt 2, counting A2)."""
    t, n = tree_one()
    capped = steps(TreePaths(TreeRLAdvantage(), max_paths=2)(t))
    assert capped[n["A1"].id] == pytest.approx([-1 / 3, 5 / 6 + 1])
    every = steps(TreePaths(TreeRLAdvantage())(t))
    assert every[n["A1"].id][0] == pytest.approx(-1 / 3 / math.sqrt(2))


def test_once_and_the_sqrt_scale_are_not_combined():
    with pytest.raises(
        ConfigError, match="TreePaths.shared_prefix: 'once' is out of range .*sqrt_scale=false"
    ):
        TreePaths(TreeRLAdvantage(), shared_prefix="once")
    TreePaths(TreeRLAdvantage(sqrt_scale=False), shared_prefix="once")  # fine
    TreePaths(QDifferenceAdvantage(), shared_prefix="once")  # no sqrt scale of its own


def tree_three() -> tuple[SearchTree, dict]:
    """root -> A (2 tokens) -> {A1: r = 1 (1 token), A2: r = 0 (3 tokens)}; root -> B: r = -1 (2 tokens).
    V: root 0, A 1/2. TreeRL without its scale: A 1, A1 1.5, A2 -0.5, B -2. Paths: B (2 tokens),
    A A1 (3 tokens), A A2 (5 tokens)."""
    t = SearchTree([1, 2])
    a = _node(t, t.root, 2)
    b = _node(t, t.root, 2, terminal_reward=-1.0)
    a1 = _node(t, a, 1, terminal_reward=1.0)
    a2 = _node(t, a, 3, terminal_reward=0.0)
    return t, {"A": a, "B": b, "A1": a1, "A2": a2}


def _gradients(targets, normalization: str, c_kl: float = 0.0):
    """The loss's gradient on every completion token of the emitted paths (CISPO at ratio 1:
    ``-A_t / N`` under token normalisation, ``-A_t / (len_s * S)`` under sequence), one list per
    path; with ``c_kl`` the k3 term against a reference half as likely on every token
    (``d k3 / d logp = 1 - 1/2``)."""
    from tsd.rl.losses import CISPOLoss, RLObjective

    trajs = [
        Trajectory(problem_id=0, prompt_ids=[1, 2], completion_ids=x.path[-1].completion_ids(),
                   behaviour_logprobs=[-1.0] * len(x.path[-1].completion_ids()), reward=float(x.path[-1].reward),
                   correct=False, policy_version=0, rollout="mcts", token_advantages=x.token_advantages())
        for x in targets
    ]  # fmt: skip
    batch = collate_trajectories(trajs, pad_id=0)
    logp = batch.behaviour_logp.clone().requires_grad_(True)
    objective = RLObjective(CISPOLoss(normalization=normalization), c_ppo=1.0 if not c_kl else 0.0, c_value=0.0,
                            c_kl=c_kl)  # fmt: skip
    out = objective(logp=logp, behaviour_logp=batch.behaviour_logp, rewards=batch.rewards, mask=batch.mask,
                    advantages=batch.advantages, ref_logp=(batch.behaviour_logp - math.log(2)).detach())  # fmt: skip
    out.loss.backward()
    return [logp.grad[i][batch.mask[i].bool()].tolist() for i in range(len(trajs))]


@pytest.mark.parametrize(
    ("shared_prefix", "sqrt_scale", "normalization", "on_a"),
    [
        # per_path, TreeRL's scale: each copy of A carries 1/sqrt 2; token: N = 2 + 3 + 5 = 10 tokens
        ("per_path", True, "token", -2 / math.sqrt(2) / 10),
        # sequence: S = 3, each copy divided by its path's length (3 and 5)
        ("per_path", True, "sequence", -(1 / math.sqrt(2)) * (1 / 3 + 1 / 5) / 3),
        ("per_path", False, "token", -2 / 10),
        ("per_path", False, "sequence", -(1 / 3 + 1 / 5) / 3),
        # once: each copy carries 1/2: one copy's worth, A / N with N still counting both copies ...
        ("once", False, "token", -1 / 10),
        # ... and under sequence normalisation one copy whose 1/length is the mean of its paths'
        ("once", False, "sequence", -(1 / 2) * (1 / 3 + 1 / 5) / 3),
    ],
)
def test_what_a_shared_prefix_weighs_in_the_loss(shared_prefix, sqrt_scale, normalization, on_a):
    t, n = tree_three()
    targets = TreePaths(TreeRLAdvantage(sqrt_scale=sqrt_scale), shared_prefix=shared_prefix)(t)
    assert [x.path[-1].id for x in targets] == [n["B"].id, n["A1"].id, n["A2"].id]
    g_b, g_a1, g_a2 = _gradients(targets, normalization)
    # A's first token, its gradient summed over its two copies (A A1 and A A2)
    assert g_a1[0] + g_a2[0] == pytest.approx(on_a)
    assert g_a1[:2] == pytest.approx([g_a1[0]] * 2) and g_a2[:2] == pytest.approx([g_a2[0]] * 2)
    # the steps on one path carry the rule's advantage whatever the option: A1 1.5, A2 -0.5, B -2
    scale = 1 / 10 if normalization == "token" else None
    want_leaf = [-1.5 * (scale or 1 / 9), 0.5 * (scale or 1 / 15), 2 * (scale or 1 / 6)]
    assert [g_a1[2], g_a2[2], g_b[0]] == pytest.approx(want_leaf)


@pytest.mark.parametrize("shared_prefix", ["per_path", "once"])
def test_the_kl_term_counts_every_copy_of_a_shared_prefix(shared_prefix):
    """As documented: ``once`` de-duplicates the policy-gradient weight only; the KL term is a mean
    over the batch's tokens as they are (each copy's token: (1 - 1/2) / N, N = 10)."""
    t, _ = tree_three()
    targets = TreePaths(TreeRLAdvantage(sqrt_scale=False), shared_prefix=shared_prefix)(t)
    _, g_a1, g_a2 = _gradients(targets, "token", c_kl=1.0)
    assert g_a1[0] + g_a2[0] == pytest.approx(2 * 0.5 / 10)


def test_tree_paths_arguments_are_checked():
    with pytest.raises(ValueError, match="TreePaths.max_paths"):
        TreePaths(TreeRLAdvantage(), max_paths=0)
    with pytest.raises(ValueError, match="TreePaths.shared_prefix"):
        TreePaths(TreeRLAdvantage(), shared_prefix="dedupe")
    with pytest.raises(ValueError, match="TreeRLAdvantage.local_weight"):
        TreeRLAdvantage(local_weight=-1)


# ---------------------------------------------------------------------------- through the rollout
def test_mcts_emits_every_graded_answer_with_exact_logprobs_and_token_advantages(char_tokenizer):
    tok = char_tokenizer
    sampler = ScriptedSampler(tok, cycle=True)
    rollout = _small(workers=1, completions_per_node=2, iterations=3, rollout_mix=1.0, record_trees=True,
                     emission=TreePaths(TreeRLAdvantage()))  # fmt: skip
    out = rollout.run([PROBLEM], sampler, CountingEnv())
    # the hand trace of test_rollout_values_hand_traced: three answers, in the order found,
    # root -> A 3+5=8 -> 8*2=16 -> (3+5)*2+7 (r1 = 1), root -> B 7*2=14 -> 7*2+3 (r2 = 11/23),
    # A -> 3*5+7 (r3 = 21/23); each step's tokens carry the script's summed log-prob / its length
    steps_of = {  # text -> the script's summed log-prob
        "<step>3+5=8</step>": -2.0, "<step>8*2=16</step>": -1.0, "<answer>(3+5)*2+7</answer>": -1.0,
        "<step>7*2=14</step>": -1.0, "<answer>7*2+3</answer>": -1.0, "<answer>3*5+7</answer>": -1.5,
    }  # fmt: skip
    paths = [
        ["<step>3+5=8</step>", "<step>8*2=16</step>", "<answer>(3+5)*2+7</answer>"],
        ["<step>7*2=14</step>", "<answer>7*2+3</answer>"],
        ["<step>3+5=8</step>", "<answer>3*5+7</answer>"],
    ]
    # TreeRL by hand: V(root) = (1 + 11/23 + 21/23) / 3 = 55/69, V(A) = 22/23, V(B) = 11/23; A is on
    # two answers' paths (divided by sqrt 2), every other step on one
    a = 2 * (22 / 23 - 55 / 69) / math.sqrt(2)
    advantages = [
        [a, (1 - 55 / 69) + (1 - 22 / 23), (1 - 55 / 69) + 0.0],
        [2 * (11 / 23 - 55 / 69), (11 / 23 - 55 / 69) + 0.0],
        [a, (21 / 23 - 55 / 69) + (21 / 23 - 22 / 23)],
    ]
    rewards = [1.0, 1 - 12 / 23, 1 - 2 / 23]
    assert len(out.trajectories) == 3
    for traj, texts, advs, r in zip(out.trajectories, paths, advantages, rewards):
        ids = [tok.encode(x, add_special_tokens=False) for x in texts]
        assert traj.completion_ids == [t for step in ids for t in step]
        # the sampler's values: each step's summed log-prob spread evenly over its tokens
        assert traj.behaviour_logprobs == pytest.approx(
            [steps_of[x] / len(i) for x, i in zip(texts, ids) for _ in i], abs=1e-12
        )
        assert traj.token_advantages == pytest.approx(
            [adv for adv, i in zip(advs, ids) for _ in i], abs=1e-12
        )
        assert traj.reward == pytest.approx(r) and traj.advantage is None
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


def test_the_module_uses_the_value_baseline_for_a_nan_batch_and_refuses_a_mixed_one(random_policy):
    """PolicyValueModule.compute_loss: a batch without rollout advantages (NaN rows: best-of-N,
    one-path MCTS) trains with ``A_t = r - V_old(s_t)``; a batch of rollout advantages (a tree's)
    with them as given; one that mixes the two is refused, not half-read."""
    from tsd.module import PolicyValueModule
    from tsd.rl.losses import CISPOLoss, RLObjective

    module = PolicyValueModule(
        random_policy, RLObjective(CISPOLoss(), c_value=0.0, c_kl=0.0), optimizer=torch.optim.SGD
    )
    module.policy.eval()  # no dropout: the same forward twice

    def traj(completion, reward, token_advantages=None):
        return Trajectory(problem_id=0, prompt_ids=[1, 5, 6], completion_ids=completion, behaviour_logprobs=[-1.0] *
                          len(completion), reward=reward, correct=False, policy_version=0, rollout="x",
                          token_advantages=token_advantages)  # fmt: skip

    plain = [traj([7, 8, 9], 1.0), traj([10, 11], -0.5)]
    tree = [traj([7, 8, 9], 1.0, [0.5, 0.5, -1.0]), traj([10, 11], -0.5, [2.0, 2.0])]
    for trajs in (plain, tree):
        batch = collate_trajectories(trajs, pad_id=0)
        with torch.no_grad():
            fwd = module.forward_batch(batch)
        # behaviour log-probs = the model's own: rho = 1, so CISPO is -sum(A_t * logp_t) / N
        batch.behaviour_logp = torch.where(batch.mask.bool(), fwd["logp"], batch.behaviour_logp)
        m = batch.mask.bool()
        if trajs is plain:  # r - V(s_t) at every completion token, V read from the same forward
            adv = batch.rewards[:, None] - fwd["values"]  # (B, T)
            assert torch.isnan(batch.advantages).all()
        else:
            adv = torch.tensor([[0.0, 0.0, 0.5, 0.5, -1.0], [0.0, 0.0, 2.0, 2.0, 0.0]])  # targets x[1:]
        want = -(adv * fwd["logp"])[m].sum() / m.sum()
        assert float(module.compute_loss(batch).loss.detach()) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="a batch mixes trajectories with and without rollout advantages"):
        module.compute_loss(collate_trajectories([plain[0], tree[1]], pad_id=0))
