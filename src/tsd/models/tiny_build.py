"""Build the bundled tiny policy: a ~1M-parameter Qwen2 over the char tokenizer, trained by
supervised next-token prediction on Countdown solution traces from the **train** split, with
deliberate errors mixed in so the policy stays imperfect (low but non-zero mean@16, room for RL).

Run it through the script (it writes ``src/tsd/assets/tiny_policy`` and ``build_info.json``)::

    python scripts/build_tiny_policy.py

Sequences are ``<bos> + prompt + completion + <eos>`` with the loss on the completion and ``<eos>``
only. A correct trace is a *random* solution, chained when possible (every step after the first uses
the previous result, so the answer reads the steps left to right: far easier for a tiny model than
re-assembling a tree), found by depth-first search with pairs and operators in random order, so the
policy is not deterministic. With probability ``error_rate`` the trace is wrong instead:

- *wander* (the default kind): random valid positive-integer steps over all the numbers that miss
  the target; the answer is the expression of those steps (consistent arithmetic, wrong value);
- *slip* (a ``slip_share`` of the errors): a correct trace whose last step swaps its operator yet
  still claims the target (``16*7=23``); the answer is the expression actually computed.

What the build teaches well: copying the numbers and exact arithmetic of the first steps. What it
leaves for RL: planning the first steps so that the last one can hit the target (the tiny policy
mostly writes the target as the last result whether or not the arithmetic gets there).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tsd.envs.countdown import CountdownEnv, Problem, steps_to_expression
from tsd.models.policy_value import PolicyValueModel

Step = tuple[int, str, int, int]


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


# ---------------------------------------------------------------------------------------------- setup


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


# ---------------------------------------------------------------------------------------------- traces


def _pair_ops(a: int, b: int) -> list[tuple[int, str, int, int]]:
    """Every step over the pair {a, b} with a positive-integer result (``-`` and ``/`` bigger first)."""
    hi, lo = max(a, b), min(a, b)
    out = [(hi, "+", lo, hi + lo), (hi, "*", lo, hi * lo)]
    if hi > lo:
        out.append((hi, "-", lo, hi - lo))
    if lo > 0 and hi % lo == 0:
        out.append((hi, "/", lo, hi // lo))
    return out


def _acc_first(step: Step, acc: int) -> Step:
    """A chained ``+``/``*`` step written with the previous result first (``8+12=20``), so the
    answer ``7+1+12`` reads left to right like the steps (``-`` and ``/`` stay bigger-first)."""
    a, op, b, r = step
    return (b, op, a, r) if op in "+*" and b == acc and a != acc else step


def random_solution(
    numbers: Sequence[int], target: int, rng: random.Random, chain: bool = True
) -> list[Step] | None:
    """A random solution using all ``numbers`` (positive-integer steps), or ``None``: depth-first
    search with pairs and operators in random order, so different calls find different solutions.

    With ``chain`` (the default) a *chained* solution is preferred, where every step after the first
    uses the previous result (``((a op b) op c) op d``, 94% of problems have one): its answer reads
    the steps in order, which a tiny model learns far faster than re-assembling a tree."""
    dead: set[tuple[tuple[int, ...], bool]] = set()

    def dfs(pool: list[int], chained: bool) -> list[Step] | None:
        # pool[-1] is the previous step's result once a step is taken
        if len(pool) == 1:
            return [] if pool[0] == target else None
        key = (tuple(sorted(pool[:-1])) + (pool[-1],), chained) if chained else (tuple(sorted(pool)), False)
        if key in dead:
            return None
        if chained:
            pairs = [(i, len(pool) - 1) for i in range(len(pool) - 1)]
        else:
            pairs = [(i, j) for i in range(len(pool)) for j in range(i + 1, len(pool))]
        rng.shuffle(pairs)
        for i, j in pairs:
            rest = [v for k, v in enumerate(pool) if k not in (i, j)]
            ops = _pair_ops(pool[i], pool[j])
            rng.shuffle(ops)
            for step in ops:
                tail = dfs([*rest, step[3]], chained)
                if tail is not None:
                    return [_acc_first(step, pool[-1]) if chained else step, *tail]
        dead.add(key)
        return None

    def first_then_chain() -> list[Step] | None:
        pool = list(numbers)
        pairs = [(i, j) for i in range(len(pool)) for j in range(i + 1, len(pool))]
        rng.shuffle(pairs)
        for i, j in pairs:
            rest = [v for k, v in enumerate(pool) if k not in (i, j)]
            ops = _pair_ops(pool[i], pool[j])
            rng.shuffle(ops)
            for step in ops:
                tail = dfs([*rest, step[3]], True)
                if tail is not None:
                    return [step, *tail]
        return None

    if len(numbers) < 2:
        return [] if list(numbers) == [target] else None
    return (first_then_chain() if chain else None) or dfs(list(numbers), False)


def random_walk(numbers: Sequence[int], rng: random.Random, chain: bool = True) -> list[Step]:
    """Random valid steps over all ``numbers`` until one value is left (no target in sight); with
    ``chain`` every step after the first uses the previous result."""
    pool, steps = list(numbers), []
    while len(pool) > 1:
        if chain and steps:
            i, j = rng.randrange(len(pool) - 1), len(pool) - 1
        else:
            i, j = rng.sample(range(len(pool)), 2)
        step = rng.choice(_pair_ops(pool[i], pool[j]))
        if chain and steps:
            step = _acc_first(step, pool[j])
        pool = [v for k, v in enumerate(pool) if k not in (i, j)] + [step[3]]
        steps.append(step)
    return steps


def _apply(a: int, op: str, b: int) -> int | None:
    """``a op b`` when it is a positive integer, else ``None``."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a > b else None
    return a // b if b and a % b == 0 else None


