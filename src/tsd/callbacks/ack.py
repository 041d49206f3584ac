"""AckAfterStep: acknowledge a batch's buffer entries once the optimiser step that used them has
completed, so that a crash before the step loses nothing (the buffer hands them to another
consumer; :mod:`tsd.buffers.base`)."""

from __future__ import annotations

import lightning as L


class AckAfterStep(L.Callback):
    """Always on: ``train.py`` adds it (it is part of the data flow, not an option)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.datamodule.ack(batch.buffer_ids)
