"""Sampling without replacement inside an engine (tsd.samplers.exclusion), without vLLM: the flat
trie the engine gets, the logits processor's rows (hand-computed), its bookkeeping through batch
updates, the driver's restoring of the policy's log-probs, and a stand-in engine loop whose draws
are tested against the exact conditional distribution (chi-square). The same processor inside real
vLLM: tests/test_vllm_sampler.py (marker vllm).

    python -m pytest tests/test_exclusion.py -q
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch

from tsd.samplers.base import EXHAUSTED_MASS
from tsd.samplers.exclusion import (
    EXTRA_ARGS_KEY,
    FALLBACK_SHIFT,
    FlatTrie,
    RowProcessor,
    parse_row_args,
    row_args,
    trie_payload,
)
from tsd.samplers.hf import top_p_filter


def cont(token_ids, probs):
    """An excluded continuation: its tokens and the policy's probability of each."""
    return SimpleNamespace(token_ids=list(token_ids), logprobs=[math.log(p) for p in probs])


# ---------------------------------------------------------------------------- statistics helpers
def chi2_critical(df: int, alpha: float = 1e-3) -> float:
    """The chi-square quantile ``1 - alpha`` with ``df`` degrees of freedom (Wilson and Hilferty
    1931: (X/df)^(1/3) is about normal with mean 1 - 2/(9 df), variance 2/(9 df))."""
    z = NormalDist().inv_cdf(1 - alpha)
    v = 2 / (9 * df)
    return df * (1 - v + z * math.sqrt(v)) ** 3


def chi_square(observed: Counter, expected: dict, n: int, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's goodness-of-fit statistic of ``n`` draws counted in ``observed`` against class
    probabilities ``expected`` (summing to 1); classes expected fewer than ``min_expected`` times,
    and any observed class ``expected`` lacks, are pooled into one. Returns (statistic, df)."""
    assert abs(sum(expected.values()) - 1) < 1e-6, sum(expected.values())
    big = {c for c, p in expected.items() if p * n >= min_expected}
    cells = [(observed.get(c, 0), expected[c] * n) for c in big]
    rest_o = n - sum(o for o, _ in cells)
    rest_e = n - sum(e for _, e in cells)
    if rest_e > 1e-9 * n:
        cells.append((rest_o, rest_e))
    elif rest_o:  # draws in classes of probability 0: impossible under the hypothesis
        return math.inf, len(cells)
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return stat, len(cells) - 1


def chi_square_two_samples(a: Counter, b: Counter, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's homogeneity statistic of two samples counted by class (a 2 x K table); classes
    whose smaller expected count is under ``min_expected`` are pooled into one. Returns
    (statistic, df = K - 1)."""
    na, nb = sum(a.values()), sum(b.values())
    n = na + nb
    big = [c for c in set(a) | set(b) if (a[c] + b[c]) * min(na, nb) / n >= min_expected]
    cells = [(a[c], b[c]) for c in big]
    rest = (na - sum(x for x, _ in cells), nb - sum(y for _, y in cells))
    if sum(rest):
        cells.append(rest)
    stat = 0.0
    for x, y in cells:
        for obs, size in ((x, na), (y, nb)):
            e = (x + y) * size / n
            stat += (obs - e) ** 2 / e
    return stat, len(cells) - 1


def test_chi2_critical_matches_the_tables():
    # tabulated 0.999 quantiles; the approximation is within 1.2% from df 5 on (a little high)
    for df, table in [(5, 20.515), (10, 29.588), (30, 59.703)]:
        assert chi2_critical(df) == pytest.approx(table, rel=0.015)


def test_chi_square_accepts_the_truth_and_rejects_a_shift():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    draws = Counter(torch.multinomial(p, n, replacement=True, generator=g).tolist())
    stat, df = chi_square(draws, dict(enumerate(p.tolist())), n)
    assert df == 3 and stat < chi2_critical(df)
    shifted = dict(enumerate([0.45, 0.35, 0.15, 0.05]))
    assert chi_square(draws, shifted, n)[0] > chi2_critical(3)
    # two samples: the same distribution passes, a shifted one does not
    same = Counter(torch.multinomial(p, n, replacement=True, generator=g).tolist())
    stat, df = chi_square_two_samples(draws, same)
    assert df == 3 and stat < chi2_critical(df)
    other = Counter(torch.multinomial(torch.tensor(list(shifted.values())), n, True, generator=g).tolist())
    assert chi_square_two_samples(draws, other)[0] > chi2_critical(3)


# ---------------------------------------------------------------------------- the payload
def test_trie_payload_hand_computed():
    a = cont([5, 6], [0.5, 0.4])  # P = 0.2
    b = cont([5, 7], [0.5, 0.1])  # P = 0.05
    c = cont([8], [0.3])
    payload = trie_payload([a, b, c])
    # node 0 = (); edges 0, 1 from it (to nodes 1, 2); edges 2, 3 from node 1 = (5,)
    assert payload["parent"] == [0, 0, 1, 1]
    assert payload["token"] == [5, 8, 6, 7]
    assert payload["mass"] == pytest.approx([0.25, 0.3, 0.4, 0.1])
    assert payload["exhausted"] == []
    trie = FlatTrie.from_payload(payload)
    assert trie.step(0, 5) == 1 and trie.step(1, 6) is None  # (5, 6) leaves the trie: nothing below
    assert trie.step(0, 9) is None and trie.step(None, 5) is None
    # all of (5,)'s mass excluded: node 1 is exhausted
    d = cont([5, 9], [0.5, 0.5])
    assert trie_payload([a, b, c, d])["exhausted"] == [1]
    assert trie_payload([]) is None and trie_payload([cont([], [])]) is None


def test_a_trie_larger_than_the_cap_is_refused_not_truncated():
    many = [cont([i, i + 1000], [0.001, 0.5]) for i in range(6)]  # 6 + 6 edges
    assert len(trie_payload(many, max_edges=12)["token"]) == 12
    with pytest.raises(ValueError, match="13 trie edges for one state, more than the 12"):
        trie_payload([*many, cont([99], [0.001])], max_edges=12)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"parent": [0], "token": [1]}, "needs lists"),
        ({"parent": [0, 0], "token": [1], "mass": [0.1]}, "lengths"),
        ({"parent": [1], "token": [1], "mass": [0.1]}, "parent 1"),  # a node made after its edge
        ({"parent": [0], "token": [-3], "mass": [0.1]}, "token -3"),
        ({"parent": [0], "token": [True], "mass": [0.1]}, "token True"),
        ({"parent": [0], "token": [1], "mass": [float("nan")]}, "mass nan"),
        ({"parent": [0], "token": [1], "mass": [-0.1]}, "mass -0.1"),
        ({"parent": [0, 0], "token": [1, 1], "mass": [0.1, 0.2]}, "token 1 twice"),
        ({"parent": [0], "token": [1], "mass": [0.1], "exhausted": [5]}, "exhausted"),
        ([1, 2], "a mapping"),
    ],
)
def test_a_malformed_payload_is_refused(payload, match):
    with pytest.raises(ValueError, match=match):
        FlatTrie.from_payload(payload)


