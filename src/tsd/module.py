"""PolicyValueModule: the LightningModule that distils rollouts into the policy.

It holds the policy with its value head, a frozen copy of the initial policy for the KL term,
the loss (:class:`~tsd.rl.losses.RLObjective`, chosen in config) and the optimiser. It does not
know which rollout produced a batch: a batch carries the behaviour log-probs recorded by the
sampler, the rewards, and the rollout's advantage of every token (group sampling's sequence-level
one repeated over the tokens, or a search tree's step-level ones) or NaN, meaning the value
baseline ``A_t = r - sg(V_old(s_t))`` (best-of-N, one-path MCTS).

One optimiser step per batch (the article's single PPO inner step), so ``V_old`` is the value of
the current weights, detached. Steps whose loss or gradient is not finite are skipped and
counted; ``max_bad_steps`` in a row stop the run with a clear message. Weights never see NaN.

Precision and memory (``docs/paper_scale.md``): the trained weights and AdamW's state are fp32
masters, the LM computes in ``model.dtype`` (:class:`~tsd.models.precision.Precision`, built by
``train.py``); three knobs bound a step's memory at the article's shapes, each exact against the
plain computation (``tests/test_memory_plan.py``):

- ``logprob_chunk_tokens``: the target log-probs of the policy and the reference chunk by chunk,
  never the (B, T, V) logits (:mod:`tsd.models.logprobs`); 0 is the plain path;
- ``micro_batch_size``: forward and backward over slices of the batch inside the one optimiser
  step, each part's loss weighted by its share of the whole batch's normaliser
  (:func:`~tsd.rl.losses.micro_batch_shares`), so the gradient is the whole batch's;
- ``activation_checkpointing``: the transformer blocks recompute their activations in the
  backward pass (:mod:`tsd.models.checkpointing`).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from tsd.config import check_bool, check_int, check_number
from tsd.data.batch import TrajectoryBatch
from tsd.models.checkpointing import checkpoint_blocks
from tsd.models.policy_value import PolicyValueModel, final_hidden, lm_target_logprobs
from tsd.models.precision import Precision
from tsd.rl.losses import LossOutput, RLObjective, combine_micro_batches, micro_batch_shares

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimiser steps had a NaN/inf loss or gradient."""


