"""Best-of-N distillation baseline: sample N completions, keep the best by dense reward.

Article: N=64, then the same trainer as MCTS (value-baseline advantages ``A_t = r - sg(V(s_t))``).
It isolates what the *tree* adds over plain selection from the same sampling budget.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from tsd.config import check_int
from tsd.envs.base import Env, Problem
from tsd.rollouts.base import Rollout, RolloutOutput, mean_problem_stats, problem_stats
from tsd.rollouts.sampling import sample_and_grade, to_trajectory
from tsd.samplers.base import Sampler


class BestOfNRollout(Rollout):
    name = "best_of_n"

    def __init__(self, n: int = 64, max_new_tokens: int = 256) -> None:
        """
        Args:
            n: completions sampled per prompt (article: 64); the best one by dense reward is kept
               (ties: the first sampled).
            max_new_tokens: token cap of one completion.
        """
        self.n = check_int(n, "BestOfNRollout.n", low=1)
        self.max_new_tokens = check_int(max_new_tokens, "BestOfNRollout.max_new_tokens", low=1)

    @property
    def sequences_per_problem(self) -> int:
        """N samples (the memory plan's unit)."""
        return self.n

    def run(self, problems: Sequence[Problem], sampler: Sampler, env: Env) -> RolloutOutput:
        groups = sample_and_grade(problems, sampler, env, self.n, self.max_new_tokens)
        trajs, tokens, all_r, best_r = [], 0, [], []
        for g in groups:
            g_tokens = sum(len(s.continuation.token_ids) for s in g)
            tokens += g_tokens
            all_r += [s.score.dense for s in g]
            best = max(g, key=lambda s: s.score.dense)  # max keeps the first of equals
            best_r.append(best.score.dense)
            traj = to_trajectory(best, sampler.version, self.name)
            traj.stats.update(
                problem_stats(
                    tokens=g_tokens,
                    correct_found=any(s.score.correct for s in g),
                    distinct_completions=len({tuple(s.continuation.token_ids) for s in g}),
                )
            )
            trajs.append(traj)
        stats = {
            "rollout/reward_mean": statistics.fmean(all_r),
            "rollout/selected_reward_mean": statistics.fmean(best_r),
            "rollout/correct_mean": statistics.fmean(t.correct for t in trajs),
            **mean_problem_stats(trajs),  # rollout/correct_found: a correct one among the N
        }
        return RolloutOutput(trajs, stats, generated_tokens=tokens)
