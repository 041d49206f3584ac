"""Buffers: the shared contract on both MemoryBuffer and RedisBuffer, then Redis-only failure
modes (dead consumer, server down, passwords, hostile entries) against a real redis-server.

    python -m pytest tests/test_buffers.py -q
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from redis_server import MISSING_REASON, RedisServerNotFound, free_port, redis_server

from tsd.buffers.base import BufferClosedError, BufferConnectionError, BufferFullError, BufferItem
from tsd.buffers.memory import MemoryBuffer
from tsd.buffers.redis import RedisBuffer, redact_url
from tsd.rl.trajectory import Trajectory


def traj(i: int, n_tokens: int = 4, **kw) -> Trajectory:
    fields = dict(
        problem_id=i,
        prompt_ids=[1, 2, 3],
        completion_ids=list(range(10, 10 + n_tokens)),
        behaviour_logprobs=[-0.1 * (k + 1) for k in range(n_tokens)],
        reward=0.25,
        correct=False,
        policy_version=7,
        rollout="mcts",
    )
    fields.update(kw)
    return Trajectory(**fields)


def stream_id_key(eid: str) -> tuple[int, int]:
    ms, seq = eid.split("-")
    return int(ms), int(seq)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def redis_password_url():
    """A second server started with --requirepass (always local: the password is the point)."""
    try:
        with redis_server(password="s3cret-pw") as url:
            yield url
    except RedisServerNotFound:
        pytest.skip(reason=MISSING_REASON)


@pytest.fixture
def stream(request):
    """A fresh stream key per test, deleted afterwards (safe on a shared $TSD_TEST_REDIS_URL)."""
    key = f"tsd-test:{request.node.name[:40]}:{uuid.uuid4().hex[:8]}"
    yield key
    if "redis_url" in request.fixturenames:
        import redis

        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        client.delete(key)
        client.close()


@pytest.fixture
def make_redis(redis_url, stream):
    """Factory for RedisBuffers on this test's stream; closes them all at the end."""
    made: list[RedisBuffer] = []

    def make(**kw) -> RedisBuffer:
        kw.setdefault("block_ms", 100)
        buf = RedisBuffer(redis_url, stream=stream, **kw)
        made.append(buf)
        return buf

    yield make
    for buf in made:
        buf.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_buffer(request):
    """Factory for either backend with a common ``capacity`` / ``put_timeout``."""
    if request.param == "memory":
        return lambda capacity=0, put_timeout=60.0: MemoryBuffer(capacity, put_timeout=put_timeout)
    make_redis = request.getfixturevalue("make_redis")
    return lambda capacity=10000, put_timeout=60.0: make_redis(maxlen=capacity, put_timeout=put_timeout)


# ---------------------------------------------------------------------------- the contract (both)
def test_round_trip_preserves_every_field(make_buffer):
    buf = make_buffer()
    t = traj(
        3,
        n_tokens=5,
        advantage=-0.375,
        finish_reason="length",
        group_id=11,
        correct=True,
        reward=1.0,
        stats={"search/depth": 4.0, "search/nodes": 17},
        behaviour_logprobs=[-1e-9, -0.1, -2.5e-7, -13.25, -0.3333333333333333],
    )
    ids = buf.put([t])
    assert len(ids) == 1 and isinstance(ids[0], str)
    assert len(buf) == 1 and buf.pending() == 0
    (item,) = buf.get(4)
    assert isinstance(item, BufferItem) and item.id == ids[0]
    assert item.trajectory == t  # dataclass equality: every field, floats bit-exact
    assert len(buf) == 0 and buf.pending() == 1
    buf.ack([item.id])
    assert buf.pending() == 0 and len(buf) == 0
    assert buf.stats == {"put": 1, "delivered": 1, "acked": 1, "dropped_invalid": 0, "reclaimed": 0}
    buf.ack([item.id, "999-0"])  # unknown / already acked: ignored
    assert buf.stats["acked"] == 1


def test_per_token_advantages_cross_the_buffer_bit_for_bit(make_buffer):
    # a whole-tree trajectory: one advantage per completion token (values that JSON must not round)
    adv = [1 / 3, 1 / 3, -0.1 - 0.2, 2.5e-17, -1e6]
    buf = make_buffer()
    t = traj(5, n_tokens=5, token_advantages=adv)
    buf.put([t])
    (item,) = buf.get(1)
    assert item.trajectory == t and item.trajectory.token_advantages == adv
    assert [x.hex() for x in item.trajectory.token_advantages] == [x.hex() for x in adv]


