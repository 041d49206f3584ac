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

- ``get`` = ``XAUTOCLAIM`` (entries of *other* consumers idle for more than ``claim_idle_ms``,
  i.e. delivered to a trainer that died before acking) then ``XREADGROUP >``. Delivered entries
  sit in the group's pending list (PEL) until acked.
- ``ack`` = ``XACK`` + ``XDEL`` in one transaction, after the optimiser step that used them: the
  stream holds only undelivered and pending entries, so its length is the buffer's occupancy.
- A consumer that holds an entry longer than ``claim_idle_ms`` without calling ``get`` may see it
  reclaimed by another trainer, so an entry can be trained on twice; ``get`` refreshes the idle
  time of this consumer's own pending entries, so a live trainer that keeps calling ``get`` keeps
  them. Set ``claim_idle_ms`` well above the longest optimiser step.
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
import socket
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

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
        claim_idle_ms: a pending entry idle this long is taken over from its (presumed dead)
            consumer by the next ``get``.
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
    ) -> None:
        super().__init__()
        check_int(maxlen, "RedisBuffer.maxlen", low=1)
        check_int(block_ms, "RedisBuffer.block_ms", low=1)
        check_int(claim_idle_ms, "RedisBuffer.claim_idle_ms", low=0)
        check_number(connect_timeout, "RedisBuffer.connect_timeout", low=0, low_open=True)
        check_number(put_timeout, "RedisBuffer.put_timeout", low=0, low_open=True)
        check_number(ttl_s, "RedisBuffer.ttl_s", low=0.001)
        check_number(dead_ttl_s, "RedisBuffer.dead_ttl_s", low=0.001)
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
        self._next_claim = 0.0  # monotonic time of the next XAUTOCLAIM scan

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

    def _claim(self, n: int) -> list[tuple[Any, Any]]:
        """Entries idle > claim_idle_ms in any consumer's PEL, now ours. Scans at most every
        claim_idle_ms / 4 (nothing can become claimable faster than that matters)."""
        now = time.monotonic()
        if now < self._next_claim:
            return []
        out: list[tuple[Any, Any]] = []
        start: Any = "0-0"
        while True:
            resp = self._grouped(
                self._r.xautoclaim,
                self.stream,
                self.group,
                self.consumer,
                self.claim_idle_ms,
                start_id=start,
                count=n - len(out),
            )
            start, entries = resp[0], resp[1]
            for eid, fields in entries:
                if fields is None:  # deleted while pending (Redis 6.2 reports it like this)
                    self._call(self._r.xack, self.stream, self.group, eid)
                elif _s(eid) not in self._outstanding:  # our own: still ours, don't hand out again
                    out.append((eid, fields))
            if _s(start) == "0-0" or len(out) >= n:
                break
        if len(out) < n:  # PEL fully scanned; if it was full, scan again on the next call
            self._next_claim = now + self.claim_idle_ms / 4000
        if out:
            self.stats["reclaimed"] += len(out)
            log.warning(
                "RedisBuffer: consumer %s reclaimed %d entries idle > %d ms from other consumers",
                self.consumer,
                len(out),
                self.claim_idle_ms,
            )
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
            record = data if isinstance(data, (bytes, str)) else b""
            fields = {"id": eid, "reason": why, "consumer": self.consumer}
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
            self._closed = True
            self._drops.flush()
            self._r.close()

    def __repr__(self) -> str:
        return (
            f"RedisBuffer(url={self.safe_url!r}, stream={self.stream!r}, group={self.group!r}, "
            f"consumer={self.consumer!r})"
        )
