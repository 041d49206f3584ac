"""Countdown: problem generation, prompts, answer parsing, verification and rewards.

The game (DESIGN.md, "Countdown"): ``count`` integers drawn from ``[low, high]`` (4 from [1, 13] by
default) and a target in ``[1, max_target]`` reachable with *all* of them using ``+ - * /`` and
positive-integer intermediate results. A completion writes its reasoning as ``<step>a op b=r</step>``
tags and ends with ONE expression in ``<answer>...</answer>``::

    [3,5,7,2]->23
    <step>3+5=8</step><step>8*2=16</step><step>16+7=23</step><answer>(3+5)*2+7</answer>

Rewards (only the completion is read, never the prompt):

- dense (training): ``1 - 2*min(|t - p| / t, 1)`` when the answer is a well-formed expression over the
  inputs with value ``p``, else ``-1``;
- sparse (evaluation): ``Score.correct``, i.e. ``p == t`` exactly.

Model output is hostile input: the answer is parsed by a small hand-written recursive-descent parser
(never ``eval``), evaluated exactly with :class:`fractions.Fraction`, and bounded in length (200
characters), parenthesis depth (20) and magnitude (``10**30``); :func:`score` never raises.

Splits are deterministic from a seed; the test split is drawn first and train is disjoint from it by
``(sorted numbers, target)``. Write them to disk with::

    python -m tsd.envs.countdown generate --out data/countdown --seed 0

This module is pure Python and must not import torch.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

__all__ = [
    "CountdownEnv",
    "Problem",
    "Score",
    "Step",
    "generate_splits",
    "main",
    "reachable_targets",
    "read_jsonl",
    "score",
    "solve",
    "steps_to_expression",
    "write_jsonl",
]

#: completions longer than this are invalid without being scanned at all
MAX_COMPLETION_CHARS = 100_000
#: the text inside the last ``<answer>`` tag may be at most this long
MAX_ANSWER_CHARS = 200
#: parentheses may nest at most this deep
MAX_DEPTH = 20
#: any literal or intermediate result with |numerator| or denominator above this is invalid
MAX_MAGNITUDE = 10**30

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_WHITESPACE = frozenset(" \t\n\r\f\v")  # ASCII only: str.isspace() would accept U+00A0 etc.
_DIGITS = frozenset("0123456789")  # ASCII only: str.isdigit() would accept "٣" and "²"
_OPS = frozenset("+-*/")

Number = int | Fraction
#: one binary reasoning step ``(a, op, b, result)``, e.g. ``(3, "+", 5, 8)``
Step = tuple[Number, str, Number, Number]


# ----------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Problem:
    """One Countdown problem. ``id`` is its index in its split (``-1`` when unknown)."""

    numbers: tuple[int, ...]
    target: int
    id: int = -1

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Identity for de-duplication and train/test disjointness: (sorted numbers, target)."""
        return tuple(sorted(self.numbers)), self.target


@dataclass(frozen=True)
class Score:
    """The grade of one completion.

    ``dense`` is the training reward ``1 - 2*min(|t - p| / t, 1)`` (``-1.0`` when invalid);
    ``correct`` is the sparse evaluation reward (``p == t``); ``value`` is ``p`` exactly;
    ``reason`` says why the completion is invalid (``None`` when valid).
    """

    dense: float
    correct: bool
    value: Fraction | None
    reason: str | None

    @property
    def valid(self) -> bool:
        return self.reason is None


def _invalid(reason: str) -> Score:
    return Score(dense=-1.0, correct=False, value=None, reason=reason)


# ----------------------------------------------------------------------------------------------
# answer extraction, parsing, exact evaluation


class _Invalid(Exception):
    """Raised inside the parser; ``args[0]`` is the human reason that ends up in ``Score.reason``."""


def _last_answer(completion: str) -> str | None:
    """``re.findall(r"<answer>(.*?)</answer>", completion, re.S)[-1]`` (or ``None``), in linear time.

    The regex is quadratic on many unclosed ``<answer>`` tags; this scan gives the same
    non-overlapping, leftmost, shortest matches with ``str.find``.
    """
    last, pos = None, 0
    while True:
        start = completion.find(_ANSWER_OPEN, pos)
        if start < 0:
            return last
        end = completion.find(_ANSWER_CLOSE, start + len(_ANSWER_OPEN))
        if end < 0:
            return last
        last = completion[start + len(_ANSWER_OPEN) : end]
        pos = end + len(_ANSWER_CLOSE)


