"""Build the bundled tiny policy from scratch, deterministically, and measure its mean@16.

    python scripts/build_tiny_policy.py                       # -> src/tsd/assets/tiny_policy
    python scripts/build_tiny_policy.py --steps 50 --eval-problems 20 --out /tmp/tiny   # smoke run

Trains a small Qwen2 (see ``tsd.models.tiny_build``) on Countdown traces of the train split with
deliberate errors, evaluates mean@16 on (a prefix of) the test split with the sparse reward at
temperature 1.0 / top_p 1.0, and writes the transformers directory, the char tokenizer, the value
head and ``build_info.json`` (command, seed, steps, wall time, parameters, loss, score).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

from tsd import TINY_POLICY_DIR
from tsd.envs.countdown import CountdownEnv
from tsd.models.char_tokenizer import CHAR_TOKENIZER_MARKER, build_char_tokenizer
from tsd.models.tiny_build import (
    TinyBuildConfig,
    config_dict,
    count_parameters,
    evaluate_mean_at_k,
    make_policy,
    set_determinism,
    train_policy,
)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, TinyBuildConfig]:
    d = TinyBuildConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=TINY_POLICY_DIR, help="output directory")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--hidden", type=int, default=d.hidden, help="model width")
    p.add_argument("--layers", type=int, default=d.layers, help="transformer blocks")
    p.add_argument("--warmup", type=int, default=d.warmup, help="learning-rate warm-up steps")
    p.add_argument("--error-rate", type=float, default=d.error_rate, help="fraction of wrong traces")
    p.add_argument(
        "--slip-share", type=float, default=d.slip_share, help="fraction of the errors that are slips"
    )
    p.add_argument("--eval-problems", type=int, default=d.eval_problems, help="test problems (0 = all)")
    p.add_argument(
        "--max-minutes", type=float, default=d.max_minutes, help="training wall-time cap (0 = none)"
    )
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    args = p.parse_args(argv)
    cfg = TinyBuildConfig(
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        hidden=args.hidden,
        layers=args.layers,
        error_rate=args.error_rate,
        slip_share=args.slip_share,
        eval_problems=args.eval_problems,
        max_minutes=args.max_minutes,
        threads=args.threads,
        log_every=args.log_every,
    )
    return args, cfg


def save(model, tokenizer, out: Path) -> None:
    """The transformers directory + value head (PolicyValueModel.save_pretrained) and the char
    tokenizer, whose tokenizer_config.json is marked so ``load_policy`` never uses AutoTokenizer."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[CHAR_TOKENIZER_MARKER] = True
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    wall = time.perf_counter()
    set_determinism(cfg.seed, cfg.threads)
    tokenizer = build_char_tokenizer()
    env = CountdownEnv()  # the default splits: seed 0, 20000 train / 820 test, sparse reward as in eval
    train, test = env.train, env.test
    eval_set = test[: cfg.eval_problems] if cfg.eval_problems else test

    model = make_policy(tokenizer, cfg)
    n_lm, n_head = count_parameters(model.lm), count_parameters(model.value_head)
    print(f"tiny policy: {n_lm:,} LM parameters (+{n_head:,} value head); {len(train)} train problems")
    summary = train_policy(model, tokenizer, train, cfg, log=functools.partial(print, flush=True))
    result = evaluate_mean_at_k(
        model,
        tokenizer,
        eval_set,
        k=cfg.eval_samples,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        env=env,
    )
    k = cfg.eval_samples
    print(
        f"eval: mean@{k} {result[f'mean@{k}']:.4f}  pass@{k} {result[f'pass@{k}']:.3f}  "
        f"valid answers {result['valid_answer_rate']:.3f}  on {result['problems']} test problems "
        f"({result['eval_seconds']:.0f}s)"
    )
    for text in result["examples"]:
        print(f"  sample: {text!r}")

    args.out.mkdir(parents=True, exist_ok=True)
    save(model, tokenizer, args.out)
    info = {
        "command": "python "
        + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "steps_done": summary["steps_done"],
        "stopped_early": summary["stopped_early"],
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "train_seconds": round(summary["train_seconds"], 1),
        "eval_seconds": round(result["eval_seconds"], 1),
        "parameters": n_lm,
        "value_head_parameters": n_head,
        "train_loss_first": round(summary["first_loss"], 4),
        "train_loss_final": round(summary["final_loss"], 4),
        "train_tokens": summary["tokens"],
        "tokens_per_s": round(summary["tokens_per_s"]),
        "trace_kinds": summary["trace_kinds"],
        "eval": {
            f"mean@{k}": round(result[f"mean@{k}"], 4),
            f"pass@{k}": round(result[f"pass@{k}"], 4),
            "valid_answer_rate": round(result["valid_answer_rate"], 4),
            "test_problems": result["problems"],
            "samples_per_problem": k,
            "temperature": 1.0,
            "top_p": 1.0,
            "reward": "sparse (CountdownEnv() defaults)",
        },
        "config": config_dict(cfg),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out} in {info['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
