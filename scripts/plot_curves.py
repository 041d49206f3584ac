"""Plot eval mean@k against optimiser steps, generated tokens and trained tokens for several runs.

    python scripts/plot_curves.py outputs/mcts_countdown/<run> outputs/cispo_countdown/<run> --out curves.png
    python scripts/plot_curves.py multirun/mcts_countdown/<stamp> --metric eval/mean@16   # every job of a sweep

Each argument is a run directory or a multirun directory of them, read by :mod:`tsd.viz.runs`. The
compute panels put methods on the same axis (tokens sampled by the rollouts, search included; tokens
trained on). Prints each run's first and last value and its generated tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tsd.viz.plots import curves_figure
from tsd.viz.runs import GENERATED, STEP, expand_runs, read_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories, or multirun directories of them")
    ap.add_argument("--metric", default="eval/mean@16")
    ap.add_argument("--out", type=Path, default=Path("curves.png"))
    ap.add_argument("--labels", nargs="*", default=None, help="one legend label per run (default: overrides)")
    args = ap.parse_args(argv)
    try:
        runs = [read_run(p) for p in expand_runs(args.runs)]
    except FileNotFoundError as e:
        ap.error(str(e))
    if args.labels and len(args.labels) != len(runs):
        ap.error(f"--labels: {len(args.labels)} labels for {len(runs)} runs")
    labels = args.labels or [r.label for r in runs]
    print(f"{'run':<60} {'base':>8} {'final':>8} {'gen tokens':>12}")
    for run, lab in zip(runs, labels):
        if not run.curve(args.metric, STEP)[1]:
            print(f"{lab[:60]:<60} (no {args.metric})")
            continue
        gen = run.total(GENERATED)
        print(f"{lab[:60]:<60} {run.base(args.metric):>8.4f} {run.final(args.metric):>8.4f} {gen:>12,.0f}")
    curves_figure(runs, args.metric, labels).savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
