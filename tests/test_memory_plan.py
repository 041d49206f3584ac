"""The trainer at paper scale (issue 24; docs/paper_scale.md): fp32 master weights under a bf16
compute dtype, and the memory plan's knobs, each exact against the plain computation.

    python -m pytest tests/test_memory_plan.py -q

- chunked target log-probs (:mod:`tsd.models.logprobs`) against the full log-softmax: values and
  the gradients of the hidden state, the head weight and bias, with temperature, banned ids and
  every head transform;
- the module's loss, metrics, log-probs and every parameter's gradient with chunked log-probs,
  micro-batches (token and sequence normalisation, with the value and KL terms) and activation
  checkpointing, against the plain path;
- precision: the masters stay fp32, the value head computes in fp32 under autocast, the
  reference equals the policy at step 0 in bf16, the copies the generators, the sync and the
  export read are in ``model.dtype``; 3 steps at lr 5e-6 move nearly every entry of ``last.ckpt``;
- FSDP2 on 2 real gloo ranks: the policy built from a bf16 checkpoint without a value head shards,
  steps (with the memory knobs on) and moves nearly every fp32 master entry.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import compose_train, make_random_policy

from tsd.data.collate import collate_trajectories
from tsd.models.logprobs import LogitTransform, chunked_token_logprobs, token_logprobs
from tsd.models.precision import Precision
from tsd.module import PolicyValueModule
from tsd.rl.losses import CISPOLoss, RLObjective, micro_batch_shares
from tsd.rl.trajectory import Trajectory

BANNED = [0, 1]  # the char tokenizer's pad and BOS, as banned_token_ids gives them


# ---------------------------------------------------------------------------- chunked log-probs
@pytest.mark.parametrize(
    "transform", [LogitTransform(), LogitTransform(scale=0.7, divisor=1.3, cap=4.0)], ids=["plain", "all"]
)
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_and_their_gradients_equal_the_full_log_softmax(transform, bias):
    torch.manual_seed(0)
    B, T, H, V = 3, 7, 16, 50
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True) if bias else None
    targets = torch.randint(2, V, (B, T))
    targets[0, :2] = 0  # banned targets (padding): -inf, and no gradient reaches them
    upstream = torch.randn(B, T)
    upstream[0, :2] = 0.0

    def run(chunk: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for t in (hidden, weight, b):
            if t is not None:
                t.grad = None
        if chunk:
            logp = chunked_token_logprobs(hidden, weight, b, targets, 0.8, BANNED, transform, chunk)
        else:
            z = transform(torch.nn.functional.linear(hidden, weight, b))  # (B, T, V)
            logp = token_logprobs(z, targets, 0.8, BANNED)
        kept = torch.where(upstream != 0, logp, torch.zeros(()))  # as the losses replace masked ones
        (kept * upstream).sum().backward()
        return logp.detach(), [t.grad.clone() for t in (hidden, weight, b) if t is not None]

    want, want_grads = run(0)
    for chunk in (1, 4, 21, 64):  # one token, uneven chunks, exactly N, more than N
        got, grads = run(chunk)
        assert torch.equal(got.isinf(), want.isinf()) and bool(want[0, :2].isinf().all())
        fin = want.isfinite()
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_chunked_logprobs_on_bf16_weights_match_the_plain_fp32_head():
    """FSDP2 gathers the head in bf16: both paths upcast it, the product is fp32 either way."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 16).bfloat16().requires_grad_()
    weight = torch.randn(40, 16).bfloat16().requires_grad_()
    targets = torch.randint(2, 40, (2, 5))
    plain = token_logprobs(torch.nn.functional.linear(hidden.float(), weight.float()), targets)
    plain.sum().backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked = chunked_token_logprobs(hidden, weight, None, targets, chunk_tokens=3)
    chunked.sum().backward()
    assert chunked.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, want_h)
    torch.testing.assert_close(weight.grad, want_w)


# ---------------------------------------------------------------------------- micro-batch shares
def test_micro_batch_shares_are_each_parts_share_of_the_normaliser():
    a = torch.tensor([[1.0, 1, 1, 0], [0, 0, 0, 0]])  # 3 tokens, 1 non-empty sequence
    b = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0]])  # 5 tokens, 2 sequences
    assert micro_batch_shares([a, b], "token") == [3 / 8, 5 / 8]
    assert micro_batch_shares([a, b], "sequence") == [1 / 3, 2 / 3]
    assert micro_batch_shares([torch.zeros(1, 3)], "token") == [0.0]  # nothing to train: no NaN


