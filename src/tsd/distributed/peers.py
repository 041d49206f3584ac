"""Ranks of a multi-node job watch each other: a node that dies stops the others within seconds.

    torchrun --nnodes 2 ... train.py strategy=generator_trainer strategy.peer_timeout_s=30 ...

Under torchrun or SLURM every node has its own launcher, and nothing tells the survivors when
another node is gone: the torchrun agents only notice new nodes, a trainer waits ``data.max_wait``
(600 s) for trajectories from dead generators, a generator waits ``strategy.sync_timeout_s`` for
weights from a dead trainer. (On one machine the launcher sees its forked ranks die and stops the
others: :mod:`tsd.distributed.launcher`.)

:class:`PeerWatch`: every rank counts a heartbeat on the job's store (``tsd/peers/<rank>``, over
a connection of its own, so that a long ``wait`` on the control channel never holds it up) and
reads everyone else's. A peer whose count has not moved for ``timeout_s`` seconds (timed on this
rank's clock: node clocks never compare), or a store that cannot be reached (the node that hosts
it is gone), stops this rank at once with one line naming the peer::

    rank 0 (trainer 0 of 1): rank 1 (generator 0 of 1) gave no sign of life for 10 s (strategy.peer_timeout_s): its node is gone or hung; stopping

The rank exits with status 1, so its torchrun agent stops its node too. A rank that finishes says
so (``tsd/peers/<rank>/done``) before it stops beating, and is not waited for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)

PREFIX = "tsd/peers/"
#: exit status of a rank stopped because a peer is gone
EXIT_PEER_LOST = 1


def _default_fail(message: str) -> None:
    """Log ``message`` and end this process now: its main thread may be blocked in a collective
    with the dead peer, which no exception raised here could interrupt."""
    log.error(message)
    handlers = logging.getLogger().handlers
    for handler in handlers:
        with contextlib.suppress(Exception):  # leaving anyway
            handler.flush()
    if not handlers:  # nobody would see the log line
        print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


class PeerWatch:
    """Heartbeats of this rank, and a watch on the others' (see the module's docstring).

    Args:
        host, port: the job's store (``MASTER_ADDR``, ``MASTER_PORT``).
        rank, world_size: this rank and the job's size (generators included).
        describe: names a rank in messages (``rank 2 (generator 0 of 1)``).
        timeout_s: seconds without a sign of life before a peer counts as gone.
        interval_s: seconds between two beats (and reads); default ``timeout_s / 10``, at most 1 s.
        fail: what to do with the message when a peer is gone (default: log it, exit 1).
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        describe: Callable[[int], str],
        timeout_s: float,
        interval_s: float | None = None,
        fail: Callable[[str], None] = _default_fail,
    ) -> None:
        self.host, self.port, self.rank, self.world_size = host, int(port), rank, world_size
        self.describe, self.timeout_s, self.fail = describe, timeout_s, fail
        self.interval_s = interval_s if interval_s is not None else min(1.0, timeout_s / 10)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None

    def _connect(self) -> Any:
        timeout = timedelta(seconds=max(5.0, self.timeout_s))
        store = dist.TCPStore(self.host, self.port, is_master=False, timeout=timeout, wait_for_workers=False)
        return dist.PrefixStore(PREFIX, store)

    def start(self) -> PeerWatch:
        self._store = self._connect()
        self._store.add(str(self.rank), 1)  # alive from here on
        self._thread = threading.Thread(target=self._run, name="tsd-peer-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        store = self._store
        peers = [r for r in range(self.world_size) if r != self.rank]
        seen = dict.fromkeys(peers, -1)
        since = dict.fromkeys(peers, time.monotonic())  # when each peer's count last moved
        unreachable_since: float | None = None
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                store.add(str(self.rank), 1)
                for r in peers:
                    count = int(store.add(str(r), 0))
                    if count != seen[r]:
                        seen[r], since[r] = count, now
                    elif now - since[r] > self.timeout_s and not store.check([f"{r}/done"]):
                        if self._stop.is_set():
                            return
                        return self.fail(
                            f"{self.describe(self.rank)}: {self.describe(r)} gave no sign of life for "
                            f"{self.timeout_s:g} s (strategy.peer_timeout_s): its node is gone or hung; stopping"
                        )
                unreachable_since = None
            except Exception as e:  # noqa: BLE001 - the store's host (a node) may be gone
                if self._stop.is_set():
                    return
                unreachable_since = unreachable_since or now
                if now - unreachable_since >= min(self.timeout_s, 3 * self.interval_s):
                    return self.fail(
                        f"{self.describe(self.rank)}: the job's store at {self.host}:{self.port} cannot be "
                        f"reached ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}): "
                        "the node that hosts it is gone; stopping"
                    )

    def stop(self) -> None:
        """This rank is done: say so (its peers stop watching it), then stop beating."""
        if self._thread is None or self._stop.is_set():
            return
        with contextlib.suppress(Exception):  # the store may be gone already: nobody is left to tell
            self._store.set(f"{self.rank}/done", "1")
        self._stop.set()
        self._thread.join(timeout=max(5.0, 2 * self.interval_s))
