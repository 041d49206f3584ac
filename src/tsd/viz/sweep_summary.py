"""The table a ``train.py`` multirun ends with: one row per job, read back from its run directory.

    python train.py -m hparams_search=mcts_scaling        # ... then the table, after the last job

Registered as a Hydra callback in ``configs/train.yaml`` (``hydra.callbacks.sweep_summary``): after
the last job Hydra calls :meth:`SweepSummary.on_multirun_end`, which prints the sweep's jobs with
their swept knobs (the sweeper's parameters and any override that differs between jobs), base and
final eval mean@k, generated and trained tokens and wall time (:func:`tsd.viz.runs.sweep_rows`,
the columns ``scripts/collect_sweep.py`` prints), and writes the same table to
``<sweep dir>/summary.md``.
It reads only what the jobs wrote, so a job that failed shows ``-``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tsd.viz.runs import eval_metric, format_table, read_run, sweep_jobs, sweep_rows, varying_overrides


def summary_table(sweep: Path, metric: str = "eval/mean@16", knobs: Iterable[str] = ()) -> str:
    """The sweep's table: a title line, then the Markdown table of its jobs. Its override columns
    are ``knobs`` (the sweeper's parameters) that the jobs set, then any other override that
    differs between jobs."""
    runs = [read_run(job) for job in sweep_jobs(sweep)]
    found = eval_metric(runs, metric)
    keys = [
        k for k in dict.fromkeys([*knobs, *varying_overrides(runs)]) if any(k in r.overrides for r in runs)
    ]
    title = f"sweep {sweep}: {len(runs)} jobs, {found or 'no evaluation'}"
    return title + "\n\n" + format_table(sweep_rows(runs, found), keys, found)


class SweepSummary(Callback):
    def __init__(self, metric: str = "eval/mean@16", filename: str = "summary.md") -> None:
        """Print the sweep's table after the last job of a multirun, and write it into the sweep
        directory as ``filename``. ``metric`` falls back to the ``eval/mean@k`` the jobs have."""
        self.metric = metric
        self.filename = filename

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        try:
            text = summary_table(sweep, self.metric, knobs=list(params))
            (sweep / self.filename).write_text(text + "\n")
        except OSError as e:  # the jobs are done and their results on disk: say so, do not fail the sweep
            print(f"sweep summary: cannot read or write {sweep}: {e}", file=sys.stderr)
            return
        print("\n" + text, flush=True)
