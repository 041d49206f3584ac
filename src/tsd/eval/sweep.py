"""The report of the scaling sweep (``python train.py -m hparams_search=mcts_scaling``: workers x
iterations of the tree arm), run by ``scripts/study.py sweep MULTIRUN_DIR``: every job evaluated on
the validation slice and the test set, heatmaps of mean@16 and of generated tokens, and each cell
against CISPO at the same generated tokens (CISPO's own curve, run long enough). The study's own
runs and helpers are in :mod:`tsd.eval.study`.

Bookkeeping (each rule answers a way the report once went wrong):

- **A cell's evaluations are keyed by the job that trained it**: the multirun's directory, the
  job's number and when its ``results.json`` was written (:func:`cell_name`). Another multirun
  with the same ``--out``, or the same multirun directory trained again, gets evaluations of its
  own; it never reads an earlier sweep's scores beside its own tokens. One multirun holding two
  jobs with the same workers x iterations (a third swept axis) is refused: the report has one cell
  per pair.
- **CISPO's long run** (the study's CISPO at its chosen rate, seed 0, its policy exported every
  :data:`SNAPSHOT_EVERY` steps) is one directory per length, ``runs/cispo_long_lr<lr>_s0_<steps>``.
  A sweep that needs more steps than any finished long run trains a longer one, resumed from the
  checkpoint of the longest there is (``ckpt_path``; its CSV log carries the earlier steps); a
  sweep that needs fewer reuses it.
- **Pairing is by problem id** (:func:`tsd.eval.paired.paired_by_id`): two evaluations of
  different problems are refused, not paired by the order their ids were stored in.
- **Equal compute has a tolerance**: a cell is compared with CISPO's snapshot whose generated
  tokens are nearest its own (nearest by ratio), and only when that snapshot's tokens are within
  :data:`TOKEN_RATIO` of the cell's (0.8 to 1.25: at most a quarter more or a fifth less).
  Outside it the verdict is withheld and the row says by how much the nearest snapshot misses
  (e.g. the smallest cells, below CISPO's first snapshot). Interpolating between snapshots was the
  other choice: it would give every cell a number, but a reference averaged from two evaluations
  has less sampling noise than one, so its paired interval would be too narrow, and it assumes
  the curve is straight between snapshots.
- **The learning rate**: the sweep's cells are checked against the study's pick for the tree arm
  (the rate its validation grid chose); a sweep at another rate says so above its table.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

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
#: sweep cell's generated tokens, exporting its policy (and a checkpoint) every SNAPSHOT_EVERY steps
SNAPSHOT_EVERY = 25
#: a cell is set against a CISPO snapshot only when the snapshot's generated tokens over the cell's
#: are within this range (symmetric in ratio: 1 / 1.25 = 0.8); outside it the verdict is withheld
TOKEN_RATIO = (0.8, 1.25)


def cell_name(job: Path, workers: int, iterations: int) -> str:
    """The name of a sweep job's evaluations: its workers x iterations, its multirun's directory and
    job number, and a hash of the job's absolute path and of when its ``results.json`` was written
    (a multirun trained again into the same directory gets new evaluations)."""
    res = job / "results.json"
    stamp = f"{job.resolve()}|{res.stat().st_mtime_ns if res.exists() else 0}"
    digest = hashlib.sha1(stamp.encode()).hexdigest()[:8]
    where = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{job.parent.name}_{job.name}")
    return f"sweep_w{workers}_m{iterations}_{where}_{digest}"


def _config_lr(run: Path) -> float | None:
    """``module.optimizer.lr`` of a run's resolved config (``.hydra/config.yaml``), None if unknown."""
    f = run / ".hydra" / "config.yaml"
    try:
        cfg: Any = yaml.safe_load(f.read_text()) if f.exists() else None
        return float(cfg["module"]["optimizer"]["lr"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def sweep_cells(sweep: Path) -> list[dict]:
    """The finished jobs of a workers x iterations multirun: ``{job, workers, iterations,
    generated, name, lr}`` (generated: the run's generated tokens; name: :func:`cell_name`; lr: its
    learning rate, None if its config is gone), in job order. Two jobs with the same workers x
    iterations are refused (``SystemExit``): the report has one cell per pair."""
    from tsd.viz.runs import GENERATED, read_run, sweep_jobs

    cells: list[dict] = []
    seen: dict[tuple[int, int], Path] = {}
    for job in sweep_jobs(sweep):
        if not (job / "results.json").exists():
            continue
        run = read_run(job)
        ws, ms = run.overrides.get("rollout.workers"), run.overrides.get("rollout.iterations")
        if ws is None or ms is None:
            continue
        w, m = int(ws), int(ms)
        if (w, m) in seen:
            raise SystemExit(
                f"sweep: jobs {seen[(w, m)].name} and {job.name} of {sweep} both ran rollout.workers={w}"
                f" rollout.iterations={m} (another swept axis?); the report has one cell per workers x"
                " iterations: sweep only those two, or report each value of the other axis as its own multirun"
            )
        seen[(w, m)] = job
        cells.append({"job": job, "workers": w, "iterations": m, "generated": run.total(GENERATED),
                      "name": cell_name(job, w, m), "lr": _config_lr(job)})  # fmt: skip
    return cells


# ------------------------------------------------------------------------------------- CISPO's long run
def cispo_long_dir(out: Path, lr: str, steps: int) -> Path:
    """The long run at ``lr`` trained to ``steps`` (a longer one is another directory)."""
    return out / "runs" / f"cispo_long_lr{lr}_s0_{steps}"


def cispo_long_runs(out: Path, lr: str) -> list[tuple[Path, int]]:
    """The finished long runs of CISPO at ``lr`` (read from each run's config, so a directory of an
    older layout counts too), with the step each reached, shortest first."""
    runs = []
    for d in sorted((out / "runs").glob("cispo_long*")):
        res = d / "results.json"
        got = _config_lr(d)
        if not res.exists() or got is None or not math.isclose(got, float(lr), rel_tol=1e-9):
            continue
        step = json.loads(res.read_text()).get("global_step")
        if isinstance(step, int):
            runs.append((d, step))
    return sorted(runs, key=lambda r: (r[1], r[0].name))


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


def cispo_long_job(out: Path, lr: str, steps: int) -> Job:
    """Train CISPO's long run to ``steps``: resumed from its own last checkpoint if an earlier try
    was stopped, else from the longest finished long run at ``lr`` (shorter than ``steps``), else
    from the start."""
    d = cispo_long_dir(out, lr, steps)
    own = d / "checkpoints" / "last.ckpt"
    shorter = [
        r for r, s in cispo_long_runs(out, lr) if s < steps and (r / "checkpoints" / "last.ckpt").exists()
    ]
    ckpt = own if own.exists() else shorter[-1] / "checkpoints" / "last.ckpt" if shorter else None
    argv = [sys.executable, str(ROOT / "train.py"), *METHODS["cispo"], *COMMON, f"module.optimizer.lr={lr}",
            "seed=0", f"trainer.max_steps={steps}", f"callbacks.export.every_n_steps={SNAPSHOT_EVERY}",
            f"callbacks.checkpoint.every_n_train_steps={SNAPSHOT_EVERY}", f"hydra.run.dir={d}",
            *([f"ckpt_path={ckpt}"] if ckpt is not None else [])]  # fmt: skip
    return Job(f"train cispo long lr={lr} to {steps} steps", argv, d / "results.json")


def _snapshots(run: Path) -> dict[int, float]:
    """Snapshot step -> generated tokens at that step, for the snapshots ``run`` exported itself."""
    from tsd.viz.runs import GENERATED

    f = run / "csv" / "metrics.csv"
    if not f.exists():
        return {}
    at: dict[int, float] = {}
    with f.open(newline="") as fh:
        for r in csv.DictReader(fh):
            if r.get(GENERATED) and r.get("step"):
                at[int(float(r["step"]))] = float(r[GENERATED])
    return {
        s: t for s, t in at.items()
        if s > 0 and t > 0 and (run / f"policy_step{s}" / "tsd_export.json").exists()
    }  # fmt: skip


def cispo_snapshot_at(out: Path, lr: str, tokens: float) -> dict | None:
    """The snapshot of CISPO's long runs at ``lr`` whose generated tokens are nearest ``tokens`` by
    ratio: ``{run, step, tokens, token_ratio (cell / snapshot), name (of its evaluation),
    within (TOKEN_RATIO)}``; None before a long run has finished."""
    best = None
    for run, _ in cispo_long_runs(out, lr):
        for step, t in _snapshots(run).items():
            key = abs(math.log(tokens / t))
            if best is None or key < best[0]:
                best = (key, run, step, t)
    if best is None:
        return None
    _, run, step, t = best
    ratio = tokens / t
    lo, hi = TOKEN_RATIO
    return {"run": run, "step": step, "tokens": t, "token_ratio": ratio, "name": f"{run.name}_step{step}",
            "within": lo <= ratio <= hi}  # fmt: skip


def sweep_plan(sweep: Path, out: Path) -> list[Job]:
    """Evaluation of every finished cell (validation slice; test at T=1.0), CISPO's long run (if no
    finished one is long enough), and the evaluation of its snapshot nearest each cell's generated
    tokens, where that snapshot is within :data:`TOKEN_RATIO` of them."""
    cells = sweep_cells(sweep)
    jobs: list[Job] = []
    for c in cells:
        job, name = c["job"], c["name"]
        val = out / "eval" / f"{name}_val.json"
        jobs.append(Job(f"validate {name}", [sys.executable, str(SCRIPT), "_validate", str(job / "policy"),
                                             str(val)], val))  # fmt: skip
        jobs.append(eval_job(out, name, str(job / "policy"), "1.0"))
    steps = cispo_long_steps(out, cells)
    lr = best_lr(out, "cispo")
    if steps is None or lr is None:
        return jobs
    if not any(s >= steps for _, s in cispo_long_runs(out, lr)):
        jobs.append(cispo_long_job(out, lr, steps))
        return jobs  # its snapshots are evaluated once it has finished
    evals: dict[str, Job] = {}
    for c in cells:
        snap = cispo_snapshot_at(out, lr, c["generated"])
        if snap is not None and snap["within"]:
            policy = snap["run"] / f"policy_step{snap['step']}"
            evals.setdefault(snap["name"], eval_job(out, snap["name"], str(policy), "1.0"))
    return jobs + list(evals.values())


def _verdict(lo: float, hi: float) -> str:
    return "no difference" if lo <= 0 <= hi else ("tree > cispo" if lo > 0 else "cispo > tree")


def sweep_report(sweep: Path, out: Path) -> dict:
    """Every cell's test and validation mean@16, its generated tokens, and CISPO at the same
    generated tokens (its long runs' nearest snapshot, paired per test problem, within
    :data:`TOKEN_RATIO`), and the sweep's learning rate against the study's pick for the tree arm:
    JSON, Markdown and the heatmaps, into ``sweep``."""
    from tsd.eval.paired import paired_by_id

    cells = sweep_cells(sweep)
    cispo_lr = best_lr(out, "cispo")
    rows = []
    for c in cells:
        test, val = _eval(out, c["name"], "1.0"), _val(out / "eval" / f"{c['name']}_val.json")
        row = {k: c[k] for k in ("workers", "iterations", "generated", "lr")}
        row["test"] = test["mean@16"] if test else None
        row["val"] = val["mean@16"] if val else None
        snap = cispo_snapshot_at(out, cispo_lr, c["generated"]) if cispo_lr is not None else None
        if snap is not None:
            ref = _eval(out, snap["name"], "1.0")
            cmp: dict = {"step": snap["step"], "run": snap["run"].name, "token_ratio": snap["token_ratio"]}
            if not snap["within"]:
                lo, hi = TOKEN_RATIO
                cmp["verdict"] = f"withheld (tokens outside {lo:.2f}-{hi:.2f})"
                row["cispo"] = cmp
            elif test and ref:
                try:
                    d = paired_by_id(_per_problem(ref), _per_problem(test))
                except ValueError as e:
                    raise SystemExit(
                        f"sweep: cell w{c['workers']} m{c['iterations']} against {snap['name']}: {e}"
                    ) from None
                cmp.update({"mean@16": ref["mean@16"], "diff": d["diff"], "ci95": d["ci95"],
                            "problems": d["problems"], "verdict": _verdict(*d["ci95"])})  # fmt: skip
                row["cispo"] = cmp
        rows.append(row)
    tree_lr = best_lr(out, "tree")
    swept = sorted({r["lr"] for r in rows if r["lr"] is not None})
    summary = {
        "sweep": str(sweep),
        "cells": rows,
        "lr": {"sweep": swept, "study_tree": tree_lr, "cispo": cispo_lr},
    }
    write_text_atomic(sweep / "sweep_report.json", json.dumps(summary, indent=1))
    write_text_atomic(sweep / "sweep_report.md", sweep_markdown(summary))
    sweep_heatmaps(rows, sweep / "sweep_heatmaps.png")
    print(sweep_markdown(summary))
    return summary


def lr_note(lr: dict) -> str | None:
    """One line when the sweep's cells did not all run at the study's pick for the tree arm (or the
    pick is not known yet); None when they did."""
    swept, pick = lr.get("sweep") or [], lr.get("study_tree")
    if pick is None:
        return f"The sweep ran at lr {', '.join(f'{x:g}' for x in swept) or '?'}; the study has not picked the tree arm's rate yet."
    if len(swept) == 1 and math.isclose(swept[0], float(pick), rel_tol=1e-9):
        return None
    return (
        f"**The sweep ran at lr {', '.join(f'{x:g}' for x in swept) or '?'}, not at the study's pick for the"
        f" tree arm ({pick})**: set `module.optimizer.lr` in configs/hparams_search/mcts_scaling.yaml (or"
        " the experiment) to the pick and run the sweep again."
    )


def sweep_markdown(summary: dict) -> str:
    note = lr_note(summary.get("lr") or {})
    lo, hi = TOKEN_RATIO
    lines = [note, ""] if note else []
    lines += [
        "| workers | iterations | generated tokens | mean@16 test (820, T=1.0) | mean@16 validation "
        "| CISPO at these tokens (step) | cell - CISPO, paired (points) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(summary["cells"], key=lambda r: (r["workers"], r["iterations"])):
        c = r.get("cispo")
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
        if c is None:
            vs = diff = verdict = "-"
        else:
            score = f"{100 * c['mean@16']:.2f}" if "mean@16" in c else "-"
            vs = f"{score} ({c['step']}; tokens x{c['token_ratio']:.2f})"
            diff = (
                f"{100 * c['diff']:+.2f} [{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}]"
                if "diff" in c
                else "-"
            )
            verdict = c["verdict"]
        lines.append(f"| {r['workers']} | {r['iterations']} | {r['generated'] / 1e3:,.0f}k | {pct(r['test'])} "
                     f"| {pct(r['val'])} | {vs} | {diff} | {verdict} |")  # fmt: skip
    lines += [
        "",
        f"CISPO's snapshot nearest each cell's generated tokens (`tokens x`: the cell's over the snapshot's);"
        f" a verdict only within x{lo:.2f} to x{hi:.2f}, paired by test problem.",
    ]
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
         lambda r: 100 * r["cispo"]["diff"] if "diff" in r.get("cispo", {}) else None, "+.2f"),
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
