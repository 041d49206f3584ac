"""MCTS over reasoning steps with N parallel workers per tree (seed article; DESIGN.md "MCTS").

    python scripts/draw_tree.py --problems 3      # search, then draw each tree
    python scripts/bench_mcts.py                  # simulations/s for N = 1, 4, 16 workers

The root is the prompt, a node is one reasoning step (tokens up to and including ``</step>``)
and a terminal node holds the answer or ends the sequence (:mod:`tsd.rollouts.tree` has the pure
tree logic: pUCT, virtual loss, expansion with merged duplicates, backup).

One *wave* is one iteration of every worker on every tree of the batch:

1. select: for each tree, each of the N workers in turn descends by pUCT to a leaf and applies
   virtual loss on its path, which steers the next workers elsewhere;
2. evaluate: ONE ``sampler.sample_and_value(states, n=K, stop="step")`` call expands every
   distinct non-terminal leaf of the wave (all workers, all trees: the widest batch the sampler
   can get) and values the same leaves with the value head, read from the pass that starts their
   sampling; a terminal leaf is valued by its dense reward, graded once on its first visit and
   cached on the node;
3. backup: each worker takes its virtual loss off its path and adds one visit and its leaf's
   value to every node on it, once.

Two workers that reach the same unexpanded leaf in one wave (always the case in the first wave,
when the root is the only leaf) expand it once and both back up its value: two simulations, one
expansion. M iterations are therefore M waves and N*M simulations per tree.

After M waves the trajectory is the max-visit path from the root (ties: higher Q, larger prior),
completed with one ``stop="answer"`` sample if it ends short of a terminal, graded, and emitted
with the behaviour log-probs the sampler recorded for every token. ``advantage`` is left ``None``:
the trainer uses the value baseline ``A_t = r - sg(V_old(s_t))``.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tsd.envs.countdown import CountdownEnv, Problem
from tsd.rl.trajectory import Trajectory
from tsd.rollouts.base import Rollout, RolloutOutput, encode_prompt, grade
from tsd.rollouts.tree import Node, SearchTree
from tsd.samplers.base import Continuation, Sampler


def _int_at_least(owner: str, name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}.{name}: must be an integer >= {low}, got {value!r}")
    return value


def _float_in(owner: str, name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        rng = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{owner}.{name}: must be a number {rng}, got {value!r}")
    return float(value)


@dataclass
class SearchCounters:
    """What one :meth:`MCTSRollout.run` did, for ``search/*`` statistics."""

    waves: int = 0
    simulations: int = 0
    terminal_evaluations: int = 0
    grades: int = 0
    expansions: int = 0
    sample_calls: int = 0
    value_calls: int = 0
    search_tokens: int = 0
    completion_tokens: int = 0
    #: rows (state x continuation) of each search ``sample`` call
    sample_widths: list[int] = field(default_factory=list)


class MCTSRollout(Rollout):
    """Parallel MCTS over reasoning steps; one trajectory per problem."""

    name = "mcts"

    def __init__(
        self,
        workers: int = 16,
        completions_per_node: int = 4,
        iterations: int = 100,
        c_puct: float = 0.5,
        virtual_loss: float = 1.0,
        unvisited_value: float = 0.0,
        max_step_tokens: int = 64,
        max_depth: int = 12,
        max_new_tokens: int = 256,
        temperature: float | None = None,
        seed: int = 0,
        record_trees: bool = False,
    ) -> None:
        """
        Args:
            workers: N, workers sharing one tree, each selecting one leaf per wave (article: 16).
            completions_per_node: K, continuations sampled to expand a leaf (article: 4).
            iterations: M, waves per tree; N*M simulations per tree (article: 100).
            c_puct: exploration weight of pUCT (article: 0.5).
            virtual_loss: added to N and taken off W along a selected path until its backup
                (article: 1); 0 turns it off (then a wave's workers all follow one path).
            unvisited_value: Q of a child never visited, in [-1, 1] (article: 0).
            max_step_tokens: token cap of one step; a step that does not close by then ends the
                branch (terminal, finish ``length``) and is graded as it stands.
            max_depth: steps from the root after which a node is terminal.
            max_new_tokens: token cap of the whole completion (search + final completion).
            temperature: informational only: the sampler's temperature is what samples; a
                mismatch warns.
            seed: recorded for the run's provenance. The search itself draws no random numbers
                (ties break by prior, then index), so the tree is a function of the sampler's
                outputs: seed the sampler for a reproducible tree.
            record_trees: keep the last run's trees in :attr:`trees` (``tree.to_dict()`` exports).
        """
        o = "MCTSRollout"
        self.workers = _int_at_least(o, "workers", workers, 1)
        self.completions_per_node = _int_at_least(o, "completions_per_node", completions_per_node, 1)
        self.iterations = _int_at_least(o, "iterations", iterations, 1)
        self.c_puct = _float_in(o, "c_puct", c_puct, 0.0)
        self.virtual_loss = _float_in(o, "virtual_loss", virtual_loss, 0.0)
        self.unvisited_value = _float_in(o, "unvisited_value", unvisited_value, -1.0, 1.0)
        self.max_step_tokens = _int_at_least(o, "max_step_tokens", max_step_tokens, 1)
        self.max_depth = _int_at_least(o, "max_depth", max_depth, 1)
        self.max_new_tokens = _int_at_least(o, "max_new_tokens", max_new_tokens, 1)
        if temperature is not None and (
            isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0
        ):
            raise ValueError(f"{o}.temperature: must be None or a number >= 0, got {temperature!r}")
        self.temperature = None if temperature is None else float(temperature)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"{o}.seed: must be an integer, got {seed!r}")
        self.seed = seed
        if not isinstance(record_trees, bool):
            raise ValueError(f"{o}.record_trees: must be True or False, got {record_trees!r}")
        self.record_trees = record_trees
        #: the last run's trees (only with ``record_trees``), in problem order
        self.trees: list[SearchTree] = []

    # ------------------------------------------------------------------ public API
    def run(
        self,
        problems: Sequence[Problem],
        sampler: Sampler,
        env: CountdownEnv,
        *,
        on_wave: Callable[[int, list[SearchTree], SearchCounters], None] | None = None,
    ) -> RolloutOutput:
        """Search every problem's tree in shared waves, then emit one trajectory per problem.
        ``on_wave(wave_index, trees, counters)`` is called after each wave (progress printing)."""
        if not problems:
            return RolloutOutput([], {}, 0)
        if self.temperature is not None and abs(self.temperature - float(sampler.temperature)) > 1e-9:
            warnings.warn(
                f"MCTSRollout.temperature={self.temperature} is informational; the sampler samples at "
                f"{sampler.temperature}",
                stacklevel=2,
            )
        tok: Any = sampler.tokenizer
        version = sampler.version
        c = SearchCounters()
        trees = [self.new_tree(encode_prompt(env, p, tok)) for p in problems]
        if self.record_trees:
            for t in trees:
                t.decode = lambda ids: tok.decode(ids, skip_special_tokens=False)

        def grade_node(i: int, node: Node) -> None:
            if node.reward is None:  # once per node, on its first visit
                s = grade(env, problems[i], tok, node.completion_ids())
                node.reward, node.correct = float(s.dense), bool(s.correct)
                c.grades += 1

        for w in range(self.iterations):
            self.wave(trees, sampler, grade_node, c)
            if on_wave is not None:
                on_wave(w, trees, c)

        trajectories = self._finish(problems, trees, sampler, env, grade_node, c, version)
        if sampler.version != version:  # a trajectory must come from one set of weights
            raise RuntimeError(
                f"MCTSRollout: the sampler's weights changed during the search (version {version} -> "
                f"{sampler.version}); load weights between rollouts"
            )
        self.trees = trees if self.record_trees else []
        return RolloutOutput(
            trajectories,
            self._stats(problems, trees, trajectories, c),
            generated_tokens=c.search_tokens + c.completion_tokens,
        )

    def new_tree(self, prompt_ids: Sequence[int]) -> SearchTree:
        return SearchTree(
            prompt_ids,
            c_puct=self.c_puct,
            virtual_loss=self.virtual_loss,
            unvisited_value=self.unvisited_value,
            max_depth=self.max_depth,
            max_tokens=self.max_new_tokens,
        )

    def wave(
        self,
        trees: Sequence[SearchTree],
        sampler: Sampler,
        grade_node: Callable[[int, Node], None],
        counters: SearchCounters,
    ) -> None:
        """One iteration of every worker on every tree: select (with virtual loss), expand and
        value all distinct new leaves in one ``sample`` and one ``value`` call, back up."""
        c = counters
        selections: list[tuple[int, list[Node]]] = []
        for i, tree in enumerate(trees):
            for _ in range(self.workers):
                selections.append((i, tree.select_leaf()))

        # distinct non-terminal leaves, first-selected order (deterministic); terminals graded
        pending: dict[tuple[int, int], tuple[int, Node]] = {}
        for i, path in selections:
            leaf = path[-1]
            if leaf.terminal:
                grade_node(i, leaf)
                c.terminal_evaluations += 1
            else:
                pending.setdefault((i, leaf.id), (i, leaf))
        if pending:
            leaves = list(pending.values())
            states = [trees[i].prompt_ids + leaf.completion_ids() for i, leaf in leaves]
            budget = max(self.max_new_tokens - leaf.num_tokens for _, leaf in leaves)
            outs, values = sampler.sample_and_value(
                states,
                n=self.completions_per_node,
                max_new_tokens=min(self.max_step_tokens, budget),
                stop="step",
            )
            c.sample_calls += 1
            c.value_calls += 1
            c.sample_widths.append(len(states) * self.completions_per_node)
            for (i, leaf), conts, v in zip(leaves, outs, values):
                c.search_tokens += sum(len(x.token_ids) for x in conts)
                leaf.value_estimate = min(1.0, max(-1.0, float(v)))
                trees[i].expand(leaf, conts)
                c.expansions += 1

        for i, path in selections:
            leaf = path[-1]
            value = leaf.reward if leaf.terminal else leaf.value_estimate
            assert value is not None  # graded or valued above
            trees[i].backup(path, value)
            c.simulations += 1
        c.waves += 1

    # ------------------------------------------------------------------ trajectory selection
    def _finish(
        self,
        problems: Sequence[Problem],
        trees: Sequence[SearchTree],
        sampler: Sampler,
        env: CountdownEnv,
        grade_node: Callable[[int, Node], None],
        c: SearchCounters,
        version: int,
    ) -> list[Trajectory]:
        tok = sampler.tokenizer
        paths = [t.choose_path() for t in trees]
        # complete every chosen path that stops short of a terminal, in one sample call
        todo = [i for i, p in enumerate(paths) if not p[-1].terminal]
        completions: dict[int, Continuation] = {}
        if todo:
            budgets = [self.max_new_tokens - paths[i][-1].num_tokens for i in todo]
            states = [trees[i].prompt_ids + paths[i][-1].completion_ids() for i in todo]
            outs = sampler.sample(states, n=1, max_new_tokens=max(budgets), stop="answer")
            for i, b, out in zip(todo, budgets, outs):
                x = out[0]
                c.completion_tokens += len(x.token_ids)
                if len(x.token_ids) > b:  # same cut as in expansion: the prefix's log-probs stand
                    x = Continuation(x.token_ids[:b], x.logprobs[:b], "length")
                completions[i] = x

        trajectories = []
        for i, (problem, tree, path) in enumerate(zip(problems, trees, paths)):
            last = path[-1]
            ids, lps = last.completion_ids(), last.completion_logprobs()
            reward: float | None
            correct: bool | None
            finish: str | None
            if i in completions:
                x = completions[i]
                ids, lps = ids + list(x.token_ids), lps + list(x.logprobs)
                s = grade(env, problem, tok, ids)
                c.grades += 1
                reward, correct, finish = float(s.dense), bool(s.correct), x.finish_reason
            else:
                grade_node(i, last)  # cached unless the chosen terminal was never visited
                reward, correct, finish = last.reward, last.correct, last.terminal_reason
            assert reward is not None and correct is not None
            root = tree.root
            trajectories.append(
                Trajectory(
                    problem_id=problem.id,
                    prompt_ids=list(tree.prompt_ids),
                    completion_ids=ids,
                    behaviour_logprobs=[float(v) for v in lps],
                    reward=reward,
                    correct=correct,
                    policy_version=version,
                    rollout=self.name,
                    advantage=None,
                    finish_reason=str(finish),
                    stats={
                        "search/tree_size": float(len(tree.nodes)),
                        "search/chosen_depth": float(last.depth),
                        "search/chosen_visits": float(last.visits),
                        "search/chosen_q": last.q(self.unvisited_value),
                        "search/root_q": root.q(self.unvisited_value),
                        "search/completed": float(i in completions),
                    },
                )
            )
        return trajectories

    def _stats(
        self,
        problems: Sequence[Problem],
        trees: Sequence[SearchTree],
        trajectories: Sequence[Trajectory],
        c: SearchCounters,
    ) -> dict[str, float]:
        n = len(problems)
        widths = [w for t in trees for w in t.expansion_widths]
        return {
            "rollout/reward_mean": statistics.fmean(t.reward for t in trajectories),
            "rollout/correct_mean": statistics.fmean(float(t.correct) for t in trajectories),
            "search/tree_size": statistics.fmean(len(t.nodes) for t in trees),
            "search/chosen_depth": statistics.fmean(len(t.chosen) - 1 for t in trees),
            "search/distinct_children_per_expansion": statistics.fmean(widths) if widths else 0.0,
            "search/root_visit_entropy": statistics.fmean(t.root_visit_entropy() for t in trees),
            "search/root_prior_visit_kl": statistics.fmean(t.root_prior_visit_kl() for t in trees),
            # per simulation: the share of leaves that were terminal (graded, not value-headed)
            "search/terminal_fraction": c.terminal_evaluations / max(1, c.simulations),
            "search/chosen_reward": statistics.fmean(t.reward for t in trajectories),
            "search/chosen_completed_fraction": statistics.fmean(
                t.stats["search/completed"] for t in trajectories
            ),
            "search/waves": float(c.waves),
            "search/simulations_per_problem": c.simulations / n,
            "search/sampler_tokens_per_problem": (c.search_tokens + c.completion_tokens) / n,
            "search/grades_per_problem": c.grades / n,
        }
