"""Config helpers: where the configs live, and instantiation that names the failing field."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tsd import PACKAGE_DIR

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: a bad command line fails before paying for it


class ConfigError(ValueError):
    """A config value is out of range or malformed; the message names the field."""


def config_dir() -> str:
    """The repository's ``configs/`` (``$TSD_CONFIG_DIR`` overrides)."""
    env = os.environ.get("TSD_CONFIG_DIR")
    if env:
        return str(Path(env).resolve())
    for cand in (PACKAGE_DIR.parents[1] / "configs", Path.cwd() / "configs"):
        if (cand / "train.yaml").exists():
            return str(cand.resolve())
    raise ConfigError("cannot find the configs/ directory: run from the repository or set TSD_CONFIG_DIR")


def build(cfg: DictConfig | None, field: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose errors say which config group failed and why."""
    if cfg is None:
        raise ConfigError(f"{field}: missing")
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if str(cause).startswith((f"{field}.", f"{field}:")):  # already names the field
            raise ConfigError(str(cause)) from cause
        raise ConfigError(f"{field}: {cause}") from cause
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{field}: {e}") from e


#: the accepted ``model.dtype`` names (attributes of ``torch``)
DTYPES = ("float32", "bfloat16", "float16")


def dtype_of(name: str, field: str = "model.dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"{field}: {name!r} is not one of {sorted(DTYPES)}")
    import torch

    return getattr(torch, name)


# ------------------------------------------------------------------ the one way to check an argument
# Every constructor a config instantiates checks its arguments with these: a bad value raises
# ConfigError (a ValueError) naming the field and the accepted range, which ``train.py`` turns
# into one line and exit code 2, before any compute.


def require(cond: bool, field: str, accepted: str, value: Any) -> None:
    """Raise :class:`ConfigError` ``"<field>: <value> is out of range (accepted: <accepted>)"``
    unless ``cond``."""
    if not cond:
        raise ConfigError(f"{field}: {value!r} is out of range (accepted: {accepted})")


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    lo = None if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = None if high is None else f"{'<' if high_open else '<='} {high:g}"
    if lo and hi:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return lo or hi or "any value"


def check_int(value: Any, field: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) in ``[low, high]`` (``None``: unbounded)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    require(ok, field, f"an integer {_bounds(low, high, False, False)}".replace(" any value", ""), value)
    return int(value)


def check_number(
    value: Any,
    field: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite number (not a bool) within the bounds (``None``:
    unbounded; ``*_open``: the bound itself is excluded)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    bounds = _bounds(low, high, low_open, high_open)
    require(ok, field, "a finite number" + ("" if bounds == "any value" else f" {bounds}"), value)
    return float(value)


def check_bool(value: Any, field: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0 or 1)."""
    require(isinstance(value, bool), field, "true or false", value)
    return bool(value)


def check_choice(value: Any, field: str, choices: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``choices``."""
    require(value in choices, field, "one of " + ", ".join(map(repr, choices)), value)
    return value


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def apply_threads(n: int | None) -> None:
    """``threads`` in the config: torch's CPU threads for this process."""
    if n is None:
        return
    require(isinstance(n, int) and n >= 1, "threads", "null or an integer >= 1", n)
    import torch

    torch.set_num_threads(n)
