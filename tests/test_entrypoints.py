"""The commands a user types, run as subprocesses: train.py (one run and a multirun sweep),
eval.py with and without the search harness, and the scripts that turn runs into tables and
pictures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


#: a log record as Hydra's handlers print it ("[time][logger][LEVEL] message"), or as a library's
#: own console handler does ("INFO: message"), anywhere in a line (a progress bar may precede it)
LOG_RECORD = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+\]\[[\w.]+\]\[[A-Z]+\] (.*)|^(?:INFO|WARNING): (.*)")


def log_messages(text: str) -> list[str]:
    """The messages of the log records in ``text``, in order."""
    out = []
    for line in re.split(r"[\r\n]", text):
        m = LOG_RECORD.search(line)
        if m:
            out.append(m.group(1) or m.group(2))
    return out


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, f"{args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_train_smoke_then_eval_the_export_with_and_without_search(policy_dir, tmp_path):
    out = tmp_path / "run"
    p = run(
        [
            "train.py",
            "experiment=mcts_countdown",
            "debug=smoke",
            "trainer.enable_progress_bar=true",
            f"model.name_or_path={policy_dir}",
            f"hydra.run.dir={out}",
        ]
    )
    # the line test_user_errors.py looks for to tell that a bad command failed before the model loaded
    assert "loading policy" in p.stdout + p.stderr
    # every log line once: Hydra's handlers print Lightning's too, Lightning's own handler no more
    # (it printed each again on stderr as "INFO: ..."); and none of Lightning's advertising
    messages = log_messages(p.stdout) + log_messages(p.stderr)
    assert messages.count("GPU available: False, used: False") == 1
    assert any("`Trainer.fit` stopped" in m for m in messages)
    assert len(messages) == len(set(messages)), [m for m in messages if messages.count(m) > 1]
    assert "Tip:" not in p.stdout + p.stderr and "\N{ELECTRIC LIGHT BULB}" not in p.stdout + p.stderr
    # the progress bar counts optimiser steps (Lightning's own read "Epoch 0/-2")
    bar = [f for f in re.split(r"[\r\n]", p.stdout) if f.startswith("step: ")]
    assert bar and bar[-1].startswith("step: 100%") and " 3/3 " in bar[-1], bar[-3:]
    assert "Epoch" not in p.stdout + p.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["global_step"] == 3 and "search/tree_size" in res
    ev = tmp_path / "eval"
    p = run(
        [
            "eval.py",
            f"model.name_or_path={out / 'policy'}",
            "eval.num_problems=3",
            "eval.k=2",
            "eval.max_new_tokens=48",
            "search=mcts",
            "search.rollout.workers=2",
            "search.rollout.iterations=2",
            "env.n_train=200",
            "env.n_test=20",
            f"hydra.run.dir={ev}",
        ]
    )
    r = json.loads((ev / "results.json").read_text())
    assert r["num_problems"] == 3 and 0.0 <= r["mean@2"] <= 1.0 and 0.0 <= r["search_oracle@1"] <= 1.0
    # the training search read graded rewards: its figure is named an oracle's, and says how it chose
    assert "search@1" not in r and "search_value@1" not in r
    assert r["search/selection"] == "best_terminal" and r["search/graded"] is True
    assert r["search/leaf_values"] == "rollout to an answer, valued by the graded reward"
    table = p.stdout
    assert "mean@2" in table and "search_oracle@1" in table  # the printed table
    assert re.search(r"^search/selection +best_terminal$", table, re.M) and "search/leaf_values" in table
    assert "loading policy" in p.stdout + p.stderr
    per = r["per_problem_correct"]  # what scripts/compare_evals.py pairs on
    assert len(per) == 3 and all(0 <= c <= 2 for c in per.values())
    assert r["mean@2"] == pytest.approx(sum(per.values()) / (3 * 2))
    assert "per_problem_correct" not in p.stdout

    # the harness that reads no grade, under its own name
    ev2 = tmp_path / "eval_value"
    p = run(
        [
            "eval.py",
            f"model.name_or_path={out / 'policy'}",
            *(
                "eval.num_problems=3",
                "eval.k=2",
                "eval.max_new_tokens=48",
                "env.n_train=200",
                "env.n_test=20",
            ),
            "search=mcts_value",
            "search.rollout.workers=2",
            "search.rollout.iterations=2",
            f"hydra.run.dir={ev2}",
        ]
    )
    r = json.loads((ev2 / "results.json").read_text())
    assert 0.0 <= r["search_value@1"] <= 1.0 and "search_oracle@1" not in r
    assert (r["search/selection"], r["search/leaf_values"], r["search/graded"]) == (
        "max_visit",
        "value head",
        False,
    )
    assert r["search/terminal_values"].startswith("a target-blind format check")
    assert "search_value@1" in p.stdout and "max_visit" in p.stdout


@pytest.mark.slow
def test_bad_override_exits_2_naming_the_field(tmp_path):
    p = subprocess.run(
        [sys.executable, "train.py", "data.batch_size=0", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "data.batch_size" in (p.stdout + p.stderr)


@pytest.mark.slow
def test_multirun_sweep_gets_one_directory_per_job_and_collects(policy_dir, tmp_path):
    sweep = tmp_path / "sweep"
    p = run(
        [
            "train.py",
            "-m",
            "hparams_search=mcts_scaling",
            "debug=smoke",
            f"model.name_or_path={policy_dir}",
            "rollout.workers=1,2",
            "rollout.iterations=2",
            "logger=many",
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=600,
    )
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]  # exactly one directory per job, nothing else
    # the sweep ends with its table (tsd.viz.sweep_summary): one row per job, the sweeper's knobs,
    # the jobs' own final eval and compute, and nothing printed after it
    out = p.stdout.rstrip().splitlines()
    table = out[out.index(f"sweep {sweep}: 2 jobs, eval/mean@2") + 2 :]
    assert table[0].startswith(
        "| job | rollout.workers | rollout.iterations | base eval/mean@2 | final eval/mean@2"
    )
    assert len(table) == 4 and (sweep / "summary.md").read_text().endswith("\n".join(table) + "\n")
    for job, line in zip(jobs, table[2:]):
        res = json.loads((sweep / job / "results.json").read_text())
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [job, str(int(job) + 1), "2"]
        assert float(cells[4]) == pytest.approx(res["final/eval/mean@2"], abs=5e-5)
        assert int(cells[5].replace(",", "")) == res["compute/generated_tokens"] > 0
        assert int(cells[6].replace(",", "")) == res["compute/trained_tokens"] > 0
        assert float(cells[7].replace(",", "")) == pytest.approx(res["wall_seconds"], abs=0.5)
    # W&B: one finished run per job (not the first job's run reused), grouped as one sweep
    from wandb_offline import offline_runs

    runs = [r for job in jobs for r in offline_runs(sweep / job)]
    assert len(runs) == 2 and runs[0].run.run_id != runs[1].run.run_id
    assert {r.run.run_group for r in runs} == {"tree_countdown-sweep-sweep"}
    assert {r.run.job_type for r in runs} == {"sweep"} and all("sweep" in r.run.tags for r in runs)
    assert [r.config["rollout"]["workers"] for r in runs] == [1, 2]
    assert [r.config["run"]["job_num"] for r in runs] == [0, 1]
    assert "rollout.workers=1" in runs[0].run.display_name and "rollout.workers=2" in runs[1].run.display_name
    assert all(r.config["run"]["multirun"] and len(r.exits) == 1 for r in runs)
    p = run(["scripts/collect_sweep.py", str(sweep), "--metric", "eval/mean@2"])
    rows = json.loads((sweep / "sweep.json").read_text())
    assert sorted(r["rollout.workers"] for r in rows) == ["1", "2"]
    assert all(r["final"] is not None and r["generated_tokens"] > 0 for r in rows)
    assert (sweep / "heatmap.png").stat().st_size > 0 and "rollout.workers" in p.stdout
    run(
        [
            "scripts/plot_curves.py",
            str(sweep / "0"),
            str(sweep / "1"),
            "--metric",
            "eval/mean@2",
            "--out",
            str(tmp_path / "curves.png"),
        ]
    )
    assert (tmp_path / "curves.png").stat().st_size > 0
    # the static report over the whole sweep: curves, final table and the workers x iterations heatmap
    p = run(["scripts/report.py", str(sweep), "--out", str(tmp_path / "sweep.html")])
    page = (tmp_path / "sweep.html").read_text()
    assert "id='curves'" in page and "id='heatmap'" in page and "id='tree'" in page
    assert page.count("MCTSRollout+CISPOLoss") == 2 and "metric eval/mean@2" in p.stdout


@pytest.mark.slow
def test_sigterm_stops_a_training_run(policy_dir, tmp_path):
    """``kill PID`` stops train.py within seconds (Lightning alone only sets a flag and trained on)."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "debug=smoke", "trainer.max_steps=1000", "callbacks.eval=null",
           f"model.name_or_path={policy_dir}", f"hydra.run.dir={out}"]  # fmt: skip
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in p.stdout:  # wait until it is training
            lines.append(line)
            if "step 2/1000" in line:
                break
        assert p.poll() is None, "".join(lines[-30:])
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGTERM, rest[-2000:]  # killed by the signal, as by its default action
    assert "SIGTERM: stopping" in rest and took < 30
    assert "step 1000/1000" not in rest