def test_row_args_round_trip_and_checks():
    payload = trie_payload([cont([5], [0.5])])
    args = parse_row_args(row_args(0.7, 0.9, payload))
    assert (args.temperature, args.top_p) == (0.7, 0.9) and args.trie.edges[0] == {5: (0.5, 1)}
    assert parse_row_args(row_args(1.0, 1.0)).trie is None
    assert parse_row_args(None) is None and parse_row_args({"other": 1}) is None
    for bad, field in [
        ({"temperature": -1, "top_p": 1}, "temperature"),
        ({"temperature": 1, "top_p": 0}, "top_p"),
    ]:
        with pytest.raises(ValueError, match=field):
            parse_row_args({EXTRA_ARGS_KEY: bad})


# ---------------------------------------------------------------------------- the driver's restore
def test_restore_hand_computed():
    # root: token 5 carries 0.25 of excluded mass, token 8 all of its 0.3; below 5, token 6 0.4
    trie = FlatTrie.from_payload(
        trie_payload([cont([5, 6], [0.5, 0.4]), cont([5, 7], [0.5, 0.1]), cont([8], [0.3])])
    )
    # the engine reported v = log(p - m) on the excluded prefix, log p elsewhere
    p5, p6, p2 = 0.5, 0.45, 0.2
    reported = [math.log(p5 - 0.25), math.log(p6 - 0.4), math.log(p2)]
    restored, exhausted = trie.restore([5, 6, 2], reported)
    assert restored == pytest.approx([math.log(p5), math.log(p6), math.log(p2)], abs=1e-12)
    assert exhausted == 0
    # a token off the trie at the root, then a token that happens to be excluded elsewhere
    restored, _ = trie.restore([9, 5], [math.log(0.1), math.log(0.5)])
    assert restored == pytest.approx([math.log(0.1), math.log(0.5)])
    # at an exhausted prefix the engine drew from the policy: v is log p shifted, counted
    full = FlatTrie.from_payload(trie_payload([cont([3], [0.6]), cont([4], [0.4])]))
    restored, exhausted = full.restore([3, 7], [math.log(0.6) + FALLBACK_SHIFT, math.log(0.9)])
    assert exhausted == 1 and restored == pytest.approx([math.log(0.6), math.log(0.9)], abs=1e-12)
    # a fallback the processor found by itself (the prefix is not flagged): token 5 with p = 0.6
    # and 0.25 excluded would be restored as log(0.6 + 0.25) if the shift were not recognised
    restored, exhausted = trie.restore([5], [math.log(0.6) + FALLBACK_SHIFT])
    assert exhausted == 1 and restored == pytest.approx([math.log(0.6)], abs=1e-12)


