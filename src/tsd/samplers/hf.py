"""HFSampler: sampling with a transformers ``PolicyValueModel`` and its KV cache (CPU or GPU).

The laptop-scale sampler, and the reference the vLLM sampler is checked against. One call to
:meth:`HFSampler.sample` left-pads the states into batches of whole states (``n`` rows each, at
most ``max_batch_size`` rows unless ``n`` alone is more), and runs a plain autoregressive loop
with the model's KV cache:

    prefill:  model(states, attention mask, position ids = cumsum(mask) - 1)   # (S, T) -> (S, V)
              then logits, mask and KV cache repeated n times per state        # (B = S * n, ...)
    per step: model(last token, cache, logits_to_keep=1) -> logits (B, V) fp32
              logits / temperature -> pad/BOS banned (-inf) -> top-p nucleus -> sample
              record log p(sampled token) under exactly that distribution

The recorded log-probs are the *behaviour* log-probs CISPO's ratio ``pi_theta / pi_behaviour``
needs (DESIGN.md). They are of the distribution actually sampled from, so they include the
temperature, the top-p renormalisation and the pad/BOS ban: with pad/BOS banned the behaviour
policy puts zero mass on them and renormalises over the rest (for a trained model the banned mass
is ~0, so this is ~ log_softmax(logits / T)). ``temperature=0`` means greedy decoding (argmax);
its log-probs are reported under ``softmax(logits)`` (T = 1, pad/BOS banned), since a greedy
"distribution" has none to report. Use greedy for evaluation, not for training data.

A row stops after it emits EOS, a step stop string (``</step>``; only with ``stop="step"``), an
answer stop string (``</answer>``), or ``max_new_tokens`` tokens; the stop token(s) and EOS are
kept in ``token_ids``. Stop strings that are one token (the bundled char tokenizer's tags) are
matched by id; others (Qwen: ``</step>`` is several BPE tokens) by decoding each row's last few
tokens.

Sampling is deterministic given ``seed`` and the same sequence of calls (one ``torch.Generator``
is advanced by every call), but not across different batchings of the same rows.

    python -c "from tsd.samplers.hf import HFSampler; help(HFSampler)"
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from tsd.config import check_int, check_number, require
from tsd.models.policy_value import PolicyValueModel
from tsd.samplers.base import Continuation, FinishReason, Sampler, StopMode


def eos_token_ids(tokenizer, model: torch.nn.Module | None = None) -> set[int]:
    """Every id that ends a sequence: the tokenizer's EOS plus the model config's and generation
    config's ``eos_token_id`` (an int or a list; Qwen-Instruct lists both ``<|im_end|>`` and
    ``<|endoftext|>``)."""
    ids: set[int] = set()
    sources = [getattr(tokenizer, "eos_token_id", None)]
    lm = getattr(model, "lm", model)
    for cfg in (getattr(lm, "config", None), getattr(lm, "generation_config", None)):
        sources.append(getattr(cfg, "eos_token_id", None))
    for src in sources:
        if src is None:
            continue
        ids.update(int(i) for i in (src if isinstance(src, (list, tuple, set)) else [src]))
    return ids


def banned_token_ids(tokenizer, eos_ids: Iterable[int]) -> list[int]:
    """Pad and BOS ids, never sampled; an id that is also an EOS (pad == eos is common) stays
    allowed, or the model could never stop."""
    eos = set(eos_ids)
    ids = {getattr(tokenizer, name, None) for name in ("pad_token_id", "bos_token_id")}
    return sorted(int(i) for i in ids if i is not None and int(i) not in eos)


def split_stop_strings(tokenizer, stops: Sequence[str]) -> tuple[set[int], list[str]]:
    """Split stop strings into single-token ones (matched by id) and the rest (matched by text)."""
    single: set[int] = set()
    multi: list[str] = []
    for s in stops:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=False) == s:
            single.add(int(ids[0]))
        else:
            multi.append(s)
    return single, multi


#: prefix (token ids) -> {next token: probability, given the prefix, of the excluded continuations
#: through it}; only prefixes that excluded continuations pass through are keys
ExclusionTrie = dict[tuple[int, ...], dict[int, float]]


def exclusion_trie(excluded: Sequence[Any]) -> ExclusionTrie:
    """The masses :meth:`HFSampler._pick` takes off: for each excluded continuation ``c`` and each
    position ``t``, ``P(c_t, ..., c_end | c_<t) = exp(sum_{i >= t} log p_i)`` is added at prefix
    ``c[:t]`` under token ``c[t]``. Drawing ``c[t]`` with probability ``p(c[t]) - mass`` at every
    prefix samples exactly from the policy conditioned on avoiding the excluded continuations."""
    trie: ExclusionTrie = {}
    for c in excluded:
        ids, lps = list(c.token_ids), [float(x) for x in c.logprobs]
        suffix = 0.0
        masses = []
        for lp in reversed(lps):
            suffix += lp
            masses.append(math.exp(suffix))
        masses.reverse()
        for t, (tok, mass) in enumerate(zip(ids, masses)):
            node = trie.setdefault(tuple(ids[:t]), {})
            node[tok] = node.get(tok, 0.0) + mass
    return trie


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """Left-pad token rows; returns input ids, attention mask and position ids (cumsum - 1), (B, T)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at each row's first real token
    return input_ids.to(device), mask.to(device), position_ids.to(device)


