"""Screening branching designs against i.i.d. sampling at equal generated tokens, on frozen policies,
before any RL (DESIGN.md "Branching where it pays"; docs/branching.md).

    python scripts/screen_branching.py                 # the CLI: table, JSON, figure

A *design* is a tree-emitting rollout config written as Hydra overrides of ``configs/train.yaml``
(exactly what ``python train.py <overrides>`` would run: the tree arm's pUCT search, the Gumbel
root, EPTree forks, adaptive allocation). It runs on held problems with a freshly seeded sampler
over one policy, in batches as in training, and keeps its trees. Its i.i.d. baseline is a group of
whole samples **of the same generated tokens on the same problem**: every problem has one pool of
i.i.d. samples (drawn once per policy, shared by every design), and the group is the pool's first
``k`` samples whose tokens are nearest the design's tokens on that problem. Per problem, for the
design's tree and for its matched group:

- ``solved``: a correct answer among the leaves (the graded answers);
- ``mixed``: the leaves disagree on correctness (a group whose rewards are not all equal in the
  sparse reward: it carries a correct-vs-wrong signal);
- ``bp_mixed`` / ``bp_nondegenerate``: the share of the branch points (nodes with two or more
  children that have graded answers below) whose children differ in the share of correct answers
  below them / in the mean dense reward below them (``V(child)``). A group of i.i.d. samples has one
  branch point, the root, with the samples as its children;
- ``distinct_correct``: distinct correct answer expressions (the text between ``<answer>`` tags);
- ``leaves`` and ``tokens``: graded answers and generated tokens (``leaves_per_1k``: per 1,000 tokens);
- ``trained_tokens`` and ``nonzero_tokens``: the completion tokens the emission trains (a shared step
  once per path through it, as the trainer sees them) and those whose advantage is not 0 (the
  design's own emission, TreeRL's by default; for the group, CISPO's group-normalised advantage
  ``(r - mean) / std`` on the dense reward).

Compared per problem with :func:`tsd.eval.paired.paired_difference` (design - matched group, 95%
interval). Yields per token (``mixed`` and ``solved`` problems per 10k tokens, what a step's batch
buys when its budget is tokens) are ratios of sums: their intervals are bootstrap intervals over
problems. Fixed groups of 4, 8 and 16 samples (CISPO's shapes) are reported beside the designs.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tsd.config import ConfigError, build
from tsd.envs.base import Env, Problem
from tsd.eval.paired import paired_difference
from tsd.eval.search_efficiency import compose_rollout_config
from tsd.rollouts.base import decode_completion, encode_prompt
from tsd.rollouts.tree import SearchTree
from tsd.rollouts.tree_targets import TreePaths, graded_terminals, subtree_values
from tsd.samplers.base import Sampler

#: per-problem figures of a design's tree or of a group (same keys for both)
PER_PROBLEM = (
    "tokens",
    "leaves",
    "solved",
    "mixed",
    "bp_mixed",
    "bp_nondegenerate",
    "distinct_correct",
    "trained_tokens",
    "nonzero_tokens",
)
#: what the paired table compares (design - matched i.i.d. group)
PAIRED = (
    "solved",
    "mixed",
    "bp_mixed",
    "bp_nondegenerate",
    "distinct_correct",
    "leaves_per_1k",
    "nonzero_share",
)
#: fixed i.i.d. groups reported beside the designs (CISPO's group sizes)
FIXED_GROUPS = (4, 8, 16)

TREE = ["experiment=tree_countdown"]
EPTREE = ["experiment=eptree_countdown"]
#: the designs screened by default: label -> overrides of configs/train.yaml
DESIGNS: dict[str, list[str]] = {
    "pUCT 4x4 (the tree arm)": [*TREE],
    "Gumbel root m=4, 4x4": ["experiment=gumbel_countdown"],
    "Gumbel root m=8, 4x4": ["experiment=gumbel_countdown", "rollout.root_actions=8"],
    # m = 16 at 16 simulations: every simulation below its own first step (halving never runs)
    "Gumbel root m=16, 4x4": ["experiment=gumbel_countdown", "rollout.root_actions=16"],
    "Gumbel root m=8, 2x8": ["experiment=gumbel_countdown", "rollout.root_actions=8", "rollout.workers=2",
                             "rollout.iterations=8"],
    "EPTree -log p, 8 chains + 2 forks": [*EPTREE],
    "EPTree entropy, 8 + 2": [*EPTREE, "rollout/forks=entropy"],
    "EPTree step starts, 8 + 2": [*EPTREE, "rollout/forks=step"],
    "EPTree -log p, 4 + 2 forks x 2 branches": [*EPTREE, "rollout.chains=4", "rollout.branches=2"],
    "EPTree -log p, 6 + 1, two rounds": [*EPTREE, "rollout.chains=6", "rollout.forks_per_chain=1", "rollout.rounds=2"],
    "EPTree -log p, 8 + 3 late (>= 16 tokens in)": [*EPTREE, "rollout.forks_per_chain=3", "rollout.min_prefix=16"],
    "adaptive: 8 + 2 on mixed or near-miss problems": [*EPTREE, "rollout/gate=mixed_or_near_miss"],
}  # fmt: skip

_ANSWER = re.compile(r"<answer>(.{0,200}?)</answer>", re.S)


def answer_of(text: str) -> str | None:
    """The answer expression (whitespace removed) between the first ``<answer>`` tags, bounded."""
    m = _ANSWER.search(text[:4096])
    return re.sub(r"\s+", "", m.group(1)) if m else None


@dataclass
class Design:
    label: str
    overrides: list[str]


@dataclass
class Sample:
    """One graded i.i.d. sample of the pool."""

    tokens: int
    dense: float
    correct: bool
    answer: str | None


# ---------------------------------------------------------------------------------------------- metrics
def _differ(xs: Sequence[float], eps: float = 1e-9) -> bool:
    return len(xs) >= 2 and max(xs) - min(xs) > eps


def tree_row(
    tree: SearchTree, emission: TreePaths, answer: Callable[[list[int]], str | None]
) -> dict[str, float]:
    """:data:`PER_PROBLEM` of one design's tree (its terminals graded; ``answer`` reads a
    completion's answer expression)."""
    ends = graded_terminals(tree)
    values = subtree_values(tree)
    correct_below = _correct_below(tree)
    mixed_bp = nondeg_bp = points = 0
    for node in tree.nodes:
        kids = [k for k in node.children if k.id in values]
        if len(kids) < 2:
            continue
        points += 1
        nondeg_bp += _differ([values[k.id].mean for k in kids])
        mixed_bp += _differ([correct_below[k.id] / values[k.id].count for k in kids])
    trained = nonzero = 0
    for target in emission(tree):
        adv = target.token_advantages()
        trained += len(adv)
        nonzero += sum(abs(a) > 1e-9 for a in adv)
    correct = [e for e in ends if e.correct]
    return {
        "tokens": float(tree.generated_tokens),
        "leaves": float(len(ends)),
        "solved": float(bool(correct)),
        "mixed": float(_differ([float(bool(e.correct)) for e in ends])),
        "bp_mixed": mixed_bp / points if points else 0.0,
        "bp_nondegenerate": nondeg_bp / points if points else 0.0,
        "distinct_correct": float(len({answer(e.completion_ids()) for e in correct})),
        "trained_tokens": float(trained),
        "nonzero_tokens": float(nonzero),
    }


