"""LogRunConfig: the resolved config and the run's identity to every logger, at fit start."""

from __future__ import annotations

from typing import Any

import lightning as L


class LogRunConfig(L.Callback):
    def __init__(self, params: dict[str, Any]) -> None:
        """Gives every logger ``params`` (the resolved config and the run's identity,
        :func:`tsd.loggers.run_info.logged_config`) through ``log_hyperparams`` at fit start: in the
        process that trains on rank 0, never in a parent that forks the ranks (a W&B run must be
        started where it is used)."""
        self.params = params

    def on_fit_start(self, trainer, pl_module) -> None:
        for lg in trainer.loggers:
            lg.log_hyperparams(self.params)