def _trajectories(vocab: int, lengths: list[tuple[int, int]], seed: int = 0, token_adv: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, c) in enumerate(lengths):
        ids = torch.randint(3, vocab, (p + c,), generator=g).tolist()
        out.append(
            Trajectory(
                problem_id=i,
                prompt_ids=[1, *ids[: p - 1]],
                completion_ids=ids[p - 1 : p - 1 + c],
                behaviour_logprobs=(-torch.rand(c, generator=g) * 4).tolist(),
                reward=float(torch.rand((), generator=g) * 2 - 1),
                correct=False,
                policy_version=0,
                rollout="test",
                token_advantages=(torch.randn(c, generator=g)).tolist() if token_adv else None,
            )
        )
    return out


LENGTHS = [(4, 6), (3, 2), (6, 8), (5, 1), (3, 5)]


def test_micro_batches_are_row_slices_trimmed_to_their_longest_row(char_tokenizer):
    batch = collate_trajectories(_trajectories(len(char_tokenizer), LENGTHS), pad_id=0)
    parts = batch.micro_batches(2)
    assert [len(p) for p in parts] == [2, 2, 1]
    assert [p.input_ids.shape[1] for p in parts] == [10, 14, 8]  # each slice's own longest row
    assert [p is batch for p in batch.micro_batches(0) + batch.micro_batches(5)] == [True, True]
    for p, rows in zip(parts, (slice(0, 2), slice(2, 4), slice(4, 5))):
        L = p.input_ids.shape[1]
        assert torch.equal(p.input_ids, batch.input_ids[rows, :L])
        assert torch.equal(p.mask, batch.mask[rows, : L - 1])
        assert batch.mask[rows, L - 1 :].sum() == 0  # nothing trained was cut


# ---------------------------------------------------------------------------- the module, knob by knob
def _module(policy, objective, **knobs) -> PolicyValueModule:
    """A module on a copy of ``policy``; after the reference is taken, the policy moves (a fixed
    perturbation) so that the KL term and the value head are not trivially 0."""
    module = PolicyValueModule(
        copy.deepcopy(policy), objective, optimizer=torch.optim.SGD, banned_token_ids=BANNED, **knobs
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.train()


def _step(module: PolicyValueModule, batch):
    out = module.backward_batch(batch)
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("normalization, token_adv", [("token", False), ("sequence", False), ("token", True)])
def test_memory_knobs_give_the_plain_paths_loss_metrics_and_gradients(
    char_tokenizer, normalization, token_adv
):
    """Chunked log-probs, micro-batches (uneven: 2 + 2 + 1 rows) and activation checkpointing,
    alone and together, against the plain path: every metric (KL, value loss, ratio, ...) and
    every parameter's gradient, to fp32 rounding."""
    policy = make_random_policy(char_tokenizer, hidden=32, layers=2).train()
    objective = RLObjective(CISPOLoss(normalization=normalization), c_ppo=1.0, c_value=0.5, c_kl=0.2)
    trajs = _trajectories(len(char_tokenizer), LENGTHS, token_adv=token_adv)
    batch = collate_trajectories(trajs, pad_id=0)

    plain = _module(policy, objective, logprob_chunk_tokens=0)
    want, want_grads = _step(plain, batch)
    with torch.no_grad():
        want_logp = plain.forward_batch(batch)
    assert float(want.metrics["kl"]) > 1e-4 and float(want.metrics["value_loss"]) > 0
    assert len(want_grads) == len(list(plain.policy.parameters()))  # the value head and the LM

    cases = {
        "chunked": {"logprob_chunk_tokens": 7},
        "micro": {"logprob_chunk_tokens": 0, "micro_batch_size": 2},
        "checkpointed": {"logprob_chunk_tokens": 0, "activation_checkpointing": True},
        "all": {"logprob_chunk_tokens": 5, "micro_batch_size": 2, "activation_checkpointing": True},
    }
    for name, knobs in cases.items():
        module = _module(policy, objective, **knobs)
        got, grads = _step(module, batch)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6, msg=name)
        assert got.metrics.keys() == want.metrics.keys()
        for k in want.metrics:
            torch.testing.assert_close(
                got.metrics[k], want.metrics[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}"
            )
        assert grads.keys() == want_grads.keys()
        for n in want_grads:
            torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=f"{name} {n}")
        with torch.no_grad():
            fwd = module.forward_batch(batch)
        m = batch.mask.bool()
        for k in ("logp", "ref_logp", "values"):
            torch.testing.assert_close(fwd[k][m], want_logp[k][m], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")


def test_a_nan_micro_batch_skips_the_whole_step(char_tokenizer):
    """The NaN skip holds with micro-batches: one part's non-finite loss skips the optimiser step
    (every part ran its backward first, as FSDP2's collectives need), and no weight moves."""
    policy = make_random_policy(char_tokenizer).train()
    module = _module(policy, RLObjective(CISPOLoss()), micro_batch_size=2)
    opt = torch.optim.SGD(module.policy.parameters(), lr=0.1)
    module.optimizers = lambda: opt  # what Lightning hands training_step
    module.log = module.log_dict = lambda *a, **k: None
    batch = collate_trajectories(_trajectories(len(char_tokenizer), LENGTHS), pad_id=0)
    batch.behaviour_logp[4, 2] = float("nan")  # a trained token of the last part
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    module.training_step(batch, 0)
    assert module.skipped_steps == 1 and module.bad_steps_in_row == 1
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_parameters())


