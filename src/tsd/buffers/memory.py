"""In-process trajectory buffer for one-process (laptop) runs and tests.

Same delivery semantics as :class:`~tsd.buffers.redis.RedisBuffer` (see :mod:`tsd.buffers.base`):
at-least-once, items pending until acked, bounded with back-pressure. Thread-safe (one
``threading.Condition``); it does not cross processes. Items are passed by reference, not copied:
consumers must not mutate the trajectories they get.

``requeue_pending()`` is the in-process counterpart of Redis reclaiming a dead consumer's
entries: it puts every delivered-but-unacked item back at the front of the queue.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from tsd.buffers.base import (
    DEAD_LETTER_CAP,
    DEAD_LETTER_RECORD_BYTES,
    Buffer,
    BufferClosedError,
    BufferFullError,
    BufferItem,
    DropWarnings,
)
from tsd.config import check_int, check_number
from tsd.rl.trajectory import Trajectory

log = logging.getLogger(__name__)


class MemoryBuffer(Buffer):
    """Thread-safe FIFO of trajectories with pending/ack bookkeeping.

    Args:
        capacity: most items held at once, undelivered plus pending; 0 is unbounded.
        put_timeout: seconds ``put`` waits for room before raising :class:`BufferFullError`.
    """

    def __init__(self, capacity: int = 0, put_timeout: float = 60.0) -> None:
        super().__init__()
        check_int(capacity, "MemoryBuffer.capacity", low=0)
        check_number(put_timeout, "MemoryBuffer.put_timeout", low=0, low_open=True)
        self.capacity = capacity
        self.put_timeout = put_timeout
        self._cond = threading.Condition()
        self._queue: deque[BufferItem] = deque()  # not yet delivered, FIFO
        self._pending: OrderedDict[str, BufferItem] = OrderedDict()  # delivered, in delivery order
        self._ids = itertools.count()
        self._closed = False
        self._dead: deque[dict[str, str]] = deque(maxlen=DEAD_LETTER_CAP)
        self._drops = DropWarnings(log, "MemoryBuffer")

    def config(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "put_timeout": self.put_timeout}

    def _room(self) -> int:
        if not self.capacity:
            return 1 << 62
        return self.capacity - len(self._queue) - len(self._pending)

    def put(self, trajectories: Sequence[Trajectory]) -> list[str]:
        ids: list[str] = []
        deadline = time.monotonic() + self.put_timeout
        with self._cond:
            for traj in trajectories:
                while True:
                    if self._closed:
                        raise BufferClosedError("MemoryBuffer.put: buffer is closed")
                    if self._room() > 0:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BufferFullError(
                            f"MemoryBuffer.put: full ({self.capacity} items undelivered or un-acked) for "
                            f"{self.put_timeout:g}s; {len(ids)} of {len(trajectories)} were added. "
                            "Are the consumers calling get() and ack()?",
                            ids,
                        )
                    self._cond.wait(left)
                item = BufferItem(str(next(self._ids)), traj)
                self._queue.append(item)
                ids.append(item.id)
                self.stats["put"] += 1
                self._cond.notify_all()
        return ids

    def get(self, n: int, timeout: float | None = None) -> list[BufferItem]:
        if n <= 0:
            return []
        deadline = time.monotonic() + (timeout or 0.0)
        with self._cond:
            while not self._queue and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            out = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
            for item in out:
                self._pending[item.id] = item
            self.stats["delivered"] += len(out)
            return out

    def ack(self, ids: Sequence[str]) -> None:
        with self._cond:
            done = sum(self._pending.pop(i, None) is not None for i in ids)
            self.stats["acked"] += done
            if done:
                self._cond.notify_all()  # wake producers waiting for room

    def reject(self, items: Sequence[BufferItem], reasons: Sequence[str]) -> None:
        with self._cond:
            for item, why in zip(items, reasons, strict=True):
                if self._pending.pop(item.id, None) is None:
                    continue  # not delivered, or already acked / rejected
                record = item.trajectory.to_json()[:DEAD_LETTER_RECORD_BYTES]
                self._dead.append({"id": item.id, "reason": why, "record": record})
                self.stats["dropped_invalid"] += 1
                self._drops(item.id, "its dead letters", why)
            self._cond.notify_all()  # room for producers

    def dead_letters(self, limit: int = 100) -> list[dict[str, str]]:
        with self._cond:
            return list(self._dead)[-limit:] if limit > 0 else []

    def clear(self) -> int:
        with self._cond:
            n = len(self._queue) + len(self._pending)
            self._queue.clear()
            self._pending.clear()
            self._cond.notify_all()
            return n

    def requeue_pending(self) -> int:
        """Put every delivered-but-unacked item back at the front, in delivery order; returns how
        many. Use when a consumer died mid-batch (the counterpart of Redis XAUTOCLAIM)."""
        with self._cond:
            items = list(self._pending.values())
            self._pending.clear()
            self._queue.extendleft(reversed(items))
            self.stats["reclaimed"] += len(items)
            if items:
                self._cond.notify_all()
            return len(items)

    def snapshot(self) -> list[str]:
        """Every trajectory not yet acked (pending first, then undelivered), as JSON records: what a
        checkpoint keeps so that a resumed run trains on exactly what this one would have."""
        with self._cond:
            return [it.trajectory.to_json() for it in (*self._pending.values(), *self._queue)]

    def restore(self, records: Sequence[str]) -> None:
        """Replace the contents with ``records`` (from :meth:`snapshot`), all undelivered."""
        with self._cond:
            self._pending.clear()
            self._queue.clear()
            for r in records:
                self._queue.append(BufferItem(str(next(self._ids)), Trajectory.from_json(r)))
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        """Wake every waiter; ``put`` then raises, ``get`` still drains what is left."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._drops.flush()

    def __repr__(self) -> str:
        return f"MemoryBuffer(capacity={self.capacity}, len={len(self)}, pending={self.pending()})"
