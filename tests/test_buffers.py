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
    cfg = dict(producer.config(), consumer="c1", heartbeat_s=1.0)
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
    assert c2.get(10, timeout=0.1) == []  # c1's heartbeat has not expired yet: its entries are its own
    time.sleep(1.1)  # now it has: c1 is dead
    c2._next_claim = 0.0  # (the scan's own pacing: claim_idle_ms / 4)
    reclaimed = c2.get(10, timeout=1.0)
    assert [it.id for it in reclaimed] == c1_ids
    assert [it.trajectory.problem_id for it in reclaimed] == [0, 1, 2, 3, 4]
    assert c2.stats["reclaimed"] == 5
    c2.ack(c1_ids)
    acked = put_ids[5:] + c1_ids
    assert sorted(acked) == sorted(put_ids) and len(set(acked)) == len(acked)
    assert c2.pending() == 0 and len(c2) == 0 and c2.get(10) == []


@pytest.mark.redis
def test_redis_a_stalled_live_trainer_keeps_its_batch(make_redis):
    """Trainer A (a real process) reads a batch ahead, then stalls for 3 s (rank 0's evaluation or
    checkpoint: minutes at paper scale), ten times the claim time (claim_idle_ms 0.3 s here, 30 s in
    the config); trainer B reads and trains all along. A keeps its batch: no record is trained twice
    (before, B took A's idle entries over and both trained them)."""
    producer = make_redis()
    put_ids = producer.put([traj(i) for i in range(12)])
    cfg = dict(producer.config(), consumer="A", claim_idle_ms=300, heartbeat_s=1.0)
    child_code = (
        "import json, sys, time\n"
        "from tsd.buffers.redis import RedisBuffer\n"
        "buf = RedisBuffer(**json.loads(sys.argv[1]))\n"
        "items = buf.get(4, timeout=10)\n"
        "print(json.dumps([it.id for it in items]), flush=True)\n"
        "time.sleep(3.0)  # stalled, alive\n"
        "buf.ack([it.id for it in items])\n"
        "buf.close()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", child_code, json.dumps(cfg)], stdout=subprocess.PIPE, text=True
    )
    try:
        trained_a = json.loads(child.stdout.readline())
        b = make_redis(consumer="B", claim_idle_ms=300, heartbeat_s=1.0)
        trained_b: list[str] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4.0:  # past A's stall: B polls ~20 times for idle entries
            items = b.get(4, timeout=0.2)
            trained_b += [it.id for it in items]
            b.ack([it.id for it in items])
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    assert len(trained_a) == 4 and not set(trained_a) & set(trained_b), (trained_a, trained_b)
    assert sorted(trained_a + trained_b, key=stream_id_key) == put_ids  # each record trained once
    assert b.stats["reclaimed"] == 0 and b.pending() == 0


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
    assert sum("dropping invalid record" in r.getMessage() for r in caplog.records) == len(bad)
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


# ---------------------------------------------------------------------------- rejected records: counted, rate-limited
def _drop_lines(records) -> tuple[int, int]:
    """(lines about dropped records, records those lines account for): a one-by-one line counts 1,
    a summary line its "N more"."""
    lines = counted = 0
    for r in records:
        msg = r.getMessage()
        if "dropping invalid record" in msg:
            lines, counted = lines + 1, counted + 1
        elif "more invalid records dropped" in msg:
            lines += 1
            counted += int(msg.split(": ", 1)[1].split(" more")[0])
    return lines, counted


def test_drop_warnings_write_a_line_per_interval_and_count_every_drop(caplog):
    from tsd.buffers.base import DropWarnings

    now = [0.0]
    log = logging.getLogger("tsd.test.drops")
    warn = DropWarnings(log, "Buf", burst=3, interval_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="tsd.test.drops"):
        for i in range(1000):  # one drop every 0.5 s for 500 s
            now[0] = 0.5 * i
            warn(str(i), "dead", f"reason {i}")
        warn.flush()
    lines, counted = _drop_lines(caplog.records)
    assert counted == 1000 == warn.total
    # 3 one by one, the note that the limit starts, then one line per 60 s of drops (500 s), the flush
    assert lines == 3 + 9 and len(caplog.records) == lines + 1, [r.getMessage() for r in caplog.records]
    assert "(1000 in all); the newest: 999 (kept in dead): reason 999" in caplog.records[-1].getMessage()


def test_rejected_records_are_rate_limited_in_the_log_and_counted_exactly(make_buffer, caplog):
    """A generator writing garbage: 600 rejected records give a dozen lines, and the counter, the
    dead letters and the lines all say 600."""
    buf = make_buffer()
    buf.put([traj(i) for i in range(600)])
    with caplog.at_level(logging.WARNING, logger="tsd.buffers"):
        got = 0
        while got < 600:
            items = buf.get(100, timeout=1.0)
            buf.reject(items, [f"bad record {it.trajectory.problem_id}" for it in items])
            got += len(items)
        buf.close()  # writes the line for what was not logged yet
    lines, counted = _drop_lines(caplog.records)
    assert buf.stats["dropped_invalid"] == 600 == counted
    assert lines <= 12, [r.getMessage() for r in caplog.records]
    assert "bad record 599" in caplog.records[-1].getMessage()
    if isinstance(buf, RedisBuffer):
        import redis

        client = redis.Redis.from_url(buf.url)
        assert client.xlen(buf.dead_stream) == 600
        client.delete(buf.dead_stream)
        client.close()
    else:
        assert len(buf.dead_letters(1000)) == 600


