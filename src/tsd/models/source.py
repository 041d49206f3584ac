"""Where a policy comes from, decided without loading anything: the bundled tiny policy, a local
directory, or a hub id. Importing this module costs no torch or transformers, so a bad
``model.name_or_path`` is refused in a second (:func:`tsd.config_checks.check_policy_source`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tsd import TINY_POLICY_DIR

#: names that mean the bundled tiny policy
TINY_ALIASES = ("tiny", "tiny_policy")
#: what a hub model id looks like: ``name`` or ``org/name``
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")


def resolve_policy_path(name_or_path: str | Path) -> Path | str:
    """The bundled directory for the tiny aliases, a ``Path`` for an existing local directory, else
    the name unchanged (a hub id, resolved by transformers)."""
    if str(name_or_path) in TINY_ALIASES:
        return TINY_POLICY_DIR
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else str(name_or_path)


def missing_policy_reason(name_or_path: str | Path) -> str | None:
    """Why ``name_or_path`` cannot be a policy, found without loading it or asking the hub; None
    when it may load. Refused: a local path that does not exist (absolute, starting with ``.`` or
    ``~``, or under an existing directory), a file, a directory without ``config.json`` or without
    safetensors weights, a name that is no hub id, and (offline: ``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` set) a hub id that is not in the local cache."""
    name = str(name_or_path)
    path = resolve_policy_path(name)
    if isinstance(path, Path):  # the bundled policy or an existing directory
        if not (path / "config.json").is_file():
            return f"directory {name} holds no model (no config.json)"
        if not any(path.glob("*.safetensors")):
            return f"directory {name} has no safetensors weights (only safetensors are loaded)"
        return None
    local = Path(name).expanduser()
    if local.exists():
        return f"{name} is a file, not a model directory"
    looks_local = (
        local.is_absolute() or name.startswith((".", "~")) or ("/" in name and local.parent.is_dir())
    )
    if looks_local or not _HUB_ID.fullmatch(name):
        return f"{name} does not exist"
    offline = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in offline):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            return f"{name} is neither a local directory nor in the hub cache (offline)"
    return None


#: elements checksummed at a time (their int64 copies: 128 MiB)
CHECKSUM_CHUNK = 1 << 24


class WeightsSource:
    """Where a loaded policy's LM weights are on disk, and checksums of them as loaded, in the
    dtypes an engine may hold them in: a vLLM engine can start from ``path`` instead of a copy
    written to a temporary directory, and knows whether the weights it is given are still those,
    as its dtype sees them (:func:`weights_checksum`). Set by :func:`tsd.models.loading.load_policy`
    as ``policy.source``; copies of the policy carry it."""

    def __init__(self, path: str, checksums: dict[str, str]) -> None:
        self.path, self.checksums = path, checksums

    @classmethod
    def of(cls, path: str | Path, lm, dtypes) -> WeightsSource:
        """Checksums of ``lm``'s weights cast to each of ``dtypes`` (torch dtypes)."""
        return cls(str(path), {str(d): weights_checksum(lm, d) for d in dict.fromkeys(dtypes)})

    def matches(self, lm, dtype=None) -> bool:
        """Whether ``lm``'s weights, cast to ``dtype`` (default: its parameters'), are exactly the
        ones loaded from :attr:`path` cast the same way: what an engine loading ``path`` in that
        dtype would hold (False when no checksum of that dtype was taken)."""
        dtype = dtype or next(lm.parameters()).dtype
        want = self.checksums.get(str(dtype))
        return want is not None and weights_checksum(lm, dtype) == want

    def __repr__(self) -> str:
        return f"WeightsSource({self.path!r}, {sorted(self.checksums)})"


def weights_checksum(module, dtype=None) -> str:
    """An exact checksum of a module's floating tensors cast to ``dtype`` (default: as they are), and
    of its names, shapes and other tensors: per tensor the sum and the sum of squares of its bit
    patterns as integers, on the tensor's own device, a chunk at a time; any optimiser step that
    changes what ``dtype`` holds changes it. Tied tensors count once."""
    import hashlib

    import torch

    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    h = hashlib.sha256()
    seen: set[tuple[int, int]] = set()
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            h.update(f"{name}:{tuple(t.shape)}:{target}".encode())
            if key in seen or t.numel() == 0:
                continue
            seen.add(key)
            flat = t.detach().reshape(-1)  # (n,)
            total = squares = 0
            for start in range(0, flat.numel(), CHECKSUM_CHUNK):  # int64 copies of a chunk at a time
                part = flat[start : start + CHECKSUM_CHUNK].to(target).contiguous()
                bits = part.view(ints[part.element_size()]).long()
                total += int(bits.sum())
                squares += int((bits * bits).sum())
            h.update(f"{total}:{squares}".encode())
    return h.hexdigest()
