"""The trainer-vs-vLLM importance ratio left at bf16, with vLLM's LM head in fp32 or in bf16.

    .venv-vllm/bin/python benchmarks/logprob_gap.py                 # the bundled tiny policy in bf16, CPU
    .venv-vllm/bin/python benchmarks/logprob_gap.py --policy DIR --prompts 32

CISPO's ratio is ``rho_t = pi_theta(a_t|s_t) / pi_behaviour(a_t|s_t)``: at unchanged weights it
should be 1, and whatever it is not is numerics. The article computes logits "in float32 as per
ScaleRL". vLLM runs its LM head in the model dtype unless told ``head_dtype="float32"``
(``hf_overrides``, what :class:`VLLMSampler` passes by default), then samples in fp32.

The same bf16 weights everywhere. vLLM (bf16, head in fp32 / in bf16) samples ``--n``
completions of ``--prompts`` Countdown prompts; then every sampled token's log-prob is recomputed
three ways, and ``|rho - 1|`` against vLLM's recorded one is reported:
- ``trainer``: :class:`PolicyValueModel` forward as the code is (the trainer's and HFSampler's
  path; its head in bf16, cast to fp32 afterwards, until the fp32-head change lands);
- ``fp32 head``: the same bf16 trunk, the head's matmul in fp32 (what that change does);
- ``fp32 all``: the same weights upcast to fp32, every op in fp32.
The last column is each row's mean ``|rho - 1|`` over the simplest setup's (vLLM's default bf16
head, log-probs recomputed as the trainer does). Rerun it after the trainer's head moves to fp32:
the ``trainer`` rows should then match the ``fp32 head`` rows.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from tsd.envs.countdown import CountdownEnv
from tsd.models.loading import load_policy
from tsd.models.policy_value import token_logprobs
from tsd.rollouts.base import encode_prompt
from tsd.samplers.hf import banned_token_ids, eos_token_ids


def recompute(model, full: torch.Tensor, start: int, mode: str) -> torch.Tensor:
    """Log-probs (C,) of ``full[0, start:]`` under ``model`` (bf16), computed as ``mode`` says."""
    with torch.inference_mode():
        if mode == "trainer":
            logits, _, _ = model(full)  # (1, L, V) the code's own path
        else:
            hidden = model.lm.model(input_ids=full).last_hidden_state  # (1, L, H) bf16
            logits = F.linear(hidden.float(), model.lm.lm_head.weight.float())  # (1, L, V) fp32 head
    return logits[0, start - 1 : -1]  # (C, V)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="tiny")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from tsd.samplers.vllm import VLLMSampler

    model, tok = load_policy(args.policy, dtype=torch.bfloat16)
    fp32 = load_policy(args.policy, dtype=torch.bfloat16)[0].float()  # the same bf16 values, fp32 ops
    banned = banned_token_ids(tok, eos_token_ids(tok, model))
    env = CountdownEnv()
    states = [encode_prompt(env, p, tok) for p in env.test[: args.prompts]]

    print(
        f"policy {args.policy} in bf16, {len(states)} prompts x n={args.n}, T={args.temperature}", flush=True
    )
    rows = []  # (vLLM head, recomputed by, tokens, mean |rho - 1|, max |rho - 1|, mean |dlogp|)
    for head in ("float32", "model"):
        sampler = VLLMSampler(
            model, tok, temperature=args.temperature, seed=args.seed, dtype="bfloat16", head_dtype=head,
            kv_cache_gib=0.25, block_size=32, llm_kwargs={"enforce_eager": True},
        )  # fmt: skip
        out = sampler.sample(states, n=args.n, max_new_tokens=args.max_new_tokens, stop="answer")
        for mode, m in (("trainer", model), ("fp32 head", model), ("fp32 all", fp32)):
            diffs = []
            for state, conts in zip(states, out):
                for c in conts:
                    full = torch.tensor([state + c.token_ids])  # (1, L)
                    logits = recompute(
                        m, full, len(state), "trainer" if mode == "fp32 all" else mode
                    )  # (C, V)
                    lp = token_logprobs(logits[None], torch.tensor([c.token_ids]), args.temperature, banned)[
                        0
                    ]
                    diffs.append(lp - torch.tensor(c.logprobs))  # (C,) log rho
            d = torch.cat(diffs)  # (tokens,)
            rho = (d.exp() - 1).abs()
            label = "fp32" if head == "float32" else "bf16 (vLLM default)"
            rows.append((label, mode, d.numel(), float(rho.mean()), float(rho.max()), float(d.abs().mean())))
            print(f"  {label} head, {mode}: {d.numel()} tokens", flush=True)
        del sampler
    # the simplest setup: vLLM's default head, log-probs recomputed as the trainer does
    base = next(r[3] for r in rows if r[0].startswith("bf16") and r[1] == "trainer")
    print(
        "\n| vLLM LM head | recomputed by | tokens | mean \\|rho - 1\\| | max \\|rho - 1\\| "
        "| mean \\|dlogp\\| (nats) | mean \\|rho - 1\\| vs bf16/trainer |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, mode, n, mean, mx, dmean in rows:
        print(f"| {label} | {mode} | {n} | {mean:.2e} | {mx:.2e} | {dmean:.2e} | {mean / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
