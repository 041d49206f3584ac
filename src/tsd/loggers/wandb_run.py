"""WandbRunLogger: Lightning's W&B logger, with runs that group themselves and curves against compute.

    python train.py logger=wandb                                 # offline by default: `wandb sync` later
    python train.py logger=many                                  # CSV + W&B
    python train.py -m hparams_search=mcts_scaling logger=wandb  # one group per sweep

What it adds to :class:`lightning.pytorch.loggers.WandbLogger`:

- **group / job_type / tags / name** from the Hydra job, unless given: a single run is grouped by
  its experiment (``mcts_countdown``: seeds of one method average together, methods compare as
  groups) with job type ``train``; every job of a multirun shares the group
  ``<experiment>-sweep-<sweep stamp>`` with job type ``sweep``, the tag ``sweep`` and a name that
  carries its overrides (``mcts_countdown[rollout.iterations=4,rollout.workers=16]``).
- **x-axes**: ``compute/generated_tokens`` and ``compute/trained_tokens`` are declared with
  ``define_metric`` (summary: max), and ``eval/*`` is drawn against ``compute/generated_tokens``
  (every evaluation row carries both compute axes and ``trainer/global_step``, so any of the three
  can be chosen in a panel); everything else keeps Lightning's ``trainer/global_step``.
- **finish**: the W&B run is finished when training ends (exit code 1 on failure). Lightning leaves
  it open, so the next job of a multirun in the same process would log into the previous run.

The resolved config (with the run's identity, :func:`tsd.loggers.run_info.logged_config`) reaches
it, like every logger, through ``log_hyperparams`` in ``tsd.train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from tsd.loggers.run_info import hydra_job

#: the compute axes, cumulative over the run (DESIGN.md: compare methods at equal compute)
COMPUTE_AXES = ("compute/generated_tokens", "compute/prefill_tokens", "compute/trained_tokens")


class WandbRunLogger(WandbLogger):
    def __init__(
        self,
        project: str = "tsd",
        experiment_name: str = "run",
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        save_dir: str = ".",
        offline: bool = True,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            project: W&B project.
            experiment_name: the experiment (``task_name``); the default group and name.
            name: run name; ``None``: the experiment, plus the job's overrides in a multirun.
            group: W&B group; ``None``: the experiment, or ``<experiment>-sweep-<stamp>`` in a multirun.
            job_type: W&B job type; ``None``: ``train``, or ``sweep`` in a multirun.
            tags: W&B tags (the experiment's ``tags``); a multirun job also gets ``sweep``.
            save_dir: where the ``wandb/`` run directory goes (the run's output directory).
            offline: log to local files only (``wandb sync`` uploads them later).
            log_model: upload checkpoints as artifacts (Lightning's option).
            **kwargs: passed on to ``wandb.init`` (``entity``, ``notes``, ``mode``, ...).
        """
        job = hydra_job()
        tags = list(tags)
        if job.get("multirun"):
            stamp = Path(str(job["sweep_dir"])).name
            group = group or f"{experiment_name}-sweep-{stamp}"
            job_type = job_type or "sweep"
            if name is None:
                name = f"{experiment_name}[{job['job_overrides']}]" if job.get("job_overrides") else None
            name = name or f"{experiment_name}#{job['job_num']}"
            tags = tags if "sweep" in tags else [*tags, "sweep"]
        super().__init__(
            name=name or experiment_name,
            project=project,
            save_dir=save_dir,
            offline=offline,
            log_model=log_model,
            group=group or experiment_name,
            job_type=job_type or "train",
            tags=tags,
            **kwargs,
        )
        self._axes_defined = False

    @property
    def experiment(self):
        """The W&B run (created on first use, rank 0 only), with the compute axes declared."""
        run = super().experiment
        if not self._axes_defined:
            self._axes_defined = True
            for axis in COMPUTE_AXES:
                run.define_metric(axis, summary="max")
            run.define_metric("eval/*", step_metric="compute/generated_tokens")
        return run

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