def _correct_below(tree: SearchTree) -> dict[int, int]:
    """Correct graded terminals in each node's subtree (ids are topological: one pass up)."""
    out: dict[int, int] = {}
    for node in reversed(tree.nodes):
        if node.terminal and node.reward is not None:
            out[node.id] = out.get(node.id, 0) + int(bool(node.correct))
        if node.parent is not None and node.id in out:
            out[node.parent.id] = out.get(node.parent.id, 0) + out[node.id]
    return out


def group_row(samples: Sequence[Sample]) -> dict[str, float]:
    """:data:`PER_PROBLEM` of a group of i.i.d. samples (one branch point: the root)."""
    dense = [s.dense for s in samples]
    corr = [float(s.correct) for s in samples]
    mean = statistics.fmean(dense)
    sd = statistics.stdev(dense) if len(dense) > 1 else 0.0
    # CISPO's group-normalised advantage (r - mean) / (std + eps): 0 exactly where r == mean
    nonzero = sum(s.tokens for s in samples if sd > 0 and abs(s.dense - mean) > 1e-9)
    return {
        "tokens": float(sum(s.tokens for s in samples)),
        "leaves": float(len(samples)),
        "solved": float(any(s.correct for s in samples)),
        "mixed": float(_differ(corr)),
        "bp_mixed": float(_differ(corr)),
        "bp_nondegenerate": float(_differ(dense)),
        "distinct_correct": float(len({s.answer for s in samples if s.correct})),
        "trained_tokens": float(sum(s.tokens for s in samples)),
        "nonzero_tokens": float(nonzero),
    }


