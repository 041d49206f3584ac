"""Hostile and foreign records never reach a batch: the schema (no model needed), the checks
against the model and the trainer (:class:`RecordCheck`, the DataModule), dead letters with their
reason on both buffers (a real redis-server for Redis), and ``buffer/dropped_invalid`` in the logs
of a real training run.

    python -m pytest tests/test_records.py -q
"""

from __future__ import annotations

import copy
import csv
import json
import uuid

import pytest
import redis
from conftest import compose_train

from tsd.buffers.memory import MemoryBuffer
from tsd.buffers.redis import RedisBuffer
from tsd.data.datamodule import TrajectoryDataModule
from tsd.data.record_check import RecordCheck
from tsd.rl.trajectory import MAX_TOKENS, Trajectory, TrajectoryError
from tsd.rollouts.group import GroupRollout

VOCAB, CONTEXT = 89, 512


def record(**kw) -> dict:
    fields = dict(
        problem_id=1,
        prompt_ids=[1, 5, 6],
        completion_ids=[7, 8],
        behaviour_logprobs=[-0.1, -0.2],
        reward=0.5,
        correct=False,
        policy_version=3,
        rollout="test",
    )
    fields.update(kw)
    return fields


def traj(**kw) -> Trajectory:
    return Trajectory(**record(**kw))


# ---------------------------------------------------------------------------- the schema
@pytest.mark.parametrize(
    "raw,field",
    [
        ('"behaviour_logprobs": [-Infinity, -0.2]', "not valid JSON"),  # not JSON at all
        ('"behaviour_logprobs": [NaN, -0.2]', "not valid JSON"),
        ('"stats": {"x": Infinity}', "not valid JSON"),
        ('"behaviour_logprobs": [-1e308, -0.2]', "behaviour_logprobs"),  # finite, but -inf in float32
        ('"behaviour_logprobs": [1e308, -0.2]', "behaviour_logprobs"),
        ('"behaviour_logprobs": [-1e999, -0.2]', "behaviour_logprobs"),  # JSON overflow -> -inf
        ('"stats": {"x": 1e999}', "stats"),
        ('"stats": {"x": 1e300}', "stats"),
        ('"advantage": 1e300', "advantage"),
        ('"reward": true', "reward"),
        ('"prompt_ids": []', "prompt_ids"),
        ('"completion_ids": [7, 99999999999999999999]', "completion_ids"),  # past int64
        ('"completion_ids": [7, -1]', "completion_ids"),
        ('"policy_version": -1', "policy_version"),
        ('"policy_version": 1e9', "policy_version"),  # a float is no version
        ('"problem_id": 99999999999999999999999', "problem_id"),
        ('"behaviour_logprobs": [-0.1]', "behaviour_logprobs"),  # lengths disagree
    ],
)
def test_schema_refuses_non_finite_and_out_of_range_values(raw, field):
    good = json.loads(traj().to_json())
    key = raw.split('"')[1]
    text = json.dumps({k: v for k, v in good.items() if k != key})[:-1] + ", " + raw + "}"
    with pytest.raises(TrajectoryError, match=field):
        Trajectory.from_json(text)


def test_schema_keeps_what_real_runs_produce():
    t = traj(
        behaviour_logprobs=[-103.2, -1e-9],
        advantage=-3.9,
        stats={"gen_tokens": 2.5e9, "search/tree_size": 130.0},
        policy_version=0,
    )
    assert Trajectory.from_json(t.to_json()) == t


# ---------------------------------------------------------------------------- against the model
def test_record_check_names_what_the_model_cannot_take():
    check = RecordCheck(VOCAB, CONTEXT)
    assert check.reason(traj()) is None
    assert "completion_ids: token id 5000" in check.reason(traj(completion_ids=[7, 5000]))
    assert "prompt_ids: token id 89" in check.reason(traj(prompt_ids=[1, 89]))
    long = traj(prompt_ids=[1] * 65_000, completion_ids=[7, 8])  # within the schema's MAX_TOKENS
    assert MAX_TOKENS >= 65_002 and "65002 tokens" in check.reason(long)
    with pytest.raises(ValueError, match="vocab_size"):
        RecordCheck(0, CONTEXT)


def test_record_check_reads_the_policy(random_policy):
    check = RecordCheck.for_policy(random_policy)
    assert check.vocab_size == random_policy.lm.get_input_embeddings().num_embeddings
    assert check.max_seq_len == random_policy.config.max_position_embeddings


def _hostile_mix() -> list[Trajectory]:
    """Two good records and, in between, one of each kind that must not be trained."""
    return [
        traj(problem_id=0),
        traj(problem_id=1, completion_ids=[7, 5000]),  # past the vocabulary: IndexError in the trainer
        traj(problem_id=2, prompt_ids=[1] * 65_000),  # asks a 512-position model for ~67 GB
        traj(problem_id=3, policy_version=10**9),  # "from the future": another run's record
        traj(problem_id=4, policy_version=4),  # one version ahead of the trainer
        traj(problem_id=5),
    ]


