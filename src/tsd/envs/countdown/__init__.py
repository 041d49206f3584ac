"""Countdown (DESIGN.md, "Countdown"): one file per job, behind :class:`tsd.envs.base.Env`.

- :mod:`~tsd.envs.countdown.problem`: the records (a problem, a reasoning step);
- :mod:`~tsd.envs.countdown.parser`: grading a completion (bounded parser, exact rationals, rewards);
- :mod:`~tsd.envs.countdown.solver`: one solution, every reachable target, steps as one expression;
- :mod:`~tsd.envs.countdown.splits`: deterministic train / val / test splits and JSONL files;
- :mod:`~tsd.envs.countdown.prompts`: the plain and chat prompts, how a completion is written;
- :mod:`~tsd.envs.countdown.env`: :class:`CountdownEnv`, what a config instantiates;
- :mod:`~tsd.envs.countdown.cli`: ``python -m tsd.envs.countdown generate --out DIR --seed 0``.

Pure Python: nothing here imports torch.
"""

from tsd.envs.base import Score
from tsd.envs.countdown.cli import main
from tsd.envs.countdown.env import CountdownEnv
from tsd.envs.countdown.parser import MAX_COMPLETION_CHARS, dense_reward, score
from tsd.envs.countdown.problem import Problem, Step
from tsd.envs.countdown.solver import reachable_targets, solve, steps_to_expression
from tsd.envs.countdown.splits import generate_splits, read_jsonl, write_jsonl

__all__ = [
    "MAX_COMPLETION_CHARS",
    "CountdownEnv",
    "Problem",
    "Score",
    "Step",
    "dense_reward",
    "generate_splits",
    "main",
    "reachable_targets",
    "read_jsonl",
    "score",
    "solve",
    "steps_to_expression",
    "write_jsonl",
]
