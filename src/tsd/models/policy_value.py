"""Policy + value head: any decoder-only transformers causal LM with an MLP-then-tanh value head.

The LM is taken apart the way transformers itself defines it, never by an attribute path that only
some classes have: the *decoder* is ``lm.base_model`` (``base_model_prefix``: ``model`` for
Llama/Qwen2, ``transformer`` for GPT-2, ``gpt_neox`` for GPT-NeoX), whose ``last_hidden_state`` is
the final hidden state (after the last norm), and the *head* is ``lm.get_output_embeddings()``
(tied to the input embeddings or not). So one forward gives the hidden state the value head reads
and the logits, and the KV cache is the decoder's own.

Logits are computed in float32, as ScaleRL does ("computed in float32", Khatri et al. 2025, the
LM-head precision fix; the seed article follows it): the final hidden state and the head weight are
upcast before the product, ``logits = h.float() @ W.float().T (+ b)``, outside any autocast. With
fp32 weights this is exactly ``lm_head(h)``; with bf16 weights it removes the head's own rounding
(the trunk's stays). Costs one fp32 copy of ``W`` per forward (V x H x 4 bytes: 0.93 GB for
Qwen2.5-1.5B), freed after the product. Final-logit transforms that the config declares are applied
after the product, as the models' own forwards do: ``final_logit_softcapping`` (Gemma 2/3:
``c * tanh(z / c)``), ``logit_scale`` (Cohere: ``z * s``), ``logits_scaling`` (Granite: ``z / s``).
:func:`check_causal_lm` verifies on a probe, at load time, that this reproduces the model's own
logits and that the model is causal; anything else (an encoder such as BERT, an undeclared head
transform) is refused there with one line.

The trainer reads neither: :meth:`PolicyValueModel.score` gives the log-prob of each next token
and its ``V(s_t)`` directly, with the target log-probs computed chunk by chunk without the (B, T, V)
logits when asked (:func:`lm_target_logprobs`, :mod:`tsd.models.logprobs`); under FSDP2 it is a
registered forward method.

``V(s_t)`` for the state that *precedes* token ``a_t`` is read at the position whose logits predict
``a_t``, so training (``A_t = r - sg(V_old(s_t))``) and search (the value of a leaf = the head at
the leaf's last token) use the very same head at the very same place.

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
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, PreTrainedModel

from tsd.models.logprobs import LogitTransform, chunked_token_logprobs, token_logprobs

#: the value head's folder inside a saved policy, and its two files
VALUE_HEAD_DIR = "value_head"
VALUE_HEAD_FILE = f"{VALUE_HEAD_DIR}/model.safetensors"
VALUE_HEAD_CONFIG = f"{VALUE_HEAD_DIR}/config.json"
#: the layout before the subfolder (read, never written: vLLM would load it as an LM weight)
LEGACY_VALUE_HEAD_FILES = ("value_head.safetensors", "value_head.json")


class UnsupportedModelError(ValueError):
    """The model is not a decoder-only causal LM whose logits tsd can reproduce."""


class ValueHead(nn.Module):
    """``V(s) = tanh(W2 gelu(W1 h + b1) + b2)`` on the final hidden state ``h``, in float32.

    Args:
        hidden_size: width of the final hidden state (the LM head's input width).
        mlp_size: width of the MLP's hidden layer (default: ``hidden_size``).
    """

    def __init__(self, hidden_size: int, mlp_size: int | None = None) -> None:
        super().__init__()
        mlp_size = mlp_size or hidden_size
        self.fc1 = nn.Linear(hidden_size, mlp_size)
        self.fc2 = nn.Linear(mlp_size, 1)
        # start near V=0 so early advantages are ~ the raw reward
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (...)
        # fp32 whatever the parameters' dtype (a policy cast whole to bf16 keeps working) and
        # whatever autocast is on outside (it would lower these F.linear to bf16): the trainer
        # computes V as the generators' fp32 copy does
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h = F.linear(hidden.float(), self.fc1.weight.float(), self.fc1.bias.float())  # (..., M)
            v = F.linear(F.gelu(h), self.fc2.weight.float(), self.fc2.bias.float())  # (..., 1)
        return torch.tanh(v).squeeze(-1)


def decoder_of(lm: PreTrainedModel) -> nn.Module:
    """The decoder stack of a causal LM (``lm.base_model``), whose output's ``last_hidden_state`` is
    what the LM head reads. Raises :class:`UnsupportedModelError` for an encoder-decoder model or a
    model without a separate base model."""
    cfg = lm.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{type(lm).__name__} is an encoder-decoder model ({cfg.model_type})")
    base = lm.base_model
    if base is lm:
        raise UnsupportedModelError(
            f"{type(lm).__name__} has no base model (base_model_prefix={lm.base_model_prefix!r}); "
            "tsd reads the final hidden state from the base model's last_hidden_state"
        )
    return base


def output_head(lm: PreTrainedModel) -> nn.Linear:
    """The LM head (``get_output_embeddings()``; a ``weight`` of shape (V, H) and maybe a bias).
    Typed as ``nn.Linear``: that is what is checked here (a 2-d ``weight``, and the ``bias`` that
    callers read with ``getattr``), whatever its class."""
    head = lm.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise UnsupportedModelError(f"{type(lm).__name__} has no linear output embedding (LM head)")
    return cast(nn.Linear, head)


def head_params(lm: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's ``weight`` (V, H) and its ``bias`` (V,) or None (:func:`output_head` checks them)."""
    head = output_head(lm)
    weight, bias = head.weight, getattr(head, "bias", None)
    assert isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))
    return weight, bias


