"""scripts/study.py's bookkeeping: which rate the grid picks, what a study cut short reports, and
the docs/study.md block it regenerates. The runs themselves are ordinary train.py / eval.py commands
(test_configs checks that each composes); here their result files are written by hand."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from tsd.eval import study


def _result(path: Path, correct: list[int], k: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(correct)
    path.write_text(json.dumps({
        "mean@16": sum(correct) / (n * k), "pass@16": sum(c > 0 for c in correct) / n,
        "samples_per_problem": k, "per_problem_correct": {str(i): c for i, c in enumerate(correct)},
    }))  # fmt: skip


def test_the_grid_picks_the_best_validated_rate_and_a_short_study_still_compares(tmp_path):
    out = tmp_path / "study"
    n = 64
    _result(out / "eval" / "base_val.json", [1] * n)
    for lr, c in (("3e-5", 2), ("1e-4", 4), ("3e-4", 3)):
        _result(study.train_dir(out, "cispo", lr, 0) / "val.json", [c] * (n // 2) + [c - 1] * (n // 2))
    _result(study.train_dir(out, "bon", "1e-4", 0) / "val.json", [1] * n)  # one rate of three so far
    assert study.best_lr(out, "cispo") == "1e-4"
    assert study.best_lr(out, "bon") is None  # not every rate validated yet
    jobs = {j.name: j for j in study.plan(out)}
    assert "train cispo lr=1e-4 seed=1" in jobs and "train bon lr=1e-4 seed=1" not in jobs
    # an evaluation waits for its training run (it once started on a policy not trained yet)
    assert jobs["eval cispo_s1 T=1.0"].after == ["train cispo lr=1e-4 seed=1"]
    # a run whose log is being written (a stopped study.py left it running) is not started twice
    seed1 = jobs["train cispo lr=1e-4 seed=1"]
    assert not study._live_elsewhere(seed1)
    seed1.done_file.parent.mkdir(parents=True)
    (seed1.done_file.parent / "train.log").write_text("step 5/150\n")
    assert study._live_elsewhere(seed1)

    summary = study.report(out)
    cispo = summary["methods"]["cispo"]
    assert cispo["lr"] == "1e-4" and set(cispo["val"]) == {"3e-5", "1e-4", "3e-4"}
    pairs = {(p["lr"], p["a"], p["b"]): p for p in summary["val_pairs"]}
    # cispo at 1e-4 scores 3.5/16 per problem on average, the base 1/16: +2.5/16, every problem better
    p = pairs[("1e-4", "base", "cispo")]
    assert p["diff"] == pytest.approx(2.5 / 16) and p["verdict"] == "cispo > base"
    # bon equals the base on every problem: a zero-width interval holding 0
    assert pairs[("1e-4", "base", "bon")]["verdict"] == "no difference"
    assert pairs[("1e-4", "cispo", "bon")]["verdict"] == "cispo > bon"
    md = (out / "study.md").read_text()
    assert "| best-of-16 | not chosen yet (- / 6.25 / -) |" in md, md
    assert (out / "study.png").stat().st_size > 10_000


def test_the_doc_block_is_regenerated_between_its_markers(tmp_path):
    readme = tmp_path / "study.md"
    readme.write_text(f"# x\n\nbefore\n{study.BEGIN}\nold table\n{study.END}\nafter\n")
    study.write_doc_block(readme, "| new | table |\n")
    text = readme.read_text()
    assert "old table" not in text and "| new | table |" in text
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{study.END}\nafter\n")
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="no '<!-- study.py report: begin -->'"):
        study.write_doc_block(readme, "t")


def _job(name: str, d: Path, log: Path, after: tuple[str, ...] = (), accept=None) -> study.Job:
    """A real command that notes when it ran and writes its done file."""
    done = d / "results.json"
    code = (f"import pathlib, time; pathlib.Path({str(d)!r}).mkdir(parents=True, exist_ok=True); "
            f"open({str(log)!r}, 'a').write({name!r} + ' ' + repr(time.time()) + '\\n'); "
            f"pathlib.Path({str(done)!r}).write_text('{{}}')")  # fmt: skip
    return study.Job(name, [sys.executable, "-c", code], done, after=list(after), accept=accept)


def test_the_runner_waits_for_runs_an_earlier_runner_left_going_and_redoes_what_it_no_longer_accepts(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(study, "POLL_SECONDS", 0.1)
    log, runs = tmp_path / "ran", tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "a" / "train.log").write_text("step 3\n")  # "a" is being trained by a runner stopped earlier
    (runs / "d").mkdir()
    (runs / "d" / "results.json").write_text('{"stale": true}')  # done under an old rule
    jobs = [
        _job("a", runs / "a", log),
        _job("b", runs / "b", log),
        _job("c", runs / "c", log, after=("a",)),
        _job("d", runs / "d", log, accept=lambda f: "stale" not in f.read_text()),
    ]
    a_ended = []

    def earlier_runner_finishes_a() -> None:
        time.sleep(1.0)
        a_ended.append(time.time())
        (runs / "a" / "results.json").write_text("{}")

    t = threading.Thread(target=earlier_runner_finishes_a)
    t.start()
    study.run_jobs(tmp_path, parallel=1, planner=lambda: jobs)
    t.join()
    ran = dict(line.split() for line in log.read_text().splitlines())
    assert set(ran) == {"b", "c", "d"}  # "a" never started twice; "d" redone
    # with one place, "a" held it: nothing started before it ended
    assert min(float(x) for x in ran.values()) >= a_ended[0]
    assert all(j.done() for j in jobs)
