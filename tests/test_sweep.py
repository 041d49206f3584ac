"""scripts/study.py sweep's bookkeeping: which cells a workers x iterations multirun holds, what
it evaluates (keyed by the job that trained each cell), CISPO's long run (extended when a sweep
needs more steps), the snapshot each cell is paired with (by problem id, within a token ratio),
the learning-rate check, and the report. The runs themselves are ordinary train.py / eval.py
commands; here their result files are written by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import compose_train

from tsd.eval import study
from tsd.eval import sweep as sw
from tsd.eval.paired import paired_by_id


def _result(path: Path, correct: list[int], k: int = 16, reverse: bool = False) -> None:
    """An eval.py results.json; ``reverse`` stores the problem ids last to first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(correct)
    ids = list(range(n))[::-1] if reverse else list(range(n))
    path.write_text(json.dumps({
        "mean@16": sum(correct) / (n * k), "pass@16": sum(c > 0 for c in correct) / n,
        "samples_per_problem": k, "per_problem_correct": {str(i): correct[i] for i in ids},
    }))  # fmt: skip


def _job(sweep: Path, n: int, workers: int, iterations: int, generated: float, lr: float = 3e-4) -> Path:
    job = sweep / str(n)
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    (job / ".hydra" / "overrides.yaml").write_text(
        f"- rollout.workers={workers}\n- rollout.iterations={iterations}\n"
    )
    (job / ".hydra" / "config.yaml").write_text(f"module:\n  optimizer:\n    lr: {lr}\n")
    (job / "results.json").write_text(json.dumps({"compute/generated_tokens": generated, "eval_history": []}))
    return job


def _choose(out: Path, method: str, best: str, n: int = 8) -> None:
    """The study's grid for ``method`` on the validation slice, ``best`` the winning rate."""
    for lr in study.LRS:
        study_val = study.train_dir(out, method, lr, 0) / "val.json"
        _result(study_val, [2 if lr == best else 1] * n)


def _cispo(out: Path, per_step: float = 4500.0) -> None:
    """CISPO chosen at 3e-4; its seed-0 run generated ``per_step`` tokens a step."""
    _choose(out, "cispo", "3e-4")
    f = study.train_dir(out, "cispo", "3e-4", 0) / "results.json"
    f.write_text(json.dumps({"compute/generated_tokens": per_step * study.STEPS}))


