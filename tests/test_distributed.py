"""GeneratorTrainerStrategy for real: ``python train.py ... strategy=generator_trainer buffer=redis
trainer.devices=3`` as a subprocess (3 CPU processes on gloo: 2 FSDP trainers + 1 generator), a
real redis-server, the tiny policy (or a random one of the same kind while it is not built).

    python -m pytest tests/test_distributed.py -q -x

What each run records: the generator's sampler saves the weights it loads at every sync
(:class:`RecordingHFSampler`), a callback on every trainer rank saves what it trained on, the lag and
the CISPO ratio of each step, and at each sync rank 0's gathered weights (:class:`Accounting`);
Redis says how many trajectories were produced (``entries-added``) and are still there (``XLEN``).
Faults: a generator that dies or hangs, Redis down at start, a trainer killed mid-batch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import suppress
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import redis
import torch
from redis_server import free_port

from tsd.samplers.hf import HFSampler

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
#: a distributed run should take ~20-40 s here; this bounds a hang, it is not a timing assert
RUN_TIMEOUT = 240


# ---------------------------------------------------------------------------- helpers run by the ranks
class RecordingHFSampler(HFSampler):
    """HFSampler that saves the weights it holds after each ``load_weights`` (``gen_v{version}.pt``)
    and can die (SIGKILL) or hang after a number of ``sample`` calls. Only generator ranks sample
    through it (evaluation builds its own HFSampler)."""

    def __init__(self, model, tokenizer, *, record_dir=None, die_after=None, hang_after=None, **kw):
        super().__init__(model, tokenizer, **kw)
        self.record_dir = Path(record_dir) if record_dir else None
        self.die_after, self.hang_after, self.calls = die_after, hang_after, 0

    def sample(self, *args, **kwargs):
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hang_after is not None and self.calls > self.hang_after:
            while True:  # alive but producing nothing
                time.sleep(60)
        return super().sample(*args, **kwargs)

    def load_weights(self, state_dict, version):
        super().load_weights(state_dict, version)
        if self.record_dir is not None:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            torch.save(state, self.record_dir / f"gen_v{version}.pt")


class Accounting(L.Callback):
    """On every trainer rank: what each optimiser step trained on (the step, the versions, their
    lags), its logged lag and CISPO ratio, and the versions published so far; at each publication,
    rank 0 saves the gathered weights (``trainer_v{version}.pt``); ``acct_rank{r}.json`` at the
    end. ``kill_rank`` SIGKILLs itself after receiving its batch of step ``kill_at_step``."""

    def __init__(self, dirpath: str, kill_rank: int | None = None, kill_at_step: int = 1) -> None:
        self.dir = Path(dirpath)
        self.kill_rank, self.kill_at_step = kill_rank, kill_at_step
        self.steps: list[dict] = []
        self.version = 0
        self.published = [0]

    def on_train_start(self, trainer, pl_module):
        # a resumed run publishes the checkpoint's weights at start (WeightSync runs before this)
        self.version = trainer.datamodule.clock.published
        self.published = sorted({0, self.version})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.kill_rank and trainer.global_step == self.kill_at_step:
            (self.dir / f"killed_rank{trainer.global_rank}.json").write_text(json.dumps(batch.buffer_ids))
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dm, m = trainer.datamodule, trainer.callback_metrics
        self.steps.append(
            {
                "step": trainer.global_step - 1,  # the step this batch trained (WeightSync moved the clock)
                "ids": list(batch.buffer_ids),
                "versions": batch.versions.tolist(),
                "lags": batch.lags.tolist(),
                "published": list(self.published),  # the versions published before this step
                "lag": float(m["train/policy_lag"]),
                "ratio": float(m["train/ratio_mean"]),
            }
        )
        if dm.clock.published != self.version:  # WeightSync published at this step
            self.version = dm.clock.published
            self.published.append(self.version)
            full = trainer.strategy.full_policy(pl_module)  # collective; rank 0 gets it
            if full is not None:
                state = {k: v.detach().clone() for k, v in full.state_dict().items()}
                torch.save(state, self.dir / f"trainer_v{self.version}.pt")

    def on_train_end(self, trainer, pl_module):
        dm = trainer.datamodule
        out = {
            "steps": self.steps,
            "dropped_stale": dm.dropped_stale,
            "dropped_invalid": dm.dropped_invalid,
            "world_size": trainer.world_size,
        }
        (self.dir / f"acct_rank{trainer.global_rank}.json").write_text(json.dumps(out))


def _check_lags(steps: list[dict], max_lag: int) -> None:
    """Lag in optimiser steps, by hand: a trajectory trained at step s, made by the weights of
    version v (a step whose weights were published before s), has lag s - v, at least s minus the
    newest publication (the generators cannot hold newer weights), at most max_lag; the logged
    train/policy_lag is their mean."""
    for s in steps:
        expected = [s["step"] - v for v in s["versions"]]
        assert s["lags"] == expected, s
        assert all(v in s["published"] for v in s["versions"]), s
        newest = max(p for p in s["published"] if p <= s["step"])
        assert all(s["step"] - newest <= lag <= max_lag for lag in expected), s
        assert s["lag"] == pytest.approx(sum(expected) / len(expected)), s


# ---------------------------------------------------------------------------- fixtures
#: every run of these tests has this run id, so its stream is ``<stream>:run0`` (see _key)
RUN_ID = "run0"


@pytest.fixture
def stream(request, redis_url):
    """The stream key prefix of one test (buffer.stream): its runs' streams are under it."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name[:40])  # a Hydra override value
    prefix = f"tsd-test:{name}:{uuid.uuid4().hex[:8]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


