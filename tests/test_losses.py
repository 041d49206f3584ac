"""Losses against hand-derived values (the arithmetic is in the comments).

Run: ``python -m pytest tests/test_losses.py -q``
"""

from __future__ import annotations

import math

import pytest
import torch

from tsd.rl.losses import (
    CISPOLoss,
    LossOutput,
    PPOClipLoss,
    RLObjective,
    group_normalized_advantages,
    kl_k3,
    masked_mean,
    value_baseline_advantages,
    value_loss,
)

LN2, LN10 = math.log(2.0), math.log(10.0)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=atol, rtol=0
    )


def cispo_batch():
    """One sequence of 2 completion tokens plus one pad position.

    logp = [-1, -2]; behaviour = logp - [ln2, ln10]  ->  rho = [2, 10]
    The pad holds garbage (behaviour -50 would give rho = e^50) that must not matter.
    """
    logp = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)  # (1, 3)
    behaviour = torch.tensor([[-1.0 - LN2, -2.0 - LN10, -50.0]])  # (1, 3)
    adv = torch.tensor([[1.0, -0.5, 123.0]])  # (1, 3)
    mask = torch.tensor([[1, 1, 0]])  # (1, 3)
    return logp, behaviour, adv, mask


# ---------------------------------------------------------------------------------- CISPO
def test_cispo_hand_values():
    logp, behaviour, adv, mask = cispo_batch()
    loss, m = CISPOLoss(eps_high=5.0)(logp, behaviour, adv, mask)
    # weights w = min(rho, 5) = [2, 5]
    # per token -w*A*logp = [-(2*1*-1), -(5*-0.5*-2)] = [2, -5];  token mean over N=2: -3/2
    close(loss, -1.5)
    close(m["ratio_mean"], (2 + 10) / 2)  # unclipped rho, mean over the 2 completion tokens
    close(m["clip_frac"], 0.5)  # only rho=10 > 5
    close(m["advantage_mean"], (1 - 0.5) / 2)


def test_cispo_gradient_is_minus_w_a_over_n_and_weight_is_stopped():
    logp, behaviour, adv, mask = cispo_batch()
    loss, _ = CISPOLoss(eps_high=5.0)(logp, behaviour, adv, mask)
    loss.backward()
    # d/dlogp of -w*A*logp/N with w a constant: -w*A/N = [-2*1/2, -5*-0.5/2, 0(pad)] = [-1, 1.25, 0]
    close(logp.grad, [[-1.0, 1.25, 0.0]])

    # the same through autograd on a manual formula with the weight as a constant
    lp = logp.detach().clone().requires_grad_(True)
    w = torch.tensor([[2.0, 5.0]])
    (-(w * adv[:, :2] * lp[:, :2]).sum() / 2).backward()
    close(logp.grad, lp.grad)

    # without sg the gradient differs: d/dlogp[-rho*A*logp] = -A*rho*(1 + logp) = -1*2*(1-1) = 0 on
    # token 0 (token 1 is clipped: constant 5), so the stop-gradient is what makes it -1
    lp2 = logp.detach().clone().requires_grad_(True)
    rho = torch.exp(lp2[:, :2] - behaviour[:, :2]).clamp(max=5.0)
    (-(rho * adv[:, :2] * lp2[:, :2]).sum() / 2).backward()
    close(lp2.grad[0, 0], 0.0)
    assert not torch.allclose(lp2.grad, logp.grad)


def test_cispo_no_gradient_to_behaviour_or_advantages():
    logp, behaviour, adv, mask = cispo_batch()
    behaviour.requires_grad_(True)
    adv.requires_grad_(True)
    loss, _ = CISPOLoss()(logp, behaviour, adv, mask)
    loss.backward()
    assert behaviour.grad is None and adv.grad is None