def matched_group(pool: Sequence[Sample], tokens: float) -> list[Sample]:
    """The pool's first ``k >= 1`` samples whose summed tokens are nearest ``tokens`` (ties: fewer)."""
    best_k, best_gap, total = 1, math.inf, 0
    for k, s in enumerate(pool, 1):
        total += s.tokens
        gap = abs(total - tokens)
        if gap < best_gap:
            best_k, best_gap = k, gap
        if total > tokens:
            break
    return list(pool[:best_k])


# ---------------------------------------------------------------------------------------------- running
def sample_pool(
    problems: Sequence[Problem],
    sampler: Sampler,
    env: Env,
    n: int,
    batch: int,
    max_new_tokens: int = 128,
    progress: Callable[[str], None] | None = None,
) -> list[list[Sample]]:
    """``n`` i.i.d. whole samples per problem (``stop="answer"``), graded."""
    tok = sampler.tokenizer
    pool: list[list[Sample]] = []
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        prompts = [encode_prompt(env, p, tok) for p in chunk]
        outs = sampler.sample(prompts, n=n, max_new_tokens=max_new_tokens, stop="answer")
        for p, conts in zip(chunk, outs):
            row = []
            for c in conts:
                text = decode_completion(tok, c.token_ids)
                s = env.score(text, p)
                row.append(Sample(len(c.token_ids), float(s.dense), bool(s.correct), answer_of(text)))
            pool.append(row)
        if progress is not None:
            progress(f"i.i.d. pool ({n} per problem): {len(pool)}/{len(problems)} problems")
    return pool


