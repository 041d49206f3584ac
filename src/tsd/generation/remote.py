"""RemoteGeneration: the generator ranks' rollout loop, and the weight sender on trainer rank 0.

    python train.py experiment=cispo_countdown strategy=generator_trainer buffer=redis trainer.devices=3

:class:`~tsd.distributed.strategy.GeneratorTrainerStrategy` owns the ranks and their process
groups; this file owns what runs on them for generation (DESIGN.md "Distribution"; the seed
article's 6 generators + 2 trainers):

- **a generator rank** (:meth:`RemoteGeneration.run_generator`, which the strategy runs instead of
  the fit loop): its own sampler on its own device and seed, a :class:`~tsd.generation.worker.RolloutWorker`
  on its own handle of the shared buffer, and :class:`GeneratorLoop`: rollouts in a loop, swapping
  in the newest weights (staged by a :class:`~tsd.distributed.weight_sync.WeightReceiver` thread)
  *between* rollouts, so every trajectory's ``policy_version`` is exact;
- **trainer rank 0** (:meth:`RemoteGeneration.publish`, every ``data.sync_every`` steps): every
  trainer gathers the FSDP2 shards (:meth:`GeneratorTrainerStrategy.full_policy`, bucketed), then
  rank 0 announces the version on the control channel and broadcasts the weights on the sync group
  (:class:`~tsd.distributed.weight_sync.WeightSender`);
- **every trainer rank**: it only reads the buffer (a batch may be read ahead), and tallies what
  the generators report on their trajectories (``gen_id``, cumulative ``gen_tokens`` and ``gen_prefill_tokens``, the rollout's
  ``rollout/``, ``search/`` and ``perf/`` statistics), logged as the mean over each batch.

A generator that dies stops the job (the launcher names the rank); the trainers also stop after
``data.max_wait`` seconds without a trajectory, and a broadcast to a dead generator fails after
``strategy.sync_timeout_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any

from tsd.buffers.base import BufferFullError
from tsd.config import ConfigError, require
from tsd.distributed.weight_sync import WeightLayout, WeightReceiver, WeightSender
from tsd.generation.base import Generation
from tsd.generation.worker import RolloutWorker
from tsd.rl.trajectory import Trajectory

log = logging.getLogger(__name__)

#: trajectory statistics a trainer in another process logs (the mean over its batch)
REMOTE_STAT_PREFIXES = ("rollout/", "search/", "perf/")


class GeneratorLoop:
    """A generator rank's loop: swap in staged weights, one rollout into the buffer, repeat; ends
    when the trainers say stop (after finishing the rollout in hand), or raises when the receiver
    died (trainer rank 0 gone, a sync timed out) so that the launcher stops the whole job."""

    def __init__(self, worker: RolloutWorker, receiver: WeightReceiver, name: str = "generator") -> None:
        """
        Args:
            worker: the rollout worker (sampler, rollout, env, problem stream, buffer).
            receiver: the weight receiver thread's handle (staged weights, the stop signal).
            name: how the log lines name this generator.
        """
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


class RemoteGeneration(Generation):
    reads_ahead = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The arguments of :class:`~tsd.generation.base.Generation`; the buffer must be one that
        several processes share (Redis): each rank opens its own handle on it (checked by
        :meth:`attach`)."""
        super().__init__(*args, **kwargs)
        self._sender: WeightSender | None = None
        #: generator id -> the largest cumulative token count its trajectories carried since this
        #: process started (a generator's trajectories are spread over the trainers: the max is what
        #: this rank has seen of it)
        self._seen: dict[int, float] = {}
        self._seen_prefill: dict[int, float] = {}  # the same, of the prefill tokens
        #: the generated (and prefill) tokens a checkpoint counted (the generators restart at 0)
        self._restored_tokens = 0
        self._restored_prefill = 0

    # ------------------------------------------------------------------ before fit
    def attach(self, trainer: Any) -> None:
        from tsd.distributed.strategy import GeneratorTrainerStrategy

        strategy = trainer.strategy
        if not isinstance(strategy, GeneratorTrainerStrategy):
            raise ConfigError(
                f"generation: remote needs generator ranks, but strategy is {type(strategy).__name__} "
                "(accepted: strategy=generator_trainer, which selects generation=remote)"
            )
        require(
            self.buffer.shared,
            "buffer",
            "a buffer several processes share: buffer=redis (URL in buffer.url or $TSD_REDIS_URL); "
            f"{type(self.buffer).__name__} lives inside one process, but strategy=generator_trainer runs "
            "generators and trainers in separate processes, so use buffer=redis",
            type(self.buffer).__name__,
        )
        strategy.generator_main = self.run_generator
        # every rank of the job must read and write the same stream (the run id names it)
        strategy.job_identity = {"buffer": self.buffer.location}

    # ------------------------------------------------------------------ a generator rank
    def run_generator(self, strategy: Any) -> None:
        """A generator rank's life once the process groups exist: rollouts with the newest weights
        until the trainers stop."""
        index = strategy.generator_index
        name = f"generator {index} (rank {strategy.global_rank})"
        module = strategy.lightning_module
        # the generator's policy in its compute dtypes (the LM in model.dtype, the value head in
        # fp32), cast in place: this rank never trains it
        policy = module.precision.compute_(module.policy).eval().requires_grad_(False)
        receiver = WeightReceiver(
            WeightLayout.of(policy.state_dict()), strategy.sync_group, strategy.comm_device, strategy.control
        )
        receiver.handshake()  # a generator with another model fails here, before any rollout
        policy = policy.to(strategy.root_device)
        sampler = self.make_sampler(
            policy, self.tokenizer, device=strategy.root_device, seed=self.sampler_seed(self.seed, index)
        )
        buffer = self.buffer.for_this_process()
        worker = RolloutWorker(
            self.rollout,
            sampler,
            self.env,
            buffer,
            self.problems_per_rollout,
            seed=self.seed + index,
            worker_id=index,
            tokens_per_rollout=self.tokens_per_rollout,
        )
        try:
            GeneratorLoop(worker, receiver, name=name).run()
        finally:
            with suppress(Exception):
                buffer.close()
            with suppress(Exception):
                sampler.close()  # its engine process must not outlive this rank

    # ------------------------------------------------------------------ trainer ranks
    def setup(self, trainer: Any) -> None:
        """Trainer rank 0: the sender, and the layout handshake with every generator."""
        strategy = trainer.strategy
        if strategy.global_rank != 0 or self._sender is not None:
            return
        module = trainer.lightning_module
        # what every sync sends: the policy in its compute dtypes, as the generators hold it
        layout = WeightLayout.of(module.precision.compute_state(module.policy.state_dict()))
        self._sender = WeightSender(layout, strategy.sync_group, strategy.comm_device)
        self._sender.handshake()

    def refill(self) -> bool:
        return False  # the generator ranks fill the buffer; the DataModule waits for them

    def publish(self, trainer: Any, pl_module: Any, version: int) -> dict[str, float]:
        """Every trainer gathers the full weights (collective), rank 0 broadcasts them as ``version``."""
        strategy = trainer.strategy
        t0 = time.perf_counter()
        full = strategy.full_policy(pl_module)  # rank 0: the unsharded copy; elsewhere None
        t1 = time.perf_counter()
        nbytes = 0
        if self._sender is not None and full is not None:
            try:
                nbytes = self._sender.send(full.state_dict(), version, strategy.control)
            except RuntimeError as e:  # gloo: "Connection reset by peer"; NCCL: a timeout
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise RuntimeError(
                    f"weight sync v{version} to the generators failed (a generator gone? its node down, "
                    f"or it crashed: see its log): {first[:300]}"
                ) from e
        t2 = time.perf_counter()
        log.debug("weights v%d: gather %.3fs, broadcast %.3fs (%d bytes)", version, t1 - t0, t2 - t1, nbytes)
        return {
            "perf/weight_gather_seconds": t1 - t0,
            "perf/weight_broadcast_seconds": t2 - t1,
            "perf/weight_sync_mb": nbytes / 2**20,
        }

    def observe(self, trajectory: Trajectory) -> None:
        st = trajectory.stats
        gid = int(st.get("gen_id", 0))
        if "gen_tokens" in st:
            self._seen[gid] = max(self._seen.get(gid, 0.0), float(st["gen_tokens"]))
        if "gen_prefill_tokens" in st:
            self._seen_prefill[gid] = max(self._seen_prefill.get(gid, 0.0), float(st["gen_prefill_tokens"]))

    def generated_tokens(self) -> int:
        return int(self._restored_tokens + sum(self._seen.values()))

    def prefill_tokens(self) -> int:
        return int(self._restored_prefill + sum(self._seen_prefill.values()))

    def batch_stats(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """The mean over the batch of what the generators attached to its trajectories."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for t in trajectories:
            for k, v in t.stats.items():
                if k.startswith(REMOTE_STAT_PREFIXES):
                    sums[k] = sums.get(k, 0.0) + float(v)
                    counts[k] = counts.get(k, 0) + 1
        return {
            **{k: sums[k] / counts[k] for k in sums},
            "compute/generated_tokens": float(self.generated_tokens()),
            "compute/prefill_tokens": float(self.prefill_tokens()),
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"generated_tokens": self.generated_tokens(), "prefill_tokens": self.prefill_tokens()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # a resumed run's generators count from 0 again: their counts add to the checkpoint's
        self._restored_tokens = int(state.get("generated_tokens", 0))
        self._restored_prefill = int(state.get("prefill_tokens", 0))
        self._seen, self._seen_prefill = {}, {}
