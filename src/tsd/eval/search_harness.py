"""The policy evaluated *with* a search harness, labelled by what the search was allowed to read.

    python eval.py search=mcts eval.num_problems=50          # search_oracle@1: the training search
    python eval.py search=mcts_value eval.num_problems=50    # search_value@1: no grader in the search

An MCTS search (:class:`~tsd.rollouts.mcts.MCTSRollout`) reads rewards in up to three places: a
terminal node is valued by its reward (always), a rollout leaf by the reward of the answer it
reached (``rollout_mix > 0``), and the ``best_terminal`` rule emits the best-rewarded answer. The
reward comes from the env's grader, which knows the target: a search that reads it at test time
is an oracle, and the share of problems its emitted answer solves is an oracle's accuracy, like
pass@k, not the policy's. It is reported as ``search_oracle@1``.

With ``search.graded: false`` the search gets :class:`TargetBlindEnv` instead: every answer it
reaches is worth 0 when well-formed and -1 when not (what the rules say without the target, the
format part of the dense reward), so no rule, leaf value or rollout can steer by correctness. Its
emitted answers are graded afterwards, by the real env, and the figure is ``search_value@1``; the
shipped ``search=mcts_value`` is the article's search (value-head leaves, the max-visit path),
which then steers by the policy's priors and its value head alone.

Either way ``results.json`` and the printed table say which rule chose the answer
(``search/selection``), how leaves were valued (``search/leaf_values``), how reached answers were
valued (``search/terminal_values``) and whether the search read graded rewards (``search/graded``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from tsd.config import ConfigError
from tsd.envs.base import Env, Problem, Score
from tsd.rollouts.base import Rollout, grade

ORACLE_KEY = "search_oracle@1"
VALUE_KEY = "search_value@1"


class TargetBlindEnv(Env):
    """``env`` as a search sees it when it must not know the answers: the same problems and
    prompts, and a score that says only whether a completion is well-formed by the env's rules
    (0.0, never correct) or not (-1.0, the env's reason). For Countdown, validity (the grammar, the
    numbers used, the bounds, positive integer steps) never reads the target:
    ``tests/test_countdown.py`` checks it on generated completions. The prompt states the target, as
    it must; only the grader's answer is withheld."""

    def __init__(self, env: Env) -> None:
        self.env = env

    @property
    def train(self) -> Sequence[Problem]:
        return self.env.train

    @property
    def val(self) -> Sequence[Problem]:
        return self.env.val

    @property
    def test(self) -> Sequence[Problem]:
        return self.env.test

    def render_prompt(self, problem: Problem, tokenizer: Any = None) -> str:
        return self.env.render_prompt(problem, tokenizer)

    def uses_chat_template(self, tokenizer: Any) -> bool:
        return self.env.uses_chat_template(tokenizer)

    def score(self, completion: str, problem: Problem) -> Score:
        s = self.env.score(completion, problem)
        return Score(dense=0.0 if s.valid else -1.0, correct=False, value=None, reason=s.reason)

    def describe(self, problem: Problem) -> str:
        return self.env.describe(problem)


def _rule_name(rule: Any) -> str:
    """``BestTerminal`` -> ``best_terminal``: the name ``rollout/selection=...`` takes."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(rule).__name__).lower()


def describe_search(rollout: Rollout, graded: bool) -> dict[str, Any]:
    """What the search read to choose its answer (the ``search/*`` labels of the results)."""
    mix = float(getattr(rollout, "rollout_mix", 0.0))
    reward = "the graded reward" if graded else "a target-blind format check (0 or -1)"
    if mix == 0:
        leaves = "value head"
    elif mix == 1:
        leaves = f"rollout to an answer, valued by {reward}"
    else:
        leaves = f"(1 - {mix:g}) * value head + {mix:g} * rollout to an answer, valued by {reward}"
    return {
        "search/selection": _rule_name(getattr(rollout, "selection", None)),
        "search/leaf_values": leaves,
        "search/terminal_values": reward,
        "search/graded": graded,
        "search/metric": ORACLE_KEY if graded else VALUE_KEY,
    }


def evaluate_search(
    rollout: Rollout,
    sampler: Any,
    env: Env,
    problems: Sequence[Problem],
    problems_per_batch: int = 8,
    graded: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``rollout`` on ``problems`` (with ``env``'s grader, or blind to it when not ``graded``),
    grade each emitted answer with ``env`` (sparse), and label the figure by what the search read:
    ``search_oracle@1`` or ``search_value@1`` (see the module's docstring)."""
    from tqdm.auto import tqdm

    search_env = env if graded else TargetBlindEnv(env)
    labels = describe_search(rollout, graded)
    key = labels["search/metric"]
    tok = sampler.tokenizer
    t0, correct, dense, tokens = time.perf_counter(), 0, 0.0, 0
    for i in tqdm(
        range(0, len(problems), problems_per_batch), desc="search", leave=False, disable=not progress
    ):
        batch = problems[i : i + problems_per_batch]
        out = rollout.run(batch, sampler, search_env)
        if len(out.trajectories) != len(batch):  # e.g. rollout/emission=tree: every answer's path
            raise ConfigError(
                f"search.rollout: {len(out.trajectories)} trajectories for {len(batch)} problems; the "
                "harness grades the one answer a search emits per problem (accepted: "
                "search.rollout.emission=null, one path per problem)"
            )
        for p, t in zip(batch, out.trajectories, strict=True):
            s = grade(env, p, tok, t.completion_ids)  # the real grade, after the search chose
            correct += s.correct
            dense += s.dense
        tokens += out.generated_tokens
    n = len(problems)
    return {
        key: correct / n,
        **labels,
        "search/dense_mean": dense / n,
        "search/generated_tokens": tokens,
        "search/seconds": time.perf_counter() - t0,
    }
