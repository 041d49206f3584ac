"""Trajectory records: what a rollout emits, what the buffer carries and what the trainer eats.

Records cross process and network boundaries (the Redis stream), so they are serialised as JSON
(never pickle) and validated on the way in: a malformed or oversized record raises
:class:`TrajectoryError` naming the field, instead of reaching the loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

#: hard bounds on a decoded record; far above anything a real run produces
MAX_TOKENS = 1 << 16
MAX_STATS = 64
MAX_TEXT = 1 << 12


class TrajectoryError(ValueError):
    """A trajectory record failed validation."""


@dataclass
class Trajectory:
    """One complete, graded completion of one problem."""

    problem_id: int
    prompt_ids: list[int]
    completion_ids: list[int]
    #: per completion token, fp32 log-prob under the sampler that generated it (pi_behaviour)
    behaviour_logprobs: list[float]
    #: dense training reward in [-1, 1]
    reward: float
    #: sparse: the answer equals the target exactly
    correct: bool
    #: version of the weights that generated every token of this completion
    policy_version: int
    #: which rollout produced it (``group``, ``best_of_n``, ``mcts``): for logging only
    rollout: str
    #: sequence-level advantage fixed by the rollout (group-normalised reward); ``None`` means the
    #: trainer uses the value baseline ``A_t = r - sg(V_old(s_t))``
    advantage: float | None = None
    finish_reason: str = "answer"
    #: group id for group-normalised rollouts (problems sampled together)
    group_id: int = -1
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def ints(name: str, xs: Any) -> None:
            if not isinstance(xs, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in xs
            ):
                raise TrajectoryError(f"Trajectory.{name}: expected a list of int")
            if len(xs) > MAX_TOKENS:
                raise TrajectoryError(f"Trajectory.{name}: {len(xs)} tokens, at most {MAX_TOKENS}")
            if any(x < 0 for x in xs):
                raise TrajectoryError(f"Trajectory.{name}: token ids must be >= 0")

        ints("prompt_ids", self.prompt_ids)
        ints("completion_ids", self.completion_ids)
        if not self.completion_ids:
            raise TrajectoryError("Trajectory.completion_ids: must not be empty")
        lp = self.behaviour_logprobs
        if not isinstance(lp, list) or len(lp) != len(self.completion_ids):
            raise TrajectoryError(
                "Trajectory.behaviour_logprobs: expected one float per completion token "
                f"({len(self.completion_ids)})"
            )
        for x in lp:
            if not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x) or x > 1e-4:
                raise TrajectoryError(
                    "Trajectory.behaviour_logprobs: each must be a log-prob, <= 0 and not NaN"
                )
        if not isinstance(self.reward, (int, float)) or not -1.0 <= float(self.reward) <= 1.0:
            raise TrajectoryError(f"Trajectory.reward: {self.reward!r} not in [-1, 1]")
        if not isinstance(self.correct, bool):
            raise TrajectoryError("Trajectory.correct: expected a bool")
        for name in ("problem_id", "policy_version", "group_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TrajectoryError(f"Trajectory.{name}: expected an int")
        if self.advantage is not None and (
            not isinstance(self.advantage, (int, float)) or not math.isfinite(self.advantage)
        ):
            raise TrajectoryError("Trajectory.advantage: expected a finite float or null")
        for name in ("rollout", "finish_reason"):
            v = getattr(self, name)
            if not isinstance(v, str) or len(v) > 64:
                raise TrajectoryError(f"Trajectory.{name}: expected a string of at most 64 characters")
        if not isinstance(self.stats, dict) or len(self.stats) > MAX_STATS:
            raise TrajectoryError(f"Trajectory.stats: expected a dict of at most {MAX_STATS} entries")
        for k, v in self.stats.items():
            if (
                not isinstance(k, str)
                or len(k) > 128
                or not isinstance(v, (int, float))
                or isinstance(v, bool)
            ):
                raise TrajectoryError("Trajectory.stats: expected str -> number")

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        # shallow: dataclasses.asdict deep-copies every list and costs ~4x more
        return json.dumps(
            {f.name: getattr(self, f.name) for f in fields(self)}, separators=(",", ":"), allow_nan=False
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> Trajectory:
        """Parse and validate one record; raises :class:`TrajectoryError` on anything malformed."""
        if len(data) > 16 * MAX_TOKENS * 4:
            raise TrajectoryError(f"Trajectory: record of {len(data)} bytes is too large")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise TrajectoryError(f"Trajectory: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise TrajectoryError("Trajectory: expected a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise TrajectoryError(f"Trajectory: unknown fields {sorted(unknown)}")
        try:
            return cls(**obj)
        except TypeError as e:
            raise TrajectoryError(f"Trajectory: {e}") from None

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)
