"""StepProgressBar in a real Lightning fit over an iterable of unknown length with ``max_epochs``
unset, as ``train.py`` streams: the bar reads ``step: s/max_steps`` (Lightning's read ``Epoch
0/-2``) and a resumed fit starts at its checkpoint's step."""

from __future__ import annotations

import re

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
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()  # (B, 1) -> ()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=4)


def fit(tmp_path, max_steps: int, ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_model_summary=False,
        callbacks=[StepProgressBar()], default_root_dir=tmp_path, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(Regression(), ckpt_path=ckpt_path)
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
