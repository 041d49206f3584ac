"""The plateau study: every method trained until its validation score stops improving (the
article's protocol), each family at several shapes, compared at its validation-best policy and
along the generated-token axis. The command line is ``scripts/study.py plateau``.

    python scripts/study.py plateau plan               # the runs and their commands, nothing run
    python scripts/study.py plateau run --parallel 2   # run what is missing (resumable)
    python scripts/study.py plateau report [--doc docs/study.md]   # tables, curves, frontier
    python scripts/study.py plateau all --parallel 2   # run, then report

Design (docs/study.md says why):

- every run is ``train.py ... stop=plateau`` (src/tsd/callbacks/stopping.py): validation mean@16
  on the 256 validation problems every 250k generated tokens, stop after 4 evaluations without a
  rise of more than 0.25 points, or at 3.5M generated tokens (first 2.5M: the one long run
  before, CISPO's, peaked at 1.4M and sat flat after it; raised when seed 0's CISPO-8 was still
  rising at 2.5M; the runs that cap stopped went on from their checkpoints); the validation-best
  policy exported;
- the study's batch rule: one optimiser step per rollout of 8 problems, on-policy (sync every
  step, lag 0), each arm at its learning rate from the 150-step study's grid (``LRS``);
- arms: CISPO at groups 16, 8 and 4 (fewer tokens per step, the same 8 problems), best-of-16,
  the article's one-path MCTS (4 workers x 6 waves), the whole tree (TreeRL) at 4 x 4 and 4 x 2;
  3 seeds each; every tree and CISPO shape also at 1e-4 (seed 0), its seeds 1 and 2 at the rate
  with the higher seed-0 validation best (``picked_lr``);
- evaluation: the validation-best policy of every run on all 820 test problems at T=1.0 and 0.2
  (mean@16), paired per problem on seed-averaged scores; the generated tokens to the best and to
  90% of it; validation curves against generated tokens with seed bands; the frontier of each
  family's best shape at equal tokens, paired per validation problem at each budget (a seed the
  plateau rule stopped counts at later budgets with its last evaluation).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from tsd.eval.paired import paired_by_id, with_seed_noise
from tsd.eval.search_efficiency import ARTICLE_SEARCH
from tsd.eval.study import ROOT, TEMPERATURES, Job, eval_job
from tsd.fileio import write_text_atomic

SEEDS = (0, 1, 2)
BEGIN, END = "<!-- study.py plateau: begin -->", "<!-- study.py plateau: end -->"
#: the README's short table (``readme_table``)
README_BEGIN, README_END = "<!-- study.py plateau readme: begin -->", "<!-- study.py plateau readme: end -->"
#: the article's plateaus (mean@16 %, Qwen-2.5-1.5B; its MCTS distils the search's one path)
ARTICLE = {"base": 3.1, "cispo": 8.4, "bon": 7.7, "mcts_article": 11.3}
#: the stop rule's cadence (configs/stop/plateau.yaml); the frontier is read at its multiples
EVAL_EVERY_TOKENS = 250_000
#: the token cap; 2.5M until seed 0's CISPO-8 was still rising there (a run the old cap stopped
#: goes on from its checkpoint: ``train_job``); a run the plateau rule stopped is not touched
MAX_TOKENS = 3_500_000

COMMON = [
    "stop=plateau",
    "generation.problems_per_rollout=8",
    "data.sync_every=1",
    "data.max_lag=0",
    "callbacks.eval=null",  # the test set is read once, by eval.py on the best policy
    f"callbacks.val.every_n_tokens={EVAL_EVERY_TOKENS}",
    f"callbacks.token_budget.max_generated_tokens={MAX_TOKENS}",
]


#: arm -> (family, label, learning rate, overrides on top of COMMON); rates: the 150-step study's picks
ARMS: dict[str, tuple[str, str, str, list[str]]] = {
    "cispo16": ("cispo", "CISPO, group 16", "3e-4",
                ["experiment=cispo_countdown", "rollout.group_size=16", "data.batch_size=128"]),
    "cispo8": ("cispo", "CISPO, group 8", "3e-4",
               ["experiment=cispo_countdown", "rollout.group_size=8", "data.batch_size=64"]),
    "cispo4": ("cispo", "CISPO, group 4", "3e-4",
               ["experiment=cispo_countdown", "rollout.group_size=4", "data.batch_size=32"]),
    "bon": ("bon", "best-of-16", "3e-5", ["experiment=bon_countdown", "rollout.n=16", "data.batch_size=8"]),
    "mcts_article": ("mcts_article", "MCTS, the article's one path (4 x 6)", "1e-4",
                     ["experiment=mcts_countdown", "data.batch_size=8", "rollout.workers=4",
                      "rollout.iterations=6", *ARTICLE_SEARCH]),
    "tree44": ("tree", "the whole tree, 4 x 4", "3e-4",
               ["experiment=tree_countdown", "data.batch_size=1", "rollout.workers=4", "rollout.iterations=4"]),
    "tree42": ("tree", "the whole tree, 4 x 2", "3e-4",
               ["experiment=tree_countdown", "data.batch_size=1", "rollout.workers=4", "rollout.iterations=2"]),
}  # fmt: skip
#: the families the README's question rests on (the tree against CISPO): their shapes' seeds 1 and 2
#: run before the other arms'
HEADLINE = tuple(a for a, (family, *_rest) in ARMS.items() if family in ("tree", "cispo"))
#: the rate grid at plateau: every tree and CISPO shape also at 1e-4, seed 0 (CISPO-16 at 1e-4
#: trained to the cap beat its 3e-4 plateau on test: the 150-step pick does not carry over); seeds 1
#: and 2 run at the rate whose seed-0 run reached the higher validation best (``picked_lr``)
LOWER_RATE = "1e-4"
RATE_CHECKS: tuple[tuple[str, str], ...] = tuple((a, LOWER_RATE) for a in HEADLINE)
FAMILIES = {"cispo": "CISPO", "bon": "best-of-N", "mcts_article": "MCTS, one path", "tree": "the whole tree"}


def run_dir(out: Path, arm: str, seed: int, lr: str | None = None) -> Path:
    lr = lr or ARMS[arm][2]
    tag = "" if lr == ARMS[arm][2] else f"_lr{lr}"
    return out / "runs" / f"{arm}{tag}_s{seed}"


def under_the_cap(results: Path) -> bool:
    """A run's results count unless a token cap below ``MAX_TOKENS`` stopped it."""
    res = json.loads(results.read_text())
    budget = str(res.get("stop_reason", "")).startswith("token budget")
    return not budget or res.get("compute/generated_tokens", 0) >= MAX_TOKENS


