"""The laptop study: six methods, one learning-rate grid, three seeds, matched compute, the
article's evaluation (mean@16 and pass@16 on all 820 test problems at temperature 1.0 and 0.2).
The command line is ``scripts/study.py``; the logic lives here, where ``tests/test_study.py``
imports it.

    python scripts/study.py plan                  # the runs and their commands, nothing run
    python scripts/study.py run --parallel 2      # run what is missing (resumable: finished runs are kept)
    python scripts/study.py report                # table, paired intervals, curves -> OUT/study.md, .json, .png
    python scripts/study.py report --doc docs/study.md  # ... and the results block of docs/study.md
    python scripts/study.py all --parallel 2      # run, then report

Design (docs/study.md, "The 150-step study", says why):

- methods: ``base`` (the bundled policy, untrained), ``cispo`` (group sampling, group-normalised
  advantages, no value loss), ``bon`` (best-of-16, value baseline), ``mcts_article`` (the article's
  search at laptop size: value-head leaves, fixed K=4, max-visit path, 4 workers x 6 waves),
  ``mcts`` (the search chosen by ``scripts/search_efficiency.py``: configs/rollout/mcts.yaml, one
  path per problem) and ``tree`` (the same search, the whole tree distilled:
  ``experiment=tree_countdown``, every graded answer's path with step advantages from the tree).
- one batch rule for all: every optimiser step trains on what the rollouts of 8 problems gave,
  each problem costing about 16 samples' worth of generated tokens (best-of-16; MCTS 4x4 or 4x6;
  a group of 16), so equal steps are about equal generated tokens; weights synced every step
  (on-policy, lag 0), 150 steps, the same KL, clip and value-loss settings. (The tree arm trains
  one whole rollout per step: its number of paths varies with the trees.)
- one learning-rate grid for all (3e-5, 1e-4, 3e-4), seed 0, chosen on a validation slice: 256
  problems the generator draws after the 20,000 train problems (``env.n_val``), disjoint from train
  and test and never seen by the bundled policy (which was trained on the whole train split);
  mean@16 at temperature 1 on that slice picks each method's rate. Then seeds 1 and 2 at that rate.
- evaluation: ``eval.py`` on all 820 test problems, 16 samples each, at temperature 1.0 and 0.2
  (the article's public code evaluates at 0.2), paired per-problem differences (95% CI) against the
  base and between methods on the seed-averaged scores, and the spread over seeds; beside them the
  tokens each run generated, prefilled and trained, and curves against generated tokens and wall time.

The scaling sweep (``python train.py -m hparams_search=mcts_scaling``: workers x iterations of the
tree arm) is reported by :mod:`tsd.eval.sweep` (``scripts/study.py sweep MULTIRUN_DIR``): every job
evaluated on the validation slice and the test set, heatmaps of mean@16 and of generated tokens,
and each cell against CISPO at the same generated tokens (CISPO's own curve, run long enough).

Every run is an ordinary ``train.py`` / ``eval.py`` command (printed by ``plan``) writing into
``OUT``; ``run`` skips a run whose ``results.json`` exists. Wall times are of runs sharing the
machine with ``--parallel - 1`` others (and whatever else ran): the report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from tsd.eval.search_efficiency import ARTICLE_SEARCH
from tsd.fileio import write_text_atomic

ROOT = Path(__file__).resolve().parents[3]  # the repository (train.py, eval.py)
SCRIPT = ROOT / "scripts" / "study.py"
LRS = ("3e-5", "1e-4", "3e-4")
SEEDS = (0, 1, 2)
STEPS = 150
VAL_PROBLEMS = 256  # env.val: drawn after the 20,000 train problems
TEMPERATURES = ("1.0", "0.2")
#: the tree arm's advantage rule (rollout/emission/advantage), chosen by the pilot in docs/study.md ("The tree arm: which advantage rule")
TREE_RULE = "treerl"

COMMON = [
    f"trainer.max_steps={STEPS}",
    "generation.problems_per_rollout=8",
    "data.sync_every=1",
    "data.max_lag=0",
    "callbacks.eval.every_n_steps=50",
    "callbacks.eval.num_problems=128",
    "callbacks.eval.draw_tree=false",
]
#: method -> overrides (on top of COMMON); batch_size = 8 problems' selected trajectories
METHODS: dict[str, list[str]] = {
    "cispo": ["experiment=cispo_countdown", "rollout.group_size=16", "data.batch_size=128"],
    "bon": ["experiment=bon_countdown", "rollout.n=16", "data.batch_size=8"],
    "mcts_article": [
        "experiment=mcts_countdown",
        "data.batch_size=8",
        "rollout.workers=4",
        "rollout.iterations=6",
        *ARTICLE_SEARCH,
    ],
    # the tuned search at the others' budget (4 x 4: best-of-16's tokens), not the default's 4 x 8
    "mcts": ["experiment=mcts_countdown", "data.batch_size=8", "rollout.workers=4", "rollout.iterations=4"],
    # the same search, the whole tree distilled: one rollout of 8 problems per step
    "tree": [
        "experiment=tree_countdown",
        "data.batch_size=1",
        "rollout.workers=4",
        "rollout.iterations=4",
        f"rollout/emission/advantage={TREE_RULE}",
    ],  # fmt: skip
}
LABELS = {
    "base": "base (bundled policy)",
    "cispo": "CISPO (group 16)",
    "bon": "best-of-16",
    "mcts_article": "MCTS, the article's search",
    "mcts": "MCTS, the tuned search",
    "tree": f"MCTS, the whole tree ({TREE_RULE})",
}


@dataclass
class Job:
    """One command of the study; done when ``done_file`` exists (and ``accept`` holds of it)."""

    name: str
    argv: list[str]
    done_file: Path
    after: list[str] = field(default_factory=list)
    #: a test the done file must also pass: e.g. a run's results written under a token cap the
    #: study has since raised, or an evaluation older than the policy it evaluated, are to be redone
    accept: Callable[[Path], bool] | None = None

    def command(self) -> str:
        return " ".join(shlex.quote(a) for a in self.argv)

    def done(self) -> bool:
        return self.done_file.exists() and (self.accept is None or self.accept(self.done_file))


def train_dir(out: Path, method: str, lr: str, seed: int) -> Path:
    return out / "runs" / f"{method}_lr{lr}_s{seed}"


def train_job(out: Path, method: str, lr: str, seed: int) -> Job:
    d = train_dir(out, method, lr, seed)
    argv = [sys.executable, str(ROOT / "train.py"), *METHODS[method], *COMMON,
            f"module.optimizer.lr={lr}", f"seed={seed}", f"hydra.run.dir={d}"]  # fmt: skip
    return Job(f"train {method} lr={lr} seed={seed}", argv, d / "results.json")


def val_job(out: Path, method: str, lr: str) -> Job:
    d = train_dir(out, method, lr, 0)
    return Job(
        f"validate {method} lr={lr}",
        [sys.executable, str(SCRIPT), "_validate", str(d / "policy"), str(d / "val.json")],
        d / "val.json",
        after=[f"train {method} lr={lr} seed=0"],
    )


def eval_job(out: Path, name: str, policy: str, temperature: str) -> Job:
    d = out / "eval" / f"{name}_T{temperature}"
    argv = [sys.executable, str(ROOT / "eval.py"), f"model.name_or_path={policy}",
            f"sampler.temperature={temperature}", "eval.k=16", f"hydra.run.dir={d}"]  # fmt: skip
    return Job(f"eval {name} T={temperature}", argv, d / "results.json")


def best_lr(out: Path, method: str) -> str | None:
    """The grid's rate with the highest validation mean@16 (None until every one is validated)."""
    scores = {}
    for lr in LRS:
        f = train_dir(out, method, lr, 0) / "val.json"
        if not f.exists():
            return None
        scores[lr] = json.loads(f.read_text())["mean@16"]
    return max(LRS, key=lambda lr: (scores[lr], -LRS.index(lr)))


