"""Nothing foreign gets trained: each run has its own Redis stream (``<stream>:<run_id>``), a
resume keeps its run's id and starts from an empty stream, and the run id a checkpoint carries is
the one a resume reads. Single-process runs on a real redis-server (the distributed resume, with
real processes, is in test_distributed.py).

    python -m pytest tests/test_isolation.py -q
"""

from __future__ import annotations

import csv
import uuid
from pathlib import Path

import lightning as L
import pytest
import redis
from conftest import compose_train

from tsd.config import ConfigError
from tsd.resume import CheckpointInfo, resolve_run_id
from tsd.rollouts.group import GroupRollout

SMALL = [
    "experiment=cispo_countdown",
    "debug=smoke",
    "buffer=redis",
    "callbacks.eval=null",
    "callbacks.export=null",
    "callbacks.checkpoint.every_n_train_steps=1",
]


def test_run_id_is_the_checkpoints_on_resume_else_configured_else_from_the_run_directory(tmp_path):
    ckpt = CheckpointInfo(path=tmp_path / "last.ckpt", global_step=2, run_id="abc123")
    assert resolve_run_id(None, ckpt, tmp_path / "new_dir") == "abc123"
    assert resolve_run_id("abc123", ckpt, tmp_path) == "abc123"
    with pytest.raises(ConfigError, match="run_id: 'other' differs from the checkpoint's 'abc123'"):
        resolve_run_id("other", ckpt, tmp_path)
    assert resolve_run_id("mine", None, tmp_path) == "mine"
    a, b = resolve_run_id(None, None, tmp_path / "a"), resolve_run_id(None, None, tmp_path / "b")
    assert a != b and len(a) == 16 and a == resolve_run_id(None, None, tmp_path / "x" / ".." / "a")
    old = CheckpointInfo(path=tmp_path / "old.ckpt", global_step=2, run_id=None)  # before run ids
    assert resolve_run_id(None, old, tmp_path / "a") == a
    with pytest.raises(ConfigError, match="run_id"):
        resolve_run_id("no spaces", None, tmp_path)


def test_a_checkpoint_from_before_the_policy_clock_is_refused_with_one_line(tmp_path):
    """Versions used to count weight syncs: resuming such a checkpoint would read its versions as
    optimiser steps (and fail on its missing clock state); it is refused before anything loads."""
    import torch

    from tsd.resume import read_checkpoint

    old = tmp_path / "old.ckpt"
    torch.save(
        {"global_step": 4, "state_dict": {}, "TrajectoryDataModule": {"run_id": "r1", "trainer_version": 2}},
        old,
    )
    with pytest.raises(ConfigError, match="ckpt_path: .* before policy versions counted optimiser steps"):
        read_checkpoint(old)


class Interrupt(L.Callback):
    """Stops the run with an error after optimiser step ``at_step``: a run that dies (a crash, a
    lost node) instead of finishing; it leaves its stream behind (to expire), where a finished run
    deletes it."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError(f"interrupted after step {self.at_step}")


def _interrupt(at_step: int) -> list[str]:
    return [
        "+callbacks.interrupt._target_=test_isolation.Interrupt",
        f"+callbacks.interrupt.at_step={at_step}",
    ]


def _train(overrides: list[str], out: Path, redis_url: str, prefix: str) -> dict:
    from tsd.train import train

    return train(
        compose_train([*SMALL, f"buffer.url={redis_url}", f"buffer.stream={prefix}", *overrides], out)
    )


def _lags(out: Path) -> list[float]:
    with open(out / "csv" / "metrics.csv") as f:
        return [float(r["train/policy_lag"]) for r in csv.DictReader(f) if r.get("train/policy_lag")]


@pytest.fixture
def prefix(redis_url):
    p = f"tsd-test:iso:{uuid.uuid4().hex[:8]}"
    yield p
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{p}*"):
        client.delete(key)
    client.close()


@pytest.mark.slow
@pytest.mark.redis
def test_two_runs_on_one_server_never_read_each_others_trajectories(policy_dir, redis_url, prefix, tmp_path):
    """Run A dies after step 3 and leaves trajectories behind (a rollout makes 16, three steps
    train 12); run B, on the same server with the same buffer config, has its own stream and never
    sees them: with one shared stream it trained A's leftovers, versions ahead of its own (lag < 0)."""
    model = f"model.name_or_path={policy_dir}"
    a_id = "run-a"
    with pytest.raises(RuntimeError, match="interrupted after step 3"):
        _train([model, f"run_id={a_id}", *_interrupt(3)], tmp_path / "a", redis_url, prefix)
    client = redis.Redis.from_url(redis_url)
    key_a = f"{prefix}:{a_id}"
    left_a = [eid for eid, _ in client.xrange(key_a)]
    assert left_a, "run A should leave trajectories in its stream"
    assert 0 < client.pttl(key_a) <= 86400 * 1000  # and they expire (buffer.ttl_s)
    b = _train([model], tmp_path / "b", redis_url, prefix)
    assert b["run_id"] != a_id
    assert [eid for eid, _ in client.xrange(key_a)] == left_a  # untouched: B never read them
    # B finished: its stream (with B's own leftovers) is gone, A's (a dead run's) is still there
    assert b["buffer/left"] > 0 and not client.exists(f"{prefix}:{b['run_id']}")
    client.close()
    assert all(lag >= 0 for lag in _lags(tmp_path / "b")), _lags(tmp_path / "b")
    assert b["buffer/dropped_invalid"] == 0.0