def train_job(out: Path, arm: str, seed: int, lr: str | None = None) -> Job:
    """The run's command; a run that was stopped part-way (its ``last.ckpt`` there, no
    ``results.json``), or by a lower token cap than ``MAX_TOKENS``, resumes from its checkpoint
    instead of starting again from step 0."""
    d = run_dir(out, arm, seed, lr)
    lr = lr or ARMS[arm][2]
    argv = [sys.executable, str(ROOT / "train.py"), *ARMS[arm][3], *COMMON, f"module.optimizer.lr={lr}",
            f"seed={seed}", f"hydra.run.dir={d}"]  # fmt: skip
    job = Job(f"train {d.name}", argv, d / "results.json", accept=under_the_cap)
    last = d / "checkpoints" / "last.ckpt"
    if last.exists() and not job.done():
        argv.append(f"ckpt_path={last}")
    return job


def _newer_than(results: Path) -> Callable[[Path], bool]:
    """An evaluation counts only if written after the run's results (a run that went on since may
    have a new best policy)."""
    return lambda f: not results.exists() or f.stat().st_mtime >= results.stat().st_mtime


def picked_lr(out: Path, arm: str) -> str | None:
    """The arm's rate for seeds 1 and 2: its study rate when it has no rate check, else the rate
    whose seed-0 run reached the higher validation best (a tie keeps the study rate); None until
    those seed-0 runs are done. Chosen on validation, never on test."""
    study = ARMS[arm][2]
    checks = [lr for a, lr in RATE_CHECKS if a == arm]
    if not checks:
        return study
    scores = {}
    for lr in (study, *checks):
        job = train_job(out, arm, 0, lr)
        if not job.done():
            return None
        best = (json.loads(job.done_file.read_text()).get("best") or {}).get("score")
        if best is None:
            return None
        scores[lr] = best
    return max(scores, key=lambda lr: (scores[lr], lr == study))


def arm_lr(out: Path, arm: str) -> str:
    """The rate the arm is reported at: the picked one, or its study rate while that is undecided."""
    return picked_lr(out, arm) or ARMS[arm][2]


