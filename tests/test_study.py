"""scripts/study.py's bookkeeping: which rate the grid picks, what a study cut short reports, and
the docs/study.md block it regenerates. The runs themselves are ordinary train.py / eval.py commands
(test_configs checks that each composes); here their result files are written by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsd.eval import study


def _result(path: Path, correct: list[int], k: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(correct)
    path.write_text(json.dumps({
        "mean@16": sum(correct) / (n * k), "pass@16": sum(c > 0 for c in correct) / n,
        "samples_per_problem": k, "per_problem_correct": {str(i): c for i, c in enumerate(correct)},
    }))  # fmt: skip


def test_the_grid_picks_the_best_validated_rate_and_a_short_study_still_compares(tmp_path):
    out = tmp_path / "study"
    n = 64
    _result(out / "eval" / "base_val.json", [1] * n)
    for lr, c in (("3e-5", 2), ("1e-4", 4), ("3e-4", 3)):
        _result(study.train_dir(out, "cispo", lr, 0) / "val.json", [c] * (n // 2) + [c - 1] * (n // 2))
    _result(study.train_dir(out, "bon", "1e-4", 0) / "val.json", [1] * n)  # one rate of three so far
    assert study.best_lr(out, "cispo") == "1e-4"
    assert study.best_lr(out, "bon") is None  # not every rate validated yet
    jobs = {j.name: j for j in study.plan(out)}
    assert "train cispo lr=1e-4 seed=1" in jobs and "train bon lr=1e-4 seed=1" not in jobs
    # an evaluation waits for its training run (it once started on a policy not trained yet)
    assert jobs["eval cispo_s1 T=1.0"].after == ["train cispo lr=1e-4 seed=1"]
    # a run whose log is being written (a stopped study.py left it running) is not started twice
    seed1 = jobs["train cispo lr=1e-4 seed=1"]
    assert not study._live_elsewhere(seed1)
    seed1.done_file.parent.mkdir(parents=True)
    (seed1.done_file.parent / "train.log").write_text("step 5/150\n")
    assert study._live_elsewhere(seed1)

    summary = study.report(out)
    cispo = summary["methods"]["cispo"]
    assert cispo["lr"] == "1e-4" and set(cispo["val"]) == {"3e-5", "1e-4", "3e-4"}
    pairs = {(p["lr"], p["a"], p["b"]): p for p in summary["val_pairs"]}
    # cispo at 1e-4 scores 3.5/16 per problem on average, the base 1/16: +2.5/16, every problem better
    p = pairs[("1e-4", "base", "cispo")]
    assert p["diff"] == pytest.approx(2.5 / 16) and p["verdict"] == "cispo > base"
    # bon equals the base on every problem: a zero-width interval holding 0
    assert pairs[("1e-4", "base", "bon")]["verdict"] == "no difference"
    assert pairs[("1e-4", "cispo", "bon")]["verdict"] == "cispo > bon"
    md = (out / "study.md").read_text()
    assert "| best-of-16 | not chosen yet (- / 6.25 / -) |" in md, md
    assert (out / "study.png").stat().st_size > 10_000


def test_the_doc_block_is_regenerated_between_its_markers(tmp_path):
    readme = tmp_path / "study.md"
    readme.write_text(f"# x\n\nbefore\n{study.BEGIN}\nold table\n{study.END}\nafter\n")
    study.write_doc_block(readme, "| new | table |\n")
    text = readme.read_text()
    assert "old table" not in text and "| new | table |" in text
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{study.END}\nafter\n")
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="no '<!-- study.py report: begin -->'"):
        study.write_doc_block(readme, "t")


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
    cells = study.sweep_cells(sweep)
    assert [(c["workers"], c["iterations"], c["generated"]) for c in cells] == [(1, 2, 60e3), (4, 4, 900e3)]
    # before the study's CISPO grid is chosen: the cells' evaluations only
    names = [j.name for j in study.sweep_plan(sweep, out)]
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
    assert study.cispo_long_steps(out, cells) == 225  # ceil(210 / 25) * 25
    long = {j.name: j for j in study.sweep_plan(sweep, out)}["train cispo long"]
    assert (
        "trainer.max_steps=225" in long.argv
        and f"callbacks.export.every_n_steps={study.SNAPSHOT_EVERY}" in long.argv
    )
    # the long run's curve: 4,500 tokens a step; its snapshots nearest each cell's tokens
    d = study.cispo_long_dir(out)
    (d / "csv").mkdir(parents=True)
    rows = ["step,compute/generated_tokens"] + [f"{s},{4500.0 * s}" for s in range(1, 226)]
    (d / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    (d / "results.json").write_text("{}")
    assert study.cispo_step_at(out, 60_000.0) == 25 and study.cispo_step_at(out, 900_000.0) == 200
    evals = [j.name for j in study.sweep_plan(sweep, out) if j.name.startswith("eval cispo")]
    assert evals == ["eval cispo_step25 T=1.0", "eval cispo_step200 T=1.0"]
    # results: the 4x4 cell solves 3/16 of every problem, CISPO at step 200 2/16
    _result(out / "eval" / "sweep_w4_m4_T1.0" / "results.json", [3] * n)
    _result(out / "eval" / "cispo_step200_T1.0" / "results.json", [2] * n)
    _result(sweep / "1" / "val.json", [1] * n)
    summary = study.sweep_report(sweep, out)
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
