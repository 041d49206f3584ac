"""The RL core with a real policy on CPU: rollouts, collation, the streaming DataModule, the
module's loss and step, NaN handling, resume, export, and config errors."""

from __future__ import annotations

import copy
import csv
import json
import statistics
import threading
import time

import pytest
import torch
from conftest import compose_train

from tsd.buffers.memory import MemoryBuffer
from tsd.config import ConfigError
from tsd.data.collate import collate_trajectories
from tsd.data.datamodule import TrajectoryDataModule
from tsd.data.policy_clock import PolicyClock
from tsd.envs.countdown import CountdownEnv
from tsd.generation.local import LocalGeneration
from tsd.generation.remote import RemoteGeneration
from tsd.generation.worker import RolloutWorker
from tsd.models.loading import load_policy
from tsd.models.policy_value import token_logprobs
from tsd.rl.trajectory import Trajectory
from tsd.rollouts.best_of_n import BestOfNRollout
from tsd.rollouts.group import GroupRollout
from tsd.samplers.hf import HFSampler, banned_token_ids, eos_token_ids


@pytest.fixture(scope="module")
def env():
    return CountdownEnv(n_train=200, n_test=20)


@pytest.fixture
def policy(policy_dir):
    return load_policy(policy_dir)


def _sampler(policy, seed=0):
    model, tok = policy
    return HFSampler(model, tok, temperature=1.0, seed=seed)


def _recompute_logp(model, tok, batch):
    """Teacher-forced log-probs at the collated target positions, as the trainer computes them."""
    with torch.no_grad():
        logits, _, _ = model(batch.input_ids, attention_mask=batch.attention_mask)
    banned = banned_token_ids(tok, eos_token_ids(tok, model))
    return token_logprobs(logits[:, :-1], batch.input_ids[:, 1:], 1.0, banned)  # (B, T)


def test_group_rollout_normalises_advantages_per_group(policy, env):
    out = GroupRollout(group_size=4, max_new_tokens=48).run(env.train[:3], _sampler(policy), env)
    assert len(out.trajectories) == 12
    for pid in {t.problem_id for t in out.trajectories}:
        g = [t for t in out.trajectories if t.problem_id == pid]
        rewards = [t.reward for t in g]
        advs = [t.advantage for t in g]
        assert abs(sum(advs)) < 1e-6  # centred
        if statistics.stdev(rewards) > 0:  # (r - mean) / (sample std + eps), as TRL's GRPO
            m, s = statistics.fmean(rewards), statistics.stdev(rewards)
            assert advs == pytest.approx([(r - m) / (s + 1e-6) for r in rewards], abs=1e-6)
        else:
            assert advs == [0.0] * len(advs)
    assert out.generated_tokens == sum(t.num_tokens for t in out.trajectories)
    assert out.stats["rollout/reward_mean"] == pytest.approx(
        statistics.fmean(t.reward for t in out.trajectories)
    )


def test_group_rollout_drops_zero_variance_groups(policy, env):
    out = GroupRollout(group_size=2, max_new_tokens=1, drop_zero_variance=True).run(
        env.train[:2], _sampler(policy), env
    )
    # a single token can never close an answer: every completion is invalid (-1), both groups dropped
    assert out.trajectories == [] and out.stats["rollout/dropped_groups"] == 2.0


def test_best_of_n_keeps_the_best_by_dense_reward(policy, env):
    torch.manual_seed(0)
    out = BestOfNRollout(n=6, max_new_tokens=48).run(env.train[:3], _sampler(policy), env)
    assert len(out.trajectories) == 3
    assert all(t.advantage is None for t in out.trajectories)  # value baseline in the trainer
    # the same seed reproduces the 6 candidates: the kept one has the max dense reward
    from tsd.rollouts.sampling import sample_and_grade

    groups = sample_and_grade(env.train[:3], _sampler(policy), env, 6, 48)
    for t, g in zip(out.trajectories, groups):
        assert t.reward == max(s.score.dense for s in g)


def test_collated_behaviour_logprobs_equal_trainer_recomputation(policy, env):
    """Alignment of prompt/completion/targets and banned-id masking: at unchanged weights the
    trainer's pi_theta equals the recorded pi_behaviour, so rho = 1 exactly there (and only there)."""
    model, tok = policy
    out = GroupRollout(group_size=3, max_new_tokens=40).run(env.train[:2], _sampler(policy), env)
    batch = collate_trajectories(out.trajectories, tok.pad_token_id)
    logp = _recompute_logp(model, tok, batch)
    m = batch.mask.bool()
    assert m.sum() == sum(t.num_tokens for t in out.trajectories)
    assert torch.allclose(logp[m], batch.behaviour_logp[m], atol=1e-4)


