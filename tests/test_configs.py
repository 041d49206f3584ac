"""Every config composes, every ``_target_`` accepts the keys its YAML gives it, and bad values
fail early with the field's name."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

from tsd.config import config_dir

CONFIGS = Path(config_dir())
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
GROUP_OPTIONS = {
    g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml"))
    for g in ("model", "sampler", "rollout", "loss", "buffer", "logger", "strategy", "trainer", "stop")
}


def _compose(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


def _targets(node, path=""):
    """Yield (path, target, keys) for every node with a ``_target_``."""
    if isinstance(node, (DictConfig, ListConfig)) and node._is_none():
        return
    if isinstance(node, DictConfig):
        t = node.get("_target_")
        if t:
            keys = [k for k in node if not str(k).startswith("_")]
            yield path, t, keys
        for k in node:
            yield from _targets(node._get_node(k), f"{path}.{k}" if path else str(k))
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


def _resolve_target(target: str):
    mod, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except ModuleNotFoundError as e:
        pytest.skip(reason=f"{target} needs an optional package: {e}")


def _check_signature(cfg: DictConfig) -> None:
    for path, target, keys in _targets(cfg):
        if path.startswith("hydra"):
            continue
        obj = _resolve_target(target)
        sig = inspect.signature(obj)
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            continue
        unknown = set(keys) - set(sig.parameters)
        assert not unknown, f"{path}: {target} does not accept {sorted(unknown)}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_matches_signatures(experiment):
    cfg = _compose("train", [f"experiment={experiment}"])
    OmegaConf.resolve(cfg.sampler)  # interpolations resolve
    assert cfg.task_name == experiment
    _check_signature(cfg)


@pytest.mark.parametrize(
    "group,option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts], ids=lambda x: str(x)
)
def test_every_group_option_composes(group, option):
    # on the groups' bare defaults: the default experiment (tree_countdown) pins the MCTS rollout's
    # emission, so another rollout goes with its own experiment (train.py says so: test_user_errors)
    cfg = _compose("train", ["~experiment", f"{group}={option}"])
    _check_signature(cfg)


@pytest.mark.parametrize("overrides", [[], ["search=mcts"]])
def test_eval_config_composes(overrides):
    cfg = _compose("eval", overrides)
    assert cfg.eval.k == 16
    _check_signature(cfg)


def test_debug_smoke_composes_with_every_experiment():
    for e in EXPERIMENTS:
        cfg = _compose("train", [f"experiment={e}", "debug=smoke"])
        assert cfg.trainer.max_steps <= 5


def test_experiments_open_with_their_command():
    for e in EXPERIMENTS:
        head = (CONFIGS / "experiment" / f"{e}.yaml").read_text().splitlines()[:3]
        assert any(f"experiment={e}" in line for line in head), f"{e}.yaml should start with its command"
        # the *_paper ones carry one cited value per line (where each value comes from), and the memory
        # plan's derived settings with their figures
        limit = 80 if e.endswith("_paper") else 30
        assert len((CONFIGS / "experiment" / f"{e}.yaml").read_text().splitlines()) <= limit


# the article's hyper-parameter table (../shared/seeds/): the *_paper experiments must keep it
# whatever the laptop defaults become
ARTICLE = {
    "loss.c_ppo": 1.0,
    "loss.c_kl": 0.05,
    "loss.pg_loss.eps_high": 5.0,
    "module.value_trunk_grad": True,
}
ARTICLE_BY_EXPERIMENT = {
    "mcts_countdown_paper": {
        "loss.c_value": 1.0,
        "rollout.workers": 16,
        "rollout.completions_per_node": 4,
        "rollout.iterations": 100,
        "rollout.c_puct": 0.5,
        "rollout.virtual_loss": 1.0,
        "rollout.widening_alpha": 0.0,  # fixed K children per node
        "rollout.prior_temperature": 1.0,
        "rollout.rollout_mix": 0.0,  # leaves valued by the value head alone
        "rollout.selection._target_": "tsd.rollouts.selection.MaxVisit",
        "rollout.emission": None,  # one path per search, the max-visit one (not the whole tree)
        "data.sync_every": 8,
        "data.batch_size": 16,  # x 2 trainers (trainer.devices=8, 6 generators) = 32
        "strategy.num_generators": 6,
    },
    "bon_countdown_paper": {
        "loss.c_value": 1.0,
        "rollout.n": 64,
        "data.sync_every": 8,
        "data.batch_size": 16,
        "strategy.num_generators": 6,
    },
    # the article's CISPO baseline (TRL's GRPOTrainer) has no value head: no value loss
    "cispo_countdown_paper": {"rollout.group_size": 16, "loss.c_value": 0.0},
}


# the article's public code (issue 11): evaluation at temperature 0.2, search at 0.8, 64 tokens per
# step, 512-token sequences, lr 5e-6, grad clip 0.1
PUBLIC_CODE = {
    "callbacks.eval.temperature": 0.2,
    "callbacks.eval.max_new_tokens": 512,
    "rollout.max_new_tokens": 512,
    "module.optimizer.lr": 5.0e-6,
    "module.grad_clip": 0.1,
}
PUBLIC_CODE_BY_EXPERIMENT = {
    "mcts_countdown_paper": {"loss.c_value": 1.0, "sampler.temperature": 0.8, "rollout.max_step_tokens": 64},
    "bon_countdown_paper": {
        "loss.c_value": 1.0,
    },
    "cispo_countdown_paper": {},
}
#: "plan": derived from the per-device memory plan (tsd.distributed.memory_plan), with its figure
SOURCES = ("# article", "# public code", "# ours:", "# plan:")


@pytest.mark.parametrize("experiment", sorted(ARTICLE_BY_EXPERIMENT))
def test_paper_experiments_keep_the_article_hyperparameters(experiment):
    cfg = _compose("train", [f"experiment={experiment}"])
    for key, want in {**ARTICLE, **ARTICLE_BY_EXPERIMENT[experiment]}.items():
        assert OmegaConf.select(cfg, key) == want, f"{experiment}: {key}"
    for key, want in {**PUBLIC_CODE, **PUBLIC_CODE_BY_EXPERIMENT[experiment]}.items():
        assert OmegaConf.select(cfg, key) == want, f"{experiment}: {key} (public code)"
    # the trainer's pi_theta is at the sampler's temperature; evaluation is at the article's 0.2
    assert cfg.module.get("temperature", cfg.sampler.temperature) == cfg.sampler.temperature


@pytest.mark.parametrize("experiment", sorted(ARTICLE_BY_EXPERIMENT))
def test_every_paper_value_says_where_it_comes_from(experiment):
    """Each line that sets a value (or picks a config group) ends with its source: the article,
    its public code, ours with the reason, or the memory plan with its figure."""
    for line in (CONFIGS / "experiment" / f"{experiment}.yaml").read_text().splitlines():
        code = line.split("#", 1)[0].strip()
        if not code or code.endswith(":") or code.startswith(("defaults", "task_name")):
            continue  # comments, section headers
        comment = line[len(line.split("#", 1)[0]) :]
        assert comment.startswith(SOURCES), f"{experiment}: {line.strip()!r} has no source"
        for tag in ("# ours:", "# plan:"):
            if comment.startswith(tag):
                assert len(comment) > len(tag) + 4, (
                    f"{experiment}: {tag!r} without a reason: {line.strip()!r}"
                )


def test_every_study_run_composes_and_matches_signatures():
    """scripts/study.py's training commands are ordinary train.py overrides: each must compose
    and give every ``_target_`` only keys it accepts (a renamed key would fail hours into a study)."""
    from tsd.eval import study

    for method, overrides in study.METHODS.items():
        cfg = _compose("train", [*overrides, *study.COMMON, "module.optimizer.lr=1e-4", "seed=1"])
        assert cfg.trainer.max_steps == study.STEPS, method
        assert cfg.generation.problems_per_rollout == 8 and cfg.data.sync_every == 1, method
        _check_signature(cfg)


def test_the_article_search_overrides_match_the_paper_experiment():
    """search_efficiency's and the study's "article" search (tsd.eval.search_efficiency.ARTICLE_SEARCH
    on top of the laptop default) searches as experiment=mcts_countdown_paper does, but for the
    sizes (workers, waves, token caps) that the laptop chooses."""
    from tsd.eval.search_efficiency import ARTICLE_SEARCH

    article = _compose("train", ["experiment=mcts_countdown", *ARTICLE_SEARCH]).rollout
    paper = _compose("train", ["experiment=mcts_countdown_paper"]).rollout
    sizes = {"workers", "iterations", "max_step_tokens", "max_new_tokens", "max_depth", "seed"}
    for key in paper:
        if key not in sizes:
            assert article[key] == paper[key], key


def test_every_plateau_run_composes_and_matches_signatures():
    """The plateau study's training commands (scripts/study.py plateau) compose, train to the
    plateau rule with the validation slice, and give every ``_target_`` only keys it accepts."""
    from tsd.eval import plateau

    for arm, (_, _, lr, overrides) in plateau.ARMS.items():
        cfg = _compose("train", [*overrides, *plateau.COMMON, f"module.optimizer.lr={lr}", "seed=1"])
        assert cfg.env.n_val == 256 and cfg.callbacks.eval is None, arm
        assert cfg.callbacks.val.every_n_tokens == plateau.EVAL_EVERY_TOKENS, arm
        assert cfg.callbacks.early_stop.monitor == "val/mean@16", arm
        assert cfg.generation.problems_per_rollout == 8 and cfg.data.sync_every == 1, arm
        _check_signature(cfg)
