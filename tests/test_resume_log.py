"""The log of a resumed run reads as one run: ``csv/metrics.csv`` of a run resumed into its own
directory, or into a new one, has the rows of an uninterrupted run, each step once and each
evaluation once, with the same training values (single-process resume is bit-exact).

    python -m pytest tests/test_resume_log.py -q
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_train

RUN = [
    "experiment=cispo_countdown",
    "debug=smoke",
    "callbacks.eval.every_n_steps=2",
    "callbacks.export=null",
]


def _train(overrides: list[str], out: Path) -> dict:
    from tsd.train import train

    return train(compose_train([*RUN, *overrides], out))


def _rows(out: Path) -> list[tuple[int, str, str]]:
    """(step, kind, value) per row: train rows carry train/loss, eval rows eval/mean@2."""
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    kinds = []
    for r in rows:
        kind = "eval" if r.get("eval/mean@2") else "train" if r.get("train/loss") else "other"
        kinds.append((int(r["step"]), kind, r.get("eval/mean@2") or r.get("train/loss")))
    return sorted(kinds)  # the file's order is the logging order: an evaluation comes before the
    # train row of its step, which Lightning logs after the callbacks


@pytest.mark.slow
def test_resumed_log_reads_as_one_run_in_the_same_and_in_a_new_directory(policy_dir, tmp_path):
    model = f"model.name_or_path={policy_dir}"
    straight = tmp_path / "straight"
    _train([model, "trainer.max_steps=4"], straight)
    want = _rows(straight)
    # evaluations at steps 0, 2 and 4 (the weights after that many optimiser steps), train rows at
    # the optimiser step they took, 1..4: the train row and the evaluation of step 2 share the step
    assert [(s, k) for s, k, _ in want] == [
        (0, "eval"),
        (1, "train"),
        (2, "eval"),
        (2, "train"),
        (3, "train"),
        (4, "eval"),
        (4, "train"),
    ], want

    # a run checkpointed at step 2 (after its evaluation at 2) that went on to step 3 and then ended
    # with a final evaluation at 3: the rows after the checkpoint are not part of the resumed run
    run = tmp_path / "run"
    # (every periodic checkpoint kept: last.ckpt is saved again at the step the run ends)
    _train([model, "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=2",
            "callbacks.checkpoint.save_top_k=-1"], run)  # fmt: skip
    (ckpt,) = (run / "checkpoints").glob("*step=2.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
    assert (
        torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
        == 3
    )
    assert (3, "eval") in [(s, k) for s, k, _ in _rows(run)]
    saved = tmp_path / "step2.ckpt"
    shutil.copy(ckpt, saved)

    elsewhere = tmp_path / "elsewhere"
    _train([model, "trainer.max_steps=4", f"ckpt_path={saved}"], elsewhere)
    assert _rows(elsewhere) == want

    res = _train([model, "trainer.max_steps=4", f"ckpt_path={saved}"], run)  # the same directory
    assert _rows(run) == want
    assert [h["step"] for h in res["eval_history"]] == [0, 2, 4]  # no extra evaluation at 2 or 3


def test_a_checkpoint_from_before_rows_had_their_optimiser_step_keeps_its_log_in_one_convention(tmp_path):
    """Checkpoints written when a train row's step was the one before its optimiser step record
    ``rows_at_step``: their log is kept by the old rule (the rows logged at the checkpoint's step
    before it was written: its evaluations) and their train rows are moved up one step, so the
    resumed log reads in one convention."""
    from tsd.callbacks.resume_log import ResumeLog

    old_csv = tmp_path / "metrics.csv"
    rows = [  # an old run checkpointed at step 2, then step 3 and a final evaluation
        {"step": "0", "eval/mean@2": "0.1", "train/loss": ""},
        {"step": "0", "eval/mean@2": "", "train/loss": "1.0"},  # optimiser step 1
        {"step": "1", "eval/mean@2": "", "train/loss": "0.9"},  # 2
        {"step": "2", "eval/mean@2": "0.2", "train/loss": ""},  # before the checkpoint
        {"step": "2", "eval/mean@2": "", "train/loss": "0.8"},  # 3, after it
        {"step": "3", "eval/mean@2": "0.3", "train/loss": ""},
    ]
    with open(old_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    state = {"step": 2, "files": [{"path": str(old_csv), "rows_at_step": 1}]}
    torch.save({"global_step": 2, "callbacks": {"ResumeLog": state}}, tmp_path / "old.ckpt")
    (carry,) = ResumeLog(str(tmp_path / "old.ckpt"))._carry
    kept = [(int(r["step"]), "eval" if r["eval/mean@2"] else "train") for r in carry]
    assert kept == [(0, "eval"), (1, "train"), (2, "train"), (2, "eval")]
