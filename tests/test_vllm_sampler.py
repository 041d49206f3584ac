"""VLLMSampler.

Two kinds of test:
- against real vLLM (marked ``gpu``; skipped here: "vLLM is not installed (needs a CUDA GPU)"):
  behaviour log-probs equal HF teacher forcing on the same weights, weight sync, stop reasons;
- against a stand-in ``vllm`` module (always run): the glue this repo owns, i.e. the arguments
  given to ``LLM`` / ``SamplingParams``, how outputs become Continuations (finish reasons,
  log-probs), weight renaming + prefix-cache reset, and the HF value copy. The stand-in mimics
  vLLM's public objects (``RequestOutput.outputs[i].token_ids / logprobs / finish_reason /
  stop_reason``); it cannot check vLLM itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_random_policy
from test_sampler import states_of, teacher_forced_logprobs

from tsd.samplers.hf import HFSampler
from tsd.samplers.vllm import BAN_BIAS, VLLMSampler, WeightSyncWorkerExtension, vllm_weights

HAS_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(
    not (HAS_VLLM and torch.cuda.is_available()), reason="vLLM is not installed (needs a CUDA GPU)"
)


# ---------------------------------------------------------------------------- a stand-in vllm
@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]]
    finish_reason: str
    stop_reason: int | str | None


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class FakeLLM:
    """Records its arguments; ``script(prompt_ids, index) -> (token_ids, finish_reason, stop_reason)``."""

    last: FakeLLM

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[list[dict], SamplingParams]] = []
        self.rpc: list[tuple[str, tuple]] = []
        self.resets = 0
        self.script = lambda prompt, i: ([7 + i], "length", None)
        FakeLLM.last = self

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        out = []
        for p in prompts:
            conts = []
            for i in reversed(range(params.kwargs["n"])):  # out of order: the sampler sorts by index
                toks, finish, stop = self.script(p["prompt_token_ids"], i)
                lps = [{t: Logprob(-0.1 * (k + 1))} for k, t in enumerate(toks)]
                conts.append(CompletionOutput(i, toks, lps, finish, stop))
            out.append(RequestOutput(conts))
        return out

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.rpc.append((method, args))
        return [None]

    def reset_prefix_cache(self):
        self.resets += 1
        return True


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: dict(kw)  # a TypedDict in vLLM
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return vllm


def make(policy, tok, **kwargs) -> VLLMSampler:
    return VLLMSampler(policy, tok, checkpoint_dir="/models/policy", value_device="cpu", **kwargs)


# ---------------------------------------------------------------------------- glue (stand-in)
def test_without_vllm_it_says_why_it_cannot_run(monkeypatch, random_policy, char_tokenizer):
    # (this module imported tsd.samplers.vllm already: vLLM is imported lazily, in the class)
    monkeypatch.setitem(sys.modules, "vllm", None)  # "import vllm" raises ImportError
    with pytest.raises(ImportError, match="HFSampler"):
        make(random_policy, char_tokenizer)


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p")]
)
def test_bad_arguments_are_rejected(random_policy, char_tokenizer, kwargs, field):
    with pytest.raises(ValueError, match=field):
        make(random_policy, char_tokenizer, **kwargs)


def test_llm_and_sampling_params(fake_vllm, random_policy, char_tokenizer):
    tok = char_tokenizer
    sampler = make(random_policy, tok, temperature=0.7, top_p=0.9, seed=3, llm_kwargs={"enforce_eager": True})
    llm = FakeLLM.last
    assert llm.kwargs["model"] == "/models/policy"
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs"  # temperature/top-p applied
    assert llm.kwargs["seed"] == 3 and llm.kwargs["enable_prefix_caching"] and llm.kwargs["enforce_eager"]
    module, cls = llm.kwargs["worker_extension_cls"].rsplit(".", 1)
    assert getattr(importlib.import_module(module), cls) is WeightSyncWorkerExtension

    states = states_of(tok)
    sampler.sample(states, n=3, max_new_tokens=5, stop="step")
    prompts, params = llm.calls[-1]
    assert [p["prompt_token_ids"] for p in prompts] == states
    step, answer = tok.convert_tokens_to_ids("</step>"), tok.convert_tokens_to_ids("</answer>")
    assert params.kwargs == {
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 5,
        "logprobs": 0,
        "stop": [],  # both tags are single tokens of the char tokenizer: stopped by id
        "stop_token_ids": sorted([step, answer]),
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "logit_bias": {tok.pad_token_id: BAN_BIAS, tok.bos_token_id: BAN_BIAS},
    }
    sampler.sample(states, n=1, max_new_tokens=5, stop="answer")
    assert llm.calls[-1][1].kwargs["stop_token_ids"] == [answer]  # a step end does not stop an answer


def test_a_model_without_checkpoint_is_written_for_vllm(fake_vllm, random_policy, char_tokenizer):
    sampler = VLLMSampler(random_policy, char_tokenizer, value_device="cpu")
    path = Path(FakeLLM.last.kwargs["model"])
    assert (path / "config.json").exists() and (path / "value_head" / "model.safetensors").exists()
    assert (path / "tokenizer.json").exists()
    states = states_of(char_tokenizer)
    assert sampler.value(states) == HFSampler(random_policy, char_tokenizer).value(states)


def test_a_checkpoint_path_loads_both_copies(fake_vllm, tmp_path, char_tokenizer):
    policy = make_random_policy(char_tokenizer, seed=2)
    torch.nn.init.normal_(policy.value_head.fc2.weight, std=0.5)
    policy.save_pretrained(tmp_path)
    sampler = VLLMSampler(str(tmp_path), char_tokenizer, value_device="cpu", value_dtype=torch.float32)
    assert FakeLLM.last.kwargs["model"] == str(tmp_path)
    states = states_of(char_tokenizer)
    assert sampler.value(states) == pytest.approx(HFSampler(policy, char_tokenizer).value(states), abs=1e-6)


def test_multi_token_stop_strings_go_to_vllm_as_text(fake_vllm, random_policy, char_tokenizer):
    sampler = make(random_policy, char_tokenizer, stop_strings=("ab",), answer_stop_strings=("cd",))
    sampler.sample([[1, 9]], n=1, max_new_tokens=4, stop="step")
    params = FakeLLM.last.calls[-1][1].kwargs
    assert params["stop"] == ["ab", "cd"] and params["stop_token_ids"] == []
    sampler.sample([[1, 9]], n=1, max_new_tokens=4, stop="answer")
    assert FakeLLM.last.calls[-1][1].kwargs["stop"] == ["cd"]


def test_outputs_become_continuations(fake_vllm, random_policy, char_tokenizer):
    tok = char_tokenizer
    step, answer, eos = (
        tok.convert_tokens_to_ids("</step>"),
        tok.convert_tokens_to_ids("</answer>"),
        tok.eos_token_id,
    )
    a, b = tok.encode("ab", add_special_tokens=False)
    sampler = make(random_policy, tok, answer_stop_strings=("</answer>", "ab"))
    script = [
        ([a, step], "stop", step, "step"),
        ([a, answer], "stop", answer, "answer"),
        ([a, eos], "stop", None, "eos"),
        ([a, a], "length", None, "length"),
        ([a, eos], "length", None, "eos"),  # EOS as the last allowed token: vLLM says "length"
        ([b, step], "length", None, "step"),
        ([b, a, b], "stop", "ab", "answer"),  # a multi-token stop string, matched by vLLM's detokenizer
    ]
    FakeLLM.last.script = lambda prompt, i: script[i][:3]
    (conts,) = sampler.sample([[1, 9]], n=len(script), max_new_tokens=2)
    assert [c.token_ids for c in conts] == [s[0] for s in script]
    assert [c.finish_reason for c in conts] == [s[3] for s in script]
    assert conts[-1].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert sampler.generated_tokens == sum(len(s[0]) for s in script)
    # in "answer" mode a step token at the end is a length stop
    FakeLLM.last.script = lambda prompt, i: ([a, step], "length", None)
    assert sampler.sample([[1, 9]], n=1, max_new_tokens=2, stop="answer")[0][0].finish_reason == "length"


def test_load_weights_renames_syncs_and_resets_the_prefix_cache(fake_vllm, random_policy, char_tokenizer):
    other = make_random_policy(char_tokenizer, seed=1)
    torch.nn.init.normal_(other.value_head.fc2.weight, std=0.5)
    sampler = make(random_policy, char_tokenizer)
    state_dict = other.state_dict()
    sampler.load_weights(state_dict, version=4)
    llm = FakeLLM.last
    ((method, (weights,)),) = llm.rpc
    assert method == "tsd_load_weights" and hasattr(WeightSyncWorkerExtension, method)
    names = dict(weights)
    assert set(names) == {k[3:] for k in state_dict if k.startswith("lm.")}
    assert "model.embed_tokens.weight" in names and not any("value_head" in k for k in names)
    assert all(t.device.type == "cpu" for t in names.values())
    torch.testing.assert_close(names["model.norm.weight"], state_dict["lm.model.norm.weight"])
    assert llm.resets == 1 and sampler.version == 4
    states = states_of(char_tokenizer)
    assert sampler.value(states) == pytest.approx(HFSampler(other, char_tokenizer).value(states), abs=1e-6)


def test_worker_extension_loads_into_the_worker_model():
    loaded = []
    worker = WeightSyncWorkerExtension()
    model = types.SimpleNamespace(load_weights=lambda weights: loaded.extend(weights))
    worker.model_runner = types.SimpleNamespace(model=model)
    worker.tsd_load_weights([("model.norm.weight", torch.ones(2))])
    assert [name for name, _ in loaded] == ["model.norm.weight"]


def test_vllm_weights_rejects_unknown_keys():
    with pytest.raises(KeyError, match="unexpected key"):
        vllm_weights({"encoder.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------- real vLLM (GPU)
@pytest.mark.gpu
@requires_vllm
def test_vllm_logprobs_match_hf_teacher_forcing_and_weights_sync(tmp_path, char_tokenizer):
    tok = char_tokenizer
    first, second = make_random_policy(tok, seed=0), make_random_policy(tok, seed=1)  # CPU references
    first.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "tokenizer")  # apart from the Qwen2 config (see char_tokenizer.py)
    sampler = VLLMSampler(
        str(tmp_path / "model"),
        tok,
        temperature=0.8,
        seed=0,
        dtype="float32",
        gpu_memory_utilization=0.3,
        max_model_len=256,
        value_device="cuda",
        value_dtype=torch.float32,
        llm_kwargs={"tokenizer": str(tmp_path / "tokenizer"), "enforce_eager": True},
    )
    states = states_of(tok)
    for version, reference in enumerate((first, second)):
        if version:
            sampler.load_weights(reference.state_dict(), version=version)
        out = sampler.sample(states, n=4, max_new_tokens=12, stop="step")
        for state, conts in zip(states, out):
            assert len(conts) == 4
            for c in conts:
                ref = teacher_forced_logprobs(reference, tok, state, c.token_ids, temperature=0.8)
                torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=2e-3, rtol=0)
                if c.finish_reason == "step":
                    assert c.token_ids[-1] == tok.convert_tokens_to_ids("</step>")
        assert sampler.value(states) == pytest.approx(HFSampler(reference, tok).value(states), abs=1e-4)
    assert sampler.version == 1
