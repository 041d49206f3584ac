"""Run directories read back for reports: what a run was and its evaluation curve.

A run directory (``outputs/<experiment>/<time>/`` or one job ``multirun/.../<n>/``) holds
``results.json`` (the eval history), ``csv/metrics.csv`` (the CSV logger), ``csv/hparams.yaml``
(the resolved config with ``run.{experiment, method, overrides, git_commit}``, written by
:class:`~tsd.callbacks.LogRunConfig`) and ``.hydra/overrides.yaml``. Older runs may lack some of
them: what is missing reads as ``None`` / NaN. Files are parsed with ``json`` and
``yaml.safe_load`` only.

Readers: ``scripts/plot_curves.py``, ``scripts/collect_sweep.py``, ``scripts/report.py`` and the
table a multirun ends with (:class:`tsd.viz.sweep_summary.SweepSummary`), whose rows are
:func:`sweep_rows`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: the x-axes of an evaluation curve
STEP, GENERATED, TRAINED = "step", "compute/generated_tokens", "compute/trained_tokens"


def is_run_dir(path: Path) -> bool:
    return (path / "results.json").exists() or (path / "csv" / "metrics.csv").exists()


def expand_runs(paths: list[Path]) -> list[Path]:
    """Each path as a run, or (a multirun sweep directory) its job directories in job order."""
    out: list[Path] = []
    for p in paths:
        if is_run_dir(p):
            out.append(p)
            continue
        jobs = [d for d in p.iterdir() if d.is_dir() and is_run_dir(d)] if p.is_dir() else []
        if not jobs:
            raise FileNotFoundError(
                f"{p}: neither a run directory (results.json, csv/metrics.csv) nor a sweep of them"
            )
        out.extend(
            sorted(jobs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
        )
    return out


def sweep_jobs(sweep: Path) -> list[Path]:
    """The job directories of a multirun (each has ``.hydra/``), in job order, finished or not."""
    jobs = [d for d in sweep.iterdir() if d.is_dir() and (d / ".hydra").is_dir()] if sweep.is_dir() else []
    return sorted(jobs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def _yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.exists() else None
    except (OSError, yaml.YAMLError):
        return None


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class RunRecord:
    """One run: identity, knobs and its evaluation rows (``step``, the compute axes, ``eval/...``)."""

    path: Path
    experiment: str | None
    method: str | None
    seed: int | None
    overrides: dict[str, str]
    evals: list[dict[str, float]]
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``experiment`` plus the overrides that are not the usual run plumbing."""
        skip = ("hydra.", "paths.", "model.name_or_path", "debug", "logger", "experiment")
        extra = [f"{k}={v}" for k, v in self.overrides.items() if not k.startswith(skip)]
        return " ".join([self.experiment or self.path.name, *extra])

    def curve(self, metric: str, x: str) -> tuple[list[float], list[float]]:
        rows = [r for r in self.evals if not math.isnan(r.get(metric, math.nan))]
        return [r.get(x, math.nan) for r in rows], [r[metric] for r in rows]

    def final(self, key: str) -> float:
        rows = [r for r in self.evals if not math.isnan(r.get(key, math.nan))]
        return rows[-1][key] if rows else math.nan

    def base(self, key: str) -> float:
        rows = [r for r in self.evals if not math.isnan(r.get(key, math.nan))]
        return rows[0][key] if rows else math.nan

    def total(self, key: str) -> float:
        """The value at the end of the run (``results.json``), else at its last evaluation: the
        compute axes of a run whose evaluation is off, or that is still running."""
        v = _float(self.results.get(key))
        return self.final(key) if math.isnan(v) else v

    @property
    def wall_seconds(self) -> float:
        """The fit's wall time (evaluations and export included); NaN for a run that did not finish."""
        return _float(self.results.get("wall_seconds"))


