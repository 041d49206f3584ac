"""Solving Countdown: one solution of a problem, every reachable target, steps as one expression."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction

from tsd.envs.countdown.problem import Number, Step


def _positive_int_combos(a: int, b: int) -> Iterator[tuple[int, str, int, int]]:
    """Every ``(x, op, y, r)`` over the pair {a, b} whose result is a positive integer."""
    hi, lo = max(a, b), min(a, b)  # "5+3", "8*2": bigger operand first, like "-" and "/"
    yield hi, "+", lo, hi + lo
    yield hi, "*", lo, hi * lo
    for x, y in ((a, b), (b, a)):
        if x - y > 0:
            yield x, "-", y, x - y
        if y != 0 and x % y == 0 and x // y > 0:
            yield x, "/", y, x // y
    # a + b or a * b may be non-positive for non-positive inputs; callers filter with r > 0


def positive_int_steps(a: int, b: int) -> list[Step]:
    """Every distinct step ``(x, op, y, r)`` over the pair {a, b} of positive integers whose
    result is a positive integer, in the order ``+ * - /`` (bigger operand first)."""
    return list(dict.fromkeys(s for s in _positive_int_combos(a, b) if s[3] > 0))


def _rational_combos(a: Fraction, b: Fraction) -> Iterator[tuple[Fraction, str, Fraction, Fraction]]:
    yield a, "+", b, a + b
    yield a, "*", b, a * b
    yield a, "-", b, a - b
    yield b, "-", a, b - a
    if b != 0:
        yield a, "/", b, a / b
    if a != 0:
        yield b, "/", a, b / a


def _as_number(x: Fraction | int) -> Number:
    return int(x) if isinstance(x, Fraction) and x.denominator == 1 else x


def solve(numbers: Sequence[int], target: int, *, integer_steps: bool = True) -> list[Step] | None:
    """One solution that uses ALL ``numbers``, as binary steps ``(a, op, b, result)`` applied in order
    to a pool that starts as ``numbers``, or ``None`` when there is none; e.g. ``[3,5,7,2] -> 23`` gives
    ``[(5,'+',3,8), (8,'*',2,16), (16,'+',7,23)]`` (bigger operand first).

    With ``integer_steps`` (the dataset's rule) every result is a positive integer; otherwise results
    may be any rationals (returned as ``Fraction`` when not integral). Depth-first over pairs with a
    memo of dead pools: instant for 4 numbers.
    """
    pool0 = [Fraction(int(x)) for x in numbers]
    if not pool0:
        return None
    goal = Fraction(target)
    dead: set[tuple[Fraction, ...]] = set()

    def combos(a: Fraction, b: Fraction) -> Iterable[tuple[Fraction, str, Fraction, Fraction]]:
        if not integer_steps:
            return _rational_combos(a, b)
        if a.denominator != 1 or b.denominator != 1:
            return ()
        return (
            (Fraction(x), op, Fraction(y), Fraction(r))
            for x, op, y, r in _positive_int_combos(int(a), int(b))
            if r > 0
        )

    def dfs(pool: list[Fraction]) -> list[tuple[Fraction, str, Fraction, Fraction]] | None:
        if len(pool) == 1:
            return [] if pool[0] == goal else None
        key = tuple(sorted(pool))
        if key in dead:
            return None
        for i in range(len(pool)):
            for j in range(i + 1, len(pool)):
                rest = [v for k, v in enumerate(pool) if k != i and k != j]
                for step in combos(pool[i], pool[j]):
                    tail = dfs([*rest, step[3]])
                    if tail is not None:
                        return [step, *tail]
        dead.add(key)
        return None

    found = dfs(pool0)
    if found is None:
        return None
    return [(_as_number(a), op, _as_number(b), _as_number(r)) for a, op, b, r in found]


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def steps_to_expression(numbers: Sequence[int], steps: Sequence[Step]) -> str:
    """The one expression that ``steps`` compute from ``numbers``, with minimal parentheses, e.g.
    ``[3,5,7,2]`` and ``[(3,'+',5,8), (8,'*',2,16), (16,'+',7,23)]`` give ``'(3+5)*2+7'``.

    Each input appears exactly once. Raises ``ValueError`` when a step uses a value that is not in
    the pool, computes the wrong result, or the steps leave more than one value.
    """
    # pool of (value, text, precedence of the text's top operator)
    pool: list[tuple[Fraction, str, int]] = [(Fraction(int(x)), str(int(x)), _ATOM) for x in numbers]
    if not pool:
        raise ValueError("no numbers")

    def take(v: Number, step: Step) -> tuple[Fraction, str, int]:
        for k, item in enumerate(pool):
            if item[0] == v:
                return pool.pop(k)
        raise ValueError(f"step {step}: {v} is not available (pool {[_as_number(p[0]) for p in pool]})")

    for step in steps:
        a, op, b, r = step
        if op not in _PRECEDENCE:
            raise ValueError(f"step {step}: unknown operator {op!r}")
        va, ta, pa = take(a, step)
        vb, tb, pb = take(b, step)
        if op == "+":
            exact = va + vb
        elif op == "-":
            exact = va - vb
        elif op == "*":
            exact = va * vb
        elif vb == 0:
            raise ValueError(f"step {step}: division by zero")
        else:
            exact = va / vb
        if exact != Fraction(r):
            raise ValueError(f"step {step}: {a}{op}{b} is {_as_number(exact)}, not {r}")
        prec = _PRECEDENCE[op]
        left = f"({ta})" if pa < prec else ta
        # a-(b+c) and a/(b*c) need the parentheses; a+(b-c) and a*(b/c) do not
        right = f"({tb})" if pb < prec or (pb == prec and op in "-/") else tb
        pool.append((exact, f"{left}{op}{right}", prec))
    if len(pool) != 1:
        raise ValueError(f"steps leave {len(pool)} values, not 1 (not every number was used)")
    return pool[0][1]


@functools.lru_cache(maxsize=1 << 16)
def reachable_sorted(ms: tuple[int, ...]) -> frozenset[int]:
    """Values of every expression tree over the whole multiset ``ms`` (sorted) with positive-integer
    intermediate results. The root of any tree splits ``ms`` into two complementary sub-multisets,
    so this recurses over unordered splits (the combos are symmetric) with a shared cache."""
    if len(ms) == 1:
        return frozenset(ms)
    out: set[int] = set()
    n = len(ms)
    seen: set[tuple[int, ...]] = set()
    for mask in range(1, 1 << n):
        if not mask & 1 or mask == (1 << n) - 1:  # index 0 on the left: each unordered split once
            continue
        left = tuple(ms[k] for k in range(n) if mask >> k & 1)
        if left in seen:
            continue
        seen.add(left)
        right = tuple(ms[k] for k in range(n) if not mask >> k & 1)
        for x in reachable_sorted(left):
            for y in reachable_sorted(right):
                s, p = x + y, x * y
                if s > 0:
                    out.add(s)
                if p > 0:
                    out.add(p)
                if x > y:
                    out.add(x - y)
                elif y > x:
                    out.add(y - x)
                if y != 0 and x % y == 0 and x // y > 0:
                    out.add(x // y)
                if x != 0 and y % x == 0 and y // x > 0:
                    out.add(y // x)
    return frozenset(out)


def reachable_targets(numbers: Sequence[int]) -> set[int]:
    """Every value reachable using ALL ``numbers`` once each with ``+ - * /`` and positive-integer
    intermediate results (the inputs themselves are not filtered). Cached per sorted multiset."""
    if not numbers:
        return set()
    return set(reachable_sorted(tuple(sorted(int(x) for x in numbers))))
