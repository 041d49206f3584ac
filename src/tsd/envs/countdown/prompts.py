"""Countdown's prompts: the plain template the bundled tiny policy reads, the chat messages an
instruct model reads through its tokenizer's chat template, and how a completion is written."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tsd.envs.countdown.problem import Problem, Step


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


def plain_prompt(problem: Problem) -> str:
    """The bundled tiny policy's prompt, exactly: ``"[3,5,7,2]->23\\n"``."""
    return f"[{','.join(map(str, problem.numbers))}]->{problem.target}\n"


def chat_messages(problem: Problem, system_prompt: str) -> list[dict[str, str]]:
    """The chat messages: the system prompt, then ``"Input Sequence: [a, b, c, d]\\nTarget: t"``."""
    user = f"Input Sequence: [{', '.join(map(str, problem.numbers))}]\nTarget: {problem.target}"
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def format_completion(steps: Sequence[Step], expression: str) -> str:
    """``<step>3+5=8</step><step>8*2=16</step><step>16+7=23</step><answer>(3+5)*2+7</answer>``."""
    body = "".join(f"<step>{a}{op}{b}={r}</step>" for a, op, b, r in steps)
    return f"{body}<answer>{expression}</answer>"
