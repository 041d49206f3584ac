"""ExportPolicy: at the end, the trained policy as a transformers directory + value head + tokenizer,
loadable by ``eval.py model.name_or_path=DIR`` (and by vLLM, which reads the LM-only top level)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


class ExportPolicy(L.Callback):
    def __init__(self, dirpath: str, tokenizer=None) -> None:
        """Writes ``dirpath`` (transformers ``save_pretrained`` + ``value_head/`` +
        tokenizer) at the end of training, loadable by ``eval.py model.name_or_path=DIR``."""
        self.dirpath = Path(dirpath)
        self.tokenizer = tokenizer

    def on_train_end(self, trainer, pl_module) -> None:
        # sharded: every trainer rank takes part in gathering; rank 0 gets the full policy
        policy = trainer.strategy.full_policy(pl_module)
        if policy is None or not trainer.is_global_zero:
            return
        policy.save_pretrained(self.dirpath)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self.dirpath)
        (self.dirpath / "tsd_export.json").write_text(
            json.dumps({"global_step": trainer.global_step, "torch": torch.__version__}, indent=1)
        )
        log.info("exported policy to %s", self.dirpath)
