"""Paired comparison of two methods scored on the same problems.

Problem difficulty is shared by both methods, so the standard error of the per-problem
*differences* is much tighter than two independent error bars. The interval is the normal
approximation ``mean(d) +- 1.96 * sd(d) / sqrt(n)``: it says how sure the measurement on these
problems is, not how much another seed of a whole training run would vary. A difference whose
interval contains 0 is reported as no difference.
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
