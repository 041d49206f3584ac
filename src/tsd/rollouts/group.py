"""Group sampling (GRPO/CISPO baseline): G completions per prompt, group-normalised advantages.

Article baseline: 128 prompts x group 16, CISPO with eps_high 5.0. The advantage of sample i in
group g is ``(r_i - mean_g) / (std_g + eps)`` (GRPO, Shao et al. 2024); ``scale_by_std=False``
gives ``r_i - mean_g`` (Dr. GRPO, Liu et al. 2025). Computed by the one implementation,
:func:`tsd.rl.losses.group_normalized_advantages` (sample std, as TRL, verl and OpenRLHF; a group
whose rewards are all equal gets 0). The article's baseline (TRL's GRPOTrainer) has no value
head: its experiment sets ``loss.c_value: 0``, so nothing trains a value it never reads.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from tsd.envs.base import Env, Problem
from tsd.rl.losses import group_normalized_advantages
from tsd.rl.trajectory import Trajectory
from tsd.rollouts.base import Rollout, RolloutOutput
from tsd.rollouts.sampling import check_positive, sample_and_grade, to_trajectory
from tsd.rollouts.tree_stats import nonzero_advantage_fraction
from tsd.samplers.base import Sampler


class GroupRollout(Rollout):
    name = "group"

    def __init__(
        self,
        group_size: int = 16,
        max_new_tokens: int = 256,
        scale_by_std: bool = True,
        drop_zero_variance: bool = False,
        eps: float = 1e-6,
    ) -> None:
        """
        Args:
            group_size: completions sampled per prompt (G; article: 16).
            max_new_tokens: token cap of one completion.
            scale_by_std: divide by the group's reward std (GRPO) or not (Dr. GRPO).
            drop_zero_variance: drop groups whose rewards are all equal (they carry no signal).
            eps: added to the std.
        """
        check_positive("group_size", group_size, "GroupRollout")
        check_positive("max_new_tokens", max_new_tokens, "GroupRollout")
        if not eps > 0:
            raise ValueError(f"GroupRollout.eps: must be > 0, got {eps!r}")
        self.group_size, self.max_new_tokens = group_size, max_new_tokens
        self.scale_by_std, self.drop_zero_variance, self.eps = scale_by_std, drop_zero_variance, eps

    @property
    def sequences_per_problem(self) -> int:
        """The group (the memory plan's unit)."""
        return self.group_size

    def run(self, problems: Sequence[Problem], sampler: Sampler, env: Env) -> RolloutOutput:
        groups = sample_and_grade(problems, sampler, env, self.group_size, self.max_new_tokens)
        trajs: list[Trajectory] = []
        dropped, tokens, rewards, correct = 0, 0, [], []
        for g in groups:
            r = [s.score.dense for s in g]
            tokens += sum(len(s.continuation.token_ids) for s in g)
            rewards += r
            correct += [s.score.correct for s in g]
            if self.drop_zero_variance and max(r) == min(r):
                dropped += 1
                continue
            adv = group_normalized_advantages(
                torch.tensor(r, dtype=torch.float64),
                torch.zeros(len(r), dtype=torch.long),  # one group
                eps=self.eps,
                scale=self.scale_by_std,
            ).tolist()
            for s, a in zip(g, adv):
                trajs.append(to_trajectory(s, sampler.version, self.name, a, group_id=s.problem.id))
        stats = {
            "rollout/reward_mean": statistics.fmean(rewards),
            "rollout/correct_mean": statistics.fmean(map(float, correct)),
            "rollout/dropped_groups": float(dropped),
            "rollout/completion_tokens_mean": tokens / max(1, len(rewards)),
            # trained tokens whose advantage is not 0 (a group whose rewards are all equal has none)
            "rollout/nonzero_advantage_token_fraction": nonzero_advantage_fraction(trajs),
        }
        return RolloutOutput(trajs, stats, generated_tokens=tokens)
