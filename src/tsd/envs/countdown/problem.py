"""Countdown's records: a problem and one reasoning step (DESIGN.md, "Countdown")."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

Number = int | Fraction
#: one binary reasoning step ``(a, op, b, result)``, e.g. ``(3, "+", 5, 8)``
Step = tuple[Number, str, Number, Number]


@dataclass(frozen=True)
class Problem:
    """One Countdown problem. ``id`` is its index in its split (train, val or test; ``-1`` when
    unknown)."""

    numbers: tuple[int, ...]
    target: int
    id: int = -1

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Identity for de-duplication and train/test disjointness: (sorted numbers, target)."""
        return tuple(sorted(self.numbers)), self.target
