"""Evaluate a policy: mean@k (sparse reward) on the Countdown test split, with a progress bar, a
printed table and ``results.json``; optionally also *with* an MCTS harness.

    python eval.py                                       # the bundled tiny policy, all 820 test problems
    python eval.py model.name_or_path=outputs/.../policy eval.num_problems=100
    python eval.py search=mcts eval.num_problems=50      # + search_oracle@1: the training search, an oracle
    python eval.py search=mcts_value eval.num_problems=50   # + search_value@1: a search that reads no grade

``search=mcts`` is the training search (best graded answer, rollout leaves valued by their graded
reward): it reads the grader, which knows the target, so its accuracy is an oracle's, like pass@k,
and is named ``search_oracle@1``. ``search=mcts_value`` searches with the grader withheld
(``search.graded: false``: reached answers are worth 0 if well-formed, -1 if not), value-head
leaves and the max-visit path, then grades the answer it chose: ``search_value@1``, the policy's own
accuracy with a search harness. Both record the selection rule and how leaves and answers were
valued (``search/*`` in ``results.json`` and the table; :mod:`tsd.eval.search_harness`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from tsd.config import DTYPES, ConfigError, apply_threads, build, config_dir, dtype_of, require
from tsd.config_checks import (
    check_known_keys,
    check_policy_source,
    check_target_keys,
)
from tsd.fileio import write_text_atomic

log = logging.getLogger("tsd.eval")

#: the keys of the config nodes run_eval() reads itself; any other is a typo, refused
KNOWN_KEYS = {
    "": {"model", "env", "sampler", "paths", "search", "eval", "task_name", "seed", "threads"},
    "model": {"name_or_path", "dtype"},
    "eval": {"k", "num_problems", "max_new_tokens", "problems_per_batch", "save_samples"},
    "search": {"rollout", "problems_per_batch", "graded"},
    "paths": {"root_dir", "output_dir"},
}


def evaluate_with_search(cfg: DictConfig, sampler, env, problems) -> dict:
    """Run the configured search on each problem and grade the answer it emits (sparse), named by
    what the search read (:func:`tsd.eval.search_harness.evaluate_search`)."""
    from tsd.eval.search_harness import evaluate_search

    rollout = build(cfg.search.rollout, "search.rollout")
    return evaluate_search(
        rollout,
        sampler,
        env,
        problems,
        problems_per_batch=cfg.search.get("problems_per_batch", 8),
        graded=cfg.search.get("graded", True),
    )


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(cfg: DictConfig) -> None:
    """Keys and plain values, the policy's path and the targets' keys: before any model is loaded."""
    check_known_keys(cfg, KNOWN_KEYS)
    require(_integer(cfg.seed), "seed", "an integer", cfg.seed)
    e = cfg.eval
    require(_integer(e.k) and e.k >= 1, "eval.k", "an integer >= 1", e.k)
    require(
        e.num_problems is None or (isinstance(e.num_problems, int) and e.num_problems >= 1),
        "eval.num_problems",
        "null or an integer >= 1",
        e.num_problems,
    )
    require(
        isinstance(e.max_new_tokens, int) and e.max_new_tokens >= 1,
        "eval.max_new_tokens",
        ">= 1",
        e.max_new_tokens,
    )
    for field, v in (("eval.problems_per_batch", e.problems_per_batch),) + (
        (("search.problems_per_batch", cfg.search.get("problems_per_batch", 8)),) if cfg.get("search") else ()
    ):
        require(_integer(v) and v >= 1, field, "an integer >= 1", v)
    if cfg.get("search"):
        graded = cfg.search.get("graded", True)
        require(isinstance(graded, bool), "search.graded", "true or false", graded)
    t = cfg.sampler.get("temperature", 1.0)
    require(
        isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0,
        "sampler.temperature",
        ">= 0 (0: greedy)",
        t,
    )
    top_p = cfg.sampler.get("top_p", 1.0)
    require(
        isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1,
        "sampler.top_p",
        "0 < top_p <= 1",
        top_p,
    )
    require(cfg.model.dtype in DTYPES, "model.dtype", f"one of {', '.join(DTYPES)}", cfg.model.dtype)
    check_policy_source(cfg.model.name_or_path)
    check_target_keys(cfg)


def run_eval(cfg: DictConfig) -> dict:
    _validate(cfg)
    # the heavy imports only now: a bad command above fails before paying for them
    import torch

    from tsd.eval.runner import evaluate_mean_at_k
    from tsd.models.loading import load_policy

    e = cfg.eval
    apply_threads(cfg.get("threads"))
    torch.manual_seed(cfg.seed)
    env = build(cfg.env, "env")
    make_sampler = build(cfg.sampler, "sampler")
    try:  # the env reads or generates its problems on first use: a bad problems file fails here
        problems = env.test if e.num_problems is None else env.test[: e.num_problems]
    except (OSError, ValueError) as err:
        raise ConfigError(f"{'env.data_dir' if cfg.env.get('data_dir') else 'env'}: {err}") from None
    require(len(problems) >= 1, "env.n_test", "an integer >= 1 (the problems evaluated)", len(env.test))
    log.info("loading policy %s", cfg.model.name_or_path)
    policy, tokenizer = load_policy(cfg.model.name_or_path, dtype=dtype_of(cfg.model.dtype))
    sampler = make_sampler(policy.eval(), tokenizer)
    res = evaluate_mean_at_k(
        sampler,
        env,
        problems,
        k=e.k,
        max_new_tokens=e.max_new_tokens,
        problems_per_batch=e.problems_per_batch,
        return_samples=bool(e.save_samples),
    )
    samples = res.pop("samples", None)
    res["model"] = str(cfg.model.name_or_path)
    res["temperature"] = float(cfg.sampler.temperature)
    res["top_p"] = float(cfg.sampler.get("top_p", 1.0))
    if cfg.get("search"):
        res.update(evaluate_with_search(cfg, sampler, env, problems))
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(res, indent=1))
    if samples is not None:
        with open(out / "samples.jsonl", "w") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
    table = {k: v for k, v in res.items() if not isinstance(v, dict)}  # per-problem counts: json only
    width = max(len(k) for k in table)
    print(
        "\n"
        + "\n".join(
            f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
            for k, v in table.items()
        )
    )
    print(f"\nresults: {out / 'results.json'}")
    return res


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    log.debug(OmegaConf.to_yaml(cfg))
    try:
        run_eval(cfg)
    except ConfigError as e:
        log.error("config error: %s", e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