def test_cispo_on_policy_ratio_is_one():
    # a trainer that recomputes behaviour with its own weights gets logp == behaviour: rho = 1 on
    # every token, so the loss is plain -mean(A*logp) and lag goes uncorrected (why the sampler's
    # log-probs must be used)
    logp = torch.tensor([[-0.5, -3.0]])  # (1, 2)
    adv = torch.tensor([[2.0, 1.0]])  # (1, 2)
    mask = torch.ones(1, 2)
    loss, m = CISPOLoss(eps_high=5.0)(logp, logp.clone(), adv, mask)
    close(m["ratio_mean"], 1.0)
    close(m["clip_frac"], 0.0)
    close(loss, -(2 * -0.5 + 1 * -3.0) / 2)  # = 2


def test_cispo_eps_low_floor():
    logp = torch.zeros(1, 2)  # (1, 2)
    behaviour = torch.tensor([[LN10, -LN2]])  # rho = [0.1, 2]
    adv = torch.ones(1, 2)
    loss, m = CISPOLoss(eps_high=5.0, eps_low=0.5)(
        logp.requires_grad_(True), behaviour, adv, torch.ones(1, 2)
    )
    loss.backward()
    # w = clamp([0.1, 2], 0.5, 5) = [0.5, 2]; grad -w*A/N = [-0.25, -1]
    close(logp.grad, [[-0.25, -1.0]])
    close(m["clip_frac"], 0.5)


def test_masked_entries_change_nothing():
    loss_fn = CISPOLoss()
    logp, behaviour, adv, mask = cispo_batch()
    ref_loss, ref_m = loss_fn(logp, behaviour, adv, mask)
    ref_loss.backward()
    ref_grad = logp.grad.clone()

    logp2, behaviour2, adv2, _ = cispo_batch()
    with torch.no_grad():
        logp2[0, 2] = -float("inf")
    behaviour2[0, 2] = float("nan")
    adv2[0, 2] = float("inf")
    loss2, m2 = loss_fn(logp2, behaviour2, adv2, mask.bool())  # bool mask == int mask
    loss2.backward()
    close(loss2, ref_loss)
    close(logp2.grad, ref_grad)
    for k in ref_m:
        close(m2[k], ref_m[k])


