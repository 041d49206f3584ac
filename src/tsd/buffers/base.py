"""The buffer interface: moves :class:`~tsd.rl.trajectory.Trajectory` records from producers
(rollout workers) to consumers (trainers), losing none.

Delivery semantics (every implementation):

- **at-least-once.** ``get`` hands out items that stay *pending* until ``ack``. A consumer
  acks only after the optimiser step that used them has completed, so a trainer that dies
  mid-step loses nothing: its pending items go back to a live consumer
  (``RedisBuffer`` reclaims them after ``claim_idle_ms``; ``MemoryBuffer.requeue_pending``).
  The flip side is that an item can be delivered twice (a slow consumer whose items were
  reclaimed, a crash after the step but before the ack); trainers must tolerate a rare
  duplicate, which for on-policy RL is one extra sample.
- **bounded.** Capacity counts undelivered plus pending items; ``put`` blocks (back-pressure on
  the generators) until there is room, up to ``put_timeout`` seconds, then raises
  :class:`BufferFullError`. Nothing is ever dropped to make room.
- **FIFO** per buffer for fresh items; reclaimed / requeued items come first.
- ``stats`` counts, for this process's handle only: ``put``, ``delivered`` (including reclaimed),
  ``acked``, ``dropped_invalid`` (records that never reach a batch: malformed ones discarded on
  the way out, and those a consumer :meth:`~Buffer.reject` s) and ``reclaimed``.
- **dead letters.** A record that must not be trained (malformed, or unfit for the model: see
  :mod:`tsd.data.record_check`) is not an error of the run: it is moved to a bounded dead-letter
  list with its reason (:meth:`~Buffer.reject`; for Redis the stream ``<stream>:dead``), acked so
  that nobody receives it again, counted, logged, and the run goes on.

Typical consumer loop::

    items = buffer.get(32, timeout=1.0)
    loss = step([it.trajectory for it in items])   # forward, backward, optimiser.step()
    buffer.ack([it.id for it in items])
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tsd.rl.trajectory import Trajectory

STAT_KEYS = ("put", "delivered", "acked", "dropped_invalid", "reclaimed")
#: most dead letters kept (the oldest go first), and the most bytes of a record kept in one
DEAD_LETTER_CAP = 10_000
DEAD_LETTER_RECORD_BYTES = 1 << 16


class DropWarnings:
    """Warnings about dropped (dead-lettered) records, rate-limited: the first ``burst`` one line
    each, then at most one line every ``interval_s`` seconds that counts the records dropped since
    the last line and quotes the newest. The counts are exact: every drop is in a line, and
    :meth:`flush` (at ``close``) writes what is still uncounted. A run fed garbage by a broken
    generator writes a few lines a minute, not one per record.

    Args:
        logger: where the lines go (at WARNING).
        owner: how the lines name the buffer (``RedisBuffer``).
        burst: drops logged one by one before the rate limit starts.
        interval_s: seconds between two summary lines.
        clock: the time source (tests pass a fake one).
    """

    def __init__(
        self,
        logger: logging.Logger,
        owner: str,
        burst: int = 10,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log, self.owner, self.burst, self.interval_s, self.clock = (
            logger,
            owner,
            burst,
            interval_s,
            clock,
        )
        self.total = 0  # every drop this handle has seen
        self._unlogged = 0  # drops not yet in any line
        self._newest = ""
        self._next_line = 0.0

    def __call__(self, record_id: str, where: str, reason: str) -> None:
        """One dropped record: its id, where it was kept (the dead-letter list) and why."""
        self.total += 1
        if self.total <= self.burst:
            self.log.warning(
                "%s: dropping invalid record %s (kept in %s): %.200s", self.owner, record_id, where, reason
            )
            if self.total == self.burst:
                self._next_line = self.clock() + self.interval_s
                self.log.warning(
                    "%s: %d invalid records dropped; further ones are counted in one line every %.0fs "
                    "(buffer/dropped_invalid counts each)",
                    self.owner,
                    self.burst,
                    self.interval_s,
                )
            return
        self._unlogged += 1
        self._newest = f"{record_id} (kept in {where}): {reason[:200]}"
        if self.clock() >= self._next_line:
            self.flush()

    def flush(self) -> None:
        """The line for the drops not yet in any line (nothing if there are none)."""
        if self._unlogged:
            self.log.warning(
                "%s: %d more invalid records dropped (%d in all); the newest: %s",
                self.owner,
                self._unlogged,
                self.total,
                self._newest,
            )
            self._unlogged = 0
        self._next_line = self.clock() + self.interval_s


class BufferClosedError(RuntimeError):
    """The buffer was used after ``close()``."""


class BufferConnectionError(RuntimeError):
    """The buffer's backing service (Redis) is unreachable or refused us."""


