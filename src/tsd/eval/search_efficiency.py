"""Target quality against compute: what a rollout's trajectories are worth per generated token.

    python scripts/search_efficiency.py            # the CLI, the table and the picture

A *method* is a rollout config written as Hydra overrides of ``configs/train.yaml`` (so it is
exactly what ``python train.py <overrides>`` would search with; ``scripts/search_efficiency.py``
starts every method from ``experiment=mcts_countdown``, the search emitting one path per problem), run on held problems with a
freshly seeded sampler over one policy. For every problem it records what the trainer would be
sent and what it cost:

- ``correct``: the emitted trajectory is correct (sparse reward), ``reward`` its dense reward;
- ``found``: a correct answer was generated anywhere (any of best-of-N's samples, any terminal of
  the tree, the completion of the chosen path);
- ``distinct``: distinct complete trajectories generated;
- ``tokens``: every token the sampler generated for the problem (search, rollouts, completion).

and for the method as a whole, the tokens it ran through the model to start sampling
(``prefill_tokens``: prompts and paths, :attr:`~tsd.samplers.base.Sampler.prefill_tokens`), so
that a search that re-reads long paths is not flattered by counting only what it generated:
``prefill + generated`` tokens is the compute axis proportional to FLOPs (every token run through
the model costs about the same there), and wall and CPU seconds are kept beside it.

The comparison is at equal compute: each method's point is (tokens per problem, share correct),
and two methods are compared with the paired per-problem difference on the same problems
(:func:`tsd.eval.paired.paired_difference`), reported with its 95% interval.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tsd.config import build, config_dir
from tsd.envs.base import Env, Problem
from tsd.eval.paired import paired_difference
from tsd.rollouts.base import PROBLEM_STAT_KEYS
from tsd.samplers.base import Sampler

PER_PROBLEM = ("correct", "reward", "found", "distinct", "tokens")


#: the article's search as Hydra overrides of the laptop default (configs/rollout/mcts.yaml):
#: value-head leaves, K=4 samples per expansion, no widening, c_puct 0.5, the max-visit path
#: (experiment=mcts_countdown_paper pins the same values at the article's scale)
ARTICLE_SEARCH: tuple[str, ...] = (
    "rollout/selection=max_visit",
    "rollout.c_puct=0.5",
    "rollout.rollout_mix=0",
    "rollout.unseen_as_child=false",
    "rollout.without_replacement=false",
    "rollout.min_unseen_mass=0",
    "rollout.skip_exhausted=false",
    "rollout.completions_per_node=4",
    "rollout.widening_alpha=0",
    "rollout.prior_temperature=1",
)


@dataclass
class Method:
    """One point of a curve: ``family`` names the curve, ``overrides`` the rollout config."""

    family: str
    label: str
    overrides: list[str]


@dataclass
class MethodResult:
    method: Method
    #: per-problem arrays, same problem order for every method: see :data:`PER_PROBLEM`
    per_problem: dict[str, list[float]]
    wall_s: float
    #: the rollout's own statistics, averaged over its calls (``search/*`` for MCTS)
    stats: dict[str, float] = field(default_factory=dict)
    #: state tokens the sampler ran through the model to start sampling, all problems together
    prefill_tokens: float = 0.0
    #: CPU seconds of the measuring process (what a loaded machine distorts least)
    cpu_s: float = float("nan")

    def mean(self, key: str) -> float:
        return statistics.fmean(self.per_problem[key])

    def summary(self) -> dict:
        n = len(self.per_problem["correct"])
        share = self.mean("correct")
        se = statistics.stdev(self.per_problem["correct"]) / n**0.5 if n > 1 else 0.0
        return {
            "family": self.method.family,
            "label": self.method.label,
            "overrides": self.method.overrides,
            "problems": n,
            "tokens_per_problem": self.mean("tokens"),
            "correct_share": share,
            "correct_ci95": (share - 1.96 * se, share + 1.96 * se),
            "reward_mean": self.mean("reward"),
            "found_share": self.mean("found"),
            "distinct_per_problem": self.mean("distinct"),
            "prefill_tokens_per_problem": self.prefill_tokens / n,
            # every token run through the model (prefill + generated): proportional to FLOPs
            "processed_tokens_per_problem": self.prefill_tokens / n + self.mean("tokens"),
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "stats": self.stats,
        }


def compose_rollout_config(overrides: Sequence[str], config_path: str | None = None) -> DictConfig:
    """``configs/train.yaml`` composed with ``overrides``: the run a ``train.py`` call would make."""
    with initialize_config_dir(config_dir=config_path or config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def measure(
    method: Method,
    problems: Sequence[Problem],
    env: Env,
    make_sampler: Callable[[DictConfig], Sampler],
    batch: int,
    progress: Callable[[str], None] | None = None,
) -> MethodResult:
    """Run ``method``'s rollout over ``problems`` in batches of ``batch`` (MCTS shares each wave
    across a batch's trees, as in training) with the sampler ``make_sampler(cfg)`` builds."""
    cfg = compose_rollout_config(method.overrides)
    rollout = build(cfg.rollout, "rollout")
    sampler = make_sampler(cfg)
    per: dict[str, list[float]] = {k: [] for k in PER_PROBLEM}
    sums: dict[str, float] = {}
    calls = 0
    prefill0 = sampler.prefill_tokens
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        out = rollout.run(chunk, sampler, env)
        if len(out.trajectories) != len(chunk):
            raise RuntimeError(
                f"{method.label}: {len(out.trajectories)} trajectories for {len(chunk)} problems"
            )
        for t in out.trajectories:
            missing = [k for k in PROBLEM_STAT_KEYS if k not in t.stats]
            if missing:
                raise RuntimeError(f"{method.label}: the rollout does not report {missing} per problem")
            tokens, found, distinct = (t.stats[k] for k in PROBLEM_STAT_KEYS)
            per["correct"].append(float(t.correct))
            per["reward"].append(float(t.reward))
            per["found"].append(found)
            per["distinct"].append(distinct)
            per["tokens"].append(tokens)
        for k, v in out.stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        calls += 1
        if progress is not None:
            progress(f"{method.label}: {min(start + batch, len(problems))}/{len(problems)} problems")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return MethodResult(
        method, per, wall, {k: v / calls for k, v in sums.items()}, sampler.prefill_tokens - prefill0, cpu
    )


def nearest_in_tokens(result: MethodResult, candidates: Sequence[MethodResult]) -> MethodResult:
    """The candidate whose tokens per problem are closest to ``result``'s (on a log scale)."""
    t = result.mean("tokens")
    return min(candidates, key=lambda c: abs(math.log(max(c.mean("tokens"), 1e-9) / max(t, 1e-9))))


def compare(run: MethodResult, base: MethodResult) -> dict:
    """Paired difference of the correct share (run - base) on the same problems, and the token
    ratio: a comparison counts as at equal compute when the ratio is within 10%."""
    d = paired_difference(base.per_problem["correct"], run.per_problem["correct"])
    ratio = run.mean("tokens") / max(base.mean("tokens"), 1e-9)
    lo, hi = d["ci95"]
    verdict = "no difference" if lo <= 0 <= hi else ("better" if lo > 0 else "worse")
    return {
        "run": run.method.label,
        "base": base.method.label,
        "token_ratio": ratio,
        "equal_compute": abs(ratio - 1) <= 0.10,
        "diff": d["diff"],
        "ci95": d["ci95"],
        "verdict": verdict,
    }
