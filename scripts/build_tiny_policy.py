"""Build the bundled tiny policy from scratch, deterministically, and measure its mean@16.

    python scripts/build_tiny_policy.py                       # -> src/tsd/assets/tiny_policy
    python scripts/build_tiny_policy.py --steps 50 --eval-problems 20 --out /tmp/tiny   # smoke run

A ~1M-parameter Qwen2 over the char tokenizer, trained by supervised next-token prediction on
Countdown solution traces of the **train** split with deliberate errors mixed in
(``scripts/tiny_traces.py``), so the policy stays imperfect (low but non-zero mean@16, room for RL).
Sequences are ``<bos> + prompt + completion + <eos>`` with the loss on the completion and ``<eos>``
only. The learning-rate schedule, the sampler and mean@k are the package's own
(:func:`tsd.module.warmup_cosine`, :class:`tsd.samplers.hf.HFSampler`,
:func:`tsd.eval.runner.evaluate_mean_at_k`). It writes the transformers directory, the char
tokenizer, the value head and ``build_info.json`` (command, seed, steps, wall time, parameters,
loss, score).

What the build teaches well: copying the numbers and exact arithmetic of the first steps. What it
leaves for RL: planning the first steps so that the last one can hit the target (the tiny policy
mostly writes the target as the last result whether or not the arithmetic gets there).

The bundled ``src/tsd/assets/tiny_policy`` was built by an earlier version of this script (its own
warm-up ``(s + 1) / warmup`` and ``transformers.generate`` for the score); this one gives a policy
of the same kind, not the same bits (``build_info.json`` records the build that made the bundle).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tiny_traces import sample_completion

from tsd import TINY_POLICY_DIR
from tsd.envs.countdown import CountdownEnv, Problem
from tsd.envs.countdown.prompts import plain_prompt
from tsd.eval.runner import evaluate_mean_at_k
from tsd.models.char_tokenizer import CHAR_TOKENIZER_MARKER, build_char_tokenizer
from tsd.models.policy_value import PolicyValueModel
from tsd.module import warmup_cosine
from tsd.samplers.hf import HFSampler


@dataclass
class TinyBuildConfig:
    """Every knob of the build; ``build_info.json`` records all of them."""

    seed: int = 0
    """seeds the weights, the trace sampler and the evaluation sampler"""
    steps: int = 3000
    """optimiser steps"""
    batch_size: int = 32
    """sequences per step"""
    lr: float = 4e-3
    """peak AdamW learning rate (linear warm-up, cosine decay to 10%)"""
    warmup: int = 50
    """warm-up steps"""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on norms or biases)"""
    grad_clip: float = 1.0
    """max global grad norm"""
    hidden: int = 128
    """model width"""
    layers: int = 4
    """transformer blocks"""
    heads: int = 4
    """attention heads (head dim = hidden / heads)"""
    kv_heads: int = 2
    """key/value heads (grouped-query attention, as in Qwen2)"""
    mlp_ratio: int = 3
    """intermediate size = mlp_ratio * hidden"""
    max_positions: int = 512
    """RoPE positions (free: no parameters); sequences here are < 100 tokens"""
    error_rate: float = 0.1
    """probability that a training trace is wrong (a wander or a slip)"""
    slip_share: float = 0.0
    """fraction of the wrong traces that are slips (the rest wander)"""
    threads: int = 1
    """torch intra-op threads; 1 is fastest on a busy 2-core box (2 threads spin against other
    processes) and results are bit-exact only for the same thread count"""
    max_minutes: float = 25.0
    """safety cap: stop training past this wall time (the log and build_info say so; the weights then
    depend on the machine's speed); 0 = no limit"""
    eval_problems: int = 0
    """test problems for the final mean@k, a prefix of the test split (0 = all 820)"""
    eval_samples: int = 16
    """samples per problem (k of mean@k)"""
    max_new_tokens: int = 96
    """cap on a sampled completion's length"""
    log_every: int = 10
    """print a log line every this many steps"""


# ---------------------------------------------------------------------------------------------- model


def set_determinism(seed: int, threads: int) -> None:
    """Seed python and torch, fix the thread count and ask torch for deterministic kernels."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_policy(tokenizer, cfg: TinyBuildConfig) -> PolicyValueModel:
    """A freshly initialised Qwen2 causal LM (tied embeddings) + value head, seeded by ``cfg.seed``."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.mlp_ratio * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    lm = Qwen2ForCausalLM(config)
    # plain ancestral sampling by default: transformers otherwise applies top_k=50 when unset
    lm.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=cfg.max_new_tokens,
    )
    return PolicyValueModel(lm)


def count_parameters(module: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in module.parameters())