class BufferFullError(TimeoutError):
    """``put`` waited ``put_timeout`` seconds for room and got none.

    ``ids`` are the items of that call that *were* added before the time ran out (a batch can
    be partly accepted); the rest were not.
    """

    def __init__(self, message: str, ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.ids = list(ids)


@dataclass
class BufferItem:
    """One delivered trajectory; ``id`` is what the consumer acks."""

    #: buffer-assigned id: the Redis stream entry id, or a counter for the memory buffer
    id: str
    trajectory: Trajectory


class Buffer(ABC):
    """Moves trajectories between producers (rollouts) and consumers (trainers), losing none."""

    #: True when other processes (other ranks, other nodes) reach the same buffer through their own
    #: handle (Redis); False for a buffer that lives inside one process (memory)
    shared: bool = False

    def __init__(self) -> None:
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    @property
    def location(self) -> str:
        """Where the records live, as every process that shares this buffer names it (Redis: the
        stream's key, which names the run); an in-process buffer has no name outside it."""
        return f"{type(self).__name__} in process {id(self):x}"

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The constructor arguments that open another handle on this buffer."""

    def for_this_process(self) -> Buffer:
        """This handle if this process may use it, else a new handle on the same buffer (a forked
        rank of a shared buffer gets its own connection and consumer name). A buffer that is not
        :attr:`shared` is only ever used by the process that made it: itself."""
        return self

    def snapshot(self) -> list[str] | None:
        """What a checkpoint keeps of the buffer so that a resumed run trains on exactly what this
        one would have: every trajectory not yet acked, as JSON records; None when the buffer
        outlives the process by itself (Redis)."""
        return None

    def restore(self, records: Sequence[str]) -> None:
        """Replace the contents with ``records`` (from :meth:`snapshot`), all undelivered."""
        raise NotImplementedError(f"{type(self).__name__} keeps its own contents; it has no snapshot")

    @abstractmethod
    def put(self, trajectories: Sequence[Trajectory]) -> list[str]:
        """Append trajectories in order and return their ids; blocks while the buffer is full
        (back-pressure), at most ``put_timeout`` seconds, then raises :class:`BufferFullError`."""

    @abstractmethod
    def get(self, n: int, timeout: float | None = None) -> list[BufferItem]:
        """Up to ``n`` items. Waits up to ``timeout`` seconds for at least one (``None``: return
        at once, possibly ``[]``). The items are pending until :meth:`ack`."""

    @abstractmethod
    def ack(self, ids: Sequence[str]) -> None:
        """The consumer is done with these items (call after the optimiser step that used them).
        Unknown or already-acked ids are ignored."""

    @abstractmethod
    def reject(self, items: Sequence[BufferItem], reasons: Sequence[str]) -> None:
        """Take delivered items out for good, one reason each: they go to the dead-letter list,
        are acked (no consumer gets them again) and counted in ``stats["dropped_invalid"]``."""

    @abstractmethod
    def dead_letters(self, limit: int = 100) -> list[dict[str, str]]:
        """The newest ``limit`` dead letters, oldest first: ``{"id", "reason", "record"}`` (the
        record as JSON, cut at ``DEAD_LETTER_RECORD_BYTES``)."""

    @abstractmethod
    def clear(self) -> int:
        """Drop every item, undelivered and pending, and return how many: a run (or its resume)
        starts from an empty buffer, so what an earlier, interrupted incarnation left behind
        (made by weights the checkpoint may not have) is never trained. Dead letters are kept."""

    def finish(self) -> dict[str, int]:
        """The run is over and finished well: remove what it keeps outside this process, so that
        finished runs do not pile up on a shared server (Redis: the run's stream is deleted, its dead
        letters kept until their expiry). Returns what was there, for the run's results (nothing
        for an in-process buffer, which goes with the process)."""
        return {}

    @abstractmethod
    def pending(self) -> int:
        """Items delivered but not yet acked (all consumers)."""

    @abstractmethod
    def __len__(self) -> int:
        """Items not yet delivered to any consumer."""

    @abstractmethod
    def close(self) -> None:
        """Release resources; idempotent. Items in the buffer are kept (Redis) or dropped with the
        process (memory)."""

    def __bool__(self) -> bool:
        # a buffer object is always truthy; without this ``if buffer:`` would mean "is non-empty"
        return True

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