def _tokenize(text: str) -> list[int | str]:
    """Integer literals (as ints), the four operators and parentheses; whitespace is dropped.

    Rules: ASCII decimal literals without leading zeros ("0" is fine, "07" is not); no unary signs,
    no ``**``, no decimals, nothing else; parentheses balanced and at most ``MAX_DEPTH`` deep.
    """
    tokens: list[int | str] = []
    depth, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _WHITESPACE:
            i += 1
        elif ch in _DIGITS:
            j = i
            while j < n and text[j] in _DIGITS:
                j += 1
            literal = text[i:j]
            if len(literal) > 1 and literal[0] == "0":
                raise _Invalid(f"leading zero in literal {literal!r}")
            value = int(literal)  # at most MAX_ANSWER_CHARS digits: cheap
            if value > MAX_MAGNITUDE:
                raise _Invalid(f"literal {literal[:20]}... is too large")
            if tokens and isinstance(tokens[-1], int):
                raise _Invalid(f"two numbers in a row at position {i}")
            tokens.append(value)
            i = j
        elif ch in _OPS:
            if ch == "*" and i + 1 < n and text[i + 1] == "*":
                raise _Invalid("'**' is not allowed")
            tokens.append(ch)
            i += 1
        elif ch == "(":
            depth += 1
            if depth > MAX_DEPTH:
                raise _Invalid(f"parentheses nested deeper than {MAX_DEPTH}")
            tokens.append(ch)
            i += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise _Invalid("unbalanced parentheses")
            tokens.append(ch)
            i += 1
        else:
            shown = ch if ch.isascii() and ch.isprintable() else f"U+{ord(ch):04X}"
            raise _Invalid(f"unexpected character {shown!r} at position {i}")
    if depth != 0:
        raise _Invalid("unbalanced parentheses")
    if not tokens:
        raise _Invalid("empty answer")
    return tokens


class _Parser:
    """Recursive descent to postfix (RPN) over the grammar::

        expr   := term (('+' | '-') term)*
        term   := factor (('*' | '/') factor)*
        factor := INT | '(' expr ')'

    Recursion is three frames per parenthesis level and the tokenizer caps the level at MAX_DEPTH;
    left-associative chains are loops, not recursion.
    """

    def __init__(self, tokens: list[int | str]):
        self.tokens = tokens
        self.i = 0
        self.out: list[int | str] = []

    def parse(self) -> list[int | str]:
        self.expr()
        if self.i != len(self.tokens):
            raise _Invalid(f"unexpected {self.tokens[self.i]!r} after a complete expression")
        return self.out

    def _peek(self) -> int | str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def expr(self) -> None:
        self.term()
        while (tok := self._peek()) in ("+", "-"):
            self.i += 1
            self.term()
            self.out.append(tok)

    def term(self) -> None:
        self.factor()
        while (tok := self._peek()) in ("*", "/"):
            self.i += 1
            self.factor()
            self.out.append(tok)

    def factor(self) -> None:
        tok = self._peek()
        if isinstance(tok, int):
            self.i += 1
            self.out.append(tok)
        elif tok == "(":
            self.i += 1
            self.expr()
            if self._peek() != ")":  # unreachable after the balance check, kept for safety
                raise _Invalid("unbalanced parentheses")
            self.i += 1
        elif tok is None:
            raise _Invalid("expression ends early")
        elif tok in ("+", "-"):
            raise _Invalid(f"unary {tok!r} is not allowed")
        else:
            raise _Invalid(f"expected a number or '(' but found {tok!r}")


def _check_usage(literals: list[int], numbers: Sequence[int], use_all_numbers: bool) -> None:
    """Each literal is an input number; each input is used at most once (exactly once with
    ``use_all_numbers``), as multisets."""
    available = Counter(int(x) for x in numbers)
    used = Counter(literals)
    for lit in literals:  # report in answer order
        if lit not in available:
            raise _Invalid(f"number {lit} is not in the input")
        if used[lit] > available[lit]:
            times = "twice" if used[lit] == 2 else f"{used[lit]} times"
            given = "" if available[lit] == 1 else f" but given {available[lit]} times"
            raise _Invalid(f"number {lit} used {times}{given}")
    if use_all_numbers:
        missing = sorted((available - used).elements())
        if missing:
            raise _Invalid(f"not all numbers used (missing {', '.join(map(str, missing))})")


