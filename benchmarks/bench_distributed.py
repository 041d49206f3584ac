"""Throughput of 1 generator + 2 FSDP trainers (GeneratorTrainerStrategy, 3 CPU processes) against
the single-process run, and the weight-sync time, on the tiny policy.

    python benchmarks/bench_distributed.py                       # cispo_countdown, starts a redis-server
    python benchmarks/bench_distributed.py --experiment mcts_countdown --steps 6 --batch 4
    python benchmarks/bench_distributed.py --redis-url redis://127.0.0.1:6379/0 --policy /path/to/policy
    python benchmarks/bench_distributed.py --gather both         # the weight sync's gather: flat buckets vs per tensor

``--gather``: how the trainers gather the FSDP2 shards for a weight sync (``strategy.gather_bucket_mb``):
``bucketed`` (the default, flat buckets of 64 MB, a few collectives), ``per-tensor`` (one collective
per tensor, ``get_model_state_dict``: what it replaced), or ``both``: one distributed row for each,
alternated in the same run, so that the two are measured under the same load.

Both runs are ``python train.py`` with the same experiment, the same number of optimiser steps and
the same global batch (single process: ``2 x --batch`` per step; distributed: ``--batch`` per
trainer x 2 trainers), evaluation, checkpoints and export off. A probe callback times the fit loop
on rank 0 (start of training to its end, so process start-up and model loading are excluded) and
records each weight sync. Generated tokens: the single run's worker count; the generator's own
count in the distributed run (its last log line).

The table (medians over ``--repeats`` alternated runs; a shared box is noisy): trained
trajectories/s with its range and its ratio to the single-process run, generated tokens/s,
trajectories dropped as stale (all trainer ranks), and the weight sync (single process: the in-process copy into the generator's policy; distributed:
gathering the FSDP shards on rank 0 + broadcasting to the generator over gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


class ThroughputProbe(L.Callback):
    """Times the fit loop and each weight sync on rank 0; writes ``probe.json`` at the end."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.t0 = 0.0
        self.version = 0
        self.syncs: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm, m = trainer.datamodule, trainer.callback_metrics
        if dm.clock.published != self.version:  # WeightSync published at this step
            self.version = dm.clock.published
            self.syncs.append({k: float(v) for k, v in m.items() if k.startswith("perf/weight_")})

    def on_train_end(self, trainer, pl_module) -> None:
        # summed over the trainer ranks (a collective: every rank calls it)
        dropped = trainer.strategy.reduce(
            torch.tensor(float(trainer.datamodule.dropped_stale)), reduce_op="sum"
        )
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        out = {
            "seconds": time.perf_counter() - self.t0,
            "steps": trainer.global_step,
            "trainers": trainer.world_size,
            "generated_tokens": float(m.get("compute/generated_tokens", 0.0)),
            "dropped_stale": float(dropped),
            "syncs": self.syncs,
        }
        self.path.write_text(json.dumps(out))


@contextmanager
def _redis(url: str | None):
    if url:
        yield url
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from redis_server import redis_server  # the same throwaway server the tests use

    with redis_server() as started:
        yield started


def _policy(path: str, tmp: Path) -> tuple[str, str]:
    """The tiny policy, or (not built yet) an untrained one of the same architecture."""
    from tsd import TINY_POLICY_DIR

    if path != "tiny" or (TINY_POLICY_DIR / "model.safetensors").exists():
        return path, "trained" if path == "tiny" else path
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_tiny_policy import TinyBuildConfig, make_policy

    from tsd.models.char_tokenizer import build_char_tokenizer

    d = tmp / "untrained_tiny"
    tok = build_char_tokenizer()
    make_policy(tok, TinyBuildConfig()).save_pretrained(d)
    tok.save_pretrained(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["tsd_char_tokenizer"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(d), "untrained (tiny policy not built yet: same architecture, random weights)"


def _run(name: str, overrides: list[str], tmp: Path, timeout: float, threads: int) -> dict:
    probe = tmp / f"{name}.probe.json"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        "callbacks.eval=null",
        "callbacks.checkpoint=null",
        "callbacks.export=null",
        "+callbacks.probe._target_=bench_distributed.ThroughputProbe",
        f"+callbacks.probe.path={probe}",
        f"hydra.run.dir={tmp / name}",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")) if p
        ),
        "WANDB_MODE": "offline",
        "TOKENIZERS_PARALLELISM": "false",
        # intra-op threads per process (Lightning gives each forked rank cores // ranks = 1 here);
        # the same for the single run, or it compares thread counts, not setups
        "OMP_NUM_THREADS": str(threads),
    }
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{name} run failed:\n{(res.stdout + res.stderr)[-6000:]}")
    out = json.loads(probe.read_text())
    out["wall"] = wall
    gen = re.search(
        r"stopped \(done\) after \d+ rollouts, \d+ trajectories, (\d+) generated tokens",
        res.stdout + res.stderr,
    )
    if gen:  # the generator's own count (rank 0 only sees the trajectories it trained on)
        out["generated_tokens"] = float(gen.group(1))
    return out