def run_design(
    design: Design,
    problems: Sequence[Problem],
    env: Env,
    make_sampler: Callable[[object], Sampler],
    batch: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per-problem :data:`PER_PROBLEM` of ``design``'s trees, and its rollout statistics (mean
    over batches)."""
    cfg = compose_rollout_config(design.overrides)
    rollout = build(cfg.rollout, f"{design.label}: rollout", record_trees=True)
    emission = getattr(rollout, "emission", None)
    if not isinstance(emission, TreePaths):
        raise ConfigError(f"{design.label}: the screening needs a tree emission (rollout/emission=tree)")
    sampler = make_sampler(cfg)
    tok = sampler.tokenizer

    def answer(ids: list[int]) -> str | None:
        return answer_of(decode_completion(tok, ids))

    rows: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    calls = 0
    t0 = time.perf_counter()
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        out = rollout.run(chunk, sampler, env)
        trees = rollout.trees
        if len(trees) != len(chunk):
            raise RuntimeError(f"{design.label}: {len(trees)} trees for {len(chunk)} problems")
        rows += [tree_row(t, emission, answer) for t in trees]
        for k, v in out.stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        calls += 1
        if progress is not None:
            progress(f"{design.label}: {len(rows)}/{len(problems)} problems, {time.perf_counter() - t0:.0f}s")
    return rows, {k: v / calls for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------- summaries
def derived(row: dict[str, float]) -> dict[str, float]:
    """A row with the per-problem ratios: leaves per 1k tokens and the non-zero-advantage share."""
    return {
        **row,
        "leaves_per_1k": 1000.0 * row["leaves"] / max(1.0, row["tokens"]),
        "nonzero_share": row["nonzero_tokens"] / row["trained_tokens"] if row["trained_tokens"] else 0.0,
    }


def rate(rows: Sequence[dict[str, float]], key: str, per: float = 1e4) -> float:
    """``key`` per ``per`` generated tokens over all problems (a ratio of sums)."""
    return per * sum(r[key] for r in rows) / max(1.0, sum(r["tokens"] for r in rows))


def bootstrap_rate_diff(
    rows: Sequence[dict[str, float]],
    base: Sequence[dict[str, float]] | None,
    key: str,
    draws: int = 2000,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """``rate(rows) - rate(base)`` (or ``rate(rows)`` without a base) and its 95% bootstrap interval,
    the problems resampled together (paired)."""
    rng = random.Random(seed)
    n = len(rows)
    point = rate(rows, key) - (rate(base, key) if base is not None else 0.0)
    stats = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        r = rate([rows[i] for i in idx], key)
        if base is not None:
            r -= rate([base[i] for i in idx], key)
        stats.append(r)
    stats.sort()
    return point, (stats[int(0.025 * draws)], stats[int(0.975 * draws) - 1])


def summarise(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Means of the per-problem figures and the yields per 10k tokens."""
    d = [derived(r) for r in rows]
    out = {k: statistics.fmean(r[k] for r in d) for k in (*PER_PROBLEM, "leaves_per_1k")}
    out["nonzero_share"] = sum(r["nonzero_tokens"] for r in d) / max(1.0, sum(r["trained_tokens"] for r in d))
    out["mixed_per_10k"] = rate(d, "mixed")
    out["solved_per_10k"] = rate(d, "solved")
    return out


def compare(rows: Sequence[dict[str, float]], base: Sequence[dict[str, float]]) -> dict[str, dict]:
    """Paired differences (design - base) of :data:`PAIRED` and the bootstrap differences of the
    yields per 10k tokens; ``token_ratio``: the design's tokens over the base's."""
    d, b = [derived(r) for r in rows], [derived(r) for r in base]
    out: dict[str, dict] = {}
    for key in PAIRED:
        p = paired_difference([x[key] for x in b], [x[key] for x in d])
        out[key] = {"diff": p["diff"], "ci95": p["ci95"], "base": p["base"], "run": p["run"]}
    for key in ("mixed", "solved"):
        diff, ci = bootstrap_rate_diff(d, b, key)
        out[f"{key}_per_10k"] = {"diff": diff, "ci95": ci, "base": rate(b, key), "run": rate(d, key)}
    out["token_ratio"] = {"value": sum(x["tokens"] for x in d) / max(1.0, sum(x["tokens"] for x in b))}
    return out


def verdict(c: dict[str, dict]) -> str:
    """Whether a design beats its matched i.i.d. group: the paired interval of ``solved`` or of
    ``mixed`` above 0 (the issue's test: more problems with a correct answer, or more
    non-degenerate groups, at equal tokens)."""
    wins = [k for k in ("solved", "mixed") if c[k]["ci95"][0] > 0]
    losses = [k for k in ("solved", "mixed") if c[k]["ci95"][1] < 0]
    if wins:
        return (
            "beats i.i.d. on " + " and ".join(wins) + (f" (worse on {', '.join(losses)})" if losses else "")
        )
    return ("worse on " + " and ".join(losses)) if losses else "no difference"
