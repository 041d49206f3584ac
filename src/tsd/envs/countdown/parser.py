"""Grading a Countdown completion: answer extraction, a bounded parser, exact evaluation, rewards.

Model output is hostile input: the answer is parsed by a small hand-written recursive-descent parser
(never ``eval``), evaluated exactly with :class:`fractions.Fraction`, and bounded in length (200
characters), parenthesis depth (20) and magnitude (``10**30``); :func:`score` never raises.

Rewards (only the completion is read, never the prompt):

- dense (training): ``1 - 2*min(|t - p| / t, 1)`` when the answer is a well-formed expression over the
  inputs with value ``p``, else ``-1``;
- sparse (evaluation): ``Score.correct``, i.e. ``p == t`` exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

from tsd.envs.base import Score

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


def _invalid(reason: str) -> Score:
    return Score(dense=-1.0, correct=False, value=None, reason=reason)


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
