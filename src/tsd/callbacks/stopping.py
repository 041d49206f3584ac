"""Training to a plateau: stop when the validation score stops improving, or at a token budget,
and keep the validation-best weights (``stop=plateau``; the article trains every method "until
its evaluation stopped improving").

    python train.py experiment=cispo_countdown stop=plateau
    python train.py experiment=tree_countdown stop=plateau callbacks.early_stop.patience=6

Three Lightning callbacks, each the stock one where it fits:

- :class:`PlateauStop` is Lightning's ``EarlyStopping`` on ``val/mean@16`` (the validation
  evaluator, :class:`~tsd.callbacks.mean_at_k.MeanAtKEval` with ``prefix: val``, puts it in
  ``trainer.callback_metrics``): stop when the score has not risen by more than ``min_delta`` for
  ``patience`` evaluations. The only change is *when* it checks: after each new evaluation (there
  is no validation loop and one endless epoch), not at the end of a validation loop or an epoch.
- :class:`BestCheckpoint` is Lightning's ``ModelCheckpoint(monitor=..., save_top_k=1)``, checked
  only at the step of a new evaluation, so the checkpoint always holds the weights the score was
  measured on. :class:`~tsd.callbacks.export.ExportPolicy` exports those weights at the end
  (``policy_best/``).
- :class:`TokenBudget` stops once the run has generated ``max_generated_tokens`` (the compute
  axis methods are compared on).
- :class:`LastCheckpoint` is the run's periodic ``ModelCheckpoint(save_last=True)`` (every run
  has it: ``callbacks.checkpoint``), which also saves ``last.ckpt`` at the step a stop rule or
  the step cap ends the run: a stopped run goes on exactly from where it stopped when a later
  command raises its budget (the plateau study raising its cap), not from up to N-1 steps before.

Every state they keep (best score, patience left, best checkpoint) is in Lightning's checkpoint,
so a resumed run stops where an uninterrupted one would. Why a run stopped is its
``stop_reason`` (:func:`stop_reason`), which ``train.py`` writes into ``results.json``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from tsd.config import check_int, check_number, require

log = logging.getLogger(__name__)


def _eval_step_key(monitor: str) -> str:
    """``val/mean@16`` -> ``val/step``: where the evaluator records the step it last evaluated."""
    prefix, sep, _ = monitor.rpartition("/")
    require(bool(sep), "monitor", "an evaluator's metric such as val/mean@16", monitor)
    return f"{prefix}/step"


def _fresh_eval_step(trainer: Any, monitor: str) -> int | None:
    """The current step if the evaluator measured ``monitor`` at it, else None."""
    at = trainer.callback_metrics.get(_eval_step_key(monitor))
    if at is None or int(at) != trainer.global_step:
        return None
    return trainer.global_step


class PlateauStop(EarlyStopping):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    consecutive evaluations (Lightning's ``EarlyStopping``, checked once per evaluation)."""

    def __init__(
        self, monitor: str = "val/mean@16", min_delta: float = 0.0, patience: int = 4, mode: str = "max"
    ) -> None:
        """
        Args:
            monitor: the evaluator's metric (``<prefix>/mean@<k>``), in ``trainer.callback_metrics``.
            min_delta: an evaluation improves only if it beats the best by more than this (in the
                metric's units: mean@16 is a fraction, 0.0025 = a quarter of a point), >= 0.
            patience: evaluations without improvement before the run stops, >= 1.
            mode: ``max`` (a score) or ``min`` (a loss).
        """
        check_number(min_delta, "callbacks.early_stop.min_delta", low=0)
        check_int(patience, "callbacks.early_stop.patience", low=1)
        _eval_step_key(monitor)
        super().__init__(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,
            mode=mode,
            strict=True,
            check_finite=True,
            check_on_train_epoch_end=False,
            verbose=True,
        )
        self._checked_step = -1

    @property
    def stop_reason(self) -> str | None:
        if not self.stopping_reason_message:
            return None
        return (
            f"plateau: {self.monitor} did not improve by more than {self.min_delta:g} for "
            f"{self.patience} evaluations (best {float(self.best_score):.4f})"
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = _fresh_eval_step(trainer, self.monitor)
        if step is None or step == self._checked_step:
            return
        self._checked_step = step
        self._run_early_stopping_check(trainer)

    # no validation loop runs, and the one epoch never ends: the check is the one above
    def on_validation_end(self, trainer, pl_module) -> None:
        return

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        return

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "checked_step": self._checked_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._checked_step = int(state_dict.get("checked_step", -1))


class BestCheckpoint(ModelCheckpoint):
    """The validation-best weights: ``ModelCheckpoint(monitor=..., save_top_k=1)`` saved only at
    the step of a new evaluation (in between, the metric in ``callback_metrics`` describes older
    weights). Weights only: it is an export source, not a resume point (``last.ckpt`` is)."""

    def __init__(
        self,
        dirpath: str,
        monitor: str = "val/mean@16",
        mode: str = "max",
        filename: str = "best-{step}",
    ) -> None:
        _eval_step_key(monitor)
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_last=False,
            save_weights_only=True,
            every_n_train_steps=1,
        )

        #: the step of the best evaluation and the run's generated tokens then (None: none yet)
        self.best_step: int | None = None
        self.best_generated_tokens: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None or _fresh_eval_step(trainer, self.monitor) is None:
            return
        before = self.best_model_path
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.best_model_path != before:
            self.best_step = trainer.global_step
            self.best_generated_tokens = int(trainer.datamodule.generation.generated_tokens())

    def summary(self) -> dict[str, Any]:
        """What ``results.json`` records of the best evaluation."""
        return {
            "metric": self.monitor,
            "score": None if self.best_model_score is None else float(self.best_model_score),
            "step": self.best_step,
            "generated_tokens": self.best_generated_tokens,
            "checkpoint": self.best_model_path,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "best_step": self.best_step,
            "best_tokens": self.best_generated_tokens,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resume in the same run directory restores everything (Lightning's own rule). A resume
        into a new directory, which Lightning would start from no best at all, copies the best
        checkpoint there and keeps its score, so the rule compares with the same best and the new
        run directory holds its own best (the old one is never touched)."""
        old_dir = state_dict.get("dirpath", self.dirpath)
        src = Path(state_dict.get("best_model_path") or "")
        if old_dir != self.dirpath and src.is_file() and self.dirpath:
            dst = Path(self.dirpath) / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            score = state_dict["best_model_score"]
            state_dict = {**state_dict, "dirpath": self.dirpath, "best_model_path": str(dst),
                          "best_k_models": {str(dst): score}, "kth_best_model_path": str(dst), "kth_value": score,
                          "last_model_path": ""}  # fmt: skip
        super().load_state_dict(state_dict)
        self.best_step = state_dict.get("best_step")
        self.best_generated_tokens = state_dict.get("best_tokens")


class TokenBudget(L.Callback):
    """Stop once the run has generated ``max_generated_tokens`` tokens (``compute/generated_tokens``)."""

    def __init__(self, max_generated_tokens: int) -> None:
        """
        Args:
            max_generated_tokens: the run's budget of generated tokens, >= 1; checked after each
                optimiser step (a step that crosses it is the last).
        """
        self.max_tokens = check_int(
            max_generated_tokens, "callbacks.token_budget.max_generated_tokens", low=1
        )
        self.stop_reason: str | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        gen = trainer.strategy.broadcast(int(trainer.datamodule.generation.generated_tokens()), src=0)
        if gen >= self.max_tokens and not trainer.should_stop:
            trainer.should_stop = True
            self.stop_reason = f"token budget: {gen:,} generated tokens >= {self.max_tokens:,}"
            log.info("stopping at step %d: %s", trainer.global_step, self.stop_reason)


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (``last.ckpt`` every ``every_n_train_steps``), plus a
    ``last.ckpt`` at the step the run ends by a stop rule (``trainer.should_stop``) or the step cap.
    Saved from the same hook as the periodic one, so it resumes the same way."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        ending = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        if ending and self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def stop_reason(trainer: Any) -> str:
    """Why the run ended: the first stop rule that fired, else the step cap."""
    for cb in trainer.callbacks:
        if isinstance(cb, (PlateauStop, TokenBudget)) and cb.stop_reason:
            return cb.stop_reason
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return f"max_steps: {trainer.global_step} optimiser steps"
    return f"stopped at step {trainer.global_step}"


def best_checkpoint(trainer: Any) -> BestCheckpoint | None:
    """The run's validation-best checkpoint callback, when it saved one."""
    for cb in trainer.callbacks:
        if isinstance(cb, BestCheckpoint) and cb.best_model_path:
            return cb
    return None
