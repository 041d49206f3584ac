"""MeanAtKEval samples with the run's configured sampler (the factory the generation uses), made
once and given the current weights at each later evaluation. With sampler=vllm the real check is in
tests/test_vllm_sampler.py (the smoke training run logs the eval sampler's class).

    python -m pytest tests/test_eval_callback.py -q
"""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch

from tsd.callbacks.mean_at_k import MeanAtKEval
from tsd.envs.countdown import CountdownEnv
from tsd.models.loading import load_policy
from tsd.samplers.hf import HFSampler


class RecordingSampler(HFSampler):
    """An HFSampler that remembers how it was made and what weights it was given."""

    made: list[dict] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        RecordingSampler.made.append(kwargs)
        self.loaded: list[int] = []

    def load_weights(self, state_dict, version: int) -> None:
        super().load_weights(state_dict, version)
        self.loaded.append(version)


def fake_trainer(policy, step: int):
    return SimpleNamespace(
        global_step=step,
        strategy=SimpleNamespace(full_policy=lambda module: policy, broadcast=lambda obj, src=0: obj),
        is_global_zero=True,
        callback_metrics={},
        loggers=[],
        datamodule=SimpleNamespace(
            generation=SimpleNamespace(generated_tokens=lambda: 0, prefill_tokens=lambda: 0)
        ),
    )


def test_eval_samples_with_the_runs_sampler_factory(policy_dir):
    policy, tok = load_policy(policy_dir)
    RecordingSampler.made = []
    # the run's sampler config as Hydra makes it (_partial_: true), with its own settings
    make_sampler = functools.partial(RecordingSampler, temperature=1.0, top_p=1.0, max_batch_size=7, seed=0)
    cb = MeanAtKEval(num_problems=2, k=2, max_new_tokens=16, temperature=0.5, top_p=0.9, seed=11,
                     draw_tree=False, sampler_kwargs={"max_batch_size": 3})  # fmt: skip
    cb.setup_eval(CountdownEnv(n_train=20, n_test=4), tok, make_sampler)
    module = SimpleNamespace(device=torch.device("cpu"), trained_tokens=0)

    cb._run(fake_trainer(policy, 0), module)
    assert RecordingSampler.made == [
        {"device": torch.device("cpu"), "seed": 11, "temperature": 0.5, "top_p": 0.9, "max_batch_size": 3}
    ]
    sampler = cb.sampler
    assert (
        isinstance(sampler, RecordingSampler) and sampler.max_batch_size == 3 and sampler.temperature == 0.5
    )
    first_tokens = sampler.generated_tokens
    assert first_tokens > 0 and cb.history[-1]["step"] == 0  # it evaluated with that sampler

    # a later evaluation reuses it (one vLLM engine per run), with the current weights, reseeded
    with torch.no_grad():
        policy.value_head.fc2.bias.add_(0.1)
    cb._run(fake_trainer(policy, 5), module)
    assert len(RecordingSampler.made) == 1 and cb.sampler is sampler and sampler.loaded == [5]
    assert sampler.version == 5 and cb.history[-1]["step"] == 5
    # same weights' logits, same seed: the same samples, so the same tokens again
    assert sampler.generated_tokens == 2 * first_tokens


def test_the_eval_sampler_on_another_device_gets_a_copy_of_the_policy(policy_dir):
    """HFSampler (and VLLMSampler's value copy) moves its model to its device: on a GPU that moved
    the trainers' CPU shadow there for good (3.1 GB at paper scale). The sampler on another device
    than the policy's gets a copy; on the same device it shares it (a copy would only cost memory)."""
    policy, tok = load_policy(policy_dir)
    made = []
    cb = MeanAtKEval(num_problems=1, k=1, max_new_tokens=4, draw_tree=False)
    cb.setup_eval(
        CountdownEnv(n_train=20, n_test=2),
        tok,
        lambda model, *a, **kw: made.append(model) or HFSampler(model, *a, **kw),
    )
    cb._sampler(policy, torch.device("cpu"), 0)
    assert made[-1] is policy  # the same device: shared
    cb.sampler = None
    meta_policy = copy.deepcopy(policy).to(
        "meta"
    )  # the policy on another device than the sampler's (no GPU here)
    with pytest.raises(
        NotImplementedError
    ):  # a meta model cannot be moved; what matters is what it was given
        cb._sampler(meta_policy, torch.device("cpu"), 0)
    assert made[-1] is not meta_policy and all(p.device.type == "meta" for p in meta_policy.parameters())


def test_eval_without_setup_says_so(policy_dir):
    policy, _ = load_policy(policy_dir)
    cb = MeanAtKEval(num_problems=1, k=1)
    cb.env = CountdownEnv(n_train=20, n_test=2)  # set, but setup_eval() never gave it a sampler
    with pytest.raises(RuntimeError, match="setup_eval"):
        cb._run(fake_trainer(policy, 0), SimpleNamespace(device=torch.device("cpu")))


def test_the_eval_engine_goes_after_the_last_steps_evaluation(policy_dir):
    """The last step's evaluation is the run's last (on_train_end finds it done): its engine is shut
    down then, before the checkpoint Lightning saves next gathers the full model and optimiser state
    on rank 0's host (the rehearsal's rank 0 was killed for memory with both at once)."""
    policy, tok = load_policy(policy_dir)
    closed: list[int] = []

    class ClosingSampler(HFSampler):
        def close(self) -> None:
            closed.append(self.version)

    cb = MeanAtKEval(every_n_steps=2, num_problems=1, k=1, max_new_tokens=4, draw_tree=False)
    cb.setup_eval(CountdownEnv(n_train=20, n_test=2), tok, ClosingSampler)
    module = SimpleNamespace(device=torch.device("cpu"), trained_tokens=0)

    def at(step: int, **kw):
        t = fake_trainer(policy, step)
        t.max_steps, t.should_stop = kw.get("max_steps", 4), kw.get("should_stop", False)
        cb.on_train_batch_end(t, module, None, None, 0)
        return t

    at(2)  # a scheduled evaluation: the engine stays for the next one
    assert cb.sampler is not None and closed == [] and cb.history[-1]["step"] == 2
    t = at(4)  # max_steps: evaluated, then the engine shut down
    assert cb.history[-1]["step"] == 4 and cb.sampler is None and len(closed) == 1
    cb.on_train_end(t, module)  # already evaluated at this step: no new engine
    assert cb.sampler is None and [h["step"] for h in cb.history] == [2, 4]
    at(3, should_stop=True)  # a stop rule: the same
    assert cb.history[-1]["step"] == 3 and cb.sampler is None and len(closed) == 2
