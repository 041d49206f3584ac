"""The generation backend interface every rollout uses.

A sampler turns token states (prompt + completion so far) into K sampled continuations each,
with the per-token log-probs of the distribution it actually sampled from (the *behaviour*
log-probs that CISPO's importance ratio needs), why each continuation stopped, and the value
head's estimate of a state. It knows nothing about trees, rewards or ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

#: why a continuation stopped: it closed a step (``</step>``), closed the answer (``</answer>``),
#: produced EOS, or hit the per-call token cap.
FinishReason = Literal["step", "answer", "eos", "length"]

#: probability left at a prefix, excluded continuations taken off (``exclude=``), at or under which
#: the prefix counts as exhausted: the token is drawn from the policy itself and counted in
#: ``exhausted_draws`` (both samplers; masses recorded in fp32 leave ~1e-8 of rounding noise). The
#: search's ``SPENT_MASS`` (:mod:`tsd.rollouts.tree`) is this very number.
EXHAUSTED_MASS = 1e-5

#: ``"step"``: stop after ``</step>``, ``</answer>`` or EOS (one reasoning step, MCTS expansion);
#: ``"answer"``: stop only after ``</answer>`` or EOS (a whole completion).
StopMode = Literal["step", "answer"]


@dataclass
class Continuation:
    """One sampled continuation of a state."""

    token_ids: list[int]
    #: fp32 log-prob of each sampled token under the sampling distribution (temperature applied)
    logprobs: list[float]
    finish_reason: FinishReason
    #: entropy (nats) of the policy's next-token distribution at each sampled token, the one the
    #: token was drawn from (temperature applied; exclusion not): only from
    #: :meth:`Sampler.sample_with_entropy`, else ``None``
    entropies: list[float] | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"Continuation: token_ids ({len(self.token_ids)}) and logprobs ({len(self.logprobs)}) differ in length"
            )
        if self.entropies is not None and len(self.entropies) != len(self.token_ids):
            raise ValueError(
                f"Continuation: token_ids ({len(self.token_ids)}) and entropies ({len(self.entropies)}) differ in length"
            )


class Sampler(ABC):
    """Samples continuations of token states and values them with the value head.

    Implementations: :class:`tsd.samplers.hf.HFSampler` (transformers, CPU/GPU) and
    :class:`tsd.samplers.vllm.VLLMSampler` (vLLM, GPU or its CPU build).
    """

    #: the tokenizer the states are written in (a transformers tokenizer)
    tokenizer: object
    #: policy version of the weights currently loaded (bumped by :meth:`load_weights`)
    version: int = 0
    #: sampling temperature; behaviour log-probs are of softmax(logits / temperature)
    temperature: float = 1.0
    #: the random-number generator every sample draws from, saved with a checkpoint so that a
    #: resumed run samples what it would have; None when the engine keeps its own (vLLM)
    generator: torch.Generator | None = None
    #: every token sampled so far (the compute axis of comparisons: ``compute/generated_tokens``)
    generated_tokens: int = 0
    #: every state token run through the model to start sampling (``compute/prefill_tokens``):
    #: prompt and path tokens, each distinct state of a call counted once (its rows share it)
    prefill_tokens: int = 0
    #: tokens drawn at a prefix with at most :data:`EXHAUSTED_MASS` left once the excluded
    #: continuations are taken off (``exclude=``): drawn from the policy itself, so the row may
    #: repeat an excluded continuation (paid tokens, no new step); counted, not hidden
    exhausted_draws: int = 0
    #: the step stop strings as :func:`tsd.samplers.hf.split_stop_strings` splits them: one-token
    #: ones matched by id, the rest by decoded text (set by each implementation)
    _step_ids: frozenset[int] | set[int] = frozenset()
    _step_texts: Sequence[str] = ()

    @abstractmethod
    def sample(
        self,
        states: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int,
        stop: StopMode = "step",
        exclude: Sequence[Sequence[Any]] | None = None,
    ) -> list[list[Continuation]]:
        """Sample ``n`` continuations for each state; returns ``len(states)`` lists of ``n``.

        ``exclude[i]`` (optional): continuations state ``i`` must not produce again, objects with
        ``token_ids`` and ``logprobs`` (a :class:`Continuation`, or a search-tree node), their
        log-probs being this policy's. Each row is then drawn from the policy *conditioned on not
        repeating one of them* (sampling without replacement, Shi et al. 2020: at a prefix shared
        with excluded continuations, a token's probability loses the mass of the excluded ones
        below it), while the returned ``logprobs`` stay the policy's own, unconditioned: a search
        device, like best-of-N's selection, not part of the behaviour policy. The rows of a state
        are drawn independently from that conditioned distribution (not without replacement
        among themselves). With ``stop="answer"`` and excluded single steps, a row is a whole
        completion that does not start with one of those steps. Where the excluded continuations
        leave at most :data:`EXHAUSTED_MASS` at a prefix, the token is drawn from the policy itself
        and counted in ``exhausted_draws``. Both samplers implement it (HFSampler in its own
        loop; VLLMSampler with a logits processor, :mod:`tsd.samplers.exclusion`)."""

    def sample_with_entropy(
        self,
        states: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int,
        stop: StopMode = "step",
        exclude: Sequence[Sequence[Any]] | None = None,
    ) -> list[list[Continuation]]:
        """:meth:`sample`, each continuation also carrying ``entropies``: the entropy of the next-token
        distribution every token was drawn from (what an entropy-guided fork rule ranks positions
        by, :class:`tsd.rollouts.forks.EntropyForks`). It needs the whole distribution at every
        step: :class:`~tsd.samplers.hf.HFSampler` has it; a sampler that returns only the sampled
        tokens' log-probs (vLLM) cannot give it and raises."""
        raise NotImplementedError(
            f"{type(self).__name__} does not record next-token entropies (it returns the sampled "
            "tokens' log-probs only): use sampler=hf, or a fork rule that needs none "
            "(rollout/forks=surprise | step)"
        )

    @abstractmethod
    def value(self, states: Sequence[Sequence[int]]) -> list[float]:
        """Value-head estimate V(s) in [-1, 1] of each state (at its last token)."""

    def sample_and_value(
        self,
        states: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int,
        stop: StopMode = "step",
        exclude: Sequence[Sequence[Any]] | None = None,
    ) -> tuple[list[list[Continuation]], list[float]]:
        """:meth:`sample` and :meth:`value` of the same states (what one MCTS expansion needs).

        Samplers that run the states through the model anyway to start sampling override this
        to read V(s) from that pass instead of a second one."""
        return self.sample(states, n, max_new_tokens, stop, exclude), self.value(states)

    def drop_cache(self) -> None:
        """Forget what earlier calls left behind to reuse (the HF sampler's prefix store); nothing by
        default. A rollout worker calls it before each rollout, so that a rollout reuses only what
        its own calls ran and a resumed run samples exactly what the uninterrupted one did."""
        return None

    def close(self) -> None:
        """Release what the sampler started outside this process (VLLMSampler: its engine process);
        nothing by default. A rank that leaves through ``os._exit`` (a forked rank) runs no exit
        handlers, so an engine process nobody shut down outlives it."""
        return None

    def split_steps(self, continuation: Continuation) -> list[Continuation]:
        """Cut a ``stop="answer"`` continuation into the reasoning steps that ``stop="step"`` calls
        would have returned one after the other: each piece ends after a step stop (finish
        ``step``), the last keeps the continuation's own finish reason (``length`` becomes ``step``
        when its last token closes a step, as a step call's stop check comes first). Sampling is
        left to right, so each piece holds exactly the tokens and behaviour log-probs it had; the
        pieces concatenate back to the continuation. A multi-token stop string is matched as the
        samplers match it: in the decoded tail of the current piece."""
        ids, lps = list(continuation.token_ids), list(continuation.logprobs)
        texts = list(self._step_texts)
        tail = max((len(s) for s in texts), default=0) + 1
        pieces: list[Continuation] = []
        start = 0
        for t, tok in enumerate(ids):
            closes = tok in self._step_ids
            if not closes and texts:
                text = self.tokenizer.decode(ids[max(start, t + 1 - tail) : t + 1], skip_special_tokens=False)  # type: ignore[attr-defined]
                closes = any(s in text for s in texts)
            last = t == len(ids) - 1
            if closes and (not last or continuation.finish_reason == "length"):
                pieces.append(Continuation(ids[start : t + 1], lps[start : t + 1], "step"))
                start = t + 1
        if start < len(ids) or not pieces:
            pieces.append(Continuation(ids[start:], lps[start:], continuation.finish_reason))
        return pieces

    @abstractmethod
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Swap in new policy + value-head weights (keys as in ``PolicyValueModel.state_dict()``);
        ``version`` is the optimiser step they are the weights of (:mod:`tsd.data.policy_clock`)."""

    # ------------------------------------------------------------------ the memory plan
    @classmethod
    def device_memory(
        cls,
        shape: Any,
        kwargs: Mapping[str, Any],
        *,
        model_dtype: str,
        device_gib: float | None,
        on_gpu: bool,
        setting: str,
        seq_tokens: int,
    ) -> list[Any]:
        """What a sampler built with ``kwargs`` puts on its device besides the model it is given
        (:mod:`tsd.distributed.memory_plan`: ``shape`` is a ``ModelShape``, the result a list of
        ``PlanItem``; ``setting``: where ``kwargs`` come from in the config). A sampler that samples
        with the model itself (HFSampler): the KV cache of one batch of ``max_batch_size`` rows of
        ``seq_tokens`` tokens and their fp32 logits."""
        from tsd.distributed.memory_plan import DTYPE_BYTES, PlanItem, gib

        rows = int(kwargs.get("max_batch_size", 64))
        kv = rows * seq_tokens * shape.kv_bytes_per_token(DTYPE_BYTES[model_dtype])
        return [
            PlanItem(
                "sampler KV cache + logits",
                gib(kv + rows * shape.vocab * 4),
                f"{setting}.max_batch_size",
                False,
            )
        ]

    @classmethod
    def startup_need(
        cls, kwargs: Mapping[str, Any], device_gib: float | None, on_gpu: bool, setting: str
    ) -> tuple[float, str] | None:
        """Free device memory the sampler demands when it starts, and the setting that asks for it
        (vLLM: ``gpu_memory_utilization x total``); None: no such check."""
        return None
