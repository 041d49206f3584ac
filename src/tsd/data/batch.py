"""TrajectoryBatch: what one optimiser step trains on, as the DataModule hands it to the module.

Layout (one row per trajectory, see :mod:`tsd.data.collate`): ``x = prompt + completion``,
right-padded to the batch's longest row (length ``L``); every per-token tensor is over the target
positions ``x[1:]`` (``T = L - 1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class TrajectoryBatch:
    #: (B, L) prompt + completion token ids, right-padded
    input_ids: torch.Tensor
    #: (B, L) 1 on real tokens
    attention_mask: torch.Tensor
    #: (B, T) 1 on completion targets (the tokens that are trained)
    mask: torch.Tensor
    #: (B, T) log-prob of each target under the sampler that generated it (pi_behaviour)
    behaviour_logp: torch.Tensor
    #: (B,) dense reward of each trajectory
    rewards: torch.Tensor
    #: (B,) 1.0 where the answer is exactly right
    correct: torch.Tensor
    #: (B, T) the rollout's advantage of each completion target (a sequence-level advantage repeated
    #: over the row's tokens, or per-token ones), 0 off the mask; a row of NaN: the trainer's value
    #: baseline ``r - sg(V_old(s_t))``
    advantages: torch.Tensor
    #: (B,) long: the optimiser step whose weights generated each trajectory (its policy version)
    versions: torch.Tensor
    #: (B,) long: optimiser steps between those weights and the ones this step trains (the lag)
    lags: torch.Tensor
    #: buffer ids to acknowledge once the optimiser step that used them has completed
    buffer_ids: list[str] = field(default_factory=list)
    #: statistics logged with the step (rollout/, search/, perf/, compute/, train/dropped_stale, ...)
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TrajectoryBatch:
        """The same batch with every tensor on ``device`` (what Lightning's batch transfer calls)."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def micro_batches(self, size: int) -> list[TrajectoryBatch]:
        """The batch as consecutive row slices of at most ``size`` trajectories (``size`` <= 0 or
        >= the batch: the batch itself), each trimmed to its own longest row: the padding is on
        the right and attention is causal, so every kept position computes exactly what it
        computes in the whole batch. ``buffer_ids`` and ``stats`` stay with the whole batch."""
        B = len(self)
        if size <= 0 or size >= B:
            return [self]
        parts = []
        for s in range(0, B, size):
            rows = slice(s, min(B, s + size))
            L = max(2, int(self.attention_mask[rows].sum(dim=1).max()))  # this slice's longest row
            parts.append(
                replace(
                    self,
                    input_ids=self.input_ids[rows, :L],  # (b, L)
                    attention_mask=self.attention_mask[rows, :L],  # (b, L)
                    mask=self.mask[rows, : L - 1],  # (b, L - 1)
                    behaviour_logp=self.behaviour_logp[rows, : L - 1],
                    advantages=self.advantages[rows, : L - 1],
                    rewards=self.rewards[rows],
                    correct=self.correct[rows],
                    versions=self.versions[rows],
                    lags=self.lags[rows],
                    buffer_ids=[],
                    stats={},
                )
            )
        return parts
