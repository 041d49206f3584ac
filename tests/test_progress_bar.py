"""StepProgressBar in a real Lightning fit over an iterable of unknown length with ``max_epochs``
unset, as ``train.py`` streams: the bar reads ``step: s/max_steps`` (Lightning's read ``Epoch
0/-2``) and a resumed fit starts at its checkpoint's step."""

from __future__ import annotations

import logging
import re
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from tsd.callbacks import StepProgressBar


class Stream(IterableDataset):
    """An endless stream of (2,) inputs: no ``__len__``, like the trajectory stream."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(2, generator=g)


class Regression(L.LightningModule):
    def __init__(self, log_every: int = 0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.log_every = log_every

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()  # (B, 1) -> ()
        self.log("train/loss", loss, prog_bar=True)
        if self.log_every and batch_idx % self.log_every == 0:
            logging.getLogger("tsd.test").info("LOGLINE step %d", batch_idx)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=4)


def fit(tmp_path, max_steps: int, ckpt_path=None, log_every: int = 0) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_model_summary=False,
        callbacks=[StepProgressBar()], default_root_dir=tmp_path, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(Regression(log_every), ckpt_path=ckpt_path)
    return trainer


def last_frame(out: str) -> str:
    """The bar as it was last drawn (tqdm redraws it after a carriage return)."""
    return [f for f in re.split(r"[\r\n]", out) if f.strip()][-1]


def test_the_bar_counts_optimiser_steps_out_of_max_steps(tmp_path, capsys):
    trainer = fit(tmp_path, max_steps=5)
    out = capsys.readouterr().out
    assert trainer.max_epochs == -1 and trainer.global_step == 5  # the case Lightning's bar got wrong
    frame = last_frame(out)
    assert frame.startswith("step: 100%") and " 5/5 " in frame and "train/loss=" in frame, frame
    assert "Epoch" not in out and "/-" not in out
    trainer.save_checkpoint(tmp_path / "step5.ckpt")

    resumed = fit(tmp_path, max_steps=8, ckpt_path=tmp_path / "step5.ckpt")
    out = capsys.readouterr().out
    assert resumed.global_step == 8
    frames = [f for f in re.split(r"[\r\n]", out) if f.startswith("step:")]
    assert " 5/8 " in frames[0] and " 8/8 " in frames[-1], frames  # from the checkpoint's step on
    assert not any(" 1/8 " in f for f in frames)


def test_log_lines_print_above_the_bar_not_into_it(tmp_path, capsys):
    """A console log handler on stdout (as Hydra's), lines logged during the fit: each starts a
    line of its own (the bar is cleared, the line written, the bar redrawn); without the redirect
    they were appended to the bar's line (``step:  40%|...| 2/5 [...][..] LOGLINE``)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stdout)  # the captured stdout
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        fit(tmp_path, max_steps=6, log_every=2)
        assert handler in root.handlers  # the redirect gave the console handler back at the end
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    out = capsys.readouterr().out
    lines = [ln for ln in out.split("\n") if "LOGLINE" in ln]
    assert len(lines) == 3, out
    for ln in lines:  # what the terminal shows of that line: the text after its last carriage return
        assert ln.rsplit("\r", 1)[-1].startswith("[tsd.test] LOGLINE"), repr(ln)