def test_a_run_ends_with_a_few_readable_lines(tmp_path):
    """The last lines of a run (the JSON stays in results.json): steps, time and why it stopped, the
    final evaluation against the base, the best validation score, tokens, where things are."""
    from tsd.train import summary_lines

    (tmp_path / "policy").mkdir()
    result = {
        "global_step": 150, "wall_seconds": 181.4, "stop_reason": "max_steps: 150 optimiser steps",
        "skipped_steps": 0, "final/eval/mean@16": 0.0697, "base/eval/mean@16": 0.0331,
        "compute/generated_tokens": 645_123.0, "compute/trained_tokens": 1_689_000.0,
        "compute/prefill_tokens": 555.0, "eval_history": [{"step": 0}] * 40,
    }  # fmt: skip
    lines = summary_lines(result, tmp_path)
    assert lines == [
        "run finished: 150 optimiser steps in 3 min 1 s (max_steps: 150 optimiser steps; 0 steps skipped)",
        "  test mean@16 at the end: 6.97% (base 3.31%, +3.66 points)",
        "  tokens: 645k generated, 1.69M trained, 555 prefill",
        f"  policy: {tmp_path / 'policy'}",
        f"  results: {tmp_path / 'results.json'}",
    ]
    assert sum(len(x) for x in lines) < 500
    result.update({"final/val/mean@16": 0.08, "base/val/mean@16": 0.0371,
                   "best": {"metric": "val/mean@16", "score": 0.0825, "step": 300, "generated_tokens": 1.4e6}})  # fmt: skip
    (tmp_path / "policy_best").mkdir()
    lines = summary_lines(result, tmp_path)
    assert "  validation mean@16 at the end: 8.00% (base 3.71%, +4.29 points)" in lines
    assert "  best val/mean@16: 8.25% at step 300 (1.40M generated tokens)" in lines
    assert f"  policy: {tmp_path / 'policy'} (validation-best: {tmp_path / 'policy_best'})" in lines