def plan(out: Path) -> list[Job]:
    """Every job whose inputs are known now (the seed runs need the grid's choice first)."""
    jobs = [eval_job(out, "base", "tiny", t) for t in TEMPERATURES]
    base_val = out / "eval" / "base_val.json"
    jobs.append(
        Job("validate base", [sys.executable, str(SCRIPT), "_validate", "tiny", str(base_val)], base_val)
    )
    # the grid rate by rate, every method at the middle rate first: a study cut short still
    # compares all methods at one rate
    for lr in sorted(LRS, key=lambda x: abs(LRS.index(x) - len(LRS) // 2)):
        for m in METHODS:
            jobs += [train_job(out, m, lr, 0), val_job(out, m, lr)]
    # then seed by seed, every method at its chosen rate (a study cut short has as many seeds of
    # each); an evaluation waits for its training run
    for s in SEEDS:
        for m in METHODS:
            chosen = best_lr(out, m)
            if chosen is None:
                continue
            if s:
                jobs.append(train_job(out, m, chosen, s))
            for t in TEMPERATURES:
                ev = eval_job(out, f"{m}_s{s}", str(train_dir(out, m, chosen, s) / "policy"), t)
                jobs.append(replace(ev, after=[f"train {m} lr={chosen} seed={s}"]))
    return jobs


def run_jobs(out: Path, parallel: int, planner: Callable[[], list[Job]] | None = None) -> None:
    """Run every missing job, ``parallel`` at a time, re-planning as the grid's choices appear
    (``planner``: :func:`plan` of ``out`` unless given). Runs still going from an earlier, stopped
    ``study.py run`` take their places in the ``parallel`` and are waited for, not started twice."""
    planner = planner or (lambda: plan(out))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    started: set[str] = set()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def run(job: Job) -> tuple[Job, int, float]:
        t0 = time.time()
        with open(logs / (job.name.replace(" ", "_").replace("=", "") + ".log"), "w") as log:
            log.write(job.command() + "\n\n")
            log.flush()
            rc = subprocess.call(job.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        return job, rc, time.time() - t0

    with ThreadPoolExecutor(parallel) as pool:
        running: dict[str, Future] = {}
        while True:
            jobs = planner()  # once a round: the grid's choices may have appeared
            finished = {j.name for j in jobs if j.done()}
            todo = [j for j in jobs if j.name not in started and j.name not in finished]
            elsewhere = [j for j in todo if _live_elsewhere(j)]
            ready = [j for j in todo if j not in elsewhere and all(a in finished for a in j.after)]
            while ready and len(running) + len(elsewhere) < parallel:
                j = ready.pop(0)
                started.add(j.name)
                running[j.name] = pool.submit(run, j)
                print(f"[{time.strftime('%H:%M:%S')}] start  {j.name}", flush=True)
            if not running and not elsewhere:
                break
            # an earlier runner's jobs hold places too: look again every POLL_SECONDS while they do
            for future in _wait_any(running.values(), timeout=POLL_SECONDS if elsewhere else None):
                job, rc, dt = future.result()
                del running[job.name]
                status = "ok" if rc == 0 and job.done() else f"FAILED (exit {rc}; see {logs})"
                print(
                    f"[{time.strftime('%H:%M:%S')}] {status:<6} {job.name} in {dt / 60:.1f} min", flush=True
                )
                if status != "ok":
                    raise SystemExit(f"study: {job.name} failed; rerun 'study.py run' after fixing it")


#: how often the runner looks whether an earlier runner's jobs have ended
POLL_SECONDS = 30.0


def _live_elsewhere(job: Job) -> bool:
    """A run directory whose log was written in the last 2 minutes belongs to a run still going
    (an earlier ``study.py run`` that was stopped leaves its running jobs alive): not started twice."""
    log = job.done_file.parent / "train.log"
    return log.exists() and time.time() - log.stat().st_mtime < 120


def _wait_any(futures, timeout: float | None = None):
    """The futures done once the first is (or ``timeout`` seconds have passed; then maybe none)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    futures = list(futures)
    if not futures:
        time.sleep(timeout or 0)
        return set()
    done, _ = wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
    return done


def validate(policy: str, dest: str) -> None:
    """mean@16 at temperature 1 on the validation slice (``env.val``: 256 problems drawn after the
    train split), written to ``dest``."""
    import torch

    from tsd.envs.countdown import CountdownEnv
    from tsd.eval.runner import evaluate_mean_at_k
    from tsd.models.loading import load_policy
    from tsd.samplers.hf import HFSampler

    torch.set_num_threads(1)
    model, tok = load_policy(policy)
    env = CountdownEnv(n_val=VAL_PROBLEMS)
    sampler = HFSampler(model.eval(), tok, temperature=1.0, seed=0)
    res = evaluate_mean_at_k(sampler, env, env.val, k=16, max_new_tokens=128)
    res["problems"] = f"val[:{VAL_PROBLEMS}] (drawn after the train split)"
    write_text_atomic(dest, json.dumps(res, indent=1))


# ---------------------------------------------------------------------------------------------- report
def _eval(out: Path, name: str, t: str) -> dict | None:
    f = out / "eval" / f"{name}_T{t}" / "results.json"
    return json.loads(f.read_text()) if f.exists() else None


def _per_problem(res: dict) -> dict[str, float]:
    k = res["samples_per_problem"]
    return {p: c / k for p, c in res["per_problem_correct"].items()}


def _seed_mean(per: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = sorted(set.intersection(*(set(p) for p in per)))
    return {k: statistics.fmean(p[k] for p in per) for k in keys}


def _curves(out: Path, method: str, lr: str) -> list[dict]:
    """Per seed: the in-training eval mean@16 (128 test problems) against generated tokens, wall
    time and trained tokens (points ``(generated, wall s, mean@16, trained)``)."""
    from tsd.viz.runs import GENERATED, TRAINED, read_run

    curves = []
    for s in SEEDS:
        d = train_dir(out, method, lr, s)
        if not (d / "csv" / "metrics.csv").exists() and not (d / "results.json").exists():
            continue
        run = read_run(d)
        pts = [(r.get(GENERATED, 0.0), r.get("perf/elapsed_s"), r["eval/mean@16"], r.get(TRAINED, 0.0))
               for r in run.evals if "eval/mean@16" in r]  # fmt: skip
        curves.append({"seed": s, "points": pts})
    return curves


#: the compute a finished run reports (results.json), per run
TOKEN_KEYS = {"generated": "compute/generated_tokens", "prefill": "compute/prefill_tokens",
              "trained": "compute/trained_tokens"}  # fmt: skip


def report(out: Path) -> dict:
    from tsd.eval.paired import paired_difference

    summary: dict = {"methods": {}, "pairs": [], "note": ""}
    per_method: dict[str, dict[str, dict[str, float]]] = {}  # method -> T -> seed-mean per problem
    val_per: dict[str, dict[str, dict[str, float]]] = {}  # method -> lr -> per problem (validation, seed 0)
    for m in ["base", *METHODS]:
        lr = None if m == "base" else best_lr(out, m)
        names = ["base"] if m == "base" else [f"{m}_s{s}" for s in SEEDS]
        row: dict = {"label": LABELS[m], "lr": lr}
        vals = {"-": _val(out / "eval" / "base_val.json")} if m == "base" else {
            x: _val(train_dir(out, m, x, 0) / "val.json") for x in LRS
        }  # fmt: skip
        row["val"] = {x: v["mean@16"] for x, v in vals.items() if v is not None}
        val_per[m] = {x: _per_problem(v) for x, v in vals.items() if v is not None}
        for t in TEMPERATURES:
            res = [r for r in (_eval(out, n, t) for n in names) if r is not None]
            if not res:
                continue
            row[f"T{t}"] = {
                "seeds": len(res),
                "mean@16": [r["mean@16"] for r in res],
                "pass@16": [r["pass@16"] for r in res],
            }
            per_method.setdefault(m, {})[t] = _seed_mean([_per_problem(r) for r in res])
        if lr is not None:
            runs = [train_dir(out, m, lr, s) / "results.json" for s in SEEDS]
            done = [json.loads(f.read_text()) for f in runs if f.exists()]
            row["train_minutes"] = [d.get("wall_seconds", float("nan")) / 60 for d in done]
            row["tokens"] = {
                k: [float(d.get(key, float("nan"))) for d in done] for k, key in TOKEN_KEYS.items()
            }
            row["curves"] = _curves(out, m, lr)
        summary["methods"][m] = row
    order = [m for m in ["base", *METHODS] if m in per_method]
    for t in TEMPERATURES:
        for i, a in enumerate(order):
            for b in order[i + 1 :]:
                if t in per_method[a] and t in per_method[b]:
                    pa, pb = per_method[a][t], per_method[b][t]
                    common = sorted(set(pa) & set(pb))
                    d = paired_difference([pa[k] for k in common], [pb[k] for k in common])
                    lo, hi = d["ci95"]
                    verdict = "no difference" if lo <= 0 <= hi else (f"{b} > {a}" if lo > 0 else f"{a} > {b}")
                    summary["pairs"].append({"T": t, "a": a, "b": b, "diff": d["diff"], "ci95": d["ci95"],
                                             "verdict": verdict,
                                             "token_ratio": _token_ratio(summary["methods"], b, a)})  # fmt: skip
    # the grid on the validation slice (seed 0), paired per problem: every run against the base, and
    # the methods against each other at each rate. This is what a study cut short still shows.
    summary["val_pairs"] = []
    base_val = val_per.get("base", {}).get("-")
    methods = [m for m in METHODS if m in val_per]
    for lr in LRS:
        at = [(m, val_per[m][lr]) for m in methods if lr in val_per[m]]
        pairs = [(("base", base_val), x) for x in at] if base_val else []
        pairs += [(at[i], at[j]) for i in range(len(at)) for j in range(i + 1, len(at))]
        for (a, pa), (b, pb) in pairs:
            common = sorted(set(pa) & set(pb))
            d = paired_difference([pa[k] for k in common], [pb[k] for k in common])
            lo, hi = d["ci95"]
            verdict = "no difference" if lo <= 0 <= hi else (f"{b} > {a}" if lo > 0 else f"{a} > {b}")
            summary["val_pairs"].append({"lr": lr, "a": a, "b": b, "diff": d["diff"], "ci95": d["ci95"],
                                         "verdict": verdict, "problems": d["problems"]})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "study.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "study.md", markdown(summary))
    plot(summary, out / "study.png")
    print(markdown(summary))
    return summary


def _token_ratio(methods: dict, b: str, a: str) -> float | None:
    """Generated tokens of ``b``'s runs over ``a``'s (seed means); None for the base (no training)."""
    try:
        gb = statistics.fmean(methods[b]["tokens"]["generated"])
        ga = statistics.fmean(methods[a]["tokens"]["generated"])
    except (KeyError, statistics.StatisticsError):
        return None
    return gb / ga if ga > 0 else None


def _val(f: Path) -> dict | None:
    return json.loads(f.read_text()) if f.exists() else None


def _mean_or_none(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.fmean(xs) if xs else None


def _ms(xs: Sequence[float]) -> str:
    if not xs:
        return "-"
    m = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * sd:.2f}" if len(xs) > 1 else f"{100 * m:.2f}"


def markdown(summary: dict) -> str:
    lines = [
        "| method | lr (validation mean@16 at 3e-5 / 1e-4 / 3e-4) | mean@16, T=1.0 | pass@16, T=1.0 "
        "| mean@16, T=0.2 | pass@16, T=0.2 | seeds | generated tokens | trained / generated "
        "| prefill tokens | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _m, r in summary["methods"].items():
        if _m == "base":  # one validation figure
            lr = f"- ({100 * r['val']['-']:.2f})" if "-" in r["val"] else "-"
        else:
            val = " / ".join(f"{100 * r['val'][x]:.2f}" if x in r["val"] else "-" for x in LRS)
            lr = f"{r['lr'] or 'not chosen yet'} ({val})"
        cells = []
        for t in TEMPERATURES:
            e = r.get(f"T{t}", {})
            cells += [_ms(e.get("mean@16", [])), _ms(e.get("pass@16", []))]
        mins = r.get("train_minutes") or []
        wall = f"{statistics.fmean(mins):.1f}" if mins and all(math.isfinite(x) for x in mins) else "-"
        seeds = max((r.get(f"T{t}", {}).get("seeds", 0) for t in TEMPERATURES), default=0)
        tok = r.get("tokens") or {}
        gen, trained, prefill = (_mean_or_none(tok.get(k, [])) for k in ("generated", "trained", "prefill"))
        compute = [
            f"{gen / 1e3:,.0f}k" if gen else "-",
            f"{trained / gen:.2f}" if gen and trained is not None else "-",
            f"{prefill / 1e3:,.0f}k" if prefill is not None else "-",
        ]
        lines.append(f"| {r['label']} | {lr} | " + " | ".join(cells) + f" | {seeds} | " + " | ".join(compute)
                     + f" | {wall} |")  # fmt: skip
    lines += [
        "",
        "Cells: percent, mean ± standard deviation over the seeds evaluated (`seeds`); validation:"
        f" mean@16 on the {VAL_PROBLEMS} validation problems (drawn after the train split) at T=1.0, seed 0;"
        " tokens: mean per run (generated = sampled; trained = completion tokens in the batches, a"
        " shared tree step once per path through it; prefill = prompt and path tokens run to start"
        " sampling); `train min`: mean wall minutes of a run, every run sharing the 2 cores with others.",
    ]
    lines += ["", "Paired differences of mean@16 (seed-averaged per problem, 820 problems, 95% CI):", ""]
    lines += [
        "| T | b - a | difference (points) | verdict | generated tokens b / a |",
        "|---|---|---|---|---|",
    ]
    for p in summary["pairs"]:
        lo, hi = p["ci95"]
        ratio = p.get("token_ratio")
        lines.append(f"| {p['T']} | {p['b']} - {p['a']} | {100 * p['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                     f"| {p['verdict']} | {'-' if ratio is None else f'{ratio:.2f}'} |")  # fmt: skip
    if summary.get("val_pairs"):
        n = summary["val_pairs"][0]["problems"]
        lines += [
            "",
            f"The grid on the validation slice (seed 0, {n} problems, mean@16 at T=1.0, paired 95% CI):",
            "",
        ]
        lines += ["| lr | b - a | difference (points) | verdict |", "|---|---|---|---|"]
        for p in summary["val_pairs"]:
            lo, hi = p["ci95"]
            lines.append(f"| {p['lr']} | {p['b']} - {p['a']} | {100 * p['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                         f"| {p['verdict']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for m, r in summary["methods"].items():
        curves = [c["points"] for c in r.get("curves", []) if c["points"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        for ax, idx in zip(axes, (0, 1, 3)):  # x: generated tokens, wall seconds, trained tokens
            xs = [statistics.fmean(c[i][idx] or 0.0 for c in curves) for i in range(n)]
            ys = [[c[i][2] for c in curves] for i in range(n)]
            mean = [statistics.fmean(y) for y in ys]
            (line,) = ax.plot(xs, mean, marker="o", label=f"{LABELS[m]} (lr {r['lr']}, {len(curves)} seeds)")
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.2)
    axes[0].set_xlabel("generated tokens")
    axes[1].set_xlabel("wall time (s; runs shared the 2 cores)")
    axes[2].set_xlabel("trained tokens")
    for ax in axes:
        ax.set_ylabel("eval mean@16 (first 128 test problems, T=1)")
        ax.grid(True, alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # no curves before a rate is chosen
        axes[0].legend(fontsize=7)
    fig.suptitle("laptop study: seed mean, band = min..max over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("plan", "run", "report", "all", "sweep", "plateau", "_validate"))
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "study")
    ap.add_argument("--parallel", type=int, default=2, help="jobs at a time (they share the cores)")
    ap.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="report: regenerate the report's block of this page (docs/study.md)",
    )
    ap.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="plateau report: regenerate the short plateau table of this page (README.md)",
    )
    a = ap.parse_args(argv)
    if a.what == "_validate":
        validate(*a.args)
        return 0
    if a.parallel < 1:
        ap.error("--parallel must be >= 1")
    out = a.out.resolve()
    if a.what == "sweep":  # sweep MULTIRUN_DIR: evaluate its cells and CISPO at their tokens, then report
        if len(a.args) != 1:
            ap.error("sweep: give the multirun directory (multirun/<task>/<time>)")
        from tsd.eval.sweep import sweep_plan, sweep_report

        sweep = Path(a.args[0]).resolve()
        run_jobs(out, a.parallel, lambda: sweep_plan(sweep, out))
        sweep_report(sweep, out)
        return 0
    if a.what == "plateau":  # plateau plan|run|report|all: src/tsd/eval/plateau.py
        from tsd.eval import plateau

        action = a.args[0] if a.args else "all"
        if action not in ("plan", "run", "report", "all"):
            ap.error("plateau: plan | run | report | all")
        pout = out / "plateau" if a.out == ROOT / "outputs" / "study" else out
        if action == "plan":
            for j in plateau.plan(pout):
                print(f"{'done' if j.done() else 'todo'}  {j.name}\n      {j.command()}")
            return 0
        if action in ("run", "all"):
            run_jobs(pout, a.parallel, lambda: plateau.plan(pout))
        if action in ("report", "all"):
            summary = plateau.report(pout)
            if a.doc is not None:
                write_doc_block(a.doc, plateau.markdown(summary), plateau.BEGIN, plateau.END)
            if a.readme is not None:
                table = plateau.readme_table(summary)
                write_doc_block(a.readme, table, plateau.README_BEGIN, plateau.README_END)
        return 0
    if a.what == "plan":
        for j in plan(out):
            print(f"{'done' if j.done() else 'todo'}  {j.name}\n      {j.command()}")
        print("(the seed runs and their evaluations appear once the grid's validation picked a rate)")
        return 0
    if a.what in ("run", "all"):
        run_jobs(out, a.parallel)
    if a.what in ("report", "all"):
        summary = report(out)
        if a.doc is not None:
            write_doc_block(a.doc, markdown(summary))
    return 0


BEGIN, END = "<!-- study.py report: begin -->", "<!-- study.py report: end -->"


def write_doc_block(page: Path, table: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace what stands between the two markers in ``page`` with the report's tables."""
    text = page.read_text()
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"study: {page} has no '{begin}' ... '{end}' block to regenerate")
    write_text_atomic(page, text[: i + len(begin)] + "\n" + table + text[j:])
    print(f"study: regenerated the results block of {page}")


if __name__ == "__main__":
    sys.exit(main())
