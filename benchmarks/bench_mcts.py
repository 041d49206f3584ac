"""MCTS throughput: simulations/s for N = 1, 4, 16 workers at equal simulations per tree, and the
search's sampler token throughput against the plain sampler.

    python benchmarks/bench_mcts.py                       # 4 test problems, 64 simulations per tree
    python benchmarks/bench_mcts.py --problems 8 --sims 128 --workers 1 4 16 32

Every configuration searches the same problems with a freshly seeded HF sampler over the same
policy (the bundled tiny one if it has been built, else a random tiny-sized one: the header says
which). ``iterations = sims // workers``, so every row runs the same number of simulations per
tree: more workers means fewer, wider waves (one ``sample`` call per wave for every tree).

Token throughput is the sampler tokens generated *during the search waves* (expansions only) per
second of search wall time, tree bookkeeping and value calls included. The baseline is the same
sampler producing at least as many tokens with plain ``stop="answer"`` completions of the prompts,
in batches as wide as the search's average ``sample`` call; ``ratio`` = search / baseline.
Each number is the best of ``--repeats`` identical runs (the machine is shared).

``separate value`` reruns each search with the value head's pass over the new leaves as a second
forward (``sample`` then ``value``, as before ``sample_and_value`` read V(s) from the prefill);
``fused`` = sims/s with the fused call over sims/s with the separate one (same seed, same trees).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from tsd.envs.countdown import CountdownEnv
from tsd.rollouts.base import encode_prompt
from tsd.rollouts.mcts import MCTSRollout, SearchCounters
from tsd.samplers.base import Sampler
from tsd.samplers.hf import HFSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from draw_tree import load_policy_or_random  # noqa: E402


class TimedSampler(Sampler):
    """Delegates to a sampler and adds up the seconds spent in ``sample`` and ``value``;
    ``fused=False`` splits ``sample_and_value`` into its two calls (the base class's default)."""

    def __init__(self, inner: Sampler, fused: bool = True) -> None:
        self.inner, self.fused = inner, fused
        self.tokenizer, self.version, self.temperature = inner.tokenizer, inner.version, inner.temperature
        self.sample_s = self.value_s = 0.0

    def sample(self, states, n, max_new_tokens, stop="step", exclude=None):
        t = time.perf_counter()
        out = self.inner.sample(states, n, max_new_tokens, stop, exclude)
        self.sample_s += time.perf_counter() - t
        return out

    def sample_and_value(self, states, n, max_new_tokens, stop="step", exclude=None):
        if not self.fused:
            return super().sample_and_value(states, n, max_new_tokens, stop, exclude)
        t = time.perf_counter()
        out = self.inner.sample_and_value(states, n, max_new_tokens, stop, exclude)
        self.sample_s += time.perf_counter() - t
        return out

    def value(self, states):
        t = time.perf_counter()
        out = self.inner.value(states)
        self.value_s += time.perf_counter() - t
        return out

    def load_weights(self, state_dict, version):
        self.inner.load_weights(state_dict, version)


def bench_search(workers: int, args, problems, model, tok, env, fused: bool = True) -> dict:
    sampler = TimedSampler(HFSampler(model, tok, temperature=args.temperature, seed=args.seed,
                                     max_batch_size=args.max_batch_size), fused=fused)  # fmt: skip
    rollout = MCTSRollout(
        workers=workers,
        completions_per_node=args.k,
        iterations=args.sims // workers,
        max_step_tokens=args.max_step_tokens,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    seen: dict[str, float] = {}
    t0 = time.perf_counter()

    def at_wave(w: int, trees, c: SearchCounters) -> None:  # the search ends with the last wave
        seen.update(t=time.perf_counter() - t0, tokens=c.search_tokens, sims=c.simulations,
                    width=statistics.fmean(c.sample_widths) if c.sample_widths else 0.0,
                    calls=c.sample_calls)  # fmt: skip

    out = rollout.run(problems, sampler, env, on_wave=at_wave)
    return dict(
        workers=workers,
        iterations=rollout.iterations,
        sims=seen["sims"],
        search_s=seen["t"],
        sims_per_s=seen["sims"] / seen["t"],
        tokens=seen["tokens"],
        tok_per_s=seen["tokens"] / seen["t"],
        width=seen["width"],
        calls=seen["calls"],
        sampler_share=(sampler.sample_s + sampler.value_s) / (time.perf_counter() - t0),
        tree_size=out.stats["search/tree_size"],
        reward=out.stats["rollout/reward_mean"],
    )


def bench_plain(tokens: int, width: int, args, prompts: Sequence[list[int]], model, tok) -> float:
    """Tokens/s of plain whole completions in batches of ``width`` rows until ``tokens`` are made."""
    sampler = HFSampler(
        model, tok, temperature=args.temperature, seed=args.seed, max_batch_size=args.max_batch_size
    )
    rows = [prompts[i % len(prompts)] for i in range(max(1, width))]
    made, t0 = 0, time.perf_counter()
    while made < tokens:
        out = sampler.sample(rows, n=1, max_new_tokens=args.max_new_tokens, stop="answer")
        made += sum(len(c[0].token_ids) for c in out)
    return made / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=4, help="first N test problems, searched together")
    ap.add_argument("--sims", type=int, default=64, help="simulations per tree (workers x iterations)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--k", type=int, default=4, help="K completions per expansion")
    ap.add_argument("--max-step-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-batch-size", type=int, default=64, help="HFSampler rows per forward")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration; the fastest is kept")
    ap.add_argument("--policy", choices=("tiny", "random"), default="tiny")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    for n in args.workers:
        if n < 1 or args.sims % n:
            ap.error(f"--sims {args.sims} must be a positive multiple of every --workers value (got {n})")

    torch.set_num_threads(args.threads)
    model, tok, which = load_policy_or_random(args.policy)
    env = CountdownEnv()
    problems = list(env.test[: args.problems])
    print(f"policy: {which}")
    print(f"{len(problems)} problems searched together, {args.sims} simulations per tree, K={args.k}, "
          f"step cap {args.max_step_tokens}, completion cap {args.max_new_tokens}, seed {args.seed}, "
          f"{args.threads} thread(s), {args.max_batch_size} rows per forward, best of {args.repeats}")  # fmt: skip

    rows = []
    prompts = [encode_prompt(env, p, tok) for p in problems]
    for n in args.workers:  # best of --repeats (the box is shared): same seed, so the same work each time
        r = min((bench_search(n, args, problems, model, tok, env) for _ in range(args.repeats)),
                key=lambda x: x["search_s"])  # fmt: skip
        separate = min((bench_search(n, args, problems, model, tok, env, fused=False)
                        for _ in range(args.repeats)), key=lambda x: x["search_s"])  # fmt: skip
        if (separate["tokens"], separate["reward"]) != (r["tokens"], r["reward"]):
            print(f"  warning N={n}: the separate value pass searched differently (float ties?)")
        r["separate_sims_per_s"] = separate["sims_per_s"]
        r["plain_tok_per_s"] = max(
            bench_plain(r["tokens"], round(r["width"]), args, prompts, model, tok)
            for _ in range(args.repeats)
        )
        rows.append(r)
        print(f"  N={n:<3d} done in {r['search_s']:.1f}s", flush=True)

    base = rows[0]["sims_per_s"]
    head = (
        f"{'N':>3} {'M':>4} {'sims':>5} {'search s':>8} {'sims/s':>7} {'speed-up':>8} {'waves':>5} "
        f"{'width':>6} {'tokens':>7} {'search tok/s':>12} {'plain tok/s':>11} {'ratio':>5} "
        f"{'in sampler':>10} {'nodes':>6} {'reward':>6} {'separate value sims/s':>21} {'fused':>6}"
    )
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['workers']:>3} {r['iterations']:>4} {r['sims']:>5} {r['search_s']:>8.2f} {r['sims_per_s']:>7.1f} "
            f"{r['sims_per_s'] / base:>7.1f}x {r['calls']:>5} {r['width']:>6.1f} {r['tokens']:>7} "
            f"{r['tok_per_s']:>12.0f} {r['plain_tok_per_s']:>11.0f} {r['tok_per_s'] / r['plain_tok_per_s']:>5.2f} "
            f"{r['sampler_share']:>9.0%} {r['tree_size']:>6.1f} {r['reward']:>+6.2f} "
            f"{r['separate_sims_per_s']:>21.1f} {r['sims_per_s'] / r['separate_sims_per_s']:>5.2f}x"
        )
    print(
        "\nsims: all trees; width: mean rows (state x K) per search sample call; waves: sample calls; "
        "plain: stop='answer' completions of the prompts in equally wide batches; "
        "in sampler: share of the run in sample/value calls; separate value: V(s) in a second pass"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