def read_overrides(run: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in _yaml(run / ".hydra" / "overrides.yaml") or []:
        if isinstance(line, str) and "=" in line:
            k, v = line.split("=", 1)
            out[k.lstrip("+~")] = v
    return out


def read_evals(run: Path) -> list[dict[str, float]]:
    """The eval rows: ``results.json``'s eval history, else the CSV rows that carry an ``eval/`` key."""
    res = run / "results.json"
    if res.exists():
        hist = json.loads(res.read_text()).get("eval_history") or []
        if hist:
            return [{k: _float(v) for k, v in h.items()} for h in hist]
    rows: list[dict[str, float]] = []
    metrics = run / "csv" / "metrics.csv"
    if metrics.exists():
        with open(metrics, newline="") as f:
            for row in csv.DictReader(f):
                if any(k.startswith("eval/") and row[k] not in ("", None) for k in row):
                    rows.append({k: _float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def read_run(run: Path) -> RunRecord:
    hp = _yaml(run / "csv" / "hparams.yaml") or {}
    info: dict = hp["run"] if isinstance(hp, dict) and isinstance(hp.get("run"), dict) else {}
    hydra_cfg = _yaml(run / ".hydra" / "config.yaml") or {}
    seed = hp.get("seed", hydra_cfg.get("seed")) if isinstance(hp, dict) else None
    res = run / "results.json"
    return RunRecord(
        path=run,
        experiment=info.get("experiment") or hydra_cfg.get("task_name"),
        method=info.get("method"),
        seed=int(seed) if isinstance(seed, int) else None,
        overrides=read_overrides(run),
        evals=read_evals(run),
        results=json.loads(res.read_text()) if res.exists() else {},
    )


def eval_metric(runs: list[RunRecord], wanted: str = "eval/mean@16") -> str | None:
    """``wanted`` if some run evaluated it, else the first ``eval/mean@k`` any run has, else None."""
    keys = {k for r in runs for row in r.evals for k in row}
    if wanted in keys:
        return wanted
    return next(iter(sorted(k for k in keys if k.startswith("eval/mean@"))), None)


def varying_overrides(runs: list[RunRecord]) -> list[str]:
    """The override keys whose values differ between the runs (a sweep's knobs), in first-seen order."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def _or_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def sweep_rows(runs: list[RunRecord], metric: str | None) -> list[dict[str, Any]]:
    """One row per run: ``job`` (its directory's name), its overrides, ``base`` and ``final``
    ``metric`` (first and last evaluation), ``generated_tokens``, ``trained_tokens`` (at the end of
    the run) and ``wall_seconds``; what a run lacks (failed, unfinished, no evaluation) is None."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {"job": r.path.name, **r.overrides}
        row["base"] = _or_none(r.base(metric)) if metric else None
        row["final"] = _or_none(r.final(metric)) if metric else None
        row["generated_tokens"] = _or_none(r.total(GENERATED))
        row["trained_tokens"] = _or_none(r.total(TRAINED))
        row["wall_seconds"] = _or_none(r.wall_seconds)
        rows.append(row)
    return rows


#: how :func:`format_table` writes each value column (the rest as text)
_FORMATS = {"base": ".4f", "final": ".4f", "generated_tokens": ",.0f", "trained_tokens": ",.0f",
            "wall_seconds": ",.0f"}  # fmt: skip


def format_table(rows: list[dict[str, Any]], keys: list[str], metric: str | None) -> str:
    """``rows`` as a Markdown table of the columns ``job``, ``keys`` (overrides), base and final
    ``metric``, generated and trained tokens and wall seconds; a missing value is ``-``."""
    cols = ["job", *keys, *_FORMATS]
    names = {"base": f"base {metric or 'eval'}", "final": f"final {metric or 'eval'}",
             "generated_tokens": "generated tokens", "trained_tokens": "trained tokens",
             "wall_seconds": "wall s"}  # fmt: skip

    def cell(row: dict[str, Any], c: str) -> str:
        v = row.get(c)
        if v is None:
            return "-"
        return format(v, _FORMATS[c]) if c in _FORMATS else str(v)

    lines = ["| " + " | ".join(names.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
