"""``logger=wandb`` runs, offline, read back from their files: the resolved config and the run's
identity, group / job type / tags, the compute axes declared with ``define_metric``, and at each
evaluation a table of sampled completions and a picture of a search tree. (The multirun's grouping
is checked in tests/test_entrypoints.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from wandb_offline import offline_runs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}


def test_logger_groups_a_single_run_by_its_experiment(tmp_path):
    from tsd.loggers.wandb_run import WandbRunLogger

    lg = WandbRunLogger(experiment_name="cispo_countdown", tags=["cispo"], save_dir=str(tmp_path))
    init = lg._wandb_init  # what wandb.init will get (no run is started here)
    assert (init["group"], init["job_type"], init["name"]) == ("cispo_countdown", "train", "cispo_countdown")
    assert init["tags"] == ["cispo"] and init["project"] == "tsd"
    lg = WandbRunLogger(experiment_name="x", group="g", job_type="eval", name="n", save_dir=str(tmp_path))
    assert (lg._wandb_init["group"], lg._wandb_init["job_type"], lg._wandb_init["name"]) == ("g", "eval", "n")


@pytest.mark.slow
def test_wandb_run_carries_config_axes_samples_and_tree(policy_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        "train.py",
        "experiment=mcts_countdown",
        "debug=smoke",
        "logger=many",
        f"model.name_or_path={policy_dir}",
        "rollout.workers=2",
        "rollout.c_puct=0.7",
        f"hydra.run.dir={out}",
    ]
    p = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (run,) = offline_runs(out)

    # identity: group / job type / name / tags
    assert (run.run.run_group, run.run.job_type, run.run.display_name) == (
        "mcts_countdown",
        "train",
        "mcts_countdown",
    )
    assert set(run.run.tags) == {"mcts", "countdown"} and run.run.project == "tsd"

    # the resolved config, with the overrides applied, and the run's identity
    cfg = run.config
    assert cfg["rollout"]["workers"] == 2 and cfg["rollout"]["c_puct"] == 0.7
    assert cfg["rollout"]["_target_"] == "tsd.rollouts.mcts.MCTSRollout"
    assert cfg["model"]["name_or_path"] == str(policy_dir) and cfg["loss"]["c_kl"] >= 0
    assert cfg["paths"]["output_dir"] == str(out)  # interpolations resolved
    info = cfg["run"]
    assert info["experiment"] == "mcts_countdown" and info["method"] == "MCTSRollout+CISPOLoss"
    assert "rollout.workers=2" in info["overrides"] and "rollout.c_puct=0.7" in info["overrides"]
    assert info["multirun"] is False
    if shutil.which("git") and (ROOT / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert info["git_commit"] == head
    # the CSV logger got the same config (scripts/report.py reads it)
    hp = yaml.safe_load((out / "csv" / "hparams.yaml").read_text())
    assert hp["run"]["method"] == "MCTSRollout+CISPOLoss" and hp["rollout"]["workers"] == 2

    # compute axes declared as x-axes; eval curves drawn against generated tokens
    metrics = {(m.name or m.glob_name): m for m in run.metrics}
    for axis in ("compute/generated_tokens", "compute/trained_tokens"):
        assert metrics[axis].summary.max
    assert metrics["eval/*"].step_metric == "compute/generated_tokens"

    # every evaluation (steps 0 and 3): scalars + both compute axes + the table + the tree, one row
    evals = [h for h in run.history if "eval/mean@2" in h]
    assert [h["trainer/global_step"] for h in evals] == [0, 3]
    gen = [h["compute/generated_tokens"] for h in evals]
    assert gen[0] == 0 and gen[1] > 0 and evals[1]["compute/trained_tokens"] > 0
    for h in evals:
        table, tree = h["eval/samples"], h["eval/search_tree"]
        assert table["_type"] == "table-file" and tree["_type"] == "image-file" and tree["format"] == "png"
        data = json.loads((run.dir / "files" / table["path"]).read_text())
        assert data["columns"] == ["problem", "completion", "reward", "correct"]
        rows = data["data"]
        assert len(rows) == 4  # 2 problems x k=2, fewer than table_rows
        assert rows[0][0] != rows[1][0]  # the first sample of every problem comes first
        for problem, completion, reward, correct in rows:
            assert "->" in problem and isinstance(completion, str)
            assert -1.0 <= reward <= 1.0 and (reward == 1.0) == correct
        png = run.dir / "files" / tree["path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and tree["width"] > 300 and tree["height"] > 200
        assert "->" in tree["caption"] and "nodes" in tree["caption"]
    # the same trees, drawn by tsd.viz.tree, are kept in the run directory
    drawn = json.loads((out / "trees" / "tree_step3.json").read_text())
    assert len(drawn["nodes"]) > 1 and drawn["knobs"]["workers"] == 2 and drawn["problem"]["id"] is not None

    # the run was finished (Lightning leaves W&B runs open)
    assert len(run.exits) == 1 and run.exits[0].exit_code == 0
    # the compute axes' summaries are their maxima (the run's totals)
    assert run.summary["compute/generated_tokens"] == {"max": max(gen)}