@pytest.mark.slow
@pytest.mark.redis
def test_finished_runs_leave_no_stream_and_their_dead_letters_expire(policy_dir, redis_url, prefix, tmp_path):
    """Two finished runs on one server: neither stream is left (each held trajectories no step
    trained when it ended), and the dead letters of the one that rejected records expire after
    buffer.dead_ttl_s."""
    model = f"model.name_or_path={policy_dir}"
    poison = ["rollout._target_=test_isolation.PoisonedGroupRollout", "+rollout.poison=3"]
    a = _train([model], tmp_path / "a", redis_url, prefix)
    b = _train([model, *poison, "buffer.dead_ttl_s=600"], tmp_path / "b", redis_url, prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        for r in (a, b):
            assert r["buffer/produced"] > r["buffer/left"] > 0  # there was something to delete
            assert not client.exists(f"{prefix}:{r['run_id']}")
        assert not client.exists(f"{prefix}:{a['run_id']}:dead")  # A rejected nothing
        dead = f"{prefix}:{b['run_id']}:dead"
        assert b["buffer/dropped_invalid"] == 3 == b["buffer/dead_letters"] == client.xlen(dead)
        assert 0 < client.pttl(dead) <= 600 * 1000
        assert sorted(k.decode() for k in client.scan_iter(f"{prefix}:*")) == [dead]
    finally:
        client.close()


class PoisonedGroupRollout(GroupRollout):
    """GroupRollout whose first ``poison`` trajectories claim a policy version far ahead of any
    trainer (another run's records, as a trainer sees them): each one is dead-lettered."""

    def __init__(self, *args, poison: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poison = poison

    def run(self, problems, sampler, env):
        out = super().run(problems, sampler, env)
        for t in out.trajectories[: self.poison]:
            t.policy_version = 10**6
        self.poison = max(0, self.poison - len(out.trajectories))
        return out


@pytest.mark.slow
@pytest.mark.redis
def test_resume_keeps_the_run_id_and_drops_what_the_interrupted_run_left(
    policy_dir, redis_url, prefix, tmp_path, caplog
):
    """A resume reads its run's stream (the run id comes from the checkpoint, whatever directory
    it resumes into) but not what an interrupted incarnation left there after the checkpoint:
    run A stops at step 2 (its checkpoint is kept), A2 resumes it and dies after step 3 leaving
    trajectories behind, then B resumes from the step-2 checkpoint again."""
    import shutil

    model = f"model.name_or_path={policy_dir}"
    a = _train([model, "trainer.max_steps=2"], tmp_path / "a", redis_url, prefix)
    ckpt = tmp_path / "step2.ckpt"
    shutil.copy(tmp_path / "a" / "checkpoints" / "last.ckpt", ckpt)
    with pytest.raises(RuntimeError, match="interrupted after step 3"):  # A2 dies after step 3
        _train([model, f"ckpt_path={ckpt}", *_interrupt(3)], tmp_path / "a2", redis_url, prefix)
    client = redis.Redis.from_url(redis_url)
    key = f"{prefix}:{a['run_id']}"
    left = [eid for eid, _ in client.xrange(key)]
    assert left, "A2 should leave trajectories in the run's stream"
    with caplog.at_level("WARNING", logger="tsd.train"):
        b = _train([model, "trainer.max_steps=4", f"ckpt_path={ckpt}"], tmp_path / "b", redis_url, prefix)
    assert b["run_id"] == a["run_id"] and b["global_step"] == 4
    assert any(f"dropped {len(left)} records" in r.getMessage() for r in caplog.records)
    after = [eid for eid, _ in client.xrange(key)]
    client.close()
    assert not set(left) & set(after) and all(_id_key(e) > _id_key(left[-1]) for e in after)
    assert all(lag >= 0 for lag in _lags(tmp_path / "b")), _lags(tmp_path / "b")


def _id_key(eid: bytes) -> tuple[int, int]:
    ms, seq = eid.decode().split("-")
    return int(ms), int(seq)
