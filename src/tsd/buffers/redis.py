"""Trajectory buffer on a Redis stream: generators on any node ``put``, trainers ``get`` / ``ack``.

Layout: one stream per run, ``<stream>:<run_id>`` (``tsd:trajectories:<run_id>``; ``train.py``
sets ``run_id``, and a resume takes it from the checkpoint), so two runs on one server never read
each other's trajectories. Each entry has field ``t`` (the :meth:`Trajectory.to_json` record; JSON,
never pickle) and ``v`` (the policy version, so ``XRANGE`` shows staleness at a glance). Trainers
read through one consumer group (``trainers``), one consumer name per process. The group is
created at the stream's end (``$``) when the first handle opens it, and a run empties its stream
when it starts or resumes (:meth:`RedisBuffer.clear`), so it reads only what its own generators
write from then on. Records that must not be trained go to ``<stream>:<run_id>:dead`` with their
reason (:meth:`RedisBuffer.reject`).

Nothing stays on the server for good (a shared server sees a run a day for weeks):

- a run that finishes deletes its stream (:meth:`RedisBuffer.finish`, called by ``train.py``);
- every key of a run expires: the stream ``ttl_s`` after the last put, ack or start (a killed run
  stops refreshing it), the dead letters ``dead_ttl_s`` after the last one was written or the run
  finished;
- ``python -m tsd.buffers.admin list`` shows the runs that hold keys on a server, ``clean`` removes
  them (:mod:`tsd.buffers.admin`).

Delivery semantics: **at-least-once**, the same as :mod:`tsd.buffers.base`:

- ``get`` = claim (entries of *other* consumers that are dead, see below) then ``XREADGROUP >``.
  Delivered entries sit in the group's pending list (PEL) until acked.
- **A live consumer's entries are never claimed.** Each consumer that reads keeps a heartbeat key,
  ``<stream>:alive:<consumer>``, which a thread of its process refreshes every ``heartbeat_s / 4``
  seconds and which expires ``heartbeat_s`` after the last refresh: while the process lives, its
  entries are its own, however long it holds them (a trainer that reads a batch ahead, then waits
  minutes while rank 0 evaluates or checkpoints). Only the entries of a consumer whose heartbeat
  has expired, and that have been idle for ``claim_idle_ms``, are claimed (``XPENDING`` of that
  consumer, then ``XCLAIM``). Before, any entry idle for ``claim_idle_ms`` (30 s) was taken over
  (``XAUTOCLAIM``): the read-ahead batches of the trainers that waited for rank 0's evaluation were
  trained twice, once by each.
- ``ack`` = ``XACK`` + ``XDEL`` in one transaction, after the optimiser step that used them: the
  stream holds only undelivered and pending entries, so its length is the buffer's occupancy.
- An entry is trained twice only if its consumer's process froze for longer than ``heartbeat_s``
  (its thread could not refresh the key) and came back; a killed trainer's entries are taken over
  ``heartbeat_s`` after its death.
- Back-pressure instead of trimming: ``put`` waits while undelivered + pending >= ``maxlen``.
- A malformed entry (corrupt or hostile) is logged, counted in ``stats["dropped_invalid"]``,
  copied to the dead-letter stream with its reason, and acked + deleted so no trainer sees it
  again; it never raises into the trainer. The same happens to a well-formed record a consumer
  :meth:`~RedisBuffer.reject` s (unfit for its model: :mod:`tsd.data.record_check`).

Quick look at a live buffer (the run id is in the run's log and ``results.json``)::

    redis-cli XLEN tsd:trajectories:<run_id>; redis-cli XINFO GROUPS tsd:trajectories:<run_id>
    redis-cli XREVRANGE tsd:trajectories:<run_id>:dead + - COUNT 5     # rejected records, with why
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from tsd.buffers.base import (
    DEAD_LETTER_CAP,
    DEAD_LETTER_RECORD_BYTES,
    Buffer,
    BufferClosedError,
    BufferConnectionError,
    BufferFullError,
    BufferItem,
    DropWarnings,
)
from tsd.config import check_int, check_number
from tsd.rl.trajectory import Trajectory, TrajectoryError

__all__ = ["DEFAULT_URL", "ENV_URL", "BufferConnectionError", "RedisBuffer", "redact_url"]

log = logging.getLogger(__name__)

ENV_URL = "TSD_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"

#: records per put round trip: bounds one script's run time (Redis is single-threaded)
PUT_CHUNK = 256

# Adds as many records as fit under the cap and returns their ids, atomically: with many
# producers a separate "XLEN, then XADD" could overshoot the cap by one batch per producer.
# The cap is on XLEN, which (acked entries being deleted) is exactly undelivered + pending.
# We never use XADD MAXLEN: trimming drops the *oldest* entries whether or not a trainer has
# read or acked them, silently losing trajectories; we make the producers wait instead.
# Every call also pushes the stream's expiry ARGV[2] ms ahead (even when it is full: a producer
# waiting on back-pressure is alive), so the stream of a run that was killed expires by itself.
_PUT_SCRIPT = """
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local n = math.min(room, (#ARGV - 2) / 2)
local ids = {}
for i = 1, n do
  ids[i] = redis.call('XADD', KEYS[1], '*', 't', ARGV[2 * i + 1], 'v', ARGV[2 * i + 2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return ids
"""


def redact_url(url: str) -> str:
    """``url`` with any password (userinfo or ``?password=``) replaced by ``***``, for messages."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            host = netloc.rpartition("@")[2]
            netloc = f"{parts.username or ''}:***@{host}"
        query = parts.query
        if "password" in query:
            query = urlencode(
                [(k, "***" if k == "password" else v) for k, v in parse_qsl(query, keep_blank_values=True)]
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparseable redis URL>"


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


class RedisBuffer(Buffer):
    """Buffer on a Redis stream + consumer group; each process builds its own (see :meth:`config`).

    Args:
        url: ``redis://[[user]:password@]host:port/db``; default ``$TSD_REDIS_URL``, else
            ``redis://127.0.0.1:6379/0``.
        stream: stream key prefix shared by producers and consumers.
        run_id: the run whose trajectories the stream carries: the key is ``<stream>:<run_id>``
            (``None``: ``stream`` itself, for tools and tests that name the key).
        group: consumer group; trainers in one group split the entries between them.
        consumer: this process's name in the group; default ``<host>-<pid>-<random>``.
        maxlen: most entries held, undelivered plus pending; ``put`` waits above it.
        block_ms: longest single ``XREADGROUP BLOCK`` (``get`` loops up to its ``timeout``).
        claim_idle_ms: a pending entry idle this long is taken over by the next ``get`` when its
            consumer is dead (its heartbeat expired); a live consumer's are never taken.
        heartbeat_s: a reading consumer's heartbeat key expires this long after its last refresh
            (every ``heartbeat_s / 4`` s, from a thread of its own): how long after a consumer's
            death its entries may be claimed.
        connect_timeout: seconds to connect (and to answer the first PING) before raising
            :class:`BufferConnectionError`.
        put_timeout: seconds ``put`` waits for room before raising :class:`BufferFullError`.
        ttl_s: the stream expires this long after the last put, ack, start or resume (each pushes
            it back); far above any pause of a live run, it only ever removes a dead run's stream.
        dead_ttl_s: dead letters are kept this long after the last one was written, or after the
            run finished.
    """

    shared = True

    def __init__(
        self,
        url: str | None = None,
        stream: str = "tsd:trajectories",
        run_id: str | None = None,
        group: str = "trainers",
        consumer: str | None = None,
        maxlen: int = 10000,
        block_ms: int = 1000,
        claim_idle_ms: int = 30000,
        connect_timeout: float = 5.0,
        put_timeout: float = 60.0,
        ttl_s: float = 86400.0,
        dead_ttl_s: float = 604800.0,
        heartbeat_s: float = 30.0,
    ) -> None:
        super().__init__()
        check_int(maxlen, "RedisBuffer.maxlen", low=1)
        check_int(block_ms, "RedisBuffer.block_ms", low=1)
        check_int(claim_idle_ms, "RedisBuffer.claim_idle_ms", low=0)
        check_number(connect_timeout, "RedisBuffer.connect_timeout", low=0, low_open=True)
        check_number(put_timeout, "RedisBuffer.put_timeout", low=0, low_open=True)
        check_number(ttl_s, "RedisBuffer.ttl_s", low=0.001)
        check_number(dead_ttl_s, "RedisBuffer.dead_ttl_s", low=0.001)
        check_number(heartbeat_s, "RedisBuffer.heartbeat_s", low=0.01)
        self.url = url or os.environ.get(ENV_URL) or DEFAULT_URL
        self.safe_url = redact_url(self.url)
        self._stream_prefix, self.run_id = stream, run_id
        self.stream = f"{stream}:{run_id}" if run_id else stream
        self.dead_stream = f"{self.stream}:dead"
        self.group = group
        self._explicit_consumer = consumer is not None
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.maxlen, self.block_ms, self.claim_idle_ms = maxlen, block_ms, claim_idle_ms
        self.connect_timeout, self.put_timeout = connect_timeout, put_timeout
        self.ttl_s, self.dead_ttl_s = float(ttl_s), float(dead_ttl_s)
        self._ttl_ms, self._dead_ttl_ms = max(1, round(ttl_s * 1000)), max(1, round(dead_ttl_s * 1000))
        self._drops = DropWarnings(log, "RedisBuffer")
        self._closed = False
        self._pid = os.getpid()  # the process this handle (and its connection) belongs to
        # ids delivered to this handle and not acked by it: XAUTOCLAIM also returns our own idle
        # entries (refreshing their idle time); those are not handed out a second time
        self._outstanding: set[str] = set()
        self._next_claim = 0.0  # monotonic time of the next scan for a dead consumer's entries
        self.heartbeat_s = float(heartbeat_s)
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_stop = threading.Event()

        # First contact through a probe without retries, so an unreachable server fails within
        # ~connect_timeout instead of after the main client's retries and backoff.
        probe = self._client(retry=Retry(NoBackoff(), 0), socket_timeout=connect_timeout)
        try:
            self._call(probe.ping)
        finally:
            probe.close()
        # the working client: retries transient errors; reads may block for block_ms
        self._r = self._client(
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
            socket_timeout=block_ms / 1000 + max(5.0, connect_timeout),
        )
        self._put_script = self._r.register_script(_PUT_SCRIPT)
        self._create_group("$")
        log.info(
            "RedisBuffer: %s stream=%s group=%s consumer=%s", self.safe_url, self.stream, group, self.consumer
        )

    # ------------------------------------------------------------------ connection
    def _client(self, retry: Retry, socket_timeout: float) -> redis.Redis:
        try:
            return redis.Redis.from_url(
                self.url,
                socket_connect_timeout=self.connect_timeout,
                socket_timeout=socket_timeout,
                retry=retry,
                decode_responses=False,  # records stay bytes: a hostile entry can't break decoding here
            )
        except ValueError as e:
            raise ValueError(f"RedisBuffer: bad URL {self.safe_url}: {self._scrub(e)}") from None

    def _scrub(self, e: BaseException | str) -> str:
        msg = str(e)
        password = urlsplit(self.url).password
        return msg.replace(password, "***") if password else msg

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one Redis call, turning connection/auth failures into BufferConnectionError."""
        if self._closed:
            raise BufferClosedError(f"RedisBuffer({self.safe_url}): buffer is closed")
        try:
            return fn(*args, **kwargs)
        except redis.AuthenticationError as e:
            raise BufferConnectionError(
                f"RedisBuffer: authentication to {self.safe_url} failed ({self._scrub(e)}); "
                f"check the password in the URL or ${ENV_URL}"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise BufferConnectionError(
                f"RedisBuffer: cannot reach Redis at {self.safe_url} (connect_timeout="
                f"{self.connect_timeout:g}s: {self._scrub(e)}); "
                f"is redis-server running? (URL from the argument, ${ENV_URL}, or {DEFAULT_URL})"
            ) from None
        except redis.ResponseError as e:
            if str(e).startswith(("NOAUTH", "WRONGPASS")):
                raise BufferConnectionError(
                    f"RedisBuffer: authentication to {self.safe_url} failed ({self._scrub(e)}); "
                    f"check the password in the URL or ${ENV_URL}"
                ) from None
            raise

    def _create_group(self, start: str) -> None:
        """The consumer group, unless it exists. Every handle calls this before its first put or
        get, so the group always exists before the first entry: starting at ``$`` (the end)
        loses nothing of this run and skips whatever was in the stream before it."""
        try:
            self._call(self._r.xgroup_create, self.stream, self.group, id=start, mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._call(self._r.pexpire, self.stream, self._ttl_ms)  # made here or not: it expires

    def _grouped(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """:meth:`_call` for commands that need the group; recreates it if the stream key was
        deleted under us (FLUSHDB, a cleanup script) instead of failing every trainer."""
        try:
            return self._call(fn, *args, **kwargs)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e) and "no such key" not in str(e):
                raise
        log.warning("RedisBuffer: group %s on %s vanished; recreating it", self.group, self.stream)
        self._create_group("0")  # the key was deleted: whatever is in it now was written since
        return self._call(fn, *args, **kwargs)

    @property
    def location(self) -> str:
        return self.stream

    def for_this_process(self) -> RedisBuffer:
        """This handle in the process that opened it; a new one (its own connection and consumer
        name) in any other, e.g. a forked rank."""
        return self if os.getpid() == self._pid else RedisBuffer(**self.config())

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable) to rebuild this buffer in another process:
        ``RedisBuffer(**cfg)``. ``consumer`` is ``None`` unless it was given explicitly, so each
        process gets its own name. The URL may hold a password: don't log the dict."""
        return {
            "url": self.url,
            "stream": self._stream_prefix,
            "run_id": self.run_id,
            "group": self.group,
            "consumer": self.consumer if self._explicit_consumer else None,
            "maxlen": self.maxlen,
            "block_ms": self.block_ms,
            "claim_idle_ms": self.claim_idle_ms,
            "connect_timeout": self.connect_timeout,
            "put_timeout": self.put_timeout,
            "ttl_s": self.ttl_s,
            "dead_ttl_s": self.dead_ttl_s,
            "heartbeat_s": self.heartbeat_s,
        }

    # ------------------------------------------------------------------ producer side
    def put(self, trajectories: Sequence[Trajectory]) -> list[str]:
        payload: list[str] = []
        for traj in trajectories:
            payload += [traj.to_json(), str(traj.policy_version)]
        ids: list[str] = []
        deadline = time.monotonic() + self.put_timeout
        delay = 0.005
        while len(ids) < len(trajectories):
            chunk = payload[2 * len(ids) : 2 * (len(ids) + PUT_CHUNK)]
            added = self._call(self._put_script, keys=[self.stream], args=[self.maxlen, self._ttl_ms, *chunk])
            ids += [_s(i) for i in added]
            self.stats["put"] += len(added)
            if 2 * len(added) == len(chunk):
                delay = 0.005
                continue
            # full: poll with backoff until trainers ack (Redis has no "wait for room" primitive)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BufferFullError(
                    f"RedisBuffer.put: stream {self.stream!r} on {self.safe_url} held {self.maxlen} "
                    f"undelivered or un-acked entries for {self.put_timeout:g}s; {len(ids)} of "
                    f"{len(trajectories)} were added. Are the trainers consuming and acking?",
                    ids,
                )
            time.sleep(min(delay, left))
            delay = min(2 * delay, 0.1)
        return ids

    # ------------------------------------------------------------------ consumer side
    def get(self, n: int, timeout: float | None = None) -> list[BufferItem]:
        if n <= 0:
            return []
        self._beat()
        deadline = time.monotonic() + (timeout or 0.0)
        while True:
            raw = self._claim(n)
            if len(raw) < n:
                left_ms = int((deadline - time.monotonic()) * 1000)
                # block only when there is nothing in hand yet; BLOCK 0 would mean "forever"
                block = min(left_ms, self.block_ms) if not raw and left_ms >= 1 else None
                raw += self._read(n - len(raw), block)
            items = self._decode(raw)
            if items or time.monotonic() >= deadline:
                return items

    def alive_key(self, consumer: str) -> str:
        """The heartbeat key of ``consumer``: present while its process lives."""
        return f"{self.stream}:alive:{consumer}"

    def _beat(self) -> None:
        """Start this consumer's heartbeat (once, at its first read): a daemon thread with a
        connection of its own refreshes the key every ``heartbeat_s / 4`` s, whatever the main
        thread is doing (an evaluation, a checkpoint, a collective)."""
        if self._heartbeat is not None:
            return
        client = self._client(retry=Retry(NoBackoff(), 0), socket_timeout=max(1.0, self.heartbeat_s / 4))
        key, ttl_ms = self.alive_key(self.consumer), max(1, round(self.heartbeat_s * 1000))
        value = f"{socket.gethostname()}:{os.getpid()}"
        client.set(key, value, px=ttl_ms)  # alive before its first entry is delivered

        def run() -> None:
            while not self._heartbeat_stop.wait(self.heartbeat_s / 4):
                try:
                    client.set(key, value, px=ttl_ms)
                except redis.RedisError as e:  # the server is away: the main thread will say so
                    log.debug("RedisBuffer: heartbeat of %s failed: %s", self.consumer, self._scrub(e))
            with suppress(redis.RedisError):
                client.delete(key)  # a consumer that leaves says so
            client.close()

        self._heartbeat = threading.Thread(target=run, name="tsd-redis-heartbeat", daemon=True)
        self._heartbeat.start()

    def _stop_beating(self) -> None:
        if self._heartbeat is not None and self._pid == os.getpid():
            self._heartbeat_stop.set()
            self._heartbeat.join(timeout=max(2.0, self.heartbeat_s))

    def _claim(self, n: int) -> list[tuple[Any, Any]]:
        """Entries idle > claim_idle_ms in the PEL of a consumer whose heartbeat has expired (it
        died), now ours. Scans at most every claim_idle_ms / 4 (nothing can become claimable
        faster than that matters)."""
        now = time.monotonic()
        if now < self._next_claim:
            return []
        out: list[tuple[Any, Any]] = []
        summary = self._grouped(self._r.xpending, self.stream, self.group)
        full = True
        for c in summary.get("consumers") or []:
            name = _s(c["name"])
            if name == self.consumer or int(c["pending"]) == 0:
                continue
            if self._call(self._r.exists, self.alive_key(name)):
                continue  # alive: what it holds is its own, however long it holds it
            rows = self._call(
                self._r.xpending_range,
                self.stream,
                self.group,
                min="-",
                max="+",
                count=n - len(out),
                consumername=name,
                idle=self.claim_idle_ms,
            )
            ids = [r["message_id"] for r in rows]
            if not ids:
                continue
            claimed = self._call(
                self._r.xclaim, self.stream, self.group, self.consumer, self.claim_idle_ms, ids
            )
            got = {_s(eid) for eid, fields in claimed if fields is not None}
            gone = [eid for eid in ids if _s(eid) not in got]  # deleted while pending
            if gone:
                self._call(self._r.xack, self.stream, self.group, *gone)
            out += [(eid, fields) for eid, fields in claimed if fields is not None]
            log.warning(
                "RedisBuffer: consumer %s took over %d entries of %s (no heartbeat for %g s: its process is gone)",
                self.consumer,
                len(got),
                name,
                self.heartbeat_s,
            )
            if len(out) >= n:
                full = False
                break
        if full:  # every dead consumer's PEL scanned; if one was cut short, scan again next call
            self._next_claim = now + self.claim_idle_ms / 4000
        if out:
            self.stats["reclaimed"] += len(out)
        return out

    def _read(self, count: int, block: int | None) -> list[tuple[Any, Any]]:
        resp = self._grouped(
            self._r.xreadgroup, self.group, self.consumer, {self.stream: ">"}, count=count, block=block
        )
        return list(resp[0][1]) if resp else []

    def _decode(self, raw: list[tuple[Any, Any]]) -> list[BufferItem]:
        items: list[BufferItem] = []
        bad: list[tuple[str, Any, str]] = []
        for eid, fields in raw:
            eid = _s(eid)
            data = None
            try:
                data = fields.get(b"t")
                if data is None:
                    raise TrajectoryError(f"no 't' field (fields: {sorted(_s(k) for k in fields)[:8]})")
                traj = Trajectory.from_json(data)
            except Exception as e:  # hostile input: anything (even a RecursionError) drops the entry
                bad.append((eid, data, f"malformed: {str(e)[:1000]}"))
                continue
            items.append(BufferItem(eid, traj))
        if bad:
            self._dead_letter(bad)  # acked and deleted so it can't be redelivered forever
        self._outstanding.update(it.id for it in items)
        self.stats["delivered"] += len(items)
        return items

    def reject(self, items: Sequence[BufferItem], reasons: Sequence[str]) -> None:
        bad = [(it.id, it.trajectory.to_json(), why) for it, why in zip(items, reasons, strict=True)]
        if bad:
            self._dead_letter(bad)
            self._outstanding.difference_update(it.id for it in items)

    def _dead_letter(self, bad: Sequence[tuple[str, Any, str]]) -> None:
        """Copy each (id, raw record, reason) to the dead-letter stream, then ack and delete it, in
        one transaction; count and log each."""
        pipe = self._r.pipeline(transaction=True)
        for eid, data, why in bad:
            record: bytes | str = data if isinstance(data, (bytes, str)) else b""
            fields: dict[FieldT, EncodableT] = {"id": eid, "reason": why, "consumer": self.consumer}
            fields["t"] = record[:DEAD_LETTER_RECORD_BYTES]
            pipe.xadd(self.dead_stream, fields, maxlen=DEAD_LETTER_CAP, approximate=True)
        pipe.pexpire(self.dead_stream, self._dead_ttl_ms)
        ids = [eid for eid, _, _ in bad]
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        self._call(pipe.execute)
        self.stats["dropped_invalid"] += len(bad)
        for eid, _, why in bad:
            self._drops(eid, self.dead_stream, why)

    def dead_letters(self, limit: int = 100) -> list[dict[str, str]]:
        if limit <= 0:
            return []
        entries = self._call(self._r.xrevrange, self.dead_stream, count=limit)
        out = [
            {
                "id": _s(f.get(b"id", b"")),
                "reason": _s(f.get(b"reason", b"")),
                "record": f.get(b"t", b"").decode(errors="replace"),
            }
            for _, f in entries
        ]
        return out[::-1]

    def clear(self) -> int:
        """Empty the stream and recreate the group at its end, in one transaction (MULTI/EXEC): no
        entry, pending or not, survives, and the group never goes missing for another handle."""
        pipe = self._r.pipeline(transaction=True)
        pipe.xlen(self.stream)
        pipe.delete(self.stream)
        pipe.xgroup_create(self.stream, self.group, id="$", mkstream=True)
        pipe.pexpire(self.stream, self._ttl_ms)
        n = self._call(pipe.execute)[0]
        self._outstanding.clear()
        return int(n)

    def finish(self) -> dict[str, int]:
        """Delete the run's stream (what is left in it is never trained: a run reads only what its
        own generators write after it starts); its dead letters stay for ``dead_ttl_s``. Returns
        ``buffer/produced`` (entries ever added to the stream since it was last emptied), what was
        still ``buffer/left`` in it (undelivered or pending) and ``buffer/dead_letters`` kept."""
        produced = 0
        with suppress(redis.ResponseError):  # no such key (deleted, or expired): nothing was kept
            produced = int(self._call(self._r.xinfo_stream, self.stream)["entries-added"])
        pipe = self._r.pipeline(transaction=True)
        pipe.xlen(self.stream)
        pipe.delete(self.stream)
        pipe.xlen(self.dead_stream)
        pipe.pexpire(self.dead_stream, self._dead_ttl_ms)
        left, _, dead, _ = self._call(pipe.execute)
        self._outstanding.clear()
        self._stop_beating()
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.stream) + ":alive:*"
        alive = list(self._r.scan_iter(match=pattern, count=1000))
        if alive:
            self._call(self._r.delete, *alive)  # the run is over: nobody's entries are held
        return {"buffer/produced": produced, "buffer/left": int(left), "buffer/dead_letters": int(dead)}

    def ack(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        self.stats["acked"] += self._ack_delete(ids)
        self._outstanding.difference_update(ids)

    def _ack_delete(self, ids: Sequence[str]) -> int:
        pipe = self._r.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)  # keeps the stream = undelivered + pending, i.e. bounded
        pipe.pexpire(self.stream, self._ttl_ms)  # a trainer that acks is alive
        acked, _, _ = self._call(pipe.execute)
        return int(acked)

    # ------------------------------------------------------------------ inspection
    def pending(self) -> int:
        return int(self._grouped(self._r.xpending, self.stream, self.group)["pending"])

    def __len__(self) -> int:
        for g in self._grouped(self._r.xinfo_groups, self.stream):
            if _s(g["name"]) == self.group and g.get("lag") is not None:
                return int(g["lag"])
        # lag is null after some deletions (and absent before Redis 7); the stream holds exactly
        # the undelivered plus the pending entries, since acked ones are deleted
        pipe = self._r.pipeline(transaction=True)
        pipe.xlen(self.stream)
        pipe.xpending(self.stream, self.group)
        length, pend = self._call(pipe.execute)
        return max(0, int(length) - int(pend["pending"]))

    def close(self) -> None:
        if not self._closed:
            self._stop_beating()
            self._closed = True
            self._drops.flush()
            self._r.close()

    def __repr__(self) -> str:
        return (
            f"RedisBuffer(url={self.safe_url!r}, stream={self.stream!r}, group={self.group!r}, "
            f"consumer={self.consumer!r})"
        )
