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
from tsd.rollouts.selection import BestTerminal, MaxQ, MaxVisit
from tsd.rollouts.tree import SPENT_MASS, Node, SearchTree, puct_score, select_child
from tsd.samplers.base import Continuation, Sampler

# ---------------------------------------------------------------------------------------------
# helpers


def _tree(**kw) -> SearchTree:
    return SearchTree([1, 2, 3], **kw)


def _kids(tree: SearchTree, node: Node, specs: Sequence[tuple[float, float, float]]) -> list[Node]:
    """Children of ``node`` with (prior, visits, value_sum); marks ``node`` fully expanded (as many
    samples drawn as the tree's K allows, so selection descends past it)."""
    out = []
    for k, (prior, n, w) in enumerate(specs):
        child = tree.add_child(node, [10 + k], [-0.1], "step", prior)
        child.visits, child.value_sum = n, w
        out.append(child)
    node.samples = max(tree.completions_per_node, len(specs))
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

    def __init__(
        self, tokenizer, script=SCRIPT, values: dict[str, float] | None = None, cycle: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self._step_ids = {tokenizer.convert_tokens_to_ids("</step>")}  # how split_steps cuts a path
        self.script = script
        self.values = values or {}
        #: ``cycle``: the j-th sample ever drawn at a state is option j % len (across calls), so that
        #: widening and rollouts see the other options; else sample j of a call is option j % len
        self.cycle = cycle
        self.drawn: dict[str, int] = {}
        self.version = 7
        self.temperature = 1.0
        self.sample_calls: list[tuple[int, int, str]] = []
        self.exclude_calls: list[list[int] | None] = []
        self.value_calls: list[int] = []

    def _completion(self, state: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(state), skip_special_tokens=False)
        return text.split("\n", 1)[1]

    def sample(self, states, n, max_new_tokens, stop="step", exclude=None):
        self.sample_calls.append((len(states), n, stop))
        self.exclude_calls.append([len(e) for e in exclude] if exclude is not None else None)
        out = []
        for i, s in enumerate(states):
            conts = []
            for j in range(n):
                # stop="answer": scripted steps one after the other until one that is not a step
                # (only the first is drawn without replacement: below it every node is new)
                key, ids, lps, fin = self._completion(s), [], [], "step"
                while fin == "step" and (stop == "answer" or not ids):
                    text, fin, total = self._draw(
                        key, j, exclude[i] if exclude is not None and not ids else None
                    )
                    step = self.tokenizer.encode(text, add_special_tokens=False)
                    ids, lps, key = ids + step, lps + [total / len(step)] * len(step), key + text
                conts.append(Continuation(ids, lps, fin))
            out.append(conts)
        return out

    def _draw(self, key: str, j: int, excluded) -> tuple[str, str, float]:
        options = self.script.get(key, [("<eos>", "eos", -0.5)])
        if excluded:  # without replacement: skip the excluded options
            seen = {tuple(e.token_ids) for e in excluded}
            left = [
                o for o in options if tuple(self.tokenizer.encode(o[0], add_special_tokens=False)) not in seen
            ]
            options = left or options
        if self.cycle:
            j, self.drawn[key] = self.drawn.get(key, 0), self.drawn.get(key, 0) + 1
        return options[j % len(options)]

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
    t = _tree()
    a = Continuation([5, 6], [-0.5, -0.5], "step")
    b = Continuation([7], [-2.0], "step")
    landed = t.add_samples(t.root, [a, b, a])
    kids = t.root.children
    assert len(kids) == 2 and landed == [kids[0], kids[1], kids[0]] and t.expansion_widths == [2]
    assert [k.prior for k in kids] == pytest.approx(
        [2 / (2 + math.exp(-1)), math.exp(-1) / (2 + math.exp(-1))]
    )
    assert [k.prior for k in kids] == pytest.approx([0.844637, 0.155363], abs=1e-6)


def test_expansion_cuts_to_the_token_budget_and_marks_terminals():
    t = SearchTree([1], max_depth=2, max_tokens=5)
    a, b, c = t.add_samples(
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
    (d,) = t.add_samples(b, [Continuation([8], [-0.1], "step")])
    assert (d.depth, d.terminal, d.terminal_reason) == (2, True, "max_depth")


def test_choose_path_by_visits_then_q_then_prior():
    t = _tree()
    t.root.visits = 7.0
    _, b, _ = _kids(t, t.root, [(0.6, 3.0, 0.6), (0.3, 3.0, 1.5), (0.1, 1.0, 1.0)])
    # visits tie 3 = 3 -> Q 0.5 > 0.2 -> b; b's children unvisited -> the larger prior
    _, b2 = _kids(t, b, [(0.4, 0, 0), (0.6, 0, 0)])
    t.chosen = MaxVisit()(t)
    assert t.chosen == [t.root, b, b2]
    d = t.to_dict()
    json.dumps(d)
    assert [n["id"] for n in d["nodes"] if n["on_chosen_path"]] == [0, b.id, b2.id]


def test_widening_limit_hand_computed():
    t = _tree(completions_per_node=2, widening_alpha=0.5, virtual_loss=1.0)
    # ceil(k0 * max(1, N)^alpha): N = 0 -> 2, 4 -> 2*2 = 4, 5 -> ceil(2*2.236) = 5, 9 -> 2*3 = 6
    for n, want in [(0, 2), (1, 2), (2, 3), (4, 4), (5, 5), (9, 6)]:
        t.root.visits = float(n)
        assert t.max_samples(t.root) == want, n
    # virtual loss is not a visit: 4 real + 2 workers in flight still allows 4
    t.root.visits, t.root.in_flight = 6.0, 2
    assert t.max_samples(t.root) == 4
    t.root.in_flight = 0
    # room = limit - drawn - reserved this wave; a terminal has none
    t.root.visits, t.root.samples, t.root.scheduled = 9.0, 3, 1
    assert t.widen_count(t.root) == 6 - 3 - 1
    # alpha = 0 is the article's fixed K whatever the visits
    fixed = _tree(completions_per_node=4)
    fixed.root.visits = 1000.0
    assert fixed.max_samples(fixed.root) == 4


def test_unseen_mass_is_exact_and_stops_widening():
    t = _tree(completions_per_node=1, widening_alpha=1.0, min_unseen_mass=0.25)
    # steps of probability 0.5 and 0.3 (their log-probs sum to log p): 0.2 of the mass is unseen
    t.add_samples(t.root, [Continuation([5, 6], [math.log(0.5) / 2] * 2, "step")])
    assert t.unseen_mass(t.root) == pytest.approx(0.5)
    t.root.visits = 3.0  # alpha = 1: up to 3 samples
    assert t.widen_count(t.root) == 2
    t.add_samples(t.root, [Continuation([7], [math.log(0.3)], "step")])
    assert t.unseen_mass(t.root) == pytest.approx(0.2)
    assert not t.can_widen(t.root) and t.widen_count(t.root) == 0  # 0.2 < 0.25: a new draw would repeat
    t.min_unseen_mass = 0.0
    assert t.widen_count(t.root) == 1  # the cap alone: 3 - 2


def test_unseen_as_child_hand_computed():
    # root children A (p 0.5) and B (p 0.2): 0.3 of the step distribution is unseen. With
    # unseen_as_child the priors are the probabilities themselves and "a step not sampled yet" is
    # one more pUCT action: prior 0.3, no visits, Q = Q(root)
    t = _tree(unseen_as_child=True, c_puct=1.0)
    a, b = t.add_samples(
        t.root,
        [Continuation([5, 6], [math.log(0.5) / 2] * 2, "step"), Continuation([7], [math.log(0.2)], "step")],
    )
    assert (a.prior, b.prior, t._unseen_prior(t.root)) == pytest.approx((0.5, 0.2, 0.3))
    t.root.visits, t.root.value_sum = 4.0, 0.0
    a.visits, a.value_sum, b.visits, b.value_sum = 2.0, 1.0, 1.0, -1.0
    # A: 0.5 + 0.5 * sqrt(4) / 3 = 0.833 beats the unseen step 0 + 0.3 * sqrt(4) = 0.6 (B: -0.8)
    assert t.unseen_score(t.root) == pytest.approx(0.6)
    assert t.select_leaf() == [t.root, a]
    t.undo_virtual_loss([t.root, a])
    a.value_sum = 0.0  # A: 0 + 1/3 < 0.6: selection stops at the root to sample a new step
    assert t.select_leaf() == [t.root]
    t.undo_virtual_loss([t.root])
    # prior temperature 2: p^(1/2) renormalised over the children and the unseen mass
    t2 = _tree(unseen_as_child=True, prior_temperature=2.0)
    a2, b2 = t2.add_samples(
        t2.root, [Continuation([5], [math.log(0.5)], "step"), Continuation([7], [math.log(0.2)], "step")]
    )
    z = math.sqrt(0.5) + math.sqrt(0.2) + math.sqrt(0.3)
    assert (a2.prior, b2.prior, t2._unseen_prior(t2.root)) == pytest.approx(
        (math.sqrt(0.5) / z, math.sqrt(0.2) / z, math.sqrt(0.3) / z)
    )


def test_a_spent_node_stops_widening_even_without_min_unseen_mass():
    # min_unseen_mass 0: a node whose children hold all but rounding of its step distribution used to
    # ask for new steps for ever (each a paid repeat of a child); below SPENT_MASS it cannot widen
    t = _tree(unseen_as_child=True, skip_exhausted=True, min_unseen_mass=0.0)
    (a,) = t.add_samples(t.root, [Continuation([5], [math.log(1 - 1e-7)], "answer")])
    assert t.unseen_mass(t.root) < SPENT_MASS and not t.can_widen(t.root)
    a.reward = 0.5
    t.backup(t.select_leaf(), 0.5)
    assert a.exhausted and t.root.exhausted  # the search stops here instead of re-drawing
    t3 = _tree(unseen_as_child=True, min_unseen_mass=0.0)
    t3.add_samples(t3.root, [Continuation([5], [math.log(0.9)], "step")])
    assert t3.can_widen(t3.root)  # 10% unseen: room


def test_fixed_k_exhausts_a_node_whatever_mass_is_left_unsampled():
    # the article's fixed K (alpha 0): two samples of probability 0.1 each, 80% of the step
    # distribution never drawn, and the node is spent once its two answers are graded: the
    # search's rule (K children, never more), documented in tsd.rollouts.tree
    t = _tree(completions_per_node=2, skip_exhausted=True)
    a, b = t.add_samples(
        t.root, [Continuation([5], [math.log(0.1)], "answer"), Continuation([6], [math.log(0.1)], "answer")]
    )
    assert t.unseen_mass(t.root) == pytest.approx(0.8)
    for node in (a, b):
        node.reward = 0.0
        t.backup([t.root, node], 0.0, virtual_loss_applied=False)
    assert t.root.exhausted and not t.can_widen(t.root)


def test_exhausted_draws_are_counted_in_the_search_statistics(char_tokenizer):
    class Exhausting(ScriptedSampler):  # every call reports one draw with everything excluded
        exhausted_draws = 0

        def sample(self, *args, **kwargs):
            self.exhausted_draws += 1
            return super().sample(*args, **kwargs)

    sampler = Exhausting(char_tokenizer, cycle=True)
    out = _small(workers=1, iterations=3, rollout_mix=1.0).run([PROBLEM], sampler, CountingEnv())
    assert (
        out.stats["search/exhausted_draws_per_problem"]
        == sampler.exhausted_draws
        == len(sampler.sample_calls)
    )


def test_exhausted_subtrees_are_skipped_and_propagate_up():
    t = _tree(completions_per_node=2, skip_exhausted=True)  # alpha = 0: K = 2 samples, never more
    a, b = t.add_samples(t.root, [Continuation([5], [-0.1], "answer"), Continuation([6], [-0.2], "step")])
    a.reward, a.correct = 0.3, False  # graded terminal
    t.backup(t.select_leaf(), 0.3)  # pUCT picks a (larger prior) ...
    assert a.exhausted and not b.exhausted and not t.root.exhausted
    assert t.select_leaf()[-1] is b  # ... then b, though a's score would win without skipping
    t.undo_virtual_loss([t.root, b])
    b1, again = t.add_samples(b, [Continuation([8], [-0.1], "answer")] * 2)  # b is full with one child
    assert again is b1 and b.children == [b1]
    b1.reward = -1.0
    t.backup([t.root, b, b1], -1.0, virtual_loss_applied=False)
    assert b1.exhausted and b.exhausted and t.root.exhausted  # nothing left anywhere


def test_exhausted_search_stops_early(char_tokenizer):
    script = {"": [("<answer>3+5</answer>", "answer", -0.1), ("<answer>7*2+3</answer>", "answer", -3.0)]}
    sampler = ScriptedSampler(char_tokenizer, script, cycle=True)
    rollout = _small(workers=2, completions_per_node=2, iterations=10, rollout_mix=1.0, skip_exhausted=True)
    out = rollout.run([PROBLEM], sampler, CountingEnv())
    # wave 1: both workers sample from the root (its K = 2): the two answers; then nothing is left
    assert out.stats["search/waves"] == 1 and out.stats["search/simulations_per_problem"] == 2
    assert out.stats["search/exhausted_fraction"] == 1.0 and out.stats["search/cached_terminal_fraction"] == 0
    without = _small(workers=2, completions_per_node=2, iterations=10, rollout_mix=1.0)
    out2 = without.run([PROBLEM], ScriptedSampler(char_tokenizer, script, cycle=True), CountingEnv())
    assert out2.stats["search/cached_terminal_fraction"] == pytest.approx(18 / 20)  # re-reads


def test_priors_renormalised_over_every_sample_drawn():
    t = _tree()
    a = Continuation([5, 6], [-0.5, -0.5], "step")  # summed -1
    b = Continuation([7], [-2.0], "step")  # -2
    c = Continuation([8], [-3.0], "step")  # -3
    t.add_samples(t.root, [a, b])
    ka, kb = t.root.children
    # softmax over (-1, -2): 1/(1+e^-1) = 0.731059, e^-1/(1+e^-1) = 0.268941
    assert (ka.prior, kb.prior) == pytest.approx((0.731059, 0.268941), abs=1e-6)
    landed = t.add_samples(t.root, [c, a])  # a widening: one new child, one copy of a
    assert landed == [t.root.children[2], ka] and t.root.samples == 4
    # over all four samples (-1, -2, -3, -1): Z = 2e^-1 + e^-2 + e^-3
    z = 2 * math.exp(-1) + math.exp(-2) + math.exp(-3)
    want = [2 * math.exp(-1) / z, math.exp(-2) / z, math.exp(-3) / z]
    assert [k.prior for k in t.root.children] == pytest.approx(want)
    assert t.expansion_widths == [2]  # only the first expansion counts as one
    # prior temperature 2: softmax of (-1/2, -2/2) = (1/(1+e^-0.5), e^-0.5/(1+e^-0.5))
    warm = _tree(prior_temperature=2.0)
    warm.add_samples(warm.root, [a, b])
    assert [k.prior for k in warm.root.children] == pytest.approx([0.622459, 0.377541], abs=1e-6)


def _graded(tree: SearchTree, parent: Node, reward: float, visits: float) -> Node:
    n = tree.add_child(parent, [40 + len(tree.nodes)], [-0.1], "answer", 0.5)
    n.reward, n.correct, n.visits, n.value_sum = reward, reward == 1.0, visits, reward * visits
    return n


def test_best_terminal_takes_the_highest_reward_then_the_most_visited():
    t = _tree()
    a, b = _kids(t, t.root, [(0.9, 5.0, 1.0), (0.1, 3.0, 1.0)])
    _graded(t, a, 0.5, 5.0)
    _graded(t, b, 1.0, 1.0)
    best = _graded(t, b, 1.0, 2.0)  # same reward, more visits
    t.root.visits = 8.0
    assert MaxVisit()(t)[:2] == [t.root, a]  # the article's rule follows the visits to the 0.5
    assert BestTerminal()(t) == [t.root, b, best]
    # nothing graded: the max-visit path
    u = _tree()
    _kids(u, u.root, [(0.4, 1.0, 0.0), (0.6, 2.0, 0.0)])
    assert BestTerminal()(u) == MaxVisit()(u)


def test_max_q_follows_the_best_mean_value_among_visited_children():
    t = _tree()
    a, b, c = _kids(t, t.root, [(0.5, 4.0, 1.2), (0.3, 2.0, 1.0), (0.2, 0.0, 0.0)])
    # Q: a 0.3, b 0.5, c unvisited (never chosen, whatever unvisited_value says)
    b1, b2 = _kids(t, b, [(0.5, 1.0, -0.5), (0.5, 1.0, 0.9)])
    assert MaxQ()(t) == [t.root, b, b2]
    assert MaxVisit()(t) == [t.root, a, *MaxVisit()(t)[2:]]


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


def test_widening_draws_new_children_as_visits_grow(char_tokenizer):
    # K = 1, alpha = 0.5: the root may hold ceil(sqrt(N)) samples. Hand trace (V = 0 everywhere):
    # wave 1: root unexpanded -> sample A (3+5=8); wave 2: N(root)=1 allows 1 -> descend to A,
    # expand it; wave 3: N=2 allows 2 -> widen the root: B (7*2=14), priors over (-2, -1);
    # wave 4: N=3 allows 2 -> pUCT: A 0 + 0.5*0.269*sqrt3/2 = 0.116 < B 0 + 0.5*0.731*sqrt3 = 0.633 -> B,
    # expand it (7*2+3, terminal); wave 5: N=4 allows 2 -> B again (0.366 > 0.134) -> its terminal
    sampler = ScriptedSampler(char_tokenizer, cycle=True)
    rollout = _small(workers=1, completions_per_node=1, iterations=5, widening_alpha=0.5, record_trees=True)
    rollout.run([PROBLEM], sampler, CountingEnv())
    (tree,) = rollout.trees
    dec = [char_tokenizer.decode(n.token_ids, skip_special_tokens=False) for n in tree.root.children]
    assert dec == ["<step>3+5=8</step>", "<step>7*2=14</step>"] and tree.root.samples == 2
    a, b = tree.root.children
    assert (a.prior, b.prior) == pytest.approx((1 / (1 + math.e), math.e / (1 + math.e)))
    assert (tree.root.visits, a.visits, b.visits) == (5.0, 1.0, 2.0)
    (b1,) = b.children
    assert b1.terminal and b1.visits == 1.0 and b1.reward == pytest.approx(1 - 2 * 6 / 23)
    assert [n for _, n, _ in sampler.sample_calls[:4]] == [1, 1, 1, 1]  # one sample per widening
    # alpha = 0 (the article's fixed K = 1): the root never gets a second child
    fixed = _small(workers=1, completions_per_node=1, iterations=5, record_trees=True)
    fixed.run([PROBLEM], ScriptedSampler(char_tokenizer, cycle=True), CountingEnv())
    assert len(fixed.trees[0].root.children) == 1


def test_rollout_values_hand_traced(char_tokenizer):
    # K = 2, lambda = 1 (pure Monte-Carlo), one worker. Every simulation ends on a graded answer:
    # 1: root -> A 3+5=8 -> 8*2=16 -> (3+5)*2+7 = 23 (reward 1); 2: root has room (1 of 2) ->
    # B 7*2=14 -> 7*2+3 = 17 (1 - 12/23); 3: root full -> pUCT: A 1 + 0.5*P(A)*sqrt2/2 with
    # P(A) = 1/(1+e) -> 1.095 beats B 0.478 + 0.5*0.731*sqrt2/2 = 0.737 -> A has room -> 3*5+7 (1 - 2/23)
    sampler = ScriptedSampler(char_tokenizer, cycle=True)
    env = CountingEnv()
    rollout = _small(workers=1, completions_per_node=2, iterations=3, rollout_mix=1.0, record_trees=True)
    out = rollout.run([PROBLEM], sampler, env)
    (tree,) = rollout.trees
    a, b = tree.root.children
    r1, r2, r3 = 1.0, 1 - 12 / 23, 1 - 2 / 23
    assert tree.root.visits == 3.0 and tree.root.value_sum == pytest.approx(r1 + r2 + r3)
    assert (a.visits, a.value_sum) == (2.0, pytest.approx(r1 + r3))
    assert (b.visits, b.value_sum) == (1.0, pytest.approx(r2))
    terminals = sorted(n.reward for n in tree.nodes if n.terminal)
    assert terminals == pytest.approx(sorted([r1, r2, r3]))
    # every sampled token sits in a node: no merges here, so the tree holds exactly what was generated
    assert sum(len(n.token_ids) for n in tree.nodes) == out.generated_tokens == tree.generated_tokens
    # the max-visit path: A (2 visits), then the tie 1 = 1 goes to the higher Q, the correct branch
    (traj,) = out.trajectories
    assert traj.correct and traj.reward == 1.0
    assert traj.stats["rollout/correct_found"] == 1.0 and traj.stats["rollout/distinct_completions"] == 3
    assert out.stats["search/cached_terminal_fraction"] == 0.0
    # one sampler call per wave, a whole path (stop="answer") per simulation
    assert sampler.sample_calls == [(1, 1, "answer")] * 3


def test_one_call_paths_are_cut_where_a_step_by_step_search_would_stop(char_tokenizer):
    # one wave, one worker: the path is sampled whole, then cut into nodes. A step over
    # max_step_tokens ends the branch there ("length"); steps below max_depth are not kept. The
    # tokens past the cut were generated (paid) and are counted as discarded.
    long = "<step>" + "1+" * 10 + "1=11</step>"  # 27 tokens
    script = {"": [(long, "step", -1.0)], long: [("<answer>1</answer>", "answer", -1.0)]}
    out_tokens = len(char_tokenizer.encode(long + "<answer>1</answer>", add_special_tokens=False))
    rollout = _small(workers=1, iterations=1, rollout_mix=1.0, max_step_tokens=10, record_trees=True)
    out = rollout.run([PROBLEM], ScriptedSampler(char_tokenizer, script), CountingEnv())
    (tree,) = rollout.trees
    (child,) = tree.root.children
    assert len(child.token_ids) == 10 and child.terminal and child.terminal_reason == "length"
    assert out.generated_tokens == out_tokens  # every sampled token is paid for ...
    assert out.stats["search/discarded_tokens_per_problem"] == out_tokens - 10  # ... the rest kept in no node

    s1, s2, s3 = "<step>1+1=2</step>", "<step>2+2=4</step>", "<step>4+4=8</step>"
    script = {"": [(s1, "step", -1.0)], s1: [(s2, "step", -1.0)], s1 + s2: [(s3, "step", -1.0)],
              s1 + s2 + s3: [("<answer>8</answer>", "answer", -1.0)]}  # fmt: skip
    rollout = _small(workers=1, iterations=1, rollout_mix=1.0, max_depth=2, record_trees=True)
    out = rollout.run([PROBLEM], ScriptedSampler(char_tokenizer, script), CountingEnv())
    (tree,) = rollout.trees
    assert [n.depth for n in tree.nodes] == [0, 1, 2] and tree.nodes[2].terminal_reason == "max_depth"
    kept = sum(len(n.token_ids) for n in tree.nodes)
    assert out.stats["search/discarded_tokens_per_problem"] == tree.generated_tokens - kept > 0


def test_rollout_mix_blends_the_value_head_of_the_first_new_node(char_tokenizer):
    values = {"<step>3+5=8</step>": 0.4}
    sampler = ScriptedSampler(char_tokenizer, values=values, cycle=True)
    rollout = _small(workers=1, completions_per_node=2, iterations=1, rollout_mix=0.25, record_trees=True)
    rollout.run([PROBLEM], sampler, CountingEnv())
    (tree,) = rollout.trees
    # the rollout's first new node is A (V = 0.4); it reached 23 (z = 1): 0.75 * 0.4 + 0.25 * 1
    assert tree.root.value_sum == pytest.approx(0.75 * 0.4 + 0.25 * 1.0)
    assert tree.root.children[0].value_estimate == pytest.approx(0.4)


def test_rollout_simulations_back_up_once_and_share_waves(char_tokenizer):
    problems = [PROBLEM, Problem(numbers=(3, 5, 7, 2), target=22, id=1)]
    sampler = ScriptedSampler(char_tokenizer, cycle=True)
    rollout = _small(workers=3, completions_per_node=2, iterations=4, rollout_mix=1.0, widening_alpha=0.5)
    rollout.record_trees = True
    out = rollout.run(problems, sampler, CountingEnv())
    for tree in rollout.trees:
        assert tree.root.visits == 3 * 4  # N * M simulations, each backed up once
        for n in tree.nodes:  # no virtual loss or reservation left behind
            assert n.in_flight == 0 and n.scheduled == 0 and float(n.visits).is_integer()
            assert n.visits >= sum(c.visits for c in n.children)
    # one call per wave serves every live simulation of both trees, a whole path each
    assert len(sampler.sample_calls) == 4
    assert all(states <= 2 * 3 and stop == "answer" for states, _, stop in sampler.sample_calls)
    assert len(out.trajectories) == 2 and out.stats["search/simulations_per_problem"] == 12


def test_without_replacement_asks_the_sampler_to_skip_the_children(char_tokenizer):
    # widening by count (K = 1, alpha = 1: N(s) samples): the scripted sampler (not cycling) would
    # return its first option every time; told to exclude the children it gives the next ones
    sampler = ScriptedSampler(char_tokenizer)
    rollout = _small(workers=1, completions_per_node=1, iterations=8, widening_alpha=1.0,
                     without_replacement=True, record_trees=True)  # fmt: skip
    rollout.run([PROBLEM], sampler, CountingEnv())
    (tree,) = rollout.trees
    first_three = [child.id for child, _ in tree.root.draws[:3]]
    assert len(set(first_three)) == 3 and len(tree.root.children) == 3  # each new draw was a new step
    assert any(e and e[0] >= 2 for e in sampler.exclude_calls)  # the sampler was told what to skip
    plain = _small(workers=1, completions_per_node=1, iterations=8, widening_alpha=1.0, record_trees=True)
    plain.run([PROBLEM], ScriptedSampler(char_tokenizer), CountingEnv())
    assert len(plain.trees[0].root.children) == 1  # the same draws with replacement: duplicates


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
        ({"widening_alpha": -0.5}, "widening_alpha"),
        ({"widening_alpha": 2.0}, "widening_alpha"),
        ({"prior_temperature": 0.0}, "prior_temperature"),
        ({"rollout_mix": 1.5}, "rollout_mix"),
        ({"min_unseen_mass": 1.0}, "min_unseen_mass"),
        ({"skip_exhausted": 1}, "skip_exhausted"),
        ({"unseen_as_child": "yes"}, "unseen_as_child"),
        ({"without_replacement": 0}, "without_replacement"),
        ({"selection": "best_terminal"}, "selection"),
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


SEARCHES = {
    "article": {},
    "rollouts": {
        "rollout_mix": 1.0,
        "widening_alpha": 0.5,
        "prior_temperature": 2.0,
        "selection": BestTerminal(),
    },
}


@pytest.mark.parametrize("search", sorted(SEARCHES))
@pytest.mark.parametrize("policy", _policies())
def test_full_rollout_behaviour_logprobs_match_teacher_forcing(policy, search, char_tokenizer):
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
        **SEARCHES[search],
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
    if policy == "random" and search == "article":  # this seed: multi-step paths, stop="answer" completion
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


def test_samples_drawn_together_at_one_node_can_repeat_each_other_and_are_counted(char_tokenizer):
    """Without replacement excludes the children a node has when the call is made; two workers that
    stop at the same node in one wave draw independently and here draw the same first step (the
    scripted sampler's first option): merged into one child, paid, counted."""
    rollout = _small(workers=2, iterations=1, rollout_mix=1.0, without_replacement=True, record_trees=True)
    out = rollout.run([PROBLEM], ScriptedSampler(char_tokenizer), CountingEnv())
    (tree,) = rollout.trees
    (a,) = tree.root.children  # both paths went through "<step>3+5=8</step>" (7 tokens)
    assert a.visits == 2.0
    assert out.stats["search/repeated_steps_per_problem"] == 1.0
    assert out.stats["search/repeated_step_tokens_per_problem"] == 7.0
    # the article's expansion: K = 2 samples of one call at a node with one scripted step
    script = {"": [("<step>3+5=8</step>", "step", -1.0)]}
    article = _small(workers=1, iterations=1, completions_per_node=2, without_replacement=True)
    out = article.run([PROBLEM], ScriptedSampler(char_tokenizer, script), CountingEnv())
    assert out.stats["search/repeated_steps_per_problem"] == 1.0
    assert out.stats["search/repeated_step_tokens_per_problem"] == 7.0
