"""Log-probs of the target tokens, with or without the full (N, V) logits.

The trainer needs ``log pi(a_t | s_t)`` of one token per position, under the sampler's
distribution: fp32 logits ``z = h W^T (+ b)`` from the final hidden state ``h`` and the LM head
``W``, the head's final-logit transform (:class:`LogitTransform`), divided by the temperature, with
the banned ids (pad, BOS) at ``-inf``, then ``log softmax(z)[a_t]``. Done plainly
(:func:`token_logprobs` on the full logits) that is several (B, T, V) fp32 tensors: at Qwen2.5-1.5B's
151,936-token vocabulary, 4 sequences of 660 tokens make one such tensor 1.49 GiB, and a training
step held five of them (``benchmarks/bench_memory.py``).

:func:`chunked_token_logprobs` computes the same quantity without ever holding more than one chunk
of ``chunk`` tokens' logits: per chunk, the fp32 logits, the transform, temperature and banned ids,
the target's logit and the chunk's ``logsumexp``; only ``lse`` (N,) is kept. The backward pass
recomputes each chunk's logits and turns ``dlogp/dz = onehot(a_t) - softmax(z)`` into the gradients
of ``h`` and ``W`` (and ``b``), chunk by chunk. The same idea as Liger's fused linear
cross-entropy and TRL's ``selective_log_softmax`` (which still needs the logits), written here
for our temperature, banned ids and head transforms; it is exact up to fp32 rounding, tested
against the plain path in ``tests/test_memory_plan.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LogitTransform:
    """The final-logit transform a model's config declares, applied after the head's product, in
    the models' own order: ``logit_scale`` (Cohere: ``z * s``), ``logits_scaling`` (Granite:
    ``z / d``), ``final_logit_softcapping`` (Gemma 2/3: ``c * tanh(z / c)``)."""

    scale: float | None = None
    divisor: float | None = None
    cap: float | None = None

    @classmethod
    def of(cls, config: Any) -> LogitTransform:
        def number(name: str) -> float | None:
            v = getattr(config, name, None)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        cap = getattr(config, "final_logit_softcapping", None)
        return cls(number("logit_scale"), number("logits_scaling"), float(cap) if cap else None)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` transformed (out of place: the plain path backpropagates through it)."""
        if self.scale is not None:
            z = z * self.scale
        if self.divisor is not None:
            z = z / self.divisor
        if self.cap is not None:
            z = torch.tanh(z / self.cap) * self.cap
        return z

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` transformed in place (no graph: the chunked path's own forward and recompute)."""
        if self.scale is not None:
            z.mul_(self.scale)
        if self.divisor is not None:
            z.div_(self.divisor)
        if self.cap is not None:
            z.div_(self.cap).tanh_().mul_(self.cap)
        return z

    def backward_(self, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``dL/dz`` from ``dL/dout`` (``grad``, overwritten), given the transformed ``out``:
        ``s / d * (1 - (out / c)^2)``, the factors of the transforms present."""
        if self.cap is not None:
            grad.mul_(1 - (out / self.cap) ** 2)  # tanh' = 1 - tanh^2, from the output as torch does
        if self.divisor is not None:
            grad.div_(self.divisor)
        if self.scale is not None:
            grad.mul_(self.scale)
        return grad

    @property
    def identity(self) -> bool:
        return self.scale is None and self.divisor is None and self.cap is None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    banned_ids: list[int] | None = None,
) -> torch.Tensor:
    """Log-prob of each target under ``softmax(logits / temperature)`` in fp32 (the plain path).

    ``logits`` (B, T, V) at the positions that predict ``targets`` (B, T); returns (B, T).
    ``banned_ids`` (pad, BOS) are masked out first, exactly as the sampler does, so that the
    trainer's pi_theta and the recorded pi_behaviour are the same distribution.
    """
    logits = logits.float() / temperature  # (B, T, V)
    if banned_ids:
        logits = logits.index_fill(-1, torch.tensor(banned_ids, device=logits.device), float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)


def _chunk_logits(
    h: torch.Tensor,  # (C, H)
    w: torch.Tensor,  # (V, H) fp32
    b: torch.Tensor | None,  # (V,) fp32
    transform: LogitTransform,
    temperature: float,
    banned: torch.Tensor,  # (K,) long
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(z, out)``: the chunk's sampling logits (C, V) fp32 (transform, temperature, banned ids at
    -inf) and, when the transform has a cap, its output before the temperature (tanh's backward)."""
    z = F.linear(h.float(), w, b)  # (C, V) fp32
    transform.apply_(z)
    out = z.clone() if transform.cap is not None else None  # (C, V)
    if temperature != 1.0:
        z.div_(temperature)
    if banned.numel():
        z.index_fill_(-1, banned, float("-inf"))
    return z, out


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """``log softmax(T(h W^T + b) / tau)[target]`` per row of ``h``, chunk by chunk (see module doc)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        targets: torch.Tensor,  # (N,) long
        banned: torch.Tensor,  # (K,) long
        temperature: float,
        transform: LogitTransform,
        chunk: int,
    ) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.float()  # (V, H): no copy for fp32 weights
            b = bias.float() if bias is not None else None
            N = hidden.shape[0]
            logp = torch.empty(N, dtype=torch.float32, device=hidden.device)  # (N,)
            lse = torch.empty(N, dtype=torch.float32, device=hidden.device)  # (N,)
            for s in range(0, N, chunk):
                e = min(N, s + chunk)
                z, _ = _chunk_logits(hidden[s:e], w, b, transform, temperature, banned)  # (C, V)
                target_z = z.gather(-1, targets[s:e, None]).squeeze(-1)  # (C,)
                # logsumexp in place (torch.logsumexp would allocate a second (C, V) buffer)
                top = z.amax(dim=-1, keepdim=True)  # (C, 1)
                lse[s:e] = z.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))  # (C,)
                logp[s:e] = target_z - lse[s:e]
                del z
        ctx.save_for_backward(hidden, weight, bias, targets, banned, lse)
        ctx.temperature, ctx.transform, ctx.chunk = temperature, transform, chunk
        return logp

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, bias, targets, banned, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        temperature, transform, chunk = ctx.temperature, ctx.transform, ctx.chunk
        grad_h = grad_w = grad_b = None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.float()  # (V, H)
            b = bias.float() if bias is not None else None
            g_all = grad_logp.float()  # (N,)
            if need_h:
                grad_h = torch.empty_like(hidden)  # (N, H)
            if need_w:
                grad_w = torch.zeros_like(w)  # (V, H) fp32 accumulator
            if need_b and b is not None:
                grad_b = torch.zeros_like(b)  # (V,)
            N = hidden.shape[0]
            for s in range(0, N, chunk):
                e = min(N, s + chunk)
                h = hidden[s:e]  # (C, H)
                g = g_all[s:e, None]  # (C, 1)
                z, out = _chunk_logits(h, w, b, transform, temperature, banned)  # (C, V)
                # dlogp/dz = onehot(target) - softmax(z), times the incoming gradient
                dz = z.sub_(lse[s:e, None]).exp_().mul_(-g)  # (C, V) = -g * p
                dz.scatter_add_(-1, targets[s:e, None], g)  # + g at the target
                if banned.numel():  # index_fill's backward: nothing flows to a banned logit
                    dz.index_fill_(-1, banned, 0.0)
                if temperature != 1.0:
                    dz.div_(temperature)
                transform.backward_(dz, out)  # (C, V): dL/d(h W^T + b)
                if grad_h is not None:
                    grad_h[s:e] = (dz @ w).to(hidden.dtype)  # (C, H)
                if grad_w is not None:
                    grad_w.addmm_(dz.T, h.float())  # (V, H) += (V, C) @ (C, H)
                if grad_b is not None:
                    grad_b.add_(dz.sum(0))
                del z, dz, out
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor,  # (B, T, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    targets: torch.Tensor,  # (B, T)
    temperature: float = 1.0,
    banned_ids: list[int] | None = None,
    transform: LogitTransform | None = None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """``token_logprobs(transform(h W^T + b), targets, temperature, banned_ids)`` (B, T) in fp32,
    holding the logits of at most ``chunk_tokens`` tokens at a time, in the forward and the
    backward pass. Gradients flow to ``hidden``, ``weight`` and ``bias`` (in their dtypes)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunked_token_logprobs: chunk_tokens must be >= 1, got {chunk_tokens}")
    B, T, H = hidden.shape
    banned = torch.tensor(sorted(set(banned_ids or ())), dtype=torch.long, device=hidden.device)  # (K,)
    logp = _ChunkedTokenLogprobs.apply(
        hidden.reshape(B * T, H),  # (N, H)
        weight,
        bias,
        targets.reshape(B * T),  # (N,)
        banned,
        float(temperature),
        transform or LogitTransform(),
        int(chunk_tokens),
    )
    return logp.view(B, T)
