"""Policy + value head: any transformers causal LM with an MLP-then-tanh value head.

The value head reads the final hidden state (after the LM's last norm). ``V(s_t)`` for the state
that *precedes* token ``a_t`` is read at the position whose logits predict ``a_t``, so training
(``A_t = r - sg(V_old(s_t))``) and search (the value of a leaf = the head at the leaf's last
token) use the very same head at the very same place.

Saved as a transformers directory (``save_pretrained``) with the value head in a subfolder,
``value_head/model.safetensors`` + ``value_head/config.json``: the top level holds only the LM's
files, because vLLM (and other loaders) read every ``*.safetensors`` at the top of a model
directory and fail on a tensor the LM does not have. Loaded only through safetensors; the older
layout (``value_head.safetensors`` + ``value_head.json`` at the top) is still read.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

# transformers >= 5.2x renamed the KV-cache argument; older releases (and vLLM's pins) use the old name
_CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(__import__("transformers").Qwen2Model.forward).parameters
    else "past_key_values"
)

#: the value head's folder inside a saved policy, and its two files
VALUE_HEAD_DIR = "value_head"
VALUE_HEAD_FILE = f"{VALUE_HEAD_DIR}/model.safetensors"
VALUE_HEAD_CONFIG = f"{VALUE_HEAD_DIR}/config.json"
#: the layout before the subfolder (read, never written: vLLM would load it as an LM weight)
LEGACY_VALUE_HEAD_FILES = ("value_head.safetensors", "value_head.json")


class ValueHead(nn.Module):
    """``V(s) = tanh(W2 gelu(W1 h + b1) + b2)`` on the final hidden state ``h``."""

    def __init__(self, hidden_size: int, mlp_size: int | None = None) -> None:
        super().__init__()
        mlp_size = mlp_size or hidden_size
        self.fc1 = nn.Linear(hidden_size, mlp_size)
        self.fc2 = nn.Linear(mlp_size, 1)
        # start near V=0 so early advantages are ~ the raw reward
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (...)
        h = self.fc1(hidden.float())
        return torch.tanh(self.fc2(F.gelu(h))).squeeze(-1)


class PolicyValueModel(nn.Module):
    """A causal LM plus a value head; ``forward`` returns fp32 logits, values and the KV cache."""

    def __init__(self, lm: PreTrainedModel, value_head: ValueHead | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = value_head or ValueHead(lm.config.hidden_size)

    @property
    def config(self):
        return self.lm.config

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T[+past])
        position_ids: torch.Tensor | None = None,  # (B, T)
        past_key_values=None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        detach_value_input: bool = False,
    ):
        """``detach_value_input``: the value loss trains the head only, not the shared trunk."""
        kwargs = {_CACHE_KWARG: past_key_values} if past_key_values is not None else {}
        out = self.lm.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state  # (B, T, H), after the final norm
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm.lm_head(hidden).float()  # (B, T, V) fp32 for log-probs
        values = self.value_head(hidden.detach() if detach_value_input else hidden)  # (B, T)
        return logits, values, getattr(out, _CACHE_KWARG, None)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(path, safe_serialization=True)
        for name in LEGACY_VALUE_HEAD_FILES:  # an older export being overwritten
            (path / name).unlink(missing_ok=True)
        (path / VALUE_HEAD_DIR).mkdir(exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()}
        save_file(state, str(path / VALUE_HEAD_FILE))
        (path / VALUE_HEAD_CONFIG).write_text(
            json.dumps(
                {"hidden_size": self.value_head.fc1.in_features, "mlp_size": self.value_head.fc1.out_features}
            )
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> PolicyValueModel:
        """Load the LM (safetensors only) and the value head if the directory has one (in
        ``value_head/`` or, older exports, at the top)."""
        path = Path(path)
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        weights, head_cfg = path / VALUE_HEAD_FILE, path / VALUE_HEAD_CONFIG
        if not head_cfg.exists():
            weights, head_cfg = (path / name for name in LEGACY_VALUE_HEAD_FILES)
        if head_cfg.exists():
            cfg = json.loads(head_cfg.read_text())
            head = ValueHead(int(cfg["hidden_size"]), int(cfg["mlp_size"]))
            head.load_state_dict(load_file(str(weights)))
        else:
            head = ValueHead(lm.config.hidden_size)
        return cls(lm, head).to(device)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    banned_ids: list[int] | None = None,
) -> torch.Tensor:
    """Log-prob of each target under ``softmax(logits / temperature)`` in fp32.

    ``logits`` (B, T, V) at the positions that predict ``targets`` (B, T); returns (B, T).
    ``banned_ids`` (pad, BOS) are masked out first, exactly as the sampler does, so that the
    trainer's pi_theta and the recorded pi_behaviour are the same distribution.
    """
    logits = logits.float() / temperature  # (B, T, V)
    if banned_ids:
        logits = logits.index_fill(-1, torch.tensor(banned_ids, device=logits.device), float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
