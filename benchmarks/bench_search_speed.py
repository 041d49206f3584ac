"""The search's wall time against best-of-N at equal generated tokens, measured in turns.

    python benchmarks/bench_search_speed.py                       # 256 held train problems, 5 rounds
    python benchmarks/bench_search_speed.py --problems 64 --rounds 3 --budget 4x4 --bon 16
    python benchmarks/bench_search_speed.py --sampler vllm --policy Qwen/Qwen2.5-1.5B-Instruct  # GPU

The laptop default search (configs/rollout/mcts.yaml, one path per problem) at ``--budget`` and
best-of-``--bon`` (about the same generated tokens) run on the same problems with a freshly seeded
HF sampler each, in alternating turns (bon, search, bon, search, ...), so that a machine whose
speed drifts (a shared VM) slows both alike; a third row is the search without the sampler's prefix
store (``sampler.prefix_cache_tokens=0``). Printed per method: generated, prefill and processed
tokens per problem, the correct share, and the median and best wall seconds over the rounds; then
each search row's ratio to best-of-N (median over median, and best over best). Every round of a
method samples exactly the same tokens (same seed), so the rounds differ only in time.

``--sampler vllm`` measures the same two methods with vLLM (the paper-scale sampler: paged
attention, automatic prefix caching). One engine serves both methods (an engine per method and
round would not fit one GPU), its prefix cache emptied before every turn; vLLM seeds the engine,
not each request, so its rounds sample different tokens (the table gives the last round's tokens).
The no-prefix-store row is HF's only (vLLM's prefix caching is an engine setting).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from tsd.config import build
from tsd.envs.countdown import CountdownEnv
from tsd.eval.search_efficiency import Method, measure
from tsd.models.loading import load_policy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=256, help="the last N problems of the train split")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", default="4x8", help="WORKERSxITERATIONS of the search")
    ap.add_argument("--bon", type=int, default=28, help="N of best-of-N (28: about 4x8's tokens)")
    ap.add_argument("--batch", type=int, default=16, help="problems per rollout call")
    ap.add_argument("--sampler", choices=("hf", "vllm"), default="hf")
    ap.add_argument("--policy", default="tiny", help="'tiny' (bundled), a policy directory or a hub id")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for both methods"
    )
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="policy weights")
    a = ap.parse_args(argv)
    w, _, m = a.budget.partition("x")
    if a.rounds < 1 or a.problems < 1 or not (w.isdigit() and m.isdigit()):
        ap.error("--rounds and --problems must be >= 1, --budget WxM")
    torch.set_num_threads(1)
    device = "cuda" if a.sampler == "vllm" and torch.cuda.is_available() else "cpu"
    policy, tok = load_policy(a.policy, dtype=getattr(torch, a.dtype), device=device)
    policy.eval()
    env = CountdownEnv()
    problems = list(env.train[-a.problems :])
    base_ = ["experiment=mcts_countdown", f"sampler={a.sampler}", *a.set]
    search = [*base_, f"rollout.workers={w}", f"rollout.iterations={m}"]
    methods = [
        Method("best-of-N", f"best-of-{a.bon}", [*base_, "rollout=best_of_n", f"rollout.n={a.bon}"]),
        Method("MCTS", f"search {a.budget}", search),
    ]
    if a.sampler == "hf":
        methods.append(
            Method("MCTS", f"search {a.budget}, no prefix store", [*search, "sampler.prefix_cache_tokens=0"])
        )
    engine: list = []  # vLLM: the one sampler every turn uses

    def make_sampler(cfg):
        if a.sampler == "hf":
            return build(cfg.sampler, "sampler", seed=0)(policy, tok)
        if not engine:
            engine.append(build(cfg.sampler, "sampler", seed=0)(policy, tok))
        engine[0].llm.reset_prefix_cache()  # every turn starts cold, as a fresh HF sampler does
        return engine[0]

    walls: dict[str, list[float]] = {x.label: [] for x in methods}
    last = {}
    for r in range(a.rounds):
        for x in methods:
            res = measure(x, problems, env, make_sampler, a.batch)
            walls[x.label].append(res.wall_s)
            last[x.label] = res
            print(f"round {r + 1}/{a.rounds} {x.label:<32} {res.wall_s:6.1f}s", flush=True)
    base = methods[0].label
    print(
        f"\n{a.problems} problems, {a.rounds} rounds, sampler {a.sampler}, policy {a.policy}, 1 torch thread"
    )
    head = (f"{'method':<32} {'gen/prob':>8} {'prefill':>8} {'processed':>9} {'correct':>7} "
            f"{'median s':>8} {'best s':>7} {'x median':>8} {'x best':>7}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for x in methods:
        s = last[x.label].summary()
        med, best = statistics.median(walls[x.label]), min(walls[x.label])
        rm, rb = med / statistics.median(walls[base]), best / min(walls[base])
        print(f"{x.label:<32} {s['tokens_per_problem']:>8.0f} {s['prefill_tokens_per_problem']:>8.0f} "
              f"{s['processed_tokens_per_problem']:>9.0f} {s['correct_share']:>7.3f} {med:>8.1f} {best:>7.1f} "
              f"{rm:>8.2f} {rb:>7.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