def test_fifo_order_across_puts_and_gets(make_buffer):
    buf = make_buffer()
    ids = buf.put([traj(i) for i in range(6)]) + buf.put([traj(i) for i in range(6, 10)])
    got = buf.get(4) + buf.get(100)
    assert [it.id for it in got] == ids
    assert [it.trajectory.problem_id for it in got] == list(range(10))
    assert buf.pending() == 10
    assert bool(buf)  # truthy even when empty (len() is 0)


def test_get_timeout_returns_empty_promptly(make_buffer):
    buf = make_buffer()
    t0 = time.monotonic()
    assert buf.get(5) == []  # timeout=None: don't wait
    assert time.monotonic() - t0 < 0.1
    t0 = time.monotonic()
    assert buf.get(5, timeout=0.25) == []
    assert 0.2 <= time.monotonic() - t0 < 1.0
    assert buf.get(0, timeout=5.0) == []


def test_get_wakes_up_when_a_producer_puts(make_buffer):
    buf = make_buffer()
    producer = threading.Timer(0.15, lambda: buf.put([traj(1)]))
    producer.start()
    t0 = time.monotonic()
    items = buf.get(3, timeout=5.0)
    # the put's reply may still be on its way when get returns: the buffer is closed after it
    producer.join(timeout=10)
    assert [it.trajectory.problem_id for it in items] == [1]
    assert time.monotonic() - t0 < 1.5


def test_back_pressure_blocks_until_an_ack_frees_room(make_buffer):
    buf = make_buffer(capacity=3, put_timeout=10.0)
    buf.put([traj(i) for i in range(3)])
    result: dict = {}
    producer = threading.Thread(target=lambda: result.update(ids=buf.put([traj(3)])))
    producer.start()
    time.sleep(0.3)
    assert producer.is_alive(), "4th put should wait for room"
    items = buf.get(1)  # delivered but pending still counts against capacity
    time.sleep(0.15)
    assert producer.is_alive()
    buf.ack([items[0].id])
    producer.join(timeout=3.0)
    assert not producer.is_alive() and len(result["ids"]) == 1
    assert len(buf) == 3 and buf.pending() == 0