def sample_completion(
    problem: Problem, rng: random.Random, error_rate: float, slip_share: float = 0.5
) -> tuple[str, str]:
    """``(completion, kind)`` for ``problem``; ``kind`` is ``"correct"``, ``"wander"`` or ``"slip"``."""
    numbers, target = problem.numbers, problem.target
    fmt = CountdownEnv.format_completion
    steps = random_solution(numbers, target, rng)
    if steps is None:  # train problems are all solvable; be safe anyway
        steps = random_walk(numbers, rng)
        return fmt(steps, steps_to_expression(numbers, steps)), "wander"
    if rng.random() >= error_rate:
        return fmt(steps, steps_to_expression(numbers, steps)), "correct"
    if rng.random() >= slip_share:
        for _ in range(20):
            walk = random_walk(numbers, rng)
            if walk[-1][3] != target:
                return fmt(walk, steps_to_expression(numbers, walk)), "wander"
    # slip: the last step computes something else with another operator but still writes the target
    a, op, b, _ = steps[-1]
    for other in rng.sample("+-*/", 4):
        value = _apply(a, other, b)
        if other != op and value is not None and value != target:
            true_steps = [*steps[:-1], (a, other, b, value)]
            shown = [*steps[:-1], (a, other, b, target)]
            return fmt(shown, steps_to_expression(numbers, true_steps)), "slip"
    return fmt(steps, steps_to_expression(numbers, steps)), "correct"


# ---------------------------------------------------------------------------------------------- batches


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

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    env = CountdownEnv(n_train=0, n_test=0)
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
        input_ids, labels = make_batch(
            tokenizer, [env.plain_prompt(p) for p in batch], [c for c, _ in traces]
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = completion_loss(model, input_ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.lm.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        tokens += int((input_ids != tokenizer.pad_token_id).sum())
        elapsed = time.perf_counter() - start
        if log is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            log(
                f"step {step:5d}/{cfg.steps}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  "
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


def strip_special(text: str) -> str:
    """Decoded completion text without ``<pad>``, ``<bos>`` and ``<eos>`` (the tags stay)."""
    for tok in ("<pad>", "<bos>", "<eos>"):
        text = text.replace(tok, "")
    return text


@torch.no_grad()
def sample_completions(
    model: PolicyValueModel,
    tokenizer,
    prompts: Sequence[str],
    k: int,
    max_new_tokens: int,
    batch_prompts: int = 32,
) -> list[list[str]]:
    """``k`` completions per prompt, ancestral sampling at temperature 1 (top_p 1, no top_k) with
    ``<pad>`` and ``<bos>`` banned; seed torch before calling for reproducible samples."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start : start + batch_prompts]
        ids = [[bos, *p] for p in tokenizer(list(chunk), add_special_tokens=False)["input_ids"]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # (B, T) left-padded
        attention_mask = (torch.arange(width) >= torch.tensor([width - len(x) for x in ids])[:, None]).long()
        gen = model.lm.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            num_return_sequences=k,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            bad_words_ids=[[pad], [bos]],
        )  # (B*k, T + new)
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=False)
        out.extend([strip_special(t) for t in texts[i * k : (i + 1) * k]] for i in range(len(chunk)))
    return out


def evaluate_mean_at_k(
    model: PolicyValueModel,
    tokenizer,
    problems: Sequence[Problem],
    k: int = 16,
    max_new_tokens: int = 96,
    seed: int = 0,
    env: CountdownEnv | None = None,
) -> dict:
    """mean@k with the sparse reward (DESIGN.md, "Evaluation"): the fraction of correct samples over
    ``k`` per problem, plus pass@k and the fraction of well-formed answers."""
    env = env or CountdownEnv(n_train=0, n_test=0)
    torch.manual_seed(seed)
    start = time.perf_counter()
    samples = sample_completions(model, tokenizer, [env.plain_prompt(p) for p in problems], k, max_new_tokens)
    correct = valid = solved = 0
    for problem, completions in zip(problems, samples):
        scores = [env.score(c, problem) for c in completions]
        correct += sum(s.correct for s in scores)
        valid += sum(s.valid for s in scores)
        solved += any(s.correct for s in scores)
    n = len(problems) * k
    return {
        f"mean@{k}": correct / n,
        f"pass@{k}": solved / len(problems),
        "valid_answer_rate": valid / n,
        "problems": len(problems),
        "samples_per_problem": k,
        "eval_seconds": time.perf_counter() - start,
        "examples": [samples[i][0] for i in range(min(3, len(samples)))],
    }


def config_dict(cfg: TinyBuildConfig) -> dict:
    return asdict(cfg)
