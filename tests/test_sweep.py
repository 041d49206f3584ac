"""scripts/study.py sweep's bookkeeping: which cells a workers x iterations multirun holds, what
it evaluates, CISPO's long run and the snapshot each cell is paired with, and the report. The runs
themselves are ordinary train.py / eval.py commands; here their result files are written by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsd.eval import study
from tsd.eval import sweep as sw


def _result(path: Path, correct: list[int], k: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(correct)
    path.write_text(json.dumps({
        "mean@16": sum(correct) / (n * k), "pass@16": sum(c > 0 for c in correct) / n,
        "samples_per_problem": k, "per_problem_correct": {str(i): c for i, c in enumerate(correct)},
    }))  # fmt: skip


def _job(sweep: Path, n: int, workers: int, iterations: int, generated: float) -> Path:
    job = sweep / str(n)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(
        f"- rollout.workers={workers}\n- rollout.iterations={iterations}\n"
    )
    (job / "results.json").write_text(json.dumps({"compute/generated_tokens": generated, "eval_history": []}))
    return job


def test_the_sweep_is_evaluated_and_each_cell_paired_with_cispo_at_its_tokens(tmp_path):
    out, sweep = tmp_path / "study", tmp_path / "multirun"
    n = 40
    _job(sweep, 0, 1, 2, 60_000.0)
    _job(sweep, 1, 4, 4, 900_000.0)
    (sweep / "2" / ".hydra").mkdir(parents=True)  # a job that never finished: not a cell
    cells = sw.sweep_cells(sweep)
    assert [(c["workers"], c["iterations"], c["generated"]) for c in cells] == [(1, 2, 60e3), (4, 4, 900e3)]
    # before the study's CISPO grid is chosen: the cells' evaluations only
    names = [j.name for j in sw.sweep_plan(sweep, out)]
    assert names == [
        "validate cell w1 m2",
        "eval sweep_w1_m2 T=1.0",
        "validate cell w4 m4",
        "eval sweep_w4_m4 T=1.0",
    ]
    # CISPO chosen at 3e-4, its runs generated 4,500 tokens a step: 900k tokens need 200 steps, x 1.05
    for lr, c in (("3e-5", 1), ("1e-4", 2), ("3e-4", 3)):
        _result(study.train_dir(out, "cispo", lr, 0) / "val.json", [c] * n)
    f = study.train_dir(out, "cispo", "3e-4", 0) / "results.json"
    f.write_text(json.dumps({"compute/generated_tokens": 4500.0 * study.STEPS}))
    assert sw.cispo_long_steps(out, cells) == 225  # ceil(210 / 25) * 25
    long = {j.name: j for j in sw.sweep_plan(sweep, out)}["train cispo long"]
    assert (
        "trainer.max_steps=225" in long.argv
        and f"callbacks.export.every_n_steps={sw.SNAPSHOT_EVERY}" in long.argv
    )
    # the long run's curve: 4,500 tokens a step; its snapshots nearest each cell's tokens
    d = sw.cispo_long_dir(out)
    (d / "csv").mkdir(parents=True)
    rows = ["step,compute/generated_tokens"] + [f"{s},{4500.0 * s}" for s in range(1, 226)]
    (d / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    (d / "results.json").write_text("{}")
    assert sw.cispo_step_at(out, 60_000.0) == 25 and sw.cispo_step_at(out, 900_000.0) == 200
    evals = [j.name for j in sw.sweep_plan(sweep, out) if j.name.startswith("eval cispo")]
    assert evals == ["eval cispo_step25 T=1.0", "eval cispo_step200 T=1.0"]
    # results: the 4x4 cell solves 3/16 of every problem, CISPO at step 200 2/16
    _result(out / "eval" / "sweep_w4_m4_T1.0" / "results.json", [3] * n)
    _result(out / "eval" / "cispo_step200_T1.0" / "results.json", [2] * n)
    _result(sweep / "1" / "val.json", [1] * n)
    summary = sw.sweep_report(sweep, out)
    by = {(c["workers"], c["iterations"]): c for c in summary["cells"]}
    assert by[(1, 2)]["test"] is None and "cispo" not in by[(1, 2)]
    c = by[(4, 4)]["cispo"]
    assert c["step"] == 200 and c["token_ratio"] == pytest.approx(1.0) and c["diff"] == pytest.approx(1 / 16)
    assert c["verdict"] == "tree > cispo"
    md = (sweep / "sweep_report.md").read_text()
    assert (
        "| 4 | 4 | 900k | 18.75 | 6.25 | 12.50 (200; tokens x1.00) | +6.25 [+6.25, +6.25] | tree > cispo |"
        in md
    ), md
    assert (sweep / "sweep_heatmaps.png").stat().st_size > 10_000
