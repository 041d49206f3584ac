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
    """A continuation whose k-th token has log-prob -(k + 1) / 100: each piece's are its own."""
    t = ids(tok, text)
    return Continuation(t, [-(k + 1) / 100 for k in range(len(t))], finish)


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
    # the pieces are the path: the same tokens, in order, each with its own tokens' log-probs (the
    # char tokenizer's tags are one token: 7, 8 and 9 tokens)
    assert sum((p.token_ids for p in pieces), []) == path.token_ids
    assert [len(p.token_ids) for p in pieces] == [7, 8, 9]
    assert pieces[0].logprobs == pytest.approx([-0.01, -0.02, -0.03, -0.04, -0.05, -0.06, -0.07])
    assert pieces[1].logprobs == pytest.approx([-0.08, -0.09, -0.10, -0.11, -0.12, -0.13, -0.14, -0.15])
    assert pieces[2].logprobs == pytest.approx(
        [-0.16, -0.17, -0.18, -0.19, -0.20, -0.21, -0.22, -0.23, -0.24]
    )
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
def packed(rows, chosen):
    """What a gather returns for ``chosen`` rows: each row's position k holds the number 100 * row + k
    (layers 2, heads 1, head_dim 1), so a slice says which row and positions it came from."""
    cols = [torch.tensor([100.0 * i + k for k in range(len(rows[i]))]) for i in chosen]
    flat = torch.cat(cols)  # (P,)
    return flat[None, None, :, None, None].expand(2, 2, -1, 1, 1).clone()  # (layers, 2, P, H, D)


def test_prefix_store_holds_new_rows_once_and_finds_the_longest_held_prefix():
    store = PrefixKVStore(max_tokens=12)
    calls = []

    def gather(rows):
        return lambda chosen: calls.append(list(chosen)) or packed(rows, chosen)

    rows = [[1, 2, 3], [1, 2, 3, 4], [7, 8]]  # row 0 is a prefix of row 1: held through it
    assert store.insert_group(rows, gather(rows)) == [1, 2]  # longest first; row 0 skipped
    assert calls == [[1, 2]] and store.tokens == 6 and len(store) == 2
    assert store.longest_prefix([1, 2, 3, 9]) == (3, 0)
    assert store.longest_prefix([1, 2, 3, 4, 5]) == (4, 0) and store.longest_prefix([9]) == (0, -1)
    # entry 0 is row 1 (values 100..103), entry 1 row 2 (200, 201), as (layers, 2, heads, length, dim)
    assert store.get(0, 3).shape == (2, 2, 1, 3, 1)
    assert store.get(0, 3)[0, 0, 0, :, 0].tolist() == [100.0, 101.0, 102.0]
    assert store.get(1, 2)[1, 1, 0, :, 0].tolist() == [200.0, 201.0]
    # rows held already gather nothing; a branch off a held row is stored whole
    assert store.insert_group([[1, 2], [7, 8]], gather([[1, 2], [7, 8]])) == [] and len(calls) == 1
    assert store.insert_group([[1, 2, 9, 9]], gather([[1, 2, 9, 9]])) == [0]
    assert store.longest_prefix([1, 2, 9, 9]) == (4, 2) and store.tokens == 10
    # 10 + 4 > 12 tokens: cleared first; then rows that still do not fit are left out (longest first)
    big = [[5] * 9, [6] * 4, [4] * 3]
    assert store.insert_group(big, gather(big)) == [0, 2] and store.tokens == 12
    assert store.longest_prefix([1, 2]) == (0, -1) and store.longest_prefix([4, 4, 4]) == (3, 1)
    # an id that could not be stored ends the prefix; it never aliases another node's key
    assert store.longest_prefix([4, 4 + 2**32]) == (1, 1) and store.longest_prefix([-1]) == (0, -1)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 4294967295\]"):
        store.insert_group([[1, -2, 3]], gather([[1, -2, 3]]))
    with pytest.raises(ValueError, match=r"gather returned \(2, 2, 1, 1, 1\), expected \(layers, 2, 2,"):
        store.insert_group([[3, 3]], lambda chosen: torch.zeros(2, 2, 1, 1, 1))


