"""ExportPolicy: at the end, the trained policy as a transformers directory + value head + tokenizer,
loadable by ``eval.py model.name_or_path=DIR`` (and by vLLM, which reads the LM-only top level);
under a plateau rule (``stop=plateau``) also the validation-best policy, from its checkpoint."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import lightning as L
import torch

from tsd.callbacks.stopping import best_checkpoint
from tsd.config import check_int

log = logging.getLogger(__name__)


class ExportPolicy(L.Callback):
    def __init__(
        self, dirpath: str, tokenizer=None, every_n_steps: int = 0, best_dirpath: str | None = None
    ) -> None:
        """Writes ``dirpath`` (transformers ``save_pretrained`` + ``value_head/`` +
        tokenizer) at the end of training, loadable by ``eval.py model.name_or_path=DIR``; with
        ``every_n_steps`` > 0 also ``<dirpath>_step<N>`` every N optimiser steps (a curve of
        policies to evaluate later: e.g. a baseline at the generated tokens of another run); with
        ``best_dirpath``, the weights of the run's validation-best checkpoint
        (:class:`~tsd.callbacks.stopping.BestCheckpoint`) there too, when it kept one."""
        self.dirpath = Path(dirpath)
        self.best_dirpath = Path(best_dirpath) if best_dirpath else None
        self.tokenizer = tokenizer
        self.every_n_steps = check_int(every_n_steps, "callbacks.export.every_n_steps", low=0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._export(trainer, pl_module, self.dirpath.with_name(f"{self.dirpath.name}_step{step}"))

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module, self.dirpath)
        best = best_checkpoint(trainer) if self.best_dirpath is not None else None
        if best is not None:
            assert self.best_dirpath is not None
            self._export(trainer, pl_module, self.best_dirpath, checkpoint=Path(best.best_model_path))

    def _export(self, trainer, pl_module, dirpath: Path, checkpoint: Path | None = None) -> None:
        """The current policy to ``dirpath``; or, with ``checkpoint``, the policy weights it holds."""
        # sharded: every trainer rank takes part in gathering; rank 0 gets the full policy
        policy = trainer.strategy.full_policy(pl_module)
        if policy is None or not trainer.is_global_zero:
            return
        info: dict = {"global_step": trainer.global_step, "torch": torch.__version__}
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
            weights = {
                k[len("policy.") :]: v for k, v in state["state_dict"].items() if k.startswith("policy.")
            }
            policy = copy.deepcopy(policy)
            policy.load_state_dict(weights)
            info = {**info, "global_step": int(state["global_step"]), "checkpoint": str(checkpoint)}
        policy.save_pretrained(dirpath)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(dirpath)
        (dirpath / "tsd_export.json").write_text(json.dumps(info, indent=1))
        log.info("exported policy (step %d) to %s", info["global_step"], dirpath)
