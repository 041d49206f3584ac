"""Turn trajectories into padded training tensors.

Layout (one row per trajectory): ``x = prompt + completion``, right-padded to the batch's
longest row. The logits at position ``i`` predict ``x[i+1]``, so every per-token tensor below is
over the *target* positions ``x[1:]`` (length ``T = L - 1``): completion token ``j`` of a row
whose prompt has ``p`` tokens sits at target index ``p - 1 + j``; the value ``V(s_t)`` of the
state that precedes it is read at that same index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tsd.data.batch import TrajectoryBatch
from tsd.rl.trajectory import Trajectory


def collate_trajectories(
    trajs: Sequence[Trajectory], pad_id: int, lags: Sequence[int] | None = None
) -> TrajectoryBatch:
    """``trajs`` as one padded :class:`~tsd.data.batch.TrajectoryBatch`; ``lags``: each one's lag in
    optimiser steps (:mod:`tsd.data.policy_clock`; zeros when not given). ``buffer_ids`` and
    ``stats`` are left for the DataModule to fill."""
    if not trajs:
        raise ValueError("collate_trajectories: empty batch")
    lengths = [len(t.prompt_ids) + len(t.completion_ids) for t in trajs]
    B, L = len(trajs), max(lengths)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((B, L), dtype=torch.long)  # (B, L)
    mask = torch.zeros((B, L - 1), dtype=torch.float32)  # (B, T) completion targets
    behaviour = torch.zeros((B, L - 1), dtype=torch.float32)  # (B, T)
    for i, t in enumerate(trajs):
        p, c = len(t.prompt_ids), len(t.completion_ids)
        input_ids[i, : p + c] = torch.tensor(t.prompt_ids + t.completion_ids, dtype=torch.long)
        attention_mask[i, : p + c] = 1
        mask[i, p - 1 : p - 1 + c] = 1.0
        behaviour[i, p - 1 : p - 1 + c] = torch.tensor(t.behaviour_logprobs, dtype=torch.float32)
    # the rollout's advantage of every target token: a sequence-level one broadcast over the
    # completion, per-token ones in place, NaN over the whole row of one left to the value baseline
    adv = torch.zeros((B, L - 1), dtype=torch.float32)  # (B, T)
    for i, t in enumerate(trajs):
        p, c = len(t.prompt_ids), len(t.completion_ids)
        if t.token_advantages is not None:
            adv[i, p - 1 : p - 1 + c] = torch.tensor(t.token_advantages, dtype=torch.float32)
        elif t.advantage is not None:
            adv[i, p - 1 : p - 1 + c] = float(t.advantage)
        else:
            adv[i] = float("nan")
    return TrajectoryBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mask=mask,
        behaviour_logp=behaviour,
        rewards=torch.tensor([t.reward for t in trajs], dtype=torch.float32),  # (B,)
        correct=torch.tensor([t.correct for t in trajs], dtype=torch.float32),  # (B,)
        advantages=adv,  # (B, T)
        versions=torch.tensor([t.policy_version for t in trajs], dtype=torch.long),  # (B,)
        lags=torch.tensor(list(lags) if lags is not None else [0] * B, dtype=torch.long),  # (B,)
    )
