"""How far bf16 weights move the policy's token log-probs from the fp32 policy, with the LM head
computed in bf16 (the model's own forward, cast afterwards) and in fp32 (``PolicyValueModel``).

    python benchmarks/logit_precision.py                      # the bundled tiny policy, 16 problems x 4 samples
    python benchmarks/logit_precision.py --problems 64 --samples 8

The completions are sampled from the fp32 policy (HF sampler, seed 0) on the first test problems;
the reference is the fp32 policy's log-prob of every completion token; each bf16 row is the same
weights cast to bf16 (``load_policy(dtype=torch.bfloat16)``). Printed: max and mean
``|log p_bf16 - log p_fp32|`` over the completion tokens, in nats, and each row's ratio to the
bf16-head row (the simplest way, what transformers does by default).
"""

from __future__ import annotations

import argparse
import sys

import torch

from tsd.envs.countdown import CountdownEnv
from tsd.models.loading import load_policy
from tsd.models.policy_value import token_logprobs
from tsd.rollouts.base import encode_prompt
from tsd.samplers.hf import HFSampler, left_pad


def measure(name: str = "tiny", problems: int = 16, samples: int = 4, seed: int = 0) -> dict[str, dict]:
    """``{row: {"max": nats, "mean": nats, "tokens": n}}`` for the bf16-head and fp32-head rows."""
    ref_model, tok = load_policy(name)
    bf16_model, _ = load_policy(name, dtype=torch.bfloat16)
    env = CountdownEnv()
    prompts = [encode_prompt(env, p, tok) for p in env.test[:problems]]
    outs = HFSampler(ref_model, tok, seed=seed).sample(prompts, n=samples, max_new_tokens=128, stop="answer")
    rows = [p + c.token_ids for p, conts in zip(prompts, outs) for c in conts]
    starts = [len(p) for p, conts in zip(prompts, outs) for _ in conts]
    ids, mask, pos = left_pad(rows, tok.pad_token_id, torch.device("cpu"))  # (B, L) each
    L = ids.shape[1]
    # completion tokens only: row i's completion starts at column L - len(row) + start
    col = torch.arange(L - 1)[None]  # (1, L-1): the position predicting token col + 1
    first = torch.tensor([L - len(r) + s - 1 for r, s in zip(rows, starts)])[:, None]  # (B, 1)
    keep = col >= first  # (B, L-1)
    targets = ids[:, 1:]  # (B, L-1)
    with torch.no_grad():
        ref = token_logprobs(ref_model(ids, mask, pos)[0][:, :-1], targets)  # (B, L-1)
        bf16_head = bf16_model.lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        fp32_head = bf16_model(ids, mask, pos)[0]  # (B, L, V) fp32 head on the bf16 trunk
        out = {}
        for row, logits in (
            ("bf16 head (model's own forward)", bf16_head),
            ("fp32 head (PolicyValueModel)", fp32_head),
        ):
            d = (token_logprobs(logits[:, :-1], targets) - ref).abs()[keep]  # (N,)
            out[row] = {"max": d.max().item(), "mean": d.mean().item(), "tokens": int(d.numel())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny", help="model.name_or_path (default: the bundled tiny policy)")
    ap.add_argument("--problems", type=int, default=16, help="first N test problems")
    ap.add_argument("--samples", type=int, default=4, help="completions per problem")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = measure(args.policy, args.problems, args.samples, args.seed)
    base = next(iter(res.values()))
    print(f"|log p(bf16 weights) - log p(fp32 weights)| over {base['tokens']} completion tokens, nats")
    print(f"{'LM head':<34} {'max':>10} {'mean':>10} {'max / bf16 head':>16} {'mean / bf16 head':>17}")
    for row, r in res.items():
        print(
            f"{row:<34} {r['max']:>10.2e} {r['mean']:>10.2e} {r['max'] / base['max']:>16.3f} "
            f"{r['mean'] / base['mean']:>17.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
