"""HFSampler on CPU: stop reasons, behaviour log-probs against teacher forcing, pad/BOS ban,
seeding, value head, weight loading, top-p. Uses the random tiny Qwen2 policy (conftest) and a
handcrafted bigram model whose next token is fully scripted."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_random_policy
from torch import nn

from tsd.samplers.hf import HFSampler

REASONS = {"step", "answer", "eos", "length"}


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def states_of(tok) -> list[list[int]]:
    """Three states of different lengths (so batches are left-padded)."""
    bos = tok.bos_token_id
    return [[bos, *ids(tok, "1 2 3 4 = 10")], [bos, *ids(tok, "7")], [bos, *ids(tok, "<step>9*3=27</step>")]]


class BiasedPolicy(nn.Module):
    """A policy whose logits get a fixed bias: rigs which token is (almost) always sampled."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("bias", bias)

    @property
    def config(self):
        return self.inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, **kw):
        logits, values, cache = self.inner(input_ids, attention_mask, position_ids, past_key_values, **kw)
        return logits + self.bias, values, cache


def biased(policy, tok, token_ids: list[int], amount: float = 40.0) -> BiasedPolicy:
    bias = torch.zeros(len(tok))
    bias[token_ids] = amount
    return BiasedPolicy(policy, bias)


class BigramPolicy(nn.Module):
    """Handcrafted model: logits depend only on the last input token (a lookup table); no cache.
    ``chain`` maps token -> the next token, made ~certain; other rows are uniform."""

    def __init__(self, vocab: int, chain: dict[int, int], value: float = 0.25) -> None:
        super().__init__()
        table = torch.zeros(vocab, vocab)
        for a, b in chain.items():
            table[a, b] = 50.0
        self.table = nn.Parameter(table)
        self.value = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, **kw):
        logits = self.table[input_ids].float()  # (B, T, V)
        keep = kw.get("logits_to_keep", 0)
        if keep:
            logits = logits[:, -keep:]
        return logits, torch.full(logits.shape[:2], self.value), None


def teacher_forced_logprobs(model, tok, state, completion, temperature, top_p=1.0) -> torch.Tensor:
    """Log-probs of ``completion`` from one uncached, unpadded forward over state + completion,
    under the distribution the sampler samples from: logits / T, pad/BOS banned, top-p."""
    full = torch.tensor([state + completion])
    with torch.no_grad():
        logits, _, _ = model(full)  # (1, L, V)
    logits = logits[0, len(state) - 1 : -1].float()  # (C, V): positions predicting the completion
    logits[:, [tok.pad_token_id, tok.bos_token_id]] = float("-inf")
    logits = logits / temperature
    if top_p < 1.0:
        probs = logits.softmax(-1)
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------- basics
def test_n_continuations_per_state_and_token_count(random_policy, char_tokenizer):
    sampler = HFSampler(random_policy, char_tokenizer, seed=0)
    states = states_of(char_tokenizer)
    out = sampler.sample(states, n=4, max_new_tokens=5)
    assert len(out) == len(states) and all(len(conts) == 4 for conts in out)
    total = 0
    for conts in out:
        for c in conts:
            assert 1 <= len(c.token_ids) <= 5 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason in REASONS
            assert c.finish_reason != "length" or len(c.token_ids) == 5
            assert all(lp <= 0.0 for lp in c.logprobs)
            total += len(c.token_ids)
    assert sampler.generated_tokens == total
    sampler.sample(states[:1], n=1, max_new_tokens=2)
    assert sampler.generated_tokens > total


@pytest.mark.parametrize(
    ("temperature", "top_p", "batch"),
    [
        (1.0, 1.0, 64),
        (0.7, 1.0, 64),
        (1.5, 1.0, 5),
        (1.3, 0.8, 64),
        (1.0, 1.0, 2),
    ],  # 2 < n: one state a batch
)
def test_logprobs_match_teacher_forcing(random_policy, char_tokenizer, temperature, top_p, batch):
    sampler = HFSampler(
        random_policy, char_tokenizer, temperature=temperature, top_p=top_p, max_batch_size=batch, seed=1
    )
    states = states_of(char_tokenizer)
    out = sampler.sample(states, n=3, max_new_tokens=8, stop="answer")
    for state, conts in zip(states, out):
        for c in conts:
            ref = teacher_forced_logprobs(
                random_policy, char_tokenizer, state, c.token_ids, temperature, top_p
            )
            # finite => every sampled token was inside the nucleus (and not pad/BOS)
            assert torch.isfinite(ref).all()
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