def test_back_pressure_times_out_with_a_clear_error(make_buffer):
    buf = make_buffer(capacity=3, put_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(BufferFullError, match=r"un-acked.*2 of 5 were added|3 of 5 were added") as ei:
        buf.put([traj(i) for i in range(5)])
    assert 0.25 <= time.monotonic() - t0 < 2.0
    assert len(ei.value.ids) == 3  # the part that fitted was accepted, and said so
    assert len(buf) == 3 and buf.stats["put"] == 3


# ---------------------------------------------------------------------------- MemoryBuffer only
def test_memory_threaded_producer_consumer_loses_and_duplicates_nothing():
    buf = MemoryBuffer(capacity=16, put_timeout=10.0)
    n = 300

    def produce():
        for start in range(0, n, 7):
            buf.put([traj(i) for i in range(start, min(start + 7, n))])

    producer = threading.Thread(target=produce)
    producer.start()
    seen: list[int] = []
    while len(seen) < n:
        items = buf.get(10, timeout=5.0)
        assert items, "consumer starved"
        seen += [it.trajectory.problem_id for it in items]
        buf.ack([it.id for it in items])
    producer.join(timeout=5.0)
    assert seen == list(range(n))
    assert buf.stats["put"] == buf.stats["delivered"] == buf.stats["acked"] == n


def test_memory_requeue_pending_redelivers_first_in_order():
    buf = MemoryBuffer()
    buf.put([traj(i) for i in range(5)])
    first = buf.get(3)
    assert buf.requeue_pending() == 3
    assert buf.pending() == 0 and len(buf) == 5
    again = buf.get(5)
    assert [it.id for it in again[:3]] == [it.id for it in first]
    assert [it.trajectory.problem_id for it in again] == [0, 1, 2, 3, 4]
    assert buf.stats["reclaimed"] == 3


def test_memory_close_wakes_waiters_and_refuses_puts():
    buf = MemoryBuffer()
    buf.put([traj(0)])
    threading.Timer(0.1, buf.close).start()
    assert len(buf.get(5, timeout=5.0)) == 1
    t0 = time.monotonic()
    assert buf.get(5, timeout=5.0) == []  # closed: no waiting
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(BufferClosedError):
        buf.put([traj(1)])


def test_memory_rejects_negative_capacity():
    with pytest.raises(ValueError, match="capacity"):
        MemoryBuffer(capacity=-1)


# ---------------------------------------------------------------------------- RedisBuffer only
def test_redact_url():
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://user:pw@h/2") == "redis://user:***@h/2"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("redis://h/0?password=pw&x=1") == "redis://h/0?password=%2A%2A%2A&x=1"


@pytest.mark.redis
def test_redis_two_consumers_split_without_overlap(make_redis):
    c1, c2 = make_redis(consumer="c1"), make_redis(consumer="c2")
    ids = c1.put([traj(i) for i in range(20)])
    a, b = c1.get(7), c2.get(100, timeout=0.5)
    assert len(a) == 7 and len(b) == 13
    assert {it.id for it in a}.isdisjoint(it.id for it in b)
    assert sorted([it.id for it in a + b], key=stream_id_key) == ids
    assert c1.pending() == 20
    c1.ack([it.id for it in a])
    c2.ack([it.id for it in b])
    assert c1.pending() == 0 and len(c1) == 0


@pytest.mark.redis
def test_redis_consumer_killed_mid_batch_is_reclaimed(make_redis, redis_url, stream):
    """A real child process reads as c1 and is SIGKILLed before acking; c2 takes over exactly its
    entries via XAUTOCLAIM. Nothing lost, nothing acked twice."""
    producer = make_redis()
    put_ids = producer.put([traj(i) for i in range(8)])
    cfg = dict(producer.config(), consumer="c1")
    child_code = (
        "import json, sys, time\n"
        "from tsd.buffers.redis import RedisBuffer\n"
        "buf = RedisBuffer(**json.loads(sys.argv[1]))\n"
        "items = buf.get(5, timeout=10)\n"
        "print(json.dumps([it.id for it in items]), flush=True)\n"
        "time.sleep(60)  # 'training'; killed before it acks\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", child_code, json.dumps(cfg)], stdout=subprocess.PIPE, text=True
    )
    try:
        line = child.stdout.readline()  # bounded: the child prints after get() or its 10 s timeout
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
    c1_ids = json.loads(line)
    assert c1_ids == put_ids[:5]

    patient = make_redis(consumer="patient", claim_idle_ms=60_000)  # c1's entries aren't idle enough
    assert [it.id for it in patient.get(10)] == put_ids[5:]
    assert patient.stats["reclaimed"] == 0
    patient.ack(put_ids[5:])

    c2 = make_redis(consumer="c2", claim_idle_ms=100)
    time.sleep(0.15)
    reclaimed = c2.get(10, timeout=1.0)
    assert [it.id for it in reclaimed] == c1_ids
    assert [it.trajectory.problem_id for it in reclaimed] == [0, 1, 2, 3, 4]
    assert c2.stats["reclaimed"] == 5
    c2.ack(c1_ids)
    acked = put_ids[5:] + c1_ids
    assert sorted(acked) == sorted(put_ids) and len(set(acked)) == len(acked)
    assert c2.pending() == 0 and len(c2) == 0 and c2.get(10) == []


@pytest.mark.redis
def test_redis_live_consumer_does_not_reclaim_its_own_entries(make_redis):
    buf = make_redis(consumer="c1", claim_idle_ms=50)
    buf.put([traj(i) for i in range(4)])
    first = buf.get(2)
    time.sleep(0.1)  # its own entries are now "idle", but it is alive and still holds them
    second = buf.get(10)
    assert [it.trajectory.problem_id for it in second] == [2, 3]
    assert buf.stats["reclaimed"] == 0 and buf.pending() == 4
    buf.ack([it.id for it in first + second])
    assert buf.pending() == 0


