"""The report of the scaling sweep (``python train.py -m hparams_search=mcts_scaling``: workers x
iterations of the tree arm), run by ``scripts/study.py sweep MULTIRUN_DIR``: every job evaluated on
the validation slice and the test set, heatmaps of mean@16 and of generated tokens, and each cell
against CISPO at the same generated tokens (CISPO's own curve, run long enough). The study's own
runs and helpers are in :mod:`tsd.eval.study`.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from tsd.eval.study import (
    COMMON,
    METHODS,
    ROOT,
    SCRIPT,
    SEEDS,
    STEPS,
    Job,
    _eval,
    _per_problem,
    _val,
    best_lr,
    eval_job,
    train_dir,
)
from tsd.fileio import write_text_atomic

#: CISPO's long run: the study's CISPO (its chosen rate, seed 0) trained long enough to reach every
#: sweep cell's generated tokens, exporting its policy every SNAPSHOT_EVERY steps
SNAPSHOT_EVERY = 25


def sweep_cells(sweep: Path) -> list[dict]:
    """The finished jobs of a workers x iterations multirun: ``{job, workers, iterations,
    generated}`` (generated: the run's generated tokens), in job order."""
    from tsd.viz.runs import GENERATED, read_run, sweep_jobs

    cells = []
    for job in sweep_jobs(sweep):
        if not (job / "results.json").exists():
            continue
        run = read_run(job)
        w, m = run.overrides.get("rollout.workers"), run.overrides.get("rollout.iterations")
        if w is None or m is None:
            continue
        cells.append({"job": job, "workers": int(w), "iterations": int(m), "generated": run.total(GENERATED)})
    return cells


def cispo_long_dir(out: Path) -> Path:
    return out / "runs" / "cispo_long_s0"


def cispo_long_steps(out: Path, cells: Sequence[dict]) -> int | None:
    """Optimiser steps for CISPO to generate as many tokens as the largest sweep cell (from the
    study's CISPO runs' tokens per step), rounded up to a snapshot; None before both exist."""
    lr = best_lr(out, "cispo")
    if lr is None or not cells:
        return None
    done = [train_dir(out, "cispo", lr, s) / "results.json" for s in SEEDS]
    per_step = [json.loads(f.read_text())["compute/generated_tokens"] / STEPS for f in done if f.exists()]
    if not per_step:
        return None
    need = max(c["generated"] for c in cells) / statistics.fmean(per_step)
    return max(STEPS, SNAPSHOT_EVERY * math.ceil(need * 1.05 / SNAPSHOT_EVERY))


def cispo_step_at(out: Path, tokens: float) -> int | None:
    """The snapshot step of CISPO's long run whose generated tokens are nearest ``tokens``."""
    from tsd.viz.runs import GENERATED

    f = cispo_long_dir(out) / "csv" / "metrics.csv"
    if not f.exists():
        return None
    import csv

    at: dict[int, float] = {}
    for r in csv.DictReader(f.open()):
        if r.get(GENERATED) and r.get("step"):
            at[int(float(r["step"]))] = float(r[GENERATED])
    snaps = [s for s in at if s % SNAPSHOT_EVERY == 0 and s > 0]
    return min(snaps, key=lambda s: abs(at[s] - tokens)) if snaps else None


def sweep_plan(sweep: Path, out: Path) -> list[Job]:
    """Evaluation of every finished cell (validation slice; test at T=1.0), CISPO's long run, and
    the evaluation of its snapshot nearest each cell's generated tokens."""
    cells = sweep_cells(sweep)
    jobs: list[Job] = []
    for c in cells:
        job = c["job"]
        name = f"cell w{c['workers']} m{c['iterations']}"
        jobs.append(Job(f"validate {name}", [sys.executable, str(SCRIPT), "_validate", str(job / "policy"),
                                             str(job / "val.json")], job / "val.json"))  # fmt: skip
        ev = eval_job(out, f"sweep_w{c['workers']}_m{c['iterations']}", str(job / "policy"), "1.0")
        jobs.append(ev)
    steps = cispo_long_steps(out, cells)
    if steps is not None:
        lr = best_lr(out, "cispo")
        d = cispo_long_dir(out)
        argv = [sys.executable, str(ROOT / "train.py"), *METHODS["cispo"], *COMMON, f"module.optimizer.lr={lr}",
                "seed=0", f"trainer.max_steps={steps}", f"callbacks.export.every_n_steps={SNAPSHOT_EVERY}",
                f"hydra.run.dir={d}"]  # fmt: skip
        jobs.append(Job("train cispo long", argv, d / "results.json"))
        for c in cells:
            step = cispo_step_at(out, c["generated"]) if (d / "results.json").exists() else None
            if step is not None:
                jobs.append(eval_job(out, f"cispo_step{step}", str(d / f"policy_step{step}"), "1.0"))
    return jobs


def sweep_report(sweep: Path, out: Path) -> dict:
    """Every cell's test and validation mean@16, its generated tokens, and CISPO at the same
    generated tokens (its long run's nearest snapshot, paired per test problem): JSON, Markdown and
    the heatmaps, into ``sweep``."""
    from tsd.eval.paired import paired_difference

    rows = []
    for c in sweep_cells(sweep):
        name = f"sweep_w{c['workers']}_m{c['iterations']}"
        test, val = _eval(out, name, "1.0"), _val(c["job"] / "val.json")
        row = {k: c[k] for k in ("workers", "iterations", "generated")}
        row["test"] = test["mean@16"] if test else None
        row["val"] = val["mean@16"] if val else None
        step = cispo_step_at(out, c["generated"])
        ref = _eval(out, f"cispo_step{step}", "1.0") if step is not None else None
        if test and ref and step is not None:
            d = paired_difference(list(_per_problem(ref).values()), list(_per_problem(test).values()))
            lo, hi = d["ci95"]
            row["cispo"] = {
                "step": step,
                "mean@16": ref["mean@16"],
                "token_ratio": c["generated"] / _cispo_tokens_at(out, step),
                "diff": d["diff"],
                "ci95": d["ci95"],
                "verdict": "no difference"
                if lo <= 0 <= hi
                else ("tree > cispo" if lo > 0 else "cispo > tree"),
            }
        rows.append(row)
    summary = {"sweep": str(sweep), "cells": rows}
    write_text_atomic(sweep / "sweep_report.json", json.dumps(summary, indent=1))
    write_text_atomic(sweep / "sweep_report.md", sweep_markdown(summary))
    sweep_heatmaps(rows, sweep / "sweep_heatmaps.png")
    print(sweep_markdown(summary))
    return summary


def _cispo_tokens_at(out: Path, step: int) -> float:
    import csv

    from tsd.viz.runs import GENERATED

    for r in csv.DictReader((cispo_long_dir(out) / "csv" / "metrics.csv").open()):
        if r.get(GENERATED) and r.get("step") and int(float(r["step"])) == step:
            return float(r[GENERATED])
    return math.nan


def sweep_markdown(summary: dict) -> str:
    lines = [
        "| workers | iterations | generated tokens | mean@16 test (820, T=1.0) | mean@16 validation "
        "| CISPO at these tokens (step) | cell - CISPO, paired (points) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(summary["cells"], key=lambda r: (r["workers"], r["iterations"])):
        c = r.get("cispo")
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
        vs = "-" if c is None else f"{100 * c['mean@16']:.2f} ({c['step']}; tokens x{c['token_ratio']:.2f})"
        diff = (
            "-"
            if c is None
            else f"{100 * c['diff']:+.2f} [{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}]"
        )
        lines.append(f"| {r['workers']} | {r['iterations']} | {r['generated'] / 1e3:,.0f}k | {pct(r['test'])} "
                     f"| {pct(r['val'])} | {vs} | {diff} | {'-' if c is None else c['verdict']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def sweep_heatmaps(rows: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patheffects

    ws = sorted({r["workers"] for r in rows})
    ms = sorted({r["iterations"] for r in rows})
    panels = (
        ("mean@16, 820 test problems, T=1.0 (%)", lambda r: None if r["test"] is None else 100 * r["test"], ".2f"),
        ("generated tokens (thousands)", lambda r: r["generated"] / 1e3, ",.0f"),
        ("cell - CISPO at the same tokens (points)",
         lambda r: 100 * r["cispo"]["diff"] if r.get("cispo") else None, "+.2f"),
    )  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (title, value, fmt) in zip(axes, panels):
        grid = [[math.nan] * len(ms) for _ in ws]
        for r in rows:
            v = value(r)
            grid[ws.index(r["workers"])][ms.index(r["iterations"])] = math.nan if v is None else v
        diverging = "CISPO" in title  # centred on 0: blue = the cell ahead of CISPO
        bound = max((abs(v) for row in grid for v in row if not math.isnan(v)), default=1.0)
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="RdBu" if diverging else "viridis",
                       **({"vmin": -bound, "vmax": bound} if diverging else {}))  # fmt: skip
        ax.set_xticks(range(len(ms)), [str(m) for m in ms])
        ax.set_yticks(range(len(ws)), [str(w) for w in ws])
        ax.set_xlabel("iterations (waves per tree)")
        ax.set_ylabel("workers per tree")
        ax.set_title(title, fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if math.isnan(v) else format(v, fmt), ha="center", va="center", color="k",
                        path_effects=[patheffects.withStroke(linewidth=3, foreground="w")])  # fmt: skip
        fig.colorbar(im, ax=ax)
    fig.suptitle("the tree arm over the article's knobs: one seed, 150 steps of 8 problems each", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
