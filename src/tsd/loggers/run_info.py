"""The run's identity, logged with its resolved config so that runs can be filtered, grouped and
compared by what they were (W&B config, the CSV logger's ``hparams.yaml``).

``run_info(cfg)`` gives, under the ``run`` key of the logged config:

- ``experiment``: the ``experiment=`` choice (``task_name`` when none was chosen), ``task_name``;
- ``method``: the rollout and policy-gradient classes, e.g. ``MCTSRollout+CISPOLoss`` (a label read
  off the ``_target_`` paths, so a new rollout needs no entry anywhere);
- ``overrides``: the command-line overrides of this job (Hydra's ``overrides.task``);
- ``multirun``, ``sweep_dir``, ``job_num``, ``job_overrides``: where the job sits in a sweep;
- ``git_commit``, ``git_dirty``: the code that ran (``None`` outside a git checkout).
"""

from __future__ import annotations

import subprocess
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tsd import PACKAGE_DIR


def git_state(repo: str | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout holding the package; ``(None, None)`` if there is none."""
    root = repo or str(PACKAGE_DIR.parents[1])
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


def hydra_job() -> dict[str, Any]:
    """The Hydra job this process runs (empty outside ``@hydra.main``, e.g. under ``compose``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "experiment": hc.runtime.choices.get("experiment"),
        "overrides": list(hc.overrides.task),
        "multirun": multirun,
        "sweep_dir": str(hc.sweep.dir) if multirun else None,
        "job_num": int(hc.job.num) if multirun else None,
        "job_overrides": hc.job.override_dirname or None,
        "output_dir": hc.runtime.output_dir,
    }


def _class_name(node: Any) -> str | None:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    return str(target).rsplit(".", 1)[-1] if target else None


def run_info(cfg: DictConfig) -> dict[str, Any]:
    """The ``run`` section of the logged config (see the module docstring)."""
    job = hydra_job()
    commit, dirty = git_state()
    parts = [_class_name(cfg.get("rollout")), _class_name((cfg.get("loss") or {}).get("pg_loss"))]
    return {
        "experiment": job.get("experiment") or cfg.get("task_name"),
        "task_name": cfg.get("task_name"),
        "method": "+".join(p for p in parts if p) or None,
        "overrides": job.get("overrides", []),
        "multirun": job.get("multirun", False),
        "sweep_dir": job.get("sweep_dir"),
        "job_num": job.get("job_num"),
        "job_overrides": job.get("job_overrides"),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def logged_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config (every interpolation filled in) plus ``run``: what the loggers record."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    return {**resolved, "run": run_info(cfg)}
