"""Training to a plateau (``stop=plateau``, src/tsd/callbacks/stopping.py) on real short runs of the
bundled policy: the rule stops the run, the validation-best policy is exported, results.json says
why the run stopped, a resumed run stops where an uninterrupted one does, and the token budget
stops a run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_train

from tsd.models.loading import load_policy

#: the smoke run with the plateau rule, evaluating 8 validation problems every 2 optimiser steps;
#: min_delta 1.0 means no evaluation after the first counts as an improvement, so with patience 2
#: the evaluations at steps 2 (the best), 4 and 6 stop the run at step 6 of 20
PLATEAU = [
    "experiment=cispo_countdown",
    "stop=plateau",
    "debug=smoke",
    "data.batch_size=16",  # one rollout (2 problems x group 8) per step
    "callbacks.eval.at_start=false",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.val.num_problems=8",
    "callbacks.val.k=2",
    "callbacks.val.every_n_tokens=0",
    "callbacks.val.every_n_steps=2",
    "callbacks.early_stop.patience=2",
    "callbacks.early_stop.min_delta=1.0",
]


def _run(overrides, out):
    from tsd.train import train

    return train(compose_train(overrides, out))


def _weights(path):
    return load_policy(path)[0].state_dict()


@pytest.mark.slow
def test_plateau_rule_stops_exports_the_best_and_resumes_where_it_would_have_stopped(policy_dir, tmp_path):
    common = [*PLATEAU, f"model.name_or_path={policy_dir}"]
    c = tmp_path / "straight"
    res = _run([*common, "trainer.max_steps=20"], c)
    # stopped by the rule, not by the step cap: evaluations at 2, 4, 6; the best is step 2's
    assert res["global_step"] == 6
    assert res["stop_reason"].startswith("plateau: val/mean@2 did not improve")
    assert [r["step"] for r in res["val_history"]] == [0, 2, 4, 6]
    assert res["best"]["step"] == 2 and res["best"]["score"] == res["val_history"][1]["val/mean@2"]
    on_disk = json.loads((c / "results.json").read_text())
    assert on_disk["stop_reason"] == res["stop_reason"] and on_disk["best"] == res["best"]
    # policy_best/ holds the weights of step 2, policy/ those of step 6: different, both loadable
    best, last = _weights(c / "policy_best"), _weights(c / "policy")
    assert json.loads((c / "policy_best" / "tsd_export.json").read_text())["global_step"] == 2
    assert any(not torch.equal(best[k], last[k]) for k in last)
    ckpt = torch.load(res["best"]["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    lm = {k[len("policy.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
    assert all(torch.equal(lm[k], best[k]) for k in best)  # the exported best is that checkpoint

    # interrupted at step 4 (an evaluation step), resumed: the same stop, the same best, the very
    # weights of the uninterrupted run
    a, b = tmp_path / "first", tmp_path / "resumed"
    first = _run([*common, "trainer.max_steps=4"], a)
    assert first["global_step"] == 4 and first["stop_reason"] == "max_steps: 4 optimiser steps"
    res_b = _run([*common, "trainer.max_steps=20", f"ckpt_path={a / 'checkpoints' / 'last.ckpt'}"], b)
    assert res_b["global_step"] == 6 and res_b["stop_reason"] == res["stop_reason"]
    assert [r["step"] for r in res_b["val_history"]] == [0, 2, 4, 6]
    assert res_b["best"]["step"] == 2
    resumed = _weights(b / "policy")
    assert all(torch.equal(resumed[k], last[k]) for k in last)
    best_b = _weights(b / "policy_best")
    assert all(torch.equal(best_b[k], best[k]) for k in best)


@pytest.mark.slow
def test_token_budget_stops_the_run_and_says_so(policy_dir, tmp_path):
    res = _run(
        [*PLATEAU, f"model.name_or_path={policy_dir}", "trainer.max_steps=20",
         "callbacks.token_budget.max_generated_tokens=1000", "callbacks.early_stop.patience=10"],
        tmp_path,
    )  # fmt: skip
    gen = res["compute/generated_tokens"]
    assert res["stop_reason"] == f"token budget: {int(gen):,} generated tokens >= 1,000"
    assert gen >= 1000 and res["global_step"] < 20
    # the step that ended the run was evaluated (in time for the best checkpoint to consider it)
    assert res["val_history"][-1]["step"] == res["global_step"]


def test_plateau_config_names_what_a_bad_value_breaks(tmp_path):
    from tsd.callbacks.stopping import PlateauStop, TokenBudget
    from tsd.config import ConfigError

    with pytest.raises(ConfigError, match="callbacks.early_stop.patience: 0 is out of range"):
        PlateauStop(patience=0)
    with pytest.raises(ConfigError, match="callbacks.early_stop.min_delta"):
        PlateauStop(min_delta=-0.1)
    with pytest.raises(ConfigError, match="monitor"):
        PlateauStop(monitor="mean16")
    with pytest.raises(ConfigError, match="callbacks.token_budget.max_generated_tokens"):
        TokenBudget(0)


@pytest.mark.slow
def test_a_run_stopped_by_the_budget_goes_on_from_where_it_stopped_under_a_higher_one(policy_dir, tmp_path):
    """The plateau study raises its cap: a run the old cap stopped resumes in its own directory
    from the checkpoint of the step it stopped at (not the last periodic one), keeps its validation
    history and best, stops at the new cap, and ends with the weights of a run that had the higher
    cap from the start."""
    common = [*PLATEAU, f"model.name_or_path={policy_dir}", "trainer.max_steps=20",
              "callbacks.early_stop.patience=10"]  # fmt: skip
    d = tmp_path / "extended"
    first = _run([*common, "callbacks.token_budget.max_generated_tokens=1500"], d)  # ~580 tokens a step
    gen1, step1 = int(first["compute/generated_tokens"]), first["global_step"]
    assert first["stop_reason"].startswith("token budget") and first["val_history"][-1]["step"] == step1
    last = d / "checkpoints" / "last.ckpt"
    # a step between two periodic checkpoints (every 2 steps here), saved at the stop
    assert step1 % 2 and torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step1
    more = _run([*common, "callbacks.token_budget.max_generated_tokens=3500", f"ckpt_path={last}"], d)
    gen2 = int(more["compute/generated_tokens"])
    assert more["stop_reason"] == f"token budget: {gen2:,} generated tokens >= 3,500"
    assert gen2 > gen1 and more["global_step"] > step1
    steps = [r["step"] for r in more["val_history"]]
    assert steps[: len(first["val_history"])] == [r["step"] for r in first["val_history"]]  # kept
    assert (
        steps == sorted(set(steps)) and steps[-1] == more["global_step"]
    )  # none repeated, the last evaluated
    assert more["best"]["score"] >= first["best"]["score"]
    straight = _run([*common, "callbacks.token_budget.max_generated_tokens=3500"], tmp_path / "straight")
    assert (
        straight["global_step"] == more["global_step"] and int(straight["compute/generated_tokens"]) == gen2
    )
    a, b = _weights(d / "policy"), _weights(tmp_path / "straight" / "policy")
    assert all(torch.equal(a[k], b[k]) for k in a)