def _datamodule(buffer) -> TrajectoryDataModule:
    from tsd.envs.countdown import CountdownEnv
    from tsd.generation.remote import RemoteGeneration
    from tsd.samplers.hf import HFSampler

    elsewhere = RemoteGeneration(GroupRollout(), CountdownEnv(n_train=4, n_test=1), HFSampler, None, buffer)
    dm = TrajectoryDataModule(
        buffer,
        elsewhere,
        batch_size=2,
        max_lag=4,
        pad_id=0,
        max_wait=5,
        get_timeout=0.2,
        record_check=RecordCheck(VOCAB, CONTEXT),
    )
    dm.clock.advance(3)  # the trainer is at optimiser step 3
    return dm


def _check_rejected(buffer, dm, batch):
    assert batch.input_ids.shape == (2, 5)  # the 65,000-token record never reached collation
    assert dm.stats()["buffer/dropped_invalid"] == 4.0
    dead = buffer.dead_letters()
    assert len(dead) == 4
    reasons = [d["reason"] for d in dead]
    assert "token id 5000 is outside the model's vocabulary (89 ids)" in reasons[0]
    assert "65002 tokens, more than the model's context (512)" in reasons[1]
    assert "policy_version 1000000000 is ahead of the trainer's step 3" in reasons[2]
    assert "policy_version 4 is ahead of the trainer's step 3" in reasons[3]
    assert json.loads(dead[0]["record"])["problem_id"] == 1  # the record itself is kept to debug
    assert buffer.pending() == 2  # only the batch's two: the rejected ones are acked
    dm.ack(batch.buffer_ids)
    assert buffer.pending() == 0 and len(buffer) == 0


def test_datamodule_rejects_to_dead_letters_and_trains_the_rest_memory():
    buf = MemoryBuffer()
    dm = _datamodule(buf)
    buf.put(_hostile_mix())
    batch = dm.next_batch()
    assert sorted(int(t) for t in batch.versions) == [3, 3]
    _check_rejected(buf, dm, batch)
    # the count survives a checkpoint
    state = dm.state_dict()
    dm2 = _datamodule(MemoryBuffer())
    dm2.load_state_dict(state)
    assert dm2.stats()["buffer/dropped_invalid"] == 4.0 and state["dropped_invalid"] == 4


@pytest.fixture
def stream(redis_url):
    key = f"tsd-test:records:{uuid.uuid4().hex[:8]}"
    yield key
    client = redis.Redis.from_url(redis_url)
    client.delete(key, f"{key}:dead")
    client.close()


@pytest.mark.redis
def test_redis_hostile_record_is_dead_lettered_once_and_cannot_crash_a_later_run(redis_url, stream):
    """The issue's crash loop: a record with a token id past the vocabulary used to raise in the
    trainer, stay pending, be reclaimed 30 s later and crash the next run too. Now the first
    consumer rejects it (acked, deleted, kept in ``<stream>:dead`` with the reason), and a later
    consumer that reclaims everything idle finds nothing."""
    producer = RedisBuffer(redis_url, stream=stream, block_ms=100)
    consumer = RedisBuffer(redis_url, stream=stream, block_ms=100)
    try:
        producer.put(_hostile_mix())
        dm = _datamodule(consumer)
        batch = dm.next_batch()
        _check_rejected(consumer, dm, batch)
        raw = redis.Redis.from_url(redis_url)
        dead = raw.xrange(f"{stream}:dead")
        raw.close()
        assert len(dead) == 4 and b"outside the model's vocabulary" in dead[0][1][b"reason"]
        later = RedisBuffer(redis_url, stream=stream, block_ms=100, claim_idle_ms=0)
        assert later.get(10, timeout=0.3) == [] and later.pending() == 0
        later.close()
    finally:
        producer.close()
        consumer.close()


# ---------------------------------------------------------------------------- in a real run
class HostileRollout(GroupRollout):
    """GroupRollout that adds, to every rollout, a record with a token id past the vocabulary and
    one claiming a policy version far ahead of the trainer (what another run's stream could hold)."""

    calls = 0

    def run(self, problems, sampler, env):
        out = super().run(problems, sampler, env)
        HostileRollout.calls += 1
        good = out.trajectories[0]
        past_vocab = copy.deepcopy(good)
        past_vocab.completion_ids = [*good.completion_ids[:-1], 5000]
        ahead = copy.deepcopy(good)
        ahead.policy_version = 10**9
        out.trajectories = [past_vocab, ahead, *out.trajectories]  # read first
        return out


@pytest.mark.slow
def test_dropped_invalid_reaches_the_run_log_and_training_goes_on(policy_dir, tmp_path):
    from tsd.train import train

    HostileRollout.calls = 0
    cfg = compose_train(
        [
            "experiment=cispo_countdown",
            "debug=smoke",
            f"model.name_or_path={policy_dir}",
            "rollout._target_=test_records.HostileRollout",
            "callbacks.eval=null",
            "callbacks.checkpoint=null",
        ],
        tmp_path,
    )
    res = train(cfg)
    assert res["global_step"] == 3 and res["skipped_steps"] == 0
    assert HostileRollout.calls >= 1
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 3
    logged = [float(r["buffer/dropped_invalid"]) for r in rows]
    assert logged == sorted(logged) and logged[-1] == 2 * HostileRollout.calls
    assert res["buffer/dropped_invalid"] == 2 * HostileRollout.calls