def test_top_p_keeps_only_the_nucleus(random_policy, char_tokenizer):
    # a tiny nucleus: with the top token rigged to hold > 50% of the mass, top_p=0.5 is greedy
    eight = ids(char_tokenizer, "8")[0]
    model = biased(random_policy, char_tokenizer, [eight], amount=6.0)
    sampler = HFSampler(model, char_tokenizer, top_p=0.5, seed=0)
    out = sampler.sample(states_of(char_tokenizer), n=4, max_new_tokens=6)
    for conts in out:
        for c in conts:
            assert set(c.token_ids) == {eight}
            # the nucleus is one token, renormalised: log p = 0
            assert max(abs(lp) for lp in c.logprobs) < 1e-6


# ---------------------------------------------------------------------------- stop reasons
@pytest.mark.parametrize(
    ("rigged", "stop", "reason", "length"),
    [
        ("</step>", "step", "step", 1),
        ("</answer>", "step", "answer", 1),
        ("</answer>", "answer", "answer", 1),
        ("<eos>", "step", "eos", 1),
        ("<eos>", "answer", "eos", 1),
        ("x", "step", "length", 4),
        ("</step>", "answer", "length", 4),  # a step end does not stop a whole answer
    ],
)
def test_stop_reasons(random_policy, char_tokenizer, rigged, stop, reason, length):
    rigged_id = char_tokenizer.convert_tokens_to_ids(rigged)
    sampler = HFSampler(biased(random_policy, char_tokenizer, [rigged_id]), char_tokenizer, seed=0)
    out = sampler.sample(states_of(char_tokenizer), n=2, max_new_tokens=4, stop=stop)
    for conts in out:
        for c in conts:
            assert c.finish_reason == reason
            assert c.token_ids == [rigged_id] * length  # the stop token / EOS is kept


def test_rows_stop_independently(char_tokenizer):
    # bigram chain: 'a' -> 'b' -> </step>; 'c' -> 'd' -> 'd' -> ... ; both rows in one batch
    a, b, c, d = (ids(char_tokenizer, ch)[0] for ch in "abcd")
    step = char_tokenizer.convert_tokens_to_ids("</step>")
    model = BigramPolicy(len(char_tokenizer), {a: b, b: step, c: d, d: d})
    sampler = HFSampler(model, char_tokenizer, seed=0)
    (first,), (second,) = sampler.sample([[a], [c]], n=1, max_new_tokens=5)
    assert (first.token_ids, first.finish_reason) == ([b, step], "step")
    assert (second.token_ids, second.finish_reason) == ([d] * 5, "length")


def test_multi_token_stop_strings_match_decoded_text(char_tokenizer):
    # with the char tokenizer "ab" and "cd" are two tokens each: the general (decoded-tail) path
    x, a, b, c, d = (ids(char_tokenizer, ch)[0] for ch in "xabcd")
    model = BigramPolicy(len(char_tokenizer), {x: a, a: b, b: c, c: d, d: x})
    sampler = HFSampler(model, char_tokenizer, seed=0, stop_strings=("ab",), answer_stop_strings=("cd",))
    (step,) = sampler.sample([[x]], n=1, max_new_tokens=10, stop="step")[0]
    assert (step.token_ids, step.finish_reason) == ([a, b], "step")
    (answer,) = sampler.sample([[x]], n=1, max_new_tokens=10, stop="answer")[0]
    assert (answer.token_ids, answer.finish_reason) == ([a, b, c, d], "answer")


