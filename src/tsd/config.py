"""Config helpers: where the configs live, and instantiation that names the failing field."""

from __future__ import annotations

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


def require(cond: bool, field: str, accepted: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{field}: {value!r} is out of range (accepted: {accepted})")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def apply_threads(n: int | None) -> None:
    """``threads`` in the config: torch's CPU threads for this process."""
    if n is None:
        return
    require(isinstance(n, int) and n >= 1, "threads", "null or an integer >= 1", n)
    import torch

    torch.set_num_threads(n)
