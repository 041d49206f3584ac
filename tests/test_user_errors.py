"""A user's mistake gets one clear line and exit code 2, before any compute, and leaves nothing a
later run could take for a result. Each bad command runs as the user types it, in a subprocess.

    python -m pytest tests/test_user_errors.py -q

What "before any compute" means here: ``train.py`` / ``eval.py`` log ``loading policy ...`` just
before they load the model (``test_entrypoints.py`` checks that a good run does print it); a bad
command must fail before that line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
#: bounds a hang; what a failing command costs is printed, not asserted
TIMEOUT = 180


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "empty_model").mkdir()
    (d / "corrupt.ckpt").write_bytes(os.urandom(4096))
    torch.save({"weights": torch.zeros(2)}, d / "not_a_checkpoint.ckpt")
    (d / "bad_problems").mkdir()
    for split in ("train", "test"):
        (d / "bad_problems" / f"{split}.jsonl").write_text(
            '{"numbers": [1, 2, 3, 4], "target": 10}\n{"numbers": [1,\n'
        )
    return d


# (script, overrides, the field the one line must name); {d} is the bad_inputs directory
BAD_COMMANDS = [
    ("train.py", ["model.name_or_path={d}/no_such_model"], "model.name_or_path"),
    ("train.py", ["model.name_or_path={d}/empty_model"], "model.name_or_path"),
    ("train.py", ["ckpt_path={d}/corrupt.ckpt"], "ckpt_path"),
    ("train.py", ["ckpt_path={d}/not_a_checkpoint.ckpt"], "ckpt_path"),
    ("train.py", ["ckpt_path={d}/missing.ckpt"], "ckpt_path"),
    ("train.py", ["ckpt_path=https://example.com/last.ckpt"], "ckpt_path"),
    ("train.py", ["data.max_wait=0"], "data.max_wait"),
    ("train.py", ["sampler.top_p=2"], "sampler.top_p"),
    ("train.py", ["module.grad_clip=-1"], "module.grad_clip"),
    ("train.py", ["seed=abc"], "seed"),
    ("train.py", ["env.n_train=0"], "env.n_train"),
    ("train.py", ["env.data_dir={d}/bad_problems"], "env.data_dir"),
    ("train.py", ["+data.batchsize=4"], "data.batchsize"),  # a typo of data.batch_size
    ("train.py", ["+sampler.topp=0.9"], "sampler.topp"),  # a typo of a _target_'s argument
    ("train.py", ["run_id=has/slash"], "run_id"),
    ("train.py", ["buffer=redis", "buffer.ttl_s=0"], "buffer"),  # refused before any connection
    # one process would run identical copies of one generation on each device
    ("train.py", ["trainer.devices=2"], "trainer.devices"),
    ("eval.py", ["model.name_or_path={d}/no_such_model"], "model.name_or_path"),
    ("eval.py", ["+eval.kk=4"], "eval.kk"),
    ("eval.py", ["search=mcts", "search.graded=maybe"], "search.graded"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,overrides,field", BAD_COMMANDS, ids=[f"{s}:{' '.join(o)}" for s, o, _ in BAD_COMMANDS]
)
def test_bad_command_exits_2_with_one_line_before_the_model_loads(
    script, overrides, field, bad_inputs, policy_dir, tmp_path
):
    run_dir = tmp_path / "run"
    args = [o.format(d=bad_inputs) for o in overrides]
    if not any(a.startswith("model.name_or_path=") for a in args):
        args.append(f"model.name_or_path={policy_dir}")
    if script == "train.py":
        args = ["experiment=cispo_countdown", "debug=smoke", *args]
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, script, *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    seconds = time.monotonic() - t0
    out = p.stdout + p.stderr
    print(f"{script} {' '.join(overrides)}: exit {p.returncode} after {seconds:.1f}s")
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, out[-3000:]
    assert f"config error: {field}:" in errors[0], errors[0]
    assert "loading policy" not in out  # failed before the model was loaded
    # Hydra's own record of the command is all there is: no csv/, checkpoints/, results.json
    assert {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log", "evaluate.log"}


@pytest.mark.slow
def test_another_rollout_on_the_default_experiment_is_told_to_pick_its_experiment(tmp_path):
    """The default experiment distils an MCTS tree (it pins the rollout's emission subgroup):
    ``rollout=best_of_n`` on top of it gets one line naming the experiments, not Hydra's
    "Could not override 'rollout/emission'"."""
    p = subprocess.run(
        [sys.executable, "train.py", "rollout=best_of_n", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "config error: rollout=best_of_n:" in errors[0], out[-3000:]
    assert "experiment=bon_countdown" in errors[0] and "~experiment" in errors[0]
    assert not (tmp_path / "run").exists()  # refused before Hydra made anything


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from tsd.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_the_default_search_with_sampler_vllm_is_not_refused():
    """Both samplers sample without replacement now: the laptop default search composes and
    validates with sampler=vllm (it was refused while only HFSampler could)."""
    from tsd.evaluate import _validate as validate_eval
    from tsd.train import _validate as validate_train

    cfg = _compose("train", ["rollout=mcts", "sampler=vllm"])
    assert cfg.rollout.without_replacement is True
    validate_train(cfg)
    ev = _compose("eval", ["search=mcts", "sampler=vllm"])
    assert ev.search.rollout.without_replacement is True
    validate_eval(ev)


EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("overrides", [[f"experiment={e}"] for e in EXPERIMENTS] + [["debug=smoke"]])
def test_every_experiment_passes_the_unknown_key_checks(overrides):
    """The key lists in train.py / eval.py cover every shipped config: a new key in a YAML that
    train() reads must be added there, or every run of that config is refused."""
    from tsd.config_checks import check_known_keys, check_target_keys
    from tsd.evaluate import KNOWN_KEYS as EVAL_KEYS
    from tsd.train import KNOWN_KEYS

    cfg = _compose("train", overrides)
    check_known_keys(cfg, KNOWN_KEYS, containers=("callbacks", "logger"))
    check_target_keys(cfg)
    for search in ([], ["search=mcts"], ["search=mcts_value"]):
        ev = _compose("eval", search)
        check_known_keys(ev, EVAL_KEYS)
        check_target_keys(ev)


@pytest.mark.parametrize(
    "name", ["{cwd}/no_such_policy", "{cwd}/empty_model", "outputs/no_such_policy", "./nope"]
)
def test_load_policy_from_python_refuses_a_missing_path_without_asking_the_hub(name, tmp_path, monkeypatch):
    """``load_policy`` called from Python checks the path as the entry points do: a local path that
    does not exist is refused with the entry points' message, at once, and no socket is opened
    (before, ``load_policy("outputs/no_such_policy")`` asked huggingface.co, with five retries)."""
    from tsd.config import ConfigError
    from tsd.models.loading import load_policy

    (tmp_path / "outputs").mkdir()  # so that outputs/no_such_policy reads as a local path
    (tmp_path / "empty_model").mkdir()
    monkeypatch.chdir(tmp_path)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    opened: list[object] = []

    def no_network(*args, **kwargs):
        opened.append(args)
        raise OSError("the test forbids network access")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    path = name.format(cwd=tmp_path)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"^model\.name_or_path: .*(does not exist|holds no model)"):
        load_policy(path)
    assert time.monotonic() - t0 < 5 and opened == []