def _evaluate(postfix: list[int | str], integer_steps: bool) -> Fraction:
    """Exact value of a postfix program; division by zero, magnitudes over MAX_MAGNITUDE and (with
    ``integer_steps``) any non-positive-integer intermediate result are invalid."""
    stack: list[Fraction] = []
    for tok in postfix:
        if isinstance(tok, int):
            stack.append(Fraction(tok))
            continue
        b, a = stack.pop(), stack.pop()
        if tok == "+":
            r = a + b
        elif tok == "-":
            r = a - b
        elif tok == "*":
            r = a * b
        else:
            if b == 0:
                raise _Invalid("division by zero")
            r = a / b
        if abs(r.numerator) > MAX_MAGNITUDE or r.denominator > MAX_MAGNITUDE:
            raise _Invalid("intermediate result too large")
        if integer_steps and (r.denominator != 1 or r <= 0):
            raise _Invalid(f"intermediate result {a} {tok} {b} = {r} is not a positive integer")
        stack.append(r)
    (value,) = stack
    return value


def dense_reward(value: Fraction, target: int) -> float:
    """``1 - 2*min(|t - p| / t, 1)`` (DESIGN.md): 1 at the target, falling linearly to -1 at a
    relative error of 100%. Uses ``|t|``; for ``t == 0`` it is 1 when ``p == 0`` else -1."""
    t = Fraction(target)
    if t == 0:
        rel = Fraction(0) if value == 0 else Fraction(1)
    else:
        rel = min(abs(t - value) / abs(t), Fraction(1))
    return float(1 - 2 * rel)


def score(
    completion: str,
    numbers: Sequence[int],
    target: int,
    *,
    use_all_numbers: bool = False,
    integer_steps: bool = False,
) -> Score:
    """Grade one completion against ``numbers`` and ``target``. Never raises.

    Rules (DESIGN.md, "Countdown"):

    1. only ``completion`` is read; the answer is the last ``<answer>(.*?)</answer>`` match (none ->
       invalid); completions over ``MAX_COMPLETION_CHARS`` are invalid unscanned;
    2. the answer is ASCII decimal literals without leading zeros, binary ``+ - * /``, parentheses and
       ASCII whitespace only (no unary signs, ``**``, decimals or unicode digits), at most
       ``MAX_ANSWER_CHARS`` characters and ``MAX_DEPTH`` nested parentheses;
    3. each literal is an input number and each input is used at most once (multiset); with
       ``use_all_numbers`` every input exactly once;
    4. arithmetic is exact (``Fraction``); division by zero is invalid; with ``integer_steps`` every
       intermediate result must be a positive integer; magnitudes over ``MAX_MAGNITUDE`` are invalid;
    5. invalid: ``dense=-1.0, correct=False``; valid with value ``p``:
       ``dense = 1 - 2*min(|t - p| / t, 1)`` and ``correct = (p == t)``.
    """
    try:
        if not isinstance(completion, str):
            return _invalid("completion is not a string")
        if len(completion) > MAX_COMPLETION_CHARS:
            return _invalid(f"completion longer than {MAX_COMPLETION_CHARS} characters")
        answer = _last_answer(completion)
        if answer is None:
            return _invalid("no <answer> tag")
        if len(answer) > MAX_ANSWER_CHARS:
            return _invalid(f"answer longer than {MAX_ANSWER_CHARS} characters")
        postfix = _Parser(_tokenize(answer)).parse()
        _check_usage([t for t in postfix if isinstance(t, int)], numbers, use_all_numbers)
        value = _evaluate(postfix, integer_steps)
        return Score(
            dense=dense_reward(value, target), correct=bool(value == target), value=value, reason=None
        )
    except _Invalid as e:
        return _invalid(str(e.args[0]))
    except (RecursionError, MemoryError):  # the parser is bounded; belt and braces
        return _invalid("answer too complex")
    except Exception as e:  # noqa: BLE001 - the reward must never take a rollout down
        return _invalid(f"internal error ({type(e).__name__})")


# ----------------------------------------------------------------------------------------------
# solving and reachability


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
def _reachable_sorted(ms: tuple[int, ...]) -> frozenset[int]:
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
        for x in _reachable_sorted(left):
            for y in _reachable_sorted(right):
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
    return set(_reachable_sorted(tuple(sorted(int(x) for x in numbers))))


# ----------------------------------------------------------------------------------------------
# dataset generation and files