def _cache_kwarg(module: nn.Module) -> str:
    """The KV-cache argument of ``module.forward``: transformers >= 5.2x renamed ``past_key_values``
    to ``cache``; older releases (and vLLM's pins) use the old name."""
    return "cache" if "cache" in _forward_params(type(module)) else "past_key_values"


_FORWARD_PARAMS: dict[Any, frozenset[str]] = {}


def _forward_params(cls: Any) -> frozenset[str]:
    """The parameter names of ``cls.forward`` (read once per class: every decode step asks)."""
    params = _FORWARD_PARAMS.get(cls)
    if params is None:
        params = _FORWARD_PARAMS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return params


def final_hidden(
    lm: PreTrainedModel,
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor | None = None,  # (B, T[+past])
    position_ids: torch.Tensor | None = None,  # (B, T)
    past_key_values=None,
    use_cache: bool = False,
):
    """``(hidden (B, T, H), cache)``: the decoder's final hidden state (after its last norm) and
    its KV cache (``None`` unless ``use_cache``)."""
    decoder = decoder_of(lm)
    params = _forward_params(type(decoder))
    cache_kw = _cache_kwarg(decoder)
    kwargs: dict = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
    if position_ids is not None and "position_ids" in params:
        kwargs["position_ids"] = position_ids  # models without it (ALiBi) derive positions from the mask
    if past_key_values is not None:
        kwargs[cache_kw] = past_key_values
    out = decoder(**kwargs)
    cache = out.get(cache_kw) if use_cache else None  # the output names it as the argument
    return out.last_hidden_state, cache


