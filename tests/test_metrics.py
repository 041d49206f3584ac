"""mean@k and pass@k with hand-computed values (pass@k: Chen et al. 2021, 1 - C(n-c, k) / C(n, k))."""

from __future__ import annotations

import math

import pytest
import torch

from tsd.eval.metrics import MeanAtK, PassAtK, pass_at_k


def rows(*counts: tuple[int, int]) -> torch.Tensor:
    """(P, n) bool matrix from (correct, n) pairs; correct samples first."""
    return torch.stack([torch.arange(n) < c for c, n in counts])


# ---------------------------------------------------------------------------- mean@k
def test_mean_at_k_hand_computed():
    m = MeanAtK(4)
    m.update(rows((1, 4), (4, 4), (0, 4)))  # fractions 0.25, 1, 0 -> 5/12
    assert m.compute().item() == pytest.approx(5 / 12)


def test_mean_at_k_accumulates_over_updates():
    m = MeanAtK(2)
    m.update(rows((1, 2)))  # 0.5
    m.update(rows((2, 2), (0, 2), (2, 2)))  # 1, 0, 1
    assert m.compute().item() == pytest.approx(2.5 / 4)  # a mean over problems, not over updates
    m.reset()
    m.update(torch.tensor([[1, 1]]))  # 0/1 integers are accepted too
    assert m.compute().item() == 1.0


# ---------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize(
    ("c", "n", "k", "expected"),
    [
        (1, 4, 1, 0.25),
        (1, 4, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (2, 4, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (0, 4, 2, 0.0),
        (3, 4, 2, 1.0),  # n - c < k: every pair holds a correct one
        (4, 4, 4, 1.0),
        (1, 16, 16, 1.0),
        (2, 16, 1, 2 / 16),  # pass@1 is the fraction correct
    ],
)
def test_pass_at_k_hand_computed(c, n, k, expected):
    m = PassAtK(k)
    m.update(rows((c, n)))
    assert m.compute().item() == pytest.approx(expected)


def test_pass_at_k_matches_the_binomial_formula():
    for n in range(1, 12):
        for k in range(1, n + 1):
            got = pass_at_k(torch.arange(n + 1), n, k)
            want = [1 - math.comb(n - c, k) / math.comb(n, k) for c in range(n + 1)]
            assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_pass_at_k_accumulates_over_updates_with_any_n():
    m = PassAtK(2)
    m.update(rows((1, 4)))  # 0.5
    m.update(rows((0, 3), (2, 3)))  # 0, 1 - C(1,2)/C(3,2) = 1
    assert m.compute().item() == pytest.approx(1.5 / 3)


# ---------------------------------------------------------------------------- errors
def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"shape \(problems, samples\)"):
        MeanAtK(4).update(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected 4 samples per problem, got 3"):
        MeanAtK(4).update(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="n >= k"):
        PassAtK(4).update(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected 8 samples per problem, got 4"):
        PassAtK(2, n=8).update(torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean"):
        MeanAtK(2).update(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="k must be >= 1"):
        PassAtK(0)
    with pytest.raises(ValueError, match="n must be >= k"):
        PassAtK(4, n=2)


# ---------------------------------------------------------------------------- distributed
@pytest.mark.parametrize("make", [lambda: MeanAtK(4), lambda: PassAtK(2)])
def test_states_reduce_by_sum_like_ddp(make):
    """Two "ranks" merged with the states' reduction (what DDP sync does) equal one metric over all."""
    first, second = rows((1, 4), (3, 4)), rows((0, 4), (4, 4), (2, 4))
    rank0, rank1, whole = make(), make(), make()
    rank0.update(first)
    rank1.update(second)
    whole.update(torch.cat([first, second]))
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(whole.compute().item())
