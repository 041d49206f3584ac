"""A checkpoint is never half written: ``tsd.checkpoint_io`` writes a temporary file next to it,
fsyncs it and renames it over the old one. Unit checks of that discipline, then a real run killed
with SIGKILL at random times while it saves every step (``tests/kill_harness.py``): every
checkpoint a kill leaves behind must load, and the runs resume from it.

    python -m pytest tests/test_checkpoints.py -q -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from tsd.checkpoint_io import AtomicCheckpointIO, write_atomic
from tsd.fileio import write_text_atomic

TESTS = Path(__file__).resolve().parent


def test_a_failed_write_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def dies_half_way(f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # what a signal or an error does mid-write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, dies_half_way)
    state = torch.load(path, weights_only=True)
    assert state["global_step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_results_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """results.json (train.py, eval.py, the study's validation) is what a resumed study reads as
    "this run is done": a write that dies before its rename leaves the previous file, parseable."""
    import json

    import tsd.fileio

    path = tmp_path / "run" / "results.json"
    write_text_atomic(path, json.dumps({"mean@16": 0.05}))
    assert json.loads(path.read_text()) == {"mean@16": 0.05}

    def killed(src, dst):
        raise KeyboardInterrupt  # the signal arrives between the fsync and the rename

    monkeypatch.setattr(tsd.fileio.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, json.dumps({"mean@16": 0.07, "eval_history": list(range(10_000))}))
    assert json.loads(path.read_text()) == {"mean@16": 0.05}
    assert sorted(q.name for q in path.parent.iterdir()) == ["results.json"]


def test_the_temporary_file_of_a_killed_writer_is_removed_at_the_next_save(tmp_path):
    path = tmp_path / "last.ckpt"
    stale = tmp_path / ".last.ckpt.99999999.tmp"  # a writer SIGKILLed mid-write leaves this
    stale.write_bytes(b"\0" * 1000)
    (tmp_path / ".other.ckpt.1.tmp").write_bytes(b"x")  # another checkpoint's: not ours to remove
    AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ckpt.1.tmp", "last.ckpt"]


def test_both_strategies_write_atomically_unless_trainer_plugins_say_otherwise(tmp_path):
    import lightning as L

    from tsd.distributed.single import SingleProcessStrategy
    from tsd.distributed.strategy import GeneratorTrainerStrategy

    assert isinstance(SingleProcessStrategy().checkpoint_io, AtomicCheckpointIO)
    # the distributed checkpoint is one file of the gathered full state, written by rank 0 alone
    # through the same class (there is no sharded checkpoint directory to keep consistent)
    assert isinstance(GeneratorTrainerStrategy().checkpoint_io, AtomicCheckpointIO)
    mine = TorchCheckpointIO()
    trainer = L.Trainer(
        strategy=SingleProcessStrategy(), plugins=[mine], logger=False, default_root_dir=tmp_path
    )
    assert trainer.strategy.checkpoint_io is mine  # a plugin given by the user is not refused


@pytest.mark.slow
def test_kill_9_while_saving_every_step_never_leaves_a_checkpoint_that_does_not_load(policy_dir, tmp_path):
    """At least 20 SIGKILLs at random times (seed 0), and on until 3 of them landed during a
    checkpoint write; after each, the checkpoint loads as a resume reads it, and every run resumed
    from it. The same harness with a plain in-place write (``--io inplace``) left 4 unloadable
    checkpoints in 20 kills here."""
    out = tmp_path / "kills"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(
        [sys.executable, str(TESTS / "kill_harness.py"), str(out), "--kills", "20", "--min-mid-write", "3",
         "--policy", policy_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec = json.loads((out / "kills.json").read_text())
    print("\n" + p.stdout.strip().splitlines()[-1])
    assert rec["exited_by_themselves"] == [], rec["exited_by_themselves"]  # no run failed to load
    assert rec["kills"] >= 20 and rec["mid_write"] >= 3, rec
    assert rec["unloadable"] == 0, [c for c in rec["cycles"] if c["error"]]
    # the runs made progress across the kills, and the last resume loaded and finished
    steps = [s for s in rec["steps_after_kills"] if s is not None]
    assert steps == sorted(steps) and steps[-1] >= 5
    assert rec["final_exit"] == 0 and rec["final_step"] == steps[-1] + 2
    assert rec["resumed_and_trained"] >= 5  # runs that restored a checkpoint, then trained