# ---------------------------------------------------------------------------- the processor's rows
class Direction(enum.Enum):  # vLLM's MoveDirectionality
    UNIDIRECTIONAL = 1
    SWAP = 2


def update(removed=(), added=(), moved=()):
    return SimpleNamespace(removed=list(removed), added=list(added), moved=list(moved))


def params(t=1.0, top_p=1.0, excluded=None):
    return SimpleNamespace(extra_args=row_args(t, top_p, trie_payload(excluded) if excluded else None))


def test_processor_rows_hand_computed():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    proc = RowProcessor()
    out0: list[int] = []
    # row 0 excludes [0, 1] (P = 0.4 * 0.25) and [2] (all of token 2); row 1 nothing; row 2 not ours
    excluded = [cont([0, 1], [0.4, 0.25]), cont([2], [0.2])]
    proc.update(update(added=[(0, params(excluded=excluded), None, out0), (1, params(), None, []),
                              (2, SimpleNamespace(extra_args=None), None, [])]))  # fmt: skip
    logits = p.log().repeat(3, 1) + torch.tensor([[1.0], [2.0], [3.0]])  # any shift: a row's logits
    v = proc.apply(logits.clone())
    want = torch.tensor([math.log(0.4 - 0.1), math.log(0.3), -math.inf, math.log(0.1)])
    torch.testing.assert_close(v[0], want)
    torch.testing.assert_close(v[1], p.log())  # normalised: log p
    torch.testing.assert_close(v[2], logits[2])  # not ours: untouched
    # the engine samples token 0: the row is now at prefix (0,), where token 1 loses 0.25 (its
    # logits here happen to be the same p)
    out0.append(0)
    v = proc.apply(logits.clone())
    torch.testing.assert_close(v[0], torch.tensor([0.4, 0.3 - 0.25, 0.2, 0.1]).log())
    # then token 3: off the trie, the policy's own log-probs again
    out0.append(3)
    torch.testing.assert_close(proc.apply(logits.clone())[0], p.log())


def test_processor_applies_temperature_top_p_and_greedy_uses_t1():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3)
    proc = RowProcessor()
    proc.update(update(added=[(0, params(t=0.5), None, []), (1, params(t=1.0, top_p=0.8), None, []),
                              (2, params(t=0.0), None, [])]))  # fmt: skip
    v = proc.apply(logits.clone())
    torch.testing.assert_close(v[0], torch.log_softmax(logits[0] / 0.5, -1))
    # top-p 0.8: softmax([2, 1, 0, -1]) = [.644, .237, .087, .032]: the first two reach 0.8
    q = torch.softmax(logits[1, :2], -1).log()
    torch.testing.assert_close(v[1], torch.cat([q, torch.tensor([-math.inf, -math.inf])]))
    torch.testing.assert_close(v[2], torch.log_softmax(logits[2], -1))  # greedy: log-probs under T = 1