def test_pad_and_bos_are_never_sampled(random_policy, char_tokenizer):
    pad, bos = char_tokenizer.pad_token_id, char_tokenizer.bos_token_id
    model = biased(random_policy, char_tokenizer, [pad, bos], amount=50.0)
    for temperature in (1.0, 0.0):
        sampler = HFSampler(model, char_tokenizer, temperature=temperature, seed=0)
        for conts in sampler.sample(states_of(char_tokenizer), n=4, max_new_tokens=6):
            for c in conts:
                assert pad not in c.token_ids and bos not in c.token_ids
                assert all(torch.isfinite(torch.tensor(c.logprobs)))


# ---------------------------------------------------------------------------- greedy and seeds
def test_greedy_is_argmax_with_temperature_one_logprobs(random_policy, char_tokenizer):
    sampler = HFSampler(random_policy, char_tokenizer, temperature=0.0, max_batch_size=4)
    states = states_of(char_tokenizer)
    out = sampler.sample(states, n=3, max_new_tokens=6, stop="answer")
    for state, conts in zip(states, out):
        assert conts[0].token_ids == conts[1].token_ids == conts[2].token_ids  # repeated rows agree
        c = conts[0]
        full = torch.tensor([state + c.token_ids])
        with torch.no_grad():
            logits = random_policy(full)[0][0, len(state) - 1 : -1]  # (C, V)
        logits[:, [char_tokenizer.pad_token_id, char_tokenizer.bos_token_id]] = float("-inf")
        assert c.token_ids == logits.argmax(-1).tolist()
        ref = teacher_forced_logprobs(random_policy, char_tokenizer, state, c.token_ids, temperature=1.0)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
    # the batching (and so the left padding, and the shared prefill of a state's n rows) does not
    # change greedy outputs
    for batch in (64, 2):
        other = HFSampler(random_policy, char_tokenizer, temperature=0.0, max_batch_size=batch)
        assert [
            [c.token_ids for c in cs] for cs in other.sample(states, n=3, max_new_tokens=6, stop="answer")
        ] == [[c.token_ids for c in cs] for cs in out]


def test_each_state_is_prefilled_once_for_its_n_rows(random_policy, char_tokenizer):
    widths = []  # (rows, tokens) of every forward pass that starts without a KV cache

    def spy(module, args, kwargs):
        if kwargs.get("past_key_values") is None and len(args) > 0:
            widths.append(tuple(args[0].shape))

    handle = random_policy.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        states = states_of(char_tokenizer)
        HFSampler(random_policy, char_tokenizer, max_batch_size=64, seed=0).sample(
            states, n=4, max_new_tokens=3
        )
        assert [w[0] for w in widths] == [3]  # 3 states prefilled, not 12 rows
        widths.clear()
        HFSampler(random_policy, char_tokenizer, max_batch_size=8, seed=0).sample(
            states, n=4, max_new_tokens=3
        )
        assert [w[0] for w in widths] == [2, 1]  # whole states per batch: 8 // 4 = 2 states
    finally:
        handle.remove()


def test_same_seed_same_samples(random_policy, char_tokenizer):
    def run(seed):
        sampler = HFSampler(random_policy, char_tokenizer, seed=seed)
        return [
            [(c.token_ids, c.finish_reason) for c in cs]
            for cs in sampler.sample(states_of(char_tokenizer), 4, 6)
        ]

    assert run(3) == run(3)
    assert run(3) != run(4)


# ---------------------------------------------------------------------------- value and weights
def test_value_is_the_head_at_the_last_token(random_policy, char_tokenizer):
    torch.nn.init.normal_(random_policy.value_head.fc2.weight, std=0.5)  # zero-initialised otherwise
    sampler = HFSampler(random_policy, char_tokenizer, max_batch_size=2)
    states = states_of(char_tokenizer)
    got = sampler.value(states)
    for state, v in zip(states, got):
        with torch.no_grad():
            _, values, _ = random_policy(torch.tensor([state]))  # (1, T)
        assert abs(v - values[0, -1].item()) < 1e-5
    assert len(set(got)) == len(got)  # not all the same: the head sees each state


