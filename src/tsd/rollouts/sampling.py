"""What the sampling baselines share: sample whole completions for every prompt and grade them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tsd.config import check_int
from tsd.envs.base import Env, Problem, Score
from tsd.rl.trajectory import Trajectory
from tsd.rollouts.base import encode_prompt, grade
from tsd.samplers.base import Continuation, Sampler


@dataclass
class GradedSample:
    problem: Problem
    prompt_ids: list[int]
    continuation: Continuation
    score: Score


def sample_and_grade(
    problems: Sequence[Problem], sampler: Sampler, env: Env, n: int, max_new_tokens: int
) -> list[list[GradedSample]]:
    """``n`` whole completions (stop at ``</answer>`` or EOS) per problem, graded with the env;
    one ``sample`` call so the backend sees the widest batch."""
    tok = sampler.tokenizer
    prompts = [encode_prompt(env, p, tok) for p in problems]
    outs = sampler.sample(prompts, n=n, max_new_tokens=max_new_tokens, stop="answer")
    return [
        [GradedSample(p, ids, c, grade(env, p, tok, c.token_ids)) for c in conts]
        for p, ids, conts in zip(problems, prompts, outs)
    ]


def to_trajectory(
    s: GradedSample, version: int, rollout: str, advantage: float | None = None, group_id: int = -1
) -> Trajectory:
    """The trajectory record of one graded sample."""
    return Trajectory(
        problem_id=s.problem.id,
        prompt_ids=s.prompt_ids,
        completion_ids=s.continuation.token_ids,
        behaviour_logprobs=s.continuation.logprobs,
        reward=s.score.dense,
        correct=s.score.correct,
        policy_version=version,
        rollout=rollout,
        advantage=advantage,
        finish_reason=s.continuation.finish_reason,
        group_id=group_id,
    )


def check_positive(name: str, value: int, owner: str) -> None:
    """``tsd.config.check_int(value, "<owner>.<name>", low=1)``, under the name ``GroupRollout``
    still calls it by (group.py is being rewritten; it moves to ``check_int`` with that rewrite)."""
    check_int(value, f"{owner}.{name}", low=1)