def fp32_logits(lm: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (..., V) in float32 from the final hidden state (..., H): the head's product with both
    operands upcast, outside autocast, then the final-logit transform the config declares."""
    weight, bias = head_params(lm)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = F.linear(
            hidden.float(), weight.float(), None if bias is None else bias.float()
        )  # (..., V) fp32
        # Cohere's logit_scale, Granite's logits_scaling, Gemma's final_logit_softcapping
        logits = LogitTransform.of(lm.config)(logits)
    return logits


def lm_target_logprobs(
    lm: PreTrainedModel,
    hidden: torch.Tensor,  # (B, T, H)
    targets: torch.Tensor,  # (B, T)
    temperature: float = 1.0,
    banned_ids: list[int] | None = None,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """``log pi(targets)`` (B, T) fp32 from the final hidden state at the positions that predict
    them: the fp32 head's logits (:func:`fp32_logits`), temperature, banned ids, log-softmax.
    ``chunk_tokens`` > 0 computes it chunk by chunk without the (B, T, V) logits, exactly
    (:func:`~tsd.models.logprobs.chunked_token_logprobs`); 0 is the plain path."""
    if chunk_tokens <= 0:
        return token_logprobs(fp32_logits(lm, hidden), targets, temperature, banned_ids)  # (B, T)
    weight, bias = head_params(lm)
    return chunked_token_logprobs(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        banned_ids,
        LogitTransform.of(lm.config),
        chunk_tokens,
    )  # (B, T)


def lm_logits(
    lm: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 logits (B, T, V) of a bare causal LM (the frozen reference policy of the KL term),
    computed exactly as :class:`PolicyValueModel` computes the policy's."""
    hidden, _ = final_hidden(lm, input_ids, attention_mask)  # (B, T, H)
    return fp32_logits(lm, hidden)


def check_causal_lm(lm: PreTrainedModel, probe_len: int = 8) -> None:
    """Refuse, with one line (:class:`UnsupportedModelError`), a model tsd would get wrong.

    On a probe of ``probe_len`` tokens (no gradients, eval mode): (1) the model is causal: changing
    the last token leaves the logits of every earlier position unchanged (an encoder such as BERT
    attends both ways); (2) :func:`fp32_logits` of :func:`final_hidden` reproduces the model's own
    logits, up to the rounding of the head in the weights' dtype (``8 * eps(dtype) * max|z|``),
    so an undeclared head transform is caught. Costs four short forwards."""
    decoder_of(lm)
    output_head(lm)
    was_training = lm.training
    lm.eval()
    try:
        head_weight = head_params(lm)[0]  # (V, H)
        vocab, dev = head_weight.shape[0], head_weight.device
        ids = (torch.arange(probe_len, device=dev) * 7 + 3) % vocab  # (T,)
        ids = ids[None]  # (1, T)
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % vocab
        with torch.no_grad():
            ours = lm_logits(lm, ids)  # (1, T, V)
            ours_changed = lm_logits(lm, changed)  # (1, T, V)
            own = lm(input_ids=ids).logits.float()  # (1, T, V)
        name = type(lm).__name__
        leak = (ours[:, :-1] - ours_changed[:, :-1]).abs().max().item()
        if leak > 0:
            raise UnsupportedModelError(
                f"{name} is not causal: changing the last token changed the logits of earlier positions "
                f"by {leak:.3g} (it attends both ways, as an encoder does)"
            )
        eps = torch.finfo(head_weight.dtype).eps
        tol = 1e-4 + 8 * eps * own.abs().max().item()
        err = (ours - own).abs().max().item()
        if not err <= tol:
            raise UnsupportedModelError(
                f"{name}'s own logits are not its output embedding applied to its base model's final "
                f"hidden state (max difference {err:.3g} > {tol:.3g}): its head has a transform tsd does not "
                "reproduce (supported: final_logit_softcapping, logit_scale, logits_scaling)"
            )
    finally:
        lm.train(was_training)


class PolicyValueModel(nn.Module):
    """A causal LM plus a value head; ``forward`` returns fp32 logits, values and the KV cache.

    Args:
        lm: any decoder-only transformers causal LM (checked at load time by :func:`check_causal_lm`).
        value_head: the value head (default: a fresh one as wide as the LM head's input).
    """

    #: where the LM's weights were loaded from, with their checksum (:class:`tsd.models.source.WeightsSource`,
    #: set by ``load_policy``; None: built in memory): a vLLM engine starts from that directory
    source: Any = None

    def __init__(self, lm: PreTrainedModel, value_head: ValueHead | None = None) -> None:
        super().__init__()
        decoder_of(lm)  # structural checks, cheap; the behavioural ones are check_causal_lm's
        self.lm = lm
        self.value_head = value_head or ValueHead(head_params(lm)[0].shape[1])

    @property
    def config(self):
        return self.lm.config

    def transformer_blocks(self) -> list[nn.Module]:
        """The decoder's repeated blocks (``GPT2Block``, ``LlamaDecoderLayer``, ...): the modules
        whose class transformers lists in ``_no_split_modules``; the units FSDP shards one by one."""
        names = set(getattr(self.lm, "_no_split_modules", None) or ())
        blocks: list[nn.Module] = []
        for m in decoder_of(self.lm).modules():
            if isinstance(m, nn.ModuleList) and len(m) and all(type(b).__name__ in names for b in m):
                blocks.extend(m)
        return blocks

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
        """``(logits (B, T', V) fp32, values (B, T'), cache)``; ``T' = logits_to_keep or T``.
        ``detach_value_input``: the value loss trains the head only, not the shared trunk."""
        hidden, cache = final_hidden(
            self.lm, input_ids, attention_mask, position_ids, past_key_values, use_cache
        )  # (B, T, H), after the final norm
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]  # (B, T', H)
        logits = fp32_logits(self.lm, hidden)  # (B, T', V) fp32 for log-probs
        values = self.value_head(hidden.detach() if detach_value_input else hidden)  # (B, T')
        return logits, values, cache

    def score(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor | None = None,  # (B, L)
        temperature: float = 1.0,
        banned_ids: list[int] | None = None,
        chunk_tokens: int = 0,
        detach_value_input: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logp (B, T), values (B, T))``, ``T = L - 1``: the log-prob of each next token
        ``input_ids[:, t + 1]`` under the sampler's distribution (temperature, banned ids), and
        ``V(s_t)`` at the position that predicts it (what training reads), without the (B, L, V)
        logits when ``chunk_tokens`` > 0 (:func:`lm_target_logprobs`). Under FSDP2 this is a
        registered forward method (the shards are gathered around it as around ``forward``)."""
        hidden, _ = final_hidden(self.lm, input_ids, attention_mask)  # (B, L, H)
        hidden = hidden[:, :-1]  # (B, T, H): position t predicts token t + 1
        logp = lm_target_logprobs(
            self.lm, hidden, input_ids[:, 1:], temperature, banned_ids, chunk_tokens
        )  # (B, T) fp32
        values = self.value_head(hidden.detach() if detach_value_input else hidden)  # (B, T)
        return logp, values

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
        ``value_head/`` or, older exports, at the top); refuse a model that is not a decoder-only
        causal LM (:func:`check_causal_lm`)."""
        path = Path(path)
        config = AutoConfig.from_pretrained(str(path))
        if getattr(config, "is_encoder_decoder", False):  # BART would load as its decoder alone
            raise UnsupportedModelError(
                f"{config.model_type} is an encoder-decoder model (only its decoder would load)"
            )
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise UnsupportedModelError(
                f"transformers has no causal-LM class for model_type {config.model_type!r}"
            )
        lm = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype, use_safetensors=True)
        lm = lm.to(device)  # type: ignore[arg-type]  # transformers types its wrapped .to as taking the model
        check_causal_lm(lm)
        weights, head_cfg = path / VALUE_HEAD_FILE, path / VALUE_HEAD_CONFIG
        if not head_cfg.exists():
            weights, head_cfg = (path / name for name in LEGACY_VALUE_HEAD_FILES)
        if head_cfg.exists():
            cfg = json.loads(head_cfg.read_text())
            head = ValueHead(int(cfg["hidden_size"]), int(cfg["mlp_size"]))
            head.load_state_dict(load_file(str(weights)))
        else:
            head = ValueHead(head_params(lm)[0].shape[1])
        return cls(lm, head).to(device)
