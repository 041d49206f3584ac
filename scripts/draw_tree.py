"""Run the MCTS rollout on a few Countdown problems and draw each search tree.

    python scripts/draw_tree.py --problems 3                          # first 3 test problems
    python scripts/draw_tree.py --numbers 3 5 7 2 --target 23 --workers 4 --iterations 12
    python scripts/draw_tree.py --problems 2 rollout/selection=max_visit rollout.rollout_mix=0   # any override

Uses the bundled tiny policy (``load_policy("tiny")``) with the HF sampler; if the policy has not
been built yet it says so and falls back to a random one (``--policy random`` forces that). For
each problem it writes ``OUT/tree_<i>.json`` (``SearchTree.to_dict()`` plus the problem and the
chosen trajectory) and ``OUT/tree_<i>.png`` / ``.svg``: the step text on the edges; visits N, Q
and prior P on the nodes; terminals show their reward (green when correct); the emitted path in
red. The search is the one ``train.py`` would run: ``configs/rollout/mcts.yaml`` with the flags and
any Hydra overrides given. Progress is printed after every wave.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tsd import TINY_POLICY_DIR
from tsd.config import build
from tsd.envs.countdown import CountdownEnv, Problem
from tsd.eval.search_efficiency import compose_rollout_config
from tsd.rollouts.mcts import MCTSRollout, SearchCounters
from tsd.rollouts.tree import SearchTree
from tsd.samplers.hf import HFSampler
from tsd.viz.tree import describe, draw


def load_policy_or_random(name: str):
    """``(model, tokenizer, description)``: the bundled tiny policy, or (asked for, or when the
    tiny policy is missing) a random tiny-sized Qwen2 over the char tokenizer whose ``</step>``
    logit gets +3, so that its steps close (~every 5 tokens) and its trees grow levels."""
    if name == "tiny" and (TINY_POLICY_DIR / "model.safetensors").exists():
        from tsd.models.loading import load_policy

        model, tok = load_policy("tiny")
        return model, tok, f"bundled tiny policy ({TINY_POLICY_DIR})"
    if name == "tiny":
        print(f"note: no tiny policy at {TINY_POLICY_DIR}; using a random policy", file=sys.stderr)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tsd.models.char_tokenizer import build_char_tokenizer
    from tsd.models.policy_value import PolicyValueModel

    tok = build_char_tokenizer()
    close = tok.convert_tokens_to_ids("</step>")

    class StepClosing(PolicyValueModel):
        def forward(self, *args, **kwargs):
            logits, values, cache = super().forward(*args, **kwargs)
            logits[..., close] += 3.0  # (B, T, V): the bias is part of the policy
            return logits, values, cache

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    desc = "random policy (untrained, tiny-sized, </step> logit +3)"
    return StepClosing(Qwen2ForCausalLM(cfg)).eval(), tok, desc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=3, help="first N problems of the test split")
    ap.add_argument("--numbers", type=int, nargs="+", help="one custom problem's numbers (with --target)")
    ap.add_argument("--target", type=int)
    ap.add_argument("--workers", type=int, help="N workers per tree (default: the config's)")
    ap.add_argument("--k", type=int, help="K samples per node (default: the config's)")
    ap.add_argument("--iterations", type=int, help="M waves (default: the config's)")
    ap.add_argument("--c-puct", type=float, help="pUCT weight (default: the config's)")
    ap.add_argument("--max-step-tokens", type=int, help="token cap of one step (default: the config's)")
    ap.add_argument("--max-depth", type=int, help="steps before a node is terminal (default: the config's)")
    ap.add_argument("--max-new-tokens", type=int, help="completion token cap (default: the config's)")
    ap.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides of configs/train.yaml (rollout.*, rollout/selection=...)",
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="sampler seed")
    ap.add_argument("--policy", choices=("tiny", "random"), default="tiny")
    ap.add_argument("--out", type=Path, default=Path("outputs/trees"))
    args = ap.parse_args(argv)
    if (args.numbers is None) != (args.target is None):
        ap.error("--numbers and --target go together")

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model, tok, which = load_policy_or_random(args.policy)
    env = CountdownEnv()
    if args.numbers is not None:
        problems = [Problem(numbers=tuple(args.numbers), target=args.target, id=0)]
    else:
        problems = list(env.test[: args.problems])
    sampler = HFSampler(model, tok, temperature=args.temperature, seed=args.seed)
    # the search configs/rollout/mcts.yaml (+ overrides) describes: what train.py would search with
    flags = {"workers": args.workers, "completions_per_node": args.k, "iterations": args.iterations,
             "c_puct": args.c_puct, "max_step_tokens": args.max_step_tokens, "max_depth": args.max_depth,
             "max_new_tokens": args.max_new_tokens}  # fmt: skip
    overrides = [
        "rollout=mcts",
        *(f"rollout.{k}={v}" for k, v in flags.items() if v is not None),
        *args.overrides,
    ]
    rollout = build(compose_rollout_config(overrides).rollout, "rollout", seed=args.seed, record_trees=True)
    if not isinstance(rollout, MCTSRollout):
        ap.error("the overrides must leave rollout=mcts")
    print(
        f"policy: {which}; {len(problems)} problem(s); N={rollout.workers} M={rollout.iterations}; {' '.join(overrides)}"
    )
    t0 = time.perf_counter()

    def progress(w: int, trees: list[SearchTree], c: SearchCounters) -> None:
        sizes = " ".join(str(len(t.nodes)) for t in trees)
        print(
            f"  wave {w + 1:3d}/{rollout.iterations}: nodes [{sizes}]  sims {c.simulations}  "
            f"terminal leaves {c.terminal_evaluations}  grades {c.grades}  tokens {c.search_tokens}  "
            f"{time.perf_counter() - t0:6.1f}s",
            flush=True,
        )

    out = rollout.run(problems, sampler, env, on_wave=progress)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (p, tree, traj) in enumerate(zip(problems, rollout.trees, out.trajectories)):
        d, title = describe(rollout, p, tree, traj, tok, env)
        d["policy"] = which
        stem = args.out / f"tree_{i}"
        stem.with_suffix(".json").write_text(json.dumps(d, indent=1))
        draw(d, title, stem)
        print(
            f"problem {i}: {list(p.numbers)}->{p.target}  chosen {d['chosen']['text']!r}  "
            f"reward {traj.reward:+.3f}  -> {stem}.png/.svg/.json"
        )
    print("stats: " + "  ".join(f"{k}={v:.3g}" for k, v in out.stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
