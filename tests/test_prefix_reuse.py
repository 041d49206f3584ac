"""What makes the search as fast as sampling: a path sampled in one call and cut into its steps
(``Sampler.split_steps``), identical states prefilled once, the prefix store that lets a later call
prefill a state only past what was already run (``PrefixKVStore``), finished rows dropped from the
batch, and the count of draws where everything was excluded. Every reuse is checked against
teacher forcing: the recorded log-probs must be the model's, whatever was reused."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_sampler import BigramPolicy, ids, states_of, teacher_forced_logprobs

from tsd.samplers.base import Continuation
from tsd.samplers.hf import HFSampler
from tsd.samplers.prefix_cache import PrefixKVStore


def _cont(tok, text: str, finish: str) -> Continuation:
    t = ids(tok, text)
    return Continuation(t, [-0.5] * len(t), finish)


# ---------------------------------------------------------------------------- split_steps
def test_split_steps_cuts_after_each_step_and_keeps_the_last_reason(random_policy, char_tokenizer):
    tok = char_tokenizer
    sampler = HFSampler(random_policy, tok, seed=0)
    path = _cont(tok, "<step>3+5=8</step><step>8*2=16</step><answer>(3+5)*2</answer>", "answer")
    pieces = sampler.split_steps(path)
    assert [tok.decode(p.token_ids, skip_special_tokens=False) for p in pieces] == [
        "<step>3+5=8</step>",
        "<step>8*2=16</step>",
        "<answer>(3+5)*2</answer>",
    ]
    assert [p.finish_reason for p in pieces] == ["step", "step", "answer"]
    # the pieces are the path: the same tokens and log-probs, in order
    assert sum((p.token_ids for p in pieces), []) == path.token_ids
    assert sum((p.logprobs for p in pieces), []) == path.logprobs
    # a path cut by the token cap right after a step: that step is a step (a step call checks its
    # stops before its cap); a cap mid-step stays "length"; no step at all is one piece
    capped = sampler.split_steps(_cont(tok, "<step>1+1=2</step>", "length"))
    assert [p.finish_reason for p in capped] == ["step"]
    mid = sampler.split_steps(_cont(tok, "<step>1+1=2</step><step>2+", "length"))
    assert [p.finish_reason for p in mid] == ["step", "length"]
    assert [p.finish_reason for p in sampler.split_steps(_cont(tok, "<answer>3</answer>", "answer"))] == [
        "answer"
    ]


def test_split_steps_matches_multi_token_stop_strings_in_the_decoded_piece(char_tokenizer):
    # with the char tokenizer "ab" is two tokens: the decoded-tail path, as sampling matches it
    tok = char_tokenizer
    x, a, b = (ids(tok, ch)[0] for ch in "xab")
    sampler = HFSampler(BigramPolicy(len(tok), {}), tok, seed=0, stop_strings=("ab",))
    pieces = sampler.split_steps(Continuation([x, a, b, x, a, x, a, b, x], [-1.0] * 9, "eos"))
    assert [p.token_ids for p in pieces] == [[x, a, b], [x, a, x, a, b], [x]]
    assert [p.finish_reason for p in pieces] == ["step", "step", "eos"]
    # an "a" ending one piece and a "b" starting the next is no stop: the match is within a piece
    pieces = sampler.split_steps(Continuation([x, a, b, b, x], [-1.0] * 5, "eos"))
    assert [p.token_ids for p in pieces] == [[x, a, b], [b, x]]


def test_answer_mode_exclusion_applies_to_the_first_step_only(char_tokenizer):
    # a bigram policy: after BOS "a" or "c" (p ~ 1/2 each), then </step>, then "a"/"c" again ... and
    # </answer> after "c" with some mass. Excluding the one-step continuation [a, </step>] in answer
    # mode: no path starts with it, and below the first step "a" is drawn as freely as before
    tok = char_tokenizer
    a, c = ids(tok, "a")[0], ids(tok, "c")[0]
    step, answer = tok.convert_tokens_to_ids("</step>"), tok.convert_tokens_to_ids("</answer>")
    bos = tok.bos_token_id
    model = BigramPolicy(len(tok), {})
    with torch.no_grad():
        for row in (bos, step):
            model.table[row] = -50.0
            model.table[row, a] = model.table[row, c] = 50.0
        for row in (a, c):
            model.table[row] = -50.0
            model.table[row, step] = 50.0
        model.table[c, answer] = 50.0 - math.log(3)  # after c: </step> 3/4, </answer> 1/4
    sampler = HFSampler(model, tok, seed=0, max_batch_size=4096)
    first = SimpleNamespace(token_ids=[a, step], logprobs=[math.log(0.5), 0.0])
    n = 600
    out = sampler.sample([[bos]] * n, n=1, max_new_tokens=12, stop="answer", exclude=[[first]] * n)
    paths = [r for (r,) in out]
    assert all(p.token_ids[0] == c for p in paths)  # never the excluded first step
    seconds = [p.token_ids[2] for p in paths if len(p.token_ids) > 2 and p.token_ids[1] == step]
    assert len(seconds) > 300  # most paths go on past their first step ...
    share_a = seconds.count(a) / len(seconds)
    assert abs(share_a - 0.5) < 4 * math.sqrt(0.25 / len(seconds))  # ... and "a" is allowed there
    assert sampler.exhausted_draws == 0


def test_everything_excluded_is_drawn_from_the_policy_and_counted(char_tokenizer):
    tok = char_tokenizer
    x = ids(tok, "x")[0]
    bos = tok.bos_token_id
    model = BigramPolicy(len(tok), {bos: x})  # after BOS: x with probability ~1
    sampler = HFSampler(model, tok, seed=0)
    excl = SimpleNamespace(token_ids=[x], logprobs=[0.0])  # all the mass there is
    out = sampler.sample([[bos]] * 3, n=1, max_new_tokens=1, stop="step", exclude=[[excl]] * 3)
    assert [r.token_ids for (r,) in out] == [[x]] * 3  # a paid repeat, not a crash ...
    assert sampler.exhausted_draws == 3  # ... and counted
    sampler.sample([[bos]], n=1, max_new_tokens=1, stop="step")
    assert sampler.exhausted_draws == 3  # nothing excluded: nothing counted


# ---------------------------------------------------------------------------- prefill once
def test_identical_states_of_a_call_are_prefilled_once(random_policy, char_tokenizer):
    s, t, _ = states_of(char_tokenizer)
    sampler = HFSampler(random_policy, char_tokenizer, seed=0)
    out = sampler.sample([s, t, s, s], n=2, max_new_tokens=4)
    assert sampler.prefill_tokens == len(s) + len(t)
    assert len(out) == 4 and all(len(conts) == 2 for conts in out)
    for state, conts in zip([s, t, s, s], out):  # each row still continues its own state
        for cont in conts:
            ref = teacher_forced_logprobs(random_policy, char_tokenizer, state, cont.token_ids, 1.0)
            torch.testing.assert_close(torch.tensor(cont.logprobs), ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- the prefix store
def test_prefix_store_finds_the_longest_held_prefix():
    store = PrefixKVStore(max_tokens=10)
    kv = torch.arange(2 * 2 * 1 * 4 * 1, dtype=torch.float32).reshape(2, 2, 1, 4, 1)  # 4 positions
    fetched = []

    def fetch(length):
        fetched.append(length)
        return kv[:, :, :, :length]

    store.insert([1, 2, 3, 4, 5], 4, fetch)  # the keys/values of the first 4 tokens
    assert fetched == []  # nothing is sliced out until a prefix is reused
    assert store.longest_prefix([1, 2, 3, 9]) == (3, 0)
    assert store.longest_prefix([1, 2, 3, 4, 5]) == (4, 0)  # the 5th token's were never run
    assert store.longest_prefix([7]) == (0, -1)
    assert store.get(0, 3).shape == (2, 2, 1, 3, 1) and torch.equal(store.get(0, 3), kv[:, :, :, :3])
    store.insert([1, 2, 3], 3, fetch)  # held already: nothing new
    assert len(store) == 1 and store.tokens == 4
    store.insert([1, 2, 7, 8], 4, fetch)  # a branch: stored whole, found through the shared trie
    assert store.longest_prefix([1, 2, 7, 8]) == (4, 1) and store.tokens == 8
    store.insert([5, 6, 7, 8], 4, fetch)  # 12 > 10 tokens: cleared first, then stored
    assert len(store) == 1 and store.tokens == 4 and store.longest_prefix([1, 2]) == (0, -1)
    with pytest.raises(ValueError, match="4 positions of keys/values for 3 tokens"):
        store.insert([1, 2, 3], 4, fetch)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 4294967295\]"):
        store.insert([1, -2, 3], 3, fetch)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 4294967295\]"):
        store.insert([1, 2**32], 2, fetch)
    # an id that could not be stored ends the prefix; it never aliases another node's key
    store.insert([5, 6], 2, fetch)
    assert store.longest_prefix([5, 6 + 2**32]) == (1, 0) and store.longest_prefix([-1]) == (0, -1)


def test_prefix_store_trie_is_invisible_to_the_garbage_collector():
    """A search stores ~10^5 trie nodes: they must not be objects every full GC walks."""
    import gc

    store = PrefixKVStore(max_tokens=100_000)
    for i in range(200):
        store.insert([i % 7, i % 11, *range(i, i + 50)], 50, lambda length: None)
    assert store.longest_prefix([3, 3, *range(3, 53)]) == (50, 3)
    assert not gc.is_tracked(store._trie)


def test_prefix_reuse_across_calls_keeps_the_logprobs_exact(random_policy, char_tokenizer):
    tok = char_tokenizer
    sampler = HFSampler(random_policy, tok, seed=3, prefix_cache_tokens=4096)
    states = states_of(tok)
    first = sampler.sample(states, n=2, max_new_tokens=10, stop="answer")
    assert sampler.prefix_store is not None and len(sampler.prefix_store) > 0
    # the next states extend what was run (as a search's next wave does), plus one never seen
    later = [states[i] + first[i][j].token_ids[: max(1, len(first[i][j].token_ids) // 2)] for i, j in
             ((0, 0), (1, 1), (2, 0))]  # fmt: skip
    later.append([tok.bos_token_id, *ids(tok, "[9,9,9,9]->81\n")])
    before, hits = sampler.prefill_tokens, sampler.prefix_store.hit_tokens
    second = sampler.sample(later, n=3, max_new_tokens=10, stop="answer")
    # only what follows each stored prefix was run (at least one token per state)
    assert sampler.prefix_store.hit_tokens - hits >= sum(len(s) for s in later[:3]) - 3
    assert sampler.prefill_tokens - before < sum(len(s) for s in later) / 2
    for state, conts in zip(later, second):
        for c in conts:
            ref = teacher_forced_logprobs(random_policy, tok, state, c.token_ids, 1.0)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
    _, values = sampler.sample_and_value(later, n=1, max_new_tokens=1)
    with torch.no_grad():  # V(s) from a reused prefix equals the plain forward's
        plain = [float(random_policy(torch.tensor([s]))[1][0, -1]) for s in later]
    assert values == pytest.approx(plain, abs=1e-5)


def test_prefix_store_is_dropped_when_the_weights_change_in_place(random_policy, char_tokenizer):
    tok = char_tokenizer
    sampler = HFSampler(random_policy, tok, seed=0, prefix_cache_tokens=4096)
    states = states_of(tok)
    sampler.sample(states, n=1, max_new_tokens=6, stop="answer")
    with torch.no_grad():  # a trainer's optimiser step on the shared model
        next(random_policy.parameters()).add_(0.5)
    hits = sampler.prefix_store.hit_tokens
    again = sampler.sample(states, n=2, max_new_tokens=6, stop="answer")
    assert sampler.prefix_store.hit_tokens == hits  # nothing reused from the old weights
    for state, conts in zip(states, again):
        for c in conts:
            ref = teacher_forced_logprobs(random_policy, tok, state, c.token_ids, 1.0)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
    sampler.load_weights(random_policy.state_dict(), version=1)
    assert len(sampler.prefix_store) == 0


def test_prefix_store_is_off_for_a_model_without_a_plain_cache(char_tokenizer):
    tok = char_tokenizer
    sampler = HFSampler(BigramPolicy(len(tok), {}), tok, seed=0, prefix_cache_tokens=64)
    sampler.sample([[tok.bos_token_id]], n=2, max_new_tokens=3)
    assert sampler.prefix_store is None  # a stand-in model with no KV cache: nothing to reuse
