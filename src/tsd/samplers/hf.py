"""HFSampler: sampling with a transformers ``PolicyValueModel`` and its KV cache (CPU or GPU).

The laptop-scale sampler, and the reference the vLLM sampler is checked against. One call to
:meth:`HFSampler.sample` left-pads the states into batches of whole states (``n`` rows each, at
most ``max_batch_size`` rows unless ``n`` alone is more), and runs a plain autoregressive loop
with the model's KV cache:

    prefill:  model(distinct states, attention mask, position ids = cumsum(mask) - 1)  # (U, T) -> (U, V)
              then logits, mask and KV cache copied to each state's n rows      # (B = S * n, ...)
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

**Prefix reuse.** Identical states of one call (MCTS workers of a wave that stopped at the same
node) are prefilled once and share the KV cache, as a state's ``n`` rows do. Across calls, with
``prefix_cache_tokens`` > 0, the keys and values of every sequence run are kept
(:class:`~tsd.samplers.prefix_cache.PrefixKVStore`) and a state is prefilled only past its
longest stored prefix: an MCTS wave samples from nodes whose paths earlier waves generated, so it
runs almost nothing but its new tokens (the default search at 4x8 on 32 problems: 437 prefill
tokens per problem without the store, 32 with it; ``python scripts/search_efficiency.py`` prints
the prefill column). ``prefill_tokens`` counts the state tokens run through the model. Rows that
finish leave the batch once a quarter of it has (a decode step's cost grows with its rows), with
the padding no row needs any more. At paper scale vLLM's automatic prefix caching does the same
job (``sampler=vllm``) in whole KV blocks: a state's tokens past its last full cached block are run
again (the default search on the bundled policy, vLLM's CPU build: 627 prefill tokens per problem,
28 with this store; ``python benchmarks/bench_search_speed.py --sampler vllm``).

Sampling is deterministic given ``seed`` and the same sequence of calls (one ``torch.Generator``
is advanced by every call), but not across different batchings of the same rows.

    python -c "from tsd.samplers.hf import HFSampler; help(HFSampler)"
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tsd.config import check_int, check_number, require
from tsd.models.policy_value import PolicyValueModel
from tsd.samplers.base import EXHAUSTED_MASS, Continuation, FinishReason, Sampler, StopMode
from tsd.samplers.prefix_cache import PrefixKVStore


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


def top_p_filter(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    mass reaches ``top_p``, the rest get -inf. ``logits`` (B, V), already temperature-scaled;
    ``top_p`` one number or one per row (B,); a row with ``top_p >= 1`` keeps everything. Both
    samplers' distributions go through this function (vLLM's in its logits processor)."""
    p = torch.as_tensor(top_p, dtype=logits.dtype, device=logits.device).reshape(-1, 1)  # (B or 1, 1)
    sorted_logits, order = logits.sort(-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(-1)  # (B, V)
    mass_before = probs.cumsum(-1) - probs  # (B, V): mass of the strictly more likely tokens
    # the top token always has 0 before it; top_p >= 1 keeps the tail that rounding puts past 1
    drop_sorted = (mass_before >= p) & (p < 1)  # (B, V)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # (B, V) back in vocabulary order
    return logits.masked_fill(drop, float("-inf"))


#: prefix (token ids) -> {next token: probability, given the prefix, of the excluded continuations
#: through it}; only prefixes that excluded continuations pass through are keys
ExclusionTrie = dict[tuple[int, ...], dict[int, float]]


def exclusion_trie(excluded: Sequence[Any]) -> ExclusionTrie:
    """The masses :meth:`HFSampler._pick` takes off: for each excluded continuation ``c`` and each
    position ``t``, ``P(c_t, ..., c_end | c_<t) = exp(sum_{i >= t} log p_i)`` is added at prefix
    ``c[:t]`` under token ``c[t]``. Drawing ``c[t]`` with probability ``p(c[t]) - mass`` at every
    prefix samples exactly from the policy conditioned on avoiding the excluded continuations. A
    continuation listed twice is excluded once (its mass taken off twice would take probability
    from the other continuations through its prefixes)."""
    trie: ExclusionTrie = {}
    seen: set[tuple[int, ...]] = set()
    for c in excluded:
        ids, lps = list(c.token_ids), [float(x) for x in c.logprobs]
        if (key := tuple(ids)) in seen:
            continue
        seen.add(key)
        suffix = 0.0
        masses = []
        for lp in reversed(lps):
            suffix += lp
            masses.append(math.exp(suffix))
        masses.reverse()
        prefix: tuple[int, ...] = ()
        for tok, mass in zip(ids, masses):
            node = trie.setdefault(prefix, {})
            node[tok] = node.get(tok, 0.0) + mass
            prefix = (*prefix, tok)
    return trie


def _plain_dynamic_cache(cache: Any) -> bool:
    """Whether ``cache`` is a :class:`DynamicCache` of full-attention layers (keys and values
    (B, heads, T, head_dim) covering every position): the layout prefix reuse slices and rebuilds."""
    return isinstance(cache, DynamicCache) and all(
        type(layer) is DynamicLayer and layer.keys is not None and layer.keys.dim() == 4
        for layer in cache.layers
    )


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
        prefix_cache_tokens: keep the keys and values of up to this many tokens of the sequences
            run so far (:class:`~tsd.samplers.prefix_cache.PrefixKVStore`), and prefill a state
            only past its longest stored prefix; cleared when the weights change. ``0`` = off.
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
        prefix_cache_tokens: int = 0,
    ) -> None:
        check_number(temperature, "HFSampler.temperature", low=0)  # 0 = greedy
        check_int(prefix_cache_tokens, "HFSampler.prefix_cache_tokens", low=0)
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
        self.generated_tokens = 0
        self.prefill_tokens = 0
        self.exhausted_draws = 0

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

        self.prefix_store = PrefixKVStore(prefix_cache_tokens) if prefix_cache_tokens else None
        #: per parameter: its storage (weakly) and in-place version when the store was last checked
        self._weights_seen: list[tuple[weakref.ref, int]] | None = None

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
        rows = [list(s) for s in states]  # (B,) token lists
        if any(len(s) == 0 for s in rows):
            raise ValueError("HFSampler.sample: every state needs at least one token")
        if exclude is not None and len(exclude) != len(states):
            raise ValueError(f"HFSampler.sample: exclude has {len(exclude)} entries for {len(states)} states")
        tries: list[ExclusionTrie | None] = [None] * len(states)
        if exclude is not None:  # one trie per distinct list (MCTS workers at one node pass the same)
            built: dict[int, ExclusionTrie] = {}
            tries = [built.setdefault(id(e), exclusion_trie(e)) if e else None for e in exclude]

        # a batch holds whole states (n adjacent rows each): each state is prefilled once and its
        # KV cache repeated n times, so the prompt's cost does not grow with n
        per_batch = max(1, self.max_batch_size // n)
        flat: list[Continuation] = []
        values: list[float] = []
        with self._eval_mode(), torch.inference_mode():
            for start in range(0, len(states), per_batch):
                conts, vals = self._generate(
                    rows[start : start + per_batch],
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
                self.prefill_tokens += sum(len(x) for x in chunk)
                _, values, _ = self.model(ids, mask, pos, logits_to_keep=1)  # values: (B, 1)
                out.extend(values[:, -1].float().tolist())
        return out

    def drop_cache(self) -> None:
        if self.prefix_store is not None:
            self.prefix_store.clear()

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state_dict, strict=True)
        self.version = int(version)
        if self.prefix_store is not None:
            self.prefix_store.clear()

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
                logits = top_p_filter(logits, self.top_p)
        logp = torch.log_softmax(logits, -1)  # (B, V), renormalised over what may be sampled
        probs = logp.exp()  # (B, V)
        if excluded:  # every row's excluded tokens at once: (E,) entries of (row, token, mass)
            dev = probs.device
            counts = [len(m) for m in excluded.values()]
            rows = torch.tensor(list(excluded), dtype=torch.long, device=dev)  # (R,)
            owner = torch.repeat_interleave(
                torch.arange(len(counts), device=dev), torch.tensor(counts, device=dev)
            )  # (E,) entry -> its row's place in rows
            at = rows[owner]  # (E,) entry -> batch row
            ids = torch.tensor([t for m in excluded.values() for t in m], dtype=torch.long, device=dev)
            mass = torch.tensor([x for m in excluded.values() for x in m.values()], device=dev)  # (E,)
            p = probs[at, ids]  # (E,)
            left = (p - mass).clamp(min=0)  # (E,)
            taken = torch.zeros(len(counts), device=dev).index_add_(0, owner, p - left)  # (R,)
            # nothing left but rounding (masses recorded in fp32 leave ~1e-8 of noise), or
            # nothing at all: the row draws from the policy itself (counted: a paid repeat), as vLLM does
            ok = probs[rows].sum(-1) - taken > EXHAUSTED_MASS  # (R,)
            self.exhausted_draws += len(counts) - int(ok.sum())
            use = ok[owner]  # (E,)
            probs = probs.clone()
            probs[at[use], ids[use]] = left[use]
        if greedy:
            tok = probs.argmax(-1)  # (B,)
        else:
            tok = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)  # (B,)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

    def _generate(
        self,
        states: list[list[int]],
        n: int,
        max_new_tokens: int,
        stop: StopMode,
        tries: Sequence[ExclusionTrie | None],
    ) -> tuple[list[Continuation], list[float]]:
        """One left-padded batch through the cached autoregressive loop: the S states' distinct
        ones are prefilled once, then each state becomes n adjacent rows (B = S * n) sharing its
        KV cache.
        Returns the B continuations and V(s) of the S states, read from the prefill. A row whose
        state has an exclusion trie follows it while its tokens stay on an excluded prefix."""
        B = len(states) * n
        dev = self.device
        # prefix reuse: each distinct state is prefilled once, and its KV cache copied to every row
        # that starts from it (its n rows, and the rows of identical states: MCTS workers that
        # stopped at the same node of a wave)
        first: dict[tuple[int, ...], int] = {}
        src = [first.setdefault(tuple(s), len(first)) for s in states]  # state -> distinct index
        distinct = [list(k) for k in first]
        logits, state_values, cache, mask, next_pos = self._prefill(distinct)  # (U, 1, V), (U, 1), ..
        u_values = state_values[:, -1].float().tolist()
        values = [u_values[j] for j in src]
        rows = torch.tensor([j for j in src for _ in range(n)], dtype=torch.long, device=dev)  # (B,)
        if len(distinct) != B:
            logits = logits[rows]  # (B, 1, V)
            mask, next_pos = mask[rows], next_pos[rows]  # (B, W), (B, 1)
            if cache is not None:
                cache.batch_select_indices(rows)  # every layer's keys and values: (U, ...) -> (B, ...)

        step_ids = self._step_ids if stop == "step" else set()
        step_texts = self._step_texts if stop == "step" else []
        step_t = torch.tensor(sorted(step_ids), dtype=torch.long, device=dev)
        answer_t = torch.tensor(sorted(self._answer_ids), dtype=torch.long, device=dev)

        tokens: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list[float]] = [[] for _ in range(B)]
        reasons: list[FinishReason | None] = [None] * B
        # the rows still decoding, as indices into tokens/logprobs; the batch (logits, mask,
        # positions, KV cache) holds exactly these, in this order
        cur = list(range(B))
        # row -> its state's trie, while the row's tokens so far are a prefix in it
        on_trie: dict[int, ExclusionTrie] = {r: trie for r in range(B) if (trie := tries[r // n])}
        for t in range(max_new_tokens):
            excluded = {b: on_trie[r][tuple(tokens[r])] for b, r in enumerate(cur) if r in on_trie}
            tok, lp = self._pick(logits[:, -1], excluded)  # (b,), (b,)
            tok_l, lp_l = tok.tolist(), lp.tolist()
            eos_l = torch.isin(tok, self._eos).tolist()
            ans_l = torch.isin(tok, answer_t).tolist()
            step_l = torch.isin(tok, step_t).tolist()
            keep: list[int] = []  # batch positions of the rows that go on
            for b, r in enumerate(cur):
                if reasons[r] is not None:  # finished earlier, left in the batch until compaction
                    continue
                tokens[r].append(tok_l[b])
                logprobs[r].append(lp_l[b])
                if eos_l[b]:
                    reasons[r] = "eos"
                elif ans_l[b] or self._ends_with(tokens[r], self._answer_texts):
                    reasons[r] = "answer"
                elif step_l[b] or self._ends_with(tokens[r], step_texts):
                    reasons[r] = "step"
                elif t == max_new_tokens - 1:
                    reasons[r] = "length"
                if reasons[r] is None:
                    keep.append(b)
                elif r in on_trie:
                    del on_trie[r]
            on_trie = {r: trie for r, trie in on_trie.items() if tuple(tokens[r]) in trie}
            if not keep:
                self._store_rows(cache, mask, [(b, states[r // n] + tokens[r]) for b, r in enumerate(cur)])
                break
            feed = tok[:, None]  # (b, 1)
            if len(keep) <= 3 * len(cur) // 4:
                # a quarter of the batch has finished: drop those rows from every tensor and the
                # KV cache (a decode step's cost grows with its rows); finished rows kept until then
                # decode one more token, and their outputs are ignored
                gone = set(range(len(cur))) - set(keep)
                self._store_rows(
                    cache, mask, [(b, states[cur[b] // n] + tokens[cur[b]]) for b in sorted(gone)]
                )
                idx = torch.tensor(keep, dtype=torch.long, device=dev)
                cur = [cur[b] for b in keep]
                feed, mask, next_pos = feed[idx], mask[idx], next_pos[idx]
                if cache is not None:  # (a stand-in model in the tests keeps none)
                    cache.batch_select_indices(idx)
                    mask = self._trim_leading_padding(cache, mask)
            mask = torch.cat([mask, mask.new_ones((len(cur), 1))], dim=1)  # (b, T + t + 1)
            logits, _, cache = self.model(
                feed, mask, next_pos, past_key_values=cache, use_cache=True, logits_to_keep=1
            )  # (b, 1, V)
            next_pos = next_pos + 1
        # (the last step gives every row left a finish reason: the loop always ends at the break)
        return [Continuation(tokens[i], logprobs[i], reasons[i] or "length") for i in range(B)], values

    def _prefill(self, states: list[list[int]]):
        """Run the distinct ``states`` (U) through the model to start sampling: ``(logits (U, 1, V),
        values (U, 1), cache, mask (U, W), next positions (U, 1))``. With the prefix store, each
        state's longest stored prefix comes from the store and only the rest is run; the batch's
        cache is then ``[stored prefix, right-aligned | the rest, right-aligned]`` with the padding
        between them masked, and positions given explicitly."""
        dev = self.device
        store = self._live_store()
        found = [store.longest_prefix(s) for s in states] if store is not None else []
        # at least the last token of a state is run: its logits start the sampling
        cached = [min(c, len(s) - 1) for (c, _), s in zip(found, states)]
        if not any(cached):
            input_ids, mask, pos = left_pad(states, self.pad_id, dev)  # (U, T) each
            self.prefill_tokens += sum(len(s) for s in states)
            logits, values, cache = self.model(input_ids, mask, pos, use_cache=True, logits_to_keep=1)
            if store is not None and not _plain_dynamic_cache(cache):
                self.prefix_store = None  # sliding windows, linear attention, ...: no reuse
            return logits, values, cache, mask, pos[:, -1:] + 1
        assert store is not None
        U, C = len(states), max(cached)
        rest = [s[c:] for s, c in zip(states, cached)]
        rest_ids, rest_mask, _ = left_pad(rest, self.pad_id, dev)  # (U, R)
        R = rest_ids.shape[1]
        pos = torch.zeros((U, R), dtype=torch.long)  # (U, R): each token's real position
        prefix_mask = torch.zeros((U, C), dtype=torch.long)  # (U, C)
        some = store.get(next(e for (c, e), k in zip(found, cached) if k), 1)  # (layers, 2, H, 1, D)
        L_, _, H, _, D = some.shape
        kv = torch.zeros((L_, 2, U, H, C, D), dtype=some.dtype, device=some.device)
        for i, ((_, e), c, r) in enumerate(zip(found, cached, rest)):
            pos[i, R - len(r) :] = torch.arange(c, c + len(r))
            if c:
                prefix_mask[i, C - c :] = 1
                kv[:, :, i, :, C - c :] = store.get(e, c)
        cache = DynamicCache(ddp_cache_data=[(kv[layer, 0], kv[layer, 1]) for layer in range(L_)])
        mask = torch.cat([prefix_mask.to(dev), rest_mask], dim=1)  # (U, C + R)
        pos = pos.to(dev)
        self.prefill_tokens += sum(len(r) for r in rest)
        logits, values, cache = self.model(
            rest_ids, mask, pos, past_key_values=cache, use_cache=True, logits_to_keep=1
        )  # (U, 1, V), (U, 1)
        return logits, values, cache, mask, pos[:, -1:] + 1

    def _trim_leading_padding(self, cache: Any, mask: torch.Tensor) -> torch.Tensor:
        """Drop the leading columns that are padding in every row left (rows with long states
        finished, or were never in this batch): each decode step then attends over fewer
        positions. Positions are explicit, so only the mask and the keys/values shrink."""
        if not _plain_dynamic_cache(cache):
            return mask
        lead = int(mask.argmax(dim=1).min())  # first real column of the earliest-starting row
        if lead == 0:
            return mask
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
        return mask[:, lead:]

    def _live_store(self) -> PrefixKVStore | None:
        """The prefix store, emptied first if the weights changed since it was filled. The model
        may be changed between calls by whoever shares it: trained in place (every parameter's
        in-place version counter moves), given new tensors (``p.data = t``,
        ``load_state_dict(assign=True)``: the counter does not move, or restarts at 0, but the
        storage is another one). Both are compared: the counter, and the storage itself (a weak
        reference, so a freed storage whose address is reused is not mistaken for the old one).
        An in-place write that bypasses the counter (``p.data.add_(x)``) changes neither: call
        :meth:`drop_cache` after one."""
        if self.prefix_store is None:
            return None
        params = list(self.model.parameters())
        seen = self._weights_seen
        if (
            seen is None
            or len(seen) != len(params)
            or any(ref() is not p.untyped_storage() or v != p._version for (ref, v), p in zip(seen, params))
        ):
            self.prefix_store.clear()
            self._weights_seen = [(weakref.ref(p.untyped_storage()), p._version) for p in params]
        return self.prefix_store

    def _store_rows(self, cache: Any, mask: torch.Tensor, rows: Sequence[tuple[int, list[int]]]) -> None:
        """Keep the keys and values of batch rows about to leave the batch: ``(batch position,
        state + generated tokens)``; the last generated token was never run, so all but it. The
        store picks the rows it does not hold yet, and only their real positions are copied out,
        packed one after the other (one gather per layer): the store holds exactly the positions
        it counts, not the padded batch."""
        if self.prefix_store is None or not rows:
            return
        keys = [layer.keys for layer in cache.layers]  # (b, H, W, D) each
        values = [layer.values for layer in cache.layers]

        def gather(chosen: list[int]) -> torch.Tensor:
            b_idx, w_idx = [], []
            for i in chosen:
                b, seq = rows[i]
                where = mask[b].nonzero().squeeze(-1)[: len(seq) - 1]  # the row's real positions, in order
                b_idx.append(torch.full_like(where, b))
                w_idx.append(where)
            bi, wi = torch.cat(b_idx), torch.cat(w_idx)  # (P,) each
            # k[bi, :, wi]: (P, H, D), the chosen positions only (a copy: nothing else stays alive)
            return torch.stack([torch.stack([k[bi, :, wi], v[bi, :, wi]]) for k, v in zip(keys, values)])

        self.prefix_store.insert_group([seq[:-1] for _, seq in rows], gather)

    def _ends_with(self, tokens: list[int], texts: Sequence[str]) -> bool:
        """Whether the row's newest tokens complete a multi-token stop string (general path)."""
        if not texts:
            return False
        tail = self.tokenizer.decode(tokens[-self._tail :], skip_special_tokens=False)
        # 'in', not endswith: a BPE token may carry text past the stop string ("</step>\n")
        return any(s in tail for s in texts)
