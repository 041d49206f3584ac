"""Run directories read back for reports: what a run was and its evaluation curve.

A run directory (``outputs/<experiment>/<time>/`` or one job ``multirun/.../<n>/``) holds
``results.json`` (the eval history), ``csv/metrics.csv`` (the CSV logger), ``csv/hparams.yaml``
(the resolved config with ``run.{experiment, method, overrides, git_commit}``, written by
:class:`~tsd.callbacks.LogRunConfig`) and ``.hydra/overrides.yaml``. Older runs may lack some of
them: what is missing reads as ``None`` / NaN. Files are parsed with ``json`` and
``yaml.safe_load`` only.
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
    info = hp.get("run") if isinstance(hp, dict) and isinstance(hp.get("run"), dict) else {}
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
