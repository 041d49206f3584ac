"""Countdown solution traces for building the bundled tiny policy (``scripts/build_tiny_policy.py``).

A correct trace is a *random* solution, chained when possible (every step after the first uses the
previous result, so the answer reads the steps left to right: far easier for a tiny model than
re-assembling a tree), found by depth-first search with pairs and operators in random order, so the
policy is not deterministic. With probability ``error_rate`` the trace is wrong instead:

- *wander* (the default kind): random valid positive-integer steps over all the numbers that miss
  the target; the answer is the expression of those steps (consistent arithmetic, wrong value);
- *slip* (a ``slip_share`` of the errors): a correct trace whose last step swaps its operator yet
  still claims the target (``16*7=23``); the answer is the expression actually computed.

The arithmetic, the answer expression and the completion format are the env's own
(:mod:`tsd.envs.countdown.solver`, :mod:`tsd.envs.countdown.prompts`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tsd.envs.countdown.problem import Problem
from tsd.envs.countdown.prompts import format_completion
from tsd.envs.countdown.solver import positive_int_steps, steps_to_expression

#: a positive-integer reasoning step ``(a, op, b, result)``
Step = tuple[int, str, int, int]


def _acc_first(step: Step, acc: int) -> Step:
    """A chained ``+``/``*`` step written with the previous result first (``8+12=20``), so the
    answer ``7+1+12`` reads left to right like the steps (``-`` and ``/`` stay bigger-first)."""
    a, op, b, r = step
    return (b, op, a, r) if op in "+*" and b == acc and a != acc else step


def random_solution(
    numbers: Sequence[int], target: int, rng: random.Random, chain: bool = True
) -> list[Step] | None:
    """A random solution using all ``numbers`` (positive-integer steps), or ``None``: depth-first
    search with pairs and operators in random order, so different calls find different solutions.

    With ``chain`` (the default) a *chained* solution is preferred, where every step after the first
    uses the previous result (``((a op b) op c) op d``, 94% of problems have one): its answer reads
    the steps in order, which a tiny model learns far faster than re-assembling a tree."""
    dead: set[tuple[tuple[int, ...], bool]] = set()

    def dfs(pool: list[int], chained: bool) -> list[Step] | None:
        # pool[-1] is the previous step's result once a step is taken
        if len(pool) == 1:
            return [] if pool[0] == target else None
        key = (tuple(sorted(pool[:-1])) + (pool[-1],), chained) if chained else (tuple(sorted(pool)), False)
        if key in dead:
            return None
        if chained:
            pairs = [(i, len(pool) - 1) for i in range(len(pool) - 1)]
        else:
            pairs = [(i, j) for i in range(len(pool)) for j in range(i + 1, len(pool))]
        rng.shuffle(pairs)
        for i, j in pairs:
            rest = [v for k, v in enumerate(pool) if k not in (i, j)]
            ops = positive_int_steps(pool[i], pool[j])
            rng.shuffle(ops)
            for step in ops:
                tail = dfs([*rest, step[3]], chained)
                if tail is not None:
                    return [_acc_first(step, pool[-1]) if chained else step, *tail]
        dead.add(key)
        return None

    def first_then_chain() -> list[Step] | None:
        pool = list(numbers)
        pairs = [(i, j) for i in range(len(pool)) for j in range(i + 1, len(pool))]
        rng.shuffle(pairs)
        for i, j in pairs:
            rest = [v for k, v in enumerate(pool) if k not in (i, j)]
            ops = positive_int_steps(pool[i], pool[j])
            rng.shuffle(ops)
            for step in ops:
                tail = dfs([*rest, step[3]], True)
                if tail is not None:
                    return [step, *tail]
        return None

    if len(numbers) < 2:
        return [] if list(numbers) == [target] else None
    return (first_then_chain() if chain else None) or dfs(list(numbers), False)


def random_walk(numbers: Sequence[int], rng: random.Random, chain: bool = True) -> list[Step]:
    """Random valid steps over all ``numbers`` until one value is left (no target in sight); with
    ``chain`` every step after the first uses the previous result."""
    pool, steps = list(numbers), []
    while len(pool) > 1:
        if chain and steps:
            i, j = rng.randrange(len(pool) - 1), len(pool) - 1
        else:
            i, j = rng.sample(range(len(pool)), 2)
        step = rng.choice(positive_int_steps(pool[i], pool[j]))
        if chain and steps:
            step = _acc_first(step, pool[j])
        pool = [v for k, v in enumerate(pool) if k not in (i, j)] + [step[3]]
        steps.append(step)
    return steps


def _apply(a: int, op: str, b: int) -> int | None:
    """``a op b`` when it is a positive integer (``-`` and ``/`` in this order), else ``None``."""
    for x, o, y, r in positive_int_steps(a, b):
        if o == op and (op in "+*" or (x, y) == (a, b)):
            return r
    return None


def sample_completion(
    problem: Problem, rng: random.Random, error_rate: float, slip_share: float = 0.5
) -> tuple[str, str]:
    """``(completion, kind)`` for ``problem``; ``kind`` is ``"correct"``, ``"wander"`` or ``"slip"``."""
    numbers, target = problem.numbers, problem.target
    fmt = format_completion
    steps = random_solution(numbers, target, rng)
    if steps is None:  # train problems are all solvable; be safe anyway
        steps = random_walk(numbers, rng)
        return fmt(steps, steps_to_expression(numbers, steps)), "wander"
    if rng.random() >= error_rate:
        return fmt(steps, steps_to_expression(numbers, steps)), "correct"
    if rng.random() >= slip_share:
        for _ in range(20):
            walk = random_walk(numbers, rng)
            if walk[-1][3] != target:
                return fmt(walk, steps_to_expression(numbers, walk)), "wander"
    # slip: the last step computes something else with another operator but still writes the target
    a, op, b, _ = steps[-1]
    for other in rng.sample("+-*/", 4):
        value = _apply(a, other, b)
        if other != op and value is not None and value != target:
            true_steps = [*steps[:-1], (a, other, b, value)]
            shown = [*steps[:-1], (a, other, b, target)]
            return fmt(shown, steps_to_expression(numbers, true_steps)), "slip"
    return fmt(steps, steps_to_expression(numbers, steps)), "correct"
