"""Evaluate a policy: mean@k (sparse reward) on the Countdown test split, with a progress bar, a
printed table and ``results.json``; optionally also *with* the MCTS harness.

    python eval.py                                       # the bundled tiny policy, all 820 test problems
    python eval.py model.name_or_path=outputs/.../policy eval.num_problems=100
    python eval.py search=mcts eval.num_problems=50      # + accuracy of the max-visit MCTS trajectory
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from tsd.config import ConfigError, apply_threads, build, config_dir, dtype_of, require
from tsd.eval.runner import evaluate_mean_at_k
from tsd.models.loading import load_policy

log = logging.getLogger("tsd.eval")


def evaluate_with_search(cfg: DictConfig, sampler, env, problems) -> dict:
    """Run the configured search rollout on each problem; score its chosen trajectory (sparse)."""
    rollout = build(cfg.search.rollout, "search.rollout")
    ppb = int(cfg.search.get("problems_per_batch", 8))
    require(ppb >= 1, "search.problems_per_batch", "an integer >= 1", ppb)
    t0, correct, dense, tokens = time.perf_counter(), 0, 0.0, 0
    for i in tqdm(range(0, len(problems), ppb), desc="search", leave=False):
        out = rollout.run(problems[i : i + ppb], sampler, env)
        correct += sum(t.correct for t in out.trajectories)
        dense += sum(t.reward for t in out.trajectories)
        tokens += out.generated_tokens
    n = len(problems)
    return {
        "search@1": correct / n,
        "search_dense_mean": dense / n,
        "search_generated_tokens": tokens,
        "search_seconds": time.perf_counter() - t0,
    }


def run_eval(cfg: DictConfig) -> dict:
    e = cfg.eval
    require(isinstance(e.k, int) and e.k >= 1, "eval.k", "an integer >= 1", e.k)
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
    apply_threads(cfg.get("threads"))
    torch.manual_seed(cfg.seed)
    env = build(cfg.env, "env")
    make_sampler = build(cfg.sampler, "sampler")
    policy, tokenizer = load_policy(cfg.model.name_or_path, dtype=dtype_of(cfg.model.dtype))
    sampler = make_sampler(policy.eval(), tokenizer)
    problems = env.test if e.num_problems is None else env.test[: e.num_problems]
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
    (out / "results.json").write_text(json.dumps(res, indent=1))
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