def test_sample_and_value_reads_the_values_from_the_prefill(random_policy, char_tokenizer):
    """What one MCTS expansion needs in one pass: the same continuations as ``sample`` (same RNG
    stream) and the same values as ``value``, with no extra forward pass over the states."""
    torch.nn.init.normal_(random_policy.value_head.fc2.weight, std=0.5)  # zero-initialised otherwise
    states = states_of(char_tokenizer)
    prefills = []

    def spy(module, args, kwargs):
        if kwargs.get("past_key_values") is None and len(args) > 0:
            prefills.append(args[0].shape[0])

    expected_values = HFSampler(random_policy, char_tokenizer, max_batch_size=3).value(states)
    handle = random_policy.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        expected = HFSampler(random_policy, char_tokenizer, max_batch_size=8, seed=0).sample(states, 4, 5)
        n_sample = len(prefills)
        prefills.clear()
        got, values = HFSampler(random_policy, char_tokenizer, max_batch_size=8, seed=0).sample_and_value(
            states, 4, 5
        )
    finally:
        handle.remove()
    assert len(prefills) == n_sample == 2  # 8 // 4 = 2 states per batch: [2, 1], nothing more
    assert [[(c.token_ids, c.logprobs) for c in cs] for cs in got] == [
        [(c.token_ids, c.logprobs) for c in cs] for cs in expected
    ]
    assert values == pytest.approx(expected_values, abs=1e-5)
    assert len(set(values)) == len(values)


def test_load_weights_changes_outputs_and_version(random_policy, char_tokenizer):
    other = make_random_policy(char_tokenizer, seed=1)
    torch.nn.init.normal_(other.value_head.fc2.weight, std=0.5)
    sampler = HFSampler(random_policy, char_tokenizer, temperature=0.0)
    states = states_of(char_tokenizer)
    before = (sampler.value(states), sampler.sample(states, 1, 6)[0][0].logprobs)
    sampler.load_weights(other.state_dict(), version=7)
    assert sampler.version == 7
    after = (sampler.value(states), sampler.sample(states, 1, 6)[0][0].logprobs)
    assert after != before
    assert after[0] == pytest.approx(HFSampler(other, char_tokenizer).value(states), abs=1e-6)
    with pytest.raises(RuntimeError):
        sampler.load_weights({"not.a.key": torch.zeros(1)}, version=8)


def test_training_mode_is_restored(random_policy, char_tokenizer):
    random_policy.train()
    HFSampler(random_policy, char_tokenizer, seed=0).sample(states_of(char_tokenizer)[:1], 1, 2)
    assert random_policy.training


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_batch_size": 0}, "max_batch_size"),
    ],
)
def test_bad_arguments_are_rejected(random_policy, char_tokenizer, kwargs, field):
    with pytest.raises(ValueError, match=field):
        HFSampler(random_policy, char_tokenizer, **kwargs)


