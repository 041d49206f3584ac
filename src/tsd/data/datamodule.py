"""Streaming DataModule: batches of B trajectories from the buffer, checked by the policy clock.

    buffer --get--> admit (record check, clock: ahead? stale?) --> B fresh items --> TrajectoryBatch

The stream is an ``IterableDataset`` over the buffer. Where the trajectories come from is the
:class:`~tsd.generation.base.Generation` it holds: in this process
(:class:`~tsd.generation.local.LocalGeneration`, asked for one more rollout whenever the buffer
cannot fill a batch) or on generator ranks (:class:`~tsd.generation.remote.RemoteGeneration`: the
DataModule only reads, and stops the run after ``max_wait`` seconds without a trajectory). It
holds the :class:`~tsd.data.policy_clock.PolicyClock`: a trajectory more than ``max_lag``
optimiser steps behind the step that would train it is dropped and counted
(``train/dropped_stale``), one ahead of it was not made by this run's weights.

Every record is checked before it reaches a batch: against the model
(:class:`~tsd.data.record_check.RecordCheck`: vocabulary, context length) and against the clock;
one that fails goes to the buffer's dead letters with its reason
(:meth:`~tsd.buffers.base.Buffer.reject`) and is counted (``buffer/dropped_invalid``), and the
batch is filled with the next records. A batch's buffer entries are acknowledged only after the
optimiser step that used them (:class:`~tsd.callbacks.ack.AckAfterStep`), so a crash loses nothing.

Lightning fetches each batch one step before it trains it, so a batch is finished (read or
generated, re-checked against the clock, collated) only when it is about to be trained
(:class:`PendingBatch`): ``max_lag`` holds exactly, and ``sync_every = 1`` is on-policy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from tsd.buffers.base import Buffer, BufferItem
from tsd.config import check_bool, check_int, check_number, require
from tsd.data.batch import TrajectoryBatch
from tsd.data.collate import collate_trajectories
from tsd.data.policy_clock import PolicyClock
from tsd.data.record_check import RecordCheck
from tsd.generation.base import Generation

log = logging.getLogger(__name__)


class PendingBatch:
    """One batch as Lightning fetches it: one step before it is trained. ``items`` are the buffer
    items already read (a generation that :attr:`~tsd.generation.base.Generation.reads_ahead`), or
    ``None``: nothing read yet (reading may mean generating, which must wait for the weight sync
    of the step before). :meth:`TrajectoryDataModule.on_before_batch_transfer` finishes it when it
    is about to be trained: it reads (and generates) what is missing, drops what a sync has made
    stale since, and collates."""

    def __init__(self, items: list[BufferItem] | None) -> None:
        self.items = items


class TrajectoryStream(IterableDataset):
    def __init__(self, dm: TrajectoryDataModule) -> None:
        self.dm = dm

    def __iter__(self) -> Iterator[PendingBatch]:
        while True:
            yield PendingBatch(self.dm.next_items() if self.dm.generation.reads_ahead else None)


class TrajectoryDataModule(L.LightningDataModule):
    #: items read at a time when a batch takes the rest of a rollout (``whole_rollouts``)
    WHOLE_ROLLOUT_READ = 1024

    def __init__(
        self,
        buffer: Buffer,
        generation: Generation,
        batch_size: int = 32,
        sync_every: int = 8,
        max_lag: int = 16,
        max_wait: float = 600.0,
        start_wait: float | None = None,
        pad_id: int = 0,
        get_timeout: float = 1.0,
        record_check: RecordCheck | None = None,
        run_id: str | None = None,
        whole_rollouts: bool = False,
    ) -> None:
        """
        Args:
            buffer: where trajectories come from.
            generation: where they are made (:mod:`tsd.generation`).
            batch_size: trajectories per optimiser step on this rank (B; article: 32 for
                MCTS/best-of-N, 2048 = 128 prompts x 16 for group sampling).
            sync_every: optimiser steps between two publications of the weights to the generation
                (article: 8); see :class:`~tsd.data.policy_clock.PolicyClock`.
            max_lag: drop trajectories more than this many optimiser steps behind the step that
                would train them.
            max_wait: seconds without any trajectory before the run stops with an error (a dead
                generator must not hang the trainers; a generation that refills never waits).
            start_wait: the same before the first trajectory of this process, which waits for the
                generators' start-up (vLLM engines load, compile and capture their CUDA graphs)
                and their first whole rollouts (an MCTS search of 100 waves); None: ``max_wait``.
            pad_id: the tokenizer's pad id.
            get_timeout: seconds one buffer read waits when the generation cannot refill.
            record_check: the model-dependent checks every record passes before a batch (None: the
                schema and the clock only).
            run_id: the run's id, kept in checkpoints so that a resume reads the same Redis stream.
            whole_rollouts: a batch also takes the rest of the rollout that filled it, so one
                rollout's trajectories are never split over two steps (``batch_size`` is then a
                minimum). For rollouts that emit a varying number of trajectories (the whole tree:
                ``rollout/emission=tree``) with ``batch_size: 1``, each step trains one rollout;
                an in-process generation only (it knows where a rollout ends).
        """
        super().__init__()
        self.batch_size = check_int(batch_size, "data.batch_size", low=1)
        self.whole_rollouts = check_bool(whole_rollouts, "data.whole_rollouts")
        require(
            not (self.whole_rollouts and generation.reads_ahead),
            "data.whole_rollouts",
            "false with generation=remote (the generator ranks' rollouts interleave in the buffer)",
            whole_rollouts,
        )
        self.max_wait = check_number(max_wait, "data.max_wait", low=0, low_open=True)
        if start_wait is not None:
            check_number(start_wait, "data.start_wait", low=0, low_open=True)
        self.start_wait = self.max_wait if start_wait is None else float(start_wait)
        self._arrived = False  # a trajectory has arrived in this process (start_wait is over)
        self.get_timeout = check_number(get_timeout, "data.get_timeout", low=0)
        self.buffer, self.generation = buffer, generation
        self.clock = PolicyClock(sync_every, max_lag)
        self.pad_id, self.record_check, self.run_id = pad_id, record_check, run_id
        # buffer/dropped_invalid = what the checkpoint counted + what this buffer handle has counted
        # since (a resumed run's handle starts from 0)
        self._invalid_restored, self._invalid_offset = 0, 0
        self.consumed = 0
        self._held: list[BufferItem] = []

    def setup(self, stage: str) -> None:
        """On every training process: its own handle on a shared buffer (a forked rank gets its own
        connection and consumer name), and the generation's trainer side."""
        self.buffer = self.buffer.for_this_process()
        self.generation.setup(self.trainer)

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the stream yields whole batches; workers=0 keeps the generation in this
        # process, where the weight sync reaches it
        return DataLoader(TrajectoryStream(self), batch_size=None, num_workers=0)

    # ------------------------------------------------------------------ batching
    def _admit(self, items: list[BufferItem]) -> list[BufferItem]:
        """The items fit to train now: invalid ones are rejected (dead letters), stale ones acked
        and counted."""
        keep: list[BufferItem] = []
        stale: list[BufferItem] = []
        bad: list[BufferItem] = []
        reasons: list[str] = []
        for it in items:
            t = it.trajectory
            why = self.record_check.reason(t) if self.record_check is not None else None
            why = why or self.clock.ahead(t.policy_version)
            if why is not None:
                bad.append(it)
                reasons.append(why)
                continue
            self.generation.observe(t)
            (stale if self.clock.is_stale(t.policy_version) else keep).append(it)
        if bad:
            self.buffer.reject(bad, reasons)
        if stale:
            self.buffer.ack([it.id for it in stale])
            self.clock.drop_stale(len(stale))
        return keep

    @property
    def dropped_stale(self) -> int:
        return self.clock.dropped_stale

    @property
    def dropped_invalid(self) -> int:
        """Records rejected before a batch in this run (a resume continues the count)."""
        return self._invalid_restored + self.buffer.stats["dropped_invalid"] - self._invalid_offset

    def next_batch(self) -> TrajectoryBatch:
        """The next collated batch of ``batch_size`` fresh trajectories."""
        return self._collate(self.next_items())

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Lightning hook, called when the batch is about to be trained (one step after it was
        fetched, after the weight sync of the step before): items that the sync made stale are
        dropped and replaced, so no trained trajectory is more than ``max_lag`` steps behind; a
        local generation runs its rollout only now, so with ``sync_every = 1`` training is
        on-policy (lag 0)."""
        if not isinstance(batch, PendingBatch):
            return batch
        if batch.items:
            self._held = batch.items + self._held
        return self._collate(self.next_items())

    def next_items(self) -> list[BufferItem]:
        """``batch_size`` buffer items the clock admits (held-over ones first), asking the
        generation for more whenever the buffer runs short."""
        items = self._admit(self._held)  # held-over items are re-checked: the clock may have moved
        self._held = []
        waited_since = time.monotonic()
        refills = not self.generation.reads_ahead
        while len(items) < self.batch_size:
            need = self.batch_size - len(items)
            got = self._admit(self.buffer.get(need, timeout=0 if refills else self.get_timeout))
            items += got
            self._arrived = self._arrived or bool(got)
            if len(items) >= self.batch_size:
                break
            if got or self.generation.refill():  # progress: read some, or produced one more rollout
                waited_since = time.monotonic()
                self._arrived = True
            else:
                limit, field = (
                    (self.max_wait, "max_wait") if self._arrived else (self.start_wait, "start_wait")
                )
                if time.monotonic() - waited_since > limit:
                    raise RuntimeError(
                        f"no trajectory arrived for {limit:.0f}s (data.{field}"
                        f"{'' if self._arrived else ', before the first one'}): are the generators alive?"
                    )
        if self.whole_rollouts:  # the rest of the last rollout: everything the buffer holds now
            while True:
                more = self.buffer.get(self.WHOLE_ROLLOUT_READ, timeout=0)
                if not more:
                    return items
                items += self._admit(more)
        items, self._held = items[: self.batch_size], items[self.batch_size :]
        return items

    def _collate(self, items: list[BufferItem]) -> TrajectoryBatch:
        trajs = [it.trajectory for it in items]
        batch = collate_trajectories(
            trajs, self.pad_id, lags=[self.clock.lag(t.policy_version) for t in trajs]
        )
        batch.buffer_ids = [it.id for it in items]
        self.consumed += len(items)
        batch.stats = {**self.stats(), **self.generation.batch_stats(trajs)}
        return batch

    def ack(self, ids: list[str]) -> None:
        self.buffer.ack(ids)

    def stats(self) -> dict[str, float]:
        return {
            "train/dropped_stale": float(self.clock.dropped_stale),
            "buffer/dropped_invalid": float(self.dropped_invalid),
            "compute/generated_tokens": float(self.generation.generated_tokens()),
            "compute/prefill_tokens": float(self.generation.prefill_tokens()),
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "clock": self.clock.state_dict(),
            "dropped_invalid": self.dropped_invalid,
            "consumed": self.consumed,
            "generation": self.generation.state_dict(),
            # an in-process buffer dies with the process: keep what it holds (a Redis stream persists)
            "buffer": self.buffer.snapshot(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.clock.load_state_dict(state["clock"])
        self._invalid_restored = int(state.get("dropped_invalid", 0))
        self._invalid_offset = self.buffer.stats["dropped_invalid"]
        self.consumed = int(state["consumed"])
        self.generation.load_state_dict(state["generation"])
        if state.get("buffer") is not None:
            self._held = []
            self.buffer.restore(state["buffer"])
