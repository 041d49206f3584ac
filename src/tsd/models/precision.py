"""Precision: which dtype each copy of the policy holds, decided in one place by ``model.dtype``.

``model.dtype`` is the *compute* dtype. The trained weights and AdamW's state are always fp32 (the
*master* weights): at the article's learning rate (5e-6) most AdamW updates are smaller than
bf16's spacing near the weights' values, so bf16 parameters would round most of them away
(measured: 1.6% of the tiny policy's entries moved in 3 steps with bf16 parameters, every one
with fp32 masters; ``docs/paper_scale.md``). What runs in the compute dtype:

============================  ================================================================
copy                          dtypes
============================  ================================================================
trained policy (one process)  fp32 parameters; the LM's forward under ``torch.autocast(compute)``
                              (:meth:`Precision.autocast`, around the module's forward passes)
trained policy (FSDP2)        fp32 shards; ``MixedPrecisionPolicy(param_dtype=compute,
                              reduce_dtype=float32)`` for the LM's units, fp32 for the value
                              head's own unit (:meth:`Precision.fsdp_policies`)
value head, everywhere        fp32 parameters and fp32 compute (autocast off inside it)
LM head product, everywhere   fp32 (``fp32_logits`` / the chunked log-probs upcast the head)
reference policy (KL term)    frozen; computes as the trained policy does, so that the KL is
                              exactly 0 at step 0: one process: fp32 weights under the same
                              autocast (:meth:`Precision.reference`); FSDP2: the compute dtype,
                              as the shards are gathered (:meth:`Precision.cast_`)
generators, evaluation,       the compute dtype for the LM, fp32 for the value head
weight sync, export           (:meth:`Precision.compute_`, :meth:`Precision.compute_copy`,
                              :meth:`Precision.compute_state`)
checkpoint (``last.ckpt``)    the fp32 masters (and the reference)
============================  ================================================================

With ``model.dtype: float32`` (the laptop default) every copy is fp32 and nothing is cast or
autocast: behaviour is the one before this file existed. The module holds the run's
:class:`Precision` (``PolicyValueModule.precision``); ``train.py`` builds it from ``model.dtype``
and loads the policy in :attr:`Precision.master`; everything else asks the module's.

``float16`` compute has no loss scaler here: its gradients may underflow (bf16 needs none).
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch
from torch import nn

from tsd.config import dtype_of, require

M = TypeVar("M", bound=nn.Module)

#: the dtype of the trained weights and of the optimiser's state
MASTER_DTYPE = torch.float32
#: the parameters of the policy that stay fp32 whatever the compute dtype (a state-dict prefix)
FP32_PREFIXES = ("value_head.",)


def _cast_parameters_(module: nn.Module, dtype: torch.dtype) -> None:
    """Parameters only: buffers keep their dtype (rotary ``inv_freq`` stays fp32, as transformers
    loads it in any dtype)."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


