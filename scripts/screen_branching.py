"""Screen branching designs against i.i.d. sampling at equal generated tokens, on frozen policies,
before training with any of them (docs/branching.md; the logic: ``tsd.eval.screening``).

    python scripts/screen_branching.py                                        # bundled policy, 256 held train problems
    python scripts/screen_branching.py --policy tiny --policy outputs/<cispo run>/policy
    python scripts/screen_branching.py --only-designs --design "mine: experiment=eptree_countdown rollout.chains=6"

Every design is a set of Hydra overrides of ``configs/train.yaml`` emitting the whole tree
(``--design 'NAME: override ...'`` adds one). The problems are the last ``--problems`` of the train
split. For each policy, one pool of ``--pool`` i.i.d. samples per problem is drawn once (sampler
seed ``--seed + 1000``); every design runs with a fresh sampler seeded ``--seed``, ``--batch``
problems at a time as in training, and each of its trees is set against the pool's first samples
of the same tokens on the same problem. Printed per policy: one row per design and per fixed group
(4, 8, 16 samples: CISPO's shapes) with its absolute figures, then every design against its
matched i.i.d. group (paired per problem, 95% CI) and the verdict. Measurements are journaled in
``OUT/measured.jsonl`` as they finish: an interrupted run, rerun with the same arguments, measures
only what is missing. Written: ``OUT/screening.json``, ``OUT/screening.md`` (the table of
docs/branching.md) and ``OUT/screen_branching.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tsd.config import build
from tsd.envs.countdown import CountdownEnv
from tsd.eval.screening import (
    DESIGNS,
    FIXED_GROUPS,
    PAIRED,
    Design,
    Sample,
    compare,
    group_row,
    matched_group,
    run_design,
    sample_pool,
    summarise,
    verdict,
)
from tsd.eval.search_efficiency import compose_rollout_config
from tsd.models.loading import load_policy


def parse_design(text: str) -> tuple[str, list[str]]:
    head, sep, rest = text.partition(":")
    if not sep or not head.strip():
        raise argparse.ArgumentTypeError(f"--design {text!r}: expected 'NAME: override override ...'")
    return head.strip(), rest.split()


def load_journal(journal: Path) -> dict[str, dict]:
    """Rows of ``journal`` by key; a torn last line (a killed run) is ignored."""
    rows: dict[str, dict] = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("key"), str):
                rows[row["key"]] = row
    return rows


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt_ci(c: dict, scale: float = 1.0, digits: int = 3) -> str:
    lo, hi = c["ci95"]
    return f"{scale * c['diff']:+.{digits}f} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def print_tables(policy: str, summary: dict) -> None:
    head = (f"{'design':<48} {'tok/prob':>8} {'leaves':>6} {'solved':>6} {'mixed':>6} {'bp mixed':>8} "
            f"{'bp nondeg':>9} {'dist. corr':>10} {'leaves/1k':>9} {'nonzero adv':>11} {'mixed/10k':>9} "
            f"{'solved/10k':>10} {'wall s':>6}")  # fmt: skip
    print(f"\n== policy {policy}: absolute figures (means per problem; /10k: per 10,000 generated tokens)")
    print(head + "\n" + "-" * len(head))
    for label, s in summary["rows"].items():
        wall = s.get("wall_s")
        print(f"{label:<48} {s['tokens']:>8.0f} {s['leaves']:>6.1f} {s['solved']:>6.3f} {s['mixed']:>6.3f} "
              f"{s['bp_mixed']:>8.3f} {s['bp_nondegenerate']:>9.3f} {s['distinct_correct']:>10.3f} "
              f"{s['leaves_per_1k']:>9.1f} {s['nonzero_share']:>11.3f} {s['mixed_per_10k']:>9.2f} "
              f"{s['solved_per_10k']:>10.2f} {'-' if wall is None else f'{wall:.0f}':>6}")  # fmt: skip
    print(f"\n== policy {policy}: each design - i.i.d. samples of the same tokens on the same problem "
          "(paired per problem, 95% CI; /10k: bootstrap)")  # fmt: skip
    for label, c in summary["comparisons"].items():
        print(f"{label}  (tokens x{c['token_ratio']['value']:.2f}) -> {c['verdict']}")
        print("   " + "; ".join(f"{k} {fmt_ci(c[k])}" for k in PAIRED if k not in ("leaves_per_1k",)))
        print(f"   leaves/1k {fmt_ci(c['leaves_per_1k'], digits=1)}; mixed/10k {fmt_ci(c['mixed_per_10k'], digits=2)};"
              f" solved/10k {fmt_ci(c['solved_per_10k'], digits=2)}")  # fmt: skip


def markdown(results: dict) -> str:
    """Per policy, the design - matched i.i.d. table (the one docs/branching.md shows)."""
    lines = []
    for pol, r in results.items():
        lines += [
            f"Policy `{short_name(pol)}`:",
            "",
            "| design | tokens / problem | leaves (i.i.d.) | solved: design (i.i.d.) | solved, paired diff "
            "| branch points with mixed correctness: diff | distinct correct answers: diff "
            "| mixed problems per 10k tokens: diff | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, c in r["comparisons"].items():
            row, base = r["rows"][label], r["rows"][f"  i.i.d. at {label}'s tokens"]
            lines.append(
                f"| {label} | {row['tokens']:.0f} | {row['leaves']:.1f} ({base['leaves']:.1f}) "
                f"| {row['solved']:.3f} ({base['solved']:.3f}) | {fmt_ci(c['solved'])} | {fmt_ci(c['bp_mixed'])} "
                f"| {fmt_ci(c['distinct_correct'], digits=2)} | {fmt_ci(c['mixed_per_10k'], digits=2)} "
                f"| {c['verdict']} |"
            )
        for k in FIXED_GROUPS:
            g = r["rows"][f"i.i.d. group of {k} (CISPO's shape)"]
            lines.append(f"| i.i.d. group of {k} | {g['tokens']:.0f} | {g['leaves']:.1f} | {g['solved']:.3f} | - | - "
                         f"| - | {g['mixed_per_10k']:.2f} (absolute) | - |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def short_name(policy: str) -> str:
    """``tiny``, or an exported policy's run directory name (``<run>/policy`` -> ``<run>``)."""
    p = Path(policy)
    return p.parent.name if p.name == "policy" and p.parent.name else p.name or policy


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(results)
    keys = (("solved", "problems with a correct answer"),
            ("bp_mixed", "branch points whose children differ in correctness"),
            ("mixed_per_10k", "problems with mixed correctness per 10k tokens"))  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 0.5 + 0.45 * max(
        len(r["comparisons"]) for r in results.values())), squeeze=False)  # fmt: skip
    for ax, (key, what) in zip(axes[0], keys):
        for j, pol in enumerate(policies):
            comps = results[pol]["comparisons"]
            labels = list(comps)
            ys = [i + 0.18 * (j - (len(policies) - 1) / 2) for i in range(len(labels))]
            xs = [comps[lb][key]["diff"] for lb in labels]
            lo = [comps[lb][key]["diff"] - comps[lb][key]["ci95"][0] for lb in labels]
            hi = [comps[lb][key]["ci95"][1] - comps[lb][key]["diff"] for lb in labels]
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", capsize=3, label=f"policy {short_name(pol)}")
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.axvline(0, color="k", lw=0.8)
        ax.invert_yaxis()
        ax.set_title(f"design - i.i.d. at equal tokens:\n{what}", fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", action="append", default=None,
                    help="'tiny' (bundled) or an exported policy directory; repeat for several (default: tiny)")  # fmt: skip
    ap.add_argument("--problems", type=int, default=256, help="the last N problems of the train split")
    ap.add_argument("--batch", type=int, default=8, help="problems per rollout call (the study's 8 per step)")
    ap.add_argument("--pool", type=int, default=48, help="i.i.d. samples per problem in the pool")
    ap.add_argument("--design", type=parse_design, action="append", default=[],
                    help="'NAME: override ...' a design (Hydra overrides of configs/train.yaml)")  # fmt: skip
    ap.add_argument("--only-designs", action="store_true", help="skip the built-in designs")
    ap.add_argument("--seed", type=int, default=0, help="the designs' sampler seed (the pool's: + 1000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("outputs/screen_branching"))
    ap.add_argument("--fresh", action="store_true", help="measure again what the journal holds")
    args = ap.parse_args(argv)
    if args.problems < 2 or args.batch < 1 or args.pool < max(FIXED_GROUPS):
        ap.error(f"--problems must be >= 2, --batch >= 1, --pool >= {max(FIXED_GROUPS)}")
    policies = args.policy or ["tiny"]
    designs = [] if args.only_designs else [Design(k, v) for k, v in DESIGNS.items()]
    designs += [Design(k, v) for k, v in args.design]
    for d in designs:  # every config composes and builds before any compute
        try:
            build(compose_rollout_config(d.overrides).rollout, f"{d.label}: rollout")
        except Exception as e:  # noqa: BLE001 - reported with the design's name, then exit 2
            print(f"error: {d.label}: {e}", file=sys.stderr)
            return 2

    torch.set_num_threads(args.threads)
    env = CountdownEnv()
    problems = list(env.train[-args.problems :])
    args.out.mkdir(parents=True, exist_ok=True)
    journal = args.out / "measured.jsonl"
    done = {} if args.fresh else load_journal(journal)

    def record(key: str, payload: dict) -> None:
        with journal.open("a") as f:
            f.write(json.dumps({"key": key, **payload}) + "\n")

    log(f"{len(policies)} policies x ({len(designs)} designs + the i.i.d. pool), {len(problems)} problems "
        f"(train[-{args.problems}:]), {args.batch} per call, seed {args.seed}, pool {args.pool}")  # fmt: skip
    results: dict[str, dict] = {}
    for policy_name in policies:
        model, tok = load_policy(policy_name)
        model.eval()
        setup = [policy_name, args.problems, args.seed, args.batch]

        def make_sampler(cfg, seed: int = args.seed, model=model, tok=tok):
            return build(cfg.sampler, "sampler", seed=seed)(model, tok)

        pool_key = json.dumps(["pool", *setup, args.pool])
        if pool_key in done:
            pool = [[Sample(*s) for s in row] for row in done[pool_key]["pool"]]
            log(f"{policy_name}: i.i.d. pool (measured before)")
        else:
            cfg = compose_rollout_config(["experiment=cispo_countdown"])
            pool = sample_pool(problems, make_sampler(cfg, args.seed + 1000), env, args.pool, args.batch,
                               progress=lambda m, p=policy_name: log(f"{p}: {m}"))  # fmt: skip
            record(
                pool_key, {"pool": [[[s.tokens, s.dense, s.correct, s.answer] for s in row] for row in pool]}
            )
        rows: dict[str, dict] = {}
        comparisons: dict[str, dict] = {}
        for k in FIXED_GROUPS:
            rows[f"i.i.d. group of {k} (CISPO's shape)"] = summarise([group_row(p[:k]) for p in pool])
        for i, d in enumerate(designs, 1):
            key = json.dumps([*setup, d.label, d.overrides])
            if key in done:
                per, stats, wall = done[key]["rows"], done[key]["stats"], done[key]["wall_s"]
                log(f"{policy_name}: [{i}/{len(designs)}] {d.label} (measured before)")
            else:
                t0 = time.perf_counter()
                per, stats = run_design(d, problems, env, make_sampler, args.batch,
                                        progress=lambda m, p=policy_name, i=i: log(f"{p}: [{i}/{len(designs)}] {m}"))  # fmt: skip
                wall = time.perf_counter() - t0
                record(key, {"rows": per, "stats": stats, "wall_s": wall})
            matched = [group_row(matched_group(p, r["tokens"])) for p, r in zip(pool, per)]
            short = sum(r["tokens"] > sum(s.tokens for s in p) for p, r in zip(pool, per))
            if short:
                log(
                    f"warning: {d.label}: {short} problems spent more tokens than the pool holds (raise --pool)"
                )
            rows[d.label] = {**summarise(per), "wall_s": wall}
            rows[f"  i.i.d. at {d.label}'s tokens"] = summarise(matched)
            c = compare(per, matched)
            c["verdict"] = verdict(c)
            c["stats"] = stats
            comparisons[d.label] = c
        results[policy_name] = {"rows": rows, "comparisons": comparisons}
        print_tables(policy_name, results[policy_name])
    payload = {"problems": f"train[-{args.problems}:]", "seed": args.seed, "batch": args.batch, "pool": args.pool,
               "designs": {d.label: d.overrides for d in designs}, "results": results}  # fmt: skip
    (args.out / "screening.json").write_text(json.dumps(payload, indent=1))
    (args.out / "screening.md").write_text(markdown(results))
    plot(results, args.out / "screen_branching.png")
    log(f"wrote {args.out / 'screening.json'}, screening.md and screen_branching.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