#: the generation knobs and their accepted ranges (inclusive); also used by the env and the CLI
_INT_RANGES: dict[str, tuple[int, int | None]] = {
    "seed": (-(2**63), 2**63 - 1),
    "n_train": (0, None),
    "n_test": (0, None),
    "count": (1, 6),
    "low": (1, 1000),
    "high": (1, 1000),
    "max_target": (1, None),
}


def _check_int(name: str, value: object) -> None:
    lo, hi = _INT_RANGES[name]
    rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer {rng}, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an integer {rng}, got {value}")


def _check_generation_args(**kwargs: object) -> None:
    for name, value in kwargs.items():
        _check_int(name, value)
    if kwargs["high"] < kwargs["low"]:  # type: ignore[operator]
        raise ValueError(f"high must be >= low (low={kwargs['low']}), got {kwargs['high']}")


def generate_splits(
    *,
    seed: int = 0,
    n_train: int = 20000,
    n_test: int = 820,
    count: int = 4,
    low: int = 1,
    high: int = 13,
    max_target: int = 100,
) -> tuple[list[Problem], list[Problem]]:
    """``(train, test)``, deterministic from ``seed``.

    Each problem: ``count`` integers iid uniform on ``[low, high]`` (kept in draw order), then a
    target uniform on ``reachable_targets(numbers) ∩ [1, max_target]`` (numbers redrawn when that is
    empty). Test is drawn first, then train, from one ``random.Random(seed)``, so the test split does
    not depend on ``n_train``. Keys ``(sorted numbers, target)`` are unique across both splits
    (disjoint, no duplicates). ``id`` is the index within the split. Raises ``ValueError`` on bad
    arguments or when the space of problems is too small for the sizes asked.
    """
    _check_generation_args(
        seed=seed, n_train=n_train, n_test=n_test, count=count, low=low, high=high, max_target=max_target
    )
    rng = random.Random(seed)
    targets_of: dict[tuple[int, ...], list[int]] = {}
    seen: set[tuple[tuple[int, ...], int]] = set()
    # the key space can be smaller than asked (e.g. count=1): give up after this many draws in a row
    # that add nothing, rather than loop forever
    patience = max(200_000, 50 * (n_train + n_test))

    def draw(n: int) -> list[Problem]:
        out: list[Problem] = []
        misses = 0
        while len(out) < n:
            numbers = tuple(rng.randint(low, high) for _ in range(count))
            ms = tuple(sorted(numbers))
            targets = targets_of.get(ms)
            if targets is None:
                targets = targets_of[ms] = sorted(t for t in _reachable_sorted(ms) if 1 <= t <= max_target)
            key = (ms, rng.choice(targets)) if targets else None
            if key is None or key in seen:
                misses += 1
                if misses > patience:
                    raise ValueError(
                        f"only {len(seen)} distinct problems found for n_train + n_test = "
                        f"{n_train + n_test} (count={count}, low={low}, high={high}, "
                        f"max_target={max_target}); ask for fewer or widen the ranges"
                    )
                continue
            misses = 0
            seen.add(key)
            out.append(Problem(numbers=numbers, target=key[1], id=len(out)))
        return out

    test = draw(n_test)
    train = draw(n_train)
    return train, test


