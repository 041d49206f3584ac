"""SingleProcessStrategy: one process generates and trains (``strategy=single``, the default).

    python train.py                                  # CPU, or trainer=gpu for one GPU

Lightning's single-device strategy, plus what the loop asks of every tsd strategy:
:meth:`full_policy` (the policy evaluation and export read: here the one being trained, or its copy
in ``model.dtype`` when that is not fp32).
The in-process generation (:class:`~tsd.generation.local.LocalGeneration`) is one process, so
several devices are refused with one line before anything is loaded: without the generator split
they would run identical copies of the same generation (same problems, same sampler seed).
``strategy=generator_trainer`` is the way to use several devices.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from tsd.checkpoint_io import AtomicCheckpointDefault
from tsd.config import require


class SingleProcessStrategy(AtomicCheckpointDefault, SingleDeviceStrategy):  # type: ignore[misc]
    """Lightning's single-device strategy; checkpoints are written atomically (:mod:`tsd.checkpoint_io`)."""

    def __init__(
        self,
        accelerator: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
    ) -> None:
        """
        Args:
            accelerator, checkpoint_io, precision_plugin: set by Lightning from ``trainer.*``.
        """
        super().__init__(
            device="cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        #: the devices ``trainer.devices`` asks for (Lightning fills it in); the first is used
        self.parallel_devices: list[torch.device] | None = None
        self.num_nodes = 1
        self._compute_copy: nn.Module | None = None
        self._copied_step = -1

    def _configure_launcher(self) -> None:
        # Lightning has filled in parallel_devices and num_nodes from trainer.devices / num_nodes
        devices = len(self.parallel_devices or [self.root_device])
        require(
            devices * self.num_nodes == 1,
            "trainer.devices",
            "1 device on 1 node with strategy=single (one process generates and trains; several devices "
            "would run identical copies): use strategy=generator_trainer to split the ranks into generators "
            "and trainers",
            f"{devices} device(s) x {self.num_nodes} node(s)",
        )
        if self.parallel_devices:
            self._root_device = torch.device(self.parallel_devices[0])
        super()._configure_launcher()

    def full_policy(self, pl_module: Any) -> nn.Module:
        """The policy in its compute dtypes (what evaluation samples with and export saves): the
        policy being trained itself when it computes in fp32 (the laptop default); else a frozen
        copy in ``model.dtype`` (the value head fp32), refreshed from the fp32 masters once per
        optimiser step (:class:`~tsd.models.precision.Precision`)."""
        precision = pl_module.precision
        if not precision.mixed:
            return pl_module.policy
        step = pl_module.trainer.global_step
        if self._compute_copy is None:
            self._compute_copy = precision.compute_copy(pl_module.policy)
        elif step != self._copied_step:
            self._compute_copy.load_state_dict(pl_module.policy.state_dict())  # cast on copy
        self._copied_step = step
        return self._compute_copy
