"""One static HTML page comparing runs, from their CSV logs: the W&B report for people without W&B.

    python scripts/report.py outputs/mcts_countdown/<run> outputs/bon_countdown/<run> outputs/cispo_countdown/<run>
    python scripts/report.py multirun/mcts_countdown/<stamp> --out sweep.html       # a whole sweep
    python scripts/report.py RUN... --metric eval/mean@16 --sweep-x rollout.workers --sweep-y rollout.iterations

Each argument is a run directory (``results.json`` / ``csv/metrics.csv``; see
:mod:`tsd.viz.runs`) or a multirun directory of them. The page, one self-contained file (the
plots are embedded PNGs; nothing is fetched), has: the eval metric against optimiser steps,
against generated tokens (search included) and against trained tokens; the final table (base and
final metric, pass@k, both compute axes, per run); the sweep's heatmap of the final metric when
several runs vary ``--sweep-x`` and ``--sweep-y``; and the last search tree an MCTS run drew.
``tests/test_reports.py`` opens it in headless Chromium and checks the screenshot shows the plots.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import sys
import time
from pathlib import Path

from tsd.viz.plots import curves_figure, sweep_heatmaps
from tsd.viz.runs import GENERATED, TRAINED, RunRecord, eval_metric, expand_runs, read_run


def png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _cell(v, fmt: str = "") -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else format(v, fmt or ".4f")
    return html.escape("-" if v is None else str(v))


def final_table(runs: list[RunRecord], metric: str, labels: list[str]) -> str:
    k = metric.rsplit("@", 1)[-1] if "@" in metric else None
    pass_key = f"eval/pass@{k}" if k else None
    head = ["run", "method", "seed", "steps", f"base {metric}", f"final {metric}"]
    head += [f"final {pass_key}"] if pass_key else []
    head += ["generated tokens", "trained tokens"]
    rows = []
    for r, lab in zip(runs, labels):
        cells = [lab, r.method, r.seed, r.results.get("global_step"), r.base(metric), r.final(metric)]
        cells += [r.final(pass_key)] if pass_key else []
        rows.append(
            "<tr>"
            + "".join(f"<td>{_cell(c)}</td>" for c in cells)
            + "".join(f"<td>{_cell(r.final(k), ',.0f')}</td>" for k in (GENERATED, TRAINED))
            + "</tr>"
        )
    return (
        "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>"
    )  # fmt: skip


def last_tree(runs: list[RunRecord]) -> tuple[RunRecord, Path] | None:
    """The newest tree picture (``trees/tree_step<N>.png``) of the first run that drew one."""
    for r in runs:
        pics = sorted(
            (r.path / "trees").glob("tree_step*.png"),
            key=lambda p: int(p.stem.removeprefix("tree_step") or 0),
        )
        if pics:
            return r, pics[-1]
    return None


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; max-width: 1500px; }
h1 { font-size: 22px; margin: 0 0 4px 0; } h2 { font-size: 17px; margin: 26px 0 8px 0; }
.meta { color: #666; font-size: 12px; } img.plot { width: 100%; max-width: 1400px; display: block; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; } th { background: #f2f2f2; }
"""


def build_html(runs: list[RunRecord], metric: str, sx: str, sy: str, labels: list[str] | None = None) -> str:
    labels = labels or [r.label for r in runs]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tsd report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>tsd: {html.escape(metric)} of {len(runs)} run(s)</h1>",
        f"<div class='meta'>generated {time.strftime('%Y-%m-%d %H:%M:%S')} by scripts/report.py from "
        + ", ".join(html.escape(str(r.path)) for r in runs) + "</div>",
        "<h2>Curves: against steps and against compute</h2>",
        f"<img class='plot' id='curves' alt='{html.escape(metric)} curves' src='{png_data_uri(curves_figure(runs, metric, labels))}'>",
        "<h2>Final table</h2>",
        final_table(runs, metric, labels),
    ]  # fmt: skip
    heat = sweep_heatmaps(runs, metric, sx, sy)
    if heat is not None:
        parts += [f"<h2>Sweep: {html.escape(sx)} x {html.escape(sy)}</h2>",
                  f"<img class='plot' id='heatmap' alt='sweep heatmap' src='{png_data_uri(heat)}'>"]  # fmt: skip
    tree = last_tree(runs)
    if tree is not None:
        run, png = tree
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        parts += [f"<h2>What the search did: {html.escape(run.label)}, {html.escape(png.stem)}</h2>",
                  "<div style='overflow-x: auto'>",  # natural size: a wide tree scrolls, its labels stay legible
                  f"<img id='tree' alt='search tree' src='{uri}'></div>"]  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories, or multirun directories of them")
    ap.add_argument("--out", type=Path, default=Path("report.html"))
    ap.add_argument("--metric", default="eval/mean@16", help="falls back to the eval/mean@k the runs have")
    ap.add_argument("--sweep-x", default="rollout.workers")
    ap.add_argument("--sweep-y", default="rollout.iterations")
    ap.add_argument(
        "--labels", nargs="*", default=None, help="one label per run (default: experiment + overrides)"
    )
    args = ap.parse_args(argv)
    try:
        paths = expand_runs(args.runs)
    except FileNotFoundError as e:
        ap.error(str(e))
    if args.labels and len(args.labels) != len(paths):
        ap.error(f"--labels: {len(args.labels)} labels for {len(paths)} runs")
    runs = []
    for i, p in enumerate(paths):
        runs.append(read_run(p))
        print(f"[{i + 1}/{len(paths)}] read {p}: {len(runs[-1].evals)} evaluations", flush=True)
    metric = eval_metric(runs, args.metric)
    if metric is None:
        raise SystemExit(f"no {args.metric} (nor any eval/mean@k) in the runs' logs")
    args.out.write_text(build_html(runs, metric, args.sweep_x, args.sweep_y, args.labels))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, {len(runs)} runs, metric {metric})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