def plan(out: Path) -> list[Job]:
    """Seed 0 of every arm first (a study cut short compares every arm), then the rate checks (they
    pick the rate of the other seeds: ``picked_lr``), then seeds 1 and 2 of the ``HEADLINE`` arms
    whose rate is picked, then the other arms' seeds 1 and 2; each run's evaluations right after
    it. The runner plans again after each job, so seeds appear once their rate is picked."""
    jobs = [eval_job(out, "base", "tiny", t) for t in TEMPERATURES]
    rest = [a for a in ARMS if a not in HEADLINE]
    order: list[tuple[str, int, str | None]] = [(a, 0, None) for a in ARMS]
    order += [(a, 0, lr) for a, lr in RATE_CHECKS]
    for arms in (HEADLINE, rest):
        order += [(a, s, lr) for s in SEEDS[1:] for a in arms if (lr := picked_lr(out, a)) is not None]
    for arm, seed, lr in order:
        job = train_job(out, arm, seed, lr)
        jobs.append(job)
        d = run_dir(out, arm, seed, lr)
        for t in TEMPERATURES:
            ev = eval_job(out, d.name, str(d / "policy_best"), t)
            jobs.append(
                Job(ev.name, ev.argv, ev.done_file, after=[job.name], accept=_newer_than(job.done_file))
            )
    return jobs


# ---------------------------------------------------------------------------------------------- report
def _json(f: Path) -> dict | None:
    return json.loads(f.read_text()) if f.exists() else None


def _per_problem(res: dict) -> dict[str, float]:
    k = res["samples_per_problem"]
    return {p: c / k for p, c in res["per_problem_correct"].items()}


def _verdict(d: dict, a: str, b: str) -> str:
    lo, hi = d["ci95"]
    return "no difference" if lo <= 0 <= hi else (f"{b} > {a}" if lo > 0 else f"{a} > {b}")


def _journal(d: Path) -> list[dict]:
    """The run's validation evaluations (val_evals.jsonl), one per step: a run resumed from its
    checkpoint may repeat a step (the later line wins); a run started again from step 0 (stopped
    before its first checkpoint) begins a new history, and the lines before its step 0 are dropped."""
    f = d / "val_evals.jsonl"
    if not f.exists():
        return []
    rows: dict[int, dict] = {}
    for line in f.read_text().splitlines():
        r = json.loads(line)
        if r["step"] == 0:
            rows = {}
        rows[r["step"]] = r
    return [rows[s] for s in sorted(rows)]


def _curve(d: Path) -> list[tuple[float, float]]:
    """(generated tokens, validation mean@16) of every evaluation of a run."""
    return [(r["compute/generated_tokens"], r["val/mean@16"]) for r in _journal(d)]


