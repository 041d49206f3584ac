"""A rollout worker: what generates, in one object, wherever generation runs.

It owns a sampler (holding its own copy of the policy), a rollout, the env and a deterministic,
resumable stream of training problems. ``produce()`` runs the rollout on the next
``problems_per_rollout`` problems with the weights it currently has and pushes the graded
trajectories to the buffer. :class:`~tsd.generation.local.LocalGeneration` calls it when the
buffer cannot fill a batch; a generator rank of :class:`~tsd.generation.remote.RemoteGeneration`
calls it in a loop.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping

import torch

from tsd.buffers.base import Buffer
from tsd.config import check_int
from tsd.envs.base import Env, Problem
from tsd.rl.trajectory import Trajectory
from tsd.rollouts.base import Rollout, RolloutOutput
from tsd.samplers.base import Sampler

log = logging.getLogger(__name__)


class RolloutWorker:
    def __init__(
        self,
        rollout: Rollout,
        sampler: Sampler,
        env: Env,
        buffer: Buffer,
        problems_per_rollout: int,
        seed: int = 0,
        worker_id: int = 0,
        tokens_per_rollout: int | None = None,
    ) -> None:
        """
        Args:
            rollout: what runs on each batch of problems.
            sampler: the sampler (and its copy of the policy) the rollout samples with.
            env: the training problems (``env.train``) and the grading.
            buffer: where the trajectories go.
            problems_per_rollout: problems per :meth:`produce`, >= 1.
            seed: the problem order's seed (a shuffle of ``env.train`` per epoch).
            worker_id: this generator's index (recorded on its trajectories).
            tokens_per_rollout: ``None``: :meth:`produce` runs one rollout on ``problems_per_rollout``
                problems. A number: :meth:`produce` runs rollouts on successive chunks of
                ``problems_per_rollout`` problems until it has generated this many tokens, and
                pushes them as one batch, so that a rollout that spends fewer tokens per problem
                trains on more problems per step at the same cost (the overshoot of the last chunk
                is taken off the next budget, so a run's tokens stay within one chunk of
                ``steps x tokens_per_rollout``).
        """
        check_int(problems_per_rollout, "generation.problems_per_rollout", low=1)
        self.tokens_per_rollout = (
            None if tokens_per_rollout is None
            else check_int(tokens_per_rollout, "generation.tokens_per_rollout", low=1)
        )  # fmt: skip
        #: tokens the last budgeted batch spent past its budget (negative: short of it)
        self.token_debt = 0
        self.rollout, self.sampler, self.env, self.buffer = rollout, sampler, env, buffer
        self.problems_per_rollout = problems_per_rollout
        self.seed, self.worker_id = seed, worker_id
        self.epoch, self.cursor = 0, 0
        self._order = self._shuffled(0)
        self.generated_tokens = 0
        #: state tokens the sampler ran to start sampling (prompts and paths; compute/prefill_tokens)
        self.prefill_tokens = 0
        self.trajectories = 0
        self.rollouts = 0
        self.last_stats: dict[str, float] = {}

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.env.train)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_problems(self) -> list[Problem]:
        out: list[Problem] = []
        while len(out) < self.problems_per_rollout:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            out.append(self.env.train[self._order[self.cursor]])
            self.cursor += 1
        return out

    def produce(self) -> int:
        """One rollout on the next problems (with ``tokens_per_rollout``: rollouts on the next
        chunks of problems until the budget is spent); returns how many trajectories went to the
        buffer."""
        prefill0 = self.sampler.prefill_tokens
        t0 = time.perf_counter()
        out = self._run(self.next_problems()) if self.tokens_per_rollout is None else self._run_budgeted()
        dt = time.perf_counter() - t0
        self.generated_tokens += out.generated_tokens
        self.prefill_tokens += self.sampler.prefill_tokens - prefill0
        self.last_stats = {
            **out.stats,
            "perf/rollout_seconds": dt,
            "perf/generated_tokens_per_s": out.generated_tokens / max(dt, 1e-9),
        }
        for t in out.trajectories:
            # lets a trainer in another process count the compute behind them and log the rollout's
            # statistics (a trajectory's own value of a key, e.g. its tree's size, is kept)
            t.stats["gen_id"] = float(self.worker_id)
            t.stats["gen_tokens"] = float(self.generated_tokens)
            t.stats["gen_prefill_tokens"] = float(self.prefill_tokens)
            for k, v in self.last_stats.items():
                t.stats.setdefault(k, float(v))
        if out.trajectories:
            self.buffer.put(out.trajectories)
        self.trajectories += len(out.trajectories)
        self.rollouts += 1
        log.debug("rollout %d: %d trajectories in %.2fs", self.rollouts, len(out.trajectories), dt)
        return len(out.trajectories)

    def _run(self, problems: list[Problem]) -> RolloutOutput:
        self.sampler.drop_cache()  # a rollout reuses only what its own calls ran (exact resumes)
        return self.rollout.run(problems, self.sampler, self.env)

    def _run_budgeted(self) -> RolloutOutput:
        """Rollouts on successive chunks of problems until ``tokens_per_rollout`` (less the last
        batch's overshoot) tokens are generated; one output, its statistics the per-problem
        weighted means of the chunks' plus ``rollout/problems_per_rollout`` (the problems this
        batch trains on), ``rollout/rollout_calls`` and ``rollout/token_budget``."""
        assert self.tokens_per_rollout is not None
        budget = self.tokens_per_rollout
        target = budget - self.token_debt
        trajectories: list[Trajectory] = []
        sums: dict[str, float] = {}
        tokens = problems = calls = 0
        while True:
            chunk = self.next_problems()
            out = self._run(chunk)
            trajectories += out.trajectories
            tokens += out.generated_tokens
            problems += len(chunk)
            calls += 1
            for k, v in out.stats.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
            if tokens >= target:
                break
        self.token_debt = max(-budget, min(budget, tokens - target))
        stats = {k: v / problems for k, v in sums.items()}
        stats.update({
            "rollout/problems_per_rollout": float(problems),
            "rollout/rollout_calls": float(calls),
            "rollout/token_budget": float(target),
        })  # fmt: skip
        return RolloutOutput(trajectories, stats, generated_tokens=tokens)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Swap in the weights of optimiser step ``version`` (between rollouts)."""
        self.sampler.load_weights(state_dict, version)

    @property
    def version(self) -> int:
        """The optimiser step whose weights the sampler holds."""
        return self.sampler.version

    # resumable: the problem stream, the sampler's random state and the counters
    def state_dict(self) -> dict:
        gen = self.sampler.generator
        return {
            "sampler_rng": gen.get_state() if gen is not None else None,
            "rollout": self.rollout.state_dict(),
            "epoch": self.epoch,
            "cursor": self.cursor,
            "generated_tokens": self.generated_tokens,
            "prefill_tokens": self.prefill_tokens,
            "trajectories": self.trajectories,
            "rollouts": self.rollouts,
            "token_debt": self.token_debt,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._shuffled(self.epoch)
        self.generated_tokens = int(state["generated_tokens"])
        self.prefill_tokens = int(state.get("prefill_tokens", 0))  # (checkpoints before it was counted)
        self.trajectories = int(state["trajectories"])
        self.rollouts = int(state["rollouts"])
        self.token_debt = int(state.get("token_debt", 0))  # (checkpoints before budgeted batches)
        gen = self.sampler.generator
        if state.get("sampler_rng") is not None and gen is not None:
            gen.set_state(state["sampler_rng"])
        self.rollout.load_state_dict(state.get("rollout") or {})
