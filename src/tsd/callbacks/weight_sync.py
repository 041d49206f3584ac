"""WeightSync: moves the policy clock after every optimiser step and, every ``data.sync_every``
steps, publishes the trained weights to the generation (the seed article: every 8 gradient steps).

What publishing is depends on where generation runs (:mod:`tsd.generation`): a copy into the
in-process generator, or a gather of the FSDP2 shards and a broadcast to the generator ranks. The
version published is the optimiser step the weights are of (:mod:`tsd.data.policy_clock`).
Logged: ``perf/weight_sync_seconds`` (and, from the remote generation, the gather and broadcast
times and the megabytes sent).
"""

from __future__ import annotations

import time

import lightning as L


class WeightSync(L.Callback):
    """Always on: ``train.py`` adds it (it is part of the data flow, not an option)."""

    def on_train_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        dm.clock.advance(trainer.global_step)
        # resumed: the generators hold the initial weights (or, in process, whatever the checkpoint
        # restored); give them the trained ones, under the step they are the weights of
        if trainer.global_step > 0 and not dm.generation.holds(dm.clock.published):
            dm.generation.publish(trainer, pl_module, trainer.global_step)
            dm.clock.publish(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        dm.clock.advance(trainer.global_step)
        if not dm.clock.due():
            return
        t0 = time.perf_counter()
        metrics = dm.generation.publish(trainer, pl_module, trainer.global_step)
        dm.clock.publish(trainer.global_step)
        metrics["perf/weight_sync_seconds"] = time.perf_counter() - t0
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
