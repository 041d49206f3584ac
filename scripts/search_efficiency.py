"""Target quality against compute: share of emitted trajectories that are correct, against the
tokens generated per problem, for best-of-N at several N and MCTS variants at several budgets.

    python scripts/search_efficiency.py                                   # docs/search_efficiency.md's table and picture
    python scripts/search_efficiency.py --problems 48 --bon 4 16 --budgets 4x6 16x12
    python scripts/search_efficiency.py --policy outputs/mcts_countdown/<time>/policy
    python scripts/search_efficiency.py --variant "mine 4x4 8x8: rollout.rollout_mix=0.5 rollout.c_puct=2"

Every method is a set of Hydra overrides of ``configs/train.yaml``: it searches exactly as
``python train.py <overrides>`` would (``--variant`` adds more; a budget ``WxM`` sets
``rollout.workers=W rollout.iterations=M``: each variant runs at its own budgets, or at ``--budgets``). The problems are the last
``--problems`` of the train split (never the test set; the training stream draws from the whole
train split, so a 200-step run sees about 16% of them). Each method gets a fresh sampler with the
same seed over the same policy, and the problems are searched ``--batch`` at a time, as in
training (MCTS shares each wave across a batch's trees).

Printed: one row per method (tokens per problem generated, prefilled and both together: the
compute axis proportional to FLOPs, correct share with its 95% interval, mean dense
reward, share of problems where a correct answer was generated anywhere, distinct complete
trajectories per problem, the share of the search's new samples drawn below the root (a search
that branches only at the root is best-of-N under another name), wall and CPU time), then every
MCTS point against the best-of-N point nearest in tokens: the paired per-problem difference with
its 95% interval (a difference whose interval holds 0 is "no difference"), and the ratios of
processed tokens, wall time and CPU time. Written: ``--out``/search_efficiency.json and .png (correct share
and found share against tokens per problem, one curve per method).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tsd.config import build
from tsd.envs.countdown import CountdownEnv
from tsd.eval.search_efficiency import (
    ARTICLE_SEARCH,
    Method,
    MethodResult,
    compare,
    compose_rollout_config,
    measure,
    nearest_in_tokens,
)
from tsd.models.loading import load_policy

#: the experiment every method starts from: the search emitting one path per problem (train.py's
#: default experiment distils the whole tree instead)
ONE_PATH = ["experiment=mcts_countdown"]

#: the MCTS variants measured by default: name -> (their own budgets or None for --budgets, overrides).
#: "default" is configs/rollout/mcts.yaml; "article" the article's search at the laptop's sizes
#: (its 4x6 was the laptop default before; 16x24 shows where its tokens stop growing)
VARIANTS: dict[str, tuple[list[tuple[int, int]] | None, list[str]]] = {
    "default": (None, []),
    "article": ([(4, 6), (8, 6), (16, 6), (16, 12), (16, 24)], list(ARTICLE_SEARCH)),
}


def parse_variant(text: str) -> tuple[str, tuple[list[tuple[int, int]] | None, list[str]]]:
    head, sep, rest = text.partition(":")
    words = head.split()
    if not sep or not words:
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: expected 'NAME [WxM ...]: override override ...'"
        )
    budgets = [parse_budget(w) for w in words[1:]] or None
    return words[0], (budgets, rest.split())


def parse_budget(text: str) -> tuple[int, int]:
    w, sep, m = text.partition("x")
    if not sep or not w.isdigit() or not m.isdigit() or int(w) < 1 or int(m) < 1:
        raise argparse.ArgumentTypeError(f"budget {text!r}: expected WORKERSxITERATIONS, e.g. 4x6")
    return int(w), int(m)


def methods_from(args) -> list[Method]:
    # the one-path search (experiment=mcts_countdown: what its emitted trajectory is worth), and best-of-N
    out = [
        Method("best-of-N", f"bon{n}", [*ONE_PATH, "rollout=best_of_n", f"rollout.n={n}"]) for n in args.bon
    ]
    variants = dict(VARIANTS) if not args.only_variants else {}
    variants.update(dict(args.variant))
    for name, (own_budgets, overrides) in variants.items():
        for w, m in own_budgets or args.budgets:
            out.append(
                Method(
                    f"MCTS {name}",
                    f"{name} {w}x{m}",
                    [
                        *ONE_PATH,
                        "rollout=mcts",
                        f"rollout.workers={w}",
                        f"rollout.iterations={m}",
                        *overrides,
                    ],
                )
            )
    return out


def below(summary: dict) -> str:
    """Share of a search's new samples drawn below the root (best-of-N: all at the root, '-')."""
    share = summary["stats"].get("search/root_branch_fraction")
    return "-" if share is None else f"{1 - share:.0%}"


