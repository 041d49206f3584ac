"""Checkpoints that a kill cannot truncate: written to a temporary file next to the checkpoint,
flushed to disk, then renamed over it.

    python train.py callbacks.checkpoint.every_n_train_steps=1     # a save every step, safe to kill -9

Lightning's default (``TorchCheckpointIO``) serialises into memory, writes it to a temporary file
in the system's temp directory (``/tmp``) and moves it to the checkpoint path. When ``/tmp`` is on
another file system than the run (a tmpfs, a local disk under an NFS or Lustre run directory) the
move is a copy *into* ``last.ckpt``: a kill during the copy leaves a truncated ``last.ckpt``, and
the resume is refused. It never fsyncs, so a crash of the machine can leave an empty file even when
the rename was atomic, and every kill during a write leaves a checkpoint-sized file in ``/tmp``.

:class:`AtomicCheckpointIO` writes ``.<name>.<pid>.tmp`` in the checkpoint's own directory
(streamed by ``torch.save``, no second copy in memory), fsyncs it, renames it over ``<name>``
(``os.replace``: atomic on POSIX within one file system) and fsyncs the directory, so the
checkpoint path always holds either the previous checkpoint or the new one, whole. A temporary
file a killed writer left behind is removed at the next save of the same checkpoint.

Both strategies use it unless another ``CheckpointIO`` is given (``trainer.plugins``):
:class:`~tsd.distributed.single.SingleProcessStrategy` and
:class:`~tsd.distributed.strategy.GeneratorTrainerStrategy` take :class:`AtomicCheckpointDefault`. The distributed checkpoint is the
same file: the trainers gather the full (unsharded) model and optimiser state onto rank 0, which
alone writes it through this class; there is no sharded checkpoint directory to keep consistent.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from tsd.fileio import write_atomic

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose saves are atomic and durable (:func:`write_atomic`);
    loading and removing are Lightning's. A remote path (``s3://...``) keeps Lightning's own save."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or _URL.match(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomic(path, lambda f: torch.save(checkpoint, f))


class AtomicCheckpointDefault:
    """For a Lightning strategy: :class:`AtomicCheckpointIO` where Lightning's strategies default to
    ``TorchCheckpointIO``; a ``CheckpointIO`` given in ``trainer.plugins`` still wins (the
    strategy's own constructor argument would make Lightning refuse one given there)."""

    _checkpoint_io: CheckpointIO | None

    @property
    def checkpoint_io(self) -> CheckpointIO:
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        elif isinstance(self._checkpoint_io, _WrappingCheckpointIO):  # e.g. AsyncCheckpointIO
            self._checkpoint_io.checkpoint_io = AtomicCheckpointIO()  # only if it wraps nothing yet
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO | None) -> None:
        self._checkpoint_io = io