def test_prefix_store_trie_is_invisible_to_the_garbage_collector():
    """A search stores ~10^5 trie nodes: they must not be objects every full GC walks."""
    import gc

    store = PrefixKVStore(max_tokens=100_000)
    for i in range(200):
        rows = [[i % 7, i % 11, *range(i, i + 48)]]
        store.insert_group(rows, lambda chosen, rows=rows: packed(rows, chosen))
    assert store.longest_prefix([3, 3, *range(3, 51)]) == (50, 3)
    assert not gc.is_tracked(store._trie)


def reachable_tensor_bytes(root) -> int:
    """Bytes of every tensor storage reachable from ``root`` through containers, closures and
    object attributes (not through modules, classes or functions' globals): what ``root`` keeps
    alive, however it holds it."""
    import gc
    import types

    seen, storages, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        elif not isinstance(obj, (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType)):
            stack.extend(gc.get_referents(obj))
    return sum(storages.values())


def test_prefix_store_memory_is_bounded_by_what_it_holds(random_policy, char_tokenizer):
    """The memory the store keeps alive is its counted tokens' keys and values and never more than
    the cap: it once pinned the whole padded slice of a batch for any one of its rows (rows of
    different lengths pad each other; rows held already pinned it too)."""
    tok = char_tokenizer
    cap = 300
    sampler = HFSampler(random_policy, tok, seed=0, prefix_cache_tokens=cap)
    cfg = random_policy.lm.config
    per_token = (
        cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    )
    states = states_of(tok)  # 13, 2 and 19 tokens: a left-padded batch
    for n in (4, 4, 2, 6):
        sampler.sample(states, n=n, max_new_tokens=12, stop="answer")
        store = sampler.prefix_store
        assert 0 < store.tokens <= cap
        held = reachable_tensor_bytes(store)
        assert held == store.tokens * per_token <= cap * per_token, (held / per_token, store.tokens)
        assert store.held_bytes() == held


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
    before = sampler.prefill_tokens
    new_held = sampler.prefix_store.longest_prefix(later[3])[0]  # its BOS, as every stored row's
    assert 1 <= new_held < len(later[3]) // 2
    second = sampler.sample(later, n=3, max_new_tokens=10, stop="answer")
    # only what follows each stored prefix was run: one token of each extended state (its last,
    # whose logits start the sampling), and the new state past what it shares
    assert sampler.prefill_tokens - before == 3 + len(later[3]) - new_held
    for state, conts in zip(later, second):
        for c in conts:
            ref = teacher_forced_logprobs(random_policy, tok, state, c.token_ids, 1.0)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
    _, values = sampler.sample_and_value(later, n=1, max_new_tokens=1)
    with torch.no_grad():  # V(s) from a reused prefix equals the plain forward's
        plain = [float(random_policy(torch.tensor([s]))[1][0, -1]) for s in later]
    assert values == pytest.approx(plain, abs=1e-5)


def _change_in_place(model):
    with torch.no_grad():  # a trainer's optimiser step on the shared model
        next(model.parameters()).add_(0.5)


def _change_through_data(model):
    p = next(model.parameters())
    p.data = p.data + 0.5  # another tensor behind the same parameter: its version does not move


def _load_assigned(model):
    # new tensors for every parameter: their versions restart at 0 (the same as after an earlier
    # assigned load: the counters alone cannot tell the two apart)
    model.load_state_dict({k: v + 0.5 for k, v in model.state_dict().items()}, assign=True)


@pytest.mark.parametrize("change", [_change_in_place, _change_through_data, _load_assigned])
def test_prefix_store_is_dropped_when_the_weights_change(random_policy, char_tokenizer, change):
    tok = char_tokenizer
    sampler = HFSampler(random_policy, tok, seed=0, prefix_cache_tokens=4096)
    states = states_of(tok)
    if change is _load_assigned:  # the store is filled after an assigned load, as a run would
        _load_assigned(random_policy)
    sampler.sample(states, n=1, max_new_tokens=6, stop="answer")
    before = sampler.prefill_tokens
    sampler.sample(states, n=1, max_new_tokens=6, stop="answer")
    assert sampler.prefill_tokens - before == len(states)  # same weights: only each last token runs
    change(random_policy)
    before = sampler.prefill_tokens
    again = sampler.sample(states, n=2, max_new_tokens=6, stop="answer")
    assert sampler.prefill_tokens - before == sum(len(s) for s in states)  # nothing reused
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
