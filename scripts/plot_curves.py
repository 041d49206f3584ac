"""Plot eval mean@k against optimiser steps and against generated tokens for several runs.

    python scripts/plot_curves.py outputs/mcts_countdown/<run> outputs/cispo_countdown/<run> --out curves.png

Each run directory holds ``csv/metrics.csv`` (the CSV logger) and ``results.json``. The second
panel puts methods on the same compute axis (tokens sampled by the rollouts, search included).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_eval_curve(run: Path, key: str) -> tuple[list[float], list[float], list[float]]:
    """(steps, generated tokens, metric) at every logged evaluation of ``run``."""
    res = run / "results.json"
    if res.exists():
        hist = json.loads(res.read_text()).get("eval_history") or []
        if hist and key in hist[0]:
            return (
                [h["step"] for h in hist],
                [h.get("compute/generated_tokens", float("nan")) for h in hist],
                [h[key] for h in hist],
            )
    steps, toks, vals = [], [], []
    with open(run / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                steps.append(float(row["step"]))
                toks.append(float(row.get("compute/generated_tokens") or "nan"))
                vals.append(float(row[key]))
    return steps, toks, vals


def label_of(run: Path) -> str:
    cfg = run / ".hydra" / "overrides.yaml"
    if cfg.exists():
        text = ",".join(line.strip("- \n") for line in cfg.read_text().splitlines() if line.strip())
        if text:
            return text
    return run.parent.name + "/" + run.name


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (each with csv/metrics.csv)")
    ap.add_argument("--metric", default="eval/mean@16")
    ap.add_argument("--out", type=Path, default=Path("curves.png"))
    ap.add_argument("--labels", nargs="*", default=None, help="one legend label per run (default: overrides)")
    args = ap.parse_args(argv)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    print(f"{'run':<60} {'base':>8} {'final':>8} {'gen tokens':>12}")
    if args.labels and len(args.labels) != len(args.runs):
        ap.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    for i, run in enumerate(args.runs):
        steps, toks, vals = read_eval_curve(run, args.metric)
        if not vals:
            print(f"{str(run):<60} (no {args.metric})")
            continue
        lab = args.labels[i] if args.labels else label_of(run)
        a1.plot(steps, vals, marker="o", label=lab)
        a2.plot(toks, vals, marker="o", label=lab)
        print(f"{lab[:60]:<60} {vals[0]:>8.4f} {vals[-1]:>8.4f} {int(toks[-1]) if toks else 0:>12,d}")
    a1.set_xlabel("optimiser step")
    a2.set_xlabel("generated tokens (rollouts, search included)")
    for a in (a1, a2):
        a.set_ylabel(args.metric)
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.suptitle(f"{args.metric} (sparse reward, no search harness)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