@pytest.mark.parametrize("trunk_grad", [True, False])
def test_value_trunk_grad_decides_whether_the_value_loss_trains_the_lm(policy, env, trunk_grad):
    """module.value_trunk_grad=false: the value loss reaches the value head only; the values (what
    search and the baseline read) are the same either way."""
    from tsd.module import PolicyValueModule
    from tsd.rl.losses import CISPOLoss, RLObjective

    model, tok = policy
    torch.nn.init.normal_(model.value_head.fc2.weight, std=0.1)  # the bundled head starts at fc2 = 0
    out = BestOfNRollout(n=2, max_new_tokens=30).run(env.train[:2], _sampler(policy), env)
    batch = collate_trajectories(out.trajectories, tok.pad_token_id)
    # a value-only objective: the only gradient is the value loss's
    objective = RLObjective(CISPOLoss(), c_ppo=0.0, c_value=1.0, c_kl=0.0)
    module = PolicyValueModule(model, objective, optimizer=torch.optim.SGD, value_trunk_grad=trunk_grad)
    loss = module.compute_loss(batch).loss
    assert loss > 0
    loss.backward()
    head = [p.grad for n, p in module.policy.named_parameters() if n.startswith("value_head.")]
    trunk = [p.grad for n, p in module.policy.named_parameters() if n.startswith("lm.model.")]
    assert all(g is not None and g.abs().sum() > 0 for g in head)
    trunk_norm = sum(float(g.abs().sum()) for g in trunk if g is not None)
    assert (trunk_norm > 0) == trunk_grad, trunk_norm


def _traj(version, reward=0.5, pid=0):
    return Trajectory(
        problem_id=pid,
        prompt_ids=[1, 5, 6],
        completion_ids=[7, 8],
        behaviour_logprobs=[-0.1, -0.2],
        reward=reward,
        correct=False,
        policy_version=version,
        rollout="test",
    )


def _elsewhere(buffer, env) -> RemoteGeneration:
    """A generation that runs elsewhere (the DataModule only reads), on an in-process buffer."""
    return RemoteGeneration(GroupRollout(), env, HFSampler, None, buffer)


def _dm(buffer, env, **kw) -> TrajectoryDataModule:
    return TrajectoryDataModule(buffer, _elsewhere(buffer, env), pad_id=0, **{"max_wait": 5, **kw})


def test_policy_clock_counts_optimiser_steps_hand_computed():
    """Versions are optimiser steps: with nothing waiting in the buffer every batch is generated by
    the weights last published, so the lag of step s is s mod sync_every."""
    for sync_every, expected in ((1, [0] * 9), (2, [0, 1] * 4 + [0]), (8, [*range(8), 0])):
        clock, lags, published = PolicyClock(sync_every=sync_every, max_lag=16), [], []
        for step in range(9):
            clock.advance(step)  # WeightSync: after the optimiser step that made global_step = step
            if clock.due():
                clock.publish(step)
            published.append(clock.published)
            lags.append(clock.lag(clock.published))  # a batch generated now, trained at this step
        assert lags == expected, (sync_every, lags)
        assert published == [s - s % sync_every for s in range(9)]
    clock = PolicyClock(sync_every=8, max_lag=4)
    clock.advance(12)
    assert [clock.is_stale(v) for v in (7, 8, 12)] == [True, False, False]  # 12 - 7 = 5 > 4
    assert clock.ahead(13) is not None and clock.ahead(12) is None


def test_datamodule_batches_drops_stale_and_acks_after_step(env):
    buf = MemoryBuffer()
    dm = _dm(buf, env, batch_size=2, max_lag=1)
    dm.clock.advance(3)
    buf.put(
        [_traj(0), _traj(2), _traj(3), _traj(1), _traj(3), _traj(3)]
    )  # versions 0 and 1 are > 1 step behind
    batch = dm.next_batch()
    assert batch.versions.tolist() == [2, 3] and batch.lags.tolist() == [1, 0]
    assert batch.input_ids.shape == (2, 5) and batch.mask.tolist() == [[0, 0, 1, 1]] * 2
    assert dm.dropped_stale == 1  # version 0 dropped; version 1 not read yet
    assert buf.pending() == 2  # delivered, not acked until the optimiser step
    dm.ack(batch.buffer_ids)
    assert buf.pending() == 0
    batch = dm.next_batch()
    assert batch.versions.tolist() == [3, 3] and dm.dropped_stale == 2


