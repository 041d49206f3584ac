"""Paired comparison of two methods scored on the same problems.

Problem difficulty is shared by both methods, so the standard error of the per-problem
*differences* is much tighter than two independent error bars. The interval is the normal
approximation ``mean(d) +- 1.96 * sd(d) / sqrt(n)``: it says how sure the measurement on these
problems is, not how much another seed of a whole training run would vary; :func:`with_seed_noise`
adds that where each method has several seeds. A difference whose interval contains 0 is reported
as no difference.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence


def paired_difference(base: Sequence[float], run: Sequence[float]) -> dict:
    """Means of both, ``run - base``, its paired standard error, 95% CI, z, and how many problems
    ``run`` scored higher / lower on. ``base[i]`` and ``run[i]`` are the same problem's scores."""
    if len(base) != len(run):
        raise ValueError(f"paired_difference: {len(base)} base scores but {len(run)} run scores")
    if len(base) < 2:
        raise ValueError(f"paired_difference: needs at least 2 problems, got {len(base)}")
    d = [y - x for x, y in zip(base, run)]
    mean_d = statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(len(d))
    return {
        "problems": len(d),
        "base": statistics.fmean(base),
        "run": statistics.fmean(run),
        "diff": mean_d,
        "se": se,
        "ci95": (mean_d - 1.96 * se, mean_d + 1.96 * se),
        "z": mean_d / se if se > 0 else math.copysign(math.inf, mean_d) if mean_d else 0.0,
        "better": sum(y > x for x, y in zip(base, run)),
        "worse": sum(y < x for x, y in zip(base, run)),
    }


def paired_by_id(base: Mapping[str, float], run: Mapping[str, float]) -> dict:
    """:func:`paired_difference` of two evaluations' per-problem scores (problem id -> score),
    matched by problem id, not by the order the ids happen to be stored in. Two evaluations that
    did not score the same problems are refused (``ValueError`` naming a few ids of each side): a
    pairing over part of them would compare a method with another on problems of its choosing."""
    only_base, only_run = sorted(set(base) - set(run)), sorted(set(run) - set(base))
    if only_base or only_run:
        raise ValueError(
            f"paired_by_id: the two evaluations scored different problems: {len(only_base)} ids only in"
            f" the first {only_base[:3]}, {len(only_run)} only in the second {only_run[:3]};"
            " evaluate both on the same problems"
        )
    ids = sorted(base)
    return paired_difference([base[i] for i in ids], [run[i] for i in ids])


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile (``0.5 < p < 1``, ``df >= 1``): bisection on the CDF, the density
    integrated by Simpson's rule (the standard library has no incomplete beta function; accurate to
    about 1e-6 here, plenty for an interval's width)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: p must be in (0.5, 1) and df >= 1, got p={p}, df={df}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 400) -> float:
        f = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731
        h = x / n
        s = f(0) + f(x) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def with_seed_noise(
    base: Sequence[Mapping[str, float]],
    run: Sequence[Mapping[str, float]],
    base_fixed: bool = False,
    run_fixed: bool = False,
) -> dict | None:
    """``run - base`` for two methods each trained with several seeds (one per-problem evaluation
    per seed, problem id -> score), with an interval that counts both what :func:`paired_by_id`
    counts (which problems were drawn) and how much another training seed would move each method.

    The difference is that of the seed-averaged scores. Its variance is the paired one over problems
    plus each side's between-seed variance of its mean score over a seed count (``s^2 / n``); the
    interval is a t interval at the Welch-Satterthwaite degrees of freedom, so 2-3 seeds give a wide
    one. The between-seed variance also holds each seed's sampling noise, which the problem term
    counts too: the interval is a little conservative. A side marked ``fixed`` (the untrained base)
    has no seed term; None when a trained side has fewer than 2 seeds (its seed noise is unknown)."""
    sides = []
    for evals, fixed in ((base, base_fixed), (run, run_fixed)):
        if not evals or (len(evals) < 2 and not fixed):
            return None
        means = [statistics.fmean(e.values()) for e in evals]
        sides.append(
            (0.0, 1) if fixed or len(evals) < 2 else (statistics.variance(means) / len(evals), len(evals) - 1)
        )
    avg = [{i: statistics.fmean(e[i] for e in evals) for i in evals[0]} for evals in (base, run)]
    d = paired_by_id(avg[0], avg[1])
    parts = [(d["se"] ** 2, d["problems"] - 1), *sides]
    var = sum(v for v, _ in parts)
    if var == 0:
        return {
            **d,
            "se": 0.0,
            "df": math.inf,
            "ci95": (d["diff"], d["diff"]),
            "seeds": (len(base), len(run)),
        }
    df = var**2 / sum(v * v / k for v, k in parts if v > 0)
    half = t_quantile(0.975, max(df, 1.0)) * math.sqrt(var)
    return {
        **d,
        "se": math.sqrt(var),
        "df": df,
        "ci95": (d["diff"] - half, d["diff"] + half),
        "seeds": (len(base), len(run)),
    }