def test_token_vs_sequence_normalisation():
    # seq 0 has 1 completion token, seq 1 has 3; rho = 1, A = 1, so per-token loss = -logp
    logp = torch.tensor([[-4.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])  # (2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])  # (2, 3)
    adv = torch.ones(2)  # (B,) broadcast over tokens
    tok, _ = CISPOLoss(normalization="token")(logp, logp, adv, mask)
    seq, _ = CISPOLoss(normalization="sequence")(logp, logp, adv, mask)
    close(tok, (4 + 1 + 1 + 1) / 4)  # 1.75: every token weighs the same
    close(seq, (4 / 1 + 3 / 3) / 2)  # 2.5: every sequence weighs the same


def test_masked_mean_empty_rows_and_batch():
    x = torch.tensor([[2.0, 4.0], [9.0, 9.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    close(masked_mean(x, mask, "token"), 3.0)
    close(masked_mean(x, mask, "sequence"), 3.0)  # the empty sequence is not counted
    close(masked_mean(x, torch.zeros(2, 2), "token"), 0.0)
    close(masked_mean(x, torch.zeros(2, 2), "sequence"), 0.0)


# ---------------------------------------------------------------------------------- PPO clip
def test_ppo_clip_both_sides_both_signs():
    # tokens (rho, A) with eps = 0.2, so clip to [0.8, 1.2]:
    #   (1.5, +1): -min(1.5, 1.2)   = -1.2  clipped, no grad
    #   (1.5, -1): -min(-1.5, -1.2) =  1.5  unclipped, grad -rho*A/N = 1.5/4
    #   (0.5, +1): -min(0.5, 0.8)   = -0.5  unclipped, grad -0.5/4
    #   (0.5, -1): -min(-0.5, -0.8) =  0.8  clipped, no grad
    logp = torch.zeros(1, 4, requires_grad=True)  # (1, 4)
    behaviour = -torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))  # rho = exp(0 - behaviour)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, m = PPOClipLoss(eps=0.2)(logp, behaviour, adv, torch.ones(1, 4))
    close(loss, (-1.2 + 1.5 - 0.5 + 0.8) / 4)  # 0.15
    close(m["clip_frac"], 0.5)
    close(m["ratio_mean"], 1.0)
    loss.backward()
    close(logp.grad, [[0.0, 0.375, -0.125, 0.0]])


def test_ppo_clip_higher():
    # eps_high = 0.6: the upper bound is 1.6 so (1.5, +1) is no longer clipped: -1.5, grad -1.5
    logp = torch.zeros(1, 1, requires_grad=True)
    behaviour = torch.tensor([[-math.log(1.5)]])
    loss, m = PPOClipLoss(eps=0.2, eps_high=0.6)(logp, behaviour, torch.ones(1, 1), torch.ones(1, 1))
    loss.backward()
    close(loss, -1.5)
    close(logp.grad, [[-1.5]])
    close(m["clip_frac"], 0.0)


# ---------------------------------------------------------------------------------- KL
def test_kl_k3_hand_value_and_gradient():
    # log r = ref - logp = [0, ln2]; k3 = r - log r - 1 = [0, 2 - ln2 - 1]; mean over 2 tokens
    logp = torch.tensor([[-1.0, -1.0, 5.0]], requires_grad=True)  # last is a pad
    ref = torch.tensor([[-1.0, -1.0 + LN2, -99.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    kl = kl_k3(logp, ref, mask)
    close(kl, (2 - LN2 - 1) / 2)
    kl.backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - r = [0, -1]; / N=2
    close(logp.grad, [[0.0, -0.5, 0.0]])
    assert ref.grad is None


def test_kl_k3_zero_at_equality_positive_otherwise():
    logp = torch.randn(4, 6) - 2
    mask = torch.ones(4, 6)
    close(kl_k3(logp, logp.clone(), mask), 0.0)
    for _ in range(3):
        other = logp + torch.randn(4, 6)
        assert kl_k3(logp, other, mask) > 0
    # huge log ratios are clamped to [-20, 20]: finite
    assert torch.isfinite(kl_k3(torch.zeros(1, 2), torch.tensor([[500.0, -500.0]]), torch.ones(1, 2)))


def test_kl_k3_is_unbiased_for_kl_pi_ref():
    # pi uniform over 4 actions, so E_pi[k3] is the plain mean over the 4 actions (one per row),
    # and it must equal KL(pi || ref) = sum_a 0.25 * log(0.25 / ref_a) exactly
    ref = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logp = torch.full((4, 1), math.log(0.25))  # (4, 1)
    kl = kl_k3(logp, ref.log().unsqueeze(-1), torch.ones(4, 1))
    close(kl, (0.25 * torch.log(0.25 / ref)).sum(), atol=1e-6)


# ---------------------------------------------------------------------------------- value, advantages
def test_value_loss_hand_value_and_gradient():
    values = torch.tensor([[0.5, -0.5, 9.0]], requires_grad=True)  # last is a pad
    returns = torch.tensor([1.0], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    v = value_loss(values, returns, mask)
    close(v, ((0.5 - 1) ** 2 + (-0.5 - 1) ** 2) / 2)  # (0.25 + 2.25) / 2 = 1.25
    v.backward()
    close(values.grad, [[2 * (0.5 - 1) / 2, 2 * (-0.5 - 1) / 2, 0.0]])  # [-0.5, -1.5, 0]
    assert returns.grad is None
    # a non-finite value on a pad reaches neither the loss nor the gradient
    bad = values.detach().clone()
    bad[0, 2] = float("nan")
    bad.requires_grad_(True)
    value_loss(bad, returns, mask).backward()
    close(bad.grad, values.grad)
    # per-token returns give the same answer
    close(value_loss(values.detach(), torch.tensor([[1.0, 1.0, 0.0]]), mask), 1.25)


def test_value_baseline_advantages():
    rewards = torch.tensor([1.0, -1.0])
    old_values = torch.tensor([[0.5, 0.25, 7.0], [0.0, -0.5, 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = value_baseline_advantages(rewards, old_values, mask)
    # A = r - V_old per token, 0 on the pad
    close(adv, [[0.5, 0.75, 0.0], [-1.0, -0.5, 0.0]])
    assert not adv.requires_grad


def test_group_normalized_advantages():
    # group 7: [1, 0, 0, 1], mean 0.5, sample var = 4 * 0.25 / 3 = 1/3 -> A = +-0.5 * sqrt(3)
    # group 3: [1, 2, 3],    mean 2,   sample var = (1 + 0 + 1) / 2 = 1 -> A = [-1, 0, 1]
    # group 5: [0.7] alone -> 0;  group 9: [0.3, 0.3, 0.3] no variance -> exactly 0
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0, 0.0, 3.0, 1.0, 0.7, 0.3, 0.3, 0.3])
    groups = torch.tensor([7, 3, 7, 3, 7, 3, 7, 5, 9, 9, 9])
    adv = group_normalized_advantages(rewards, groups, eps=0.0)
    h = 0.5 * math.sqrt(3)
    close(adv, [h, -1.0, -h, 0.0, -h, 1.0, h, 0.0, 0.0, 0.0, 0.0], atol=1e-6)
    assert (adv[7:] == 0).all()
    # eps only softens the division
    close(group_normalized_advantages(rewards, groups)[0], 0.5 / (1 / math.sqrt(3) + 1e-6))


def test_group_advantages_without_std_scaling():
    adv = group_normalized_advantages(
        torch.tensor([1.0, 0.0, 0.0, 1.0, 0.4]), torch.tensor([0, 0, 0, 0, 1]), scale=False
    )
    close(adv, [0.5, -0.5, -0.5, 0.5, 0.0])  # r - mean, single-sample group -> 0


# ---------------------------------------------------------------------------------- objective
def objective_inputs():
    logp, behaviour, _, mask = cispo_batch()
    return {
        "logp": logp,
        "behaviour_logp": behaviour.requires_grad_(True),
        "ref_logp": (logp.detach() + torch.tensor([[0.0, LN2, 0.0]])).requires_grad_(True),
        "values": torch.tensor([[0.5, -0.5, 3.0]], requires_grad=True),
        "old_values": torch.tensor([[0.0, 1.5, 3.0]], requires_grad=True),
        "rewards": torch.tensor([1.0]),
        "mask": mask,
    }


def test_objective_total_on_hand_example():
    x = objective_inputs()
    obj = RLObjective(CISPOLoss(eps_high=5.0), c_ppo=1.0, c_value=0.5, c_kl=0.1)
    out = obj(**x)
    assert isinstance(out, LossOutput)
    # A = r - V_old = [1 - 0, 1 - 1.5] = [1, -0.5]: the CISPO hand example, pg = -1.5
    # value: ((0.5 - 1)^2 + (-0.5 - 1)^2) / 2 = 1.25;  kl: log r = [0, ln2] -> (1 - ln2) / 2
    pg, v, kl = -1.5, 1.25, (1 - LN2) / 2
    close(out.metrics["pg_loss"], pg)
    close(out.metrics["value_loss"], v)
    close(out.metrics["kl"], kl)
    close(out.metrics["advantage_mean"], 0.25)
    close(out.loss, 1.0 * pg + 0.5 * v + 0.1 * kl)
    close(out.metrics["loss"], out.loss)
    assert all(t.dim() == 0 and not t.requires_grad for t in out.metrics.values())

    out.loss.backward()
    # logp: pg grad [-1, 1.25] + 0.1 * kl grad [0, -0.5] = [-1, 1.2]
    close(x["logp"].grad, [[-1.0, 1.2, 0.0]])
    # values: 0.5 * 2 * (V - r) / 2 = 0.5 * [-0.5, -1.5]
    close(x["values"].grad, [[-0.25, -0.75, 0.0]])
    for name in ("behaviour_logp", "ref_logp", "old_values"):
        assert x[name].grad is None, name


def test_objective_skips_kl_and_value_terms():
    x = objective_inputs()
    x["ref_logp"] = torch.full_like(x["logp"], float("nan"))  # never read when c_kl == 0
    out = RLObjective(CISPOLoss(), c_value=0.0, c_kl=0.0)(**x)
    close(out.loss, -1.5)
    close(out.metrics["kl"], 0.0)
    close(out.metrics["value_loss"], 0.0)

    x = objective_inputs()
    x["ref_logp"] = None
    x["values"] = None
    out = RLObjective(CISPOLoss())(**x)
    close(out.loss, -1.5)
    close(out.metrics["kl"], 0.0)


def test_objective_sequence_advantages_broadcast():
    # group-normalised advantage 2.0 for the one sequence: rho = [2, 10] -> w = [2, 5]
    # per token -w*A*logp = [-(2*2*-1), -(5*2*-2)] = [4, 20]; mean 12
    x = objective_inputs()
    x["old_values"] = None
    out = RLObjective(CISPOLoss(), c_value=0.0, c_kl=0.0)(**x, advantages=torch.tensor([2.0]))
    close(out.loss, 12.0)
    close(out.metrics["advantage_mean"], 2.0)

    x["advantages"] = None
    with pytest.raises(ValueError, match="old_values"):
        RLObjective(CISPOLoss())(**x)


def test_objective_with_ppo_clip():
    x = objective_inputs()
    out = RLObjective(PPOClipLoss(eps=0.2), c_value=0.0, c_kl=0.0)(**x)
    # rho = [2, 10] both above 1.2; A = [1, -0.5]:
    # token 0: -min(2, 1.2) = -1.2 (clipped); token 1: -min(-5, -0.6) = 5 (unclipped) -> mean 1.9
    close(out.loss, (-1.2 + 5.0) / 2)
    close(out.metrics["clip_frac"], 0.5)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: CISPOLoss(eps_high=0.0), "CISPOLoss.eps_high"),
        (lambda: CISPOLoss(eps_high=float("inf")), "CISPOLoss.eps_high"),
        (lambda: CISPOLoss(eps_low=6.0), "CISPOLoss.eps_low"),
        (lambda: CISPOLoss(normalization="batch"), "CISPOLoss.normalization"),
        (lambda: PPOClipLoss(eps=1.0), "PPOClipLoss.eps"),
        (lambda: PPOClipLoss(eps=0.0), "PPOClipLoss.eps"),
        (lambda: PPOClipLoss(eps_high=-0.1), "PPOClipLoss.eps_high"),
        (lambda: PPOClipLoss(normalization="tokens"), "PPOClipLoss.normalization"),
        (lambda: RLObjective(CISPOLoss(), c_ppo=-1.0), "RLObjective.c_ppo"),
        (lambda: RLObjective(CISPOLoss(), c_value=float("nan")), "RLObjective.c_value"),
        (lambda: RLObjective(CISPOLoss(), c_kl=-0.05), "RLObjective.c_kl"),
    ],
)
def test_config_validation_names_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_instantiate_from_hydra_config():
    hydra_utils = pytest.importorskip("hydra.utils")
    cfg = {
        "_target_": "tsd.rl.losses.RLObjective",
        "pg_loss": {"_target_": "tsd.rl.losses.CISPOLoss", "eps_high": 5.0},
        "c_ppo": 1.0,
        "c_value": 1.0,
        "c_kl": 0.05,
    }
    obj = hydra_utils.instantiate(cfg)
    assert isinstance(obj.pg_loss, CISPOLoss) and obj.pg_loss.eps_high == 5.0 and obj.c_kl == 0.05
    assert list(obj.parameters()) == []
