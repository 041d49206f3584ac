"""LocalGeneration: rollouts in the training process, on a generator copy of the policy.

    python train.py                                   # generation=local (strategy=single)

The copy is made at the start of training (from the weights being trained: the initial ones, or a
checkpoint's once it is restored, see :meth:`LocalGeneration.publish`), frozen, and refreshed only
when the weights are published, every ``data.sync_every`` optimiser steps; between two
publications it samples with the older weights, so the policy lag of the laptop run is the one of
the distributed setup (:mod:`tsd.data.policy_clock`). The DataModule calls :meth:`refill` when the
buffer cannot fill a batch, and does so only when that batch is about to be trained, after the
publication of the step before: ``sync_every = 1`` is on-policy.

One process: several devices without the generator split are refused with one line
(:class:`~tsd.distributed.single.SingleProcessStrategy`, and :meth:`attach` here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from tsd.config import ConfigError, require
from tsd.generation.base import Generation
from tsd.generation.worker import RolloutWorker
from tsd.models.precision import Precision
from tsd.rl.trajectory import Trajectory


class LocalGeneration(Generation):
    reads_ahead = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The arguments of :class:`~tsd.generation.base.Generation`."""
        super().__init__(*args, **kwargs)
        self.worker: RolloutWorker | None = None
        self._copy: nn.Module | None = None
        self._precision = Precision()
        self._trainer: Any = None
        #: the version of the copy's weights a checkpoint restored (None: it carried none)
        self._restored_version: int | None = None

    # ------------------------------------------------------------------ before fit
    def attach(self, trainer: Any) -> None:
        from tsd.distributed.strategy import GeneratorTrainerStrategy

        if isinstance(trainer.strategy, GeneratorTrainerStrategy):
            raise ConfigError(
                "generation: local runs the rollouts in the training process, but strategy=generator_trainer "
                "gives them to its generator ranks (accepted with it: generation=remote, its default)"
            )
        require(
            trainer.world_size == 1,
            "trainer.devices",
            "1 device x 1 node (the in-process generation is one process; split the ranks with "
            "strategy=generator_trainer)",
            trainer.world_size,
        )

    # ------------------------------------------------------------------ during fit
    def setup(self, trainer: Any) -> None:
        """The generator copy of the policy being trained and its sampler, on the trainer's device."""
        self._trainer = trainer
        module = trainer.lightning_module
        self.start(module.policy, trainer.strategy.root_device, module.precision)

    def start(self, policy: nn.Module, device: Any = "cpu", precision: Precision | None = None) -> None:
        """Make the generator copy of ``policy`` (frozen, in ``precision``'s compute dtypes: the
        LM in ``model.dtype``, the value head in fp32) and its sampler and worker on ``device``
        (what :meth:`setup` does with the trainer's policy, device and precision; once)."""
        if self.worker is not None:
            return
        self._precision = precision or Precision()
        self._copy = self._precision.compute_copy(policy)
        sampler = self.make_sampler(
            self._copy, self.tokenizer, device=device, seed=self.sampler_seed(self.seed, 0)
        )
        self.worker = RolloutWorker(
            self.rollout, sampler, self.env, self.buffer, self.problems_per_rollout, seed=self.seed
        )

    def _worker(self) -> RolloutWorker:
        if self.worker is None:
            raise RuntimeError("LocalGeneration: setup() was not called (the DataModule's setup does it)")
        return self.worker

    def refill(self) -> bool:
        self._worker().produce()
        return True

    def publish(self, trainer: Any, pl_module: Any, version: int) -> dict[str, float]:
        """Publishing is a copy: the trained weights, in the compute dtypes, into the generator
        copy, as ``version``."""
        self._worker().load_weights(self._precision.compute_state(pl_module.policy.state_dict()), version)
        return {}

    def holds(self, version: int) -> bool:
        """After a resume: the copy holds ``version`` if the checkpoint carried its weights."""
        return self._restored_version == version

    def batch_stats(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        w = self._worker()
        return {
            **w.last_stats,
            "compute/generated_tokens": float(w.generated_tokens),
            "compute/prefill_tokens": float(w.prefill_tokens),
            "rollout/version": float(w.version),
        }

    def generated_tokens(self) -> int:
        return self.worker.generated_tokens if self.worker is not None else 0

    def prefill_tokens(self) -> int:
        return self.worker.prefill_tokens if self.worker is not None else 0

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The problem stream, the sampler's random state and the counters; and the copy's weights
        when they are not the trained ones (a checkpoint between two publications), so that a
        resumed run samples with exactly the weights the uninterrupted one would have."""
        w = self._worker()
        state: dict[str, Any] = {"worker": w.state_dict()}
        step = self._trainer.global_step if self._trainer is not None else None
        if step is not None and w.version != step:
            assert self._copy is not None
            state["weights"] = {k: v.detach().clone() for k, v in self._copy.state_dict().items()}
            state["weights_version"] = w.version
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._worker().load_state_dict(state["worker"])
        if state.get("weights") is not None:
            self._restored_version = int(state["weights_version"])
            self._worker().load_weights(state["weights"], self._restored_version)