def test_processor_keeps_each_requests_state_through_batch_updates():
    proc = RowProcessor()
    a_out, b_out = [], []
    a = params(excluded=[cont([1], [0.5])])
    b = params(t=0.5)
    proc.update(update(added=[(0, a, None, a_out), (1, b, None, b_out)]))
    proc.update(update(moved=[(0, 1, Direction.SWAP)]))  # a <-> b
    assert proc.rows[1].output is a_out and proc.rows[0].output is b_out
    proc.update(update(moved=[(1, 3, Direction.UNIDIRECTIONAL)]))  # a -> 3
    assert set(proc.rows) == {0, 3} and proc.rows[3].output is a_out
    proc.update(update(removed=[0]))
    assert set(proc.rows) == {3}
    # removed first, then added: a new request may take a freed index in the same update
    c_out: list[int] = []
    proc.update(update(removed=[3], added=[(3, params(t=0.7), None, c_out)]))
    assert proc.rows[3].output is c_out and proc.rows[3].args.temperature == 0.7
    # a request without our arguments replaces one with them: the old state must go
    proc.update(update(added=[(3, SimpleNamespace(extra_args={}), None, [])]))
    assert proc.rows == {}
    proc.update(None)  # no change this step


def test_processor_walks_output_tokens_lazily_and_stops_at_placeholders():
    proc = RowProcessor()
    out: list[int] = []
    proc.update(update(added=[(0, params(excluded=[cont([1, 2, 3], [0.5, 0.5, 0.5])]), None, out)]))
    row = proc.rows[0]
    out.extend([1, -1])  # an asynchronous engine's placeholder for a token still on its way
    proc.apply(torch.zeros(1, 5))
    assert row.node == 1 and row.seen == 1
    out[1] = 2
    proc.apply(torch.zeros(1, 5))
    assert row.node == 2 and row.seen == 2
    out.append(4)  # off the trie: nothing more is excluded
    proc.apply(torch.zeros(1, 5))
    assert row.node is None


def test_processor_at_an_exhausted_prefix_draws_from_the_policy():
    p = torch.tensor([0.6, 0.4, 0.0])
    proc = RowProcessor()
    # the two tokens with mass, both excluded, with 1e-7 of rounding in their recorded masses: the
    # payload flags the prefix, and the row is the policy's, shifted
    excl = [cont([0], [0.6 - 1e-7]), cont([1], [0.4 - 1e-7])]
    assert 1 - sum(math.exp(c.logprobs[0]) for c in excl) < EXHAUSTED_MASS
    proc.update(update(added=[(0, params(excluded=excl), None, [])]))
    v = proc.apply(p.log()[None].clone())
    torch.testing.assert_close(v[0], p.log() + FALLBACK_SHIFT)


def spent_payload(masses: list[float]) -> SimpleNamespace:
    """Request arguments whose root masses the payload does not flag as exhausted (as masses
    recorded by other weights, or a payload not built by trie_payload, may be)."""
    payload = {
        "parent": [0] * len(masses),
        "token": list(range(len(masses))),
        "mass": masses,
        "exhausted": [],
    }
    return SimpleNamespace(extra_args={EXTRA_ARGS_KEY: {"temperature": 1, "top_p": 1, "exclude": payload}})


def test_a_prefix_the_processor_finds_spent_is_the_policys_and_restored_as_such():
    """Both halves together: masses that leave nothing (0.7 >= p = 0.6, 0.5 >= 0.4) where the payload
    flags nothing. The processor serves the policy (shifted), and the driver's restore gives back
    log p and counts the draw; it used to add the mass back: log(0.6 + 0.7) = +0.262 > 0, which
    the trajectory check refuses."""
    p = torch.tensor([0.6, 0.4, 0.0])
    proc = RowProcessor()
    proc.update(update(added=[(0, spent_payload([0.7, 0.5]), None, [])]))
    v = proc.apply(p.log()[None].clone())[0]
    torch.testing.assert_close(v, p.log() + FALLBACK_SHIFT)
    trie = FlatTrie.from_payload(spent_payload([0.7, 0.5]).extra_args[EXTRA_ARGS_KEY]["exclude"])
    for tok in (0, 1):  # whichever token the engine draws from that row
        restored, exhausted = trie.restore([tok], [float(v[tok])])
        assert restored == pytest.approx([math.log(p[tok])], abs=1e-5) and exhausted == 1
    # a row that keeps a little (0.4 - 0.39 = 0.01 > EXHAUSTED_MASS) samples what is left, unshifted
    proc = RowProcessor()
    proc.update(update(added=[(0, spent_payload([0.7, 0.39]), None, [])]))
    v = proc.apply(p.log()[None].clone())[0]
    torch.testing.assert_close(v, torch.tensor([-math.inf, math.log(0.01), -math.inf]))
    assert trie.restore([1], [float(v[1])])[1] == 0


