"""The paired comparison's interval with seed noise (src/tsd/eval/paired.py): the t quantile it
uses, the exact interval on hand-made seeds, and its coverage where seeds vary more than the problems
measure (where the per-problem interval alone is far too narrow)."""

from __future__ import annotations

import random

import pytest

from tsd.eval.paired import paired_by_id, t_quantile, with_seed_noise


@pytest.mark.parametrize(
    ("df", "q"), [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042), (120, 1.980)]
)
def test_t_quantile_matches_the_printed_table(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-3)


def test_t_quantile_refuses_what_it_cannot_answer():
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0.975, 0.5)
    with pytest.raises(ValueError, match=r"p must be in \(0.5, 1\)"):
        t_quantile(0.3, 5)


def _scores(values):
    return {f"p{i}": v for i, v in enumerate(values)}


def test_the_seed_term_on_hand_made_seeds():
    base = [0.1, 0.2, 0.3, 0.0, 0.5]
    a = [_scores(base)] * 3  # three seeds alike: no seed variance
    b = [_scores([x + s for x in base]) for s in (0.1, -0.1, 0.0)]  # shifted per seed
    r = with_seed_noise(a, b)
    # every problem's seed-averaged difference is 0; the seed means differ by 0.1, -0.1, 0: variance
    # 0.01 over 3 seeds, 2 degrees of freedom
    se = (0.01 / 3) ** 0.5
    assert r["diff"] == pytest.approx(0.0, abs=1e-12) and r["se"] == pytest.approx(se)
    assert r["df"] == pytest.approx(2.0)
    assert r["ci95"] == (pytest.approx(-4.302653 * se, rel=1e-5), pytest.approx(4.302653 * se, rel=1e-5))
    assert paired_by_id(r_avg := _scores(base), r_avg)["ci95"] == (0.0, 0.0)  # the problems alone see nothing


def test_one_trained_seed_has_no_interval_and_the_fixed_base_needs_none():
    one = [_scores([0.1, 0.2, 0.3])]
    three = [_scores([0.1 + s, 0.2, 0.3]) for s in (0.0, 0.1, 0.2)]
    assert with_seed_noise(one, three) is None
    r = with_seed_noise(one, three, base_fixed=True)
    assert r is not None and r["seeds"] == (1, 3) and r["ci95"][0] < r["diff"] < r["ci95"][1]


def test_coverage_where_seeds_vary_more_than_the_problems_measure():
    """Two methods with no true difference; each training seed shifts its whole evaluation (sd 2
    points) and each problem's score is noisy (sd 5 points), 100 problems, 3 seeds each. The
    per-problem interval misses the truth most of the time; the interval with seed noise covers it
    about 95% of the time."""
    rng = random.Random(0)
    sims, covered, covered_problems_only = 200, 0, 0
    for _ in range(sims):
        level = [rng.uniform(0.0, 0.3) for _ in range(100)]

        def seed(level=level):
            shift = rng.gauss(0, 0.02)
            return _scores([x + shift + rng.gauss(0, 0.05) for x in level])

        a, b = [seed() for _ in range(3)], [seed() for _ in range(3)]
        lo, hi = with_seed_noise(a, b)["ci95"]
        covered += lo <= 0 <= hi
        avg = [{k: sum(e[k] for e in side) / 3 for k in side[0]} for side in (a, b)]
        plo, phi = paired_by_id(*avg)["ci95"]
        covered_problems_only += plo <= 0 <= phi
    assert covered / sims >= 0.90
    assert covered_problems_only / sims <= 0.60
