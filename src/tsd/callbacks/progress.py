"""StepProgressBar: the training progress bar counts optimiser steps out of ``trainer.max_steps``,
and log lines print above it instead of into it."""

from __future__ import annotations

import contextlib
import sys

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimiser steps: ``step:  40%|####  | 80/200 [...]``.

    Lightning's own bar counts the batches of an epoch. A run here is one epoch of a stream of
    unknown length that ``max_steps`` ends (``max_epochs`` unset, so -1), and the default bar read
    ``Epoch 0/-2``. This one shows ``trainer.global_step`` out of ``max_steps`` (a bare count when
    that is unset), starts where a resumed run starts (its rate counts this run's steps only), and
    keeps the progress-bar metrics. ``train.py`` adds it when ``trainer.enable_progress_bar`` is on.

    While the bar is drawn, the root logger's console handlers write through ``tqdm.write``
    (tqdm's ``logging_redirect_tqdm``): a log line (the log line callback's, an evaluation's) clears
    the bar, prints on a line of its own and the bar is redrawn below it; the log file is untouched.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._redirect: contextlib.ExitStack | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if not self.is_disabled and self._redirect is None:
            self._redirect = contextlib.ExitStack()
            self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=Tqdm))

    def _restore_logging(self) -> None:
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_logging()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_logging()
        super().on_exception(trainer, pl_module, exception)

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        return Tqdm(
            desc="step",
            initial=trainer.global_step,  # a resumed run's checkpoint step
            total=trainer.max_steps if trainer.max_steps > 0 else None,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer, *_) -> None:
        # one bar for the run (Lightning's starts a bar, or resets it, every epoch)
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
