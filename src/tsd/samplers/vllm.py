"""VLLMSampler: the paper-scale sampler (vLLM on a CUDA GPU), same contract as :class:`HFSampler`.

Written against vLLM's offline API (``vllm>=0.10.2``; no machine here can run it, and its tests
skip with that reason):

- ``LLM(model=..., seed=..., logprobs_mode="processed_logprobs", enable_prefix_caching=True,
  worker_extension_cls="tsd.samplers.vllm.WeightSyncWorkerExtension", ...)``;
- ``llm.generate([TokensPrompt(prompt_token_ids=state), ...], SamplingParams(n=n, logprobs=0,
  stop=[...], stop_token_ids=[...], include_stop_str_in_output=True, max_tokens=...))``.

**Behaviour log-probs.** ``logprobs=0`` asks for the sampled token's log-prob only. By default
vLLM reports *raw* log-probs (``log_softmax`` of the model's logits, before temperature, top-p and
logit bias), which are not the distribution it samples from; ``logprobs_mode="processed_logprobs"``
reports them after every processor, temperature and top-p included, i.e. exactly what CISPO's
``pi_behaviour`` must be and what :class:`HFSampler` records. Pad and BOS get a ``logit_bias`` of
-1e4 (never sampled, as in HFSampler). Greedy (``temperature=0``): vLLM's greedy path applies no
temperature, so its log-probs should be under T = 1 as in HFSampler (not checked on a GPU yet).

**Value head.** vLLM returns no hidden states, so the sampler keeps a separate transformers
:class:`PolicyValueModel` copy (the model it was given, or one loaded from the checkpoint, on
``value_device``) and :meth:`value` runs it (through an :class:`HFSampler`); :meth:`load_weights`
updates both copies. That costs one extra forward per valued state and the memory of a second
model: leave room with ``gpu_memory_utilization``.

**Weights.** ``load_weights`` drops the ``lm.`` prefix of ``PolicyValueModel.state_dict()`` keys
(vLLM names weights as the HF checkpoint does), sends the LM tensors (on CPU) to every vLLM worker
with ``llm.collective_rpc("tsd_load_weights", ...)`` (the method comes from
:class:`WeightSyncWorkerExtension`, which calls the worker model's ``load_weights``), then resets
the prefix cache (its KV entries were computed by the old weights). With vLLM's multiprocess
engine the tensors travel through its RPC serialiser; for multi-GPU generators an NCCL broadcast
into the same ``load_weights`` (vLLM's RLHF example) is the faster path.

**Seeding.** ``seed`` seeds the engine (``LLM(seed=...)``), not each request: a per-request seed
would give the same samples every time MCTS expands the same state.

**Finish reasons** are derived from the last token and vLLM's ``stop_reason`` (vLLM says
``"length"`` when EOS or a stop token is the last allowed token; HFSampler says ``"eos"``/``"step"``,
and so does this class).

Use it for Qwen-scale paper runs; the bundled char-tokenizer policy runs on :class:`HFSampler`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tsd.models.policy_value import PolicyValueModel
from tsd.samplers.base import Continuation, FinishReason, Sampler, StopMode
from tsd.samplers.hf import HFSampler, banned_token_ids, eos_token_ids, split_stop_strings

#: the logit bias that keeps pad/BOS from being sampled (exp(-1e4) == 0 in any float type)
BAN_BIAS = -1.0e4


class WeightSyncWorkerExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``) so the driver can push weights.

    Called as ``llm.collective_rpc("tsd_load_weights", args=(named_tensors,))``; runs inside the
    worker process, where ``self.model_runner.model`` is vLLM's model.
    """

    def tsd_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.model.load_weights(weights=named_tensors)  # type: ignore[attr-defined]


