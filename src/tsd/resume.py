"""What a run knows about itself before any compute: its id, and the checkpoint it resumes from.

- :func:`read_checkpoint` checks ``ckpt_path`` before the model is loaded: a local file (an
  ``http(s)://`` or other URL is refused: Lightning would unpickle a remote file with
  ``weights_only=False``), readable by ``torch.load(weights_only=True)`` (memory-mapped, so a
  checkpoint of a large model costs nothing here) and holding what a tsd checkpoint holds. Anything
  else is a :class:`~tsd.config.ConfigError` naming ``ckpt_path``.
- :func:`resolve_run_id`: a resume keeps the checkpoint's run id (so it reads the same Redis
  stream, :class:`~tsd.buffers.redis.RedisBuffer`); a new run takes ``run_id`` from the config, or
  derives one from its output directory, which every rank of a job shares (one machine, or
  torchrun/SLURM with a fixed ``hydra.run.dir``: docs/distributed.md) and which differs between
  runs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsd.config import ConfigError

#: run ids go into Redis keys and file names
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: the DataModule's entry in a Lightning checkpoint (its class name)
DATAMODULE_KEY = "TrajectoryDataModule"


@dataclass
class CheckpointInfo:
    """What ``train.py`` reads from a checkpoint before resuming from it."""

    path: Path
    global_step: int
    #: the run id stored by the DataModule; None in checkpoints written before run ids existed
    run_id: str | None
    #: callback states, keyed as Lightning keys them (the callback's ``state_key``)
    callbacks: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(ckpt_path: Any) -> CheckpointInfo:
    """Check ``ckpt_path`` and read what a resume needs from it, without unpickling anything."""
    text = str(ckpt_path)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise ConfigError(
            f"ckpt_path: {text!r} is a URL; only a local file is accepted (a remote checkpoint would be "
            "unpickled with weights_only=False): download it, check where it comes from, pass its path"
        )
    path = Path(text).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"ckpt_path: {text!r} {what} (accepted: a checkpoint file, e.g. <run>/checkpoints/last.ckpt)"
        )
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a corrupt, truncated or foreign file: say so in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"ckpt_path: {text!r} is not a readable checkpoint ({type(e).__name__}: {msg[:200]}) "
            "(accepted: a Lightning checkpoint written by train.py, loadable with weights_only=True)"
        ) from None
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("global_step"), int)
        or "state_dict" not in state
    ):
        raise ConfigError(
            f"ckpt_path: {text!r} is not a Lightning training checkpoint (no global_step / state_dict)"
        )
    dm = state.get(DATAMODULE_KEY)
    if isinstance(dm, dict) and "trainer_version" in dm and "clock" not in dm:
        raise ConfigError(
            f"ckpt_path: {text!r} was written before policy versions counted optimiser steps (its data "
            "state holds a sync count, trainer_version, not the policy clock); resume it with the tsd "
            "commit that wrote it, or start a new run from its exported policy (model.name_or_path)"
        )
    run_id = dm.get("run_id") if isinstance(dm, dict) else None
    callbacks = state.get("callbacks")
    return CheckpointInfo(
        path=path,
        global_step=int(state["global_step"]),
        run_id=str(run_id) if run_id is not None else None,
        callbacks=dict(callbacks) if isinstance(callbacks, dict) else {},
    )


def check_run_id(run_id: Any) -> str:
    """``run_id`` as a string, or a :class:`ConfigError` naming the field."""
    if (
        isinstance(run_id, bool)
        or not isinstance(run_id, (str, int))
        or not RUN_ID_PATTERN.fullmatch(str(run_id))
    ):
        raise ConfigError(
            f"run_id: {run_id!r} is out of range (accepted: null, or 1-64 letters, digits, '_', '.', '-')"
        )
    return str(run_id)


def resolve_run_id(configured: Any, checkpoint: CheckpointInfo | None, output_dir: str | Path) -> str:
    """The run's id: the checkpoint's on a resume, else ``configured``, else one derived from the
    absolute output directory."""
    if configured is not None:
        configured = check_run_id(configured)
    if checkpoint is not None and checkpoint.run_id is not None:
        if configured is not None and configured != checkpoint.run_id:
            raise ConfigError(
                f"run_id: {configured!r} differs from the checkpoint's {checkpoint.run_id!r} "
                "(a resume continues its run; leave run_id unset)"
            )
        return checkpoint.run_id
    if configured is not None:
        return configured
    return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]