# ---------------------------------------------------------------------------- precision
def test_bf16_compute_keeps_fp32_masters_and_compute_copies_in_model_dtype(char_tokenizer):
    policy = make_random_policy(char_tokenizer)
    Precision(torch.bfloat16).cast_(policy.lm)  # as a bf16 checkpoint loads (rotary buffers stay fp32)
    module = PolicyValueModule(
        policy, RLObjective(CISPOLoss(), c_kl=0.1), torch.optim.AdamW, precision=Precision(torch.bfloat16)
    )
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}  # the masters
    assert {p.dtype for p in module.ref.parameters()} == {torch.float32}  # computes as the policy does
    copy_ = module.precision.compute_copy(module.policy)
    assert {p.dtype for p in copy_.lm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in copy_.value_head.parameters()} == {torch.float32}
    assert copy_.lm.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers as a bf16 load keeps them
    state = module.precision.compute_state(module.policy.state_dict())
    assert {v.dtype for k, v in state.items() if k.startswith("lm.")} == {torch.bfloat16}
    assert {v.dtype for k, v in state.items() if k.startswith("value_head.")} == {torch.float32}
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}  # the copies left it alone


def test_value_head_computes_in_fp32_under_autocast(char_tokenizer):
    """autocast lowered the head's F.linear to bf16 despite its .float() calls; the generators'
    value copy runs it in fp32."""
    policy = make_random_policy(char_tokenizer, hidden=64)
    torch.nn.init.normal_(policy.value_head.fc2.weight, std=0.5)
    hidden = torch.randn(4, 9, 64)
    want = policy.value_head(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = policy.value_head(hidden)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bf16_reference_equals_the_policy_at_step_0(char_tokenizer):
    policy = make_random_policy(char_tokenizer)
    module = PolicyValueModule(
        policy,
        RLObjective(CISPOLoss(), c_kl=0.1),
        torch.optim.AdamW,
        banned_token_ids=BANNED,
        precision=Precision(torch.bfloat16),
    )
    batch = collate_trajectories(_trajectories(len(char_tokenizer), LENGTHS), pad_id=0)
    with torch.no_grad():
        out = module.forward_batch(batch)
    assert torch.equal(out["logp"], out["ref_logp"])


def test_trainer_precision_other_than_32_is_refused_with_one_line(tmp_path):
    from tsd.config import ConfigError
    from tsd.train import _validate

    cfg = compose_train(["debug=smoke", "+trainer.precision=bf16-mixed"], tmp_path)
    with pytest.raises(ConfigError, match=r"^trainer.precision: 'bf16-mixed' is out of range .*model.dtype"):
        _validate(cfg)


def _moved(ckpt: Path, initial: dict[str, torch.Tensor]) -> float:
    """The share of the LM's entries in a checkpoint's fp32 masters that differ from ``initial``."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    moved = total = 0
    for k, v in initial.items():
        w = state[f"policy.lm.{k}"]
        assert w.dtype == torch.float32, (k, w.dtype)
        moved += int((w != v.float()).sum())
        total += v.numel()
    return moved / total


@pytest.mark.slow
def test_bf16_training_at_the_articles_lr_moves_nearly_every_weight(policy_dir, tmp_path):
    """The issue's measurement: ``experiment=cispo_countdown debug=smoke model.dtype=bfloat16
    module.optimizer.lr=5e-6``: with bf16 parameters 1.6% of the LM's entries moved in last.ckpt;
    with fp32 masters nearly all do, as with model.dtype=float32."""
    from safetensors.torch import load_file

    from tsd.train import train

    out = tmp_path / "run"
    cfg = compose_train(
        [
            "experiment=cispo_countdown",
            "debug=smoke",
            "model.dtype=bfloat16",
            "module.optimizer.lr=5e-6",
            "module.scheduler.warmup_steps=0",
            "callbacks.checkpoint.every_n_train_steps=1",  # last.ckpt holds step 3
            f"model.name_or_path={policy_dir}",
        ],
        out,
    )
    res = train(cfg)
    assert res["global_step"] == 3 and res["skipped_steps"] == 0
    initial = load_file(str(Path(policy_dir) / "model.safetensors"))
    assert _moved(out / "checkpoints" / "last.ckpt", initial) >= 0.9
    # the export is in model.dtype (the LM) and fp32 (the value head)
    exported = load_file(str(out / "policy" / "model.safetensors"))
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}
    head = load_file(str(out / "policy" / "value_head" / "model.safetensors"))
    assert {v.dtype for v in head.values()} == {torch.float32}


# ---------------------------------------------------------------------------- FSDP2, 2 gloo ranks
def _fsdp_rank(rank: int, world: int, port: int, policy_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from tsd.distributed.strategy import shard_policy
    from tsd.models.loading import load_policy

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        # as train.py loads it: fp32 masters from the bf16 checkpoint, a fresh fp32 value head
        policy, tok = load_policy(policy_dir, dtype=torch.float32)
        initial = {k: v.clone() for k, v in policy.lm.state_dict().items()}
        module = PolicyValueModule(
            policy,
            RLObjective(CISPOLoss(), c_ppo=1.0, c_value=1.0, c_kl=0.05),
            torch.optim.AdamW,
            banned_token_ids=BANNED,
            precision=Precision(torch.bfloat16),
            logprob_chunk_tokens=16,
            micro_batch_size=2,
            activation_checkpointing=True,
        ).train()
        mesh = init_device_mesh("cpu", (world,))
        shard_policy(module.policy, mesh, module.precision)
        module.precision.cast_(module.ref)  # as GeneratorTrainerStrategy.setup does
        # the optimiser right after sharding, as the strategy builds it: after a forward FSDP2's root
        # unit holds its gathered parameters, and an optimiser made then would step those, not the shards
        opt = torch.optim.AdamW(module.policy.parameters(), lr=5e-6)  # the article's
        batch = collate_trajectories(_trajectories(len(tok), LENGTHS, seed=rank), pad_id=0)
        with torch.no_grad():
            fwd = module.forward_batch(batch)
        same_at_init = bool(torch.equal(fwd["logp"], fwd["ref_logp"]))
        losses = []
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            res = module.backward_batch(_trajectories_batch(len(tok), rank, step))
            torch.nn.utils.clip_grad_norm_(module.policy.parameters(), 0.1)
            opt.step()
            losses.append(float(res.loss))
        shard_dtypes = sorted({str(p.dtype) for p in module.policy.parameters()})
        full = get_model_state_dict(
            module.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            moved = sum(int((full[f"lm.{k}"] != v).sum()) for k, v in initial.items())
            total = sum(v.numel() for v in initial.values())
            Path(out).write_text(
                json.dumps(
                    {
                        "moved": moved / total,
                        "losses": losses,
                        "same_at_init": same_at_init,
                        "shard_dtypes": shard_dtypes,
                        "initial_dtype": str(next(iter(initial.values())).dtype),
                    }
                )
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # as tests/test_distributed.py's gather ranks: leave without torch's exit-time teardown, which
    # sometimes aborts a gloo rank after its work is done and written
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _trajectories_batch(vocab: int, rank: int, step: int):
    return collate_trajectories(_trajectories(vocab, LENGTHS, seed=100 * step + rank), pad_id=0)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_builds_and_steps_from_a_bf16_checkpoint_without_a_value_head(char_tokenizer, tmp_path):
    """The article's trainers crashed at their first forward: a bf16 checkpoint and a fresh fp32
    value head in one FSDP2 unit (``FSDP expects uniform original parameter dtype``). Here: fp32
    master shards, bf16 compute, chunked log-probs, micro-batches and activation checkpointing on
    2 gloo ranks; the reference equals the policy at step 0; 3 steps at lr 5e-6 move nearly every
    master entry."""
    import torch.multiprocessing as mp
    from redis_server import free_port

    ckpt = tmp_path / "bf16"
    policy = make_random_policy(char_tokenizer, hidden=48, layers=2)
    policy.lm.to(torch.bfloat16).save_pretrained(ckpt, safe_serialization=True)  # no value_head/
    char_tokenizer.save_pretrained(ckpt)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "tsd_char_tokenizer": True}))
    assert not (ckpt / "value_head").exists()
    out = tmp_path / "fsdp.json"
    mp.start_processes(_fsdp_rank, args=(2, free_port(), str(ckpt), str(out)), nprocs=2, start_method="spawn")
    res = json.loads(out.read_text())
    assert res["initial_dtype"] == "torch.float32" and res["shard_dtypes"] == ["torch.float32"]
    assert res["same_at_init"]
    assert all(map(lambda x: x == x and abs(x) < 1e6, res["losses"]))  # finite
    assert res["moved"] >= 0.9, res
