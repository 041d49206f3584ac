"""Trajectory records: what a rollout emits, what the buffer carries and what the trainer eats.

Records cross process and network boundaries (the Redis stream), so they are serialised as JSON
(never pickle) and validated on the way in: a malformed or oversized record raises
:class:`TrajectoryError` naming the field, instead of reaching the loss. This is the schema,
which needs no model: types, bounds that keep every number finite once it is a float32 or int64
tensor, and lengths that agree. What depends on the model a record will train (its vocabulary,
its context length, the trainer's policy version) is checked by
:class:`tsd.data.record_check.RecordCheck` before the record reaches a batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

#: hard bounds on a decoded record; far above anything a real run produces
MAX_TOKENS = 1 << 16
MAX_STATS = 64
MAX_TEXT = 1 << 12
#: token ids fit any tokenizer (the largest vocabularies are ~2.6e5) and an int64 tensor
MAX_TOKEN_ID = (1 << 31) - 1
#: problem, group ids and policy versions: int64 with room to spare
MAX_INT = 1 << 62
#: a sampled token's log-prob: a token is sampled only where its float32 probability is > 0, so its
#: log-prob is above log(1.4e-45) = -103.3; -1e3 leaves room and keeps exp(-logp) finite in float32
MIN_LOGPROB = -1e3
#: |advantage| and |stat|: far above any normalised advantage (GRPO's is at most sqrt(G)), far below
#: float32's 3.4e38, so that a product in the loss stays finite
MAX_ABS_FLOAT = 1e6
MAX_ABS_STAT = 1e30


class TrajectoryError(ValueError):
    """A trajectory record failed validation."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


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
    #: version of the weights that generated every token of this completion: the optimiser step they
    #: are the weights of (0: the initial weights; :mod:`tsd.data.policy_clock`)
    policy_version: int
    #: which rollout produced it (``group``, ``best_of_n``, ``mcts``): for logging only
    rollout: str
    #: sequence-level advantage fixed by the rollout (group-normalised reward); ``None`` (and no
    #: ``token_advantages``) means the trainer uses the value baseline ``A_t = r - sg(V_old(s_t))``
    advantage: float | None = None
    #: per completion token, the advantage fixed by the rollout (a search tree's step-level values,
    #: :mod:`tsd.rollouts.tree_targets`); exclusive with ``advantage``; the loss uses it as given
    token_advantages: list[float] | None = None
    finish_reason: str = "answer"
    #: group id for group-normalised rollouts (problems sampled together)
    group_id: int = -1
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`TrajectoryError` naming the first field that breaks the schema."""

        def ints(name: str, xs: Any) -> None:
            if not isinstance(xs, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in xs
            ):
                raise TrajectoryError(f"Trajectory.{name}: expected a list of int")
            if len(xs) > MAX_TOKENS:
                raise TrajectoryError(f"Trajectory.{name}: {len(xs)} tokens, at most {MAX_TOKENS}")
            if xs and not 0 <= min(xs) <= max(xs) <= MAX_TOKEN_ID:
                raise TrajectoryError(f"Trajectory.{name}: token ids must be in [0, {MAX_TOKEN_ID}]")

        def number(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        ints("prompt_ids", self.prompt_ids)
        ints("completion_ids", self.completion_ids)
        # the first completion token is predicted from the last prompt token: a prompt is needed
        if not self.prompt_ids:
            raise TrajectoryError("Trajectory.prompt_ids: must not be empty")
        if not self.completion_ids:
            raise TrajectoryError("Trajectory.completion_ids: must not be empty")
        if len(self.prompt_ids) + len(self.completion_ids) > MAX_TOKENS:
            raise TrajectoryError(f"Trajectory: prompt + completion exceed {MAX_TOKENS} tokens")
        lp = self.behaviour_logprobs
        if not isinstance(lp, list) or len(lp) != len(self.completion_ids):
            raise TrajectoryError(
                "Trajectory.behaviour_logprobs: expected one float per completion token "
                f"({len(self.completion_ids)})"
            )
        for x in lp:
            # written so that NaN fails too (every comparison with NaN is False)
            if not (number(x) and MIN_LOGPROB <= x <= 1e-4):
                raise TrajectoryError(
                    f"Trajectory.behaviour_logprobs: each must be a log-prob in [{MIN_LOGPROB:g}, 0], "
                    f"got {x!r}"
                )
        if not (number(self.reward) and -1.0 <= self.reward <= 1.0):
            raise TrajectoryError(f"Trajectory.reward: {self.reward!r} not in [-1, 1]")
        if not isinstance(self.correct, bool):
            raise TrajectoryError("Trajectory.correct: expected a bool")
        for name, lo in (("problem_id", -MAX_INT), ("policy_version", 0), ("group_id", -MAX_INT)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= MAX_INT:
                raise TrajectoryError(f"Trajectory.{name}: expected an integer in [{lo}, {MAX_INT}]")
        if self.advantage is not None and not (
            number(self.advantage) and abs(self.advantage) <= MAX_ABS_FLOAT
        ):
            raise TrajectoryError(
                f"Trajectory.advantage: expected null or a float in [-{MAX_ABS_FLOAT:g}, {MAX_ABS_FLOAT:g}]"
            )
        ta = self.token_advantages
        if ta is not None:
            if not isinstance(ta, list) or len(ta) != len(self.completion_ids):
                raise TrajectoryError(
                    "Trajectory.token_advantages: expected null or one float per completion token "
                    f"({len(self.completion_ids)})"
                )
            for x in ta:
                if not (number(x) and abs(x) <= MAX_ABS_FLOAT):  # NaN fails too
                    raise TrajectoryError(
                        f"Trajectory.token_advantages: each must be a float in [-{MAX_ABS_FLOAT:g}, "
                        f"{MAX_ABS_FLOAT:g}], got {x!r}"
                    )
            if self.advantage is not None:
                raise TrajectoryError(
                    "Trajectory.token_advantages: set with advantage; a record carries one or the other"
                )
        for name in ("rollout", "finish_reason"):
            v = getattr(self, name)
            if not isinstance(v, str) or len(v) > 64:
                raise TrajectoryError(f"Trajectory.{name}: expected a string of at most 64 characters")
        if not isinstance(self.stats, dict) or len(self.stats) > MAX_STATS:
            raise TrajectoryError(f"Trajectory.stats: expected a dict of at most {MAX_STATS} entries")
        for k, v in self.stats.items():
            if not isinstance(k, str) or len(k) > 128 or not (number(v) and abs(v) <= MAX_ABS_STAT):
                raise TrajectoryError(
                    f"Trajectory.stats: expected str -> finite number (|x| <= {MAX_ABS_STAT:g})"
                )

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
            # NaN / Infinity / -Infinity are not JSON: refused here, not parsed into floats
            obj = json.loads(data, parse_constant=_no_constant)
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