def warmup_constant(
    optimizer: torch.optim.Optimizer, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimiser steps, then constant."""
    check_int(warmup_steps, "module.scheduler.warmup_steps", low=0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int = 1000, min_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak at ``total_steps``."""
    check_int(warmup_steps, "module.scheduler.warmup_steps", low=0)
    check_int(total_steps, "module.scheduler.total_steps", low=1)
    check_number(min_ratio, "module.scheduler.min_ratio", low=0, high=1)

    def f(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / (warmup_steps + 1)
        prog = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


class PolicyValueModule(L.LightningModule):
    def __init__(
        self,
        policy: PolicyValueModel,
        objective: RLObjective,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        temperature: float = 1.0,
        grad_clip: float = 1.0,
        max_bad_steps: int = 5,
        banned_token_ids: list[int] | None = None,
        value_trunk_grad: bool = True,
        precision: Precision | None = None,
        logprob_chunk_tokens: int = 1024,
        micro_batch_size: int = 0,
        activation_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            policy: causal LM + value head being trained.
            objective: ``c_ppo * L_pg + c_value * L_value + c_kl * KL`` (see ``tsd.rl.losses``).
            optimizer: partial of the optimiser (AdamW in the article), called with the parameters.
            scheduler: partial of the LR schedule, called with the optimiser; stepped per optimiser step.
            temperature: the sampler's temperature; the trainer's log-probs use the same one so that
                ``rho_t = pi_theta / pi_behaviour`` compares like with like.
            grad_clip: max global gradient norm (0 disables clipping).
            max_bad_steps: consecutive non-finite steps tolerated before the run stops.
            banned_token_ids: ids the sampler never samples (pad, BOS); masked here too so that the
                ratio compares the same distributions.
            value_trunk_grad: whether the value loss's gradient reaches the shared LM trunk (True)
                or trains the value head alone (False).
            precision: the compute dtype over fp32 master weights (``train.py``: from
                ``model.dtype``); None: fp32 everywhere. The policy's parameters are cast to fp32
                here, in place; the reference policy is a frozen copy that computes as the policy
                does (:meth:`~tsd.models.precision.Precision.reference`).
            logprob_chunk_tokens: tokens whose logits exist at once when the target log-probs are
                computed (policy and reference), forward and backward; 0: the plain path, which
                holds the (B, T, V) fp32 logits and its log-softmax.
            micro_batch_size: trajectories per forward/backward inside the one optimiser step
                (the gradient is the whole batch's); 0: the whole batch at once.
            activation_checkpointing: recompute each transformer block's activations in the
                backward pass instead of keeping them.
        """
        super().__init__()
        check_number(temperature, "module.temperature", low=0, low_open=True)
        check_number(grad_clip, "module.grad_clip", low=0)
        check_int(max_bad_steps, "module.max_bad_steps", low=1)
        check_bool(value_trunk_grad, "module.value_trunk_grad")
        self.logprob_chunk_tokens = check_int(logprob_chunk_tokens, "module.logprob_chunk_tokens", low=0)
        self.micro_batch_size = check_int(micro_batch_size, "module.micro_batch_size", low=0)
        check_bool(activation_checkpointing, "module.activation_checkpointing")
        self.automatic_optimization = False
        #: the one place that says which copy holds which dtype (models/precision.py)
        self.precision = precision or Precision()
        self.policy = self.precision.masters_(policy).train()
        self.objective = objective
        # frozen pi_ref for the KL term: the initial policy, computing as the policy does (no copy
        # at all when c_kl == 0); copied before the checkpointing below, which it does not need
        self.ref = None
        if objective.c_kl > 0:
            self.ref = self.precision.reference(policy.lm)
        self.activation_checkpointing = bool(activation_checkpointing)
        if self.activation_checkpointing:
            checkpoint_blocks(self.policy.transformer_blocks())
        # no value loss (group advantages never read V): the value head is not a trained parameter.
        # Left trainable it would get no gradient, hence no optimiser state, and a sharded (FSDP2)
        # resume refuses a checkpoint missing the state of a parameter that requires grad
        if objective.c_value == 0:
            self.policy.value_head.requires_grad_(False)
        self._optimizer, self._scheduler = optimizer, scheduler
        self.temperature, self.grad_clip, self.max_bad_steps = temperature, grad_clip, max_bad_steps
        self.banned_token_ids = list(banned_token_ids or [])
        self.value_trunk_grad = bool(value_trunk_grad)
        self.bad_steps_in_row = 0
        self.skipped_steps = 0
        self.trained_tokens = 0

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        opt = self._optimizer([p for p in self.policy.parameters() if p.requires_grad])
        if self._scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self._scheduler(opt), "interval": "step"}}

    def forward_batch(self, batch: TrajectoryBatch) -> dict[str, torch.Tensor]:
        """Per-token log-probs, values and reference log-probs over the target positions (B, T)."""
        input_ids, attn = batch.input_ids, batch.attention_mask  # (B, L)
        kwargs: dict[str, Any] = {
            "temperature": self.temperature,
            "banned_ids": self.banned_token_ids,
            "chunk_tokens": self.logprob_chunk_tokens,
        }
        with self.precision.autocast(input_ids.device.type):
            logp, values = self.policy.score(
                input_ids, attn, detach_value_input=not self.value_trunk_grad, **kwargs
            )  # (B, T) fp32 each; V(s_t) at the position predicting a_t
            out = {"logp": logp, "values": values}
            if self.ref is not None:
                with torch.no_grad():
                    hidden, _ = final_hidden(self.ref, input_ids, attn)  # (B, L, H)
                    out["ref_logp"] = lm_target_logprobs(
                        self.ref, hidden[:, :-1], input_ids[:, 1:], **kwargs
                    )  # (B, T) fp32, as the policy's
        return out

    def compute_loss(self, batch: TrajectoryBatch) -> LossOutput:
        """The objective over ``batch`` in one forward pass (with the graph for a backward)."""
        fwd = self.forward_batch(batch)
        adv = batch.advantages  # (B, T); a row of NaN -> value baseline
        nan = torch.isnan(adv).any(dim=-1)  # (B,)
        if bool(nan.any()) and not bool(nan.all()):
            raise ValueError("a batch mixes trajectories with and without rollout advantages")
        return self.objective(
            logp=fwd["logp"],
            behaviour_logp=batch.behaviour_logp,
            ref_logp=fwd.get("ref_logp"),
            values=fwd["values"],
            old_values=fwd["values"].detach(),
            rewards=batch.rewards,
            advantages=None if bool(nan.all()) else adv,
            mask=batch.mask,
        )

    def backward_batch(
        self, batch: TrajectoryBatch, backward: Callable[[torch.Tensor], None] | None = None
    ) -> LossOutput:
        """Forward and backward over ``batch`` in micro-batches of ``micro_batch_size``
        trajectories (all at once when 0); the gradients accumulate into ``.grad`` and equal the
        whole batch's: each part's loss is weighted by its share of the batch's normaliser
        (:func:`~tsd.rl.losses.micro_batch_shares`). Returns the whole batch's loss and metrics,
        detached. Every part runs its backward even when its loss is not finite (under FSDP2 the
        backward is collective: every rank must run the same ones); the caller decides to step.
        ``backward``: how to backpropagate (default: Lightning's ``manual_backward`` when attached
        to a trainer, else ``Tensor.backward``)."""
        if backward is None:
            backward = self.manual_backward if self._trainer is not None else torch.Tensor.backward
        parts = batch.micro_batches(self.micro_batch_size)
        masks = [p.mask for p in parts]
        shares = micro_batch_shares(masks, self.objective.normalization)
        outs: list[LossOutput] = []
        for part, share in zip(parts, shares):
            out = self.compute_loss(part)
            backward(out.loss * share if len(parts) > 1 else out.loss)
            outs.append(LossOutput(loss=out.loss.detach(), metrics=out.metrics))
        if len(parts) == 1:
            return outs[0]
        return combine_micro_batches(outs, masks, self.objective.normalization)

    def _skip(self, why: str) -> None:
        self.bad_steps_in_row += 1
        self.skipped_steps += 1
        log.warning("skipping optimiser step %d: %s", self.global_step, why)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, batch_size=1)
        self.log("step", float(self.global_step), on_step=True, batch_size=1)  # no step was taken
        if self.bad_steps_in_row >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_steps_in_row} optimiser steps in a row had a non-finite loss or gradient "
                f"(module.max_bad_steps={self.max_bad_steps}); last: {why}. Lower the learning rate or "
                "check the rewards and behaviour log-probs."
            )

    def training_step(self, batch: TrajectoryBatch, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        out = self.backward_batch(batch)
        finite = bool(torch.isfinite(out.loss))
        if self._trainer is not None:  # sharded weights: every rank must skip or step together
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            opt.zero_grad(set_to_none=True)
            return self._skip(f"loss is {out.loss.item()} (here or on another rank)")
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # sharded (FSDP2) gradients: the norm is a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            opt.zero_grad(set_to_none=True)
            return self._skip(f"gradient norm is {grad_norm.item()}")
        opt.step()
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()
        self.bad_steps_in_row = 0

        mask = batch.mask
        B = mask.shape[0]
        self.trained_tokens += int(mask.sum().item())
        metrics: dict[str, torch.Tensor | float] = {
            "train/loss": out.loss,
            **{f"train/{k}": v for k, v in out.metrics.items()},
            "train/reward": batch.rewards.mean(),
            "train/correct": batch.correct.mean(),
            # optimiser steps between the weights that generated each trajectory and these
            "train/policy_lag": batch.lags.float().mean(),
            "train/grad_norm": grad_norm.detach(),
            "train/lr": torch.tensor(opt.param_groups[0]["lr"]),
            "train/completion_tokens_mean": mask.sum(1).mean(),
            "compute/trained_tokens": float(self.trained_tokens),
        }
        metrics.update({k: float(v) for k, v in batch.stats.items()})
        # the row's step is the optimiser step just taken, as the evaluation rows' (the weights after
        # step s); Lightning's own would be the batch count before it, one less
        metrics["step"] = float(self.global_step)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=B)
        self.log("reward", batch.rewards.mean(), prog_bar=True, logger=False, batch_size=B)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tsd"] = {
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "trained_tokens": self.trained_tokens,
            "skipped_steps": self.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("tsd")
        if state:
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["python_rng"])
            self.trained_tokens = int(state["trained_tokens"])
            self.skipped_steps = int(state["skipped_steps"])
