"""The plateau study's report (src/tsd/eval/plateau.py) on hand-written run directories: pairing by
problem id (never by list order), tokens to the best and to 90% of it, the frontier's choice of each
family's best shape at a budget (the refusal of evaluations over different problems:
test_sweep.py's test of ``paired_by_id``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tsd.eval import plateau

K = 16


def _eval(path: Path, correct: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(correct)
    ids = list(correct)
    random.Random(len(str(path))).shuffle(ids)  # the file's order is not the problems' order
    path.write_text(json.dumps({
        "mean@16": sum(correct.values()) / (n * K), "pass@16": sum(c > 0 for c in correct.values()) / n,
        "samples_per_problem": K, "per_problem_correct": {i: correct[i] for i in ids},
    }))  # fmt: skip


def _run(
    out: Path, arm: str, seed: int, curve: list[tuple[int, dict[str, int]]], stop: str = "plateau: x"
) -> None:
    """A finished run: its validation journal (tokens, per-problem correct counts) and results.json."""
    d = plateau.run_dir(out, arm, seed)
    d.mkdir(parents=True)
    rows = []
    for step, (tokens, correct) in enumerate(curve):
        score = sum(correct.values()) / (len(correct) * K)
        rows.append({"step": step * 10, "compute/generated_tokens": tokens, "val/mean@16": score,
                     "per_problem_correct": correct, "samples_per_problem": K})  # fmt: skip
    (d / "val_evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = max(rows[1:], key=lambda r: r["val/mean@16"])
    (d / "results.json").write_text(json.dumps({
        "compute/generated_tokens": rows[-1]["compute/generated_tokens"], "stop_reason": stop, "wall_seconds": 60,
        "best": {"score": best["val/mean@16"], "step": best["step"],
                 "generated_tokens": best["compute/generated_tokens"]},
    }))  # fmt: skip


VAL = [f"v{i}" for i in range(8)]
TEST = [f"t{i}" for i in range(10)]


def _scores(values: list[int], ids: list[str]) -> dict[str, int]:
    return dict(zip(ids, values))


def test_the_report_pairs_by_problem_and_reads_tokens_off_the_curves(tmp_path):
    out = tmp_path / "plateau"
    e = plateau.EVAL_EVERY_TOKENS
    base_val = _scores([1, 0, 2, 0, 1, 0, 0, 1], VAL)
    # cispo16: rises to its best (2 per problem more on v0..v3) at 2e, then falls back
    up = _scores([3, 2, 4, 2, 1, 0, 0, 1], VAL)
    for s in plateau.SEEDS:
        _run(out, "cispo16", s, [(0, base_val), (e, base_val), (2 * e, up), (3 * e, base_val)])
    # tree44: one better problem at e already, its best (v4..v7 up by 3) at 3e
    tree_best = _scores([1, 0, 2, 0, 4, 3, 3, 4], VAL)
    for s in plateau.SEEDS:
        _run(out, "tree44", s, [(0, base_val), (e, _scores([2, 0, 2, 0, 1, 0, 0, 1], VAL)), (2 * e, base_val),
                                (3 * e, tree_best)])  # fmt: skip
    # test evaluations of the best policies: per-problem scores that differ, files in shuffled order
    base_t = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    _eval(out / "eval" / "base_T1.0" / "results.json", _scores(base_t, TEST))
    _eval(out / "eval" / "base_T0.2" / "results.json", _scores(base_t, TEST))
    # cispo8: never above the base on validation, far above everyone on test: the README's table
    # picks a family's shape on validation, never on test
    for s in plateau.SEEDS:
        _run(out, "cispo8", s, [(0, base_val), (e, base_val), (2 * e, base_val)])
    # the tree's seeds differ (1, 0 and 2 more per problem: 1 on average), CISPO's are alike
    for arm, plus in (("cispo16", [2, 0] * 5), ("tree44", [1] * 10), ("cispo8", [5] * 10)):
        for s in plateau.SEEDS:
            for t in plateau.TEMPERATURES:
                name = plateau.run_dir(out, arm, s).name
                shift = (0, -1, 1)[s] if arm == "tree44" else 0
                _eval(out / "eval" / f"{name}_T{t}" / "results.json",
                      _scores([b + p + shift for b, p in zip(base_t, plus)], TEST))  # fmt: skip
    summary = plateau.report(out)

    cispo = summary["arms"]["cispo16"]
    assert cispo["tokens_to_best"] == [2 * e] * 3
    best = (sum(up.values())) / (8 * K)
    assert cispo["val_best"] == [pytest.approx(best)] * 3
    # 90% of the best: the base (5/128) is below 0.9 x 15/128, so the first evaluation at or above is 2e
    assert cispo["tokens_to_90"] == [2 * e] * 3
    tree = summary["arms"]["tree44"]
    assert tree["tokens_to_best"] == [3 * e] * 3 and tree["stop_reasons"] == ["plateau"] * 3
    pairs = {(p["T"], p["a"], p["b"]): p for p in summary["pairs"]}
    # cispo gains 2 on every other problem (+1/16 on average), the tree 1 on every problem: paired by
    # problem the tree's difference is exactly 1/16 on each, a zero-width interval; paired by the
    # order of the shuffled files it would be wide
    assert pairs[("1.0", "base", "cispo16")]["diff"] == pytest.approx(1 / 16)
    tree_vs_base = pairs[("1.0", "base", "tree44")]
    assert tree_vs_base["diff"] == pytest.approx(1 / 16)
    assert tree_vs_base["ci95"] == (pytest.approx(1 / 16), pytest.approx(1 / 16))
    assert pairs[("1.0", "cispo16", "tree44")]["diff"] == pytest.approx(0.0)
    # with seed noise: the tree's seed means differ by 1/16 per seed, so its interval is wider than
    # the per-problem one; CISPO's alike seeds add nothing (its interval against the base is the
    # per-problem one at a t quantile)
    t_c = pairs[("1.0", "cispo16", "tree44")]
    assert t_c["seeds_ci95"][0] < t_c["ci95"][0] - 0.05 and t_c["seeds_ci95"][1] > t_c["ci95"][1] + 0.05
    b_c = pairs[("1.0", "base", "cispo16")]
    assert b_c["seeds_df"] == pytest.approx(9) and b_c["seeds_ci95"][1] - b_c["seeds_ci95"][
        0
    ] == pytest.approx((b_c["ci95"][1] - b_c["ci95"][0]) * 2.262157 / 1.96, rel=1e-5)
    # the frontier: at 2e CISPO's curve is at its best, the tree's at its base; at 3e the reverse
    fr = {r["tokens"]: r for r in summary["frontier"]}
    assert fr[2 * e]["best"]["cispo"] == ("cispo16", pytest.approx(best))
    v2 = fr[2 * e]["tree_vs_cispo"]
    assert v2["diff"] == pytest.approx(-8 / (8 * K)) and v2["verdict"] == "cispo > tree"
    # alike seeds: the interval with seed noise is the per-problem one at t(7) instead of 1.96
    assert v2["seeds_ci95"][0] < v2["ci95"][0] and v2["seeds_verdict"] == "cispo > tree"
    v3 = fr[3 * e]["tree_vs_cispo"]
    assert v3["diff"] == pytest.approx(12 / (8 * K)) and v3["verdict"] == "tree > cispo"
    # past 3e every run had been stopped by the plateau rule: each counts with its last evaluation
    assert fr[4 * e]["carried"] == ["cispo16", "tree44"] and fr[3 * e]["carried"] == []
    assert fr[4 * e]["tree_vs_cispo"]["diff"] == pytest.approx(v3["diff"])
    md = (out / "plateau.md").read_text()
    assert "| CISPO, group 16 | 3e-4 | 3 |" in md and "tree > cispo" in md
    # every tree shape against every CISPO shape on test: level with CISPO-16, 4 points per problem
    # below CISPO-8 on every problem (a zero-width interval, marked)
    assert "| 1.0 | the whole tree, 4 x 4 (3) | +0.00 [" in md
    assert "| -25.00 [-25.00, -25.00] *; seeds [" in md
    assert plateau.family_best(summary) == {"cispo": "cispo16", "tree": "tree44"}
    rows = {r.split(" | ")[0].lstrip("| "): r for r in plateau.readme_table(summary).splitlines()}
    assert "CISPO, group 8" not in rows
    assert rows["CISPO, group 16"].endswith("| - | - | 8.4 |")  # the reference row; the article's CISPO
    # the tree against CISPO-16, paired: -1/16 and +1/16 alternately, so 0 and no difference
    tree_row = rows["the whole tree, 4 x 4"]
    assert "| +0.00 [" in tree_row and "; seeds [" in tree_row and ": level |" in tree_row
    # -2/16 on every other problem; the base has no seeds, CISPO's are alike: a t interval, 9 df
    assert "| -6.25 [-10.33, -2.17]; seeds [-10.96, -1.54]: behind |" in rows["base (bundled policy)"]
    assert (out / "plateau.png").stat().st_size > 10_000


def test_a_frontier_shape_counts_past_a_seed_the_plateau_rule_stopped_and_nowhere_past_any_other_end(
    tmp_path,
):
    """A seed stopped by the plateau rule before a budget counts there with its last evaluation (its
    curve went flat); a seed that ended there any other way takes its shape off the frontier."""
    out = tmp_path / "plateau"
    e = plateau.EVAL_EVERY_TOKENS
    low, high, mid = _scores([1] * 8, VAL), _scores([5] * 8, VAL), _scores([3] * 8, VAL)
    for s in plateau.SEEDS:
        # group 4: higher; seed 2 was stopped by the plateau rule at e, on its last evaluation (mid)
        # after its best (high)
        tail = [(2 * e, high), (3 * e, high)] if s < 2 else [(e / 2, high), (e, mid)]
        _run(out, "cispo4", s, [(0, low)] + tail)
        # group 8: highest of all, but seed 0 ended at 2e without reaching its plateau (the cap)
        _run(out, "cispo8", s, [(0, low), (e, high), (2 * e, high)] + ([(3 * e, high)] if s else []),
             stop="token budget: x" if s == 0 else "plateau: x")  # fmt: skip
        _run(out, "cispo16", s, [(0, low), (e, low), (2 * e, low), (3 * e, low)])
    fr = {r["tokens"]: r for r in plateau.frontier(out)}
    # at 2e: cispo8 (every seed reached it) is best; at 3e cispo8 has no figure (seed 0 was cut off)
    assert fr[2 * e]["best"]["cispo"] == ("cispo8", pytest.approx(5 / K))
    best3, score3 = fr[3 * e]["best"]["cispo"]
    # at 3e cispo4 counts, its seed 2 with its last evaluation (3 per problem), not its best (5)
    assert best3 == "cispo4" and score3 == pytest.approx((5 + 5 + 3) / 3 / K)
    assert fr[3 * e]["carried"] == ["cispo4"] and fr[e]["carried"] == []
    md = plateau.markdown({"arms": {}, "pairs": [], "frontier": list(fr.values()), "rate_checks": []})
    assert "(cispo4*)" in md and "(cispo8)" in md


def test_a_stopped_run_resumes_from_its_checkpoint_and_a_restarted_one_keeps_only_its_own_history(tmp_path):
    """A run cut short after a checkpoint resumes from it (``ckpt_path``); one restarted from step
    0 (no checkpoint yet) begins a new validation history: the first incarnation's later
    evaluations (here step 30) must not survive into the curve."""
    d = plateau.run_dir(tmp_path, "cispo16", 0)
    assert not any(a.startswith("ckpt_path=") for a in plateau.train_job(tmp_path, "cispo16", 0).argv)
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert f"ckpt_path={d / 'checkpoints' / 'last.ckpt'}" in plateau.train_job(tmp_path, "cispo16", 0).argv
    (d / "results.json").write_text("{}")  # finished: nothing to resume
    assert not any(a.startswith("ckpt_path=") for a in plateau.train_job(tmp_path, "cispo16", 0).argv)

    def row(step: int, tokens: int, score: float) -> str:
        return json.dumps({"step": step, "compute/generated_tokens": tokens, "val/mean@16": score})

    lines = [row(0, 0, 0.03), row(10, 100, 0.05), row(20, 200, 0.06), row(30, 300, 0.09)]  # first run
    lines += [row(0, 0, 0.03), row(10, 100, 0.04), row(20, 200, 0.07), row(20, 200, 0.071)]  # again; a repeat
    (d / "val_evals.jsonl").write_text("\n".join(lines) + "\n")
    assert plateau._curve(d) == [(0, 0.03), (100, 0.04), (200, 0.071)]


def _trains(out: Path) -> list[str]:
    return [j.name.removeprefix("train ") for j in plateau.plan(out) if j.name.startswith("train ")]


def _best(out: Path, arm: str, lr: str | None, score: float) -> None:
    d = plateau.run_dir(out, arm, 0, lr)
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps({"stop_reason": "plateau: x", "best": {"score": score}}))


def test_the_plan_runs_seeds_1_and_2_at_the_rate_seed_0_picked_on_validation(tmp_path):
    out = tmp_path / "plateau"
    checked = {a for a, _ in plateau.RATE_CHECKS}
    assert checked == set(plateau.HEADLINE) == {"cispo16", "cispo8", "cispo4", "tree44", "tree42"}
    trains = _trains(out)
    # nothing has run: every arm's seed 0 first (a study cut short compares every arm), then the
    # rate checks; seeds 1 and 2 only of the arms without a check (their rate is the study's)
    assert trains[: len(plateau.ARMS)] == [f"{a}_s0" for a in plateau.ARMS]
    checks = [f"{a}_lr{lr}_s0" for a, lr in plateau.RATE_CHECKS]
    assert trains[len(plateau.ARMS) : len(plateau.ARMS) + len(checks)] == checks
    rest = [a for a in plateau.ARMS if a not in checked]
    assert sorted(trains[len(plateau.ARMS) + len(checks) :]) == sorted(
        f"{a}_s{s}" for a in rest for s in (1, 2)
    )
    assert len(set(trains)) == len(trains)

    # CISPO-16: the lower rate's seed 0 reached the higher validation best -> seeds 1, 2 at 1e-4
    _best(out, "cispo16", None, 0.0876)
    assert plateau.picked_lr(out, "cispo16") is None  # the lower rate's run not done yet
    _best(out, "cispo16", "1e-4", 0.0947)
    # the tree at 4 x 4: a tie keeps the study rate
    _best(out, "tree44", None, 0.08)
    _best(out, "tree44", "1e-4", 0.08)
    assert plateau.picked_lr(out, "cispo16") == "1e-4" and plateau.picked_lr(out, "tree44") == "3e-4"
    assert plateau.arm_lr(out, "cispo8") == "3e-4"  # undecided: reported at the study rate
    trains = _trains(out)
    assert {"cispo16_lr1e-4_s1", "cispo16_lr1e-4_s2", "tree44_s1", "tree44_s2"} <= set(trains)
    assert "cispo16_s1" not in trains and not any(
        t.startswith("cispo8_") and t.endswith(("_s1", "_s2")) for t in trains
    )
    # the headline arms' seeds before the other arms'
    assert max(trains.index(t) for t in ("cispo16_lr1e-4_s2", "tree44_s2")) < min(
        trains.index(f"{a}_s1") for a in rest
    )
    evals = [j for j in plateau.plan(out) if j.name.startswith("eval ") and j.after]
    assert all(len(j.after) == 1 and j.after[0].removeprefix("train ") in trains for j in evals)


def test_a_run_a_lower_cap_stopped_goes_on_and_its_evaluations_are_redone(tmp_path):
    import os

    out = tmp_path / "plateau"
    d = plateau.run_dir(out, "cispo8", 0)
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "last.ckpt").write_bytes(b"")
    ev = out / "eval" / f"{d.name}_T1.0" / "results.json"
    ev.parent.mkdir(parents=True)
    ev.write_text("{}")
    os.utime(ev, (1e9, 1e9))  # written before the run's results below

    def jobs() -> dict:
        return {j.name: j for j in plateau.plan(out)}

    old_cap = plateau.MAX_TOKENS - 1_000_000
    (d / "results.json").write_text(json.dumps({
        "stop_reason": f"token budget: {old_cap + 1864:,} generated tokens >= {old_cap:,}",
        "compute/generated_tokens": old_cap + 1864}))  # fmt: skip
    train = jobs()[f"train {d.name}"]
    assert not train.done() and train.argv[-1] == f"ckpt_path={d / 'checkpoints' / 'last.ckpt'}"
    assert not jobs()[f"eval {d.name} T=1.0"].done()  # older than the run: its best may change
    # the run went on to the plateau rule: done, and not resumed again
    (d / "results.json").write_text(
        json.dumps({"stop_reason": "plateau: x", "compute/generated_tokens": 3e6})
    )
    train = jobs()[f"train {d.name}"]
    assert train.done() and not any(a.startswith("ckpt_path=") for a in train.argv)
    ev.write_text("{}")  # evaluated again after it
    assert jobs()[f"eval {d.name} T=1.0"].done()
    # a run the current cap stopped is done too
    (d / "results.json").write_text(json.dumps({
        "stop_reason": "token budget: x", "compute/generated_tokens": plateau.MAX_TOKENS + 5}))  # fmt: skip
    assert jobs()[f"train {d.name}"].done()


def test_a_runs_wall_time_adds_up_all_its_processes(tmp_path):
    """A run cut off and resumed: its wall time is both processes' (from train.py's "output dir:"
    line to the process's last line), not the last process's ``wall_seconds`` alone."""
    log = [
        "[2026-12-06 09:50:32,376][tsd.train][INFO] loading policy tiny",
        "[2026-12-06 09:50:33,000][tsd.train][INFO] output dir: /x/runs/cispo8_s0, run id: e0",
        "[2026-12-06 10:20:33,000][tsd.callbacks.log_line][INFO] step 5 | loss 0.1",  # cut off here: 30 min
        "a line without a time",
        "[2026-12-06 16:10:37,501][tsd.callbacks.resume_log][INFO] resume: the log keeps 10 rows",
        "[2026-12-06 16:10:37,780][tsd.train][INFO] output dir: /x/runs/cispo8_s0, run id: e0, resuming",
        "[2026-12-06 16:19:37,780][tsd.train][INFO]   results: /x/runs/cispo8_s0/results.json",  # 9 min
    ]
    (tmp_path / "train.log").write_text("\n".join(log) + "\n")
    assert plateau._wall_minutes(tmp_path, {"wall_seconds": 540}) == pytest.approx(39.0)
    assert plateau._wall_minutes(tmp_path / "none", {"wall_seconds": 540}) == 9.0  # no log: results.json's
