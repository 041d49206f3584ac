"""Sample-based accuracy metrics for evaluation: mean@k and pass@k (torchmetrics, DDP-ready).

Both take a boolean ``correct`` matrix of shape ``(P, n)``: ``P`` problems, ``n`` graded
samples each (sparse reward: correct iff the answer evaluates exactly to the target).

- ``MeanAtK(k)``: mean over problems of the fraction of the ``k`` samples that are correct. The
  seed article's headline number is mean@16 (16 samples per test problem, averaged).
- ``PassAtK(k)``: probability that at least one of ``k`` samples is correct, estimated without
  bias from ``n >= k`` samples (Chen et al. 2021, "Evaluating Large Language Models Trained on
  Code", eq. 1): ``pass@k = 1 - C(n - c, k) / C(n, k)`` with ``c`` correct samples, computed as
  ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` for numerical stability.

The states are sums (``dist_reduce_fx="sum"``), so under DDP every rank updates with its own
problems and ``compute()`` returns the metric over all of them.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def _check_correct(correct: torch.Tensor, name: str) -> torch.Tensor:
    """A (P, n) 0/1 matrix as float64; clear errors for anything else."""
    if not isinstance(correct, torch.Tensor):
        raise TypeError(f"{name}.update: correct must be a torch.Tensor, got {type(correct).__name__}")
    if correct.ndim != 2:
        raise ValueError(
            f"{name}.update: correct must have shape (problems, samples), got {tuple(correct.shape)}"
        )
    if correct.dtype != torch.bool and not bool(((correct == 0) | (correct == 1)).all()):
        raise ValueError(f"{name}.update: correct must be boolean (or 0/1), got other values")
    return correct.to(torch.float64)


class MeanAtK(Metric):
    """mean@k: the average over problems of the fraction of their ``k`` samples that are correct.

    ``update(correct)`` with ``correct`` of shape ``(P, k)``; ``compute()`` -> scalar in [0, 1]
    (NaN before any update).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    total: torch.Tensor  # sum over problems of the per-problem score (float64)
    problems: torch.Tensor  # number of problems seen

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"MeanAtK: k must be >= 1, got {k}")
        self.k = int(k)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("problems", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor) -> None:
        c = _check_correct(correct, "MeanAtK")  # (P, k)
        if c.shape[1] != self.k:
            raise ValueError(
                f"MeanAtK(k={self.k}).update: expected {self.k} samples per problem, got {c.shape[1]}"
            )
        self.total += c.mean(dim=1).sum()
        self.problems += c.shape[0]

    def compute(self) -> torch.Tensor:
        return self.total / self.problems


class PassAtK(Metric):
    """Unbiased pass@k from ``n >= k`` samples per problem (Chen et al. 2021).

    ``pass@k = mean over problems of 1 - C(n - c, k) / C(n, k)``, ``c`` = correct samples.
    ``n=None`` accepts any ``n >= k`` per update (it may differ between updates); an int pins it.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    total: torch.Tensor  # sum over problems of the per-problem score (float64)
    problems: torch.Tensor  # number of problems seen

    def __init__(self, k: int, n: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"PassAtK: k must be >= 1, got {k}")
        if n is not None and n < k:
            raise ValueError(f"PassAtK: n must be >= k (n={n}, k={k})")
        self.k = int(k)
        self.n = None if n is None else int(n)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("problems", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor) -> None:
        c = _check_correct(correct, "PassAtK")  # (P, n)
        n = c.shape[1]
        if self.n is not None and n != self.n:
            raise ValueError(f"PassAtK(n={self.n}).update: expected {self.n} samples per problem, got {n}")
        if n < self.k:
            raise ValueError(f"PassAtK(k={self.k}).update: need n >= k samples per problem, got n={n}")
        self.total += pass_at_k(c.sum(dim=1), n, self.k).sum()
        self.problems += c.shape[0]

    def compute(self) -> torch.Tensor:
        return self.total / self.problems


def pass_at_k(num_correct: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``1 - C(n - c, k) / C(n, k)`` per problem; ``num_correct`` (P,) -> (P,) float64.

    ``C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i)``; when ``n - c < k`` the product
    contains the factor at ``i = k``, which is 0, so pass@k = 1 as it should.
    """
    i = torch.arange(1, n + 1, dtype=torch.float64, device=num_correct.device)  # (n,)
    in_range = i[None, :] > (n - num_correct.to(torch.float64))[:, None]  # (P, n): i in (n - c, n]
    factors = torch.where(in_range, 1.0 - k / i, torch.ones_like(i))  # (P, n)
    return 1.0 - factors.prod(dim=1)  # (P,)