def write_jsonl(path: str | os.PathLike, problems: Iterable[Problem]) -> None:
    """One ``{"numbers": [...], "target": t}`` per line, written atomically (temp file + rename) so
    concurrent readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps({"numbers": list(p.numbers), "target": p.target}) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_jsonl(path: str | os.PathLike) -> list[Problem]:
    """Problems from a JSONL file written by :func:`write_jsonl` (extra keys are ignored, blank lines
    skipped). ``id`` is the problem's index in the file. Raises ``ValueError`` naming the file and
    line of the first malformed record."""
    path = Path(path)
    problems: list[Problem] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected an object with 'numbers' and 'target'")
            numbers, target = rec.get("numbers"), rec.get("target")
            if not isinstance(numbers, list) or not numbers or not all(_is_int(x) for x in numbers):
                raise ValueError(f"{where}: 'numbers' must be a non-empty list of integers, got {numbers!r}")
            if not isinstance(target, int) or isinstance(target, bool):
                raise ValueError(f"{where}: 'target' must be an integer, got {target!r}")
            problems.append(Problem(numbers=tuple(numbers), target=target, id=len(problems)))
    return problems


# ----------------------------------------------------------------------------------------------
# the env

_CACHE: dict[tuple[int, ...], tuple[tuple[Problem, ...], tuple[Problem, ...]]] = {}


def _cached_splits(**kwargs: int) -> tuple[tuple[Problem, ...], tuple[Problem, ...]]:
    """Splits are pure functions of their arguments: build each once per process."""
    key = tuple(kwargs[k] for k in sorted(kwargs))
    if key not in _CACHE:
        train, test = generate_splits(**kwargs)
        _CACHE[key] = (tuple(train), tuple(test))
    return _CACHE[key]


def default_system_prompt(*, use_all_numbers: bool = False, integer_steps: bool = False) -> str:
    """The chat template's system message: the game, the ``<step>`` tags and the ONE-expression
    ``<answer>``; the number-use and integer rules follow the env's knobs."""
    use = "exactly once" if use_all_numbers else "at most once"
    ints = " Every intermediate result must be a positive integer." if integer_steps else ""
    return (
        "You are playing Countdown. You are given a sequence of numbers and a target number. "
        "Combine the numbers with +, -, * and / (and parentheses) so that the result equals the "
        f"target exactly. Each number may be used {use}.{ints}\n"
        "Reason one calculation at a time: write each intermediate step inside <step>...</step> "
        "tags, for example <step>3+5=8</step>. Then give the final answer as ONE arithmetic "
        "expression inside <answer>...</answer>, using only the given numbers, + - * / and "
        "parentheses, without '=' or the target.\n"
        "Example: for the input sequence [3, 5, 7, 2] and target 23, a good completion is\n"
        "<step>3+5=8</step><step>8*2=16</step><step>16+7=23</step><answer>(3+5)*2+7</answer>"
    )


