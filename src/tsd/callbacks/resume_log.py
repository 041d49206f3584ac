"""The CSV log of a resumed run reads as one run: every step once, every evaluation once.

Without this, a resume into the same run directory lost the steps before the checkpoint
(Lightning's CSV writer deletes ``metrics.csv`` when it starts), and a resume into a new
directory started its log at the checkpoint. With :class:`ResumeLog` the resumed run's
``csv/metrics.csv`` holds the rows the checkpointed run logged *before its checkpoint*, then its
own, in both cases:

- every row's step is the optimiser step whose weights it describes: the train row of step ``s``
  (:class:`~tsd.module.PolicyValueModule` logs it with ``step = s``, Lightning's own count would
  be ``s - 1``) and the evaluation after step ``s``;
- at a checkpoint (step ``s``), the callback flushes the CSV loggers and records, in the
  checkpoint, where the file is and how many evaluation rows were logged at step ``s`` so far (the
  evaluation at ``s`` runs before the checkpoint; the final evaluation of a run that ends at ``s``
  runs after it and does not belong to a run that goes on);
- on resume it reads that file when it is built (``train.py`` builds it before ``trainer.fit``;
  Lightning's CSV writer deletes a ``metrics.csv`` it finds in its directory when fit starts,
  which is this very file on a same-directory resume) and keeps the rows with a step below ``s``,
  the train row of step ``s`` (the checkpoint holds that step; the row is written just after the
  checkpoint) and those first evaluation rows at ``s``; once training starts they are put ahead
  of the run's own rows. A checkpoint written before rows had this step (its bookkeeping says
  ``rows_at_step``) is read by the old rule, and its train rows are moved up one step.

:class:`~tsd.callbacks.MeanAtKEval` does its part: a resumed run does not evaluate again at the
step it resumes from. A missing old file (the checkpoint moved to another machine) is logged as
a warning and the log starts at the checkpoint.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"


def _csv_loggers(trainer: L.Trainer) -> list[CSVLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]


def _step(row: dict[str, str]) -> int:
    try:
        return int(float(row.get("step") or -1))
    except ValueError:
        return -1


def _is_eval(row: dict[str, str]) -> bool:
    return any(k.startswith("eval/") and v not in ("", None) for k, v in row.items())


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class ResumeLog(L.Callback):
    def __init__(self, ckpt_path: str | None = None) -> None:
        """
        Args:
            ckpt_path: the checkpoint this run resumes from (``${ckpt_path}``), or None for a new
                run. Its log is read here, before ``trainer.fit`` starts the CSV writer.
        """
        self.ckpt_path = ckpt_path
        self._trainer: L.Trainer | None = None
        #: rows to put ahead of this run's own, one list per CSV logger (in trainer.loggers order)
        self._carry = self._rows_before(ckpt_path) if ckpt_path else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    # ------------------------------------------------------------------ at a checkpoint
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.is_global_zero:
            return {}
        step = trainer.global_step
        files = []
        for lg in _csv_loggers(trainer):
            lg.save()  # flush: the file then holds every row logged so far
            path = Path(lg.log_dir) / METRICS_FILE
            rows = _read_rows(path) if path.is_file() else []
            evals = sum(_step(r) == step and _is_eval(r) for r in rows)
            files.append({"path": str(path.resolve()), "evals_at_step": evals})
        return {"step": step, "files": files}

    def _rows_before(self, ckpt_path: str) -> list[list[dict[str, str]]] | None:
        import torch

        state = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        mine = (state.get("callbacks") or {}).get(self.state_key) or {}
        step = mine.get("step")
        if step is None:
            log.warning("resume: %s has no log bookkeeping; the CSV log starts at the checkpoint", ckpt_path)
            return None
        carry: list[list[dict[str, str]]] = []
        for entry in mine.get("files", []):
            path = Path(entry["path"])
            if not path.is_file():
                log.warning("resume: %s is gone; the CSV log of this run starts at step %d", path, step)
                carry.append([])
                continue
            kept = []
            if "evals_at_step" in entry:
                evals = int(entry["evals_at_step"])
                for row in _read_rows(path):
                    s = _step(row)
                    if s < step or (s == step and not _is_eval(row)) or (s == step and evals > 0):
                        kept.append(row)
                        evals -= s == step and _is_eval(row)
            else:  # written when a train row's step was the one before its optimiser step
                at_step = int(entry["rows_at_step"])
                for row in _read_rows(path):
                    s = _step(row)
                    if s < step or (s == step and at_step > 0):
                        at_step -= s == step
                        if not _is_eval(row):
                            row = {**row, "step": str(s + 1)}
                        kept.append(row)
            log.info(
                "resume: the log keeps %d rows of %s (before the checkpoint at step %d)",
                len(kept),
                path,
                step,
            )
            carry.append(kept)
        return carry

    # ------------------------------------------------------------------ on resume
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._carry or not trainer.is_global_zero:
            return
        for lg, rows in zip(_csv_loggers(trainer), self._carry):
            writer = lg.experiment
            if os.path.isfile(writer.metrics_file_path):  # this run wrote nothing yet: start it anew
                os.remove(writer.metrics_file_path)
            writer.metrics = [*rows, *writer.metrics]
            writer.metrics_keys = []
            lg.save()
        self._carry = None
