"""Activation checkpointing of the transformer blocks (``module.activation_checkpointing``).

A checkpointed block keeps only its input for the backward pass and runs its forward again there
(``torch.utils.checkpoint``, non-reentrant: Chen et al. 2016, "Training deep nets with sublinear
memory cost"): the block's activations (attention, the 8,960-wide MLP of Qwen2.5-1.5B) live one
block at a time instead of all blocks at once, for one more forward pass of compute.

The block's own ``forward`` is replaced on the instance, so module hooks (FSDP2's all-gather and
reshard) stay outside the checkpointed region, as with ``checkpoint_wrapper``, and the state-dict
keys are unchanged (no wrapper module). It is active only where it can matter: with gradients on
and the block in training mode; the frozen reference, the samplers and evaluation run plainly.
Gradients equal the plain path's (``tests/test_memory_plan.py``).
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_MARK = "_tsd_checkpointed"


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()):
        return forward(self, *args, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Checkpoint each of ``blocks`` (``PolicyValueModel.transformer_blocks()``); returns how many
    were newly checkpointed (applying it twice is a no-op)."""
    n = 0
    for block in blocks:
        if getattr(block, _MARK, False):
            continue
        block.forward = types.MethodType(_checkpointed_forward, block)  # type: ignore[method-assign]
        setattr(block, _MARK, True)
        n += 1
    return n


def is_checkpointed(block: nn.Module) -> bool:
    return bool(getattr(block, _MARK, False))
