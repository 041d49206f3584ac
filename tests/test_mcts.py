"""MCTS over reasoning steps: the tree arithmetic by hand, the search with a scripted sampler, and
one full rollout with a real (tiny) policy whose behaviour log-probs are re-derived by a forward pass.

    python -m pytest tests/test_mcts.py -q
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from tsd.envs.countdown import CountdownEnv, Problem
from tsd.rl.trajectory import Trajectory
from tsd.rollouts.mcts import MCTSRollout
from tsd.rollouts.tree import Node, SearchTree, merge_continuations, puct_score, select_child
from tsd.samplers.base import Continuation, Sampler

# ---------------------------------------------------------------------------------------------
# helpers


def _tree(**kw) -> SearchTree:
    return SearchTree([1, 2, 3], **kw)


def _kids(tree: SearchTree, node: Node, specs: Sequence[tuple[float, float, float]]) -> list[Node]:
    """Children of ``node`` with (prior, visits, value_sum); marks ``node`` expanded."""
    out = []
    for k, (prior, n, w) in enumerate(specs):
        child = tree.add_child(node, [10 + k], [-0.1], "step", prior)
        child.visits, child.value_sum = n, w
        out.append(child)
    node.expanded = True
    return out


PROBLEM = Problem(numbers=(3, 5, 7, 2), target=23, id=0)

#: completion so far -> the continuations the scripted policy samples there, as
#: (text, finish_reason, summed log-prob). Sample j of K is option j % len(options).
#: Rewards (dense, target 23): "(3+5)*2+7" = 23 -> 1; "3*5+7" = 22 -> 1 - 2/23;
#: "7*2+3" = 17 -> 1 - 12/23; "3+5" = 8 -> 1 - 30/23; no answer -> -1.
SCRIPT: dict[str, list[tuple[str, str, float]]] = {
    "": [
        ("<step>3+5=8</step>", "step", -2.0),
        ("<step>7*2=14</step>", "step", -1.0),
        ("<answer>3+5</answer>", "answer", -3.0),
    ],
    "<step>3+5=8</step>": [
        ("<step>8*2=16</step>", "step", -1.0),
        ("<answer>3*5+7</answer>", "answer", -1.5),
    ],
    "<step>3+5=8</step><step>8*2=16</step>": [
        ("<answer>(3+5)*2+7</answer>", "answer", -1.0),
        ("<step>16+7=23</step>", "step", -2.0),
    ],
    "<step>7*2=14</step>": [
        ("<answer>7*2+3</answer>", "answer", -1.0),
        ("<eos>", "eos", -2.0),
    ],
}


class ScriptedSampler(Sampler):
    """Deterministic fake policy over the char tokenizer: continuations come from ``script``
    keyed by the completion text so far (anything unscripted ends with EOS). Each token of a
    continuation carries ``summed log-prob / length``. Records every call."""

    def __init__(self, tokenizer, script=SCRIPT, values: dict[str, float] | None = None) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.values = values or {}
        self.version = 7
        self.temperature = 1.0
        self.sample_calls: list[tuple[int, int, str]] = []
        self.value_calls: list[int] = []

    def _completion(self, state: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(state), skip_special_tokens=False)
        return text.split("\n", 1)[1]

    def sample(self, states, n, max_new_tokens, stop="step"):
        self.sample_calls.append((len(states), n, stop))
        out = []
        for s in states:
            options = self.script.get(self._completion(s), [("<eos>", "eos", -0.5)])
            conts = []
            for j in range(n):
                text, fin, total = options[j % len(options)]
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                conts.append(Continuation(ids, [total / len(ids)] * len(ids), fin))
            out.append(conts)
        return out

    def value(self, states):
        self.value_calls.append(len(states))
        return [self.values.get(self._completion(s), 0.0) for s in states]

    def load_weights(self, state_dict, version):  # pragma: no cover - not used
        self.version = version


class CountingEnv(CountdownEnv):
    def __init__(self) -> None:
        super().__init__(n_train=4, n_test=4)
        self.graded: list[str] = []

    def score(self, completion, problem):
        self.graded.append(completion)
        return super().score(completion, problem)


def _small(**kw) -> MCTSRollout:
    base = dict(workers=2, completions_per_node=2, iterations=8, max_step_tokens=32, max_new_tokens=128)
    base.update(kw)
    return MCTSRollout(**base)


# ---------------------------------------------------------------------------------------------
# pure tree logic, hand-computed


def test_puct_score_hand_computed():
    t = _tree(c_puct=0.5)
    t.root.visits, t.root.value_sum = 4.0, 1.0
    a, b, c = _kids(t, t.root, [(0.3, 1.0, 0.5), (0.6, 0.0, 0.0), (0.1, 3.0, -0.3)])
    # a: Q = 0.5/1 = 0.5;   U = 0.5 * 0.3 * sqrt(4) / (1 + 1) = 0.15  -> 0.65
    # b: Q = 0 (unvisited); U = 0.5 * 0.6 * 2 / (1 + 0)     = 0.6   -> 0.6
    # c: Q = -0.3/3 = -0.1; U = 0.5 * 0.1 * 2 / (1 + 3)     = 0.025 -> -0.075
    assert puct_score(t.root, a, 0.5) == pytest.approx(0.65)
    assert puct_score(t.root, b, 0.5) == pytest.approx(0.6)
    assert puct_score(t.root, c, 0.5) == pytest.approx(-0.075)
    assert select_child(t.root, 0.5) is a
    # unvisited_value = 0.2 lifts only b: 0.2 + 0.6 = 0.8 > 0.65
    assert puct_score(t.root, b, 0.5, unvisited_value=0.2) == pytest.approx(0.8)
    assert select_child(t.root, 0.5, unvisited_value=0.2) is b


def test_ties_broken_by_prior_then_index():
    t = _tree()
    # root never visited: sqrt(N(s)) = 0, every Q = 0 -> all scores 0; the larger prior wins
    _, big, _ = _kids(t, t.root, [(0.2, 0, 0), (0.5, 0, 0), (0.3, 0, 0)])
    assert select_child(t.root, 0.5) is big
    t2 = _tree()
    first, _ = _kids(t2, t2.root, [(0.5, 0, 0), (0.5, 0, 0)])
    assert select_child(t2.root, 0.5) is first  # equal score and prior -> lower index


def test_virtual_loss_apply_and_undo_exact():
    t = _tree(c_puct=0.5, virtual_loss=1.0)
    t.root.visits, t.root.value_sum = 4.0, 1.0
    a, b, _ = _kids(t, t.root, [(0.3, 1.0, 0.5), (0.6, 0.0, 0.0), (0.1, 3.0, -0.3)])
    path = t.select_leaf()  # a (0.65, above) is an unexpanded leaf
    assert path == [t.root, a]
    # root: N 4 -> 5, W 1.0 -> 0.0;  a: N 1 -> 2, W 0.5 -> -0.5 (Q = -0.25)
    assert (t.root.visits, t.root.value_sum) == (5.0, 0.0)
    assert (a.visits, a.value_sum) == (2.0, -0.5)
    # the next worker: a = -0.25 + 0.5*0.3*sqrt(5)/3 = -0.138; b = 0 + 0.5*0.6*sqrt(5)/1 = 0.671
    assert puct_score(t.root, a, 0.5) == pytest.approx(-0.25 + 0.15 * math.sqrt(5) / 3)
    assert t.select_leaf() == [t.root, b]
    t.undo_virtual_loss([t.root, b])
    t.undo_virtual_loss(path)
    assert (t.root.visits, t.root.value_sum, a.visits, a.value_sum) == (4.0, 1.0, 1.0, 0.5)
    assert (b.visits, b.value_sum) == (0.0, 0.0)


def test_backup_hand_computed():
    t = _tree(virtual_loss=2.5)
    t.root.visits, t.root.value_sum = 4.0, 1.0
    a, _ = _kids(t, t.root, [(0.7, 1.0, 0.5), (0.3, 0.0, 0.0)])
    path = t.select_leaf()
    assert path[-1] is a
    # with virtual loss 2.5: root (6.5, -1.5), a (3.5, -2.0)
    assert (t.root.visits, t.root.value_sum, a.visits, a.value_sum) == (6.5, -1.5, 3.5, -2.0)
    t.backup(path, 0.7)
    # loss taken off, then one visit and 0.7 added once: root (5, 1.7), a (2, 1.2) -> Q(a) = 0.6
    assert t.root.visits == 5.0 and t.root.value_sum == pytest.approx(1.7)
    assert a.visits == 2.0 and a.value_sum == pytest.approx(1.2)
    assert a.q() == pytest.approx(0.6)


def test_workers_pick_distinct_leaves_in_one_wave():
    t = _tree(virtual_loss=1.0)
    t.root.visits, t.root.value_sum = 1.0, 0.0
    kids = _kids(t, t.root, [(0.25, 0, 0)] * 4)
    # each pick gets Q = -1 from its virtual loss, below the untouched siblings' Q = 0 + U > 0
    picked = [t.select_leaf()[-1] for _ in range(4)]
    assert picked == kids
    # without virtual loss all four workers collide on the same leaf
    t0 = _tree(virtual_loss=0.0)
    t0.root.visits = 1.0
    kids0 = _kids(t0, t0.root, [(0.25, 0, 0)] * 4)
    assert {id(t0.select_leaf()[-1]) for _ in range(4)} == {id(kids0[0])}


def test_duplicates_merged_with_summed_prior():
    # summed log-probs A=-1, B=-2, A=-1: softmax masses e^-1, e^-2, e^-1 over Z = 2e^-1 + e^-2;
    # A = 2e^-1/Z = 2/(2 + e^-1) = 0.844637, B = e^-1/(2 + e^-1) = 0.155363
    # (= softmax over [logsumexp(-1, -1), -2] = softmax([ln 2 - 1, -2]))
    merged = merge_continuations([[5, 6], [7], [5, 6]], [-1.0, -2.0, -1.0])
    assert [i for i, _ in merged] == [0, 1]
    assert merged[0][1] == pytest.approx(2 / (2 + math.exp(-1)))
    assert merged[1][1] == pytest.approx(math.exp(-1) / (2 + math.exp(-1)))
    t = _tree()
    a = Continuation([5, 6], [-0.5, -0.5], "step")
    b = Continuation([7], [-2.0], "step")
    kids = t.expand(t.root, [a, b, a])
    assert len(kids) == 2 and t.expansion_widths == [2]
    assert [k.prior for k in kids] == pytest.approx([0.844637, 0.155363], abs=1e-6)
    assert sum(k.prior for k in kids) == pytest.approx(1.0)


def test_expansion_cuts_to_the_token_budget_and_marks_terminals():
    t = SearchTree([1], max_depth=2, max_tokens=5)
    a, b, c = t.expand(
        t.root,
        [
            Continuation([4, 7, 8, 9, 5, 10, 11], [-0.1] * 7, "step"),  # 7 > budget 5: cut, "length"
            Continuation([4, 7, 5], [-0.1] * 3, "step"),
            Continuation([6, 7, 2], [-0.1] * 3, "eos"),
        ],
    )
    assert a.token_ids == [4, 7, 8, 9, 5] and len(a.logprobs) == 5
    assert (a.terminal, a.terminal_reason) == (True, "length")
    assert (b.terminal, c.terminal, c.terminal_reason) == (False, True, "eos")
    (d,) = t.expand(b, [Continuation([8], [-0.1], "step")])
    assert (d.depth, d.terminal, d.terminal_reason) == (2, True, "max_depth")


def test_choose_path_by_visits_then_q_then_prior():
    t = _tree()
    t.root.visits = 7.0
    _, b, _ = _kids(t, t.root, [(0.6, 3.0, 0.6), (0.3, 3.0, 1.5), (0.1, 1.0, 1.0)])
    # visits tie 3 = 3 -> Q 0.5 > 0.2 -> b; b's children unvisited -> the larger prior
    _, b2 = _kids(t, b, [(0.4, 0, 0), (0.6, 0, 0)])
    assert t.choose_path() == [t.root, b, b2]
    d = t.to_dict()
    json.dumps(d)
    assert [n["id"] for n in d["nodes"] if n["on_chosen_path"]] == [0, b.id, b2.id]


# ---------------------------------------------------------------------------------------------
# the search, with a scripted sampler


def test_scripted_search_finds_the_answer_on_the_max_visit_path(char_tokenizer):
    # a value head that has learnt something: the states on the way to 23 look promising. Without
    # it (V = 0 everywhere) c_puct = 0.5 keeps exploiting the near miss 3*5+7 = 22 (reward 0.91)
    values = {
        "<step>3+5=8</step>": 0.5,
        "<step>7*2=14</step>": 0.2,
        "<step>3+5=8</step><step>8*2=16</step>": 0.8,
    }
    sampler, env = ScriptedSampler(char_tokenizer, values=values), CountingEnv()
    rollout = _small(workers=2, completions_per_node=2, iterations=10, record_trees=True)
    out = rollout.run([PROBLEM], sampler, env)
    (traj,) = out.trajectories
    text = char_tokenizer.decode(traj.completion_ids, skip_special_tokens=False)
    assert text == "<step>3+5=8</step><step>8*2=16</step><answer>(3+5)*2+7</answer>"
    assert traj.correct and traj.reward == 1.0 and traj.finish_reason == "answer"
    assert traj.policy_version == 7 and traj.rollout == "mcts" and traj.advantage is None
    # behaviour log-probs are the scripted ones: -2/18 per token, -1/19, -1/26
    assert sum(traj.behaviour_logprobs) == pytest.approx(-2.0 - 1.0 - 1.0)
    (tree,) = rollout.trees
    for node in tree.chosen[:-1]:  # every step of the chosen path is its parent's most visited child
        nxt = tree.chosen[tree.chosen.index(node) + 1]
        assert nxt.visits == max(c.visits for c in node.children)
    assert out.stats["rollout/correct_mean"] == 1.0
    assert out.stats["search/waves"] == 10
    # one sample call (stop="step") and one value call per wave, then nothing to complete
    assert all(call[1:] == (2, "step") for call in sampler.sample_calls)
    assert len(sampler.sample_calls) == len(sampler.value_calls) <= 10


def test_no_value_counted_twice(char_tokenizer, monkeypatch):
    backed: list[float] = []
    orig = SearchTree.backup

    def spy(self, path, value, **kw):
        backed.append(value)
        return orig(self, path, value, **kw)

    monkeypatch.setattr(SearchTree, "backup", spy)
    values = {"<step>3+5=8</step>": 0.3, "<step>7*2=14</step>": -0.2, "": 0.1}
    rollout = _small(workers=3, completions_per_node=3, iterations=6, record_trees=True)
    rollout.run([PROBLEM], ScriptedSampler(char_tokenizer, values=values), CountingEnv())
    (tree,) = rollout.trees
    assert len(backed) == 3 * 6  # N * M simulations
    assert tree.root.visits == 18.0  # sum of root visits == simulations
    assert tree.root.value_sum == pytest.approx(math.fsum(backed))
    for n in tree.nodes:  # no virtual loss left; N(s) = simulations ending at s + sum of children's N
        assert float(n.visits).is_integer()
        assert n.visits >= sum(c.visits for c in n.children)
    # the first wave: all 3 workers at the unexpanded root -> one expansion, three backups of V(root)
    assert backed[:3] == [0.1, 0.1, 0.1]


def test_terminal_leaf_graded_once(char_tokenizer):
    script = {"": [("<answer>3+5</answer>", "answer", -1.0), ("<answer>7*2+3</answer>", "answer", -1.0)]}
    env = CountingEnv()
    rollout = _small(workers=4, completions_per_node=2, iterations=5, record_trees=True)
    out = rollout.run([PROBLEM], ScriptedSampler(char_tokenizer, script), env)
    (tree,) = rollout.trees
    a, b = tree.root.children
    assert a.visits + b.visits == 16  # waves 2..5 x 4 workers, all on the two terminals
    assert sorted(env.graded) == ["<answer>3+5</answer>", "<answer>7*2+3</answer>"]  # once each
    assert out.stats["search/grades_per_problem"] == 2  # the chosen terminal reuses its grade
    assert out.stats["search/terminal_fraction"] == pytest.approx(16 / 20)
    assert out.trajectories[0].reward == pytest.approx(1 - 2 * 6 / 23)  # 7*2+3 = 17


def test_problems_share_one_sample_and_one_value_call_per_wave(char_tokenizer):
    sampler = ScriptedSampler(char_tokenizer)
    problems = [PROBLEM, Problem(numbers=(3, 5, 7, 2), target=22, id=1)]
    out = _small(workers=2, completions_per_node=2, iterations=3).run(problems, sampler, CountingEnv())
    # wave 1: both roots (one each, though 2 workers reach each) -> 2 states in one call
    assert sampler.sample_calls[0] == (2, 2, "step") and sampler.value_calls[0] == 2
    assert len(sampler.sample_calls) == len(sampler.value_calls) == 3
    assert [t.problem_id for t in out.trajectories] == [0, 1]
    assert out.generated_tokens > 0


def test_same_seed_same_tree(char_tokenizer):
    from tsd.samplers.hf import HFSampler

    env = CountdownEnv(n_train=4, n_test=4)
    policy, _ = _step_closing_policy(char_tokenizer)

    def tree_of(seed: int) -> str:
        r = MCTSRollout(
            workers=2,
            completions_per_node=2,
            iterations=3,
            max_step_tokens=8,
            max_new_tokens=24,
            record_trees=True,
            seed=seed,
        )
        r.run(env.test[:1], HFSampler(policy, char_tokenizer, seed=seed), env)
        return json.dumps(r.trees[0].to_dict(), sort_keys=True)

    first = tree_of(3)
    assert len(json.loads(first)["nodes"]) > 3
    assert tree_of(3) == first
    assert tree_of(4) != first


def test_config_validation_names_the_field():
    for kw, name in [
        ({"workers": 0}, "workers"),
        ({"completions_per_node": 0}, "completions_per_node"),
        ({"iterations": 1.5}, "iterations"),
        ({"c_puct": -0.1}, "c_puct"),
        ({"virtual_loss": -1}, "virtual_loss"),
        ({"unvisited_value": 1.5}, "unvisited_value"),
        ({"max_step_tokens": 0}, "max_step_tokens"),
        ({"max_depth": 0}, "max_depth"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"seed": "x"}, "seed"),
        ({"record_trees": 1}, "record_trees"),
    ]:
        with pytest.raises(ValueError, match=rf"MCTSRollout\.{name}"):
            MCTSRollout(**kw)


# ---------------------------------------------------------------------------------------------
# the full rollout with a real policy


def _step_closing_policy(tokenizer):
    """A random policy whose logits favour ``</step>`` (+3: ~20% a token), so that its trees have
    several levels and chosen paths that need completing; the bias is part of its forward, so
    sampler and teacher forcing see the same distribution."""
    from conftest import make_random_policy

    from tsd.models.policy_value import PolicyValueModel

    close = tokenizer.convert_tokens_to_ids("</step>")

    class StepClosing(PolicyValueModel):
        def forward(self, *args, **kwargs):
            logits, values, cache = super().forward(*args, **kwargs)
            logits[..., close] += 3.0
            return logits, values, cache

    base = make_random_policy(tokenizer)
    return StepClosing(base.lm, base.value_head).eval(), tokenizer


def _policies():
    """The step-closing random policy; the bundled tiny policy too once it exists."""
    out = ["random"]
    if (Path(__file__).resolve().parents[1] / "src/tsd/assets/tiny_policy/model.safetensors").exists():
        out.append("tiny")
    return out


@pytest.mark.parametrize("policy", _policies())
def test_full_rollout_behaviour_logprobs_match_teacher_forcing(policy, char_tokenizer):
    from tsd.samplers.hf import HFSampler, banned_token_ids

    if policy == "tiny":
        from tsd.models.loading import load_policy

        model, tok = load_policy("tiny")
    else:
        model, tok = _step_closing_policy(char_tokenizer)
    env = CountdownEnv(n_train=4, n_test=4)
    sampler = HFSampler(model, tok, temperature=0.9, seed=2)
    rollout = MCTSRollout(
        workers=2,
        completions_per_node=2,
        iterations=3,
        max_step_tokens=12,
        max_new_tokens=40,
        record_trees=True,
    )
    out = rollout.run(env.test[:2], sampler, env)
    assert len(out.trajectories) == 2
    assert out.generated_tokens == sampler.generated_tokens
    for key in (
        "tree_size", "chosen_depth", "distinct_children_per_expansion", "root_visit_entropy",
        "root_prior_visit_kl", "terminal_fraction", "chosen_reward", "waves", "sampler_tokens_per_problem",
        "grades_per_problem",
    ):  # fmt: skip
        assert math.isfinite(out.stats[f"search/{key}"]), key
    assert {"rollout/reward_mean", "rollout/correct_mean"} <= set(out.stats)
    json.dumps([t.to_dict() for t in rollout.trees])
    if policy == "random":  # this seed exercises multi-step paths and the stop="answer" completion
        assert any(t.stats["search/completed"] for t in out.trajectories)
        assert max(t.stats["search/chosen_depth"] for t in out.trajectories) >= 2
    banned = banned_token_ids(tok, sampler.eos_ids)
    for traj in out.trajectories:
        assert 0 < len(traj.completion_ids) <= 40 and -1.0 <= traj.reward <= 1.0
        assert Trajectory.from_json(traj.to_json()) == traj  # well-formed: survives the buffer's validation
        assert traj.policy_version == sampler.version and traj.rollout == "mcts" and traj.advantage is None
        ids = torch.tensor([traj.prompt_ids + traj.completion_ids])  # (1, T)
        with torch.no_grad():
            logits, _, _ = model(ids)  # (1, T, V) fp32
        # the sampler's distribution: logits / T with pad/BOS banned (~no mass for a trained policy)
        logits = logits[0, len(traj.prompt_ids) - 1 : -1] / 0.9  # (C, V): positions predicting the completion
        logits[:, banned] = float("-inf")
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(traj.completion_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(traj.behaviour_logprobs), ref, atol=1e-4)