def _key(stream: str) -> str:
    """The Redis key of the runs' stream: ``<buffer.stream>:<run_id>``."""
    return f"{stream}:{RUN_ID}"


def _train(overrides: list[str], cwd: Path, timeout: float = RUN_TIMEOUT) -> tuple[int, str, float]:
    """``python train.py OVERRIDES`` in its own session; returns (exit code, output, seconds)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
        "WANDB_MODE": "offline",
        "TOKENIZERS_PARALLELISM": "false",
        "HYDRA_FULL_ERROR": "1",
    }
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so a hang can be killed with all its ranks
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"train.py did not finish within {timeout}s; its output:\n{out[-6000:]}")
    return proc.returncode, out, time.monotonic() - t0


def _base(policy_dir: str, redis_url: str, stream: str, rec: Path) -> list[str]:
    rec.mkdir(parents=True, exist_ok=True)
    return [
        "debug=smoke",
        # a large step, so that one update moves the LM's log-probs well past the ratio check's 1e-4
        "module.optimizer.lr=3e-3",
        "module.scheduler.warmup_steps=0",
        "strategy=generator_trainer",
        "buffer=redis",
        "trainer.devices=3",
        f"model.name_or_path={policy_dir}",
        f"buffer.url={redis_url}",
        f"buffer.stream={stream}",
        f"run_id={RUN_ID}",
        "sampler._target_=test_distributed.RecordingHFSampler",
        f"+sampler.record_dir={rec}",
        "+callbacks.acct._target_=test_distributed.Accounting",
        f"+callbacks.acct.dirpath={rec}",
    ]


def _check_run(
    rec: Path, run: Path, redis_url: str, stream: str, max_lag: int, policy_dir: str
) -> list[dict]:
    """The properties every run (finished, in directory ``run``) must have; returns both ranks'
    accounts."""
    accts = [json.loads((rec / f"acct_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(a["world_size"] == 2 for a in accts)  # Lightning sees the trainers only

    # trajectories flow from the generator to both trainers, each rank its own
    trained = [i for a in accts for s in a["steps"] for i in s["ids"]]
    assert all(a["steps"] for a in accts)
    assert all(len(s["ids"]) == 4 for a in accts for s in a["steps"])  # data.batch_size per rank
    assert len(trained) == len(set(trained)), "a trajectory was trained twice"

    # versions and lag (in optimiser steps) are recorded; nothing older than max_lag is trained
    # (Lightning reads a batch one step early; the DataModule re-checks it after the step between)
    for a in accts:
        _check_lags(a["steps"], max_lag)

    # after a sync the generator holds exactly the trainers' gathered weights
    synced = sorted(int(p.stem.split("_v")[1]) for p in rec.glob("gen_v*.pt"))
    assert synced, "the generator never received weights"
    for v in synced:
        gen, ref = torch.load(rec / f"gen_v{v}.pt"), torch.load(rec / f"trainer_v{v}.pt")
        assert gen.keys() == ref.keys()
        assert all(torch.equal(gen[k], ref[k]) for k in ref), f"version {v} differs"
    # trained: the LM the generator last received is not the one the run started from
    from tsd.models.loading import load_policy

    initial = load_policy(policy_dir)[0].state_dict()
    last = torch.load(rec / f"trainer_v{synced[-1]}.pt")
    assert any(not torch.equal(last[k], initial[k]) for k in last if k.startswith("lm."))

    # every trajectory produced is trained, dropped as stale, or was still in the stream (pending)
    # when the run finished and deleted it; none of this run's own is invalid
    res = json.loads((run / "results.json").read_text())
    produced, remaining = res["buffer/produced"], res["buffer/left"]
    client = redis.Redis.from_url(redis_url)
    assert not client.exists(_key(stream)), "a finished run deletes its stream"
    client.close()
    dropped = sum(a["dropped_stale"] for a in accts)
    assert all(a["dropped_invalid"] == 0 for a in accts)
    assert produced == len(trained) + dropped + remaining, (produced, len(trained), dropped, remaining)
    return accts


def _check_ratios(accts: list[dict], rec: Path, policy_dir: str, require_stale: bool = True) -> None:
    """CISPO's ratio pi_theta / pi_behaviour uses the recorded behaviour log-probs: it is 1 where the
    trained weights are the ones that generated the batch, and moves off 1 where they are not (lag >
    0 and the LM changed in between; a value-head-only change leaves the LM's log-probs alone)."""
    from tsd.models.loading import load_policy

    weights = {0: load_policy(policy_dir)[0].state_dict()}
    for p in rec.glob("trainer_v*.pt"):
        weights[int(p.stem.split("_v")[1])] = torch.load(p)

    def lm_same(a: int, b: int) -> bool:
        return all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a] if k.startswith("lm."))

    on_policy = stale = 0  # steps whose data all came from the trained LM / all from older ones
    for s in (s for a in accts for s in a["steps"]):
        now, versions = s["step"], set(s["versions"])
        if now not in weights:  # the weights of a step between two publications were not saved
            continue
        if all(lm_same(v, now) for v in versions):
            assert s["ratio"] == pytest.approx(1.0, abs=1e-3), s
            on_policy += 1
        elif not any(lm_same(v, now) for v in versions):
            assert abs(s["ratio"] - 1.0) > 1e-4, s
            stale += 1
    # each trainer's first step trains version-0 data on version-0 weights
    assert on_policy >= 2, "expected the first step of each trainer to be on-policy"
    assert stale or not require_stale, "expected a step trained only on data from older weights"