def test_a_sync_between_fetch_and_step_cannot_let_a_stale_trajectory_through(env):
    """Lightning reads a batch one step before training it; the step in between must not let a
    trajectory more than max_lag steps old be trained (it is dropped and replaced)."""
    buf = MemoryBuffer()
    dm = _dm(buf, env, batch_size=2, max_lag=1)
    dm.clock.advance(2)
    buf.put([_traj(1), _traj(2), _traj(1), _traj(2), _traj(3)])
    stream = iter(dm.train_dataloader())
    pending = next(stream)  # read at step 2: versions 1 and 2 are both within max_lag
    assert [it.trajectory.policy_version for it in pending.items] == [1, 2]
    dm.clock.advance(3)  # the step before this batch's step
    batch = dm.on_before_batch_transfer(pending)
    assert batch.versions.tolist() == [2, 2]  # the version-1 one dropped, the next fresh one in
    assert dm.dropped_stale == 2  # the read one, and the version-1 one in the buffer after it
    assert batch.input_ids.shape == (2, 5) and len(batch.buffer_ids) == 2
    assert dm.on_before_batch_transfer(batch) is batch  # an already collated batch passes through
    buf.put([_traj(3)])
    assert dm.next_batch().versions.tolist() == [3, 3]


def test_distributed_trainer_logs_the_generators_rollout_statistics(env):
    buf = MemoryBuffer()
    dm = _dm(buf, env, batch_size=2, max_lag=4)
    a, b = _traj(0), _traj(0)
    a.stats.update({"search/tree_size": 10.0, "rollout/correct_mean": 0.5, "gen_id": 0.0, "gen_tokens": 7.0})
    b.stats.update({"search/tree_size": 20.0, "perf/rollout_seconds": 2.0, "gen_id": 0.0, "gen_tokens": 9.0})
    buf.put([a, b])
    stats = dm.next_batch().stats
    assert stats["search/tree_size"] == 15.0 and stats["rollout/correct_mean"] == 0.5
    assert stats["perf/rollout_seconds"] == 2.0 and stats["compute/generated_tokens"] == 9.0
    assert "gen_id" not in stats


def test_generated_tokens_survive_a_resume_and_keep_counting(env):
    """The checkpoint keeps the generators' token count (it used to be read but never written), and
    a resumed run's generators, which count from 0 again, add to it instead of hiding under it."""
    buf = MemoryBuffer()
    dm = _dm(buf, env, batch_size=1)
    for gid, tokens in ((0, 700.0), (1, 300.0), (0, 900.0)):
        t = _traj(0)
        t.stats.update({"gen_id": float(gid), "gen_tokens": tokens})
        buf.put([t])
        dm.ack(dm.next_batch().buffer_ids)
    assert dm.stats()["compute/generated_tokens"] == 1200.0  # 900 (generator 0) + 300 (generator 1)
    state = dm.state_dict()
    assert state["generation"]["generated_tokens"] == 1200
    resumed = _dm(MemoryBuffer(), env, batch_size=1)
    resumed.load_state_dict(state)
    assert resumed.stats()["compute/generated_tokens"] == 1200.0
    t = _traj(0)
    t.stats.update({"gen_id": 0.0, "gen_tokens": 50.0})  # generator 0, restarted
    resumed.buffer.put([t])
    assert resumed.next_batch().stats["compute/generated_tokens"] == 1250.0


def test_datamodule_without_generator_fails_clearly_instead_of_hanging(env):
    dm = _dm(MemoryBuffer(), env, batch_size=2, max_wait=0.3, get_timeout=0.05)
    with pytest.raises(RuntimeError, match="generators alive"):
        dm.next_batch()


