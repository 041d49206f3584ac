"""Load a policy (causal LM + value head) and its tokenizer by name or path.

``load_policy("tiny")`` loads the bundled tiny policy (``tsd.TINY_POLICY_DIR``, built by
``scripts/build_tiny_policy.py``) with its character tokenizer; any other local path or hub name
(``load_policy("Qwen/Qwen2.5-1.5B-Instruct", dtype=torch.bfloat16)``) loads with ``AutoTokenizer``
and :meth:`PolicyValueModel.from_pretrained` (safetensors only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tsd import TINY_POLICY_DIR
from tsd.config import ConfigError
from tsd.config_checks import check_policy_source
from tsd.models.char_tokenizer import CHAR_TOKENIZER_MARKER, load_char_tokenizer
from tsd.models.policy_value import PolicyValueModel, UnsupportedModelError
from tsd.models.source import TINY_ALIASES, WeightsSource, resolve_policy_path  # noqa: F401  (re-exported)


def is_char_tokenizer_dir(path: Path | str) -> bool:
    """True for the bundled directory or any directory whose ``tokenizer_config.json`` carries the
    char-tokenizer marker."""
    if not isinstance(path, Path) or not path.is_dir():
        return False
    if path.resolve() == TINY_POLICY_DIR.resolve():
        return True
    cfg = path / "tokenizer_config.json"
    if not cfg.exists():
        return False
    try:
        return bool(json.loads(cfg.read_text()).get(CHAR_TOKENIZER_MARKER, False))
    except (OSError, ValueError):
        return False


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer of a policy: the char tokenizer for the tiny policy (never ``AutoTokenizer``,
    which next to a Qwen2 ``config.json`` picks Qwen's class and drops spaces), else
    ``AutoTokenizer`` (with ``pad = eos`` when the tokenizer has no pad token)."""
    path = resolve_policy_path(name_or_path)
    if is_char_tokenizer_dir(path):
        return load_char_tokenizer(path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def saved_dtype(path: Path | str) -> torch.dtype | None:
    """The dtype a model directory's ``config.json`` says its weights are saved in (None: unknown)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        return None
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved.removeprefix("torch."), None)
    return saved if isinstance(saved, torch.dtype) else None


def load_policy(
    name_or_path: str | Path = "tiny",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """``(PolicyValueModel, tokenizer)`` for ``name_or_path`` (``"tiny"``, a directory or a hub id),
    in eval mode. A directory without a saved value head (``value_head/``) gets a fresh one. A model
    that is not a decoder-only causal LM (BERT, T5, ...) raises :class:`~tsd.config.ConfigError`
    naming ``model.name_or_path``, before any training. A local path that does not exist (or holds
    no model) is refused the same way before transformers is asked, so it never becomes a hub
    request (``outputs/run/policy`` with a typo: transformers would retry the hub for a minute)."""
    path = resolve_policy_path(name_or_path)
    if path == TINY_POLICY_DIR and not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the bundled tiny policy is missing from {path}; "
            "build it with `python scripts/build_tiny_policy.py`"
        )
    check_policy_source(name_or_path)  # what the entry points check first, here for Python callers
    tokenizer = load_tokenizer(path)
    try:
        model = PolicyValueModel.from_pretrained(path, dtype=dtype, device=device)
    except UnsupportedModelError as e:  # an encoder, an encoder-decoder, a head tsd can't reproduce
        raise ConfigError(
            f"model.name_or_path: {str(name_or_path)!r} is refused: {e} (accepted: a decoder-only causal LM)"
        ) from None
    # where its weights are on disk: a vLLM engine starts from there instead of a written copy, in
    # the dtype it was loaded in or the checkpoint's own (the paper's: bf16 on disk, fp32 masters)
    dtypes = [dtype, *([saved] if (saved := saved_dtype(path)) is not None else [])]
    model.source = WeightsSource.of(path, model.lm, dtypes)
    return model.eval(), tokenizer
