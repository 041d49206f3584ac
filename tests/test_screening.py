"""The branching screen (tsd.eval.screening, scripts/screen_branching.py): every per-problem figure on
a tree and a group written out by hand, the token matching, the verdict, and one tiny run of the
script that resumes from its journal.

    python -m pytest tests/test_screening.py -q
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tsd.eval.screening import (
    Sample,
    answer_of,
    compare,
    group_row,
    matched_group,
    summarise,
    tree_row,
    verdict,
)
from tsd.rollouts.path_tree import tree_from_paths
from tsd.rollouts.tree_targets import TreePaths, TreeRLAdvantage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def _p(ids):
    return SimpleNamespace(token_ids=list(ids), logprobs=[-0.5] * len(ids), finish_reason="answer")


def test_tree_row_by_hand():
    # root -> [1] -> {[2] -> {A = [3] (r 1, correct, answer "x"), B = [4] (r -1)}, C = [5 6] (r 1, correct, "y")}
    tree, ends = tree_from_paths([0], [_p([1, 2, 3]), _p([1, 2, 4]), _p([1, 5, 6])], max_tokens=8)
    for e, (r, ok) in zip(ends, [(1.0, True), (-1.0, False), (1.0, True)]):
        e.reward, e.correct = r, ok
    tree.generated_tokens = 5  # (what the sampler generated: set by hand)
    answers = {3: "x", 4: None, 6: "y"}
    row = tree_row(tree, TreePaths(TreeRLAdvantage()), lambda ids: answers[ids[-1]])
    assert row["tokens"] == 5 and row["leaves"] == 3
    assert row["solved"] == 1 and row["mixed"] == 1
    # branch points: [1] (children [2]: V 0, 1/2 correct; C: V 1, 1/1) and [2] (A vs B): both differ
    assert row["bp_nondegenerate"] == 1 and row["bp_mixed"] == 1
    assert row["distinct_correct"] == 2
    # trained tokens: 3 + 3 + 3 (a shared step once per path); zero advantage: [1] on every path
    # (V([1]) = V(root)): 3 of 9 tokens
    assert row["trained_tokens"] == 9 and row["nonzero_tokens"] == 6


def test_a_branch_point_whose_children_agree_is_degenerate():
    tree, ends = tree_from_paths([0], [_p([1, 2]), _p([1, 3]), _p([4])], max_tokens=8)
    for e, r in zip(ends, [-1.0, -1.0, 0.5]):
        e.reward, e.correct = r, False
    row = tree_row(tree, TreePaths(TreeRLAdvantage()), lambda ids: None)
    # root: [1] (V -1) vs [4] (V 0.5) differ; [1]: its two children both -1: degenerate
    assert row["bp_nondegenerate"] == 0.5 and row["bp_mixed"] == 0 and row["solved"] == 0


def test_group_row_by_hand():
    g = [Sample(10, 1.0, True, "a"), Sample(20, 1.0, True, "a"), Sample(30, -1.0, False, None)]
    row = group_row(g)
    assert row["tokens"] == 60 and row["leaves"] == 3 and row["solved"] == 1 and row["mixed"] == 1
    assert row["distinct_correct"] == 1  # the same answer twice
    assert row["nonzero_tokens"] == 60  # mean 1/3: every reward differs from it
    same = group_row([Sample(10, 0.5, False, "b"), Sample(12, 0.5, False, "c")])
    assert same["nonzero_tokens"] == 0 and same["bp_nondegenerate"] == 0 and same["mixed"] == 0


def test_matched_group_takes_the_first_samples_nearest_in_tokens():
    pool = [Sample(t, 0.0, False, None) for t in (30, 40, 50, 20)]
    assert len(matched_group(pool, 65)) == 2  # 70 is nearer than 30 or 120
    assert len(matched_group(pool, 100)) == 3  # 120 (20 off) is nearer than 70 (30 off)
    assert len(matched_group(pool, 10)) == 1  # at least one sample
    assert len(matched_group(pool, 1000)) == 4  # the whole pool when it holds fewer tokens


def test_answer_of_is_bounded_and_strips_spaces():
    assert answer_of("<step>1+1=2</step><answer> (1 + 1)*2 </answer>") == "(1+1)*2"
    assert answer_of("<answer>" + "1" * 500 + "</answer>") is None
    assert answer_of("no answer") is None


def test_compare_and_verdict():
    base = [group_row([Sample(10, -1.0, False, None)]) for _ in range(20)]
    run = [{**b, "solved": 1.0, "mixed": 0.0} for b in base]
    c = compare(run, base)
    assert c["solved"]["diff"] == 1.0 and c["token_ratio"]["value"] == 1.0
    assert verdict(c) == "beats i.i.d. on solved"
    assert math.isclose(summarise(run)["solved_per_10k"], 1e4 / 10)


@pytest.mark.slow
def test_the_script_screens_a_design_and_resumes_from_its_journal(tmp_path, capsys):
    import screen_branching

    argv = ["--problems", "4", "--pool", "16", "--batch", "2", "--only-designs", "--out", str(tmp_path),
            "--design", "ep: experiment=eptree_countdown rollout.chains=2 rollout.max_new_tokens=48"]  # fmt: skip
    assert screen_branching.main(argv) == 0
    out = json.loads((tmp_path / "screening.json").read_text())
    comp = out["results"]["tiny"]["comparisons"]["ep"]
    assert set(comp) >= {"solved", "mixed", "bp_mixed", "mixed_per_10k", "token_ratio", "verdict", "stats"}
    assert 0.8 < comp["token_ratio"]["value"] < 1.25  # matched in tokens
    assert (tmp_path / "screen_branching.png").exists()
    capsys.readouterr()
    assert screen_branching.main(argv) == 0
    assert capsys.readouterr().out.count("measured before") == 2  # the pool and the design


def test_compare_arms_averages_seeds_per_problem_before_pairing(tmp_path, capsys):
    import compare_arms

    def res(name, counts):
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps({"samples_per_problem": 4, "per_problem_correct": dict(zip("abcd", counts))}))
        return str(f)

    a = [res("a0", [0, 0, 1, 1]), res("a1", [0, 2, 1, 1])]  # seed means per problem: 0, 1/4, 1/4, 1/4
    b = [res("b0", [4, 4, 4, 4])]
    assert compare_arms.main(["--arm", "a", *a, "--arm", "b", *b]) == 0
    out = capsys.readouterr().out
    assert "a: mean@k 18.75 ± 8.84 over 2 seeds (12.50, 25.00)" in out
    assert "b - a: +81.25 points" in out and "-> b > a" in out