class HFSampler(Sampler):
    """Samples continuations with a transformers :class:`PolicyValueModel` and a KV cache.

    Args:
        model: the policy + value head (moved to ``device``; put in eval mode while sampling, its
            previous mode restored afterwards, so it may be shared with a trainer on one process).
        tokenizer: the tokenizer the states are written in (needs ``pad_token_id``).
        temperature: softmax temperature, ``>= 0``; ``0`` means greedy (log-probs under T = 1).
        top_p: nucleus sampling mass in ``(0, 1]``; ``1`` disables it.
        max_batch_size: most rows (state x continuation) per forward pass, ``>= 1``; a batch holds
            whole states, so one state's ``n`` rows share a batch even when ``n`` is larger.
        device: where the model runs.
        seed: seeds this sampler's ``torch.Generator``; ``None`` draws a fresh seed.
        stop_strings: end a step (``stop="step"`` only).
        answer_stop_strings: end the answer (both stop modes).
    """

    tokenizer: Any

    def __init__(
        self,
        model: PolicyValueModel,
        tokenizer,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_batch_size: int = 64,
        device: str | torch.device = "cpu",
        seed: int | None = None,
        stop_strings: tuple[str, ...] = ("</step>",),
        answer_stop_strings: tuple[str, ...] = ("</answer>",),
    ) -> None:
        check_number(temperature, "HFSampler.temperature", low=0)  # 0 = greedy
        check_number(top_p, "HFSampler.top_p", low=0, high=1, low_open=True)
        check_int(max_batch_size, "HFSampler.max_batch_size", low=1)
        require(
            tokenizer.pad_token_id is not None,
            "HFSampler.tokenizer",
            "a tokenizer with a pad_token_id (used for left padding)",
            type(tokenizer).__name__,
        )
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.max_batch_size = int(max_batch_size)
        self.stop_strings = tuple(stop_strings)
        self.answer_stop_strings = tuple(answer_stop_strings)
        self.version = 0
        #: every token emitted by :meth:`sample` so far (the compute axis of comparisons)
        self.generated_tokens = 0

        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_ids = eos_token_ids(tokenizer, model)
        self._eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=self.device)
        banned = banned_token_ids(tokenizer, self.eos_ids)
        self._banned = torch.tensor(banned, dtype=torch.long, device=self.device)
        self._step_ids, self._step_texts = split_stop_strings(tokenizer, self.stop_strings)
        self._answer_ids, self._answer_texts = split_stop_strings(tokenizer, self.answer_stop_strings)
        # tokens to decode for the text match: every token of a stop string adds >= 1 character
        texts = self._step_texts + self._answer_texts
        self._tail = max((len(s) for s in texts), default=0) + 1

        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    # ------------------------------------------------------------------ public API
    def sample(
        self,
        states: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int,
        stop: StopMode = "step",
        exclude: Sequence[Sequence[Any]] | None = None,
    ) -> list[list[Continuation]]:
        return self.sample_and_value(states, n, max_new_tokens, stop, exclude)[0]

    def sample_and_value(
        self,
        states: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int,
        stop: StopMode = "step",
        exclude: Sequence[Sequence[Any]] | None = None,
    ) -> tuple[list[list[Continuation]], list[float]]:
        """:meth:`sample`, with V(s) read from the prefill that starts sampling (the model's
        forward computes the value head anyway: no second pass, no extra cost)."""
        if n < 1:
            raise ValueError(f"HFSampler.sample: n must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"HFSampler.sample: max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop not in ("step", "answer"):
            raise ValueError(f"HFSampler.sample: stop must be 'step' or 'answer', got {stop!r}")
        states = [list(s) for s in states]
        if any(len(s) == 0 for s in states):
            raise ValueError("HFSampler.sample: every state needs at least one token")
        if exclude is not None and len(exclude) != len(states):
            raise ValueError(f"HFSampler.sample: exclude has {len(exclude)} entries for {len(states)} states")
        tries = [exclusion_trie(e) for e in exclude] if exclude is not None else [None] * len(states)

        # a batch holds whole states (n adjacent rows each): each state is prefilled once and its
        # KV cache repeated n times, so the prompt's cost does not grow with n
        per_batch = max(1, self.max_batch_size // n)
        flat: list[Continuation] = []
        values: list[float] = []
        with self._eval_mode(), torch.inference_mode():
            for start in range(0, len(states), per_batch):
                conts, vals = self._generate(
                    states[start : start + per_batch],
                    n,
                    max_new_tokens,
                    stop,
                    tries[start : start + per_batch],
                )
                flat.extend(conts)
                values.extend(vals)
        self.generated_tokens += sum(len(c.token_ids) for c in flat)
        return [flat[i * n : (i + 1) * n] for i in range(len(states))], values

    def value(self, states: Sequence[Sequence[int]]) -> list[float]:
        if any(len(s) == 0 for s in states):
            raise ValueError("HFSampler.value: every state needs at least one token")
        out: list[float] = []
        with self._eval_mode(), torch.inference_mode():
            for start in range(0, len(states), self.max_batch_size):
                chunk = states[start : start + self.max_batch_size]
                ids, mask, pos = left_pad(chunk, self.pad_id, self.device)  # (B, T) each
                _, values, _ = self.model(ids, mask, pos, logits_to_keep=1)  # values: (B, 1)
                out.extend(values[:, -1].float().tolist())
        return out

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state_dict, strict=True)
        self.version = int(version)

    # ------------------------------------------------------------------ internals
    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode for the duration (no dropout), then the model's previous mode back."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _pick(
        self, logits: torch.Tensor, excluded: dict[int, dict[int, float]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one token per row from fp32 ``logits`` (B, V); returns ids (B,) and their
        log-probs (B,) under the policy's distribution (temperature, top-p, pad/BOS ban).
        ``excluded[row] = {token: mass}``: the probability of continuing the row with ``token``
        into a continuation it must not repeat; that mass is taken off before drawing (the
        returned log-prob is still the policy's)."""
        logits = logits.float()
        if self._banned.numel():
            logits = logits.index_fill(-1, self._banned, float("-inf"))  # (B, V) pad/BOS never sampled
        greedy = self.temperature == 0.0  # log-prob under T = 1
        if not greedy:
            logits = logits / self.temperature  # (B, V)
            if self.top_p < 1.0:
                logits = self._top_p_filter(logits)
        logp = torch.log_softmax(logits, -1)  # (B, V), renormalised over what may be sampled
        probs = logp.exp()  # (B, V)
        if excluded:
            probs = probs.clone()
            for row, masses in excluded.items():
                ids = torch.tensor(list(masses), dtype=torch.long, device=probs.device)
                left = (probs[row, ids] - torch.tensor(list(masses.values()), device=probs.device)).clamp(
                    min=0
                )
                if float(probs[row].sum() - probs[row, ids].sum() + left.sum()) > 1e-9:
                    probs[row, ids] = left  # else everything is excluded: draw from the policy itself
        if greedy:
            tok = probs.argmax(-1)  # (B,)
        else:
            tok = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)  # (B,)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

    def _top_p_filter(self, logits: torch.Tensor) -> torch.Tensor:
        """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (Holtzman et
        al. 2020); the rest get -inf. ``logits`` (B, V), already temperature-scaled."""
        sorted_logits, order = logits.sort(-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)  # (B, V)
        mass_before = probs.cumsum(-1) - probs  # (B, V): mass of the strictly more likely tokens
        drop_sorted = mass_before >= self.top_p  # (B, V); the top token always has 0 before it
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # (B, V) back in vocabulary order
        return logits.masked_fill(drop, float("-inf"))

    def _generate(
        self,
        states: list[list[int]],
        n: int,
        max_new_tokens: int,
        stop: StopMode,
        tries: Sequence[ExclusionTrie | None],
    ) -> tuple[list[Continuation], list[float]]:
        """One left-padded batch through the cached autoregressive loop: the S states are
        prefilled once, then each becomes n adjacent rows (B = S * n) sharing its KV cache.
        Returns the B continuations and V(s) of the S states, read from the prefill. A row whose
        state has an exclusion trie follows it while its tokens stay on an excluded prefix."""
        B = len(states) * n
        dev = self.device
        input_ids, mask, pos = left_pad(states, self.pad_id, dev)  # (S, T) each
        logits, state_values, cache = self.model(
            input_ids, mask, pos, use_cache=True, logits_to_keep=1
        )  # (S, 1, V), (S, 1)
        values = state_values[:, -1].float().tolist()
        if n > 1:
            logits = logits.repeat_interleave(n, dim=0)  # (B, 1, V)
            mask, pos = mask.repeat_interleave(n, dim=0), pos.repeat_interleave(n, dim=0)  # (B, T)
            cache.batch_repeat_interleave(n)  # every layer's keys and values: (S, ...) -> (B, ...)
        next_pos = pos[:, -1:] + 1  # (B, 1)

        step_ids = self._step_ids if stop == "step" else set()
        step_texts = self._step_texts if stop == "step" else []
        step_t = torch.tensor(sorted(step_ids), dtype=torch.long, device=dev)
        answer_t = torch.tensor(sorted(self._answer_ids), dtype=torch.long, device=dev)

        tokens: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list[float]] = [[] for _ in range(B)]
        reasons: list[FinishReason | None] = [None] * B
        finished = torch.zeros(B, dtype=torch.bool, device=dev)  # (B,)
        # row -> (its state's trie, the row's tokens so far) while they are a prefix in the trie
        on_trie = {r: tries[r // n] for r in range(B) if tries[r // n]}
        for t in range(max_new_tokens):
            excluded = {r: trie[tuple(tokens[r])] for r, trie in on_trie.items()}
            tok, lp = self._pick(logits[:, -1], excluded)  # (B,), (B,)
            is_eos = torch.isin(tok, self._eos)  # (B,)
            is_answer = torch.isin(tok, answer_t)  # (B,)
            is_step = torch.isin(tok, step_t)  # (B,)
            live = (~finished).nonzero().squeeze(-1).tolist()
            tok_l, lp_l = tok.tolist(), lp.tolist()
            eos_l, ans_l, step_l = is_eos.tolist(), is_answer.tolist(), is_step.tolist()
            for i in live:
                tokens[i].append(tok_l[i])
                logprobs[i].append(lp_l[i])
                if eos_l[i]:
                    reasons[i] = "eos"
                elif ans_l[i] or self._ends_with(tokens[i], self._answer_texts):
                    reasons[i] = "answer"
                elif step_l[i] or self._ends_with(tokens[i], step_texts):
                    reasons[i] = "step"
                elif t == max_new_tokens - 1:
                    reasons[i] = "length"
                if reasons[i] is not None:
                    finished[i] = True
            on_trie = {r: trie for r, trie in on_trie.items() if tuple(tokens[r]) in trie and not finished[r]}
            if bool(finished.all()):
                break
            # finished rows keep decoding a pad token (cheap at these sizes); their outputs are ignored
            feed = tok.masked_fill(finished, self.pad_id)[:, None]  # (B, 1)
            mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)  # (B, T + t + 1)
            logits, _, cache = self.model(
                feed, mask, next_pos, past_key_values=cache, use_cache=True, logits_to_keep=1
            )  # (B, 1, V)
            next_pos = next_pos + 1
        return [Continuation(tokens[i], logprobs[i], reasons[i] or "length") for i in range(B)], values

    def _ends_with(self, tokens: list[int], texts: list[str]) -> bool:
        """Whether the row's newest tokens complete a multi-token stop string (general path)."""
        if not texts:
            return False
        tail = self.tokenizer.decode(tokens[-self._tail :], skip_special_tokens=False)
        # 'in', not endswith: a BPE token may carry text past the stop string ("</step>\n")
        return any(s in tail for s in texts)
