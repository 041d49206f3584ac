"""LogLine: a plain log line every n optimiser steps."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

from tsd.config import check_int

log = logging.getLogger(__name__)


class LogLine(L.Callback):
    def __init__(self, every_n_steps: int = 10) -> None:
        """One plain log line every ``every_n_steps`` optimiser steps (readable in CI logs and files,
        where a progress bar is not)."""
        self.every = check_int(every_n_steps, "callbacks.log_line.every_n_steps", low=1)
        self.t0 = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or not trainer.is_global_zero:
            return
        m = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if isinstance(v, (int, float, torch.Tensor))
        }
        log.info(
            "step %d/%s | loss %.4f | reward %.3f | correct %.3f | kl %.4f | lag %.2f | gen tok %d | %.0fs",
            step,
            trainer.max_steps,
            m.get("train/loss", float("nan")),
            m.get("train/reward", float("nan")),
            m.get("train/correct", float("nan")),
            m.get("train/kl", float("nan")),
            m.get("train/policy_lag", float("nan")),
            int(m.get("compute/generated_tokens", 0)),
            time.perf_counter() - self.t0,
        )