def plot(results: list[MethodResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    panels = (  # (x of a result, y of a result, what y is, what x is)
        (lambda r: r.mean("tokens"), lambda r: r.mean("correct"), "emitted trajectory correct", "generated"),
        (lambda r: r.mean("tokens"), lambda r: r.mean("found"), "a correct answer found anywhere", "generated"),
        (lambda r: r.summary()["processed_tokens_per_problem"], lambda r: r.mean("correct"),
         "emitted trajectory correct", "processed (prefill + generated, ~FLOPs)"),
    )  # fmt: skip
    families = list(dict.fromkeys(r.method.family for r in results))
    for ax, (fx, fy, what, xwhat) in zip(axes, panels):
        for fam in families:
            pts = sorted((r for r in results if r.method.family == fam), key=fx)
            style = dict(marker="o", linestyle="--" if fam == "best-of-N" else "-", label=fam)
            ax.plot([fx(r) for r in pts], [fy(r) for r in pts], **style)
            for r in pts:
                ax.annotate(r.method.label.split()[-1], (fx(r), fy(r)), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{xwhat} tokens per problem (log scale)")
        ax.set_title(f"share of problems: {what}", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_measured(journal: Path, setup: dict) -> dict[str, dict]:
    """The rows of ``journal`` measured with this ``setup`` (same policy, problems, seed, batch,
    temperature), by method key; a torn last line (a killed run) is ignored."""
    rows: dict[str, dict] = {}
    if not journal.exists():
        return rows
    for line in journal.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("setup") == setup and isinstance(row.get("key"), str):
            rows[row["key"]] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny", help="'tiny' (bundled) or an exported policy directory")
    ap.add_argument("--problems", type=int, default=128, help="the last N problems of the train split")
    ap.add_argument(
        "--batch", type=int, default=16, help="problems per rollout call (as generation.problems_per_rollout)"
    )
    ap.add_argument("--bon", type=int, nargs="*", default=[4, 8, 16, 28, 32, 64],
                    help="best-of-N values of N (28: about the tokens of the default search at 4x8)")  # fmt: skip
    ap.add_argument("--budgets", type=parse_budget, nargs="*", default=[(4, 2), (4, 4), (4, 8), (8, 8)],
                    help="MCTS budgets WORKERSxITERATIONS (for variants that name none)")  # fmt: skip
    ap.add_argument("--variant", type=parse_variant, action="append", default=[],
                    help="'NAME [WxM ...]: override ...' an MCTS variant (Hydra overrides of configs/train.yaml)")  # fmt: skip
    ap.add_argument(
        "--only-variants", action="store_true", help="skip the built-in variants (default, article)"
    )
    ap.add_argument("--seed", type=int, default=0, help="the sampler's seed (the same for every method)")
    ap.add_argument(
        "--temperature", type=float, default=None, help="sampler temperature (default: the config's)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("outputs/search_efficiency"))
    ap.add_argument("--fresh", action="store_true",
                    help="measure every method again (default: reuse OUT/measured.jsonl rows of the same setup)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.problems < 2 or args.batch < 1:
        ap.error("--problems must be >= 2 and --batch >= 1")
    if any(n < 1 for n in args.bon):
        ap.error("--bon values must be >= 1")

    torch.set_num_threads(args.threads)
    policy, tok = load_policy(args.policy)
    policy.eval()
    env = CountdownEnv()
    problems = list(env.train[-args.problems :])

    def make_sampler(cfg):
        extra = {"seed": args.seed}
        if args.temperature is not None:
            extra["temperature"] = args.temperature
        return build(cfg.sampler, "sampler", **extra)(policy, tok)

    methods = methods_from(args)
    for m in methods:  # every config composes and builds before any compute
        try:
            build(compose_rollout_config(m.overrides).rollout, f"{m.label}: rollout")
        except Exception as e:  # noqa: BLE001 - reported with the method's name, then exit 2
            print(f"error: {m.label}: {e}", file=sys.stderr)
            return 2
    print(f"policy {args.policy}; {len(problems)} problems (train[-{args.problems}:]), {args.batch} per call, "
          f"sampler seed {args.seed}, {args.threads} torch thread(s); {len(methods)} methods", flush=True)  # fmt: skip
    # every method's measurement is appended to OUT/measured.jsonl as it finishes: an interrupted
    # run, rerun with the same arguments, measures only what is missing
    args.out.mkdir(parents=True, exist_ok=True)
    journal = args.out / "measured.jsonl"
    setup = {"policy": args.policy, "problems": args.problems, "seed": args.seed, "batch": args.batch,
             "temperature": args.temperature}  # fmt: skip
    done = {} if args.fresh else load_measured(journal, setup)
    results: list[MethodResult] = []
    for i, m in enumerate(methods, 1):
        key = json.dumps([m.label, m.overrides])
        if key in done:
            row = done[key]
            r = MethodResult(m, row["per_problem"], row["wall_s"], row["stats"], row.get("prefill_tokens", 0.0),
                             row.get("cpu_s", float("nan")))  # fmt: skip
            results.append(r)
            print(f"[{i}/{len(methods)}] {m.label:<24} (measured before: {journal})", flush=True)
            continue
        r = measure(m, problems, env, make_sampler, args.batch)
        results.append(r)
        with journal.open("a") as f:
            f.write(json.dumps({"setup": setup, "key": key, "per_problem": r.per_problem,
                                "wall_s": r.wall_s, "stats": r.stats, "prefill_tokens": r.prefill_tokens,
                                "cpu_s": r.cpu_s}) + "\n")  # fmt: skip
        print(f"[{i}/{len(methods)}] {m.label:<24} {r.mean('tokens'):7.0f} tok/problem  correct {r.mean('correct'):.3f}  "
              f"found {r.mean('found'):.3f}  {r.wall_s:6.1f}s", flush=True)  # fmt: skip

    summaries = [r.summary() for r in results]
    head = (
        f"{'method':<26} {'tok/prob':>8} {'prefill':>8} {'processed':>9} {'correct':>7} {'95% CI':>15} "
        f"{'reward':>7} {'found':>6} {'distinct':>8} {'below root':>10} {'wall s':>7} {'cpu s':>7}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for s in summaries:
        lo, hi = s["correct_ci95"]
        print(f"{s['label']:<26} {s['tokens_per_problem']:>8.0f} {s['prefill_tokens_per_problem']:>8.0f} "
              f"{s['processed_tokens_per_problem']:>9.0f} {s['correct_share']:>7.3f} "
              f"[{lo:>+.3f},{hi:>+.3f}] {s['reward_mean']:>+7.3f} {s['found_share']:>6.3f} "
              f"{s['distinct_per_problem']:>8.1f} {below(s):>10} {s['wall_s']:>7.1f} {s['cpu_s']:>7.1f}")  # fmt: skip
    print("(tok/prob: generated tokens per problem; prefill: state tokens run to start sampling; processed: "
          "their sum, proportional to FLOPs)")  # fmt: skip

    bons = [r for r in results if r.method.family == "best-of-N"]
    comparisons = []
    if bons:
        print("\nMCTS against the best-of-N point nearest in tokens (paired per problem, correct share):")
        for r in results:
            if r.method.family == "best-of-N":
                continue
            base = nearest_in_tokens(r, bons)
            c = compare(r, base)
            c["wall_ratio"] = r.wall_s / max(base.wall_s, 1e-9)
            c["cpu_ratio"] = r.cpu_s / max(base.cpu_s, 1e-9)
            c["processed_ratio"] = r.summary()["processed_tokens_per_problem"] / max(
                base.summary()["processed_tokens_per_problem"], 1e-9
            )
            comparisons.append(c)
            lo, hi = c["ci95"]
            eq = "equal tokens" if c["equal_compute"] else "tokens differ >10%"
            print(f"  {c['run']:<24} vs {c['base']:<6} tokens x{c['token_ratio']:.2f} ({eq}): "
                  f"{c['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] -> {c['verdict']}; processed tokens "
                  f"x{c['processed_ratio']:.2f}, wall x{c['wall_ratio']:.2f}, cpu x{c['cpu_ratio']:.2f}")  # fmt: skip

    payload = {
        "policy": args.policy,
        "problems": f"train[-{args.problems}:]",
        "seed": args.seed,
        "batch": args.batch,
        "methods": summaries,
        "comparisons": comparisons,
        "per_problem": {r.method.label: r.per_problem for r in results},
    }
    (args.out / "search_efficiency.json").write_text(json.dumps(payload, indent=1))
    title = f"{args.policy} policy, {len(problems)} held train problems, sampler seed {args.seed}"
    plot(results, args.out / "search_efficiency.png", title)
    print(f"\nwrote {args.out / 'search_efficiency.json'} and {args.out / 'search_efficiency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
