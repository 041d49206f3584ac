"""Countdown env: every scoring rule by hand, hostile strings by hypothesis, the splits against an
independent brute-force solver, the CLI, prompts and the solver's round trip.

    python -m pytest tests/test_countdown.py -q
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import subprocess
import sys
import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsd.envs.countdown import (
    CountdownEnv,
    Problem,
    Score,
    generate_splits,
    reachable_targets,
    read_jsonl,
    score,
    solve,
    steps_to_expression,
    write_jsonl,
)
from tsd.envs.countdown import parser as cd

NUMS, TARGET = (3, 5, 7, 2), 23


def ans(expr: str) -> str:
    return f"<answer>{expr}</answer>"


# ----------------------------------------------------------------------------------------------
# an independent brute-force solver: combine any two numbers of the pool (the module splits the
# multiset into sub-multisets instead), positive-integer results only


@functools.cache
def brute_values(pool: tuple[int, ...]) -> frozenset[int]:
    if len(pool) == 1:
        return frozenset(pool)
    out: set[int] = set()
    for i in range(len(pool)):
        for j in range(i + 1, len(pool)):
            a, b = pool[i], pool[j]
            rest = pool[:i] + pool[i + 1 : j] + pool[j + 1 :]
            for r in (a + b, a * b, abs(a - b), a // b if a % b == 0 else 0, b // a if b % a == 0 else 0):
                if r > 0:
                    out |= brute_values(tuple(sorted((*rest, r))))
    return frozenset(out)


def brute_solvable(numbers, target) -> bool:
    return target in brute_values(tuple(sorted(numbers)))


# ----------------------------------------------------------------------------------------------
# score: valid answers and the dense formula


def test_example_is_correct():
    s = score(ans("(3+5)*2+7"), NUMS, TARGET)
    assert s == Score(dense=1.0, correct=True, value=Fraction(23), reason=None)
    assert s.valid and type(s.dense) is float and type(s.correct) is bool


@pytest.mark.parametrize(
    "expr, value, dense",
    [
        ("5*3+7", 22, 1 - 2 / 23),  # |23-22|/23 = 1/23
        ("3+5", 8, 1 - 30 / 23),  # 15/23 -> -7/23
        ("7*5+3*2", 41, 1 - 36 / 23),  # 18/23 -> -13/23
        ("7*5+3+2", 40, 1 - 34 / 23),  # 17/23
        ("7*5*2", 70, -1.0),  # relative error 47/23 is clipped at 1
        ("5-3-2", 0, -1.0),  # relative error exactly 1
        ("2-7", -5, -1.0),  # negative values are valid without integer_steps
        ("7/2", Fraction(7, 2), 1 - 2 * (39 / 2) / 23),
    ],
)
def test_dense_reward_hand_computed(expr, value, dense):
    s = score(ans(expr), NUMS, TARGET)
    assert s.valid and s.value == value and not s.correct
    assert s.dense == pytest.approx(dense, abs=1e-12)


def test_exact_rationals():
    # 13/(1-1/4) = 52/3; relative error (1/3)/17 = 1/51
    s = score(ans("13/(1-1/4)"), [13, 1, 1, 4], 17)
    assert s.valid and s.value == Fraction(52, 3) and not s.correct
    assert s.dense == pytest.approx(1 - 2 / 51)
    # 6/(1-3/4) = 24 exactly through a non-integer intermediate
    assert score(ans("6/(1-3/4)"), [6, 1, 3, 4], 24).correct
    assert score(ans("8/(3-8/3)"), [8, 3, 8, 3], 24).correct
    # 1/3*3 is exactly 1, not 0.999...
    assert score(ans("1/3*3"), [1, 3, 3], 1).correct


@pytest.mark.parametrize(
    "expr, value",
    [
        ("2+3*4", 14),
        ("2*3+4*5", 26),
        ("(2+3)*4", 20),
        ("8-3-2", 3),  # left-associative
        ("8-(3-2)", 7),
        ("8/4/2", 1),
        ("8/(4/2)", 4),
        ("12/3*2", 8),
        ("12/(3*2)", 2),
        ("((((2))))+((3))", 5),
        ("2 + 3\t*\n4 ", 14),  # ASCII whitespace anywhere between tokens
    ],
)
def test_precedence_and_associativity(expr, value):
    numbers = [int(x) for x in re.findall(r"\d+", expr)]
    assert score(ans(expr), numbers, value).correct


def test_last_answer_wins_and_only_the_completion_is_read():
    both = ans("3+5") + " hmm, no: " + ans("(3+5)*2+7")
    assert score(both, NUMS, TARGET).correct
    reversed_ = ans("(3+5)*2+7") + ans("3+5")
    assert not score(reversed_, NUMS, TARGET).correct
    # the chat system prompt contains the example answer for this very problem; the env must not
    # find it (the public code parses the prompt's answer when the completion has none)
    env = CountdownEnv(template="chat")
    assert "<answer>(3+5)*2+7</answer>" in env.system_prompt
    for completion in ("", "<step>3+5=8</step>", env.render_prompt(Problem(NUMS, TARGET))):
        s = env.score(completion, Problem(NUMS, TARGET))
        assert s.reason == "no <answer> tag" and s.dense == -1.0


@pytest.mark.parametrize(
    "completion", ["", "(3+5)*2+7", "<answer>(3+5)*2+7", "(3+5)*2+7</answer>", "<Answer>23</Answer>"]
)
def test_no_answer_tag(completion):
    assert score(completion, NUMS, TARGET) == Score(-1.0, False, None, "no <answer> tag")


def test_answer_extraction_matches_the_regex_rule():
    # non-greedy and non-overlapping, as re.findall(r"<answer>(.*?)</answer>", c, re.S)[-1]
    c = "<answer>9<answer>3+5</answer>"  # the first open tag swallows the second
    assert cd._last_answer(c) == "9<answer>3+5"
    assert not score(c, NUMS, TARGET).valid
    assert cd._last_answer("<answer>\n3+5\n</answer>") == "\n3+5\n"


@given(
    st.lists(st.sampled_from(["<answer>", "</answer>", "<", ">", "a", "/", "answer", "\n", "3"]), max_size=30)
)
@settings(max_examples=200)
def test_linear_answer_scan_equals_regex(parts):
    text = "".join(parts)
    found = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    assert cd._last_answer(text) == (found[-1] if found else None)


# ----------------------------------------------------------------------------------------------
# score: invalid answers, one rule at a time


def invalid_reason(expr: str, numbers=(3, 5, 7, 2, 0), target: int = 23, **kw) -> str:
    s = score(ans(expr), numbers, target, **kw)
    assert not s.valid and s.dense == -1.0 and not s.correct and s.value is None
    return s.reason


@pytest.mark.parametrize(
    "expr, reason",
    [
        ("07+5", "leading zero"),
        ("00", "leading zero"),
        ("3+05", "leading zero"),
        ("-3+5", "unary '-'"),
        ("+3+5", "unary '+'"),
        ("3*-5", "unary '-'"),
        ("3--5", "unary '-'"),
        ("3**2", "'**'"),
        ("3* *2", "expected a number"),
        ("3.0+5", "unexpected character '.'"),
        ("3.+5", "unexpected character '.'"),
        (".5", "unexpected character '.'"),
        ("1e1", "unexpected character 'e'"),
        ("0x3", "unexpected character 'x'"),
        ("\u0663+5", "U+0663"),  # ARABIC-INDIC DIGIT THREE
        ("\uff13+5", "U+FF13"),  # FULLWIDTH DIGIT THREE
        ("3\u00b2", "U+00B2"),  # superscript two
        ("3\u00a0+5", "U+00A0"),  # no-break space is not ASCII whitespace
        ("3+5=8", "unexpected character '='"),
        ("3\u22125", "U+2212"),  # unicode minus sign
        ("3 5", "two numbers in a row"),
        ("", "empty answer"),
        ("   ", "empty answer"),
        ("()", "expected a number"),
        ("3+", "ends early"),
        ("(3)(5)", "after a complete expression"),
        ("(3+5", "unbalanced"),
        ("3+5)", "unbalanced"),
        (")3(", "unbalanced"),
        ("3+3", "number 3 used twice"),
        ("3+3+3", "number 3 used 3 times"),
        ("9+5", "number 9 is not in the input"),
        ("23", "number 23 is not in the input"),
        ("7/(5-3-2)", "division by zero"),
        ("7/0", "division by zero"),
        ("2/(0*7)", "division by zero"),
    ],
)
def test_invalid_answers(expr, reason):
    assert reason in invalid_reason(expr)


def test_number_use_is_a_multiset():
    assert score(ans("3+3"), [3, 3, 5], 6).correct
    assert invalid_reason("3+3+3", numbers=[3, 3, 5], target=9) == "number 3 used 3 times but given 2 times"
    assert score(ans("5"), [3, 5], 5).correct  # a subset is fine by default
    assert score(ans("0+5"), [0, 5], 5).correct  # "0" itself is a literal


def test_length_bound():
    ok = "(3+5)*2+7".ljust(200)  # whitespace counts towards the 200 characters
    assert score(ans(ok), NUMS, TARGET).correct
    assert "longer than 200" in invalid_reason(ok + " ")


def test_depth_bound():
    deep20 = "(" * 20 + "3" + ")" * 20
    assert score(ans(deep20), [3], 3).correct
    assert "deeper than 20" in invalid_reason("(" * 21 + "3" + ")" * 21)
    # depth, not the count of parentheses
    many = "+".join(f"(({n}))" for n in NUMS)
    assert score(ans(many), NUMS, 17).correct


def test_magnitude_bound():
    big = 10**20
    assert score(ans(f"{big}*{big // 10**10}"), [big, big // 10**10], 10**30).correct
    assert "too large" in invalid_reason(f"{big}*{big}", numbers=[big, big])
    assert "too large" in invalid_reason(f"1/{big}/{big}", numbers=[1, big, big])
    assert "too large" in invalid_reason(str(10**31), numbers=[10**31])


def test_integer_steps():
    assert score(ans("7/2"), [7, 2], 3).valid
    assert "not a positive integer" in invalid_reason("7/2", numbers=[7, 2], integer_steps=True)
    assert "not a positive integer" in invalid_reason("2-7", numbers=[7, 2], integer_steps=True)
    assert "not a positive integer" in invalid_reason("(5-5)+7", numbers=[5, 5, 7], integer_steps=True)
    # the final value counts as an intermediate too; 6/(1-3/4) = 24 has a non-integer step
    assert "not a positive integer" in invalid_reason("6/(1-3/4)", numbers=[6, 1, 3, 4], integer_steps=True)
    assert score(ans("(3+5)*2+7"), NUMS, TARGET, integer_steps=True).correct
    assert score(ans("8/2*7"), [8, 2, 7], 28, integer_steps=True).correct


def test_use_all_numbers():
    assert score(ans("(3+5)*2+7"), NUMS, TARGET, use_all_numbers=True).correct
    assert score(ans("3*7+2"), NUMS, TARGET).correct
    assert invalid_reason("3*7+2", numbers=NUMS, use_all_numbers=True) == "not all numbers used (missing 5)"
    assert "used twice" in invalid_reason("3*7+2+3", numbers=NUMS, use_all_numbers=True)


def test_env_knobs_reach_score():
    p = Problem((7, 2), 3)
    assert CountdownEnv().score(ans("7/2"), p).valid
    assert not CountdownEnv(integer_steps=True).score(ans("7/2"), p).valid
    assert not CountdownEnv(use_all_numbers=True).score(ans("7"), p).valid


def test_hostile_long_inputs_are_fast():
    cases = [
        "<answer>" * 12_000,  # quadratic for the regex; linear here
        "<answer>" + "(" * 99_000 + "</answer>",
        ans("1+" * 99 + "1"),
        "x" * (cd.MAX_COMPLETION_CHARS - len(ans("(3+5)*2+7"))) + ans("(3+5)*2+7"),
    ]
    for c in cases:
        t0 = time.perf_counter()
        s = score(c, NUMS, TARGET)
        assert time.perf_counter() - t0 < 0.5
        assert -1.0 <= s.dense <= 1.0
    assert score(cases[-1], NUMS, TARGET).correct
    too_long = "x" * cd.MAX_COMPLETION_CHARS + ans("(3+5)*2+7")
    assert "completion longer than" in score(too_long, NUMS, TARGET).reason


def test_normal_score_is_well_under_a_millisecond():
    c = "<step>3+5=8</step><step>8*2=16</step><step>16+7=23</step>" + ans("(3+5)*2+7")
    t0 = time.perf_counter()
    for _ in range(200):
        score(c, NUMS, TARGET)
    assert (time.perf_counter() - t0) / 200 < 1e-3


def test_non_string_completion_is_invalid():
    assert not score(None, NUMS, TARGET).valid  # type: ignore[arg-type]
    assert not score(b"<answer>3</answer>", NUMS, TARGET).valid  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# score: properties on hostile and on generated input

EXPR_CHARS = "0123456789+-*/() \t\n.<>answer٣\u00a0"


def check_score_invariants(s: Score, target: int) -> None:
    assert isinstance(s, Score)
    assert type(s.dense) is float and -1.0 <= s.dense <= 1.0
    assert s.valid == (s.reason is None) == (s.value is not None)
    if s.reason is not None:
        assert s.dense == -1.0 and s.correct is False
        assert not s.reason.startswith("internal error"), s.reason  # production hides bugs; tests don't
    else:
        t = Fraction(target)
        assert s.dense == pytest.approx(float(1 - 2 * min(abs(t - s.value) / t, 1)))
        assert s.correct == (s.value == t)
        if s.correct:
            assert s.dense == 1.0


@given(st.text(max_size=400), st.lists(st.integers(0, 20), max_size=6), st.integers(1, 200))
@settings(max_examples=150, deadline=None)
def test_score_never_raises_on_any_text(text, numbers, target):
    for c in (text, ans(text)):
        t0 = time.perf_counter()
        s = score(c, numbers, target)
        assert time.perf_counter() - t0 < 0.5
        check_score_invariants(s, target)


@given(
    st.text(alphabet=EXPR_CHARS, max_size=250),
    st.lists(st.integers(0, 9), min_size=1, max_size=8),
    st.integers(1, 100),
    st.booleans(),
    st.booleans(),
)
@settings(max_examples=250, deadline=None)
def test_score_never_raises_on_expression_like_text(text, numbers, target, use_all, int_steps):
    s = score(ans(text), numbers, target, use_all_numbers=use_all, integer_steps=int_steps)
    check_score_invariants(s, target)


PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


@st.composite
def expression_trees(draw, depth=0):
    """(text, value or None on division by zero, literals), rendered with full or minimal parentheses
    and random whitespace; the value is computed from the tree, not by any parser."""
    if depth >= 4 or draw(st.integers(0, 2)) == 0:
        n = draw(st.integers(0, 13))
        return str(n), 3, Fraction(n), [n]
    op = draw(st.sampled_from("+-*/"))
    lt, lp, lv, ll = draw(expression_trees(depth=depth + 1))
    rt, rp, rv, rl = draw(expression_trees(depth=depth + 1))
    if lv is None or rv is None or (op == "/" and rv == 0):
        value = None
    else:
        value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
    full = draw(st.booleans())
    if full or lp < PREC[op]:
        lt = f"({lt})"
    if full or rp < PREC[op] or (rp == PREC[op] and op in "-/"):
        rt = f"({rt})"
    ws = draw(st.sampled_from(["", " ", "\n", "\t "]))
    return f"{lt}{ws}{op}{ws}{rt}", PREC[op], value, ll + rl


def sympy_value(text: str) -> Fraction | None:
    """``text`` evaluated by sympy (exact rationals; ``None`` when it divides by zero anywhere), the
    independent oracle of the hand-written parser. sympy's parser runs ``eval`` on its input, so it
    only ever sees the expressions these tests generate, never model output (which tsd never hands
    to sympy or ``eval``)."""
    pytest.importorskip("sympy")
    from sympy import preorder_traversal
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations

    # in parentheses: the generated whitespace includes newlines, which Python reads inside brackets;
    # unevaluated, so that a division by zero is seen where it is (sympy's 0/(1/0) is 0: 0/zoo)
    tree = parse_expr(f"({text})", transformations=standard_transformations, evaluate=False)
    if any(s.is_Pow and s.exp == -1 and s.base.doit() == 0 for s in preorder_traversal(tree)):
        return None
    v = tree.doit()
    assert v.is_Rational, (text, v)
    return Fraction(int(v.p), int(v.q))


@given(expression_trees(), st.integers(1, 100))
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_parser_agrees_with_tree_arithmetic_and_with_sympy(tree, target):
    text, _, value, literals = tree
    assert sympy_value(text) == value  # the generator's own arithmetic, checked by sympy
    s = score(ans(text), literals, target, use_all_numbers=True)
    if len(text) > 200:
        assert not s.valid
    elif value is None:
        assert s.reason == "division by zero"
    else:
        assert s.valid and s.value == value
        assert isinstance(s.value, Fraction) and s.correct == (s.value == target)
    check_score_invariants(s, target)


@given(st.text(alphabet="0123456789+-*/() ", min_size=1, max_size=40), st.integers(1, 100))
@settings(max_examples=400, deadline=None)
def test_every_expression_the_parser_accepts_has_sympys_exact_value(text, target):
    """Random strings over the grammar's own characters: most are malformed, and whatever the parser
    accepts must mean to sympy exactly what it means to the parser (same rational, and a division by
    zero exactly where sympy finds no finite value)."""
    literals = [int(x) for x in re.findall(r"[0-9]+", text)]
    s = score(ans(text), literals, target)
    check_score_invariants(s, target)
    if s.valid or s.reason == "division by zero":
        assert sympy_value(text) == s.value, (text, s)


@pytest.mark.parametrize(
    "text,value",
    [
        ("1/3+1/6", Fraction(1, 2)),
        ("2*(3-7)/6", Fraction(-4, 3)),
        ("12/3/2", 2),
        ("10-3-2", 5),
        ("1/(1-1)", None),
    ],
)
def test_sympy_oracle_by_hand(text, value):
    """The oracle itself, on values worked out by hand (so a broken oracle cannot pass the above)."""
    assert sympy_value(text) == value
    s = score(ans(text), [int(x) for x in re.findall(r"[0-9]+", text)], 1)
    assert s.value == value and (s.reason == "division by zero") == (value is None)


# ----------------------------------------------------------------------------------------------
# solve, steps_to_expression, format_completion


def test_format_completion_exact():
    steps = [(3, "+", 5, 8), (8, "*", 2, 16), (16, "+", 7, 23)]
    expr = steps_to_expression(NUMS, steps)
    assert expr == "(3+5)*2+7"
    assert CountdownEnv.format_completion(steps, expr) == (
        "<step>3+5=8</step><step>8*2=16</step><step>16+7=23</step><answer>(3+5)*2+7</answer>"
    )


@pytest.mark.parametrize(
    "numbers, steps, expr",
    [
        ([8, 3, 2], [(3, "-", 2, 1), (8, "-", 1, 7)], "8-(3-2)"),
        ([8, 3, 2], [(8, "-", 3, 5), (5, "-", 2, 3)], "8-3-2"),
        ([8, 3, 2], [(3, "+", 2, 5), (8, "+", 5, 13)], "8+3+2"),
        ([8, 4, 2], [(4, "/", 2, 2), (8, "/", 2, 4)], "8/(4/2)"),
        ([8, 4, 2], [(4, "*", 2, 8), (8, "/", 8, 1)], "8/(4*2)"),
        ([8, 4, 2], [(4, "/", 2, 2), (8, "*", 2, 16)], "8*4/2"),
        ([8, 4, 2], [(8, "+", 4, 12), (12, "/", 2, 6)], "(8+4)/2"),
    ],
)
def test_steps_to_expression_parentheses(numbers, steps, expr):
    assert steps_to_expression(numbers, steps) == expr
    assert score(ans(expr), numbers, steps[-1][3], use_all_numbers=True).correct


@pytest.mark.parametrize(
    "steps, match",
    [
        ([(3, "+", 5, 9), (9, "*", 2, 18), (18, "+", 7, 25)], "not 9"),
        ([(3, "+", 3, 6)], "not available"),
        ([(3, "+", 5, 8)], "leave 3 values"),
        ([(3, "%", 5, 3)], "unknown operator"),
    ],
)
def test_steps_to_expression_rejects_bad_steps(steps, match):
    with pytest.raises(ValueError, match=match):
        steps_to_expression(NUMS, steps)


def test_solve_examples():
    steps = solve(NUMS, TARGET)
    assert steps is not None and len(steps) == 3 and steps[-1][3] == TARGET
    assert solve([1, 1, 1, 1], 100) is None
    assert solve([], 3) is None
    # 24 from [3, 3, 8, 8] needs 8/(3-8/3): rationals only
    assert solve([3, 3, 8, 8], 24) is None
    steps = solve([3, 3, 8, 8], 24, integer_steps=False)
    assert steps is not None
    expr = steps_to_expression([3, 3, 8, 8], steps)
    assert score(ans(expr), [3, 3, 8, 8], 24, use_all_numbers=True).correct
    assert not score(ans(expr), [3, 3, 8, 8], 24, integer_steps=True).valid


@pytest.mark.parametrize("numbers", [(1, 1, 1, 1), (2, 3, 5, 13), (13, 13, 12, 1)])
def test_solve_agrees_with_reachable_targets(numbers):
    reachable = reachable_targets(numbers)
    for t in range(1, 101):
        steps = solve(numbers, t)
        assert (steps is not None) == (t in reachable) == brute_solvable(numbers, t)


def test_reachable_targets_matches_brute_force_on_every_default_multiset():
    for ms in itertools.combinations_with_replacement(range(1, 14), 4):
        assert reachable_targets(ms) == set(brute_values(ms)), ms
    assert reachable_targets([7]) == {7}
    assert reachable_targets([]) == set()
    assert reachable_targets([2, 3]) == {5, 6, 1}


# ----------------------------------------------------------------------------------------------
# dataset generation


@pytest.fixture(scope="module")
def small():
    return generate_splits(seed=1, n_train=2000, n_test=200)


@pytest.fixture(scope="session")
def default_splits():
    t0 = time.perf_counter()
    train, test = generate_splits()
    return train, test, time.perf_counter() - t0


def keys(problems):
    return [p.key for p in problems]


def test_small_split_properties(small):
    train, test = small
    assert len(train) == 2000 and len(test) == 200
    for split in (train, test):
        assert [p.id for p in split] == list(range(len(split)))
        assert len(set(keys(split))) == len(split)  # no duplicates within a split
        for p in split:
            assert isinstance(p.numbers, tuple) and len(p.numbers) == 4
            assert all(type(n) is int and 1 <= n <= 13 for n in p.numbers)
            assert type(p.target) is int and 1 <= p.target <= 100
            assert brute_solvable(p.numbers, p.target), p
    assert not set(keys(train)) & set(keys(test))
    # targets are spread over the range, numbers over theirs
    assert len({p.target for p in train}) > 90
    assert {n for p in train for n in p.numbers} == set(range(1, 14))


def test_splits_are_deterministic(small):
    train, test = small
    assert generate_splits(seed=1, n_train=2000, n_test=200) == (train, test)
    other_train, other_test = generate_splits(seed=2, n_train=2000, n_test=200)
    assert other_test != test and other_train != train
    # test is drawn first, so it does not depend on n_train
    assert generate_splits(seed=1, n_train=10, n_test=200)[1] == test


def test_split_knobs():
    train, test = generate_splits(seed=3, n_train=300, n_test=30, count=3, low=2, high=9, max_target=50)
    for p in train + test:
        assert len(p.numbers) == 3 and all(2 <= n <= 9 for n in p.numbers) and 1 <= p.target <= 50
        assert brute_solvable(p.numbers, p.target)
    assert generate_splits(seed=0, n_train=0, n_test=0) == ([], [])


def test_too_small_problem_space_is_an_error():
    with pytest.raises(ValueError, match="distinct problems"):
        generate_splits(count=1, low=1, high=3, n_train=5, n_test=0)


def test_default_split(default_splits):
    train, test, seconds = default_splits
    assert len(train) == 20000 and len(test) == 820
    assert len(set(keys(train))) == 20000 and len(set(keys(test))) == 820
    assert not set(keys(train)) & set(keys(test))
    assert all(brute_solvable(p.numbers, p.target) for p in test)
    assert seconds < 10, f"generating the default split took {seconds:.1f}s"
    # pinned: a change here silently changes every experiment's data
    assert test[:2] == [Problem((7, 13, 7, 1), 37, 0), Problem((9, 8, 7, 13), 24, 1)]
    assert train[0] == Problem((11, 8, 4, 7), 59, 0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_train": -1}, "n_train"),
        ({"n_test": 1.5}, "n_test"),
        ({"count": 0}, "count"),
        ({"count": 7}, "count"),
        ({"low": 0}, "low"),
        ({"high": 1001}, "high"),
        ({"low": 5, "high": 4}, r"high: 4 is out of range \(accepted: an integer >= low \(5\)\)"),
        ({"max_target": 0}, "max_target"),
        ({"seed": "0"}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_generation_arguments_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        generate_splits(**kwargs)
    with pytest.raises(ValueError, match=field):
        CountdownEnv(**kwargs)


# ----------------------------------------------------------------------------------------------
# files and CLI


def test_jsonl_round_trip(tmp_path, small):
    _, test = small
    write_jsonl(tmp_path / "d" / "test.jsonl", test)
    lines = (tmp_path / "d" / "test.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"numbers": list(test[0].numbers), "target": test[0].target}
    assert read_jsonl(tmp_path / "d" / "test.jsonl") == test
    assert list((tmp_path / "d").iterdir()) == [tmp_path / "d" / "test.jsonl"]  # no temp files left


@pytest.mark.parametrize(
    "line, match",
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected an object"),
        ('{"numbers": [1, 2]}', "'target'"),
        ('{"numbers": [], "target": 3}', "'numbers'"),
        ('{"numbers": [1, true], "target": 3}', "'numbers'"),
        ('{"numbers": [1, 2.5], "target": 3}', "'numbers'"),
        ('{"numbers": [1, 2], "target": "3"}', "'target'"),
    ],
)
def test_read_jsonl_validates(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"numbers": [1, 2], "target": 3}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{re.escape(match)}"):
        read_jsonl(path)


def test_read_jsonl_ids_and_extra_keys(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"numbers": [1, 2], "target": 3, "id": 99}\n\n{"numbers": [4], "target": 4}\n')
    assert read_jsonl(path) == [Problem((1, 2), 3, 0), Problem((4,), 4, 1)]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tsd.envs.countdown", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_generate(tmp_path):
    out = tmp_path / "data"
    proc = run_cli("generate", "--out", str(out), "--seed", "3", "--train", "50", "--test", "10")
    assert proc.returncode == 0, proc.stderr
    assert "50 train" in proc.stdout and "10 test" in proc.stdout
    train, test = generate_splits(seed=3, n_train=50, n_test=10)
    assert read_jsonl(out / "train.jsonl") == train
    assert read_jsonl(out / "test.jsonl") == test


@pytest.mark.parametrize(
    "args, message",
    [(["--count", "0"], "count"), (["--train", "x"], "--train"), (["--low", "9", "--high", "3"], "high")],
)
def test_cli_bad_values(tmp_path, args, message):
    proc = run_cli("generate", "--out", str(tmp_path), *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "train.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# the env


def test_env_is_lazy_and_cached():
    env = CountdownEnv(seed=5, n_train=30, n_test=10)
    assert env._train is None  # nothing built at construction
    assert (env.train, env.test) == generate_splits(seed=5, n_train=30, n_test=10)
    again = CountdownEnv(seed=5, n_train=30, n_test=10)
    assert again.train == env.train and again.train is not env.train  # shared cache, own lists


def test_env_data_dir_writes_then_reads(tmp_path):
    env = CountdownEnv(data_dir=str(tmp_path), seed=4, n_train=20, n_test=5)
    assert len(env.train) == 20
    assert read_jsonl(tmp_path / "train.jsonl") == env.train
    # files win over the generation arguments
    custom = [Problem((1, 2, 3, 4), 10, 0)]
    write_jsonl(tmp_path / "test.jsonl", custom)
    env2 = CountdownEnv(data_dir=tmp_path, seed=99)
    assert env2.test == custom and env2.train == env.train
    (tmp_path / "train.jsonl").unlink()
    with pytest.raises(ValueError, match="only one of"):
        CountdownEnv(data_dir=tmp_path).train  # noqa: B018


def test_validation_split_is_drawn_after_train_and_leaves_train_unchanged(tmp_path):
    full = CountdownEnv(seed=5, n_train=30, n_test=10)
    assert full.val == [] and len(full.train) == 30  # n_val = 0: nothing changes
    env = CountdownEnv(seed=5, n_train=30, n_test=10, n_val=4)
    assert env.train == full.train and env.test == full.test  # train is not cut: val comes after it
    longer = CountdownEnv(seed=5, n_train=34, n_test=10)
    assert [(p.numbers, p.target) for p in env.val] == [(p.numbers, p.target) for p in longer.train[30:]]
    assert [p.id for p in env.val] == [0, 1, 2, 3]  # their index in the validation split
    keys = {
        "train": {p.key for p in env.train},
        "val": {p.key for p in env.val},
        "test": {p.key for p in env.test},
    }
    assert (
        not keys["train"] & keys["val"]
        and not keys["val"] & keys["test"]
        and not keys["train"] & keys["test"]
    )
    again = CountdownEnv(seed=5, n_train=30, n_test=10, n_val=4)
    assert again.val == env.val and again.train == env.train  # deterministic from the seed
    # with files: train, test and val are written; reading gives them back
    written = CountdownEnv(data_dir=tmp_path, seed=5, n_train=30, n_test=10, n_val=4)
    assert written.val == env.val and len(read_jsonl(tmp_path / "train.jsonl")) == 30
    assert read_jsonl(tmp_path / "val.jsonl") == env.val
    read = CountdownEnv(data_dir=tmp_path, n_val=3)
    assert read.val == env.val[:3] and read.train == env.train
    with pytest.raises(ValueError, match=r"n_val: 5 is out of range \(accepted: at most the 4 problems"):
        CountdownEnv(data_dir=tmp_path, n_val=5).train  # noqa: B018
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="n_val"):
            CountdownEnv(seed=5, n_train=30, n_test=10, n_val=bad)


def test_env_warns_on_overlapping_files(tmp_path):
    p = [Problem((1, 2, 3, 4), 10, 0)]
    write_jsonl(tmp_path / "train.jsonl", p)
    write_jsonl(tmp_path / "test.jsonl", p)
    with pytest.warns(UserWarning, match="1 of 1 test problems are also in train"):
        CountdownEnv(data_dir=tmp_path).test  # noqa: B018


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"template": "qwen"}, "template"),
        ({"use_all_numbers": 1}, "use_all_numbers"),
        ({"integer_steps": "yes"}, "integer_steps"),
        ({"system_prompt": ""}, "system_prompt"),
        ({"data_dir": 3}, "data_dir"),
    ],
)
def test_env_arguments_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CountdownEnv(**kwargs)


def test_plain_prompt_exact():
    env = CountdownEnv()
    assert env.render_prompt(Problem((3, 5, 7, 2), 23)) == "[3,5,7,2]->23\n"
    assert env.render_prompt(Problem((13, 1, 10, 4), 100), tokenizer=object()) == "[13,1,10,4]->100\n"


class FakeChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"


def test_chat_prompt_messages():
    env = CountdownEnv(template="chat")
    text = env.render_prompt(Problem((3, 5, 7, 2), 23), FakeChatTokenizer())
    system, user, _ = text.split("|")
    assert system.startswith("system:") and "<step>" in system and "<answer>" in system
    assert "ONE arithmetic expression" in system and "at most once" in system
    assert user == "user:Input Sequence: [3, 5, 7, 2]\nTarget: 23"
    assert env.uses_chat_template(FakeChatTokenizer())
    # no chat template, or the plain template: the plain prompt
    assert not env.uses_chat_template(None)
    assert env.render_prompt(Problem((3, 5, 7, 2), 23), object()) == "[3,5,7,2]->23\n"
    assert not CountdownEnv().uses_chat_template(FakeChatTokenizer())
    assert CountdownEnv().render_prompt(Problem((3, 5, 7, 2), 23), FakeChatTokenizer()) == "[3,5,7,2]->23\n"
    # knobs change the default system prompt; a given one is used verbatim
    strict = CountdownEnv(template="chat", use_all_numbers=True, integer_steps=True).system_prompt
    assert "exactly once" in strict and "positive integer" in strict
    assert (
        CountdownEnv(template="chat", system_prompt="Play.").messages(Problem((1,), 1))[0]["content"]
        == "Play."
    )


def test_chat_prompt_through_a_real_transformers_tokenizer():
    from tsd.models.char_tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    env = CountdownEnv(template="chat")
    assert not env.uses_chat_template(tok)  # the bundled tokenizer has no chat template: plain
    assert env.render_prompt(Problem((3, 5, 7, 2), 23), tok) == "[3,5,7,2]->23\n"
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    text = env.render_prompt(Problem((3, 5, 7, 2), 23), tok)
    assert text.startswith("<|im_start|>system\nYou are playing Countdown.")
    assert text.endswith(
        "<|im_start|>user\nInput Sequence: [3, 5, 7, 2]\nTarget: 23<|im_end|>\n<|im_start|>assistant\n"
    )


def test_solutions_round_trip_through_the_env(small):
    _, test = small
    env = CountdownEnv(use_all_numbers=True, integer_steps=True)
    for p in test:
        steps = solve(p.numbers, p.target)
        assert steps is not None, p
        assert all(r > 0 and type(r) is int for *_, r in steps)
        expr = steps_to_expression(p.numbers, steps)
        s = env.score(env.format_completion(steps, expr), p)
        assert s.correct and s.dense == 1.0, (p, steps, expr, s.reason)


def test_module_does_not_import_torch():
    code = "import sys, tsd.envs.countdown; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@given(
    st.one_of(st.text(alphabet=EXPR_CHARS, max_size=120), expression_trees().map(lambda t: t[0])),
    st.lists(st.integers(0, 13), min_size=1, max_size=6),
    st.integers(1, 100),
    st.integers(1, 100),
    st.booleans(),
    st.booleans(),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_validity_never_reads_the_target(text, numbers, t1, t2, use_all, int_steps):
    """Whether an answer is well-formed (grammar, numbers, bounds, integer steps) is the same for any
    target: the search harness that must not know the answers (``search.graded: false``,
    :class:`tsd.eval.search_harness.TargetBlindEnv`) values reached answers by validity alone."""
    kw = {"use_all_numbers": use_all, "integer_steps": int_steps}
    a, b = score(ans(text), numbers, t1, **kw), score(ans(text), numbers, t2, **kw)
    assert (a.valid, a.reason, a.value) == (b.valid, b.reason, b.value)
