"""Collect a Hydra multirun into a table and a heatmap of final eval mean@k and generated tokens.

    python train.py -m hparams_search=mcts_scaling       # ends with the same table
    python scripts/collect_sweep.py multirun/mcts_countdown/<stamp> --x rollout.workers --y rollout.iterations

Each job directory is read by :mod:`tsd.viz.runs` (``results.json``, ``.hydra/overrides.yaml``); a
job that failed or is still running shows ``-``. Writes ``SWEEP/sweep.json`` (one row per job: its
overrides, base and final metric, generated and trained tokens, wall seconds) and the heatmaps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tsd.viz.plots import sweep_heatmaps
from tsd.viz.runs import eval_metric, format_table, read_run, sweep_jobs, sweep_rows, varying_overrides


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--x", default="rollout.workers")
    ap.add_argument("--y", default="rollout.iterations")
    ap.add_argument("--metric", default="eval/mean@16", help="falls back to the eval/mean@k the jobs have")
    ap.add_argument("--out", type=Path, default=None, help="PNG (default: SWEEP/heatmap.png)")
    args = ap.parse_args(argv)
    runs = [read_run(job) for job in sweep_jobs(args.sweep)]
    if not runs:
        raise SystemExit(f"no Hydra jobs under {args.sweep}")
    metric = eval_metric(runs, args.metric)
    rows = sweep_rows(runs, metric)
    keys = list(dict.fromkeys([args.x, args.y, *varying_overrides(runs)]))
    print(format_table(rows, [k for k in keys if any(k in r.overrides for r in runs)], metric))
    (args.sweep / "sweep.json").write_text(json.dumps(rows, indent=1))
    fig = sweep_heatmaps(runs, metric or args.metric, args.x, args.y)
    if fig is None:
        print(f"no heatmap: fewer than two jobs set {args.x} and {args.y} to numbers")
        print(f"wrote {args.sweep / 'sweep.json'}")
        return rows
    out = args.out or args.sweep / "heatmap.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out} and {args.sweep / 'sweep.json'}")
    return rows


if __name__ == "__main__":
    main()
