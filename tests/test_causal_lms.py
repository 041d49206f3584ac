"""Any decoder-only transformers causal LM as the policy: random tiny GPT-2, Llama, GPT-NeoX and
Qwen2 (plus heads with declared final-logit transforms: Gemma 2 softcapping, Cohere's scale,
Granite's divisor, OPT's projected head) built here over the bundled char tokenizer. Checks the
fp32 logits against each model's own, tied and untied heads, the HF sampler's KV cache against
teacher forcing, the FSDP blocks, the refusal of encoders and encoder-decoders at load time, the
fp32 LM head on bf16 weights, and (slow) a train -> evaluate -> export smoke run per architecture
whose export loads back with transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import compose_train

from tsd.config import ConfigError
from tsd.models.loading import load_policy
from tsd.models.policy_value import (
    PolicyValueModel,
    UnsupportedModelError,
    check_causal_lm,
    output_head,
    token_logprobs,
)
from tsd.samplers.hf import HFSampler

ROOT = Path(__file__).resolve().parents[1]
H = 32  # hidden width of the random models


def make_config(arch: str, tok) -> T.PretrainedConfig:
    """A 2-layer random config of ``arch`` over the char tokenizer's vocabulary and special ids."""
    ids = {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    common = {
        **ids,
        "hidden_size": H,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
    }
    if arch == "gpt2":  # tied head (GPT-2's default); learned absolute positions
        return T.GPT2Config(**ids, n_embd=H, n_layer=2, n_head=4, n_positions=512)
    if arch == "llama":
        return T.LlamaConfig(
            **common, num_key_value_heads=2, intermediate_size=2 * H, tie_word_embeddings=False
        )
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(**common, intermediate_size=2 * H, tie_word_embeddings=False)
    if arch == "qwen2":
        return T.Qwen2Config(
            **common, num_key_value_heads=2, intermediate_size=2 * H, tie_word_embeddings=True
        )
    if arch == "gemma2":  # a small cap so that a missed softcap would show
        return T.Gemma2Config(
            **common, num_key_value_heads=2, intermediate_size=2 * H, head_dim=8, final_logit_softcapping=0.5
        )
    if arch == "cohere":
        return T.CohereConfig(**common, intermediate_size=2 * H, logit_scale=0.0625)
    if arch == "granite":
        return T.GraniteConfig(**common, intermediate_size=2 * H, logits_scaling=8.0)
    if arch == "opt":  # the head reads a projection of the final hidden state (16 wide)
        return T.OPTConfig(**common, ffn_dim=2 * H, word_embed_proj_dim=16)
    raise KeyError(arch)


def make_lm(arch: str, tok, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(make_config(arch, tok)).to(dtype).eval()


REQUIRED = ["gpt2", "llama", "gpt_neox", "qwen2"]  # the list
HEADS = ["gemma2", "cohere", "granite", "opt"]  # declared head transforms / projected head
TIED = {"gpt2": True, "llama": False, "gpt_neox": False, "qwen2": True}


def states_of(tok) -> list[list[int]]:
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    bos = tok.bos_token_id
    return [[bos, *enc("1 2 3 4 = 10")], [bos, *enc("7")], [bos, *enc("<step>9*3=27</step>")]]


# ---------------------------------------------------------------------------- logits and value
@pytest.mark.parametrize("arch", REQUIRED + HEADS)
def test_fp32_logits_are_the_models_own_and_the_value_reads_the_final_hidden(arch, char_tokenizer):
    lm = make_lm(arch, char_tokenizer)
    check_causal_lm(lm)  # causal, and its head reproduced
    policy = PolicyValueModel(lm).eval()
    ids = torch.tensor(states_of(char_tokenizer)[0])[None]  # (1, T)
    with torch.no_grad():
        logits, values, _ = policy(ids)  # (1, T, V), (1, T)
        own = lm(input_ids=ids).logits  # (1, T, V)
        hidden = lm.base_model(input_ids=ids).last_hidden_state  # (1, T, H')
    assert logits.dtype == torch.float32 and logits.shape == own.shape
    assert torch.equal(logits, own)  # fp32 weights: the very same numbers
    torch.testing.assert_close(values, policy.value_head(hidden), atol=0, rtol=0)
    assert policy.value_head.fc1.in_features == output_head(lm).weight.shape[1]  # OPT: 16, not 32


@pytest.mark.parametrize("arch", REQUIRED)
def test_tied_and_untied_heads_train_the_right_weights(arch, char_tokenizer):
    lm = make_lm(arch, char_tokenizer)
    tied = output_head(lm).weight is lm.get_input_embeddings().weight
    assert tied == TIED[arch]
    policy = PolicyValueModel(lm).train()
    ids = torch.tensor(states_of(char_tokenizer)[2])[None]  # (1, T)
    logits, _, _ = policy(ids)
    token_logprobs(logits[:, :-1], ids[:, 1:]).sum().backward()
    head_grad = output_head(lm).weight.grad
    emb_grad = lm.get_input_embeddings().weight.grad
    assert head_grad is not None and head_grad.abs().sum() > 0
    # tied: one tensor, so one gradient; untied: the embedding's gradient is its own
    assert (head_grad is emb_grad) == tied


# ---------------------------------------------------------------------------- sampler and KV cache
@pytest.mark.parametrize("arch", REQUIRED + ["gemma2"])
def test_sampler_kv_cache_matches_teacher_forcing(arch, char_tokenizer):
    policy = PolicyValueModel(make_lm(arch, char_tokenizer)).eval()
    sampler = HFSampler(policy, char_tokenizer, temperature=1.0, seed=1)
    states = states_of(char_tokenizer)  # three lengths: left-padded, each prefilled once for n rows
    out, values = sampler.sample_and_value(states, n=3, max_new_tokens=8, stop="answer")
    banned = [char_tokenizer.pad_token_id, char_tokenizer.bos_token_id]
    for state, conts, v in zip(states, out, values):
        full_state = torch.tensor([state])
        with torch.no_grad():
            assert v == pytest.approx(policy(full_state)[1][0, -1].item(), abs=1e-5)
        for c in conts:
            full = torch.tensor([state + c.token_ids])  # (1, L): one uncached, unpadded forward
            with torch.no_grad():
                logits = policy(full)[0][:, len(state) - 1 : -1]  # (1, C, V)
            ref = token_logprobs(logits, torch.tensor([c.token_ids]), 1.0, banned)[0]  # (C,)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", REQUIRED)
def test_transformer_blocks_are_the_decoder_layers(arch, char_tokenizer):
    policy = PolicyValueModel(make_lm(arch, char_tokenizer))
    blocks = policy.transformer_blocks()
    assert len(blocks) == 2 and len({type(b) for b in blocks}) == 1
    assert type(blocks[0]).__name__ in policy.lm._no_split_modules


# ---------------------------------------------------------------------------- refusals
def _save(model, tok, d: Path) -> Path:
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["tsd_char_tokenizer"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _encoder_dirs(tok, root: Path) -> dict[str, Path]:
    V = len(tok)
    small = {
        "vocab_size": V,
        "hidden_size": H,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 2 * H,
    }
    torch.manual_seed(0)
    return {
        # AutoModelForCausalLM accepts it (BertLMHeadModel) and it attends both ways
        "not causal": _save(T.BertForMaskedLM(T.BertConfig(**small)), tok, root / "bert"),
        # causal with is_decoder, but its head transforms the hidden state first
        "are not its output embedding": _save(
            T.BertLMHeadModel(T.BertConfig(**small, is_decoder=True)), tok, root / "bert_decoder"
        ),
        "encoder-decoder": _save(
            T.BartForConditionalGeneration(
                T.BartConfig(
                    vocab_size=V,
                    d_model=H,
                    encoder_layers=1,
                    decoder_layers=1,
                    encoder_attention_heads=4,
                    decoder_attention_heads=4,
                    encoder_ffn_dim=64,
                    decoder_ffn_dim=64,
                )
            ),
            tok,
            root / "bart",
        ),  # fmt: skip
    }


def test_encoders_and_encoder_decoders_are_refused_at_load_time(char_tokenizer, tmp_path):
    for why, d in _encoder_dirs(char_tokenizer, tmp_path).items():
        with pytest.raises(ConfigError) as e:
            load_policy(d)
        msg = str(e.value)
        assert msg.startswith(f"model.name_or_path: '{d}' is refused") and why in msg, msg
        assert "\n" not in msg


def test_bidirectional_model_fails_the_probe_but_a_causal_one_passes(char_tokenizer):
    bert = T.BertLMHeadModel(T.BertConfig(vocab_size=len(char_tokenizer), hidden_size=H, num_hidden_layers=1,
                                          num_attention_heads=4, intermediate_size=64))  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="not causal"):
        check_causal_lm(bert)
    check_causal_lm(make_lm("gpt2", char_tokenizer))


@pytest.mark.slow
def test_train_py_refuses_an_encoder_with_exit_code_2_and_one_line(char_tokenizer, tmp_path):
    d = _encoder_dirs(char_tokenizer, tmp_path)["not causal"]
    p = subprocess.run(
        [
            sys.executable,
            "train.py",
            "debug=smoke",
            f"model.name_or_path={d}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "model.name_or_path" in ln]
    assert len(lines) == 1 and "config error" in lines[0] and "not causal" in lines[0]
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------------------- precision
def _tiny_batch(tok):
    from tsd.samplers.hf import left_pad

    return left_pad(states_of(tok) + [[tok.bos_token_id, *tok.encode("<step>13-6=7</step><answer>(13-6)*5+2</answer>")]],
                    tok.pad_token_id, torch.device("cpu"))  # fmt: skip


def _forward_only(ids, mask):
    """A TrajectoryBatch of these rows; what forward_batch does not read is zero."""
    from tsd.data.batch import TrajectoryBatch

    B, T = ids.shape[0], ids.shape[1] - 1
    zeros = torch.zeros(B)
    return TrajectoryBatch(
        ids, mask, torch.zeros(B, T), torch.zeros(B, T), zeros, zeros, zeros, zeros.long(), zeros.long()
    )


def test_bundled_tiny_policy_logits_are_unchanged_in_fp32():
    policy, tok = load_policy("tiny")
    ids, mask, pos = _tiny_batch(tok)  # (B, L) each
    with torch.no_grad():
        ours = policy(ids, mask, pos)[0]  # (B, L, V)
        own = policy.lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        # what PolicyValueModel computed before: lm.model's last hidden state through lm.lm_head
        before = policy.lm.lm_head(
            policy.lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        )
    assert torch.equal(ours, own) and torch.equal(ours, before)


def test_lm_head_runs_in_fp32_on_bf16_weights():
    """The tiny policy cast to bf16 against its fp32 self, on completions the fp32 policy samples
    (benchmarks/logit_precision.py measures the same on more)."""
    from tsd.envs.countdown import CountdownEnv
    from tsd.rollouts.base import encode_prompt
    from tsd.samplers.hf import left_pad

    ref, tok = load_policy("tiny")
    policy, _ = load_policy("tiny", dtype=torch.bfloat16)
    env = CountdownEnv(n_train=200, n_test=20)
    prompts = [encode_prompt(env, p, tok) for p in env.test[:6]]
    outs = HFSampler(ref, tok, seed=0).sample(prompts, n=2, max_new_tokens=64, stop="answer")
    rows = [p + c.token_ids for p, conts in zip(prompts, outs) for c in conts]
    ids, mask, pos = left_pad(rows, tok.pad_token_id, torch.device("cpu"))  # (B, L) each
    targets, valid = ids[:, 1:], mask[:, 1:].bool()  # (B, L-1)
    with torch.no_grad():
        logits = policy(ids, mask, pos)[0]  # (B, L, V)
        hidden = policy.lm.model(
            input_ids=ids, attention_mask=mask, position_ids=pos
        ).last_hidden_state  # bf16
        exact = hidden.float() @ policy.lm.lm_head.weight.float().T  # (B, L, V) the fp32 product
        bf16_head = policy.lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # bf16
        want = token_logprobs(ref(ids, mask, pos)[0][:, :-1], targets)[valid]
        err_fp32_head = (token_logprobs(logits[:, :-1], targets)[valid] - want).abs()
        err_bf16_head = (token_logprobs(bf16_head[:, :-1], targets)[valid] - want).abs()
    assert logits.dtype == torch.float32 and bf16_head.dtype == torch.bfloat16
    torch.testing.assert_close(logits, exact, atol=1e-5, rtol=1e-5)
    # the bf16 trunk's rounding remains; the head's own rounding is gone
    assert err_fp32_head.mean() < 0.8 * err_bf16_head.mean(), (err_fp32_head.mean(), err_bf16_head.mean())


def test_lm_head_stays_fp32_under_autocast(char_tokenizer):
    """bf16 mixed precision (trainer.precision=bf16-mixed) must not pull the head back to bf16."""
    import torch.nn.functional as F

    policy = PolicyValueModel(make_lm("llama", char_tokenizer)).eval()
    ids = torch.tensor(states_of(char_tokenizer)[0])[None]  # (1, T)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = policy(ids)[0]  # (1, T, V)
        hidden = policy.lm.base_model(input_ids=ids).last_hidden_state  # (1, T, H)
        autocast_head = policy.lm.lm_head(hidden)  # what the model's own head gives here
    assert autocast_head.dtype == torch.bfloat16  # autocast would run the head in bf16
    assert logits.dtype == torch.float32
    torch.testing.assert_close(
        logits, F.linear(hidden.float(), policy.lm.lm_head.weight.float()), atol=1e-6, rtol=1e-6
    )


def test_reference_policy_log_probs_equal_the_policys_at_init_in_bf16():
    """The KL term's pi_ref uses the same fp32 head and computes as the policy does (bf16 compute
    over fp32 masters, models/precision.py): at step 0 its log-probs are the policy's exactly
    (with the head in bf16 for pi_ref they were not)."""
    from tsd.models.precision import Precision
    from tsd.module import PolicyValueModule
    from tsd.rl.losses import CISPOLoss, RLObjective

    policy, tok = load_policy("tiny")  # as train.py loads the masters
    module = PolicyValueModule(
        policy,
        RLObjective(CISPOLoss(), c_kl=0.01),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        precision=Precision(torch.bfloat16),  # model.dtype=bfloat16
    )
    module.policy.eval()
    ids, mask, _ = _tiny_batch(tok)
    with torch.no_grad():
        out = module.forward_batch(_forward_only(ids, mask))
    assert out["ref_logp"].dtype == torch.float32
    assert torch.equal(out["logp"], out["ref_logp"])


# ---------------------------------------------------------------------------- smoke runs
@pytest.mark.slow
@pytest.mark.parametrize("arch", REQUIRED)
def test_smoke_run_trains_evaluates_and_exports_each_architecture(arch, char_tokenizer, tmp_path):
    from tsd.train import train

    init = _save(make_lm(arch, char_tokenizer), char_tokenizer, tmp_path / "init")
    out = tmp_path / "run"
    cfg = compose_train(["experiment=mcts_countdown", "debug=smoke", f"model.name_or_path={init}"], out)
    res = train(cfg)
    assert res["global_step"] == 3 and res["skipped_steps"] == 0
    assert [h["step"] for h in res["eval_history"]] == [0, 3]  # evaluated at start and end
    assert res["search/tree_size"] > 1 and res["compute/trained_tokens"] > 0
    export = out / "policy"
    lm = T.AutoModelForCausalLM.from_pretrained(export, use_safetensors=True).eval()  # plain transformers
    assert type(lm) is type(make_lm(arch, char_tokenizer))
    before = T.AutoModelForCausalLM.from_pretrained(init, use_safetensors=True)
    changed = [k for k, v in lm.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed  # trained
    policy, _ = load_policy(export)  # and back into tsd, with its trained value head
    ids = torch.tensor(states_of(char_tokenizer)[0])[None]
    with torch.no_grad():
        assert torch.equal(policy(ids)[0], lm(input_ids=ids).logits)
    assert policy.value_head.fc2.weight.abs().sum() > 0  # the value head was trained from zeros