def test_the_first_trajectory_may_take_start_wait_then_max_wait_holds(env):
    """The generators' start-up (vLLM compiles, the first 100-wave searches) is waited for
    data.start_wait; after the first trajectory a silence of data.max_wait stops the run."""
    buf = MemoryBuffer()
    dm = _dm(buf, env, batch_size=1, max_wait=0.2, start_wait=1.0, get_timeout=0.05)
    threading.Timer(0.6, lambda: buf.put([_traj(0)])).start()  # later than max_wait, within start_wait
    t0 = time.monotonic()
    assert dm.next_batch().input_ids.shape[0] == 1 and time.monotonic() - t0 >= 0.5
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no trajectory arrived for 0s \(data.max_wait\)"):
        dm.next_batch()
    assert time.monotonic() - t0 < 0.9  # max_wait now, not start_wait
    fresh = _dm(MemoryBuffer(), env, batch_size=1, max_wait=0.2, start_wait=0.5, get_timeout=0.05)
    with pytest.raises(RuntimeError, match="data.start_wait, before the first one"):
        fresh.next_batch()


def test_local_generation_refills_the_buffer_and_its_problem_stream_is_resumable(policy, env):
    model, tok = policy
    buf = MemoryBuffer()
    gen = LocalGeneration(GroupRollout(group_size=2, max_new_tokens=16), env, HFSampler, tok, buf, 3, seed=1)
    gen.start(model)
    dm = TrajectoryDataModule(buf, gen, batch_size=4, pad_id=0)
    batch = dm.next_batch()
    w = gen.worker
    assert batch.input_ids.shape[0] == 4 and w.rollouts == 1 and len(buf) == 2
    state = w.state_dict()
    nxt = [p.id for p in w.next_problems()]
    w2 = RolloutWorker(GroupRollout(group_size=2), _sampler(policy), env, MemoryBuffer(), 3, seed=1)
    w2.load_state_dict(state)
    assert [p.id for p in w2.next_problems()] == nxt


def test_whole_rollouts_batches_never_split_a_rollout(policy, env):
    """A rollout of 3 problems x group 2 = 6 trajectories: with batch_size 4 and whole_rollouts a
    batch is the whole rollout (6, nothing held over), with batch_size 8 two whole rollouts."""
    model, tok = policy
    buf = MemoryBuffer()
    gen = LocalGeneration(GroupRollout(group_size=2, max_new_tokens=8), env, HFSampler, tok, buf, 3, seed=1)
    gen.start(model)
    dm = TrajectoryDataModule(buf, gen, batch_size=4, pad_id=0, whole_rollouts=True)
    assert len(dm.next_batch()) == 6 and len(buf) == 0 and gen.worker.rollouts == 1
    dm.batch_size = 8
    assert len(dm.next_batch()) == 12 and len(buf) == 0 and gen.worker.rollouts == 3
    split = TrajectoryDataModule(buf, gen, batch_size=4, pad_id=0)  # without: 4, and 2 held in the buffer
    assert len(split.next_batch()) == 4 and len(buf) == 2
    with pytest.raises(ConfigError, match="data.whole_rollouts: .* generation=remote"):
        TrajectoryDataModule(buf, _elsewhere(buf, env), batch_size=4, whole_rollouts=True)


def _run(overrides, tmp_path):
    from tsd.train import train

    return train(compose_train(overrides, tmp_path))


SMALL = ["debug=smoke", "callbacks.eval.at_start=false", "callbacks.checkpoint.every_n_train_steps=1"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["cispo_countdown", "bon_countdown"])
def test_short_training_run_changes_the_parameters_and_exports(experiment, policy_dir, tmp_path):
    before = load_policy(policy_dir)[0].state_dict()
    # cispo: one rollout (2 problems x group 8) fills exactly one batch
    extra = ["data.batch_size=16"] if experiment == "cispo_countdown" else []
    res = _run([f"experiment={experiment}", f"model.name_or_path={policy_dir}", *SMALL, *extra], tmp_path)
    assert res["global_step"] == 3 and res["skipped_steps"] == 0
    assert res["compute/trained_tokens"] > 0 and res["compute/generated_tokens"] > 0
    after, tok = load_policy(tmp_path / "policy")  # exported, loadable, char tokenizer detected
    text = "[3,5,7,2]->23\n<step>3 + 5=8</step>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # spaces kept
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("lm.") for k in changed)
    # the value head trains only where the loss has a value term (cispo_countdown: loss.c_value 0)
    c_value = compose_train([f"experiment={experiment}"], tmp_path).loss.c_value
    assert any(k.startswith("value_head.") for k in changed) == (c_value > 0), (c_value, changed)
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for key in (
        "train/loss",
        "train/pg_loss",
        "train/value_loss",
        "train/kl",
        "train/reward",
        "train/correct",
        "train/ratio_mean",
        "train/clip_frac",
        "train/policy_lag",
        "eval/mean@2",
        "compute/generated_tokens",
        "compute/trained_tokens",
    ):
        assert key in header, key
    assert json.loads((tmp_path / "results.json").read_text())["global_step"] == 3
    # the in-process rollout runs when a batch is about to be trained, after the step before it
    # synced: with sync_every=1 (debug=smoke) every step trains on its own weights' data (lag 0)
    col = header.index("train/policy_lag")
    lags = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert lags == [0.0, 0.0, 0.0], lags


