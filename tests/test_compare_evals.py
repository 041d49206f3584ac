"""scripts/compare_evals.py: the paired difference of mean@k, checked by hand."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import compare_evals  # noqa: E402


def _write(tmp_path, name, per, k=4):
    p = tmp_path / name / "results.json"
    p.parent.mkdir()
    p.write_text(json.dumps({"per_problem_correct": per, "samples_per_problem": k}))
    return p


def test_paired_difference_and_standard_error_by_hand():
    base = {"0": 0, "1": 1, "2": 2, "3": 4}
    run = {"0": 1, "1": 1, "2": 4, "3": 4, "9": 3}  # problem 9 is not in base: ignored
    c = compare_evals.paired(base, 4, run, 4)
    # per-problem differences: 1/4, 0, 2/4, 0 -> mean 3/16; sample sd of (.25, 0, .5, 0)
    d = [0.25, 0.0, 0.5, 0.0]
    m = sum(d) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 3)
    assert c["problems"] == 4 and c["diff"] == pytest.approx(3 / 16)
    assert c["base"] == pytest.approx(7 / 16) and c["run"] == pytest.approx(10 / 16)
    assert c["se"] == pytest.approx(sd / 2)
    assert c["ci95"][0] == pytest.approx(3 / 16 - 1.96 * sd / 2)
    assert (c["better"], c["worse"]) == (2, 0)


def test_different_k_compare_as_fractions():
    c = compare_evals.paired({"a": 8, "b": 0}, 16, {"a": 2, "b": 1}, 4)
    assert c["diff"] == pytest.approx(((0.5 - 0.5) + (0.25 - 0.0)) / 2)


def test_cli_prints_a_row_per_run(tmp_path, capsys):
    b = _write(tmp_path, "base", {"0": 0, "1": 1, "2": 0})
    r = _write(tmp_path, "run", {"0": 2, "1": 1, "2": 1})
    assert compare_evals.main([str(b), str(r)]) == 0
    out = capsys.readouterr().out
    assert "run" in out and "+25.00pp" in out


@pytest.mark.parametrize(
    "content, msg",
    [
        ("not json", "cannot read"),
        (json.dumps({"mean@16": 0.1}), "no per_problem_correct"),
        (json.dumps({"per_problem_correct": {"0": 7}, "samples_per_problem": 4}), "integers in [0, 4]"),
    ],
)
def test_bad_results_file_fails_clearly(tmp_path, content, msg):
    p = tmp_path / "results.json"
    p.write_text(content)
    with pytest.raises(SystemExit, match=msg.replace("[", r"\[").replace("]", r"\]")):
        compare_evals.load(p)