def make_batch(
    tokenizer, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, both (B, T), right-padded: ``<bos> prompt completion <eos>`` with
    labels ``-100`` on the prompt, ``<bos>`` and padding (causal attention never looks right, so
    right padding needs no attention mask)."""
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [([bos, *p], [*c, eos]) for p, c in zip(p_ids, c_ids)]
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (p, c) in enumerate(rows):
        input_ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        labels[r, len(p) : len(p) + len(c)] = torch.tensor(c)
    return input_ids, labels


def completion_loss(model: PolicyValueModel, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (completion + eos) positions."""
    logits = model.lm(input_ids=input_ids).logits.float()  # (B, T, V)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),  # position t predicts token t+1
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


# ---------------------------------------------------------------------------------------------- training


def train_policy(
    model: PolicyValueModel,
    tokenizer,
    problems: Sequence[Problem],
    cfg: TinyBuildConfig,
    log: Callable[[str], None] | None = print,
    callback: Callable[[int, PolicyValueModel], None] | None = None,
) -> dict:
    """Supervised training on random traces of ``problems`` (the train split) for ``cfg.steps`` steps
    (or until ``cfg.max_minutes``). Deterministic for a given seed, thread count and machine.

    ``callback(step, model)`` runs after every step (e.g. a periodic eval; it must leave the model in
    train mode and the global RNG as it found it). Returns a summary: steps done, losses, tokens/s,
    seconds and how many traces of each kind were drawn."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.train()
    decay = [p for p in model.lm.parameters() if p.dim() >= 2]  # the value head is not trained
    no_decay = [p for p in model.lm.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    # the trainer's own schedule: linear warm-up, cosine decay to 10% of the peak
    schedule = warmup_cosine(opt, warmup_steps=cfg.warmup, total_steps=cfg.steps, min_ratio=0.1)
    losses: list[float] = []
    kinds = {"correct": 0, "wander": 0, "slip": 0}
    tokens = 0
    start = time.perf_counter()
    stopped_early = False
    step = 0
    for step in range(cfg.steps):
        batch = [problems[rng.randrange(len(problems))] for _ in range(cfg.batch_size)]
        traces = [sample_completion(p, rng, cfg.error_rate, cfg.slip_share) for p in batch]
        for _, kind in traces:
            kinds[kind] += 1
        input_ids, labels = make_batch(tokenizer, [plain_prompt(p) for p in batch], [c for c, _ in traces])
        lr = opt.param_groups[0]["lr"]
        loss = completion_loss(model, input_ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.lm.parameters(), cfg.grad_clip)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        tokens += int((input_ids != tokenizer.pad_token_id).sum())
        elapsed = time.perf_counter() - start
        if log is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            log(
                f"step {step:5d}/{cfg.steps}  loss {loss.item():.4f}  lr {lr:.2e}  "
                f"tok/s {tokens / elapsed:7.0f}  elapsed {elapsed:6.1f}s"
            )
        if callback is not None:
            callback(step, model)
        if cfg.max_minutes and elapsed > 60 * cfg.max_minutes and step < cfg.steps - 1:
            stopped_early = True
            if log is not None:
                log(f"stopping early at step {step}: past --max-minutes {cfg.max_minutes}")
            break
    model.eval()
    seconds = time.perf_counter() - start
    tail = losses[-50:]
    return {
        "steps_done": step + 1,
        "stopped_early": stopped_early,
        "final_loss": sum(tail) / len(tail),
        "first_loss": losses[0],
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "train_seconds": seconds,
        "trace_kinds": kinds,
    }


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(
    model: PolicyValueModel, tokenizer, env: CountdownEnv, problems: Sequence[Problem], cfg: TinyBuildConfig
) -> dict:
    """mean@k and pass@k with the run's own evaluation (:func:`tsd.eval.runner.evaluate_mean_at_k`:
    the HF sampler at temperature 1, top_p 1, the sparse reward), plus the share of well-formed
    answers and three example completions."""
    sampler = HFSampler(model, tokenizer, temperature=1.0, top_p=1.0, seed=cfg.seed)
    res = evaluate_mean_at_k(
        sampler, env, problems, k=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens, return_samples=True
    )
    by_id = {p.id: p for p in problems}
    samples = res.pop("samples")
    valid = sum(env.score(s["completion"], by_id[s["problem_id"]]).valid for s in samples)
    res["valid_answer_rate"] = valid / max(1, len(samples))
    res["examples"] = [s["completion"] for s in samples[:: cfg.eval_samples][:3]]
    return res


# ---------------------------------------------------------------------------------------------- command


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
    result = evaluate(model, tokenizer, env, eval_set, cfg)
    k = cfg.eval_samples
    print(
        f"eval: mean@{k} {result[f'mean@{k}']:.4f}  pass@{k} {result[f'pass@{k}']:.3f}  "
        f"valid answers {result['valid_answer_rate']:.3f}  on {result['num_problems']} test problems "
        f"({result['seconds']:.0f}s)"
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
        "eval_seconds": round(result["seconds"], 1),
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
            "test_problems": result["num_problems"],
            "samples_per_problem": k,
            "temperature": 1.0,
            "top_p": 1.0,
            "reward": "sparse (CountdownEnv() defaults)",
        },
        "config": asdict(cfg),
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
