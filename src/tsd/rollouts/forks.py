"""Where a forking rollout branches a sampled completion: the fork-point rules.

    python train.py experiment=eptree_countdown rollout/forks=entropy   # surprise (default) | entropy | step

A rule ranks the positions of one sampled path (:class:`SampledPath`) and
:class:`~tsd.rollouts.eptree.EPTreeRollout` forks at the best ``forks_per_chain`` of them: forking at
position ``t`` samples new continuations of the path's first ``t`` tokens, so the new branches share
those tokens (generated once, counted once) and may differ from token ``t`` on. The rollout passes
the positions a fork may use (``lo <= t < hi``: never inside the answer span, never before the
path's own tokens); rules only rank them, highest score first, ties to the earlier position.

- :class:`SurpriseForks` (TreeRL's EPTree, Hou et al., ACL 2025): the sampled token's surprise
  ``-log p(x_t | x_<t)``, the positions where the sampled path took an unlikely token;
- :class:`EntropyForks` (the "forking tokens" of ARPO / AEPO and Wang et al. 2025): the entropy of
  the next-token distribution at ``t``, where the policy was uncertain whatever it drew; needs the
  sampler to record entropies (:meth:`~tsd.samplers.base.Sampler.sample_with_entropy`: the HF
  sampler does, vLLM's cannot);
- :class:`StepForks`: only step boundaries (the first token of a reasoning step), ranked by the
  surprise of the whole step that followed ``-log P(step)``: the tree of MCTS over steps, chosen by
  the sampled path's own likelihoods instead of pUCT.

Pure logic (hand-computed tests in ``tests/test_eptree.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class SampledPath:
    """One whole completion of a forking rollout (a chain, or a branch forked from another path)."""

    token_ids: list[int]
    #: behaviour log-prob of every token (a branch: its parent path's up to the fork, then its own)
    logprobs: list[float]
    finish_reason: str
    #: first token this path generated itself (0 for a chain; the fork position for a branch)
    start: int = 0
    #: the forking round that made it (0: the chains)
    round: int = 0
    #: entropy of each token's next-token distribution, when the sampler recorded it
    entropies: list[float] | None = None
    #: positions where a reasoning step starts (after a step stop), 0 excluded
    step_starts: list[int] = field(default_factory=list)
    #: first token of the answer span (``len(token_ids)`` when there is none): never forked from there on
    answer_start: int = 0


class ForkRule:
    """Ranks fork positions of a path. ``needs_entropy``: the rollout samples with
    :meth:`~tsd.samplers.base.Sampler.sample_with_entropy`."""

    needs_entropy: bool = False

    def candidates(self, path: SampledPath, lo: int, hi: int) -> list[int]:
        """The positions this rule may fork at, within ``[lo, hi)``."""
        return list(range(lo, hi))

    def score(self, path: SampledPath, t: int) -> float:
        raise NotImplementedError

    def choose(self, path: SampledPath, k: int, lo: int, hi: int) -> list[int]:
        """The ``k`` best positions in ``[lo, hi)`` (fewer if there are fewer), in position order."""
        ranked = sorted(self.candidates(path, lo, hi), key=lambda t: (-self.score(path, t), t))
        return sorted(ranked[:k])


class SurpriseForks(ForkRule):
    """``-log p(x_t | x_<t)`` of the sampled token (TreeRL's EPTree)."""

    def score(self, path: SampledPath, t: int) -> float:
        return -path.logprobs[t]


class EntropyForks(ForkRule):
    """``H(p(. | x_<t))``, the entropy of the distribution token ``t`` was drawn from."""

    needs_entropy = True

    def score(self, path: SampledPath, t: int) -> float:
        if path.entropies is None:
            raise ValueError("EntropyForks: the path carries no entropies (sample with sample_with_entropy)")
        return path.entropies[t]


class StepForks(ForkRule):
    """Step starts only, ranked by ``-log P(step)``: the summed surprise of the step that starts at
    ``t`` (up to the next step start, or the answer span)."""

    def candidates(self, path: SampledPath, lo: int, hi: int) -> list[int]:
        return [t for t in path.step_starts if lo <= t < hi]

    def score(self, path: SampledPath, t: int) -> float:
        ends: Sequence[int] = [s for s in path.step_starts if s > t] + [
            path.answer_start,
            len(path.token_ids),
        ]
        return -sum(path.logprobs[t : max(t + 1, min(ends))])
