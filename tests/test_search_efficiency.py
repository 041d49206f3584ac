"""Target quality against compute: the measurement module on the bundled tiny policy, the paired
comparison by hand, and the script end to end (table, JSON, PNG).

    python -m pytest tests/test_search_efficiency.py -q
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tsd.envs.countdown import CountdownEnv
from tsd.eval.search_efficiency import Method, MethodResult, compare, measure, nearest_in_tokens

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _result(label: str, correct: list[float], tokens: float, family: str = "f") -> MethodResult:
    n = len(correct)
    per = {
        "correct": correct,
        "reward": correct,
        "found": correct,
        "distinct": [1.0] * n,
        "tokens": [tokens] * n,
    }
    return MethodResult(Method(family, label, []), per, wall_s=1.0)


def test_compare_is_paired_and_says_no_difference_inside_the_noise():
    base = _result("bon", [1, 0, 1, 0, 1, 0, 1, 0], 100.0)
    same = _result("mcts", [0, 1, 1, 0, 1, 0, 0, 1], 105.0)  # +1 and -1 differences cancel
    c = compare(same, base)
    assert c["diff"] == 0.0 and c["verdict"] == "no difference"
    assert c["token_ratio"] == pytest.approx(1.05) and c["equal_compute"]
    better = _result("mcts", [1, 1, 1, 1, 1, 1, 1, 0], 150.0)
    c2 = compare(better, base)
    # d = (0,1,0,1,0,1,0,0): mean 3/8, sd 0.5175 -> se 0.183 -> CI [0.016, 0.734]
    assert c2["diff"] == pytest.approx(3 / 8)
    assert c2["ci95"][0] == pytest.approx(3 / 8 - 1.96 * 0.517549 / 8**0.5, abs=1e-4)
    assert c2["verdict"] == "better" and not c2["equal_compute"]
    assert nearest_in_tokens(better, [base, _result("bon2", [0] * 8, 140.0)]).method.label == "bon2"


class GradeLog(CountdownEnv):
    """The Countdown env, writing down every grade it gives: ``log[method][problem id]`` is the list
    of ``correct`` of each completion graded for that problem."""

    def __init__(self) -> None:
        super().__init__()
        self.method = ""
        self.log: dict[str, dict[int, list[bool]]] = {}

    def score(self, completion, problem):
        s = super().score(completion, problem)
        self.log.setdefault(self.method, {}).setdefault(problem.id, []).append(s.correct)
        return s


@pytest.mark.slow
def test_measure_best_of_n_and_mcts_on_the_tiny_policy():
    from tsd.config import build
    from tsd.models.loading import load_policy

    policy, tok = load_policy("tiny")
    env = GradeLog()
    problems = env.train[-6:]

    def make_sampler(cfg):
        return build(cfg.sampler, "sampler", seed=0)(policy, tok)

    env.method = "bon4"
    bon = measure(
        Method("best-of-N", "bon4", ["experiment=bon_countdown", "rollout.n=4"]),
        problems,
        env,
        make_sampler,
        3,
    )
    env.method = "default 2x2"
    mcts = measure(
        Method(
            "MCTS", "default 2x2", ["experiment=mcts_countdown", "rollout.workers=2", "rollout.iterations=2"]
        ),
        problems,
        env,
        make_sampler,
        3,
    )
    for r, graded in ((bon, env.log["bon4"]), (mcts, env.log["default 2x2"])):
        assert all(len(v) == 6 for v in r.per_problem.values())
        assert all(t > 0 for t in r.per_problem["tokens"])
        # "found" is what the env said, not what the rollout says of itself: a correct answer was
        # graded for the problem (any sample, any terminal of the tree, the completed path)
        assert r.per_problem["found"] == [float(any(graded[p.id])) for p in problems]
        # the emitted trajectory was graded too, so correct implies found
        assert all(f >= c for c, f in zip(r.per_problem["correct"], r.per_problem["found"]))
    # best-of-4 grades exactly its 4 samples per problem
    assert all(len(env.log["bon4"][p.id]) == 4 for p in problems)
    # best-of-4 draws 4 samples per problem: at most 4 distinct completions
    assert all(1 <= d <= 4 for d in bon.per_problem["distinct"])
    assert "search/root_branch_fraction" in mcts.stats and "search/root_branch_fraction" not in bon.stats
    # best_terminal (the default) emits a correct answer whenever the tree holds one
    assert mcts.per_problem["correct"] == mcts.per_problem["found"]


@pytest.mark.slow
def test_script_writes_the_table_json_and_png(tmp_path, capsys):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import search_efficiency as script
    finally:
        sys.path.remove(str(SCRIPTS))
    rc = script.main(
        ["--problems", "4", "--batch", "2", "--bon", "2", "--budgets", "2x1", "--out", str(tmp_path),
         "--variant", "mine 1x2: rollout.c_puct=2"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "bon2" in out and "default 2x1" in out and "article 4x6" in out and "mine 1x2" in out
    assert "vs bon2" in out  # every MCTS point against the nearest best-of-N
    data = json.loads((tmp_path / "search_efficiency.json").read_text())
    labels = [m["label"] for m in data["methods"]]
    assert labels[0] == "bon2" and "mine 1x2" in labels and len(data["comparisons"]) == len(labels) - 1
    assert (tmp_path / "search_efficiency.png").stat().st_size > 10_000
    # rerun (say after a kill, which tears the journal's last line): nothing is measured again, the
    # figures are the journal's; another seed is another setup and is measured
    with (tmp_path / "measured.jsonl").open("a") as f:
        f.write('{"setup": {"policy": "ti')
    args = ["--problems", "4", "--batch", "2", "--bon", "2", "--budgets", "2x1", "--out", str(tmp_path),
            "--only-variants", "--variant", "mine 1x2: rollout.c_puct=2"]  # fmt: skip
    assert script.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("measured before") == 2, out
    again = json.loads((tmp_path / "search_efficiency.json").read_text())
    assert again["per_problem"]["mine 1x2"] == data["per_problem"]["mine 1x2"]
    assert script.main([*args, "--seed", "1", "--bon"]) == 0
    assert "measured before" not in capsys.readouterr().out
    # a bad variant is refused before any compute, naming the method
    assert script.main(["--problems", "4", "--only-variants", "--bon", "2", "--variant", "bad: rollout.c_puct=-1",
                        "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "bad" in capsys.readouterr().err and not (tmp_path / "x").exists()