def test_top_p_filter_hand_computed():
    # softmax([2, 1, 0, -1]) = [.644, .237, .087, .032]; mass before each: 0, .644, .881, .968
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 2)
    inf = -math.inf
    assert top_p_filter(logits, 0.8)[0].tolist() == [2.0, 1.0, inf, inf]
    assert top_p_filter(logits, 0.9)[0].tolist() == [2.0, 1.0, 0.0, inf]
    # one top-p per row (vLLM's processor): 0.5 keeps the top token alone, 1 keeps everything
    out = top_p_filter(logits, torch.tensor([0.5, 1.0]))
    assert out[0].tolist() == [2.0, inf, inf, inf] and out[1].tolist() == logits[1].tolist()


# ---------------------------------------------------------------------------- a stand-in engine
class TinyEngine:
    """An engine loop around the processor: a bigram policy (logits of the next token depend on the
    last one only), rows added through batch updates, one token per row per step sampled from the
    processor's output, and the value reported for it (as vLLM's processed logits)."""

    def __init__(self, table: torch.Tensor, seed: int = 0) -> None:
        self.table, self.proc = table, RowProcessor()
        self.g = torch.Generator().manual_seed(seed)

    def generate(self, first: int, n: int, steps: int, args) -> list[tuple[list[int], list[float]]]:
        outs: list[list[int]] = [[] for _ in range(n)]
        values: list[list[float]] = [[] for _ in range(n)]
        self.proc.update(update(added=[(i, args, None, outs[i]) for i in range(n)]))
        last = torch.full((n,), first)
        for _ in range(steps):
            v = self.proc.apply(self.table[last].clone())  # (n, V)
            tok = torch.multinomial(v.softmax(-1), 1, generator=self.g).squeeze(-1)
            for i, t in enumerate(tok.tolist()):
                outs[i].append(t)
                values[i].append(float(v[i, t]))
            last = tok
        self.proc.update(update(removed=range(n)))
        return list(zip(outs, values))


def test_stand_in_engine_samples_the_conditional_distribution_and_restores_log_probs():
    V = 6
    g = torch.Generator().manual_seed(3)
    table = torch.randn(V, V, generator=g) * 1.5  # (V, V): logits of the next token given the last
    T = 0.8
    p = torch.softmax(table / T, -1)  # (V, V)
    start = 0
    # excluded: [1, 2], [1, 3] and [4] (probabilities under the policy)
    excl = [cont(c, [float(p[a, b]) for a, b in zip([start, *c[:-1]], c)]) for c in ([1, 2], [1, 3], [4])]
    # exact conditional probability of each first two tokens
    m1 = {1: float(p[start, 1] * (p[1, 2] + p[1, 3])), 4: float(p[start, 4])}
    q1 = {x: float(p[start, x]) - m1.get(x, 0.0) for x in range(V)}
    z1 = sum(q1.values())
    q2 = {y: float(p[1, y]) - {2: float(p[1, 2]), 3: float(p[1, 3])}.get(y, 0.0) for y in range(V)}
    z2 = sum(q2.values())
    expected = {}
    for x in range(V):
        for y in range(V):
            expected[(x, y)] = q1[x] / z1 * (q2[y] / z2 if x == 1 else float(p[x, y]))
    n = 6000
    engine = TinyEngine(table)
    args = SimpleNamespace(extra_args=row_args(T, 1.0, trie_payload(excl)))
    rows = engine.generate(start, n, 2, args)
    trie = FlatTrie.from_payload(trie_payload(excl))
    counts = Counter(tuple(toks) for toks, _ in rows)
    stat, df = chi_square(counts, expected, n)
    print(f"stand-in engine: chi2 = {stat:.1f}, df = {df}, critical {chi2_critical(df):.1f}, n = {n}")
    assert stat < chi2_critical(df)
    # no excluded path was drawn: neither [1, 2] nor [1, 3], nor anything that starts with [4]
    assert not [t for t in counts if t in ((1, 2), (1, 3)) or t[0] == 4], counts
    # the log-probs restored by the driver are the policy's own
    for toks, values in rows[:200]:
        lps, exhausted = trie.restore(toks, values)
        want = [math.log(p[a, b]) for a, b in zip([start, *toks[:-1]], toks)]
        assert lps == pytest.approx(want, abs=1e-5) and exhausted == 0
    # the test can fail: unconditioned draws are far from the conditional distribution
    plain = TinyEngine(table).generate(start, n, 2, SimpleNamespace(extra_args=row_args(T, 1.0)))
    assert chi_square(Counter(tuple(t) for t, _ in plain), expected, n)[0] > 10 * chi2_critical(df)
