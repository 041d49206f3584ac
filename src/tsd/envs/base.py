"""The env interface: what the rollouts, the DataModule's generation and evaluation use of a task.

An env owns its problems (deterministic splits), how a problem becomes a prompt, and how a
completion is graded. Nothing else knows what a problem holds: the rollouts only read
``problem.id``, render prompts through :meth:`Env.render_prompt` and grade through
:meth:`Env.score`. A new task is one folder under ``tsd/envs/`` (a subclass of :class:`Env`), one
YAML under ``configs/env/`` and its tests (DESIGN.md: "a new rollout, loss or env is one file, one
YAML and its tests").

Splits: ``train`` is the RL training stream, ``val`` a held-out part of the generated training
problems (for choosing hyper-parameters; empty unless asked for), ``test`` the evaluation set,
disjoint from both. No torch here: an env is pure Python.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar


class Problem(Protocol):
    """What every part outside the env reads of a problem: its id (stable within its split; what
    trajectories, per-problem statistics and paired comparisons key on)."""

    @property
    def id(self) -> int: ...


@dataclass(frozen=True)
class Score:
    """The grade of one completion.

    ``dense`` is the training reward in [-1, 1] (``-1.0`` when the completion is invalid);
    ``correct`` is the sparse evaluation reward; ``value`` is what the answer evaluated to (the
    env's own type, ``None`` when invalid); ``reason`` says why the completion is invalid
    (``None`` when valid).
    """

    dense: float
    correct: bool
    value: Any
    reason: str | None

    @property
    def valid(self) -> bool:
        return self.reason is None


#: an env's own problem type (a Countdown ``Problem``, ...)
P = TypeVar("P", bound=Problem)


class Env(ABC, Generic[P]):
    """Problems, prompts and grading for one task, over its own problem type ``P``."""

    @property
    @abstractmethod
    def train(self) -> Sequence[P]:
        """The RL training problems (the held-out ``val`` problems excluded)."""

    @property
    @abstractmethod
    def val(self) -> Sequence[P]:
        """Held-out training problems for choosing hyper-parameters (may be empty)."""

    @property
    @abstractmethod
    def test(self) -> Sequence[P]:
        """The evaluation problems, disjoint from ``train`` and ``val``."""

    @abstractmethod
    def render_prompt(self, problem: P, tokenizer: Any = None) -> str:
        """The prompt text of ``problem`` (through ``tokenizer``'s chat template when the env uses
        one)."""

    def uses_chat_template(self, tokenizer: Any) -> bool:
        """True when :meth:`render_prompt` goes through ``tokenizer``'s chat template (which then
        carries its own BOS)."""
        return False

    @abstractmethod
    def score(self, completion: str, problem: P) -> Score:
        """Grade ``completion`` (never the prompt) against ``problem``; must never raise: model
        output is hostile input."""

    def describe(self, problem: P) -> str:
        """One line naming ``problem`` for tables and pictures."""
        return f"problem {problem.id}"

    def to_record(self, problem: P) -> dict[str, Any]:
        """``problem`` as JSON-able fields (without its id), for exported trees and samples."""
        return {}
