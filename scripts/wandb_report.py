"""Build a W&B report that compares the methods of a project, with W&B's report API.

    python scripts/wandb_report.py --entity ME --project tsd                # build and save (network)
    python scripts/wandb_report.py --entity ME --project tsd --sweep-group mcts_countdown-sweep-<stamp>
    python scripts/wandb_report.py --entity ME --project tsd --dry-run      # build only, print the spec

The runs are the ones ``logger=wandb`` writes (``tsd.loggers.wandb_run.WandbRunLogger``; upload
offline runs first with ``wandb sync outputs/*/*/wandb/offline-run-*``). The report has:

1. **Methods**: the single runs (job type ``train``), grouped by their W&B group (the experiment:
   ``mcts_countdown``, ``bon_countdown``, ``cispo_countdown``; the seeds of one experiment are
   averaged, with a standard-error band): eval mean@16 against optimiser steps, against generated
   tokens and against trained tokens; the final mean@16 per method as bars; and the final table
   (the runs table with method, seed, final mean@16 / pass@16 and both compute axes pinned).
2. **Sweep**: the multirun jobs (job type ``sweep``; one sweep with ``--sweep-group``): the
   workers x iterations heatmap (a scatter of the two knobs coloured by the final mean@16), a
   parallel-coordinates view with the generated tokens, and the curves against generated tokens.
3. **What the search did**: the search-tree pictures and the sampled completions each evaluation
   logged (``eval/search_tree``, ``eval/samples``).

Saving needs the network and a W&B login (even serialising a run set looks its project up on the
server); ``--dry-run`` builds the same report object and prints its blocks and panels without
saving. ``tests/test_reports.py`` checks the object it builds, and the spec ``save()`` would upload
with that one project look-up answered by a stub.
Uses ``wandb-workspaces`` (``pip install wandb-workspaces``; in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def _wr():
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise SystemExit(
            f"scripts/wandb_report.py needs wandb-workspaces: pip install wandb-workspaces ({e})"
        ) from e
    return wr


def build_report(
    entity: str,
    project: str,
    metric: str = "eval/mean@16",
    sweep_group: str | None = None,
    sweep_x: str = "rollout.workers",
    sweep_y: str = "rollout.iterations",
    title: str = "tsd: tree-search distillation against its baselines",
) -> Any:
    """The report object (``wandb_workspaces.reports.v2.Report``), not saved."""
    wr = _wr()
    from wandb_workspaces import expr

    k = metric.rsplit("@", 1)[-1] if "@" in metric else ""
    pass_metric = f"eval/pass@{k}" if k else None
    gen, trained, step = "compute/generated_tokens", "compute/trained_tokens", "trainer/global_step"
    table_columns = [
        "run:displayName",
        "config:run.value.method",
        "config:seed.value",
        f"summary:{metric}",
        *([f"summary:{pass_metric}"] if pass_metric else []),
        f"summary:{gen}",
        f"summary:{trained}",
    ]
    methods = wr.Runset(
        entity=entity,
        project=project,
        name="methods (single runs)",
        filters=[expr.Metric("JobType") == "train"],
        groupby=["group"],
        pinned_columns=table_columns,
    )
    band = {"groupby_aggfunc": "mean", "groupby_rangefunc": "stderr"}
    method_panels = [
        wr.LinePlot(title=f"{metric} against optimiser steps", x=step, y=[metric], **band,
                    layout=wr.Layout(x=0, y=0, w=8, h=6)),
        wr.LinePlot(title=f"{metric} against generated tokens (search included)", x=gen, y=[metric], **band,
                    layout=wr.Layout(x=8, y=0, w=8, h=6)),
        wr.LinePlot(title=f"{metric} against trained tokens", x=trained, y=[metric], **band,
                    layout=wr.Layout(x=16, y=0, w=8, h=6)),
        wr.BarPlot(title=f"final {metric} per method", metrics=[wr.SummaryMetric(metric)], orientation="v",
                   **band, layout=wr.Layout(x=0, y=6, w=12, h=6)),
        wr.BarPlot(title="generated tokens per method", metrics=[wr.SummaryMetric(gen)], orientation="v",
                   **band, layout=wr.Layout(x=12, y=6, w=12, h=6)),
    ]  # fmt: skip
    sweep_filters = [expr.Metric("JobType") == "sweep"]
    if sweep_group:
        sweep_filters.append(expr.Metric("Group") == sweep_group)
    sweep = wr.Runset(
        entity=entity,
        project=project,
        name=f"sweep {sweep_group}" if sweep_group else "sweeps",
        filters=sweep_filters,
        pinned_columns=[f"config:{sweep_x.split('.')[0]}.value.{sweep_x.split('.', 1)[1]}",
                        f"config:{sweep_y.split('.')[0]}.value.{sweep_y.split('.', 1)[1]}",
                        f"summary:{metric}", f"summary:{gen}"],
    )  # fmt: skip
    sweep_panels = [
        wr.ScatterPlot(title=f"{sweep_x} x {sweep_y}: final {metric} (colour)", x=wr.Config(sweep_x),
                       y=wr.Config(sweep_y), z=wr.SummaryMetric(metric), layout=wr.Layout(x=0, y=0, w=12, h=8)),
        wr.ParallelCoordinatesPlot(
            title="knobs, compute and score",
            columns=[wr.ParallelCoordinatesPlotColumn(metric=wr.Config(sweep_x)),
                     wr.ParallelCoordinatesPlotColumn(metric=wr.Config(sweep_y)),
                     wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(gen)),
                     wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(metric))],
            layout=wr.Layout(x=12, y=0, w=12, h=8)),
        wr.LinePlot(title=f"{metric} against generated tokens, every job", x=gen, y=[metric],
                    layout=wr.Layout(x=0, y=8, w=24, h=6)),
    ]  # fmt: skip
    search_panels = [
        wr.MediaBrowser(title="one search tree per evaluation (first test problem)", media_keys=["eval/search_tree"],
                        layout=wr.Layout(x=0, y=0, w=24, h=10)),
        wr.WeavePanelSummaryTable(table_name="eval/samples", layout=wr.Layout(x=0, y=10, w=24, h=10)),
    ]  # fmt: skip
    return wr.Report(
        entity=entity,
        project=project,
        title=title,
        description=f"{metric} of MCTS distillation against group-sampling CISPO and best-of-N, at equal "
        "steps and at equal compute; the workers x iterations sweep; what the search did.",
        blocks=[
            wr.H1("Methods"),
            wr.P("Single runs grouped by experiment (seeds averaged, band: standard error). "
                 "Compare at equal generated tokens, not only at equal steps."),
            wr.PanelGrid(runsets=[methods], panels=method_panels),
            wr.H1("Sweep: workers x iterations"),
            wr.P(f"Each point is one job of the multirun; colour: final {metric}."),
            wr.PanelGrid(runsets=[sweep], panels=sweep_panels),
            wr.H1("What the search did"),
            wr.PanelGrid(runsets=[methods], panels=search_panels),
        ],
    )  # fmt: skip


def describe(report: Any) -> list[str]:
    """One line per block and panel of the built report (what ``--dry-run`` prints)."""
    lines = [f"report {report.title!r} ({report.entity}/{report.project})"]
    for b in report.blocks:
        kind = type(b).__name__
        if kind != "PanelGrid":
            lines.append(f"  {kind}: {getattr(b, 'text', '')}")
            continue
        for rs in b.runsets:
            lines.append(f"  PanelGrid runset {rs.name!r}: filters {rs.filters!r}, groupby {rs.groupby}")
        for p in b.panels:
            axes = {
                a: getattr(p, a)
                for a in ("x", "y", "z", "metrics", "media_keys", "table_name")
                if getattr(p, a, None)
            }
            lines.append(f"    {type(p).__name__}: {getattr(p, 'title', None) or ''} {axes}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--entity", default=os.environ.get("WANDB_ENTITY"), help="W&B entity (default: $WANDB_ENTITY)"
    )
    ap.add_argument("--project", default=os.environ.get("WANDB_PROJECT", "tsd"))
    ap.add_argument("--metric", default="eval/mean@16")
    ap.add_argument("--sweep-group", default=None, help="one sweep's W&B group (<experiment>-sweep-<stamp>)")
    ap.add_argument("--sweep-x", default="rollout.workers")
    ap.add_argument("--sweep-y", default="rollout.iterations")
    ap.add_argument(
        "--dry-run", action="store_true", help="build and print the spec; do not save (no network)"
    )
    args = ap.parse_args(argv)
    if not args.entity:
        ap.error("--entity is required (or set WANDB_ENTITY)")
    report = build_report(
        args.entity, args.project, args.metric, args.sweep_group, args.sweep_x, args.sweep_y
    )
    print("\n".join(describe(report)))
    if args.dry_run:
        print("(dry run: not saved)")
        return 0
    report.save()  # network: looks the project up, then uploads the spec
    print(f"saved: {report.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