def _long_run(d: Path, steps: int, per_step: float = 4500.0, lr: float = 3e-4, first: int = 1) -> Path:
    """A finished long run to ``steps``: its config, CSV curve, checkpoint and the snapshots it
    exported itself (from step ``first``: a resumed run exports only after its checkpoint)."""
    (d / ".hydra").mkdir(parents=True, exist_ok=True)
    (d / ".hydra" / "config.yaml").write_text(f"module:\n  optimizer:\n    lr: {lr}\n")
    (d / "csv").mkdir(exist_ok=True)
    rows = ["step,compute/generated_tokens"] + [f"{s},{per_step * s}" for s in range(1, steps + 1)]
    (d / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    for s in range(sw.SNAPSHOT_EVERY, steps + 1, sw.SNAPSHOT_EVERY):
        if s >= first:
            (d / f"policy_step{s}").mkdir(exist_ok=True)
            (d / f"policy_step{s}" / "tsd_export.json").write_text(json.dumps({"global_step": s}))
    (d / "checkpoints").mkdir(exist_ok=True)
    (d / "checkpoints" / "last.ckpt").write_bytes(b"")
    (d / "results.json").write_text(json.dumps({"global_step": steps}))
    return d


def test_paired_by_id_pairs_problems_not_positions_and_refuses_different_problems():
    a = {"0": 0.0, "1": 0.5, "2": 1.0}
    b = {"2": 1.25, "0": 0.25, "1": 0.75}  # every problem +0.25, stored in another order
    d = paired_by_id(a, b)
    assert d["diff"] == pytest.approx(0.25) and d["ci95"] == pytest.approx((0.25, 0.25)) and d["better"] == 3
    with pytest.raises(ValueError, match=r"1 ids only in the first \['2'\], 0 only in the second"):
        paired_by_id(a, {"0": 0.0, "1": 0.0})


def test_the_sweep_is_evaluated_and_each_cell_paired_with_cispo_at_its_tokens(tmp_path):
    out, sweep = tmp_path / "study", tmp_path / "multirun"
    n = 40
    _job(sweep, 0, 1, 2, 60_000.0)
    _job(sweep, 1, 4, 4, 900_000.0)
    (sweep / "2" / ".hydra").mkdir(parents=True)  # a job that never finished: not a cell
    cells = sw.sweep_cells(sweep)
    assert [(c["workers"], c["iterations"], c["generated"], c["lr"]) for c in cells] == [
        (1, 2, 60e3, 3e-4),
        (4, 4, 900e3, 3e-4),
    ]
    small, big = (c["name"] for c in cells)
    assert small.startswith("sweep_w1_m2_multirun_0_") and big.startswith("sweep_w4_m4_multirun_1_")
    # before the study's CISPO grid is chosen: the cells' evaluations only
    names = [j.name for j in sw.sweep_plan(sweep, out)]
    assert names == [f"validate {small}", f"eval {small} T=1.0", f"validate {big}", f"eval {big} T=1.0"]
    # CISPO chosen at 3e-4, its runs generated 4,500 tokens a step: 900k tokens need 200 steps, x 1.05
    _cispo(out)
    assert sw.cispo_long_steps(out, cells) == 225  # ceil(210 / 25) * 25
    long = sw.sweep_plan(sweep, out)[-1]
    assert long.name == "train cispo long lr=3e-4 to 225 steps"
    assert "trainer.max_steps=225" in long.argv and not any(a.startswith("ckpt_path=") for a in long.argv)
    assert f"callbacks.export.every_n_steps={sw.SNAPSHOT_EVERY}" in long.argv
    assert f"callbacks.checkpoint.every_n_train_steps={sw.SNAPSHOT_EVERY}" in long.argv
    # the long run's curve: 4,500 tokens a step. The 4x4 cell's tokens are step 200's exactly; the
    # 1x2 cell's 60k are nearest step 25's 112.5k (x0.53): outside the tolerance, not evaluated
    d = _long_run(sw.cispo_long_dir(out, "3e-4", 225), 225)
    snap = sw.cispo_snapshot_at(out, "3e-4", 900_000.0)
    assert (snap["step"], snap["within"], snap["name"]) == (200, True, "cispo_long_lr3e-4_s0_225_step200")
    snap = sw.cispo_snapshot_at(out, "3e-4", 60_000.0)
    assert snap["step"] == 25 and snap["token_ratio"] == pytest.approx(60 / 112.5) and not snap["within"]
    # nearest by ratio, not by difference: 150k sits 37.5k above step 25 and 75k below step 50,
    # but x1.33 of the one and x0.67 of the other
    assert sw.cispo_snapshot_at(out, "3e-4", 150_000.0)["step"] == 25
    jobs = sw.sweep_plan(sweep, out)
    assert [j.name for j in jobs if "cispo" in j.name] == ["eval cispo_long_lr3e-4_s0_225_step200 T=1.0"]
    assert f"model.name_or_path={d / 'policy_step200'}" in jobs[-1].argv
    # results per problem that differ from problem to problem: the 4x4 cell solves 2 + i % 4 of 16
    # on problem i, CISPO at step 200 one fewer on every problem, its results stored last id first.
    # Paired by id, every difference is 1/16: a zero-width interval. Paired by position, the
    # differences would range from -2/16 to +4/16.
    _result(out / "eval" / f"{big}_T1.0" / "results.json", [2 + i % 4 for i in range(n)])
    _result(out / "eval" / "cispo_long_lr3e-4_s0_225_step200_T1.0" / "results.json",
            [1 + i % 4 for i in range(n)], reverse=True)  # fmt: skip
    _result(out / "eval" / f"{big}_val.json", [i % 3 for i in range(n)])
    _result(out / "eval" / f"{small}_T1.0" / "results.json", [i % 2 for i in range(n)])
    summary = sw.sweep_report(sweep, out)
    by = {(c["workers"], c["iterations"]): c for c in summary["cells"]}
    c = by[(4, 4)]["cispo"]
    assert c["step"] == 200 and c["token_ratio"] == pytest.approx(1.0) and c["diff"] == pytest.approx(1 / 16)
    assert c["ci95"] == pytest.approx((1 / 16, 1 / 16)) and c["verdict"] == "tree > cispo"
    # the 1x2 cell has its test score, and no verdict: CISPO's nearest snapshot is x0.53 its tokens
    small_row = by[(1, 2)]
    assert small_row["test"] == pytest.approx(0.5 / 16) and "diff" not in small_row["cispo"]
    assert small_row["cispo"]["verdict"] == "withheld (tokens outside 0.80-1.25)"
    md = (sweep / "sweep_report.md").read_text()
    assert md.startswith("The sweep ran at lr 0.0003; the study has not picked the tree arm's rate yet.")
    row = "| 4 | 4 | 900k | 21.88 | 6.09 | 15.62 (200; tokens x1.00) | +6.25 [+6.25, +6.25] | tree > cispo |"
    assert row in md, md
    assert "| 1 | 2 | 60k | 3.12 | - | - (25; tokens x0.53) | - | withheld (tokens outside 0.80-1.25) |" in md
    assert (sweep / "sweep_heatmaps.png").stat().st_size > 10_000


def test_evaluations_are_keyed_by_the_job_that_trained_the_cell(tmp_path):
    """A second multirun into the same --out, or the same multirun trained again, never reads the
    first one's evaluations (they were once named sweep_w{w}_m{m}, and a finished one was kept)."""
    out = tmp_path / "study"
    first = _job(tmp_path / "multirun" / "a", 0, 4, 4, 900_000.0)
    (name,) = (c["name"] for c in sw.sweep_cells(first.parent))
    _result(out / "eval" / f"{name}_T1.0" / "results.json", [3] * 8)
    assert all(j.done_file.exists() for j in sw.sweep_plan(first.parent, out) if j.name.startswith("eval"))
    second = _job(tmp_path / "multirun" / "b", 0, 4, 4, 500_000.0)
    (other,) = (c["name"] for c in sw.sweep_cells(second.parent))
    assert other != name and other.startswith("sweep_w4_m4_b_0_")
    ev = [j for j in sw.sweep_plan(second.parent, out) if j.name.startswith("eval")]
    assert [j.name for j in ev] == [f"eval {other} T=1.0"] and not ev[0].done_file.exists()
    # the first multirun trained again into the same directory: its results.json is newer
    st = (first / "results.json").stat()
    os.utime(first / "results.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (again,) = (c["name"] for c in sw.sweep_cells(first.parent))
    assert again != name
    # two jobs of one multirun with the same workers x iterations (another swept axis): refused
    _job(first.parent, 1, 4, 4, 800_000.0)
    with pytest.raises(
        SystemExit, match="jobs 0 and 1 of .* both ran rollout.workers=4 rollout.iterations=4"
    ):
        sw.sweep_cells(first.parent)


def test_a_sweep_that_needs_more_steps_extends_cispos_long_run(tmp_path):
    out, sweep = tmp_path / "study", tmp_path / "multirun"
    _cispo(out)
    short = _long_run(sw.cispo_long_dir(out, "3e-4", 225), 225)
    _long_run(out / "runs" / "cispo_long_lr1e-4_s0_1000", 1000, lr=1e-4)  # another rate: not CISPO's pick
    _job(sweep, 0, 4, 4, 900_000.0)
    assert [
        j.name for j in sw.sweep_plan(sweep, out) if j.name.startswith("train")
    ] == []  # 225 steps reach it
    # a later sweep with a cell at 1.8M tokens needs 1.8M / 4,500 x 1.05 = 420 -> 425 steps: a longer
    # run, resumed from the 225-step run's checkpoint (the 1000-step run is at another rate)
    _job(sweep, 1, 16, 8, 1_800_000.0)
    (long,) = [j for j in sw.sweep_plan(sweep, out) if j.name.startswith("train")]
    assert long.name == "train cispo long lr=3e-4 to 425 steps"
    assert f"ckpt_path={short / 'checkpoints' / 'last.ckpt'}" in long.argv
    assert f"hydra.run.dir={sw.cispo_long_dir(out, '3e-4', 425)}" in long.argv
    # stopped part-way, it resumes from its own last checkpoint
    own = sw.cispo_long_dir(out, "3e-4", 425) / "checkpoints"
    own.mkdir(parents=True)
    (own / "last.ckpt").write_bytes(b"")
    (long,) = [j for j in sw.sweep_plan(sweep, out) if j.name.startswith("train")]
    assert f"ckpt_path={own / 'last.ckpt'}" in long.argv
    # finished (its log carries the first 225 steps; it exported 250..425 itself): both cells are
    # paired with a snapshot of either run, the nearest by ratio
    _long_run(sw.cispo_long_dir(out, "3e-4", 425), 425, first=226)
    assert [j.name for j in sw.sweep_plan(sweep, out) if "cispo" in j.name] == [
        "eval cispo_long_lr3e-4_s0_225_step200 T=1.0",
        "eval cispo_long_lr3e-4_s0_425_step400 T=1.0",
    ]


def test_the_report_refuses_evaluations_of_different_problems_and_flags_another_rate(tmp_path):
    out, sweep = tmp_path / "study", tmp_path / "multirun"
    _cispo(out)
    _long_run(sw.cispo_long_dir(out, "3e-4", 225), 225)
    (cell,) = sw.sweep_cells(_job(sweep, 0, 4, 4, 900_000.0, lr=1e-4).parent)
    _result(out / "eval" / f"{cell['name']}_T1.0" / "results.json", [2 + i % 4 for i in range(40)])
    _result(out / "eval" / "cispo_long_lr3e-4_s0_225_step200_T1.0" / "results.json", [1] * 39)
    with pytest.raises(
        SystemExit,
        match=r"scored different problems: 0 ids only in the first \[\], 1 only in the second \[.39.\]",
    ):
        sw.sweep_report(sweep, out)
    _result(out / "eval" / "cispo_long_lr3e-4_s0_225_step200_T1.0" / "results.json", [1] * 40)
    _choose(out, "tree", "3e-4")  # the study picked 3e-4 for the tree arm; the sweep ran at 1e-4
    sw.sweep_report(sweep, out)
    md = (sweep / "sweep_report.md").read_text()
    assert md.startswith("**The sweep ran at lr 0.0001, not at the study's pick for the tree arm (3e-4)**")
    _job(sweep, 0, 4, 4, 900_000.0, lr=3e-4)  # the same job at the pick
    assert sw.lr_note(sw.sweep_report(sweep, out)["lr"]) is None


def test_the_sweep_config_trains_at_the_tree_experiments_rate(tmp_path):
    """mcts_scaling.yaml sets no rate of its own: the cells run at tree_countdown's (the study's
    pick), which the report then checks against the study's grid."""
    sweep = compose_train(["hparams_search=mcts_scaling"], tmp_path)
    tree = compose_train(["experiment=tree_countdown"], tmp_path)
    assert sweep.module.optimizer.lr == tree.module.optimizer.lr == 3e-4
    assert sweep.task_name == "tree_countdown" and sweep.trainer.max_steps == 150
