"""Kill -9 a training run again and again while it saves a checkpoint every step; after every kill
the checkpoint on disk must load, and the next run resumes from it.

    python tests/kill_harness.py OUT --kills 20                 # what tests/test_checkpoints.py runs
    python tests/kill_harness.py OUT --kills 40 --io lightning  # Lightning's default checkpoint IO
    TMPDIR=/dev/shm python tests/kill_harness.py OUT --io lightning   # ... with /tmp on another file system
    python tests/kill_harness.py OUT --io inplace               # a plain in-place write (to see it fail)

Each cycle forks a child of this process (which imported torch, Lightning and tsd once, so a run
starts in about a second) that runs ``tsd.train.train`` on the cispo smoke config with
``callbacks.checkpoint.every_n_train_steps=1``, resuming from ``last.ckpt`` when there is one; the
parent SIGKILLs it after a random delay, then checks the checkpoint the way a resume does
(:func:`tsd.resume.read_checkpoint`) and loads it whole (``torch.load(weights_only=True)``). A
temporary file left next to it means the kill landed during a write. After the last kill one more
resume runs to its end. The figures go to ``OUT/kills.json`` and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402


class ResumeMark(L.Callback):
    """Appends ``{"pid", "step"}`` to ``path`` when training starts, after any checkpoint was
    restored: a line is a run that loaded its checkpoint and trains."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module):
        with open(self.path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": trainer.global_step}) + "\n")


class InPlaceCheckpointIO(TorchCheckpointIO):
    """The write this harness must catch: straight into the checkpoint's own path."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            torch.save(checkpoint, f)


IO_PLUGINS = {
    "atomic": None,  # the strategies' default: tsd.checkpoint_io.AtomicCheckpointIO
    "lightning": "lightning.fabric.plugins.io.torch_io.TorchCheckpointIO",
    "inplace": "kill_harness.InPlaceCheckpointIO",
}


def _config(out: Path, policy: str, io: str, ckpt: Path | None, max_steps: int):
    from conftest import compose_train
    from omegaconf import OmegaConf

    overrides = [
        "experiment=cispo_countdown",
        "debug=smoke",
        f"model.name_or_path={policy}",
        "callbacks.eval=null",
        "callbacks.export=null",
        "callbacks.log_line.every_n_steps=1000",
        "callbacks.checkpoint.every_n_train_steps=1",
        f"trainer.max_steps={max_steps}",
        "+callbacks.mark._target_=kill_harness.ResumeMark",
        f"+callbacks.mark.path={out / 'marks.jsonl'}",
        "run_id=killed-run",
    ]
    if ckpt is not None:
        overrides.append(f"ckpt_path={ckpt}")
    cfg = compose_train(overrides, out / "run")
    if IO_PLUGINS[io] is not None:
        OmegaConf.set_struct(cfg, False)
        cfg.trainer.plugins = [{"_target_": IO_PLUGINS[io]}]
    return cfg


def _child(cfg, log_path: Path) -> None:
    """The forked run: its output to its own log; exit 0 when it ends, 3 when it raised."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 0
    try:
        from tsd.train import train

        train(cfg)
    except BaseException as e:  # noqa: BLE001 - the parent reads the exit code
        import traceback

        traceback.print_exc()
        code = 2 if type(e).__name__ == "ConfigError" else 3
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _check(ckpt: Path) -> tuple[int | None, str | None]:
    """(global step, None) when ``ckpt`` loads as a resume reads it, else (None, why)."""
    from tsd.resume import read_checkpoint

    try:
        info = read_checkpoint(ckpt)
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # whole, not memory-mapped
        assert state["optimizer_states"] and state["state_dict"], "empty state"
        return info.global_step, None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {str(e)[:300]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument(
        "--min-mid-write",
        type=int,
        default=0,
        help="go on past --kills until this many kills landed during a write (at most 4 x --kills cycles)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--io", choices=sorted(IO_PLUGINS), default="atomic")
    ap.add_argument("--policy", default="tiny")
    ap.add_argument("--min-delay", type=float, default=0.4, help="seconds before a kill, at least")
    ap.add_argument("--max-delay", type=float, default=2.5, help="seconds before a kill, at most")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ckpt = out / "run" / "checkpoints" / "last.ckpt"
    rng = random.Random(args.seed)
    record: dict = {"io": args.io, "seed": args.seed, "cycles": []}
    t0 = time.monotonic()
    kills = 0
    mid_write = 0
    while kills < args.kills or (mid_write < args.min_mid_write and len(record["cycles"]) < 4 * args.kills):
        cycle = len(record["cycles"])
        cfg = _config(out, args.policy, args.io, ckpt if ckpt.exists() else None, 10**6)
        delay = rng.uniform(args.min_delay, args.max_delay)
        pid = os.fork()
        if pid == 0:
            _child(cfg, out / "logs" / f"cycle{cycle:03d}.log")
        time.sleep(delay)
        ended, status = os.waitpid(pid, os.WNOHANG)
        if ended == 0:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        kills += killed
        temps = sorted(p.name for p in ckpt.parent.glob(".*.tmp")) if ckpt.parent.exists() else []
        step, error = _check(ckpt) if ckpt.exists() else (None, None)
        entry = {
            "delay_s": round(delay, 3),
            "killed": killed,
            "exit": None if killed else os.waitstatus_to_exitcode(status),
            "mid_write": bool(temps) or (args.io != "atomic" and error is not None),
            "step": step,
            "error": error,
        }
        record["cycles"].append(entry)
        mid_write += entry["mid_write"]
        print(json.dumps(entry), flush=True)
        if error is not None:  # the resume would be refused: start again from scratch
            ckpt.unlink()
        if sum(not c["killed"] for c in record["cycles"]) >= 3:  # runs that end by themselves fail
            print("three runs ended before they were killed: see OUT/logs; stopping", flush=True)
            break
    # one last resume, left to finish: it must load the checkpoint and train two more steps
    last = _check(ckpt)[0] if ckpt.exists() else 0
    cfg = _config(out, args.policy, args.io, ckpt if ckpt.exists() else None, (last or 0) + 2)
    pid = os.fork()
    if pid == 0:
        _child(cfg, out / "logs" / "final.log")
    _, status = os.waitpid(pid, 0)
    cycles = record["cycles"]
    marks = [json.loads(line) for line in (out / "marks.jsonl").read_text().splitlines()]
    record.update(
        {
            "kills": kills,
            "mid_write": sum(c["mid_write"] for c in cycles),
            "unloadable": sum(c["error"] is not None for c in cycles),
            "exited_by_themselves": [c for c in cycles if not c["killed"]],
            "resumed_and_trained": sum(m["step"] > 0 for m in marks),
            "final_exit": os.waitstatus_to_exitcode(status),
            "final_step": _check(ckpt)[0],
            "steps_after_kills": [c["step"] for c in cycles],
            "wall_s": round(time.monotonic() - t0, 1),
        }
    )
    (out / "kills.json").write_text(json.dumps(record, indent=1))
    print(
        f"{args.io}: {kills} kills in {record['wall_s']}s, {record['mid_write']} during a checkpoint write, "
        f"{record['unloadable']} unloadable checkpoints, {record['resumed_and_trained']} resumes trained, "
        f"final resume exit {record['final_exit']} at step {record['final_step']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
