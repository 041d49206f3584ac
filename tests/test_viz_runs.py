"""Run directories read back (:mod:`tsd.viz.runs`), the sweep table a multirun ends with
(:mod:`tsd.viz.sweep_summary`) and the sweep heatmaps (:mod:`tsd.viz.plots`), on run directories
written here in the layout ``train.py`` writes, with hand-computed expected values.
(``test_entrypoints.py`` checks the same on a real ``train.py -m`` sweep.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tsd.viz.plots import sweep_heatmaps
from tsd.viz.runs import (
    GENERATED,
    TRAINED,
    eval_metric,
    format_table,
    read_run,
    sweep_jobs,
    sweep_rows,
    varying_overrides,
)
from tsd.viz.sweep_summary import SweepSummary

ROOT = Path(__file__).resolve().parents[1]


def write_job(job: Path, overrides: list[str], results: dict | None = None, csv: str | None = None) -> Path:
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    if csv is not None:
        (job / "csv").mkdir()
        (job / "csv" / "metrics.csv").write_text(csv)
    return job


def evals(*points: tuple[int, float, float, float]) -> list[dict]:
    return [
        {"step": s, "eval/mean@2": m, GENERATED: g, TRAINED: t, "eval/pass@2": 2 * m} for s, m, g, t in points
    ]


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Jobs 0, 1 (finished), 2 (failed before writing anything), 10 (no results.json, only its CSV
    log: still running), and what is not a job: a file and a directory without ``.hydra``."""
    s = tmp_path / "sweep"
    common = ["hparams_search=mcts_scaling", "debug=smoke"]
    write_job(
        s / "0",
        [*common, "rollout.workers=1", "rollout.iterations=2"],
        {"eval_history": evals((0, 0.125, 0, 0), (3, 0.25, 900, 300)), GENERATED: 1000.0, TRAINED: 300.0,
         "wall_seconds": 12.4},
    )  # fmt: skip
    write_job(
        s / "1",
        [*common, "rollout.workers=4", "rollout.iterations=2"],
        {"eval_history": evals((0, 0.125, 0, 0), (3, 0.5, 3000, 310)), GENERATED: 3500.0, TRAINED: 310.0,
         "wall_seconds": 20.6},
    )  # fmt: skip
    write_job(s / "2", [*common, "rollout.workers=1", "rollout.iterations=4"])
    write_job(
        s / "10",
        [*common, "rollout.workers=4", "rollout.iterations=4"],
        csv="step,eval/mean@2,compute/generated_tokens,compute/trained_tokens,train/loss\n"
        "0,0.125,0,0,\n1,,,,0.5\n2,0.375,2500,200,\n",
    )
    (s / "multirun.yaml").write_text("hydra: {}\n")
    (s / "notes").mkdir()
    return s


def test_sweep_jobs_are_the_hydra_job_directories_in_job_order(sweep):
    assert [j.name for j in sweep_jobs(sweep)] == ["0", "1", "2", "10"]
    assert sweep_jobs(sweep / "no_such_dir") == []


def test_sweep_rows_read_each_job_and_mark_what_is_missing(sweep):
    runs = [read_run(j) for j in sweep_jobs(sweep)]
    assert eval_metric(runs) == "eval/mean@2"  # no job has mean@16: the mean@k they have
    assert eval_metric(runs, "eval/pass@2") == "eval/pass@2"
    assert varying_overrides(runs) == ["rollout.workers", "rollout.iterations"]
    rows = sweep_rows(runs, "eval/mean@2")
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert rows[0]["rollout.workers"] == "1" and rows[0]["debug"] == "smoke"
    assert (rows[0]["base"], rows[0]["final"]) == (0.125, 0.25)
    # results.json's end-of-run totals, not the last evaluation's (1000 generated, not 900)
    totals = [rows[0][k] for k in ("generated_tokens", "trained_tokens", "wall_seconds")]
    assert totals == [1000, 300, 12.4]
    assert (rows[1]["final"], rows[1]["generated_tokens"]) == (0.5, 3500)
    failed = rows[2]
    assert [failed[k] for k in ("base", "final", "generated_tokens", "trained_tokens", "wall_seconds")] == [
        None
    ] * 5
    # still running: its CSV log's evaluations, the compute of its last one, no wall time
    running = rows[3]
    assert (running["base"], running["final"], running["generated_tokens"], running["trained_tokens"]) == (
        0.125, 0.375, 2500, 200,
    )  # fmt: skip
    assert running["wall_seconds"] is None
    assert eval_metric([read_run(sweep / "2")]) is None
    assert sweep_rows([read_run(sweep / "0")], None)[0]["final"] is None