# ---------------------------------------------------------------------------- runs
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.redis
def test_group_sampling_two_fsdp_trainers_one_generator(policy_dir, redis_url, stream, tmp_path):
    rec = tmp_path / "rec"
    code, out, secs = _train(
        [
            "experiment=cispo_countdown",
            *_base(policy_dir, redis_url, stream, rec),
            "trainer.max_steps=5",
            "data.max_lag=1",
            "module.optimizer.lr=0.01",  # big steps: a stale trajectory's ratio visibly moves off 1
            "module.scheduler=null",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert code == 0, out[-6000:]
    accts = _check_run(rec, tmp_path / "run", redis_url, stream, max_lag=1, policy_dir=policy_dir)

    _check_ratios(accts, rec, policy_dir)

    # one run directory (ranks make none of their own), finished results from rank 0, an export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec", "run"]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["global_step"] == 5 and "final/eval/mean@2" in res
    assert res["compute/generated_tokens"] > 0 and "perf/weight_sync_seconds" in res
    assert (tmp_path / "run" / "policy" / "model.safetensors").exists()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert "generator 0 (rank 2): stopped (done)" in out


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.redis
def test_mcts_under_hydra_multirun_keeps_one_job_directory(policy_dir, redis_url, stream, tmp_path):
    pytest.importorskip("tsd.rollouts.mcts")
    rec = tmp_path / "rec"
    sweep = tmp_path / "multirun"
    code, out, secs = _train(
        [
            "-m",
            "experiment=mcts_countdown",
            *_base(policy_dir, redis_url, stream, rec),
            "rollout.workers=2",
            "rollout.completions_per_node=2",
            "rollout.iterations=2",
            "data.sync_every=2",  # lags of 0 and 1 step between publications
            "data.max_lag=3",
            "trainer.max_steps=4",
            "callbacks.eval.at_start=false",
            "callbacks.checkpoint=null",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert code == 0, out[-6000:]
    jobs = [p for p in sweep.iterdir() if p.is_dir()]
    assert len(jobs) == 1, f"extra run directories: {sorted(p.name for p in sweep.iterdir())}"
    accts = _check_run(rec, jobs[0], redis_url, stream, max_lag=3, policy_dir=policy_dir)
    _check_ratios(accts, rec, policy_dir, require_stale=False)
    assert all(
        v % 2 == 0 for a in accts for s in a["steps"] for v in s["versions"]
    )  # published every 2 steps
    res = json.loads((jobs[0] / "results.json").read_text())
    assert res["global_step"] == 4
    # the search ran on the generator rank; its statistics reach the trainers' logs with the batches
    assert res["search/tree_size"] >= 1 and 0 <= res["search/terminal_fraction"] <= 1
    assert res["perf/rollout_seconds"] > 0


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.redis
def test_bf16_run_from_a_checkpoint_without_value_head_trains_fp32_masters(
    policy_dir, redis_url, stream, tmp_path
):
    """The article's run: a bf16 checkpoint without a value head, model.dtype=bfloat16, the
    article's lr. Before, both FSDP2 trainers raised ``FSDP expects uniform original parameter
    dtype`` at their first forward (a bf16 root unit beside a fresh fp32 value head). Now: fp32
    master shards that move at lr 5e-6, the generator receives the LM in bf16 and the value head in
    fp32, the export and the checkpoint hold what they should."""
    import shutil

    from safetensors.torch import load_file

    from tsd.models.loading import load_policy

    ckpt = tmp_path / "bf16"
    load_policy(policy_dir)[0].lm.to(torch.bfloat16).save_pretrained(ckpt, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(policy_dir) / name, ckpt / name)
    assert not (ckpt / "value_head").exists()
    rec = tmp_path / "rec"
    code, out, secs = _train(
        [
            "experiment=cispo_countdown",
            *_base(str(ckpt), redis_url, stream, rec),
            "model.dtype=bfloat16",
            "module.optimizer.lr=5e-6",  # the article's
            "loss.c_value=1.0",  # the article's MCTS and best-of-N runs train the value head
            "module.activation_checkpointing=true",
            "module.micro_batch_size=2",
            "trainer.max_steps=3",
            "callbacks.checkpoint.every_n_train_steps=1",  # last.ckpt holds step 3
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert code == 0, out[-6000:]
    initial = load_file(str(ckpt / "model.safetensors"))  # bf16
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {v.dtype for k, v in state.items() if k.startswith("policy.")} == {torch.float32}
    moved = sum(int((state[f"policy.lm.{k}"] != v.float()).sum()) for k, v in initial.items())
    assert moved / sum(v.numel() for v in initial.values()) >= 0.9
    synced = sorted(rec.glob("gen_v*.pt"))
    assert synced, "the generator never received weights"
    for path in synced:
        gen = torch.load(path, weights_only=True)
        sent = torch.load(rec / path.name.replace("gen_", "trainer_"), weights_only=True)
        assert {v.dtype for k, v in gen.items() if k.startswith("lm.")} == {torch.bfloat16}
        assert {v.dtype for k, v in gen.items() if k.startswith("value_head.")} == {torch.float32}
        assert all(torch.equal(gen[k], sent[k]) for k in sent)
    exported = load_file(str(tmp_path / "run" / "policy" / "model.safetensors"))
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}


# ---------------------------------------------------------------------------- faults
FAULT = ["callbacks.eval=null", "callbacks.checkpoint=null", "callbacks.export=null"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.redis
def test_dead_generator_stops_the_trainers_with_a_clear_error(policy_dir, redis_url, stream, tmp_path):
    code, out, secs = _train(
        [
            "experiment=cispo_countdown",
            *_base(policy_dir, redis_url, stream, tmp_path / "rec"),
            *FAULT,
            "+sampler.die_after=2",  # SIGKILL in its third rollout
            "trainer.max_steps=50",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert code != 0
    assert "rank 2 (generator 0 of 1) failed" in out and "SIGKILL" in out, out[-4000:]
    assert secs < RUN_TIMEOUT


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.redis
def test_hung_generator_trips_max_wait_on_the_trainers(policy_dir, redis_url, stream, tmp_path):
    code, out, secs = _train(
        [
            "experiment=cispo_countdown",
            *_base(policy_dir, redis_url, stream, tmp_path / "rec"),
            *FAULT,
            "+sampler.hang_after=1",  # one rollout (16 trajectories), then alive but silent
            "data.max_wait=5",
            "trainer.max_steps=50",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert code != 0
    assert "(trainer" in out and "no trajectory arrived for 5s (data.max_wait)" in out, out[-4000:]
    assert secs < RUN_TIMEOUT


def _id_key(eid: str | bytes) -> tuple[int, int]:
    ms, seq = (eid.decode() if isinstance(eid, bytes) else eid).split("-")
    return int(ms), int(seq)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.redis
def test_resume_after_a_killed_trainer_trains_only_what_its_own_generators_write(
    policy_dir, redis_url, stream, tmp_path
):
    """Run A: trainer rank 1 is SIGKILLed after receiving its batch of step 3 (before the step, so
    before the ack); the job stops, and nothing is lost with the trainer: its entries are still in
    the run's stream. Run B resumes from A's last checkpoint (step 2), into another directory: it
    keeps the run id (the same stream), drops everything A left there (pending or not: A's
    generator kept writing after the checkpoint, with weights B does not have) and trains only
    entries its own generator wrote after B started, none of them ahead of the trainers."""
    rec_a, rec_b = tmp_path / "a", tmp_path / "b"
    no_eval = ["callbacks.eval=null", "callbacks.export=null"]
    code, out, _ = _train(
        [
            "experiment=cispo_countdown",
            *_base(policy_dir, redis_url, stream, rec_a),
            *no_eval,
            "callbacks.checkpoint.every_n_train_steps=1",
            "+callbacks.acct.kill_rank=1",
            "+callbacks.acct.kill_at_step=2",
            "trainer.max_steps=50",
            f"hydra.run.dir={tmp_path / 'run_a'}",
        ],
        tmp_path,
    )
    assert code != 0 and "rank 1 (trainer 1 of 2) failed" in out, out[-4000:]
    held = json.loads((rec_a / "killed_rank1.json").read_text())
    client = redis.Redis.from_url(redis_url)
    left = [eid.decode() for eid, _ in client.xrange(_key(stream))]
    assert held and set(held) <= set(left)  # nothing was lost with the trainer
    ckpt = tmp_path / "run_a" / "checkpoints" / "last.ckpt"
    step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    assert step == 2

    code, out, _ = _train(
        [
            "experiment=cispo_countdown",
            *_base(policy_dir, redis_url, stream, rec_b),
            *no_eval,
            "callbacks.checkpoint=null",
            f"ckpt_path={ckpt}",
            "trainer.max_steps=4",
            "data.sync_every=8",  # no publication in steps 3-4: only the one at start, of step 2
            f"hydra.run.dir={tmp_path / 'run_b'}",
        ],
        tmp_path,
    )
    client.close()
    assert code == 0, out[-6000:]
    assert f"dropped {len(left)} records an earlier incarnation of run {RUN_ID} left" in out
    steps = [s for r in (0, 1) for s in json.loads((rec_b / f"acct_rank{r}.json").read_text())["steps"]]
    trained = [i for s in steps for i in s["ids"]]
    assert len(steps) == 4 and len(trained) == 16  # steps 3 and 4 on both trainers, 4 each
    assert not set(trained) & set(left)
    assert all(_id_key(i) > _id_key(left[-1]) for i in trained)  # written after B started
    _check_lags(steps, max_lag=4)
    # the generators restarted with the initial weights (version 0) until the checkpoint's (step 2)
    # arrived: every trajectory is one or the other, and its lag counts the steps since it
    assert {v for s in steps for v in s["versions"]} <= {0, 2}
    assert all(s["published"] == [0, 2] for s in steps), steps


def _rank_pids(parent: int) -> list[int]:
    """The processes ``parent`` forked as ranks: its children running the same command line (not
    e.g. multiprocessing's resource tracker)."""

    def cmdline(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""

    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent and cmdline(int(d.name)) == cmdline(parent):
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not reaped by whoever adopted it, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_ranks_die_with_the_launcher(sig, policy_dir, redis_url, stream, tmp_path):
    """``train.py`` (the launcher) is killed while its three forked ranks train; they must stop
    with it instead of training on to max_steps. It is started the way ``python train.py ... &`` in
    a script starts it: with SIGINT ignored (a non-interactive shell does that to background
    jobs), which the ranks inherit, so torch's own parent-death signal for its forked children
    (SIGINT) does nothing."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
    }
    args = [
        "experiment=cispo_countdown",
        *_base(policy_dir, redis_url, stream, tmp_path / "rec"),
        *FAULT,
        "trainer.max_steps=100000",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not any("step 2/100000" in line for line in lines):  # the ranks are training
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
            time.sleep(0.2)
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 3, (ranks, "".join(lines)[-2000:])
        t0 = time.monotonic()
        os.kill(proc.pid, sig)  # the launcher only, not its process group
        while any(_alive(pid) for pid in ranks) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        print(f"{sig.name}: all ranks gone {seconds:.2f}s after the launcher was killed")
        assert not any(_alive(pid) for pid in ranks), f"ranks still running {seconds:.0f}s after {sig.name}"
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _rank_pids(proc.pid) if proc.poll() is None else []:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------- config errors (in process)
def _compose(overrides, tmp_path):
    from conftest import compose_train

    return compose_train(overrides, tmp_path)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table (Linux)")
def test_what_a_dead_rank_started_is_ended_with_its_process_group():
    """A forked rank leads its own process group; an engine process it started (vLLM's, in its own
    process) stays in that group when the rank dies, re-parented to init and holding its memory
    (the rehearsal found two such engines of 3.3 GB each after OOM-killed ranks); the launcher ends
    the group at the end, however the rank ended."""
    from types import SimpleNamespace

    from tsd.distributed.launcher import GeneratorTrainerLauncher

    code = (
        "import os, subprocess, time\n"
        "os.setpgid(0, 0)  # as GeneratorTrainerLauncher._wrapping_function does\n"
        "engine = subprocess.Popen(['sleep', '120'])\n"
        "print(engine.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    rank = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    engine = int(rank.stdout.readline())
    rank.kill()  # the OOM killer's SIGKILL
    rank.wait()
    rank.stdout.close()
    time.sleep(0.2)
    assert _alive(engine)  # orphaned: nothing else would end it
    launcher = GeneratorTrainerLauncher.__new__(GeneratorTrainerLauncher)
    launcher.procs = [SimpleNamespace(pid=rank.pid)]
    launcher._end_rank_groups()
    deadline = time.monotonic() + 10
    while _alive(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(engine)


@pytest.mark.redis
def test_redis_down_at_start_fails_fast_with_the_url(policy_dir, tmp_path):
    from tsd.config import ConfigError
    from tsd.train import train

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    cfg = _compose(
        [
            "debug=smoke",
            "strategy=generator_trainer",
            "buffer=redis",
            "trainer.devices=3",
            f"model.name_or_path={policy_dir}",
            f"buffer.url={url}",
            "+buffer.connect_timeout=2",
        ],
        tmp_path,
    )
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach Redis at redis://127.0.0.1"):
        train(cfg)
    assert time.monotonic() - t0 < 60


@pytest.mark.redis
@pytest.mark.parametrize(
    "overrides,match",
    [
        (["buffer=memory", "trainer.devices=3"], "use buffer=redis"),
        (["buffer=redis", "buffer.url={redis_url}", "trainer.devices=1"], "leave no trainer"),
    ],
)
def test_misconfiguration_is_refused_before_any_process_starts(
    policy_dir, redis_url, tmp_path, overrides, match
):
    from tsd.config import ConfigError
    from tsd.train import train

    cfg = _compose(
        [
            "debug=smoke",
            "strategy=generator_trainer",
            f"model.name_or_path={policy_dir}",
            *(o.format(redis_url=redis_url) for o in overrides),
        ],
        tmp_path,
    )
    with pytest.raises(ConfigError, match=match):
        train(cfg)


# ---------------------------------------------------------------------------- weight sync, in process
def test_weight_layout_round_trip_and_fingerprint():
    from tsd.distributed.weight_sync import WeightLayout

    state = {
        "b.weight": torch.randn(3, 4),
        "a.bias": torch.randn(5).to(torch.bfloat16),
        "c.steps": torch.arange(6).view(2, 3),
        "a.weight": torch.randn(2, 2),
    }
    layout = WeightLayout.of(state)
    assert layout.names == ("a.bias", "a.weight", "b.weight", "c.steps")  # sorted: same on every rank
    buckets = layout.flatten(state, torch.device("cpu"))
    assert [b.dtype for b in buckets] == [torch.bfloat16, torch.float32, torch.int64]  # one per dtype
    assert [b.numel() for b in buckets] == [5, 4 + 12, 6] and layout.numel == 27
    back = layout.unflatten([b.clone() for b in buckets])
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert WeightLayout.of(dict(state)).fingerprint == layout.fingerprint
    other = WeightLayout.of({**state, "b.weight": torch.randn(4, 3)})  # same numel, other shape
    assert other.fingerprint != layout.fingerprint


def _pair(layout_a, layout_b):
    """A sender and a receiver on a 2-member gloo sync group inside this process (two threads)."""
    import torch.distributed as dist

    from tsd.distributed.weight_sync import ControlChannel, WeightReceiver, WeightSender, sync_group

    store = dist.HashStore()
    groups = [None, None]

    def make(rank):
        groups[rank] = sync_group(dist.PrefixStore("sync/", store), rank, 2, "gloo", timedelta(seconds=30))

    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    control = ControlChannel(store)
    cpu = torch.device("cpu")
    return (
        WeightSender(layout_a, groups[0], cpu),
        WeightReceiver(layout_b, groups[1], cpu, control, wait_s=30),
        control,
    )


def test_sync_protocol_stages_the_newest_version_then_stops(random_policy):
    from tsd.distributed.weight_sync import WeightLayout

    state = random_policy.state_dict()
    sender, receiver, control = _pair(WeightLayout.of(state), WeightLayout.of(state))
    t = threading.Thread(target=receiver.handshake)
    t.start()
    sender.handshake()
    t.join()
    receiver.start()
    new = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    nbytes = sender.send(new, 3, control)  # blocks until the receiver thread took it
    # the tied embedding (lm_head.weight is embed_tokens.weight) crosses the wire once
    tied = state["lm.model.embed_tokens.weight"]
    assert sender.layout.aliases == (("lm.lm_head.weight", "lm.model.embed_tokens.weight"),)
    assert (
        nbytes
        == sum(v.numel() * v.element_size() for v in state.values()) - tied.numel() * tied.element_size()
    )
    deadline = time.monotonic() + 30
    while (staged := receiver.take()) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert staged is not None
    got, version = staged
    assert version == 3 and all(torch.equal(got[k], new[k]) for k in new)
    assert got["lm.lm_head.weight"].data_ptr() == got["lm.model.embed_tokens.weight"].data_ptr()  # tied again
    assert receiver.take() is None  # taken once
    control.stop("done")
    assert receiver.stopped.wait(30) and receiver.stop_reason == "done"
    receiver.check()  # no error


def test_generator_with_another_model_fails_at_the_handshake(random_policy, char_tokenizer):
    from conftest import make_random_policy

    from tsd.distributed.weight_sync import LayoutMismatchError, WeightLayout

    other = make_random_policy(char_tokenizer, hidden=48).state_dict()
    sender, receiver, _ = _pair(WeightLayout.of(random_policy.state_dict()), WeightLayout.of(other))
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(LayoutMismatchError, receiver.handshake)))
    t.start()
    sender.handshake()
    t.join()
    assert errors and "same model.name_or_path" in str(errors[0].value)


# ---------------------------------------------------------------------------- bucketed gather, 3 gloo processes
def _gather_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from conftest import make_random_policy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tsd.distributed.gather import gather_full_state
    from tsd.models.char_tokenizer import build_char_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        policy = make_random_policy(build_char_tokenizer(), hidden=48, layers=3)  # the same on every rank
        reference = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        mesh = init_device_mesh("cpu", (world,))
        for block in policy.transformer_blocks():
            fully_shard(block, mesh=mesh)
        fully_shard(policy, mesh=mesh)
        bucketed = gather_full_state(policy, dst=0, bucket_bytes=8192)  # small: many buckets
        per_tensor = get_model_state_dict(
            policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            assert list(bucketed) == list(reference), "same keys, in state_dict order"
            for k, v in reference.items():
                assert bucketed[k].shape == v.shape and torch.equal(bucketed[k], v), k
                assert torch.equal(bucketed[k], per_tensor[k]), k
            Path(out).write_text(json.dumps({"tensors": len(bucketed)}))
        else:
            assert bucketed is None
        # leave together: a rank that tore its group down while rank 0 (the store's host) was still
        # checking once died in gloo's teardown (SIGABRT, "terminate called without an active
        # exception"), failing a test whose gather was right
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # and leave without the interpreter's and libtorch's exit-time destructors: 3 of 30 spawned
    # rank sets (this box, 2 cores) had one rank abort after its function had returned ("terminate
    # called without an active exception", faulthandler: no Python frame left), a fault of
    # torch's teardown at process exit, not of the gather this test checks; everything the test
    # reads was written (and flushed) above, and a failed assertion still exits non-zero (raised
    # before this line)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.distributed
def test_bucketed_gather_of_fsdp2_shards_equals_the_per_tensor_gather(tmp_path):
    """FSDP2 shards a 89-row embedding over 3 ranks as 30 + 30 + 29 rows; the flat-bucket gather
    rebuilds every tensor bit for bit as get_model_state_dict does (and as it was unsharded)."""
    import torch.multiprocessing as mp

    out = tmp_path / "gathered.json"
    # spawn, not fork: forked from the suite's process (threads of earlier tests alive), the ranks
    # once hung for the whole 600 s timeout; a spawned rank starts from a clean interpreter
    mp.start_processes(_gather_rank, args=(3, free_port(), str(out)), nprocs=3, start_method="spawn")
    assert json.loads(out.read_text())["tensors"] > 20


# ---------------------------------------------------------------------------- multi-node liveness, in process
def _watches(port: int, world: int, fails: list[str], timeout_s: float = 1.0):
    from tsd.distributed.peers import PeerWatch

    return [
        PeerWatch(
            "127.0.0.1", port, r, world, lambda i: f"rank {i}", timeout_s, interval_s=0.05, fail=fails.append
        )
        for r in range(world)
    ]


def test_peer_watch_names_a_rank_that_falls_silent_but_not_one_that_finished():
    """Three ranks beat on a real TCPStore: rank 1 finishes (says so, then stops), rank 2 stops
    beating without a word (its node died); rank 0 names rank 2, and only rank 2."""
    master = torch.distributed.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False)
    fails: list[str] = []
    w0, w1, w2 = (w.start() for w in _watches(master.port, 3, fails))
    try:
        w1.stop()  # finished: marks itself done
        w2._stop.set()  # silent: as if its node were gone
        t0 = time.monotonic()
        while not fails and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert fails == [
            "rank 0: rank 2 gave no sign of life for 1 s (strategy.peer_timeout_s): its node is gone or hung; stopping"
        ]
        assert 0.9 < time.monotonic() - t0 < 5
    finally:
        w0.stop()


def test_peer_watch_says_when_the_jobs_store_is_gone():
    """The store's host (node 0 of a cluster) dies: the watch says so within a few beats."""
    port = free_port()
    code = (
        "import sys, time, torch.distributed as d\n"
        f"s = d.TCPStore('127.0.0.1', {port}, is_master=True, wait_for_workers=False)\n"
        "print('up', flush=True); time.sleep(60)\n"
    )
    host = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline().strip() == "up"
        fails: list[str] = []
        (w,) = _watches(port, 1, fails, timeout_s=5.0)
        w.start()
        host.kill()
        host.wait(timeout=10)
        t0 = time.monotonic()
        while not fails and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert len(fails) == 1 and f"the job's store at 127.0.0.1:{port} cannot be reached" in fails[0], fails
        assert time.monotonic() - t0 < 5
        w.stop()
    finally:
        host.kill()
        host.stdout.close()


def test_a_rank_with_another_run_id_is_refused_by_name():
    """A node started in another directory derives another run id, so another stream: refused at
    the rendezvous with one line naming run_id, instead of a trainer waiting data.max_wait."""
    from tsd.config import ConfigError
    from tsd.distributed.strategy import GeneratorTrainerStrategy

    class Rank1(GeneratorTrainerStrategy):
        global_rank = 1  # type: ignore[assignment]
        num_trainers = 1  # type: ignore[assignment]

    store = torch.distributed.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False)
    store.set("tsd/identity", json.dumps({"buffer": "tsd:trajectories:aaaa"}))
    s = Rank1()
    s._store, s.job_identity = store, {"buffer": "tsd:trajectories:bbbb"}
    with pytest.raises(
        ConfigError, match=r"^run_id: rank 1 \(generator 0 of 1\) on .* has .*bbbb.*, rank 0 has .*aaaa"
    ):
        s._agree_on_identity()
    s.job_identity = {"buffer": "tsd:trajectories:aaaa"}
    s._agree_on_identity()  # the same: accepted
