"""RL losses for tree-search distillation: CISPO / PPO-clip policy terms, value and k3-KL terms.

The objective (seed article, "Training"; DESIGN.md "Losses")::

    L = c_ppo * L_pg + c_value * L_value + c_kl * KL(pi_theta || pi_ref)

Every tensor is a padded (B, T) grid over token positions with a ``mask`` (B, T) that is 1 on the
completion tokens that count and 0 on prompt and padding. Masked positions never reach a loss, a
metric or a gradient, whatever they hold (even ``inf``/``nan``): they are replaced, not multiplied
by zero, before any arithmetic.

Gradients flow only through ``logp`` in the policy and KL terms and only through ``values`` in the
value term; behaviour and reference log-probs, old values, rewards and advantages are detached.

The losses are parameter-free ``nn.Module`` s built by Hydra from ``_target_``, e.g.::

    loss:
      _target_: tsd.rl.losses.RLObjective
      pg_loss: {_target_: tsd.rl.losses.CISPOLoss, eps_high: 5.0}
      c_ppo: 1.0
      c_value: 1.0
      c_kl: 0.05

Tests: ``python -m pytest tests/test_losses.py -q``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tsd.config import check_choice, check_number, require

NORMALIZATIONS = ("token", "sequence")
#: bound on |log ratio| in the k3 estimator so exp() can't overflow (e^20 ~ 4.9e8)
KL_LOG_RATIO_CLAMP = 20.0


@dataclass
class LossOutput:
    """What :class:`RLObjective` returns."""

    #: scalar, the total to backprop
    loss: Tensor
    #: detached scalars: pg_loss, value_loss, kl, ratio_mean, clip_frac, advantage_mean, loss
    metrics: dict[str, Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- validation
def _number(owner: str, name: str, value: object) -> float:
    """:func:`tsd.config.check_number` of ``<owner>.<name>`` (any finite number)."""
    return check_number(value, f"{owner}.{name}")


def _check_normalization(owner: str, value: object) -> str:
    return str(check_choice(value, f"{owner}.normalization", NORMALIZATIONS))


def _check_shapes(owner: str, mask: Tensor, **tensors: Tensor | None) -> None:
    if mask.dim() != 2:
        raise ValueError(f"{owner}: mask must be (B, T), got shape {tuple(mask.shape)}")
    for name, t in tensors.items():
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{owner}: {name} has shape {tuple(t.shape)}, mask has {tuple(mask.shape)}")


# ---------------------------------------------------------------------------------- reductions
def masked_mean(x: Tensor, mask: Tensor, normalization: str = "token") -> Tensor:
    """Mean of ``x`` (B, T) over the completion tokens in ``mask`` (B, T).

    ``"token"``: sum over every completion token of the batch / number of those tokens (MiniMax-M1,
    DAPO: long sequences weigh in proportion to their length). ``"sequence"``: mean over the tokens
    of each sequence, then mean over the sequences that have at least one completion token (GRPO).
    An all-masked batch gives 0, not NaN.
    """
    m = mask.bool()  # (B, T)
    x = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))  # (B, T)
    if normalization == "token":
        return x.sum() / m.sum().clamp(min=1)
    if normalization == "sequence":
        n_tok = m.sum(dim=-1)  # (B,)
        per_seq = x.sum(dim=-1) / n_tok.clamp(min=1)  # (B,)
        return per_seq.sum() / (n_tok > 0).sum().clamp(min=1)
    raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got {normalization!r}")


def _token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Detached token-level mean for metrics."""
    return masked_mean(x.detach().float(), mask, "token")


def _per_token(advantages: Tensor, mask: Tensor) -> Tensor:
    """Advantages (B,) or (B, T) -> detached (B, T), zero off the mask."""
    a = advantages.detach()
    if a.dim() == 1:
        a = a.unsqueeze(-1).expand(mask.shape)  # (B, T)
    if a.shape != mask.shape:
        raise ValueError(
            f"advantages: shape {tuple(advantages.shape)} fits neither (B,) nor mask {tuple(mask.shape)}"
        )
    return torch.where(mask.bool(), a, torch.zeros((), dtype=a.dtype, device=a.device))  # (B, T)


def _log_ratio(logp: Tensor, behaviour_logp: Tensor, mask: Tensor) -> Tensor:
    """log(pi_theta / pi_behaviour) per token, 0 off the mask (so ratio 1 and no inf/nan there)."""
    diff = logp - behaviour_logp.detach()  # (B, T)
    return torch.where(mask.bool(), diff, torch.zeros((), dtype=diff.dtype, device=diff.device))  # (B, T)