def test_bad_sample_calls_are_rejected(random_policy, char_tokenizer):
    sampler = HFSampler(random_policy, char_tokenizer)
    with pytest.raises(ValueError, match="n must be"):
        sampler.sample([[1]], n=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler.sample([[1]], n=1, max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        sampler.sample([[]], n=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="stop"):
        sampler.sample([[1]], n=1, max_new_tokens=2, stop="line")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# sampling without replacement (exclude=...)


def test_exclusion_trie_masses_hand_computed():
    from types import SimpleNamespace

    from tsd.samplers.hf import exclusion_trie

    a = SimpleNamespace(token_ids=[5, 6], logprobs=[math.log(0.5), math.log(0.4)])  # P = 0.2
    b = SimpleNamespace(token_ids=[5, 7], logprobs=[math.log(0.5), math.log(0.1)])  # P = 0.05
    c = SimpleNamespace(token_ids=[8], logprobs=[math.log(0.3)])
    trie = exclusion_trie([a, b, c])
    # at the empty prefix: token 5 leads to a and b (0.2 + 0.05), token 8 to c (0.3)
    assert trie[()] == pytest.approx({5: 0.25, 8: 0.3})
    # after 5: the masses given 5 (0.4 and 0.1)
    assert trie[(5,)] == pytest.approx({6: 0.4, 7: 0.1})
    assert (8,) not in trie and (5, 6) not in trie
    # a continuation listed twice is excluded once: the same trie (twice would take 0.45 off
    # token 5 and 0.6 off token 8, more than the policy gives 8)
    assert exclusion_trie([a, b, c, a, c]) == trie


def test_exclude_never_repeats_and_samples_the_conditional_distribution(random_policy, char_tokenizer):
    from types import SimpleNamespace

    tok = char_tokenizer
    state = [tok.bos_token_id, *ids(tok, "[3,5,7,2]->23\n")]
    sampler = HFSampler(random_policy, tok, seed=0, max_batch_size=4096)
    (one,) = sampler.sample([state], n=1, max_new_tokens=1, stop="step")
    # the policy's one-token distribution here, as the sampler draws it (pad/BOS banned)
    with torch.no_grad():
        logits, _, _ = random_policy(torch.tensor([state]))
    logits = logits[0, -1].float()
    logits[sorted({tok.pad_token_id, tok.bos_token_id} - sampler.eos_ids)] = float("-inf")
    p = torch.softmax(logits, -1)
    top = p.argsort(descending=True)[:2].tolist()  # exclude the two likeliest one-token steps
    excl = [SimpleNamespace(token_ids=[t], logprobs=[math.log(float(p[t]))]) for t in top]
    n = 4000
    (rows,) = sampler.sample([state], n=n, max_new_tokens=1, stop="step", exclude=[excl])
    drawn = torch.tensor([r.token_ids[0] for r in rows])
    assert not any(int(t) in top for t in drawn)  # never an excluded continuation
    # frequencies follow p conditioned on the rest: p(t) / (1 - p(top))
    cond = p.clone()
    cond[top] = 0
    cond /= cond.sum()
    freq = torch.bincount(drawn, minlength=len(p)).float() / n
    assert (freq - cond).abs().max() < 4 * math.sqrt(0.25 / n)
    # the log-probs stay the policy's own, unconditioned
    for r in rows[:50]:
        assert r.logprobs[0] == pytest.approx(math.log(float(p[r.token_ids[0]])), abs=1e-5)
    # the plain call (no exclusion) drew one one-token step, with the policy's log-prob of it
    assert len(one) == 1 and len(one[0].token_ids) == 1
    assert one[0].logprobs[0] == pytest.approx(math.log(float(p[one[0].token_ids[0]])), abs=1e-5)


def test_exclude_a_multi_token_continuation_keeps_its_prefix_possible(char_tokenizer):
    from types import SimpleNamespace

    tok = char_tokenizer
    x, y, z = ids(tok, "1")[0], ids(tok, "2")[0], ids(tok, "3")[0]
    # a bigram model: after x the next token is y with p ~ 1 - tiny, z otherwise impossible-ish; the
    # uniform rows let other tokens through. Excluding [x, y] must still allow x followed by not-y.
    model = BigramPolicy(len(tok), {})
    bos = tok.bos_token_id
    with torch.no_grad():
        model.table[bos] = -50.0
        model.table[bos, x] = 50.0  # first token: x, almost surely
        model.table[x] = 0.0
        model.table[x, y] = 3.0  # after x: y likely, anything else possible
    sampler = HFSampler(model, tok, seed=1, max_batch_size=4096)
    with torch.no_grad():
        after_x = torch.softmax(model.table[x].clone().index_fill(0, torch.tensor(sorted(
            {tok.pad_token_id, bos} - sampler.eos_ids)), float("-inf")), -1)  # fmt: skip
    excl = SimpleNamespace(token_ids=[x, y], logprobs=[0.0, math.log(float(after_x[y]))])
    out = sampler.sample([[bos]] * 2000, n=1, max_new_tokens=2, stop="step", exclude=[[excl]] * 2000)
    rows = [r for (r,) in out]  # the bigram table has no KV cache to repeat: one row per state
    seconds = [r.token_ids[1] for r in rows if len(r.token_ids) == 2 and r.token_ids[0] == x]
    assert len(seconds) > 1900 and y not in seconds  # the prefix x stays; the excluded path never
    assert z in seconds  # and what was left of the mass after x is sampled


def test_exclude_is_checked(random_policy, char_tokenizer):
    sampler = HFSampler(random_policy, char_tokenizer, seed=0)
    with pytest.raises(ValueError, match="exclude has 0 entries for 1 states"):
        sampler.sample([[char_tokenizer.bos_token_id]], n=1, max_new_tokens=1, exclude=[])
