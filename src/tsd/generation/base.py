"""Where the rollouts run: one small interface, two implementations, chosen by the ``generation``
config group (``strategy=generator_trainer`` selects ``remote``; everything else runs ``local``).

- :class:`~tsd.generation.local.LocalGeneration`: a generator copy of the policy inside the
  training process; the DataModule asks it for one more rollout whenever the buffer cannot fill a
  batch; publishing the weights is a ``load_state_dict`` into the copy.
- :class:`~tsd.generation.remote.RemoteGeneration`: the generator ranks of
  :class:`~tsd.distributed.strategy.GeneratorTrainerStrategy` run rollouts in a loop and push to a
  shared (Redis) buffer; the DataModule only reads; publishing the weights is gathering the FSDP2
  shards and broadcasting them to the generators.

What the rest of the loop sees is the same either way: trajectories arrive in the buffer tagged
with the optimiser step whose weights made them (:mod:`tsd.data.policy_clock`), the DataModule
reads batches of them, and every ``data.sync_every`` steps
:class:`~tsd.callbacks.weight_sync.WeightSync` calls :meth:`Generation.publish`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tsd.buffers.base import Buffer
from tsd.config import check_int
from tsd.envs.base import Env
from tsd.rl.trajectory import Trajectory
from tsd.rollouts.base import Rollout


class Generation(ABC):
    #: True: a batch may be read from the buffer as soon as Lightning prefetches it (the generators
    #: run elsewhere anyway); False: read (and generate) only when the batch is about to be trained,
    #: after the weight sync of the step before, so that ``sync_every = 1`` is on-policy
    reads_ahead: bool = False

    def __init__(
        self,
        rollout: Rollout,
        env: Env,
        make_sampler: Callable[..., Any],
        tokenizer: Any,
        buffer: Buffer,
        problems_per_rollout: int = 16,
        seed: int = 0,
        tokens_per_rollout: int | None = None,
    ) -> None:
        """
        Args:
            rollout: the rollout every generator runs (MCTS, best-of-N, group sampling).
            env: where the training problems come from (its ``train`` split) and how they are graded.
            make_sampler: the sampler factory (``configs/sampler``), called as
                ``make_sampler(policy, tokenizer, device=..., seed=...)``.
            tokenizer: the policy's tokenizer.
            buffer: where the trajectories go.
            problems_per_rollout: problems one rollout call handles (one sampler batch, or the trees
                that share MCTS waves), >= 1.
            seed: the run's seed: the problem order and (with the generator's index) the sampler's.
            tokens_per_rollout: ``None`` (one rollout of ``problems_per_rollout`` problems per
                batch), or a batch budgeted in generated tokens: rollouts on chunks of
                ``problems_per_rollout`` problems until this many tokens are spent
                (:class:`~tsd.generation.worker.RolloutWorker`).
        """
        self.rollout, self.env, self.make_sampler = rollout, env, make_sampler
        self.tokenizer, self.buffer = tokenizer, buffer
        self.problems_per_rollout = check_int(problems_per_rollout, "generation.problems_per_rollout", low=1)
        self.seed = check_int(seed, "seed")
        self.tokens_per_rollout = (
            None if tokens_per_rollout is None
            else check_int(tokens_per_rollout, "generation.tokens_per_rollout", low=1)
        )  # fmt: skip

    @staticmethod
    def sampler_seed(seed: int, index: int) -> int:
        """Generator ``index``'s sampler seed: two generators must not draw the same samples."""
        return seed + 7919 * index

    # ------------------------------------------------------------------ before fit
    @abstractmethod
    def attach(self, trainer: Any) -> None:
        """Check that ``trainer``'s strategy runs this kind of generation (a
        :class:`~tsd.config.ConfigError` naming the field otherwise), and hand it what its
        generator ranks run, if it has any. Called by ``train.py`` before ``trainer.fit``."""

    # ------------------------------------------------------------------ trainer side, during fit
    @abstractmethod
    def setup(self, trainer: Any) -> None:
        """On every training process, before training (the DataModule's ``setup``)."""

    @abstractmethod
    def refill(self) -> bool:
        """The buffer could not fill a batch: produce more here if this generation can (one rollout
        into the buffer; True), else False (the generators elsewhere will; the DataModule waits)."""

    @abstractmethod
    def publish(self, trainer: Any, pl_module: Any, version: int) -> dict[str, float]:
        """Give the generators the trained weights as ``version`` (the optimiser step they are
        the weights of); collective on every training rank. Returns timings to log."""

    def holds(self, version: int) -> bool:
        """Whether the generators already hold the weights of ``version`` (a resumed run whose
        generation restored them needs no publication at start)."""
        return False

    def observe(self, trajectory: Trajectory) -> None:
        """Every trajectory read from the buffer and fit to train passes here (stale or not);
        nothing to tally by default."""
        return None

    @abstractmethod
    def batch_stats(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """The rollout, search and generator statistics to log with a batch of ``trajectories``."""

    @abstractmethod
    def generated_tokens(self) -> int:
        """Every token the generators have sampled in this run (the compute axis), as far as
        this process knows."""

    @abstractmethod
    def prefill_tokens(self) -> int:
        """Every state token (prompts, search paths) the generators have run through the model to
        start sampling, as far as this process knows: with :meth:`generated_tokens`, the tokens
        processed (``compute/prefill_tokens``)."""

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (nothing by default)."""
        return None
