"""Batches budgeted in generated tokens (generation.tokens_per_rollout): the worker's chunks, the
overshoot carried to the next batch, the resume, and a short training run with a forking rollout.

    python -m pytest tests/test_token_budget.py -q
"""

from __future__ import annotations

import pytest
from conftest import compose_train
from test_mcts import ScriptedSampler

from tsd.buffers.memory import MemoryBuffer
from tsd.config import ConfigError
from tsd.envs.countdown import CountdownEnv
from tsd.generation.worker import RolloutWorker
from tsd.rl.trajectory import Trajectory
from tsd.rollouts.base import Rollout, RolloutOutput


class FixedCost(Rollout):
    """One trajectory and ``cost`` generated tokens per problem; a stat that is per problem."""

    name = "fixed"

    def __init__(self, cost: int) -> None:
        self.cost = cost
        self.calls: list[list[int]] = []

    def run(self, problems, sampler, env):
        self.calls.append([p.id for p in problems])
        trajs = [
            Trajectory(problem_id=p.id, prompt_ids=[1], completion_ids=[2], behaviour_logprobs=[-0.1],
                       reward=0.0, correct=False, policy_version=0, rollout=self.name)
            for p in problems
        ]  # fmt: skip
        stats = {"rollout/correct_found": float(len(self.calls) % 2)}
        return RolloutOutput(trajs, stats, generated_tokens=self.cost * len(problems))


@pytest.fixture(scope="module")
def env():
    return CountdownEnv(n_train=60, n_test=4)


def test_a_budgeted_batch_runs_chunks_until_its_tokens_are_spent_and_carries_the_overshoot(
    env, char_tokenizer
):
    rollout, buf = FixedCost(cost=10), MemoryBuffer()
    w = RolloutWorker(rollout, ScriptedSampler(char_tokenizer), env, buf, 2, seed=0, tokens_per_rollout=50)
    # chunks of 2 problems cost 20 tokens: 3 chunks (60) reach 50; 10 over
    assert w.produce() == 6
    assert [len(c) for c in rollout.calls] == [2, 2, 2] and len(buf) == 6
    assert w.token_debt == 10 and w.generated_tokens == 60
    s = w.last_stats
    assert s["rollout/problems_per_rollout"] == 6 and s["rollout/rollout_calls"] == 3
    assert s["rollout/token_budget"] == 50
    # chunks' per-problem stats averaged over the problems: calls 1, 2, 3 gave 1, 0, 1
    assert s["rollout/correct_found"] == pytest.approx(2 / 3)
    # the next batch's budget is 50 - 10: two chunks, no overshoot left
    assert w.produce() == 4 and w.token_debt == 0 and w.generated_tokens == 100
    # every problem is a fresh one of the stream, none repeated
    seen = [pid for c in rollout.calls for pid in c]
    assert len(seen) == len(set(seen)) == 10


def test_the_overshoot_survives_a_resume(env, char_tokenizer):
    w = RolloutWorker(
        FixedCost(10), ScriptedSampler(char_tokenizer), env, MemoryBuffer(), 2, tokens_per_rollout=50
    )
    w.produce()
    state = w.state_dict()
    w2 = RolloutWorker(
        FixedCost(10), ScriptedSampler(char_tokenizer), env, MemoryBuffer(), 2, tokens_per_rollout=50
    )
    w2.load_state_dict(state)
    assert w2.token_debt == 10 and w2.produce() == 4


def test_without_a_budget_one_rollout_of_the_problems(env, char_tokenizer):
    rollout = FixedCost(10)
    w = RolloutWorker(rollout, ScriptedSampler(char_tokenizer), env, MemoryBuffer(), 3)
    assert w.produce() == 3 and rollout.calls == [rollout.calls[0]] and len(rollout.calls[0]) == 3
    assert "rollout/problems_per_rollout" not in w.last_stats


def test_a_bad_budget_names_the_field(env, char_tokenizer):
    with pytest.raises(ConfigError, match="generation.tokens_per_rollout"):
        RolloutWorker(
            FixedCost(1), ScriptedSampler(char_tokenizer), env, MemoryBuffer(), 2, tokens_per_rollout=0
        )


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["eptree_countdown"])
def test_a_short_training_run_with_a_budgeted_forking_rollout(experiment, policy_dir, tmp_path):
    from tsd.train import train

    overrides = [f"experiment={experiment}", f"model.name_or_path={policy_dir}", "debug=smoke",
                 "callbacks.eval.at_start=false", "data.batch_size=1", "generation.problems_per_rollout=1",
                 "generation.tokens_per_rollout=1000"]  # fmt: skip
    res = train(compose_train(overrides, tmp_path))
    assert res["global_step"] == 3 and res["skipped_steps"] == 0
    # three batches of 1,000 generated tokens, each overshoot taken off the next: the run's tokens
    # are within one chunk (one problem: at most 8 chains + 16 forks of 48 tokens) of 3,000
    assert 3000 <= res["final/compute/generated_tokens"] < 3000 + 24 * 48
