"""MeanAtKEval samples with the run's configured sampler (the factory the generation uses), made
once and given the current weights at each later evaluation. With sampler=vllm the real check is in
tests/test_vllm_sampler.py (the smoke training run logs the eval sampler's class).

    python -m pytest tests/test_eval_callback.py -q
"""

from __future__ import annotations

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
        strategy=SimpleNamespace(full_policy=lambda module: policy),
        is_global_zero=True,
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
    # the sampler samples with a copy of its own: HFSampler (and VLLMSampler's value copy) moves its
    # model to its device, which on a GPU moved the trainers' CPU shadow there for good
    assert sampler.model is not policy and all(p.device.type == "cpu" for p in policy.parameters())
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


def test_eval_without_setup_says_so(policy_dir):
    policy, _ = load_policy(policy_dir)
    cb = MeanAtKEval(num_problems=1, k=1)
    cb.env = CountdownEnv(n_train=20, n_test=2)  # set, but setup_eval() never gave it a sampler
    with pytest.raises(RuntimeError, match="setup_eval"):
        cb._run(fake_trainer(policy, 0), SimpleNamespace(device=torch.device("cpu")))
