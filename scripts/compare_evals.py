"""Paired comparison of two ``eval.py`` results on the same test problems.

    python scripts/compare_evals.py BASE/results.json RUN/results.json [RUN2/results.json ...]

Each ``results.json`` holds the number of correct samples out of k for every problem
(``per_problem_correct``). The difference of mean@k between two policies is estimated on the
problems both evaluated, with the standard error of the *paired* per-problem differences: problem
difficulty is shared, so this is much tighter than comparing two independent error bars. The
interval is a normal-approximation 95% CI (the 820-problem mean of bounded differences); it says
how sure the *evaluation* is, not how much a second training seed would vary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tsd.eval.paired import paired_difference


def load(path: Path) -> tuple[dict[str, int], int]:
    """``(problem id -> correct count, k)`` from an ``eval.py`` results.json."""
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read an eval.py results.json ({e})") from None
    per = res.get("per_problem_correct")
    k = res.get("samples_per_problem")
    if not isinstance(per, dict) or not isinstance(k, int) or k < 1:
        raise SystemExit(f"{path}: no per_problem_correct / samples_per_problem (written by eval.py)")
    if not all(isinstance(v, int) and 0 <= v <= k for v in per.values()):
        raise SystemExit(f"{path}: per_problem_correct must hold integers in [0, {k}]")
    return per, k


def paired(base: dict[str, int], kb: int, run: dict[str, int], kr: int) -> dict:
    """mean@k of both on their common problems, the difference, its paired SE and 95% CI."""
    common = sorted(set(base) & set(run))
    if len(common) < 2:
        raise SystemExit(f"only {len(common)} problems in common: nothing to compare")
    return paired_difference([base[p] / kb for p in common], [run[p] / kr for p in common])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="results.json of the reference policy (e.g. the bundled one)")
    ap.add_argument("runs", type=Path, nargs="+", help="results.json of the policies to compare with it")
    args = ap.parse_args(argv)
    base, kb = load(args.base)
    print(
        f"{'run':<40} {'problems':>8} {'base':>7} {'run':>7} {'diff':>7} {'se':>6} {'95% CI':>17} {'z':>5}  +/-"
    )
    for path in args.runs:
        run, kr = load(path)
        c = paired(base, kb, run, kr)
        name = str(path.parent.name or path)[:40]
        lo, hi = c["ci95"]
        print(
            f"{name:<40} {c['problems']:>8} {100 * c['base']:>6.2f}% {100 * c['run']:>6.2f}% "
            f"{100 * c['diff']:>+6.2f}pp {100 * c['se']:>5.2f} [{100 * lo:>+6.2f}, {100 * hi:>+6.2f}] "
            f"{c['z']:>5.1f}  {c['better']}/{c['worse']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
