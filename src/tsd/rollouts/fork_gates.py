"""Which problems a forking rollout branches after its first round of chains: the gates.

    python train.py experiment=eptree_countdown rollout/gate=mixed_or_near_miss   # adaptive allocation

:class:`~tsd.rollouts.eptree.EPTreeRollout` samples its chains for every problem, grades them, and
asks its gate which problems get forked. :class:`ForkAll` (EPTree as TreeRL runs it) forks every
one. :class:`MixedOrNearMiss` forks only where a fork can change what the group teaches: the
chains disagree on correctness (siblings whose rewards differ give step-level credit), or none is
correct but one came close (a near miss: a fork near where it went wrong may find the answer). A
problem whose chains are all correct, or all far off, keeps its chains and costs only them; with
:class:`~tsd.rollouts.budget.TokenBudgetRollout` the tokens saved buy fresh problems in the same
step ("adaptive allocation", DESIGN.md "Branching where it pays").
"""

from __future__ import annotations

from collections.abc import Sequence

from tsd.config import check_number
from tsd.envs.base import Score


class ForkGate:
    """``gate(scores) -> bool``: fork this problem, given the grades of its chains."""

    def __call__(self, scores: Sequence[Score]) -> bool:
        raise NotImplementedError


class ForkAll(ForkGate):
    """Every problem is forked (TreeRL's EPTree)."""

    def __call__(self, scores: Sequence[Score]) -> bool:
        return True


class MixedOrNearMiss(ForkGate):
    """Fork when the chains' correctness is mixed, or when none is correct and the best dense
    reward is at least ``near_miss`` (Countdown's dense reward ``1 - 2|t - p| / t``: 0.5 is an
    answer within 25% of the target)."""

    def __init__(self, near_miss: float = 0.5) -> None:
        """
        Args:
            near_miss: dense reward in ``[-1, 1]`` from which an incorrect best chain counts as close;
                above 1 turns near misses off (only mixed problems are forked).
        """
        self.near_miss = check_number(near_miss, "MixedOrNearMiss.near_miss", low=-1.0, high=2.0)

    def __call__(self, scores: Sequence[Score]) -> bool:
        correct = [s.correct for s in scores]
        if any(correct):
            return not all(correct)
        return max((s.dense for s in scores), default=-1.0) >= self.near_miss