# ---------------------------------------------------------------------------------- policy terms
class CISPOLoss(nn.Module):
    """CISPO (MiniMax-M1, arXiv:2506.13585; ScaleRL; the seed article's training loss)::

        L = -E_t[ sg(min(rho_t, eps_high)) * A_t * log pi_theta(a_t | s_t) ],
        rho_t = exp(logp_t - behaviour_logp_t)

    ``behaviour_logp`` must be the log-prob recorded by the sampler that generated the token; a
    trainer that recomputes it with the current weights gets rho = 1 everywhere and corrects no
    generator lag (the fault in the article's public code).

    Unlike PPO, the importance weight is clipped and stopped, not the update, so every token keeps
    a gradient ``-w_t * A_t / N`` through ``log pi_theta``.

    Bounds are *absolute* bounds on rho, as in the article (``epsilon_high = 5.0`` caps the weight
    at 5). MiniMax-M1 writes them relative to 1 (``1 + eps_high``); with eps_high = 5 that would be
    a cap of 6, so a MiniMax config must be translated.
    """

    def __init__(
        self, eps_high: float = 5.0, eps_low: float | None = None, normalization: str = "token"
    ) -> None:
        """
        Args:
            eps_high: cap on the importance weight rho (absolute, > 0).
            eps_low: floor on the importance weight (absolute, in [0, eps_high)); ``None``: no floor
                (MiniMax-M1 sets no effective lower bound).
            normalization: ``"token"`` (sum over completion tokens / their number, MiniMax-M1's
                default) or ``"sequence"`` (per-sequence token mean, then mean over sequences).
        """
        super().__init__()
        self.eps_high = check_number(eps_high, "CISPOLoss.eps_high", low=0, low_open=True)
        self.eps_low = (
            None
            if eps_low is None
            else check_number(eps_low, "CISPOLoss.eps_low", low=0, high=self.eps_high, high_open=True)
        )
        self.normalization = _check_normalization("CISPOLoss", normalization)

    def forward(
        self, logp: Tensor, behaviour_logp: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """logp, behaviour_logp, mask: (B, T); advantages: (B, T) or (B,). Returns (loss, metrics)."""
        _check_shapes("CISPOLoss", mask, logp=logp, behaviour_logp=behaviour_logp)
        adv = _per_token(advantages, mask)  # (B, T)
        ratio = torch.exp(_log_ratio(logp, behaviour_logp, mask)).detach()  # (B, T)
        weight = ratio.clamp(min=self.eps_low, max=self.eps_high)  # (B, T), sg by construction
        clipped = ratio > self.eps_high  # (B, T)
        if self.eps_low is not None:
            clipped = clipped | (ratio < self.eps_low)
        per_token = -weight * adv * logp  # (B, T); w, A finite, so the masked grad is exactly 0
        loss = masked_mean(per_token, mask, self.normalization)
        metrics = {
            "ratio_mean": _token_mean(ratio, mask),
            "clip_frac": _token_mean(clipped.float(), mask),
            "advantage_mean": _token_mean(adv, mask),
        }
        return loss, metrics


class PPOClipLoss(nn.Module):
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347; clip-higher from DAPO)::

        L = -E_t[ min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps_high) * A_t) ],
        rho_t = exp(logp_t - behaviour_logp_t)

    Bounds are relative to 1, as in PPO. Where the clipped branch is the min, the token has no
    gradient; ``clip_frac`` is the fraction of completion tokens in that state
    (rho > 1 + eps_high with A > 0, or rho < 1 - eps with A < 0).
    """

    def __init__(self, eps: float = 0.2, eps_high: float | None = None, normalization: str = "token") -> None:
        """
        Args:
            eps: lower clip, rho >= 1 - eps; in (0, 1).
            eps_high: upper clip, rho <= 1 + eps_high (> 0); ``None``: same as ``eps``.
            normalization: ``"token"`` or ``"sequence"``, as in :class:`CISPOLoss`.
        """
        super().__init__()
        self.eps = check_number(eps, "PPOClipLoss.eps", low=0, high=1, low_open=True, high_open=True)
        self.eps_high = (
            self.eps
            if eps_high is None
            else check_number(eps_high, "PPOClipLoss.eps_high", low=0, low_open=True)
        )
        self.normalization = _check_normalization("PPOClipLoss", normalization)

    def forward(
        self, logp: Tensor, behaviour_logp: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """logp, behaviour_logp, mask: (B, T); advantages: (B, T) or (B,). Returns (loss, metrics)."""
        _check_shapes("PPOClipLoss", mask, logp=logp, behaviour_logp=behaviour_logp)
        adv = _per_token(advantages, mask)  # (B, T)
        ratio = torch.exp(_log_ratio(logp, behaviour_logp, mask))  # (B, T), carries the gradient
        clipped_ratio = ratio.clamp(1 - self.eps, 1 + self.eps_high)  # (B, T)
        per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)  # (B, T)
        loss = masked_mean(per_token, mask, self.normalization)
        r = ratio.detach()  # (B, T)
        clipped = ((r > 1 + self.eps_high) & (adv > 0)) | ((r < 1 - self.eps) & (adv < 0))  # (B, T)
        metrics = {
            "ratio_mean": _token_mean(r, mask),
            "clip_frac": _token_mean(clipped.float(), mask),
            "advantage_mean": _token_mean(adv, mask),
        }
        return loss, metrics


# ---------------------------------------------------------------------------------- value and KL
def value_loss(values: Tensor, returns: Tensor, mask: Tensor, normalization: str = "token") -> Tensor:
    """``L_value = E_t[(V(s_t) - r)^2]`` over completion tokens (seed article; no 1/2 factor).

    values, mask: (B, T); returns: (B,) terminal reward, broadcast to every token, or (B, T).
    The gradient flows through ``values`` only.
    """
    _check_shapes("value_loss", mask, values=values)
    target = _per_token(returns.to(values.dtype), mask)  # (B, T), detached
    safe_v = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return masked_mean((safe_v - target) ** 2, mask, normalization)


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor, normalization: str = "token") -> Tensor:
    """k3 estimator of ``KL(pi_theta || pi_ref)`` per token (Schulman, "Approximating KL
    divergence", 2020; DeepSeekMath/DeepSeek-R1's GRPO)::

        k3 = r - log r - 1,   r = pi_ref(a_t | s_t) / pi_theta(a_t | s_t) = exp(ref_logp - logp)

    Why ``r = pi_ref / pi_theta`` and not the article's ``pi_theta / pi_ref``: the tokens are
    sampled from pi_theta (up to generator lag), and under that sampling ``E[r] = 1`` while
    ``E[-log r] = KL(pi_theta || pi_ref)``, so ``k3 = (r - 1) - log r`` is unbiased for that KL, and
    ``x - 1 >= log x`` makes it >= 0 per sample, 0 exactly when the log-probs agree. With the
    article's inverted ratio the (r - 1) term no longer has mean 0 under pi_theta and the estimate
    is biased (and explodes where pi_ref << pi_theta). DeepSeekMath's GRPO formula uses
    ``pi_ref / pi_theta`` too; the article's text has the fraction upside down.

    The log ratio is clamped to [-20, 20] so exp() can't overflow; beyond that the token has no
    gradient. ``ref_logp`` is detached: the gradient flows through ``logp`` only.
    logp, ref_logp, mask: (B, T).
    """
    _check_shapes("kl_k3", mask, logp=logp, ref_logp=ref_logp)
    diff = ref_logp.detach() - logp  # (B, T)
    log_r = torch.where(mask.bool(), diff, torch.zeros((), dtype=diff.dtype, device=diff.device))  # (B, T)
    log_r = log_r.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)  # (B, T)
    k3 = torch.exp(log_r) - log_r - 1  # (B, T), >= 0
    return masked_mean(k3, mask, normalization)


# ---------------------------------------------------------------------------------- advantages
def value_baseline_advantages(rewards: Tensor, old_values: Tensor, mask: Tensor) -> Tensor:
    """``A_t = r - sg(V_old(s_t))`` (seed article): the same terminal reward for every token, no GAE.

    rewards: (B,); old_values, mask: (B, T). Returns (B, T), detached, 0 where mask is 0.
    """
    _check_shapes("value_baseline_advantages", mask, old_values=old_values)
    if rewards.shape != mask.shape[:1]:
        raise ValueError(
            f"value_baseline_advantages: rewards must be (B,)={tuple(mask.shape[:1])}, "
            f"got {tuple(rewards.shape)}"
        )
    adv = rewards.detach().to(old_values.dtype).unsqueeze(-1) - old_values.detach()  # (B, T)
    return torch.where(mask.bool(), adv, torch.zeros((), dtype=adv.dtype, device=adv.device))  # (B, T)


def group_normalized_advantages(
    rewards: Tensor, group_ids: Tensor, eps: float = 1e-6, scale: bool = True
) -> Tensor:
    """Group-relative advantages (GRPO, DeepSeekMath arXiv:2402.03300)::

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)      scale=True (GRPO)
        A_i =  r_i - mean_g(r)                          scale=False (Dr. GRPO, arXiv:2503.20783)

    ``std_g`` is the sample standard deviation (Bessel-corrected, ``torch.std``'s default), as in
    the TRL, verl and OpenRLHF GRPO implementations. Groups of size 1 and groups whose rewards are
    all equal get exactly 0 (no signal; also no ``eps``-amplified rounding noise).

    rewards, group_ids: (N,). Returns (N,), detached, in the dtype of ``rewards``.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_normalized_advantages: rewards and group_ids must both be (N,), got "
            f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    eps = _number("group_normalized_advantages", "eps", eps)
    if eps < 0:
        raise ValueError(f"group_normalized_advantages.eps: must be >= 0, got {eps!r}")
    r = rewards.detach().double()  # (N,), group statistics in fp64
    _, inv = torch.unique(group_ids, return_inverse=True)  # inv: (N,) group index per sample
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = r.new_zeros(n_groups).index_add_(0, inv, torch.ones_like(r))  # (G,)
    mean = r.new_zeros(n_groups).index_add_(0, inv, r) / count  # (G,)
    centred = r - mean[inv]  # (N,)
    hi = r.new_full((n_groups,), -math.inf).scatter_reduce(0, inv, r, "amax")  # (G,)
    lo = r.new_full((n_groups,), math.inf).scatter_reduce(0, inv, r, "amin")  # (G,)
    flat = (hi == lo)[inv]  # (N,), size-1 groups included
    if scale:
        sq = r.new_zeros(n_groups).index_add_(0, inv, centred**2)  # (G,)
        std = (sq / (count - 1).clamp(min=1)).sqrt()  # (G,)
        centred = centred / (std[inv] + eps)  # (N,)
    adv = torch.where(flat, torch.zeros_like(centred), centred)  # (N,)
    return adv.to(rewards.dtype)


# ---------------------------------------------------------------------------------- micro-batches
#: the metrics of :class:`RLObjective` normalised as the loss is (``token`` or ``sequence``); every
#: other metric (the policy term's ``ratio_mean``, ``clip_frac``, ...) is a token mean
LOSS_METRICS = ("loss", "pg_loss", "value_loss", "kl")


def normaliser(mask: Tensor, normalization: str) -> int:
    """What :func:`masked_mean` divides by over ``mask`` (B, T): the completion tokens
    (``"token"``) or the sequences with at least one (``"sequence"``)."""
    m = mask.bool()  # (B, T)
    if normalization == "token":
        return int(m.sum())
    if normalization == "sequence":
        return int((m.sum(dim=-1) > 0).sum())
    raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got {normalization!r}")


def micro_batch_shares(masks: Sequence[Tensor], normalization: str) -> list[float]:
    """Each part's share of the whole batch's normaliser, so that ``sum_m share_m * L_m`` is the
    whole batch's loss exactly when the batch's rows are split into parts with these ``masks``.

    Every term of :class:`RLObjective` is ``masked_mean(x, mask)``, a sum over the part divided by
    the part's normaliser ``n_m`` (its completion tokens, or its non-empty sequences); over the
    whole batch the sum is the same and the divisor ``N = sum_m n_m``, so
    ``L = sum_m S_m / N = sum_m (n_m / N) * L_m``. A part with nothing to train has share 0 (its
    masked mean is 0, not NaN); an empty batch gives 0 everywhere."""
    counts = [normaliser(m, normalization) for m in masks]
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def combine_micro_batches(
    parts: Sequence[LossOutput], masks: Sequence[Tensor], normalization: str
) -> LossOutput:
    """The whole batch's :class:`LossOutput` from its parts' (loss and metrics detached): the
    :data:`LOSS_METRICS` weighted by :func:`micro_batch_shares` under ``normalization``, the token
    means by the parts' token shares."""
    loss_w = micro_batch_shares(masks, normalization)
    token_w = micro_batch_shares(masks, "token")
    zero = torch.zeros((), dtype=torch.float32, device=parts[0].loss.device)
    metrics: dict[str, Tensor] = {}
    for k in parts[0].metrics:
        w = loss_w if k in LOSS_METRICS else token_w
        metrics[k] = sum((wi * p.metrics[k].detach() for wi, p in zip(w, parts)), zero)
    loss = sum((wi * p.loss.detach() for wi, p in zip(loss_w, parts)), zero)
    return LossOutput(loss=loss, metrics=metrics)


# ---------------------------------------------------------------------------------- objective
def _coefficient(name: str, value: object) -> float:
    return check_number(value, f"RLObjective.{name}", low=0)


class RLObjective(nn.Module):
    """``L = c_ppo * L_pg + c_value * L_value + c_kl * KL(pi_theta || pi_ref)`` (seed article).

    ``L_pg`` is the pluggable ``pg_loss`` (:class:`CISPOLoss` in the article). Advantages are the
    per-token value baseline ``r - sg(V_old(s_t))`` unless the rollout fixed sequence-level ones
    (group-normalised rewards), which are broadcast over the tokens. The value and KL terms use
    the same normalization as ``pg_loss`` (``"token"`` if it has none).
    """

    def __init__(
        self, pg_loss: nn.Module, c_ppo: float = 1.0, c_value: float = 1.0, c_kl: float = 0.05
    ) -> None:
        """
        Args:
            pg_loss: policy-gradient term with the ``CISPOLoss.forward`` signature.
            c_ppo: weight of the policy term (>= 0).
            c_value: weight of the value term (>= 0); 0 skips it.
            c_kl: weight of the k3 KL to the frozen reference (>= 0); 0 skips it.
        """
        super().__init__()
        require(callable(pg_loss), "RLObjective.pg_loss", "a loss module", type(pg_loss).__name__)
        self.pg_loss = pg_loss
        self.c_ppo = _coefficient("c_ppo", c_ppo)
        self.c_value = _coefficient("c_value", c_value)
        self.c_kl = _coefficient("c_kl", c_kl)
        self.normalization = _check_normalization("RLObjective", getattr(pg_loss, "normalization", "token"))

    def forward(
        self,
        *,
        logp: Tensor,
        behaviour_logp: Tensor,
        rewards: Tensor,
        mask: Tensor,
        ref_logp: Tensor | None = None,
        values: Tensor | None = None,
        old_values: Tensor | None = None,
        advantages: Tensor | None = None,
    ) -> LossOutput:
        """
        Args:
            logp: (B, T) log pi_theta of each token (fp32, with gradient).
            behaviour_logp: (B, T) log-prob recorded by the sampler that generated each token.
            rewards: (B,) terminal reward per sequence (the value target and the baseline's r).
            mask: (B, T) 1 on completion tokens that count.
            ref_logp: (B, T) frozen reference log-probs; ``None`` skips the KL term.
            values: (B, T) current value-head outputs V(s_t) (with gradient); ``None`` skips the
                value term.
            old_values: (B, T) V_old(s_t) for the baseline; needed when ``advantages`` is None.
            advantages: (B,) sequence-level (e.g. group-normalised) or (B, T); ``None``: value
                baseline from ``old_values``.
        """
        if rewards.shape != mask.shape[:1]:
            raise ValueError(
                f"RLObjective: rewards must be (B,)={tuple(mask.shape[:1])}, got {tuple(rewards.shape)}"
            )
        if advantages is None:
            if old_values is None:
                raise ValueError(
                    "RLObjective: pass old_values (value baseline) or advantages (e.g. group-normalised)"
                )
            adv = value_baseline_advantages(rewards, old_values, mask)  # (B, T)
        else:
            adv = _per_token(advantages, mask)  # (B, T)

        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        pg, pg_metrics = self.pg_loss(logp, behaviour_logp, adv, mask)
        total = self.c_ppo * pg

        v_loss = zero
        if values is not None and self.c_value > 0:
            v_loss = value_loss(values, rewards, mask, self.normalization)
            total = total + self.c_value * v_loss

        kl = zero
        if ref_logp is not None and self.c_kl > 0:
            kl = kl_k3(logp, ref_logp, mask, self.normalization)
            total = total + self.c_kl * kl

        metrics = {
            "loss": total.detach(),
            "pg_loss": pg.detach(),
            "value_loss": v_loss.detach(),
            "kl": kl.detach(),
            **{k: v.detach() for k, v in pg_metrics.items()},
        }
        return LossOutput(loss=total, metrics=metrics)