class CountdownEnv:
    """Countdown problems, prompts and grading (DESIGN.md, "Countdown").

    Splits are built lazily on first access of :attr:`train` / :attr:`test`: read from
    ``data_dir/{train,test}.jsonl`` when both exist (then the generation arguments are not used),
    else generated from the arguments, cached in memory for the process, and written to
    ``data_dir`` when one is given.
    """

    TEMPLATES = ("plain", "chat")

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        seed: int = 0,
        n_train: int = 20000,
        n_test: int = 820,
        count: int = 4,
        low: int = 1,
        high: int = 13,
        max_target: int = 100,
        template: str = "plain",
        use_all_numbers: bool = False,
        integer_steps: bool = False,
        system_prompt: str | None = None,
    ):
        """
        Args:
            data_dir: folder with ``train.jsonl`` / ``test.jsonl`` to read (or to write once generated).
            seed: seed of the generated splits.
            n_train: number of training problems (>= 0).
            n_test: number of test problems (>= 0), disjoint from train.
            count: integers per problem, in [1, 6].
            low: smallest input integer, in [1, 1000].
            high: largest input integer, in [low, 1000].
            max_target: targets are drawn from [1, max_target].
            template: "plain" (compact ``[3,5,7,2]->23\\n``, for the bundled tiny policy) or "chat"
                (system + user messages through the tokenizer's chat template).
            use_all_numbers: the answer must use every input exactly once (default: at most once).
            integer_steps: every intermediate result must be a positive integer.
            system_prompt: the chat system message (default: :func:`default_system_prompt`).
        """
        if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
            raise ValueError(f"data_dir must be a path or None, got {data_dir!r}")
        _check_generation_args(
            seed=seed, n_train=n_train, n_test=n_test, count=count, low=low, high=high, max_target=max_target
        )
        if template not in self.TEMPLATES:
            raise ValueError(f"template must be one of {self.TEMPLATES}, got {template!r}")
        for name, flag in (("use_all_numbers", use_all_numbers), ("integer_steps", integer_steps)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
            raise ValueError(f"system_prompt must be a non-empty string or None, got {system_prompt!r}")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.gen_kwargs = dict(
            seed=seed, n_train=n_train, n_test=n_test, count=count, low=low, high=high, max_target=max_target
        )
        self.template = template
        self.use_all_numbers = use_all_numbers
        self.integer_steps = integer_steps
        self.system_prompt = system_prompt or default_system_prompt(
            use_all_numbers=use_all_numbers, integer_steps=integer_steps
        )
        self._train: list[Problem] | None = None
        self._test: list[Problem] | None = None

    # -- data ----------------------------------------------------------------------------------

    def _load(self) -> None:
        if self._train is not None and self._test is not None:
            return
        files = (self.data_dir / "train.jsonl", self.data_dir / "test.jsonl") if self.data_dir else None
        if files and all(f.exists() for f in files):
            train, test = read_jsonl(files[0]), read_jsonl(files[1])
            overlap = {p.key for p in train} & {p.key for p in test}
            if overlap:
                warnings.warn(
                    f"{self.data_dir}: {len(overlap)} of {len(test)} test problems are also in train",
                    stacklevel=3,
                )
        else:
            if files and any(f.exists() for f in files):
                raise ValueError(f"data_dir {self.data_dir} has only one of train.jsonl / test.jsonl")
            train_t, test_t = _cached_splits(**self.gen_kwargs)
            train, test = list(train_t), list(test_t)
            if files:
                try:
                    write_jsonl(files[0], train)
                    write_jsonl(files[1], test)
                except OSError as e:
                    warnings.warn(f"could not write the splits to {self.data_dir}: {e}", stacklevel=3)
        self._train, self._test = train, test

    @property
    def train(self) -> list[Problem]:
        self._load()
        return self._train  # type: ignore[return-value]

    @property
    def test(self) -> list[Problem]:
        self._load()
        return self._test  # type: ignore[return-value]

    # -- prompts -------------------------------------------------------------------------------

    def uses_chat_template(self, tokenizer) -> bool:
        """True when ``template == "chat"`` and ``tokenizer`` has a chat template."""
        return (
            self.template == "chat"
            and tokenizer is not None
            and bool(getattr(tokenizer, "chat_template", None))
        )

    @staticmethod
    def plain_prompt(problem: Problem) -> str:
        """The bundled tiny policy's prompt, exactly: ``"[3,5,7,2]->23\\n"``."""
        return f"[{','.join(map(str, problem.numbers))}]->{problem.target}\n"

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """The chat messages: the system prompt, then ``"Input Sequence: [a, b, c, d]\\nTarget: t"``."""
        user = f"Input Sequence: [{', '.join(map(str, problem.numbers))}]\nTarget: {problem.target}"
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]

    def render_prompt(self, problem: Problem, tokenizer=None) -> str:
        """The prompt text: through ``tokenizer``'s chat template (with the generation prompt) when
        :meth:`uses_chat_template`, else the plain template."""
        if self.uses_chat_template(tokenizer):
            return tokenizer.apply_chat_template(
                self.messages(problem), tokenize=False, add_generation_prompt=True
            )
        return self.plain_prompt(problem)

    # -- grading -------------------------------------------------------------------------------

    def score(self, completion: str, problem: Problem) -> Score:
        """:func:`score` with this env's ``use_all_numbers`` and ``integer_steps``; the prompt is
        never read."""
        return score(
            completion,
            problem.numbers,
            problem.target,
            use_all_numbers=self.use_all_numbers,
            integer_steps=self.integer_steps,
        )

    @staticmethod
    def format_completion(steps: Sequence[Step], expression: str) -> str:
        """``<step>3+5=8</step><step>8*2=16</step><step>16+7=23</step><answer>(3+5)*2+7</answer>``."""
        body = "".join(f"<step>{a}{op}{b}={r}</step>" for a, op, b, r in steps)
        return f"{body}<answer>{expression}</answer>"


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tsd.envs.countdown generate --out DIR [--seed S] [--train N] [--test M] ...``"""
    parser = argparse.ArgumentParser(prog="python -m tsd.envs.countdown", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write DIR/train.jsonl and DIR/test.jsonl")
    gen.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    gen.add_argument("--seed", type=int, default=0, metavar="S", help="dataset seed")
    gen.add_argument(
        "--train", dest="n_train", type=int, default=20000, metavar="N", help="number of train problems"
    )
    gen.add_argument(
        "--test", dest="n_test", type=int, default=820, metavar="M", help="number of test problems"
    )
    gen.add_argument("--count", type=int, default=4, metavar="C", help="integers per problem")
    gen.add_argument("--low", type=int, default=1, metavar="L", help="smallest input integer")
    gen.add_argument("--high", type=int, default=13, metavar="H", help="largest input integer")
    gen.add_argument(
        "--max-target", dest="max_target", type=int, default=100, metavar="T", help="largest target"
    )
    args = parser.parse_args(argv)

    kwargs = {
        k: getattr(args, k) for k in ("seed", "n_train", "n_test", "count", "low", "high", "max_target")
    }
    try:
        train, test = generate_splits(**kwargs)
    except ValueError as e:
        gen.error(str(e))
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    print(f"wrote {len(train)} train problems to {out / 'train.jsonl'}")
    print(f"wrote {len(test)} test problems to {out / 'test.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
