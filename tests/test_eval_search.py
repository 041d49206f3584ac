"""``eval.py search=...``: the figure of a search harness is named by what the search read. The
training search (``search=mcts``) reads graded rewards: ``search_oracle@1``; ``search=mcts_value``
never does (every answer it reaches is worth 0 or -1, whatever the target): ``search_value@1``.
The bundled tiny policy, a few test problems, in process.

    python -m pytest tests/test_eval_search.py -q
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from tsd.config import build, config_dir
from tsd.envs.countdown import CountdownEnv
from tsd.eval.search_harness import ORACLE_KEY, VALUE_KEY, evaluate_search
from tsd.rollouts.base import grade


class Recorded:
    """The search rollout, keeping what each call emitted (to grade it here, independently)."""

    def __init__(self, rollout) -> None:
        self.rollout, self.emitted = rollout, []

    def __getattr__(self, name):
        return getattr(self.rollout, name)

    def run(self, problems, sampler, env):
        out = self.rollout.run(problems, sampler, env)
        self.emitted += list(zip(problems, out.trajectories, strict=True))
        self.trees = list(self.rollout.trees)
        return out


def _search(name: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name="eval",
            overrides=[f"search={name}", "search.rollout.workers=2", "search.rollout.iterations=3"],
        )
    rollout = build(cfg.search.rollout, "search.rollout")
    rollout.record_trees = True
    return Recorded(rollout), cfg.search.graded


@pytest.fixture(scope="module")
def setup():
    from tsd.models.loading import load_policy
    from tsd.samplers.hf import HFSampler

    policy, tok = load_policy("tiny")
    env = CountdownEnv(n_train=200, n_test=20)
    return env, lambda: HFSampler(policy, tok, seed=0), tok


@pytest.mark.parametrize("name", ["mcts", "mcts_value"])
def test_the_figure_is_named_by_what_the_search_read(name, setup):
    env, make_sampler, tok = setup
    rollout, graded = _search(name)
    problems = env.test[:4]
    res = evaluate_search(
        rollout, make_sampler(), env, problems, problems_per_batch=2, graded=graded, progress=False
    )
    # the figure is the real grade of the answers the search emitted, whatever the search saw
    want = sum(grade(env, p, tok, t.completion_ids).correct for p, t in rollout.emitted) / len(problems)
    assert len(rollout.emitted) == 4
    # what the search itself valued: the answers reached in the trees and the emitted ones
    seen = [n.reward for tree in rollout.trees for n in tree.nodes if n.terminal and n.reward is not None]
    seen += [t.reward for _, t in rollout.emitted]
    if graded:
        assert res[ORACLE_KEY] == want and VALUE_KEY not in res
        assert res["search/selection"] == "best_terminal" and res["search/graded"] is True
        assert res["search/leaf_values"] == "rollout to an answer, valued by the graded reward"
        # the search saw graded rewards: the emitted answers carry their real grades
        assert [t.reward for _, t in rollout.emitted] == [
            grade(env, p, tok, t.completion_ids).dense for p, t in rollout.emitted
        ]
        assert any(r not in (0.0, -1.0) for r in seen)
    else:
        assert res[VALUE_KEY] == want and ORACLE_KEY not in res
        assert (res["search/selection"], res["search/leaf_values"]) == ("max_visit", "value head")
        # nothing the search valued depended on the target: 0 (well-formed) or -1, never correct
        assert set(seen) <= {0.0, -1.0} and not any(t.correct for _, t in rollout.emitted)
        assert 0.0 in seen  # some reached answer was well-formed: graded, it would be worth more or less
    assert res["search/generated_tokens"] > 0


def test_a_search_that_emits_several_paths_per_problem_is_refused_by_name(setup):
    from tsd.config import ConfigError

    env, make_sampler, _ = setup
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name="eval",
            overrides=[
                "search=mcts",
                "rollout/emission@search.rollout.emission=tree",
                "search.rollout.workers=2",
                "search.rollout.iterations=2",
            ],
        )
    rollout = build(cfg.search.rollout, "search.rollout")
    with pytest.raises(ConfigError, match=r"^search.rollout: \d+ trajectories for 2 problems.*emission=null"):
        evaluate_search(rollout, make_sampler(), env, env.test[:2], progress=False)