@pytest.mark.slow
@pytest.mark.parametrize("sync_every,stop_at", [(1, 2), (2, 3)], ids=["on_policy", "between_syncs"])
def test_resume_restores_step_optimizer_and_problem_stream(policy_dir, tmp_path, sync_every, stop_at):
    """A run stopped at ``stop_at`` and resumed to ``stop_at + 2`` ends with the very weights of an
    uninterrupted run. With sync_every=2 the checkpoint at step 3 falls between two publications:
    the generator copy holds the weights of step 2, which the checkpoint carries."""
    common = [
        "experiment=cispo_countdown",
        f"model.name_or_path={policy_dir}",
        *SMALL,
        f"data.sync_every={sync_every}",
    ]
    a = tmp_path / "a"
    _run([*common, f"trainer.max_steps={stop_at}"], a)
    ckpt = a / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == stop_at and state["optimizer_states"][0]["state"]
    dm_state = state["TrajectoryDataModule"]
    published = stop_at - stop_at % sync_every
    assert dm_state["clock"]["published"] == published and dm_state["generation"]["worker"]["cursor"] > 0
    assert ("weights" in dm_state["generation"]) == (published != stop_at)
    b = tmp_path / "b"
    res = _run([*common, f"trainer.max_steps={stop_at + 2}", f"ckpt_path={ckpt}"], b)
    assert res["global_step"] == stop_at + 2
    # resumed == uninterrupted, bit for bit: optimiser moments, RNGs, generator weights and version,
    # problem stream and buffer contents all came back
    c = tmp_path / "c"
    _run([*common, f"trainer.max_steps={stop_at + 2}"], c)
    resumed, straight = load_policy(b / "policy")[0].state_dict(), load_policy(c / "policy")[0].state_dict()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