class Precision:
    """The run's compute dtype (``model.dtype``) over fp32 master weights.

    (A plain class, not a dataclass: Hydra's ``instantiate`` would turn a dataclass passed to a
    constructor into a config node.)
    """

    __slots__ = ("compute",)

    def __init__(self, compute: torch.dtype = torch.float32) -> None:
        """
        Args:
            compute: the dtype the LM computes in (float32, bfloat16 or float16).
        """
        require(
            compute in (torch.float32, torch.bfloat16, torch.float16),
            "model.dtype",
            "one of float32, bfloat16, float16",
            compute,
        )
        self.compute = compute

    def __repr__(self) -> str:
        return f"Precision(compute={self.compute}, master={MASTER_DTYPE})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Precision) and other.compute == self.compute

    def __hash__(self) -> int:
        return hash(self.compute)

    @classmethod
    def named(cls, name: str, field: str = "model.dtype") -> Precision:
        """``Precision.named("bfloat16")``: from a config's dtype name."""
        return cls(dtype_of(name, field))

    @property
    def master(self) -> torch.dtype:
        return MASTER_DTYPE

    @property
    def mixed(self) -> bool:
        """True when the compute dtype is not the masters' (something is cast or autocast)."""
        return self.compute != MASTER_DTYPE

    def dtype_of(self, name: str) -> torch.dtype:
        """The compute-side dtype of the floating state-dict entry ``name`` of a policy."""
        return MASTER_DTYPE if name.startswith(FP32_PREFIXES) else self.compute

    # ------------------------------------------------------------------ the trained copy
    def masters_(self, policy: M) -> M:
        """``policy`` with every parameter in fp32, in place (the copy the optimiser trains)."""
        _cast_parameters_(policy, MASTER_DTYPE)
        return policy

    def autocast(self, device_type: str) -> AbstractContextManager[Any]:
        """Around the trained policy's forward passes: autocast to the compute dtype (a no-op
        context for fp32). The LM head's product and the value head turn it off inside."""
        return torch.autocast(device_type=device_type, dtype=self.compute, enabled=self.mixed)

    def fsdp_policies(self) -> tuple[Any, Any]:
        """``(lm, value_head)`` FSDP2 ``MixedPrecisionPolicy`` s: the LM's units gather their fp32
        shards as the compute dtype and reduce gradients in fp32; the value head's unit stays fp32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        fp32 = MixedPrecisionPolicy(param_dtype=MASTER_DTYPE, reduce_dtype=MASTER_DTYPE)
        if not self.mixed:
            return fp32, fp32
        return MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=MASTER_DTYPE), fp32

    # ------------------------------------------------------------------ the compute copies
    def cast_(self, lm: M) -> M:
        """A bare LM's parameters cast in place to the compute dtype (its config says so too: what
        ``save_pretrained`` records, as a load in this dtype does)."""
        _cast_parameters_(lm, self.compute)
        config = getattr(lm, "config", None)
        if config is not None:
            config.dtype = self.compute
        return lm

    def compute_(self, policy: M) -> M:
        """A :class:`~tsd.models.policy_value.PolicyValueModel` cast in place to its compute
        dtypes: the LM in the compute dtype, the value head in fp32."""
        lm, head = policy.lm, policy.value_head
        assert isinstance(lm, nn.Module) and isinstance(head, nn.Module)
        self.cast_(lm)
        _cast_parameters_(head, MASTER_DTYPE)
        return policy

    def compute_copy(self, policy: M) -> M:
        """A frozen copy of ``policy`` in its compute dtypes (generator copy, weight-sync shadow,
        evaluation and export)."""
        return self.compute_(copy.deepcopy(policy)).eval().requires_grad_(False)

    def compute_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A policy's ``state_dict`` in its compute dtypes (what a weight sync sends). Entries that
        share a tensor (tied embeddings) still share one after the cast, as they do in a policy
        cast by :meth:`compute_` (the weight sync sends such a tensor once, and its layout must be
        the generators')."""
        out: dict[str, torch.Tensor] = {}
        cast: dict[tuple[int, int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
        for k, v in state.items():
            if not v.is_floating_point():
                out[k] = v
                continue
            dtype = self.dtype_of(k)
            key = (v.untyped_storage().data_ptr(), int(v.storage_offset()), tuple(v.shape), dtype)
            if key not in cast or not v.numel():
                cast[key] = v.to(dtype)
            out[k] = cast[key]
        return out

    def reference(self, lm: M) -> M:
        """The frozen reference policy of the KL term: a copy of the trained ``lm`` (fp32), which
        the module runs under the same autocast as the policy, so that at step 0 their log-probs
        are equal exactly (a bf16 copy would differ from autocast over fp32 weights by 0.03 nats
        per token on the tiny policy). Under FSDP2 the strategy casts it to the compute dtype
        (:meth:`cast_`), the dtype the policy's shards are gathered in: equal again, and half the
        memory."""
        ref = copy.deepcopy(lm).eval().requires_grad_(False)
        _cast_parameters_(ref, MASTER_DTYPE)
        return ref
