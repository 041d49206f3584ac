"""EPTree-style forking (tsd.rollouts.eptree): the fork rules and gates by hand, the radix tree of
sampled paths by hand (and TreeRL's advantages on it), the sampler's entropies against a forward
pass, and one rollout with the bundled tiny policy whose behaviour log-probs are re-derived by
teacher forcing.

    python -m pytest tests/test_eptree.py -q
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_random_policy
from test_sampler import states_of, teacher_forced_logprobs

from tsd.envs.base import Score
from tsd.envs.countdown import CountdownEnv
from tsd.rollouts.eptree import EPTreeRollout
from tsd.rollouts.fork_gates import ForkAll, MixedOrNearMiss
from tsd.rollouts.forks import EntropyForks, SampledPath, StepForks, SurpriseForks
from tsd.rollouts.path_tree import branch_points, tree_from_paths
from tsd.rollouts.tree_targets import TreePaths, TreeRLAdvantage
from tsd.samplers.base import Continuation, Sampler
from tsd.samplers.hf import HFSampler

# ---------------------------------------------------------------------------------------------
# fork rules and gates, by hand

PATH = SampledPath(
    token_ids=[1, 2, 3, 4, 5, 6, 7],
    logprobs=[-0.1, -2.0, -0.5, -2.0, -0.3, -3.0, -0.2],
    finish_reason="answer",
    entropies=[0.2, 0.1, 1.5, 0.4, 1.5, 0.3, 0.9],
    step_starts=[2, 4],
    answer_start=5,
)


def test_surprise_forks_pick_the_least_likely_tokens_ties_to_the_earlier():
    # in [1, 5): -log p = 2.0, 0.5, 2.0, 0.3 -> positions 1 and 3 (tie: both kept); 5 is the answer span
    assert SurpriseForks().choose(PATH, 2, 1, PATH.answer_start) == [1, 3]
    # one fork: the tie between 1 and 3 goes to the earlier
    assert SurpriseForks().choose(PATH, 1, 1, 5) == [1]
    # the answer span's -log p = 3.0 at 5 is never a candidate when hi = answer_start
    assert 5 not in SurpriseForks().choose(PATH, 7, 1, 5)


def test_entropy_forks_pick_the_most_uncertain_distributions():
    # entropies in [1, 5): 0.1, 1.5, 0.4, 1.5 -> positions 2 and 4
    assert EntropyForks().choose(PATH, 2, 1, 5) == [2, 4]
    assert EntropyForks.needs_entropy and not SurpriseForks.needs_entropy
    with pytest.raises(ValueError, match="entropies"):
        EntropyForks().choose(SampledPath([1, 2], [-1.0, -1.0], "answer", answer_start=2), 1, 1, 2)


def test_step_forks_use_step_starts_ranked_by_the_step_that_followed():
    # step at 2 spans [2, 4): -log P = 0.5 + 2.0 = 2.5; step at 4 spans [4, 5) (answer at 5): 0.3
    assert StepForks().score(PATH, 2) == pytest.approx(2.5)
    assert StepForks().score(PATH, 4) == pytest.approx(0.3)
    assert StepForks().choose(PATH, 1, 1, 5) == [2]
    assert StepForks().choose(PATH, 5, 3, 5) == [4]  # only the starts inside [lo, hi)


def _score(dense: float, correct: bool = False) -> Score:
    return Score(dense=dense, correct=correct, value=None, reason=None)


def test_gates():
    assert ForkAll()([_score(-1.0)])
    gate = MixedOrNearMiss(near_miss=0.5)
    assert gate([_score(1.0, True), _score(-1.0)])  # mixed
    assert not gate([_score(1.0, True), _score(1.0, True)])  # all correct: nothing to tell apart
    assert gate([_score(0.6), _score(-1.0)])  # a near miss
    assert not gate([_score(0.4), _score(-1.0)])  # all far off
    assert not MixedOrNearMiss(near_miss=1.5)([_score(0.9)])  # near misses off


# ---------------------------------------------------------------------------------------------
# the radix tree of paths, by hand


def _p(ids, finish="answer", lp=-0.5):
    return SimpleNamespace(token_ids=list(ids), logprobs=[lp] * len(ids), finish_reason=finish)


def test_tree_from_paths_one_node_per_shared_run_ids_topological():
    # A = 1 2 3 9, B = 1 2 4 9, C = 1 5 9, D = A again (a paid duplicate)
    paths = [_p([1, 2, 3, 9]), _p([1, 2, 4, 9]), _p([1, 5, 9]), _p([1, 2, 3, 9])]
    tree, ends = tree_from_paths([0], paths, max_tokens=8)
    segs = {n.id: (n.parent.id if n.parent else None, n.token_ids) for n in tree.nodes}
    # root -> [1] -> {[2] -> {[3 9], [4 9]}, [5 9]}; breadth-first ids
    assert segs == {0: (None, []), 1: (0, [1]), 2: (1, [2]), 3: (1, [5, 9]), 4: (2, [3, 9]), 5: (2, [4, 9])}
    assert [e.id for e in ends] == [4, 5, 3, 4]  # the duplicate ends where its first copy does
    assert all(e.terminal and e.terminal_reason == "answer" for e in ends)
    assert not any(n.terminal for n in tree.nodes[:3])
    assert [n.id for n in branch_points(tree)] == [1, 2]
    # priors: the share of the parent's distinct paths through the child (A, B of A, B, C)
    assert tree.nodes[2].prior == pytest.approx(2 / 3) and tree.nodes[3].prior == pytest.approx(1 / 3)
    for p, e in zip(paths, ends):  # every path is root ... its end, tokens and log-probs intact
        assert e.completion_ids() == p.token_ids and e.completion_logprobs() == p.logprobs


def test_tree_from_paths_refuses_what_no_complete_sample_is():
    with pytest.raises(ValueError, match="strict prefix"):
        tree_from_paths([0], [_p([1, 2]), _p([1, 2, 3])], max_tokens=8)
    with pytest.raises(ValueError, match="tokens"):
        tree_from_paths([0], [_p([1, 2, 3])], max_tokens=2)


def test_treerl_advantages_on_a_path_tree_by_hand():
    # A = 1 2 3 (r 1), B = 1 2 4 (r -1), C = 1 5 (r 0.5): root V = 1/6, [1] V = 1/6 (L 3), [2] V = 0 (L 2)
    paths = [_p([1, 2, 3]), _p([1, 2, 4]), _p([1, 5])]
    tree, ends = tree_from_paths([0], paths, max_tokens=8)
    for e, r in zip(ends, (1.0, -1.0, 0.5)):
        e.reward, e.correct = r, r == 1.0
    targets = TreePaths(TreeRLAdvantage())(tree)
    by_end = {t.path[-1].id: t for t in targets}
    a = by_end[ends[0].id]
    root = 1 / 6
    # steps of A: [1]: (1/6 - 1/6) + (1/6 - 1/6) = 0; [2]: (0 - 1/6) + (0 - 1/6) over sqrt 2; [3]: (1 - 1/6) + (1 - 0)
    want = [0.0, -2 * root / math.sqrt(2), (1 - root) + 1.0]
    assert a.step_advantages == pytest.approx(want)
    assert a.token_advantages() == pytest.approx(want)  # one token per segment here


# ---------------------------------------------------------------------------------------------
# the sampler's entropies


def test_hf_entropies_are_those_of_the_distribution_each_token_was_drawn_from(char_tokenizer):
    policy = make_random_policy(char_tokenizer)
    states = states_of(char_tokenizer)
    plain = HFSampler(policy, char_tokenizer, temperature=0.7, seed=3).sample(states, n=2, max_new_tokens=6)
    with_h = HFSampler(policy, char_tokenizer, temperature=0.7, seed=3).sample_with_entropy(
        states, n=2, max_new_tokens=6
    )
    for s, a_row, b_row in zip(states, plain, with_h):
        for a, b in zip(a_row, b_row):
            assert a.token_ids == b.token_ids and a.logprobs == b.logprobs  # the same draws
            assert a.entropies is None and b.entropies is not None and len(b.entropies) == len(b.token_ids)
            full = torch.tensor([s + b.token_ids])
            with torch.no_grad():
                logits, _, _ = policy(full)
            logits = logits[0, len(s) - 1 : -1].float()  # (C, V)
            logits[:, [char_tokenizer.pad_token_id, char_tokenizer.bos_token_id]] = float("-inf")
            p = torch.softmax(logits / 0.7, -1)
            want = torch.special.entr(p).sum(-1)  # (C,)
            assert b.entropies == pytest.approx(want.tolist(), abs=1e-4)


class _NoEntropySampler(Sampler):
    def sample(self, states, n, max_new_tokens, stop="step", exclude=None):  # pragma: no cover
        return [[Continuation([1], [0.0], "eos")] * n for _ in states]

    def value(self, states):  # pragma: no cover
        return [0.0] * len(states)

    def load_weights(self, state_dict, version):  # pragma: no cover
        return None


def test_a_sampler_without_entropies_says_so():
    from tsd.samplers.vllm import VLLMSampler

    with pytest.raises(NotImplementedError, match="entropies"):
        _NoEntropySampler().sample_with_entropy([[1]], n=1, max_new_tokens=1)
    # vLLM returns the sampled tokens' log-probs only: its sampler keeps the base's refusal
    assert VLLMSampler.sample_with_entropy is Sampler.sample_with_entropy
    with pytest.raises(ValueError, match="entropies"):
        Continuation([1, 2], [0.0, 0.0], "eos", entropies=[0.1])


# ---------------------------------------------------------------------------------------------
# one rollout with the bundled tiny policy


@pytest.fixture(scope="module")
def tiny():
    from tsd.models.loading import load_policy

    model, tok = load_policy("tiny")
    return model.eval(), tok


@pytest.mark.parametrize(
    "forks", [SurpriseForks(), EntropyForks(), StepForks()], ids=lambda f: type(f).__name__
)
def test_eptree_rollout_shares_prefixes_never_forks_the_answer_and_records_true_logprobs(tiny, forks):
    model, tok = tiny
    env = CountdownEnv(n_train=40, n_test=4)
    problems = list(env.train[:3])
    states: list[list[int]] = []  # every state a fork sampled from

    class Recording(HFSampler):
        def sample_and_value(self, s, *args, **kw):
            states.extend(s)
            return super().sample_and_value(s, *args, **kw)

    sampler = Recording(model, tok, seed=0, prefix_cache_tokens=1 << 16)
    rollout = EPTreeRollout(chains=3, forks_per_chain=2, branches=1, rounds=2, forks=forks, record_trees=True)
    before = sampler.generated_tokens
    out = rollout.run(problems, sampler, env)
    # the tokens counted are the tokens sampled: a prefix is generated once, by its chain
    assert out.generated_tokens == sampler.generated_tokens - before
    trained = sum(len(t.completion_ids) for t in out.trajectories)
    assert out.generated_tokens < trained  # shared prefixes are trained once per path, paid once
    assert sum(t.generated_tokens for t in rollout.trees) == out.generated_tokens
    prompts = {tuple(t.prompt_ids) for t in out.trajectories}
    forks_from = [s for s in states if tuple(s) not in prompts]
    assert forks_from  # the forks' states: a prompt and the first tokens of a path
    for s in forks_from:  # no fork starts inside the answer span (a branch may still re-draw the
        # same reasoning and part from its parent inside the answer: it is sampled, not forked there)
        assert "<answer>" not in tok.decode(s, skip_special_tokens=False)
    assert all(len(tree.root.children) >= 1 and branch_points(tree) for tree in rollout.trees)
    for t in out.trajectories:  # behaviour log-probs: the policy's, token for token
        want = teacher_forced_logprobs(model, tok, t.prompt_ids, t.completion_ids, 1.0)
        assert t.behaviour_logprobs == pytest.approx(want.tolist(), abs=1e-3)
        assert t.token_advantages is not None and len(t.token_advantages) == len(t.completion_ids)
        assert t.group_id == t.problem_id
    s = out.stats
    assert s["search/forks_per_problem"] > 0 and 0 < s["search/fork_position_relative"] < 1
    assert 0 < s["rollout/nonzero_advantage_token_fraction"] <= 1
    assert s["search/forked_problem_fraction"] == 1.0


def test_a_gate_that_forks_nothing_leaves_the_chains(tiny):
    model, tok = tiny
    env = CountdownEnv(n_train=40, n_test=4)
    sampler = HFSampler(model, tok, seed=1)
    rollout = EPTreeRollout(chains=4, gate=MixedOrNearMiss(near_miss=2.0), record_trees=True)
    out = rollout.run(list(env.train[:2]), sampler, env)
    # near misses off: only problems with a correct chain and a wrong one are forked
    forked = out.stats["search/forked_problem_fraction"]
    assert out.stats["search/forks_per_problem"] == 0 or forked > 0
    for tree in rollout.trees:
        leaves = [n for n in tree.nodes if n.terminal]
        correct = {bool(n.correct) for n in leaves}
        if correct != {True, False}:
            assert len(leaves) <= 4  # not forked: at most its 4 chains


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="EPTreeRollout.chains"):
        EPTreeRollout(chains=0)
    with pytest.raises(ValueError, match="EPTreeRollout.forks"):
        EPTreeRollout(forks="surprise")  # type: ignore[arg-type]


def test_shape_stats_and_the_nonzero_advantage_share_by_hand():
    from tsd.rl.trajectory import Trajectory
    from tsd.rollouts.tree_stats import nonzero_advantage_fraction, shape_stats

    # root -> [1] -> {[2] -> {[3 9], [4 9]}, [5 9]}: branch points [1] (2 children, 1 token in) and
    # [2] (2 children, 2 tokens in); 3 graded leaves for 20 generated tokens
    tree, ends = tree_from_paths([0], [_p([1, 2, 3, 9]), _p([1, 2, 4, 9]), _p([1, 5, 9])], max_tokens=8)
    for e in ends:
        e.reward, e.correct = 0.0, False
    tree.generated_tokens = 20
    s = shape_stats([tree])
    assert s["search/branch_points_per_tree"] == 2 and s["search/branching_factor"] == 2
    assert s["search/branch_depth_tokens"] == 1.5 and s["search/leaves_per_1k_tokens"] == 150

    def traj(n, adv=None, tok=None):
        return Trajectory(problem_id=0, prompt_ids=[1], completion_ids=[2] * n, behaviour_logprobs=[-0.1] * n,
                          reward=0.0, correct=False, policy_version=0, rollout="t", advantage=adv,
                          token_advantages=tok)  # fmt: skip

    # 2 tokens at 0 advantage, 2 of 3 per-token advantages non-zero, 4 tokens with a value baseline
    assert nonzero_advantage_fraction([traj(2, adv=0.0), traj(3, tok=[0.0, 0.5, -0.5]), traj(4)]) == 6 / 9
