"""CountdownEnv: the Countdown task behind the :class:`~tsd.envs.base.Env` interface.

The game (DESIGN.md, "Countdown"): ``count`` integers drawn from ``[low, high]`` (4 from [1, 13] by
default) and a target in ``[1, max_target]`` reachable with *all* of them using ``+ - * /`` and
positive-integer intermediate results. A completion writes its reasoning as ``<step>a op b=r</step>``
tags and ends with ONE expression in ``<answer>...</answer>``::

    [3,5,7,2]->23
    <step>3+5=8</step><step>8*2=16</step><step>16+7=23</step><answer>(3+5)*2+7</answer>

Grading: :mod:`tsd.envs.countdown.parser`; splits: :mod:`tsd.envs.countdown.splits`; prompts:
:mod:`tsd.envs.countdown.prompts`. No torch here.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from tsd.config import check_bool, check_choice, check_int, require
from tsd.envs.base import Env, Score
from tsd.envs.countdown import prompts
from tsd.envs.countdown.parser import score
from tsd.envs.countdown.problem import Problem
from tsd.envs.countdown.splits import cached_splits, check_generation_args, read_jsonl, write_jsonl


class CountdownEnv(Env[Problem]):
    """Countdown problems, prompts and grading (DESIGN.md, "Countdown").

    Splits are built lazily on first access of :attr:`train` / :attr:`val` / :attr:`test`: read
    from ``data_dir/{train,test}.jsonl`` when both exist (then the generation arguments are not
    used), else generated from the arguments, cached in memory for the process, and written to
    ``data_dir`` when one is given. :attr:`val` holds ``n_val`` problems drawn *after* the
    training split from the same generator: disjoint from train and test, and never seen by a policy
    trained on the training split (the bundled tiny policy saw all of it), so a choice made on
    :attr:`val` is not made on problems the policy learnt.
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
        n_val: int = 0,
    ):
        """
        Args:
            data_dir: folder with ``train.jsonl`` / ``test.jsonl`` to read (or to write once generated).
            seed: seed of the generated splits.
            n_train: number of generated training problems (>= 0).
            n_test: number of test problems (>= 0), disjoint from train.
            count: integers per problem, in [1, 6].
            low: smallest input integer, in [1, 1000].
            high: largest input integer, in [low, 1000].
            max_target: targets are drawn from [1, max_target].
            template: "plain" (compact ``[3,5,7,2]->23\\n``, for the bundled tiny policy) or "chat"
                (system + user messages through the tokenizer's chat template).
            use_all_numbers: the answer must use every input exactly once (default: at most once).
            integer_steps: every intermediate result must be a positive integer.
            system_prompt: the chat system message (default: :func:`~tsd.envs.countdown.prompts.default_system_prompt`).
            n_val: size of the validation split (:attr:`val`, >= 0; 0: none): the problems the
                generator draws after the ``n_train`` training ones (train itself is unchanged),
                or the first ``n_val`` of ``data_dir/val.jsonl``.
        """
        require(
            data_dir is None or isinstance(data_dir, str | os.PathLike),
            "data_dir",
            "a path or null",
            data_dir,
        )
        check_generation_args(
            seed=seed, n_train=n_train, n_test=n_test, count=count, low=low, high=high, max_target=max_target
        )
        check_int(n_val, "n_val", low=0)
        check_choice(template, "template", self.TEMPLATES)
        check_bool(use_all_numbers, "use_all_numbers")
        check_bool(integer_steps, "integer_steps")
        require(
            system_prompt is None or (isinstance(system_prompt, str) and bool(system_prompt.strip())),
            "system_prompt",
            "a non-empty string or null",
            system_prompt,
        )
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.gen_kwargs = dict(
            seed=seed, n_train=n_train, n_test=n_test, count=count, low=low, high=high, max_target=max_target
        )
        self.n_val = n_val
        self.template = template
        self.use_all_numbers = use_all_numbers
        self.integer_steps = integer_steps
        self.system_prompt = system_prompt or prompts.default_system_prompt(
            use_all_numbers=use_all_numbers, integer_steps=integer_steps
        )
        self._train: list[Problem] | None = None
        self._val: list[Problem] | None = None
        self._test: list[Problem] | None = None

    # -- data ----------------------------------------------------------------------------------

    def _load(self) -> None:
        if self._train is not None and self._val is not None and self._test is not None:
            return
        files = (self.data_dir / "train.jsonl", self.data_dir / "test.jsonl") if self.data_dir else None
        if files and all(f.exists() for f in files):
            train, test = read_jsonl(files[0]), read_jsonl(files[1])
            val = self._read_val() if self.n_val else []
            overlap = {p.key for p in train} & {p.key for p in test}
            if overlap:
                warnings.warn(
                    f"{self.data_dir}: {len(overlap)} of {len(test)} test problems are also in train",
                    stacklevel=3,
                )
        else:
            if files and any(f.exists() for f in files):
                raise ValueError(f"data_dir {self.data_dir} has only one of train.jsonl / test.jsonl")
            # the training split is a prefix of a longer draw: val continues it, train is unchanged
            n_train = self.gen_kwargs["n_train"]
            train_t, test_t = cached_splits(**{**self.gen_kwargs, "n_train": n_train + self.n_val})
            train, test = list(train_t[:n_train]), list(test_t)
            val = [replace(p, id=i) for i, p in enumerate(train_t[n_train:])]
            if files:
                try:
                    write_jsonl(files[0], train)
                    write_jsonl(files[1], test)
                    if val:
                        write_jsonl(self.data_dir / "val.jsonl", val)  # type: ignore[operator]
                except OSError as e:
                    warnings.warn(f"could not write the splits to {self.data_dir}: {e}", stacklevel=3)
        self._train, self._val, self._test = train, val, test

    def _read_val(self) -> list[Problem]:
        """The first ``n_val`` problems of ``data_dir/val.jsonl``; a missing or short file is refused
        naming ``n_val`` (a validation split cannot be drawn after a training split read from a file)."""
        path = self.data_dir / "val.jsonl"  # type: ignore[operator]
        val = read_jsonl(path) if path.exists() else []
        if len(val) < self.n_val:
            raise ValueError(
                f"n_val: {self.n_val} is out of range (accepted: at most the {len(val)} problems of {path})"
            )
        return val[: self.n_val]

    @property
    def train(self) -> list[Problem]:
        self._load()
        return self._train  # type: ignore[return-value]

    @property
    def val(self) -> list[Problem]:
        self._load()
        return self._val  # type: ignore[return-value]

    @property
    def test(self) -> list[Problem]:
        self._load()
        return self._test  # type: ignore[return-value]

    # -- prompts -------------------------------------------------------------------------------

    def uses_chat_template(self, tokenizer: Any) -> bool:
        """True when ``template == "chat"`` and ``tokenizer`` has a chat template."""
        return self.template == "chat" and prompts.has_chat_template(tokenizer)

    plain_prompt = staticmethod(prompts.plain_prompt)
    format_completion = staticmethod(prompts.format_completion)

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """The chat messages: the system prompt, then ``"Input Sequence: [a, b, c, d]\\nTarget: t"``."""
        return prompts.chat_messages(problem, self.system_prompt)

    def render_prompt(self, problem: Problem, tokenizer: Any = None) -> str:
        """The prompt text: through ``tokenizer``'s chat template (with the generation prompt) when
        :meth:`uses_chat_template`, else the plain template."""
        if self.uses_chat_template(tokenizer):
            return tokenizer.apply_chat_template(
                self.messages(problem), tokenize=False, add_generation_prompt=True
            )
        return prompts.plain_prompt(problem)

    # -- grading -------------------------------------------------------------------------------

    def score(self, completion: str, problem: Problem) -> Score:
        """:func:`~tsd.envs.countdown.parser.score` with this env's ``use_all_numbers`` and
        ``integer_steps``; the prompt is never read."""
        return score(
            completion,
            problem.numbers,
            problem.target,
            use_all_numbers=self.use_all_numbers,
            integer_steps=self.integer_steps,
        )

    def describe(self, problem: Problem) -> str:
        return f"{list(problem.numbers)} -> {problem.target}"

    def to_record(self, problem: Problem) -> dict[str, Any]:
        return {"numbers": list(problem.numbers), "target": problem.target}
