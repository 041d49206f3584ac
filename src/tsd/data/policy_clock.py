"""The policy clock: which weights made a trajectory, how stale it is, and when the generators get
new weights. One object owns all of it (the DataModule holds it; :class:`~tsd.callbacks.weight_sync.WeightSync`
moves it; nothing else writes a version).

Time is counted in **optimiser steps**. The weights after ``s`` optimiser steps are *version*
``s`` (0: the initial weights); a trajectory's ``policy_version`` is the version of the weights that
generated every one of its tokens. The optimiser step that trainer's ``global_step`` reads ``s``
at trains weights ``s``, so a trajectory trained there has

    lag = s - policy_version          (train/policy_lag is its mean over the batch)

Every ``sync_every`` steps (the seed article: 8) the weights are *published* to the generation:
the generators then hold version ``s``, a multiple of ``sync_every``. Between two publications the
lag therefore grows by one per step: with ``sync_every = 2`` and nothing waiting in the buffer the
lags of successive steps are 0, 1, 0, 1, ...; with ``sync_every = 1`` they are all 0 (on-policy). A
trajectory more than ``max_lag`` steps behind is *stale*: dropped, acknowledged and counted
(``train/dropped_stale``); CISPO's ratio corrects the lag of the rest with the recorded
behaviour log-probs. A trajectory whose version is *ahead* of the step being trained was not
made by this run's weights (another run's record) and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

from tsd.config import check_int


class PolicyClock:
    def __init__(self, sync_every: int = 8, max_lag: int = 16) -> None:
        """
        Args:
            sync_every: optimiser steps between two publications of the weights to the generation
                (``data.sync_every``; article: 8).
            max_lag: a trajectory more than this many optimiser steps behind the step that would
                train it is dropped (``data.max_lag``, >= 0).
        """
        self.sync_every = check_int(sync_every, "data.sync_every", low=1)
        self.max_lag = check_int(max_lag, "data.max_lag", low=0)
        #: the optimiser step being trained (``trainer.global_step``), moved by :meth:`advance`
        self.step = 0
        #: the version the generation was last given (0: the initial weights it starts with)
        self.published = 0
        #: trajectories dropped because they were more than ``max_lag`` steps old
        self.dropped_stale = 0

    def advance(self, step: int) -> None:
        """The trainer is at optimiser step ``step`` (its ``global_step``)."""
        self.step = int(step)

    def due(self) -> bool:
        """Whether the weights of the current step must be published now: every ``sync_every``
        steps, once."""
        return self.step > 0 and self.step % self.sync_every == 0 and self.step != self.published

    def publish(self, version: int) -> None:
        """The generation now holds the weights of step ``version``."""
        self.published = int(version)

    def lag(self, version: int) -> int:
        """Optimiser steps between the weights that generated a trajectory and the ones it trains."""
        return self.step - int(version)

    def is_stale(self, version: int) -> bool:
        return self.lag(version) > self.max_lag

    def ahead(self, version: int) -> str | None:
        """Why a trajectory of ``version`` cannot be this run's (None when it can)."""
        if version > self.step:
            return (
                f"policy_version {version} is ahead of the trainer's step {self.step}: "
                "not made by this run's weights"
            )
        return None

    def drop_stale(self, n: int) -> None:
        self.dropped_stale += n

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, int]:
        return {"published": self.published, "dropped_stale": self.dropped_stale}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.published = int(state["published"])
        self.dropped_stale = int(state["dropped_stale"])