def vllm_weights(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``PolicyValueModel`` keys -> HF checkpoint names for vLLM: ``lm.model.x`` -> ``model.x``,
    ``lm.lm_head.weight`` -> ``lm_head.weight``; the value head stays out (vLLM has none)."""
    out = []
    for name, tensor in state_dict.items():
        if name.startswith("lm."):
            out.append((name[len("lm.") :], tensor.detach().cpu()))
        elif not name.startswith("value_head."):
            raise KeyError(f"vllm_weights: unexpected key {name!r} (expected 'lm.*' or 'value_head.*')")
    return out


class VLLMSampler(Sampler):
    """Samples with vLLM; values with a transformers copy of the policy + value head.

    Args:
        model: the policy, either as a :class:`PolicyValueModel` (``sampler=hf`` and ``sampler=vllm``
            are then called alike, ``(model, tokenizer)``): it becomes the value copy (as is: moved
            to ``value_device``, ``value_dtype`` unused) and vLLM loads its weights from
            ``checkpoint_dir`` or, without one, from a temporary directory this writes; or as a
            directory written by ``PolicyValueModel.save_pretrained`` (any HF checkpoint works;
            the value head then starts at its init), loaded by both vLLM and the value copy.
        tokenizer: the transformers tokenizer of the states.
        checkpoint_dir: a directory holding the same weights as ``model`` (skips the write).
        temperature, top_p, seed, stop_strings, answer_stop_strings: as :class:`HFSampler`.
        dtype: vLLM weight dtype.
        gpu_memory_utilization: vLLM's share of GPU memory (leave room for the value copy).
        max_model_len: vLLM context limit (``None``: the model's).
        enable_prefix_caching: reuse KV across requests sharing a prefix (MCTS siblings do).
        value_device, value_dtype, value_batch_size: where/how the value copy runs.
        llm_kwargs: anything else for ``vllm.LLM`` (e.g. ``tokenizer``, ``enforce_eager``).
    """

    def __init__(
        self,
        model: PolicyValueModel | str | os.PathLike,
        tokenizer,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_strings: tuple[str, ...] = ("</step>",),
        answer_stop_strings: tuple[str, ...] = ("</answer>",),
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        value_device: str | torch.device = "cuda",
        value_dtype: torch.dtype = torch.bfloat16,
        value_batch_size: int = 64,
        llm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not temperature >= 0.0:
            raise ValueError(f"VLLMSampler: temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"VLLMSampler: top_p must be in (0, 1], got {top_p}")
        try:
            import vllm
        except ImportError as err:  # pragma: no cover - depends on the machine
            raise ImportError(
                "VLLMSampler needs vLLM (pip install 'tsd[vllm]', CUDA GPU); use HFSampler otherwise"
            ) from err

        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.version = 0
        #: every token emitted by :meth:`sample` so far
        self.generated_tokens = 0

        self._tmpdir: tempfile.TemporaryDirectory | None = None
        if isinstance(model, (str, os.PathLike)):
            model_path = str(model)
            value_model = PolicyValueModel.from_pretrained(model_path, dtype=value_dtype, device=value_device)
        else:
            value_model = model
            if checkpoint_dir is None:
                # vLLM loads weights from disk only; removed when this sampler is garbage-collected
                self._tmpdir = tempfile.TemporaryDirectory(prefix="tsd-vllm-")
                model.save_pretrained(self._tmpdir.name)
                tokenizer.save_pretrained(self._tmpdir.name)
                checkpoint_dir = self._tmpdir.name
            model_path = str(checkpoint_dir)
        # the value copy; HFSampler also validates the tokenizer (pad id) for the padding
        self._value = HFSampler(value_model, tokenizer, max_batch_size=value_batch_size, device=value_device)
        self.eos_ids = eos_token_ids(tokenizer, value_model)
        self._logit_bias = {i: BAN_BIAS for i in banned_token_ids(tokenizer, self.eos_ids)}
        self._step_ids, self._step_texts = split_stop_strings(tokenizer, tuple(stop_strings))
        self._answer_ids, self._answer_texts = split_stop_strings(tokenizer, tuple(answer_stop_strings))

        kwargs: dict[str, Any] = {
            "model": model_path,
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enable_prefix_caching": enable_prefix_caching,
            # behaviour log-probs after temperature / top-p (the default, raw, is before them)
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": f"{__name__}.WeightSyncWorkerExtension",
        }
        if seed is not None:
            kwargs["seed"] = int(seed)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(llm_kwargs or {})
        self.llm = vllm.LLM(**kwargs)

    # ------------------------------------------------------------------ public API
    def sample(
        self,
        states: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int,
        stop: StopMode = "step",
    ) -> list[list[Continuation]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if n < 1:
            raise ValueError(f"VLLMSampler.sample: n must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"VLLMSampler.sample: max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop not in ("step", "answer"):
            raise ValueError(f"VLLMSampler.sample: stop must be 'step' or 'answer', got {stop!r}")
        if any(len(s) == 0 for s in states):
            raise ValueError("VLLMSampler.sample: every state needs at least one token")
        step_ids = self._step_ids if stop == "step" else set()
        step_texts = self._step_texts if stop == "step" else []
        params = SamplingParams(
            n=n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=max_new_tokens,
            logprobs=0,  # the sampled token's log-prob only
            # one-token stops by id, the others by detokenized text
            stop=[*step_texts, *self._answer_texts],
            stop_token_ids=sorted(step_ids | self._answer_ids),
            include_stop_str_in_output=True,
            # keep special tokens in the text, or a stop string that is a special token never matches
            skip_special_tokens=False,
            logit_bias=dict(self._logit_bias) or None,
        )
        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in states]
        results = self.llm.generate(prompts, params, use_tqdm=False)

        out: list[list[Continuation]] = []
        for request in results:
            conts = []
            for o in sorted(request.outputs, key=lambda o: o.index):
                token_ids = list(o.token_ids)
                logprobs = [float(d[t].logprob) for t, d in zip(token_ids, o.logprobs)]
                reason = self._finish_reason(token_ids, o.stop_reason, step_ids, step_texts)
                conts.append(Continuation(token_ids, logprobs, reason))
                self.generated_tokens += len(token_ids)
            out.append(conts)
        return out

    def value(self, states: Sequence[Sequence[int]]) -> list[float]:
        return self._value.value(states)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        self._value.load_weights(state_dict, version)  # strict: checks the keys first
        self.llm.collective_rpc("tsd_load_weights", args=(vllm_weights(state_dict),))
        self.llm.reset_prefix_cache()  # cached KV belongs to the old weights
        self.version = int(version)

    # ------------------------------------------------------------------ internals
    def _finish_reason(
        self, token_ids: list[int], stop_reason: int | str | None, step_ids: set[int], step_texts: list[str]
    ) -> FinishReason:
        last = token_ids[-1] if token_ids else None
        if last in self.eos_ids:
            return "eos"
        if last in self._answer_ids or stop_reason in self._answer_texts:
            return "answer"
        if last in step_ids or stop_reason in step_texts:
            return "step"
        return "length"
