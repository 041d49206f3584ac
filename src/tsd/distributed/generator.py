"""What a generator rank runs instead of the fit loop: rollouts in a loop with the newest weights.

The loop swaps in weights staged by the :class:`~tsd.distributed.weight_sync.WeightReceiver`
thread *between* rollouts (a rollout never mixes two policy versions, so every trajectory's
``policy_version`` is exact), then runs one :meth:`RolloutWorker.produce` (rollout -> buffer).
It ends when the trainers say stop (after finishing the rollout in hand), or raises when the
receiver died (trainer rank 0 gone, a sync timed out) so the launcher can stop the whole job.
"""

from __future__ import annotations

import logging
import time

from tsd.buffers.base import BufferFullError
from tsd.distributed.weight_sync import WeightReceiver
from tsd.rollouts.worker import RolloutWorker

log = logging.getLogger(__name__)


class GeneratorLoop:
    def __init__(self, worker: RolloutWorker, receiver: WeightReceiver, name: str = "generator") -> None:
        self.worker, self.receiver, self.name = worker, receiver, name
        self.swaps = 0

    def _swap(self) -> None:
        staged = self.receiver.take()
        if staged is None:
            return
        state, version = staged
        t0 = time.perf_counter()
        self.worker.load_weights(state, version)
        self.swaps += 1
        log.info("%s: policy version %d loaded (%.3fs)", self.name, version, time.perf_counter() - t0)

    def run(self) -> None:
        self.receiver.start()
        t0 = time.perf_counter()
        while True:
            self.receiver.check()
            if self.receiver.stopped.is_set():
                break
            self._swap()
            try:
                n = self.worker.produce()
            except BufferFullError:
                # the trainers stopped consuming: at the end of the run that is expected
                if self.receiver.stopped.wait(timeout=1.0) and self.receiver.error is None:
                    break
                raise
            log.debug("%s: rollout %d -> %d trajectories", self.name, self.worker.rollouts, n)
        self.receiver.check()
        log.info(
            "%s: stopped (%s) after %d rollouts, %d trajectories, %d generated tokens, %d weight swaps, %.0fs",
            self.name,
            self.receiver.stop_reason,
            self.worker.rollouts,
            self.worker.trajectories,
            self.worker.generated_tokens,
            self.swaps,
            time.perf_counter() - t0,
        )
