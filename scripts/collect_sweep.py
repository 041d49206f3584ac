"""Collect a Hydra multirun into a table and a heatmap of final eval mean@k and generated tokens.

    python train.py -m hparams_search=mcts_scaling
    python scripts/collect_sweep.py multirun/mcts_countdown/<stamp> --x rollout.workers --y rollout.iterations

Each job directory holds ``results.json`` and ``.hydra/overrides.yaml``; a job that failed or is
still running shows as missing.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_overrides(job: Path) -> dict[str, str]:
    f = job / ".hydra" / "overrides.yaml"
    out = {}
    if f.exists():
        for line in f.read_text().splitlines():
            line = line.strip().lstrip("-").strip()
            if "=" in line:
                k, v = line.split("=", 1)
                out[k.lstrip("+~")] = v
    return out


def collect(sweep: Path, metric: str) -> list[dict]:
    rows = []
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").exists()):
        row = {"job": job.name, **read_overrides(job)}
        res = job / "results.json"
        if res.exists():
            r = json.loads(res.read_text())
            row["final"] = r.get(f"final/{metric}")
            row["base"] = r.get(f"base/{metric}")
            row["generated_tokens"] = r.get("final/compute/generated_tokens")
        rows.append(row)
    return rows


def _num(v: str):
    try:
        return int(v)
    except ValueError:
        return float(v)


def heatmap(rows, x, y, key, ax, title, fmt):
    xs = sorted({_num(r[x]) for r in rows if x in r})
    ys = sorted({_num(r[y]) for r in rows if y in r})
    grid = [[math.nan] * len(xs) for _ in ys]
    for r in rows:
        if x in r and y in r and r.get(key) is not None:
            grid[ys.index(_num(r[y]))][xs.index(_num(r[x]))] = r[key]
    im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.set_yticks(range(len(ys)), [str(v) for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "—" if math.isnan(v) else format(v, fmt), ha="center", va="center", color="w")
    plt.colorbar(im, ax=ax)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--x", default="rollout.workers")
    ap.add_argument("--y", default="rollout.iterations")
    ap.add_argument("--metric", default="eval/mean@16")
    ap.add_argument("--out", type=Path, default=None, help="PNG (default: SWEEP/heatmap.png)")
    args = ap.parse_args(argv)
    rows = collect(args.sweep, args.metric)
    if not rows:
        raise SystemExit(f"no Hydra jobs under {args.sweep}")
    cols = [args.x, args.y, "base", "final", "generated_tokens"]
    print(" | ".join(f"{c:>18}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(
                f"{'missing':>18}" if v is None else f"{v:>18.4f}" if isinstance(v, float) else f"{v!s:>18}"
            )
        print(" | ".join(cells))
    (args.sweep / "sweep.json").write_text(json.dumps(rows, indent=1))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    heatmap(rows, args.x, args.y, "final", a1, f"final {args.metric}", ".3f")
    heatmap(rows, args.x, args.y, "generated_tokens", a2, "generated tokens", ".3g")
    fig.tight_layout()
    out = args.out or args.sweep / "heatmap.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out} and {args.sweep / 'sweep.json'}")
    return rows


if __name__ == "__main__":
    main()