@pytest.mark.slow
def test_tree_records_held_in_a_checkpoint_resume_bit_for_bit(policy_dir, tmp_path):
    """The whole-tree emission with batches smaller than a rollout: the checkpoint holds records
    with per-token advantages in its buffer snapshot; a resume trains on them and ends with the
    very weights of an uninterrupted run (one bit of an advantage off would move them)."""
    common = ["experiment=tree_countdown", f"model.name_or_path={policy_dir}", *SMALL,
              "data.whole_rollouts=false", "data.batch_size=3", "data.max_lag=4",
              "rollout.workers=2", "rollout.iterations=2"]  # fmt: skip
    a = tmp_path / "a"
    _run([*common, "trainer.max_steps=2"], a)
    state = torch.load(a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    held = [Trajectory.from_json(r) for r in state["TrajectoryDataModule"]["buffer"]]
    assert held and all(t.token_advantages and len(t.token_advantages) == t.num_tokens for t in held)
    b, c = tmp_path / "b", tmp_path / "c"
    _run([*common, "trainer.max_steps=4", f"ckpt_path={a / 'checkpoints' / 'last.ckpt'}"], b)
    _run([*common, "trainer.max_steps=4"], c)
    resumed, straight = load_policy(b / "policy")[0].state_dict(), load_policy(c / "policy")[0].state_dict()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


@pytest.mark.slow
@pytest.mark.parametrize("sync_every", [1, 2, 8])
def test_policy_lag_is_counted_in_optimiser_steps(policy_dir, tmp_path, sync_every):
    """One process, one group rollout per batch: step s trains on what the weights published at
    step s - s mod sync_every generated, so train/policy_lag reads s mod sync_every (with
    sync_every=2 it used to read 0 at every step: it counted weight syncs)."""
    steps = 9
    _run(
        [
            "experiment=cispo_countdown",
            f"model.name_or_path={policy_dir}",
            *SMALL,
            "callbacks.eval=null",
            "callbacks.checkpoint=null",
            "callbacks.export=null",
            "data.batch_size=16",  # = 2 problems x group 8: one rollout per step
            f"data.sync_every={sync_every}",
            "data.max_lag=16",
            f"trainer.max_steps={steps}",
        ],
        tmp_path,
    )
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/policy_lag")]
    assert [float(r["train/policy_lag"]) for r in rows] == [float(s % sync_every) for s in range(steps)]
    assert [float(r["rollout/version"]) for r in rows] == [float(s - s % sync_every) for s in range(steps)]
    assert all(float(r["train/dropped_stale"]) == 0 for r in rows)


class _NaNObjective(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.c_kl, self.c_value = inner, inner.c_kl, inner.c_value
        self.normalization = inner.normalization

    def forward(self, **kw):
        out = self.inner(**kw)
        out.loss = out.loss * float("nan")
        return out


@pytest.mark.slow
def test_nan_loss_skips_the_step_leaves_weights_and_stops_clearly(policy_dir, tmp_path, monkeypatch):
    import tsd.train as train_mod
    from tsd.module import NonFiniteLossError

    real = train_mod.build

    def build(cfg, field, **kw):
        obj = real(cfg, field, **kw)
        return _NaNObjective(obj) if field == "loss" else obj

    monkeypatch.setattr(train_mod, "build", build)
    import tsd.models.loading

    loaded, real_load = [], tsd.models.loading.load_policy

    def load(*args, **kwargs):  # keeps the policy train() trains, to look at it after the error
        out = real_load(*args, **kwargs)
        loaded.append(out[0])
        return out

    monkeypatch.setattr(tsd.models.loading, "load_policy", load)
    before = real_load(policy_dir)[0].state_dict()
    with pytest.raises(NonFiniteLossError, match="max_bad_steps=2"):
        _run(
            [
                "experiment=cispo_countdown",
                f"model.name_or_path={policy_dir}",
                *SMALL,
                "module.max_bad_steps=2",
                "trainer.max_steps=5",
            ],
            tmp_path,
        )
    # the optimiser never stepped: the weights train() held are the loaded ones, bit for bit (no
    # NaN reached them), and nothing was exported
    (policy,) = loaded
    after = policy.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not (tmp_path / "policy").exists()


@pytest.mark.parametrize(
    "override,field",
    [
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("module.optimizer.lr=-1", "module.optimizer.lr"),
        ("rollout.group_size=0", "group_size"),
        ("env.high=0", "high"),
        ("model.dtype=float8", "model.dtype"),
        ("loss.pg_loss.eps_high=-1", "eps_high"),
        ("data.max_wait=0", "data.max_wait"),
        ("module.grad_clip=-1", "module.grad_clip"),
        ("+data.batchsize=4", "data.batchsize"),
        ("+module.optimizer.betaz=1", "module.optimizer.betaz"),
    ],
)
def test_bad_config_fails_before_compute_naming_the_field(override, field, policy_dir, tmp_path, monkeypatch):
    """In process: the error names the field, comes before the model is loaded (loading it fails
    this test) and leaves the output directory empty. tests/test_user_errors.py runs the commands
    as subprocesses: exit code 2, one line, no traceback."""
    import tsd.models.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the config error")

    monkeypatch.setattr(tsd.models.loading, "load_policy", no_load)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _run(["experiment=cispo_countdown", f"model.name_or_path={policy_dir}", override], out)
    assert not out.exists() or not any(out.iterdir())


def test_without_a_value_loss_the_value_head_is_not_trained(policy):
    """c_value = 0 (the group baseline): the value head is frozen and left out of the optimiser, so
    a checkpoint never lacks the state of a parameter that requires grad (a sharded resume refuses
    that); with a value loss it trains."""
    from tsd.module import PolicyValueModule
    from tsd.rl.losses import CISPOLoss, RLObjective

    for c_value, trained in ((0.0, False), (0.1, True)):
        module = PolicyValueModule(
            copy.deepcopy(policy[0]), RLObjective(CISPOLoss(), c_value=c_value), optimizer=torch.optim.AdamW
        )
        opt = module.configure_optimizers()
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        head = list(module.policy.value_head.parameters())
        assert all(p.requires_grad is trained for p in head)
        assert all((id(p) in in_opt) is trained for p in head)
        assert all(id(p) in in_opt for p in module.policy.lm.parameters())