@pytest.mark.redis
def test_redis_malformed_entries_are_dropped_and_counted(make_redis, redis_url, stream, caplog):
    import redis

    buf = make_redis()
    raw = redis.Redis.from_url(redis_url)
    bad = [
        {"t": "not json"},
        {"x": "no t field"},
        {"t": "[" * 100_000},  # deep nesting: json raises RecursionError, not ValueError
        {"t": json.dumps(dict(json.loads(traj(0).to_json()), reward=5.0))},  # valid JSON, bad record
        {"t": b"\xff\xfe\x80"},  # not UTF-8
        {"t": json.dumps(dict(json.loads(traj(0).to_json()), __class__="os.system"))},  # unknown field
    ]
    for fields in bad:
        raw.xadd(stream, fields)
    raw.close()
    good_id = buf.put([traj(42)])[0]
    with caplog.at_level(logging.WARNING, logger="tsd.buffers.redis"):
        items = buf.get(10, timeout=1.0)
    assert [(it.id, it.trajectory.problem_id) for it in items] == [(good_id, 42)]
    assert buf.stats["dropped_invalid"] == len(bad)
    assert sum("dropping invalid entry" in r.getMessage() for r in caplog.records) == len(bad)
    assert buf.pending() == 1 and len(buf) == 0  # the bad ones are acked and deleted
    buf.ack([good_id])
    assert buf.get(10) == [] and buf.pending() == 0


@pytest.mark.redis
def test_redis_get_recreates_a_deleted_stream(make_redis, redis_url, stream):
    import redis

    buf = make_redis()
    raw = redis.Redis.from_url(redis_url)
    raw.delete(stream)  # e.g. somebody ran FLUSHDB
    raw.close()
    assert buf.get(3) == []
    buf.put([traj(1)])
    assert [it.trajectory.problem_id for it in buf.get(3)] == [1]


@pytest.mark.redis
def test_redis_url_from_env_and_config_rebuilds(make_redis, redis_url, stream, monkeypatch):
    monkeypatch.setenv("TSD_REDIS_URL", redis_url)
    buf = RedisBuffer(stream=stream, block_ms=100)
    try:
        assert buf.url == redis_url
        cfg = buf.config()
        assert json.loads(json.dumps(cfg)) == cfg and cfg["consumer"] is None  # each process: own name
        twin = RedisBuffer(**cfg)
        assert twin.consumer != buf.consumer
        buf.put([traj(5)])
        assert [it.trajectory.problem_id for it in twin.get(1)] == [5]
        twin.close()
        with pytest.raises(BufferClosedError):
            twin.get(1)
    finally:
        buf.close()


def test_redis_down_at_start_fails_fast_with_redacted_url():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(BufferConnectionError, match=f"127.0.0.1:{port}") as ei:
        RedisBuffer(f"redis://:topsecret@127.0.0.1:{port}/0", connect_timeout=1.0)
    assert time.monotonic() - t0 < 2.0
    assert "topsecret" not in str(ei.value) and ":***@" in str(ei.value)
    assert isinstance(ei.value, RuntimeError)


def test_redis_unroutable_host_fails_within_connect_timeout():
    t0 = time.monotonic()
    with pytest.raises(BufferConnectionError, match="192.0.2.1"):  # TEST-NET-1: never answers
        RedisBuffer("redis://192.0.2.1:6379/0", connect_timeout=0.5)
    assert time.monotonic() - t0 < 3.0


@pytest.mark.redis
def test_redis_password_url_works_and_wrong_password_is_clear(redis_password_url, stream, caplog):
    caplog.set_level(logging.DEBUG)
    buf = RedisBuffer(redis_password_url, stream=stream, block_ms=100)
    try:
        assert "s3cret-pw" not in repr(buf) and ":***@" in repr(buf)
        buf.put([traj(9)])
        (item,) = buf.get(1)
        buf.ack([item.id])
        assert item.trajectory.problem_id == 9
    finally:
        buf.close()
    wrong = redis_password_url.replace("s3cret-pw", "not-it")
    with pytest.raises(BufferConnectionError, match="authentication") as ei:
        RedisBuffer(wrong, stream=stream)
    assert "not-it" not in str(ei.value)
    with pytest.raises(BufferConnectionError, match="authentication"):
        RedisBuffer(redis_password_url.replace(":s3cret-pw@", ""), stream=stream)
    assert not any("s3cret-pw" in r.getMessage() or "not-it" in r.getMessage() for r in caplog.records)
