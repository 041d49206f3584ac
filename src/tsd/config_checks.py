"""Checks of a composed config that need no model: unknown keys, and where the policy comes from.

A typo must not be accepted silently. Hydra lets ``+data.batchsize=4`` add a key nobody reads;
the run would then train with the default batch size and say nothing. Two checks close that,
both before any model is loaded:

- **plain nodes** (read by ``train.py`` / ``eval.py`` themselves: ``data``, ``model``, the top
  level, ...) accept the keys their caller lists (:func:`check_known_keys`);
- **``_target_`` nodes** accept the parameters of what they instantiate (:func:`check_target_keys`:
  ``inspect.signature`` of the class or function, recursively, so ``loss.pg_loss`` is checked
  too). A target that takes ``**kwargs`` accepts anything; its own constructor is the check.

:func:`check_policy_source`: ``model.name_or_path`` must name something loadable, found without
loading it or asking the hub (a missing path would otherwise be sent to the hub and retried).

All raise :class:`~tsd.config.ConfigError` naming the field and what is accepted.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig

from tsd.config import ConfigError


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _node(cfg: DictConfig, path: str) -> Any:
    node: Any = cfg
    for part in path.split(".") if path else []:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return node


def check_known_keys(
    cfg: DictConfig, known: Mapping[str, Collection[str]], containers: Collection[str] = ()
) -> None:
    """Every key of the plain node at each path of ``known`` ("" is the top level) is one of the keys
    listed for it; every entry of a ``containers`` node (``callbacks``, ``logger``) is null or a
    node with a ``_target_``."""
    for path, keys in known.items():
        node = _node(cfg, path)
        if not isinstance(node, DictConfig) or node._is_none():
            continue
        unknown = sorted(str(k) for k in node if k not in keys)
        if unknown:
            where = f"under {path}" if path else "at the top level"
            raise ConfigError(
                f"{_join(path, unknown[0])}: unknown key (accepted {where}: {', '.join(sorted(keys))})"
            )
    for path in containers:
        node = _node(cfg, path)
        if not isinstance(node, DictConfig) or node._is_none():
            continue
        for k in node:
            child = node._get_node(k)
            if isinstance(child, DictConfig) and not child._is_none() and "_target_" not in child:
                raise ConfigError(
                    f"{_join(path, k)}: expected null or a node with a _target_, got keys {sorted(child)}"
                )


def _target_object(target: str, field: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as e:  # ImportError, AttributeError, ValueError: all mean "no such target"
        raise ConfigError(f"{field}._target_: cannot import {target!r} ({type(e).__name__}: {e})") from None


def _parameters(obj: Any) -> Mapping[str, inspect.Parameter] | None:
    """The parameters a config may set, or None when ``obj`` takes ``**kwargs`` (or has no signature)."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return params


def check_target_keys(node: Any, path: str = "") -> None:
    """Every key of every ``_target_`` node under ``node`` (Hydra's ``_underscore_`` keys aside) is a
    parameter of its target."""
    if isinstance(node, (DictConfig, ListConfig)) and node._is_none():
        return
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if target:
            params = _parameters(_target_object(str(target), path or "config"))
            if params is not None:
                keys = [str(k) for k in node if not str(k).startswith("_")]
                unknown = sorted(k for k in keys if k not in params)
                if unknown:
                    accepted = [
                        n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL
                    ]
                    raise ConfigError(
                        f"{_join(path, unknown[0])}: unknown key for {target} "
                        f"(accepted: {', '.join(accepted)})"
                    )
        for k in node:
            check_target_keys(node._get_node(k), _join(path, k))
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            check_target_keys(v, f"{path}[{i}]")


def check_policy_source(name_or_path: object, field: str = "model.name_or_path") -> None:
    """``name_or_path`` names something loadable (see :func:`~tsd.models.loading.missing_policy_reason`)."""
    from tsd.models.source import missing_policy_reason

    reason = missing_policy_reason(str(name_or_path))
    if reason is not None:
        raise ConfigError(
            f"{field}: {reason} (accepted: 'tiny', a directory with config.json and safetensors "
            "weights, or a hub id such as Qwen/Qwen2.5-1.5B-Instruct)"
        )
