"""Countdown's splits: generated deterministically from a seed (test first, train disjoint from it
by ``(sorted numbers, target)``; a validation split is what the same generator draws after
train: :class:`~tsd.envs.countdown.env.CountdownEnv`), and JSONL files.

    python -m tsd.envs.countdown generate --out data/countdown --seed 0
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tsd.config import check_int, require
from tsd.envs.countdown.problem import Problem
from tsd.envs.countdown.solver import reachable_sorted

#: the generation knobs and their accepted ranges (inclusive); also used by the env and the CLI
INT_RANGES: dict[str, tuple[int, int | None]] = {
    "seed": (-(2**63), 2**63 - 1),
    "n_train": (0, None),
    "n_test": (0, None),
    "count": (1, 6),
    "low": (1, 1000),
    "high": (1, 1000),
    "max_target": (1, None),
}


def check_generation_args(**kwargs: object) -> None:
    """Each generation knob is an integer in its range (:data:`INT_RANGES`), and ``high >= low``."""
    for name, value in kwargs.items():
        check_int(value, name, *INT_RANGES[name])
    require(kwargs["high"] >= kwargs["low"], "high", f"an integer >= low ({kwargs['low']})", kwargs["high"])  # type: ignore[operator]


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
    check_generation_args(
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
                targets = targets_of[ms] = sorted(t for t in reachable_sorted(ms) if 1 <= t <= max_target)
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


_CACHE: dict[tuple[int, ...], tuple[tuple[Problem, ...], tuple[Problem, ...]]] = {}


def cached_splits(**kwargs: int) -> tuple[tuple[Problem, ...], tuple[Problem, ...]]:
    """:func:`generate_splits`, built once per process for each set of arguments (splits are pure
    functions of them)."""
    key = tuple(kwargs[k] for k in sorted(kwargs))
    if key not in _CACHE:
        train, test = generate_splits(**kwargs)
        _CACHE[key] = (tuple(train), tuple(test))
    return _CACHE[key]