def _sync_ms(runs: list[dict]) -> str:
    syncs = [s for r in runs for s in r["syncs"]]
    if syncs and "perf/weight_gather_seconds" in syncs[0]:
        gather = statistics.median(s["perf/weight_gather_seconds"] for s in syncs) * 1e3
        bcast = statistics.median(s["perf/weight_broadcast_seconds"] for s in syncs) * 1e3
        return f"{gather + bcast:.1f} ms ({gather:.1f} gather + {bcast:.1f} bcast)"
    if syncs:
        return f"{statistics.median(s['perf/weight_sync_seconds'] for s in syncs) * 1e3:.1f} ms (in-process copy)"
    return "-"


def _row(name: str, runs: list[dict], batch: int, base: float | None) -> tuple[str, float]:
    """One table row: medians over the repeats (min-max of trajectories/s in brackets)."""
    traj = [r["steps"] * batch / r["seconds"] for r in runs]
    med = statistics.median(traj)
    spread = f"[{min(traj):.1f}-{max(traj):.1f}]" if len(runs) > 1 else ""
    ratio = f"{med / base:.2f}x" if base else "1.00x"
    fit = statistics.median(r["seconds"] for r in runs)
    gen = statistics.median(r["generated_tokens"] / r["seconds"] for r in runs)
    dropped = statistics.median(r["dropped_stale"] for r in runs)
    line = f"{name:<36} {fit:>7.1f} {med:>8.2f} {spread:>13} {ratio:>7} {gen:>10.0f} {dropped:>8.0f}  {_sync_ms(runs)}"
    return line, med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="cispo_countdown")
    ap.add_argument("--policy", default="tiny", help="model.name_or_path (default: the bundled tiny policy)")
    ap.add_argument("--steps", type=int, default=8, help="optimiser steps per run")
    ap.add_argument("--batch", type=int, default=16, help="trajectories per trainer per step")
    ap.add_argument("--problems", type=int, default=2, help="generation.problems_per_rollout")
    ap.add_argument(
        "--gather",
        choices=["bucketed", "per-tensor", "both"],
        default="bucketed",
        help="the weight sync's gather of the FSDP2 shards (strategy.gather_bucket_mb 64 or 0), or both",
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="runs of each setup, alternated (a shared box is noisy)"
    )
    ap.add_argument("--redis-url", default=None, help="default: start a throwaway redis-server")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides for both runs")
    args = ap.parse_args()

    gathers = {"bucketed": ["bucketed"], "per-tensor": ["per-tensor"], "both": ["per-tensor", "bucketed"]}[
        args.gather
    ]
    bucket_mb = {"bucketed": 64, "per-tensor": 0}
    single: list[dict] = []
    dist: dict[str, list[dict]] = {g: [] for g in gathers}
    with tempfile.TemporaryDirectory(prefix="tsd-bench-dist-") as d, _redis(args.redis_url) as url:
        tmp = Path(d)
        policy, kind = _policy(args.policy, tmp)
        common = [
            f"experiment={args.experiment}",
            f"model.name_or_path={policy}",
            f"trainer.max_steps={args.steps}",
            f"generation.problems_per_rollout={args.problems}",
            "trainer.enable_progress_bar=false",
            *args.overrides,
        ]
        for i in range(args.repeats):
            single.append(
                _run(
                    f"single{i}",
                    [*common, f"data.batch_size={2 * args.batch}"],
                    tmp,
                    args.timeout,
                    args.threads,
                )
            )
            for g in gathers:
                dist_overrides = [
                    *common,
                    f"data.batch_size={args.batch}",
                    "strategy=generator_trainer",
                    f"strategy.gather_bucket_mb={bucket_mb[g]}",
                    "buffer=redis",
                    "trainer.devices=3",
                    f"buffer.url={url}",
                    f"buffer.stream=tsd-bench:{uuid.uuid4().hex[:8]}",
                ]
                dist[g].append(_run(f"distributed_{g}{i}", dist_overrides, tmp, args.timeout, args.threads))

    print(
        f"\n{args.experiment}, policy: {kind}\n{os.cpu_count()} CPU cores, {args.threads} thread(s) per process; "
        f"{args.steps} optimiser steps, global batch {2 * args.batch}; median of {args.repeats} runs each"
    )
    head = f"{'setup':<36} {'fit s':>7} {'traj/s':>8} {'[min-max]':>13} {'ratio':>7} {'gen tok/s':>10} {'dropped':>8}"
    print(f"{head}  weight sync (median)")
    line, base = _row("single process", single, 2 * args.batch, None)
    print(line)
    for g in gathers:
        print(_row(f"1 gen + 2 trainers, {g}", dist[g], 2 * args.batch, base)[0])


if __name__ == "__main__":
    main()
