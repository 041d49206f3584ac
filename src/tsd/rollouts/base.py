"""The rollout interface: a batch of problems in, complete graded trajectories out.

A rollout (``GroupRollout``, ``BestOfNRollout``, ``MCTSRollout``) searches or samples with a
:class:`~tsd.samplers.base.Sampler`, grades with the env and emits
:class:`~tsd.rl.trajectory.Trajectory` records. It never trains and never knows about ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from tsd.envs.base import Env, Problem, Score
from tsd.rl.trajectory import Trajectory
from tsd.samplers.base import Sampler


@dataclass
class RolloutOutput:
    trajectories: list[Trajectory]
    #: aggregate statistics, keys already prefixed (``rollout/...``, ``search/...``)
    stats: dict[str, float] = field(default_factory=dict)
    #: every token the sampler generated for this batch (the compute axis for comparisons)
    generated_tokens: int = 0


class Rollout(ABC):
    #: short name recorded on each trajectory (for logging only; never branched on)
    name: str = "rollout"

    @property
    def sequences_per_problem(self) -> int:
        """Sequences one problem keeps in the sampler at once (a wave of MCTS: workers x K; best-of-N:
        N): what the memory plan fits into a generator's KV cache
        (:mod:`tsd.distributed.memory_plan`)."""
        return 1

    @abstractmethod
    def run(self, problems: Sequence[Problem], sampler: Sampler, env: Env) -> RolloutOutput:
        """Produce graded trajectories for ``problems`` with the sampler's current weights."""

    def state_dict(self) -> dict:
        """What a checkpoint must keep for a resumed run to continue exactly (none by default:
        the rollouts here draw their randomness from the sampler)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict` (nothing by default)."""
        return None


def encode_prompt(env: Env, problem: Problem, tokenizer) -> list[int]:
    """Token ids of the rendered prompt; the BOS token leads when the tokenizer has one and the
    rendered text does not already start with it (chat templates carry their own)."""
    text = env.render_prompt(problem, tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and not env.uses_chat_template(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def decode_completion(tokenizer, completion_ids: Sequence[int]) -> str:
    """Completion text with the tags kept (they are special tokens for the tiny tokenizer) but
    pad/BOS/EOS removed. Only this text is ever graded, never the prompt."""
    drop = {getattr(tokenizer, n, None) for n in ("pad_token_id", "bos_token_id", "eos_token_id")}
    ids = [i for i in completion_ids if i not in drop]
    return tokenizer.decode(ids, skip_special_tokens=False)


def grade(env: Env, problem: Problem, tokenizer, completion_ids: Sequence[int]) -> Score:
    return env.score(decode_completion(tokenizer, completion_ids), problem)


#: per-problem figures every selecting rollout (best-of-N, MCTS) attaches to its trajectory, so that
#: rollouts can be compared at equal compute (``scripts/search_efficiency.py``)
PROBLEM_STAT_KEYS = ("rollout/problem_tokens", "rollout/correct_found", "rollout/distinct_completions")


def problem_stats(tokens: int, correct_found: bool, distinct_completions: int) -> dict[str, float]:
    """Tokens generated for one problem, whether a correct answer was generated anywhere for it
    (not only in the emitted trajectory), and how many distinct complete trajectories were."""
    return dict(zip(PROBLEM_STAT_KEYS, (float(tokens), float(correct_found), float(distinct_completions))))


def mean_problem_stats(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """The mean of :data:`PROBLEM_STAT_KEYS` over a batch's trajectories (one per problem)."""
    return problem_means([t.stats for t in trajectories])


def problem_means(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of :data:`PROBLEM_STAT_KEYS` over per-problem rows (:func:`problem_stats`)."""
    n = max(1, len(rows))
    return {k: sum(r.get(k, 0.0) for r in rows) / n for k in PROBLEM_STAT_KEYS}
