"""Seed-averaged paired comparison of training arms on the same test problems (the study's rule).

    python scripts/compare_arms.py --arm cispo E/cispo_s0/results.json E/cispo_s1/results.json ... \\
                                   --arm gumbel E/gumbel_s0/results.json ...  [--tokens cispo RUN/results.json ...]

Each ``--arm NAME FILE...`` gives the ``eval.py`` results of one arm's seeds. Per arm: mean@k of
each seed and their mean ± sd. Between every two arms: each problem's score averaged over the arm's
seeds, then the paired per-problem difference with its 95% interval
matched by problem id (:func:`tsd.eval.paired.paired_by_id`: evaluations of different problem sets
are refused), as ``scripts/study.py report`` does. ``--tokens NAME
FILE...`` (train.py ``results.json`` of the arm's runs) adds the ratio of generated tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tsd.eval.paired import paired_by_id


def per_problem(path: Path) -> dict[str, float]:
    res = json.loads(path.read_text())
    k = res["samples_per_problem"]
    return {p: c / k for p, c in res["per_problem_correct"].items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", nargs="+", action="append", required=True, metavar=("NAME", "RESULTS"))
    ap.add_argument("--tokens", nargs="+", action="append", default=[], metavar=("NAME", "TRAIN_RESULTS"))
    args = ap.parse_args(argv)
    arms: dict[str, list[dict[str, float]]] = {}
    for name, *files in args.arm:
        if not files:
            ap.error(f"--arm {name}: no results.json given")
        arms[name] = [per_problem(Path(f)) for f in files]
    tokens = {
        name: statistics.fmean(
            json.loads(Path(f).read_text())["final/compute/generated_tokens"] for f in files
        )
        for name, *files in args.tokens
    }
    means: dict[str, dict[str, float]] = {}
    for name, seeds in arms.items():
        scores = [statistics.fmean(s.values()) for s in seeds]
        sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
        tok = f", {tokens[name] / 1e3:,.0f}k generated tokens per run" if name in tokens else ""
        print(f"{name}: mean@k {100 * statistics.fmean(scores):.2f} ± {100 * sd:.2f} over {len(scores)} seeds "
              f"({', '.join(f'{100 * x:.2f}' for x in scores)}){tok}")  # fmt: skip
        ids = set(seeds[0])
        if any(set(s) != ids for s in seeds):
            ap.error(f"--arm {name}: its seeds' evaluations scored different problems")
        means[name] = {p: statistics.fmean(s[p] for s in seeds) for p in sorted(ids)}
    names = list(arms)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            d = paired_by_id(means[a], means[b])
            lo, hi = d["ci95"]
            verdict = "no difference" if lo <= 0 <= hi else (f"{b} > {a}" if lo > 0 else f"{a} > {b}")
            ratio = (
                f"; generated tokens {b}/{a} x{tokens[b] / tokens[a]:.2f}"
                if a in tokens and b in tokens
                else ""
            )
            print(f"{b} - {a}: {100 * d['diff']:+.2f} points [{100 * lo:+.2f}, {100 * hi:+.2f}] over {len(means[a])} "
                  f"problems -> {verdict}{ratio}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