# ---------------------------------------------------------------------------- nothing stays on the server for good
@pytest.mark.redis
def test_redis_every_key_of_a_run_expires_and_finish_deletes_the_stream(make_redis, redis_url, stream):
    import redis

    client = redis.Redis.from_url(redis_url)
    buf = make_redis(ttl_s=30, dead_ttl_s=600)
    assert 0 < client.pttl(stream) <= 30_000  # made by the group's creation: it expires already
    client.pexpire(stream, 5_000)
    buf.put([traj(i) for i in range(5)])
    assert 25_000 < client.pttl(stream) <= 30_000  # pushed back by the put
    items = buf.get(5)
    client.pexpire(stream, 5_000)
    buf.ack([items[0].id])
    assert 25_000 < client.pttl(stream) <= 30_000  # and by an ack
    buf.reject(items[1:2], ["bad"])
    assert 590_000 < client.pttl(buf.dead_stream) <= 600_000
    client.pexpire(stream, 5_000)
    assert buf.clear() == 3 and 25_000 < client.pttl(stream) <= 30_000  # and by the run's (re)start
    buf.put([traj(i) for i in range(4)])
    assert buf.finish() == {"buffer/produced": 4, "buffer/left": 4, "buffer/dead_letters": 1}
    assert not client.exists(stream)
    assert client.xlen(buf.dead_stream) == 1 and 590_000 < client.pttl(buf.dead_stream) <= 600_000
    client.delete(buf.dead_stream)
    client.close()


@pytest.mark.redis
def test_redis_keys_of_a_killed_run_expire(redis_url, stream):
    """A real process puts, reads and rejects, then is SIGKILLed (no finish, no close): its stream
    and its dead letters are on the server, and gone once their expiry has passed."""
    import redis

    cfg = {"url": redis_url, "stream": stream, "ttl_s": 1.0, "dead_ttl_s": 1.5}
    child_code = (
        "import json, os, signal, sys\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from test_buffers import traj\n"
        "from tsd.buffers.redis import RedisBuffer\n"
        "buf = RedisBuffer(**json.loads(sys.argv[1]))\n"
        "buf.put([traj(i) for i in range(6)])\n"
        "items = buf.get(2, timeout=5)\n"
        "buf.reject(items[:1], ['bad'])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.run([sys.executable, "-c", child_code, json.dumps(cfg), tests_dir], timeout=120)
    assert child.returncode == -signal.SIGKILL
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.xlen(stream) == 5 and client.xlen(f"{stream}:dead") == 1
        deadline = time.monotonic() + 10
        while client.exists(stream, f"{stream}:dead") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client.exists(stream, f"{stream}:dead")
    finally:
        client.delete(stream, f"{stream}:dead")
        client.close()


@pytest.mark.parametrize("field,value", [("ttl_s", 0), ("dead_ttl_s", -1), ("ttl_s", None)])
def test_redis_expiries_are_checked(field, value):
    from tsd.config import ConfigError

    with pytest.raises(ConfigError, match=f"RedisBuffer.{field}"):
        RedisBuffer(f"redis://127.0.0.1:{free_port()}/0", **{field: value})


@pytest.mark.redis
def test_admin_command_lists_the_runs_on_a_server_and_cleans_them(redis_url, stream):
    """``python -m tsd.buffers.admin`` as a user runs it: a live run (a stream with entries), a run
    with dead letters, and a key an old version left without expiry, written long ago."""
    import redis

    def admin(*args: str) -> str:
        p = subprocess.run(
            [sys.executable, "-m", "tsd.buffers.admin", "--url", redis_url, *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        return p.stdout

    live = RedisBuffer(redis_url, stream=stream, run_id="live")
    live.put([traj(i) for i in range(3)])
    live.get(1)
    rejected = RedisBuffer(redis_url, stream=stream, run_id="rejected")
    rejected.put([traj(0), traj(1)])
    rejected.reject(rejected.get(2), ["bad", "worse"])
    client = redis.Redis.from_url(redis_url)
    client.xadd(f"{stream}:old", {"t": "{}"}, id="1000-0")  # 1970: idle for decades, no expiry
    client.set(f"{stream}:not-a-stream", "x")  # not a run's: never listed, never deleted
    live.close()  # (the consumers leave: their heartbeat keys go with them)
    rejected.close()
    try:
        out = admin("list", "--stream", stream)
        assert "3 runs under" in out
        lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
        assert set(lines) == {"live", "rejected", "old"}
        assert lines["live"][1:4] == ["3", "1", "0"]  # entries, pending, dead letters
        assert lines["rejected"][1:4] == ["0", "0", "2"]
        assert "never" in out and f"{stream}:old" in out  # the key without expiry is named

        out = admin("clean", "--stream", stream, "--idle", "86400")
        assert "deleted 1 keys of 1 runs" in out and not client.exists(f"{stream}:old")
        out = admin("clean", "--stream", stream, "rejected", "nope", "--dry-run")
        assert "would delete 2 keys of 1 runs" in out and "nope: no keys" in out
        assert client.exists(f"{stream}:rejected", f"{stream}:rejected:dead") == 2
        out = admin("clean", "--stream", stream, "--all")
        assert "deleted 3 keys of 2 runs" in out
        assert [k.decode() for k in client.scan_iter(f"{stream}:*")] == [f"{stream}:not-a-stream"]
        bad = subprocess.run(
            [sys.executable, "-m", "tsd.buffers.admin", "--url", redis_url, "clean", "--idle", "0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode == 2 and "--idle: 0.0 is out of range" in bad.stderr
    finally:
        live.close()
        rejected.close()
        client.delete(*client.keys(f"{stream}:*") or ["-"])
        client.close()