def test_format_table_is_markdown_with_dashes_for_missing_values(sweep):
    runs = [read_run(sweep / j) for j in ("0", "2")]
    text = format_table(
        sweep_rows(runs, "eval/mean@2"), ["rollout.workers", "rollout.iterations"], "eval/mean@2"
    )
    assert text.splitlines() == [
        "| job | rollout.workers | rollout.iterations | base eval/mean@2 | final eval/mean@2 | generated tokens "
        "| trained tokens | wall s |",
        "|---|---|---|---|---|---|---|---|",
        "| 0 | 1 | 2 | 0.1250 | 0.2500 | 1,000 | 300 | 12 |",
        "| 2 | 1 | 4 | - | - | - | - | - |",
    ]


def test_sweep_summary_prints_and_writes_the_table_after_the_last_job(sweep, capsys):
    # the sweeper's parameters come first (one no job set is left out), then the other knobs
    params = {"rollout.iterations": "2,4", "rollout.c_puct": "1,2"}
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"params": params}}})
    SweepSummary().on_multirun_end(config)
    out = capsys.readouterr().out
    assert f"sweep {sweep}: 4 jobs, eval/mean@2" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 5 and table[0].startswith("| job | rollout.iterations | rollout.workers | base")
    assert table[2] == "| 1 | 2 | 4 | 0.1250 | 0.5000 | 3,500 | 310 | 21 |"
    assert (sweep / "summary.md").read_text() == out.strip("\n") + "\n"


def test_sweep_summary_says_so_when_the_sweep_directory_cannot_be_written(sweep, capsys):
    (sweep / "summary.md").mkdir()  # in the way of the file
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    captured = capsys.readouterr()
    assert "sweep summary: cannot read or write" in captured.err and "| job |" not in captured.out


def test_sweep_heatmaps_place_each_job_in_its_cell(sweep):
    runs = [read_run(j) for j in sweep_jobs(sweep)]
    fig = sweep_heatmaps(runs, "eval/mean@2", "rollout.workers", "rollout.iterations")
    metric_ax, tokens_ax = fig.axes[:2]  # then the two colour bars
    # rows are iterations (2, 4), columns workers (1, 4); cells are written row by row
    assert [t.get_text() for t in metric_ax.texts] == ["0.250", "0.500", "-", "0.375"]
    assert [t.get_text() for t in tokens_ax.texts] == ["1e+03", "3.5e+03", "-", "2.5e+03"]
    assert [t.get_text() for t in metric_ax.get_xticklabels()] == ["1", "4"]
    assert sweep_heatmaps(runs[:1], "eval/mean@2", "rollout.workers", "rollout.iterations") is None
    assert sweep_heatmaps(runs, "eval/mean@2", "rollout.workers", "debug") is None  # not a number


def test_collect_sweep_prints_the_table_and_writes_json_and_heatmap(sweep):
    p = subprocess.run(
        [sys.executable, "scripts/collect_sweep.py", str(sweep)], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| 10 | 4 | 4 | 0.1250 | 0.3750 | 2,500 | 200 | - |" in p.stdout
    rows = json.loads((sweep / "sweep.json").read_text())
    assert [r["final"] for r in rows] == [0.25, 0.5, None, 0.375]
    assert (sweep / "heatmap.png").stat().st_size > 0
