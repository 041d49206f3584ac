"""Streaming DataModule: batches of B trajectories from the buffer.

The stream is an ``IterableDataset`` over the buffer. A batch's buffer entries are acknowledged
only after the optimiser step that used them (:class:`~tsd.callbacks.RolloutSync`), so a crash
loses nothing. Trajectories more than ``max_lag`` policy versions behind the trainer are dropped
and counted (``train/dropped_stale``). Every record is checked before it reaches a batch: against
the model (:class:`~tsd.data.record_check.RecordCheck`: vocabulary, context length) and against
the trainer (a ``policy_version`` ahead of the trainer's was made by weights this run does not
have: another run's record); one that fails goes to the buffer's dead letters with its reason
(:meth:`~tsd.buffers.base.Buffer.reject`) and is counted (``buffer/dropped_invalid``), and the
batch is filled with the next records. In the single-process mode the DataModule owns a :class:`RolloutWorker` (a generator
copy of the policy, refreshed every ``sync_every`` optimiser steps) and runs it whenever the buffer
cannot fill a batch; in distributed mode the generator ranks fill the buffer and the DataModule
never generates by itself. Lightning fetches each batch one step before training it, so a batch
is finished (read or generated, re-checked for staleness, collated) only when it is about to be
trained (:class:`PendingBatch`): ``max_lag`` holds exactly, and ``sync_every=1`` is on-policy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from tsd.buffers.base import Buffer, BufferItem
from tsd.data.collate import collate_trajectories
from tsd.data.record_check import RecordCheck
from tsd.rollouts.worker import RolloutWorker

log = logging.getLogger(__name__)

#: trajectory statistics a trainer in another process logs (the mean over its batch)
REMOTE_STAT_PREFIXES = ("rollout/", "search/", "perf/")


class PendingBatch:
    """One batch as Lightning fetches it: one step before it is trained. ``items`` are the buffer
    items already read (distributed mode), or ``None``: nothing read yet (single-process mode,
    where reading may mean generating, which must wait for the weight sync of the step before).
    :meth:`TrajectoryDataModule.on_before_batch_transfer` finishes it when it is about to be
    trained: it reads (and generates) what is missing, drops what a sync has made stale since, and
    collates."""

    def __init__(self, items: list[BufferItem] | None) -> None:
        self.items = items


class TrajectoryStream(IterableDataset):
    def __init__(self, dm: TrajectoryDataModule) -> None:
        self.dm = dm

    def __iter__(self) -> Iterator[PendingBatch]:
        while True:
            # distributed: read ahead (the generators run anyway); single-process: defer, so that
            # the in-process rollout uses the weights of the step just finished
            yield PendingBatch(self.dm.next_items() if self.dm.worker is None else None)


class TrajectoryDataModule(L.LightningDataModule):
    def __init__(
        self,
        buffer: Buffer,
        batch_size: int = 32,
        max_lag: int = 4,
        pad_id: int = 0,
        worker: RolloutWorker | None = None,
        get_timeout: float = 1.0,
        max_wait: float = 600.0,
        record_check: RecordCheck | None = None,
        run_id: str | None = None,
    ) -> None:
        """
        Args:
            buffer: where trajectories come from.
            batch_size: trajectories per optimiser step (B; article: 32 for MCTS/best-of-N, 2048 =
                128 prompts x 16 for group sampling).
            max_lag: drop trajectories more than this many policy versions behind the trainer.
            pad_id: the tokenizer's pad id.
            worker: in-process generator (single-process mode); None in distributed mode.
            get_timeout: seconds one buffer read waits.
            max_wait: with no worker, seconds without any trajectory before the run stops with an
                error (a dead generator must not hang the trainers).
            record_check: the model-dependent checks every record passes before a batch (None: the
                schema and the version check only).
            run_id: the run's id, kept in checkpoints so that a resume reads the same Redis stream.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size: must be >= 1, got {batch_size}")
        if max_lag < 0:
            raise ValueError(f"data.max_lag: must be >= 0, got {max_lag}")
        if not max_wait > 0:
            raise ValueError(f"data.max_wait: must be > 0 seconds, got {max_wait}")
        self.buffer, self.batch_size, self.max_lag = buffer, batch_size, max_lag
        self.pad_id, self.worker = pad_id, worker
        self.get_timeout, self.max_wait = get_timeout, max_wait
        self.record_check, self.run_id = record_check, run_id
        #: the trainer's policy version (set by the sync callback)
        self.trainer_version = 0
        self.dropped_stale = 0
        # buffer/dropped_invalid = what the checkpoint counted + what this buffer handle has counted
        # since (a resumed run's handle starts from 0)
        self._invalid_restored, self._invalid_offset = 0, 0
        self.consumed = 0
        self.generated_tokens_remote = 0  # reported by generator ranks, if any
        # generator id -> the largest cumulative token count its trajectories carried (trajectories
        # of one generator are spread over the trainers, so the max is what this rank has seen)
        self._gen_tokens: dict[int, float] = {}
        self._held: list[BufferItem] = []

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the stream yields whole collated batches; workers=0 keeps the generator
        # in this process, where the sync callback can reach it
        return DataLoader(TrajectoryStream(self), batch_size=None, num_workers=0)

    # ------------------------------------------------------------------ batching
    def _admit(self, items: list[BufferItem]) -> list[BufferItem]:
        """The items fit to train now: invalid ones are rejected (dead letters), stale ones acked
        and counted."""
        keep, stale, bad, reasons = [], [], [], []
        for it in items:
            t = it.trajectory
            why = self.record_check.reason(t) if self.record_check is not None else None
            if why is None and t.policy_version > self.trainer_version:
                why = (
                    f"policy_version {t.policy_version} is ahead of the trainer's {self.trainer_version}: "
                    "not made by this run's weights"
                )
            if why is not None:
                bad.append(it)
                reasons.append(why)
                continue
            st = t.stats
            if "gen_tokens" in st:
                gid = int(st.get("gen_id", 0))
                self._gen_tokens[gid] = max(self._gen_tokens.get(gid, 0.0), float(st["gen_tokens"]))
            lag = self.trainer_version - t.policy_version
            (stale if lag > self.max_lag else keep).append(it)
        if bad:
            self.buffer.reject(bad, reasons)
        if stale:
            self.buffer.ack([it.id for it in stale])
            self.dropped_stale += len(stale)
        self.generated_tokens_remote = int(sum(self._gen_tokens.values()))
        return keep

    @property
    def dropped_invalid(self) -> int:
        """Records rejected before a batch in this run (a resume continues the count)."""
        return self._invalid_restored + self.buffer.stats["dropped_invalid"] - self._invalid_offset

    def next_batch(self) -> dict:
        """The next collated batch of ``batch_size`` fresh trajectories."""
        return self._collate(self.next_items())

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Lightning hook, called when the batch is about to be trained (one step after it was
        fetched): items that a weight sync made stale since are dropped and replaced, so no trained
        trajectory is more than ``max_lag`` versions behind; in single-process mode the rollout
        runs only now, so with ``sync_every=1`` training is on-policy (lag 0)."""
        if not isinstance(batch, PendingBatch):
            return batch
        if batch.items:
            self._held = batch.items + self._held
        return self._collate(self.next_items())

    def next_items(self) -> list[BufferItem]:
        """``batch_size`` buffer items within ``max_lag`` of the trainer's version (held-over ones
        first), generating in-process when the buffer runs short (single-process mode)."""
        items = self._admit(self._held)  # held-over items are re-checked: the version may have moved
        self._held = []
        waited_since = time.monotonic()
        while len(items) < self.batch_size:
            need = self.batch_size - len(items)
            got = self._admit(self.buffer.get(need, timeout=0 if self.worker else self.get_timeout))
            items += got
            if len(items) >= self.batch_size:
                break
            if self.worker is not None:
                if not got:
                    self.worker.produce()
            elif got:
                waited_since = time.monotonic()
            elif time.monotonic() - waited_since > self.max_wait:
                raise RuntimeError(
                    f"no trajectory arrived for {self.max_wait:.0f}s (data.max_wait): "
                    "are the generators alive?"
                )
        items, self._held = items[: self.batch_size], items[self.batch_size :]
        return items

    def _collate(self, items: list[BufferItem]) -> dict:
        trajs = [it.trajectory for it in items]
        batch = collate_trajectories(trajs, self.pad_id)
        batch["buffer_ids"] = [it.id for it in items]
        self.consumed += len(items)
        batch["stats"] = {**self.stats(), **(self._remote_stats(trajs) if self.worker is None else {})}
        return batch

    @staticmethod
    def _remote_stats(trajs: list) -> dict[str, float]:
        """Rollout, search and generator-speed statistics of a batch made elsewhere (distributed
        mode): the mean over its trajectories of what their generators attached to them."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for t in trajs:
            for k, v in t.stats.items():
                if k.startswith(REMOTE_STAT_PREFIXES):
                    sums[k] = sums.get(k, 0.0) + float(v)
                    counts[k] = counts.get(k, 0) + 1
        return {k: sums[k] / counts[k] for k in sums}

    def ack(self, ids: list[str]) -> None:
        self.buffer.ack(ids)

    def stats(self) -> dict[str, float]:
        s: dict[str, float] = {
            "train/dropped_stale": float(self.dropped_stale),
            "buffer/dropped_invalid": float(self.dropped_invalid),
        }
        if self.worker is not None:
            s.update(self.worker.last_stats)
            s["compute/generated_tokens"] = float(self.worker.generated_tokens)
            s["rollout/version"] = float(self.worker.version)
        else:
            s["compute/generated_tokens"] = float(self.generated_tokens_remote)
        return s

    # ------------------------------------------------------------------ weights
    def sync_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        self.trainer_version = version
        if self.worker is not None:
            self.worker.load_weights(state_dict, version)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "trainer_version": self.trainer_version,
            "dropped_stale": self.dropped_stale,
            "dropped_invalid": self.dropped_invalid,
            "consumed": self.consumed,
            "worker": self.worker.state_dict() if self.worker is not None else None,
            # an in-process buffer dies with the process: keep what it holds (a Redis stream persists)
            "buffer": self.buffer.snapshot() if hasattr(self.buffer, "snapshot") else None,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.trainer_version = int(state["trainer_version"])
        self.dropped_stale = int(state["dropped_stale"])
        self._invalid_restored = int(state.get("dropped_invalid", 0))
        self._invalid_offset = self.buffer.stats["dropped_invalid"]
        self.consumed = int(state["consumed"])
        self._gen_tokens = {int(k): float(v) for k, v in state.get("gen_tokens", {}).items()}
        self.generated_tokens_remote = int(sum(self._gen_tokens.values()))
        if self.worker is not None and state.get("worker") is not None:
            self.worker.load_state_dict(state["worker"])
        if state.get("buffer") is not None and hasattr(self.buffer, "restore"):
            self._held = []
            self.buffer.restore(state["buffer"])