def _at(curve: Sequence[tuple[float, float]], x: float) -> float | None:
    """The curve linearly interpolated at ``x`` (None past its last point)."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[0][1] if curve and x == curve[0][0] else None


def _tokens_to(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """Generated tokens at the first evaluation whose score reaches ``target``."""
    return next((x for x, y in curve if y >= target - 1e-12), None)


def _ms(xs: Sequence[float], scale: float = 100.0, fmt: str = ".2f") -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "-"
    m = statistics.fmean(xs) * scale
    return f"{m:{fmt}} ± {statistics.stdev(xs) * scale:{fmt}}" if len(xs) > 1 else f"{m:{fmt}}"


def _wall_minutes(d: Path, res: dict) -> float:
    """The run's wall minutes over all its processes: a run cut off, resumed or taken on past a
    raised cap has several, each from its start (train.py's "output dir:" line) to its last line in
    ``train.log`` (work a cut-off process lost included); results.json's ``wall_seconds`` is the
    last process's only, and the answer when there is no log."""
    log = d / "train.log"
    if not log.exists():
        return res.get("wall_seconds", math.nan) / 60
    total, start = 0.0, None
    seen: list[float] = []  # the timestamps since the last process's start
    for line in log.read_text(errors="replace").splitlines():
        try:
            t = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if "[tsd.train][INFO] output dir:" in line[:80]:
            if start is not None:  # the last one ended at its last line before the new one's startup
                total += max([x for x in seen if x < t - 60] or [start]) - start
            start, seen = t, []
        seen.append(t)
    if start is not None:
        total += max(seen) - start
    return total / 60


def _runs(out: Path, arm: str, lr: str | None = None, seeds: Sequence[int] = SEEDS) -> list[tuple[int, Path]]:
    return [
        (s, run_dir(out, arm, s, lr)) for s in seeds if (run_dir(out, arm, s, lr) / "results.json").exists()
    ]


def report(out: Path) -> dict:
    summary: dict = {"arms": {}, "pairs": [], "frontier": [], "rate_checks": []}
    per_arm: dict[str, dict[str, dict[str, float]]] = {}  # arm -> T -> seed-mean per test problem
    per_seed: dict[str, dict[str, list[dict[str, float]]]] = {}  # arm -> T -> per seed, per test problem
    base = {t: _json(out / "eval" / f"base_T{t}" / "results.json") for t in TEMPERATURES}
    if all(base.values()):
        per_arm["base"] = {t: _per_problem(r) for t, r in base.items() if r}
        per_seed["base"] = {t: [v] for t, v in per_arm["base"].items()}
        summary["arms"]["base"] = {"label": "base (bundled policy)", "family": "base",
                                   **{f"T{t}": {"mean@16": [r["mean@16"]], "pass@16": [r["pass@16"]]}
                                      for t, r in base.items() if r}}  # fmt: skip
    for arm, (family, label, _, _) in ARMS.items():
        lr = arm_lr(out, arm)
        runs = _runs(out, arm, lr)
        if not runs:
            continue
        row: dict = {"label": label, "family": family, "lr": lr, "seeds": [s for s, _ in runs],
                     "rate_picked": picked_lr(out, arm) is not None}  # fmt: skip
        res = [json.loads((d / "results.json").read_text()) for _, d in runs]
        curves = [_curve(d) for _, d in runs]
        row["curves"] = [{"seed": s, "points": c} for (s, _), c in zip(runs, curves)]
        row["val_best"] = [max(y for _, y in c) if c else None for c in curves]
        row["tokens_total"] = [r.get("compute/generated_tokens") for r in res]
        row["tokens_to_best"] = [(r.get("best") or {}).get("generated_tokens") for r in res]
        row["tokens_to_90"] = [_tokens_to(c, 0.9 * b) if b is not None else None
                               for c, b in zip(curves, row["val_best"])]  # fmt: skip
        row["stop_reasons"] = [r.get("stop_reason", "?").split(":")[0] for r in res]
        row["train_minutes"] = [_wall_minutes(d, r) for (_, d), r in zip(runs, res)]
        for t in TEMPERATURES:
            found = [_json(out / "eval" / f"{d.name}_T{t}" / "results.json") for _, d in runs]
            evals = [e for e in found if e is not None]
            if evals:
                row[f"T{t}"] = {
                    "mean@16": [e["mean@16"] for e in evals],
                    "pass@16": [e["pass@16"] for e in evals],
                }
                per = [_per_problem(e) for e in evals]
                per_arm.setdefault(arm, {})[t] = {p: statistics.fmean(x[p] for x in per) for p in per[0]}
                per_seed.setdefault(arm, {})[t] = per
        summary["arms"][arm] = row
    # paired differences of the validation-best policies (820 test problems, seed-averaged)
    names = [a for a in ["base", *ARMS] if a in per_arm]
    for t in TEMPERATURES:
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if t in per_arm[a] and t in per_arm[b]:
                    d = paired_by_id(per_arm[a][t], per_arm[b][t])
                    w = with_seed_noise(per_seed[a][t], per_seed[b][t], base_fixed=a == "base")
                    summary["pairs"].append({"T": t, "a": a, "b": b, "diff": d["diff"], "ci95": d["ci95"],
                                             "verdict": _verdict(d, a, b),
                                             "seeds_ci95": w and w["ci95"], "seeds_df": w and w["df"],
                                             "seeds_verdict": w and _verdict(w, a, b)})  # fmt: skip
    summary["frontier"] = frontier(out)
    for arm, lr in RATE_CHECKS:
        at, ref = _runs(out, arm, lr, (0,)), _runs(out, arm, None, (0,))
        if at and ref:
            ra, rr = (json.loads((d / "results.json").read_text()) for _, d in (at[0], ref[0]))
            summary["rate_checks"].append({
                "arm": arm, "lr": lr, "study_lr": ARMS[arm][2], "picked": picked_lr(out, arm),
                "val_best": (ra.get("best") or {}).get("score"), "study_val_best": (rr.get("best") or {}).get("score"),
                "tokens_to_best": (ra.get("best") or {}).get("generated_tokens"),
                "study_tokens_to_best": (rr.get("best") or {}).get("generated_tokens"),
            })  # fmt: skip
            for t in TEMPERATURES:  # the two validation-best policies on test, paired (lower - study rate)
                ea, er = (_json(out / "eval" / f"{d.name}_T{t}" / "results.json") for _, d in (at[0], ref[0]))
                if ea and er:
                    d = paired_by_id(_per_problem(er), _per_problem(ea))
                    summary["rate_checks"][-1][f"T{t}"] = {
                        "mean@16": ea["mean@16"], "study_mean@16": er["mean@16"], "diff": d["diff"],
                        "ci95": d["ci95"], "verdict": _verdict(d, "study rate", "lower rate"),
                    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "plateau.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "plateau.md", markdown(summary))
    plot(summary, out / "plateau.png")
    print(markdown(summary))
    return summary


def _family_at(
    out: Path, family: str, tokens: float
) -> tuple[str, float, dict[str, float], bool, list[dict[str, float]]] | None:
    """The family's best shape at ``tokens`` generated: (arm, seed-mean validation mean@16, its
    seed-mean per-problem scores at the evaluation nearest ``tokens``, whether a seed's figure is
    carried); None if no shape of the family has a figure there.

    A seed the plateau rule stopped before ``tokens`` counts there with its last evaluation: the
    rule stopped it because its curve had gone flat, and leaving the shape out would compare the
    other family against only the shapes still running. A seed that ended before ``tokens`` any
    other way (not yet finished, the cap, a crash) has no figure there, nor has its shape."""
    best = None
    for arm, (fam, *_rest) in ARMS.items():
        if fam != family:
            continue
        runs = _runs(out, arm, arm_lr(out, arm))
        if not runs:
            continue
        journals = [_journal(d) for _, d in runs]
        plateaued = [str((_json(d / "results.json") or {}).get("stop_reason", "")).startswith("plateau")
                     for _, d in runs]  # fmt: skip
        short = [not j or j[-1]["compute/generated_tokens"] < tokens * 0.999 for j in journals]
        if any(s and not (p and j) for s, p, j in zip(short, plateaued, journals)):
            continue  # a seed ended before this budget without reaching its plateau: no figure there
        rows = [j[-1] if s else min(j, key=lambda r: abs(r["compute/generated_tokens"] - tokens))
                for j, s in zip(journals, short)]  # fmt: skip
        if any(
            not s and abs(r["compute/generated_tokens"] - tokens) > 0.1 * tokens for r, s in zip(rows, short)
        ):
            continue  # no evaluation within 10% of these tokens
        score = statistics.fmean(r["val/mean@16"] for r in rows)
        per = [{p: c / r["samples_per_problem"] for p, c in r["per_problem_correct"].items()} for r in rows]
        mean = {p: statistics.fmean(x[p] for x in per) for p in per[0]}
        if best is None or score > best[1]:
            best = (arm, score, mean, any(short), per)
    return best


def frontier(out: Path) -> list[dict]:
    """At every multiple of the evaluation cadence: each family's best shape, and the whole tree's
    best against CISPO's best, paired per validation problem (seed-averaged)."""
    rows = []
    for i in range(1, MAX_TOKENS // EVAL_EVERY_TOKENS + 1):
        tokens = i * EVAL_EVERY_TOKENS
        at = {f: _family_at(out, f, tokens) for f in FAMILIES}
        row: dict = {"tokens": tokens, "best": {f: (v[0], v[1]) for f, v in at.items() if v},
                     "carried": sorted(v[0] for v in at.values() if v and v[3])}  # fmt: skip
        tree, cispo = at.get("tree"), at.get("cispo")
        if tree and cispo:
            d = paired_by_id(cispo[2], tree[2])
            w = with_seed_noise(cispo[4], tree[4])
            row["tree_vs_cispo"] = {"tree": tree[0], "cispo": cispo[0], "diff": d["diff"], "ci95": d["ci95"],
                                    "verdict": _verdict(d, "cispo", "tree"), "seeds_ci95": w and w["ci95"],
                                    "seeds_verdict": w and _verdict(w, "cispo", "tree")}  # fmt: skip
        rows.append(row)
    return rows


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _ktok(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e3:,.0f}k"


def _rate_test(x: dict | None) -> str:
    """A rate check's test cell: the study rate's mean@16 -> the lower rate's, the paired difference."""
    if not x:
        return "-"
    lo, hi = x["ci95"]
    return (f"{_pct(x['study_mean@16'])} -> {_pct(x['mean@16'])}: {100 * x['diff']:+.2f} [{100 * lo:+.2f},"
            f" {100 * hi:+.2f}], {x['verdict']}")  # fmt: skip


SEED_NOISE = (
    "With seed noise: the interval also counts how much another training seed would move each method"
    " (the between-seed variance of each side's mean score, a t interval at Welch-Satterthwaite degrees"
    " of freedom; src/tsd/eval/paired.py `with_seed_noise`); '-' where a trained side has one seed. The"
    " per-problem interval alone says how sure the measurement on these 820 problems is, not how sure"
    " the difference between the methods is."
)


def _interval(ci: Sequence[float] | None) -> str:
    return "-" if not ci else f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def _shape_grid(summary: dict) -> list[str]:
    """Every tree shape against every CISPO shape on test (tree - CISPO, paired): the answer that
    does not lean on validation's pick of each family's best shape."""
    arms = summary["arms"]
    trees = [a for a in arms if arms[a].get("family") == "tree"]
    cispos = [a for a in arms if arms[a].get("family") == "cispo"]
    pairs = {(p["T"], p["a"], p["b"]): p for p in summary["pairs"]}
    cells = {(t, tr, c): pairs.get((t, c, tr)) for t in TEMPERATURES for tr in trees for c in cispos}
    if not any(cells.values()):
        return []
    lines = ["", "Every tree shape against every CISPO shape, test mean@16 (tree - CISPO, points, paired per"
             " problem on seed means, 95% CI; then the interval with seed noise; the seeds in brackets):", "",
             "| T | tree shape | " + " | ".join(f"{arms[c]['label']} ({len(arms[c]['seeds'])})" for c in cispos) + " |",
             "|---|---|" + "---|" * len(cispos)]  # fmt: skip
    for t in TEMPERATURES:
        for tr in trees:
            row = []
            for c in cispos:
                p = cells[(t, tr, c)]
                row.append("-" if p is None else f"{100 * p['diff']:+.2f} [{100 * p['ci95'][0]:+.2f}, "
                           f"{100 * p['ci95'][1]:+.2f}]{'' if p['verdict'] == 'no difference' else ' *'}; "
                           f"seeds {_interval(p.get('seeds_ci95'))}"
                           f"{' *' if p.get('seeds_verdict') not in (None, 'no difference') else ''}")  # fmt: skip
            lines.append(
                f"| {t} | {arms[tr]['label']} ({len(arms[tr]['seeds'])}) | " + " | ".join(row) + " |"
            )
    lines += ["", "(* the interval excludes zero)"]
    return lines


def markdown(summary: dict) -> str:
    lines = [
        "| arm | lr | seeds | validation best | test mean@16, T=1.0 | test mean@16, T=0.2 | pass@16, T=1.0 "
        "| tokens to the best | tokens to 90% of it | tokens trained | stopped by | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    k = lambda xs: _ms([x for x in xs if x is not None], 1e-3, ",.0f") + "k" if any(xs) else "-"  # noqa: E731
    for arm, r in summary["arms"].items():
        t1, t2 = r.get("T1.0", {}), r.get("T0.2", {})
        if arm == "base":
            lines.append(f"| {r['label']} | - | - | - | {_ms(t1.get('mean@16', []))} | {_ms(t2.get('mean@16', []))} "
                         f"| {_ms(t1.get('pass@16', []))} | - | - | - | - | - |")  # fmt: skip
            continue
        stops = ", ".join(sorted(set(r["stop_reasons"]))) or "-"
        mins = [m for m in r["train_minutes"] if math.isfinite(m)]
        wall = f"{statistics.fmean(mins):.0f}" if mins else "-"
        lines.append(f"| {r['label']} | {r['lr']} | {len(r['seeds'])} | {_ms(r['val_best'])} "
                     f"| {_ms(t1.get('mean@16', []))} | {_ms(t2.get('mean@16', []))} | {_ms(t1.get('pass@16', []))} "
                     f"| {k(r['tokens_to_best'])} | {k(r['tokens_to_90'])} | {k(r['tokens_total'])} | {stops} "
                     f"| {wall} |")  # fmt: skip
    lines += [
        "",
        "Cells: percent, mean ± standard deviation over the seeds; validation: the best mean@16 on the 256"
        " validation problems (drawn after the train split) at T=1.0 over the run's evaluations (every"
        f" {EVAL_EVERY_TOKENS // 1000}k generated tokens); test: the validation-best policy on all 820 test"
        " problems, 16 samples each; tokens to the best: generated tokens at the best evaluation; to 90% of"
        " it: at the first evaluation scoring at least 0.9 x the run's best; tokens trained: generated"
        f" tokens when the run stopped (cap {MAX_TOKENS / 1e6:g}M); lr: the tree's and CISPO's shapes at the"
        " rate of the two (3e-4, 1e-4) whose seed-0 run reached the higher validation best (the rate table"
        " below), the study's 150-step pick until both have run; train min: wall minutes of all the run's"
        " processes (a resumed run has several; work lost to a cut-off included), runs sharing the 2 cores.",
        "",
        "Paired differences of the validation-best policies' test mean@16 (seed-averaged per problem, 820"
        " problems, 95% CI):",
        "",
        "| T | b - a | difference (points) | verdict | with seed noise | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for p in summary["pairs"]:
        lo, hi = p["ci95"]
        lines.append(f"| {p['T']} | {p['b']} - {p['a']} | {100 * p['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                     f"| {p['verdict']} | {_interval(p.get('seeds_ci95'))} | {p.get('seeds_verdict') or '-'} |")  # fmt: skip
    lines += ["", SEED_NOISE]
    lines += _shape_grid(summary)
    fr = [r for r in summary["frontier"] if r["best"]]
    if fr:
        fams = [f for f in FAMILIES if any(f in r["best"] for r in fr)]
        lines += [
            "",
            "The frontier: at each budget of generated tokens, each family's best shape on validation"
            " (seed mean, mean@16 %; the shape in brackets; * where a seed the plateau rule stopped earlier"
            " counts with its last evaluation), and the whole tree's best against CISPO's best, paired per"
            " validation problem (256, seed-averaged, 95% CI):",
            "",
            "| generated tokens | "
            + " | ".join(FAMILIES[f] for f in fams)
            + " | tree - CISPO | verdict | with seed noise | verdict |",
            "|---|" + "---|" * len(fams) + "---|---|---|---|",
        ]
        for r in fr:
            cells = [
                f"{100 * r['best'][f][1]:.2f} ({r['best'][f][0]}{'*' if r['best'][f][0] in r.get('carried', ()) else ''})"
                if f in r["best"]
                else "-"
                for f in fams
            ]
            v = r.get("tree_vs_cispo")
            diff = (
                "-"
                if v is None
                else f"{100 * v['diff']:+.2f} [{100 * v['ci95'][0]:+.2f}, {100 * v['ci95'][1]:+.2f}]"
            )
            lines.append(f"| {r['tokens'] / 1e3:,.0f}k | " + " | ".join(cells)
                         + f" | {diff} | {'-' if v is None else v['verdict']} "
                         + f"| {_interval(v and v.get('seeds_ci95'))} | {(v and v.get('seeds_verdict')) or '-'} |")  # fmt: skip
    if summary["rate_checks"]:
        lines += ["", "The rate at plateau (seed 0): validation best and the tokens to it, at the study's rate"
                  " and a lower one, and the two validation-best policies on the 820 test problems (mean@16 at"
                  " the study's rate -> the lower one; the lower one's difference, paired per problem, 95% CI):",
                  "", "| arm | study rate | best | tokens | lower rate | best | tokens | test, T=1.0 | test, T=0.2 "
                  "| seeds 1-2 at |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in summary["rate_checks"]:
            f, t, test = _pct, _ktok, _rate_test
            lines.append(f"| {c['arm']} | {c['study_lr']} | {f(c['study_val_best'])} | {t(c['study_tokens_to_best'])} "
                         f"| {c['lr']} | {f(c['val_best'])} | {t(c['tokens_to_best'])} | {test(c.get('T1.0'))} "
                         f"| {test(c.get('T0.2'))} | {c.get('picked') or '-'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def family_best(summary: dict) -> dict[str, str]:
    """Each family's shape with the highest seed-mean validation best (never chosen on test)."""
    best: dict[str, str] = {}
    for arm, r in summary["arms"].items():
        if arm == "base" or not [v for v in r["val_best"] if v is not None]:
            continue
        score = statistics.fmean(v for v in r["val_best"] if v is not None)
        cur = best.get(r["family"])
        if cur is None or score > statistics.fmean(
            v for v in summary["arms"][cur]["val_best"] if v is not None
        ):
            best[r["family"]] = arm
    return best


def readme_table(summary: dict) -> str:
    """The README's table: each family's best shape at its plateau beside the article's plateau,
    and its paired difference from CISPO's best shape on the 820 test problems."""
    best = family_best(summary)
    pairs = {(p["T"], p["a"], p["b"]): p for p in summary["pairs"]}
    cispo = best.get("cispo")

    def vs_cispo(arm: str, t: str) -> str:
        if cispo is None or arm == cispo:
            return "-"
        p = pairs.get((t, arm, cispo)) or pairs.get((t, cispo, arm))
        if p is None:
            return "-"
        sign = 1 if p["b"] == arm else -1
        lo, hi = sorted((sign * p["ci95"][0], sign * p["ci95"][1]))
        text = f"{100 * sign * p['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
        seeds = p.get("seeds_ci95")
        if seeds:  # the verdict counts the seeds' noise where it can be estimated
            lo, hi = sorted((sign * seeds[0], sign * seeds[1]))
            text += f"; seeds [{100 * lo:+.2f}, {100 * hi:+.2f}]"
        verdict = "level" if lo <= 0 <= hi else ("ahead" if lo > 0 else "behind")
        return f"{text}: {verdict}" + ("" if seeds else " (one seed: seed noise not counted)")

    lines = [
        "| method (its best shape on validation) | lr | seeds | test mean@16, T=1.0 | T=0.2 | tokens to the best "
        "| vs CISPO's best, T=1.0 (paired; with seed noise) | T=0.2 | the article's plateau (1.5B) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if "base" in summary["arms"]:
        r = summary["arms"]["base"]
        lines.append(f"| {r['label']} | - | - | {_ms(r['T1.0']['mean@16'])} | {_ms(r['T0.2']['mean@16'])} | - "
                     f"| {vs_cispo('base', '1.0')} | {vs_cispo('base', '0.2')} | {ARTICLE['base']} |")  # fmt: skip
    for fam in FAMILIES:
        arm = best.get(fam)
        if arm is None:
            continue
        r = summary["arms"][arm]
        tok = [x for x in r["tokens_to_best"] if x is not None]
        art = ARTICLE.get(fam, "- (not in the article)")
        lines.append(f"| {r['label']} | {r['lr']} | {len(r['seeds'])} | {_ms(r.get('T1.0', {}).get('mean@16', []))} "
                     f"| {_ms(r.get('T0.2', {}).get('mean@16', []))} "
                     f"| {_ms(tok, 1e-6, '.2f') + 'M' if tok else '-'} | {vs_cispo(arm, '1.0')} "
                     f"| {vs_cispo(arm, '0.2')} | {art} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Left: validation mean@16 against generated tokens, seed mean and band (min..max), per arm.
    Right: the frontier, each family's best shape at each budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, fx) = plt.subplots(1, 2, figsize=(15, 5))
    grid = [i * EVAL_EVERY_TOKENS for i in range(0, MAX_TOKENS // EVAL_EVERY_TOKENS + 1)]
    colors: dict[str, str] = {}
    for arm, r in summary["arms"].items():
        curves = [c["points"] for c in r.get("curves", []) if c["points"]]
        if not curves:
            continue
        xs, mean, lo, hi = [], [], [], []
        for x in grid:
            at = [_at(c, x) for c in curves]
            ys = [y for y in at if y is not None]
            if len(ys) < len(at):
                break
            xs.append(x / 1e6)
            mean.append(100 * statistics.fmean(ys))
            lo.append(100 * min(ys))
            hi.append(100 * max(ys))
        dashed = r["family"] == "cispo" and arm != "cispo16" or arm == "tree42"
        (line,) = ax.plot(xs, mean, "--" if dashed else "-", marker="o", ms=3,
                          label=f"{r['label']} (lr {r['lr']}, {len(curves)} seed{'s' * (len(curves) != 1)})")  # fmt: skip
        colors[arm] = line.get_color()
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("generated tokens (millions)")
    ax.set_ylabel("validation mean@16 (%, 256 problems, T=1)")
    ax.set_title("training to a plateau: seed mean, band = min..max over seeds", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fr = [r for r in summary["frontier"] if r["best"]]
    for fam, name in FAMILIES.items():
        pts = [
            (
                r["tokens"] / 1e6,
                100 * r["best"][fam][1],
                r["best"][fam][0] + "*" * (r["best"][fam][0] in r.get("carried", ())),
            )
            for r in fr
            if fam in r["best"]
        ]
        if not pts:
            continue
        (line,) = fx.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for x, y, arm in pts:
            fx.annotate(
                arm, (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points", color=line.get_color()
            )
    fx.set_xlabel("generated tokens (millions)")
    fx.set_ylabel("validation mean@16 of the family's best shape (%)")
    fx.set_title(
        "the frontier: each family's best shape at equal generated tokens (* a seed held at its plateau)",
        fontsize=10,
    )
    fx.grid(True, alpha=0.3)
    if fx.get_legend_handles_labels()[0]:
        fx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
