"""Figures of runs read back by :mod:`tsd.viz.runs`: evaluation curves against steps and compute,
and a sweep's heatmaps. Shared by ``scripts/plot_curves.py``, ``scripts/collect_sweep.py`` and
``scripts/report.py``.

Figures are built with matplotlib's object API (``Figure``, no pyplot state and no GUI backend),
so a caller saves them with ``fig.savefig(...)`` and nothing needs closing.
"""

from __future__ import annotations

import math

from matplotlib.figure import Figure

from tsd.viz.runs import GENERATED, STEP, TRAINED, RunRecord

#: the x-axes of the curves, with their labels
AXES = (
    (STEP, "optimiser step"),
    (GENERATED, "generated tokens (search included)"),
    (TRAINED, "trained tokens"),
)


def curves_figure(runs: list[RunRecord], metric: str, labels: list[str]) -> Figure:
    """``metric`` against each of :data:`AXES`, one panel per axis, one line per run."""
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, len(AXES))
    for run, lab in zip(runs, labels):
        for ax, (x, _) in zip(axes, AXES):
            xs, ys = run.curve(metric, x)
            if ys:
                ax.plot(xs, ys, marker="o", lw=1.8, label=lab)
    for ax, (_, name) in zip(axes, AXES):
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{metric} (sparse reward, no search harness)")
    fig.tight_layout()
    return fig


def _num(v: str | None) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def sweep_heatmaps(runs: list[RunRecord], metric: str, x: str, y: str) -> Figure | None:
    """The final ``metric`` and the generated tokens over the two swept knobs ``x`` and ``y``
    (override keys); a cell no run filled reads ``-``. None unless two runs set both knobs to numbers."""
    jobs = [r for r in runs if x in r.overrides and y in r.overrides]
    xs = sorted({_num(r.overrides[x]) for r in jobs})
    ys = sorted({_num(r.overrides[y]) for r in jobs})
    if len(jobs) < 2 or any(math.isnan(v) for v in xs + ys):
        return None
    fig = Figure(figsize=(11, 4.2))
    for ax, (title, value, fmt) in zip(
        fig.subplots(1, 2),
        (
            (f"final {metric}", lambda r: r.final(metric), ".3f"),
            ("generated tokens", lambda r: r.total(GENERATED), ".3g"),
        ),
    ):
        grid = [[math.nan] * len(xs) for _ in ys]  # (len(ys), len(xs))
        for r in jobs:
            grid[ys.index(_num(r.overrides[y]))][xs.index(_num(r.overrides[x]))] = value(r)
        im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(title)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if math.isnan(v) else format(v, fmt), ha="center", va="center", color="w")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
