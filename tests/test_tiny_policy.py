"""The bundled tiny policy: it loads through ``load_policy`` with the char tokenizer, has the
advertised size and score, round-trips every character it reads and writes, samples tag-structured
text, and its build is deterministic (3 training steps twice, weights compared exactly)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from tsd import TINY_POLICY_DIR
from tsd.envs.countdown import CountdownEnv, Problem
from tsd.models.char_tokenizer import CHAR_TOKENIZER_MARKER, SPECIAL_TOKENS, TAGS, build_char_tokenizer
from tsd.models.loading import is_char_tokenizer_dir, load_policy
from tsd.models.policy_value import PolicyValueModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_tiny_policy import TinyBuildConfig, make_policy, train_policy  # noqa: E402
from tiny_traces import random_solution, sample_completion  # noqa: E402

BUILT = (TINY_POLICY_DIR / "model.safetensors").exists()
needs_bundle = pytest.mark.skipif(
    not BUILT, reason="run scripts/build_tiny_policy.py to build the bundled policy"
)

PROBLEMS = [
    Problem((3, 5, 7, 2), 23, 0),
    Problem((11, 8, 4, 7), 59, 1),
    Problem((12, 2, 7, 1), 40, 2),
    Problem((10, 3, 5, 5), 42, 3),
    Problem((2, 9, 11, 11), 27, 4),
    Problem((13, 13, 13, 13), 52, 5),
]


@pytest.fixture(scope="module")
def bundled():
    if not BUILT:
        pytest.skip(reason="the bundled policy is not built: run scripts/build_tiny_policy.py")
    return load_policy("tiny")


# ---------------------------------------------------------------------------------------------- bundle


@needs_bundle
def test_bundle_loads_with_the_char_tokenizer(bundled):
    model, tok = bundled
    assert isinstance(model, PolicyValueModel)
    assert not model.training
    assert model.config.model_type == "qwen2"
    assert is_char_tokenizer_dir(TINY_POLICY_DIR)
    assert json.loads((TINY_POLICY_DIR / "tokenizer_config.json").read_text())["tsd_char_tokenizer"] is True
    # the char tokenizer, not Qwen's: same vocabulary as a fresh build, spaces kept
    assert tok.get_vocab() == build_char_tokenizer().get_vocab()
    assert tok.decode(tok.encode("a b  c", add_special_tokens=False)) == "a b  c"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert model.config.vocab_size == len(tok)
    assert model.lm.generation_config.top_k == 0  # plain sampling, not transformers' default top_k=50


@needs_bundle
def test_bundle_size_and_build_record(bundled):
    model, _ = bundled
    n = sum(p.numel() for p in model.lm.parameters())
    assert 500_000 <= n <= 3_000_000
    size = sum(f.stat().st_size for f in TINY_POLICY_DIR.iterdir())
    assert size < 8 * 2**20
    info = json.loads((TINY_POLICY_DIR / "build_info.json").read_text())
    assert info["parameters"] == n
    for key in ("command", "seed", "steps", "wall_seconds", "train_loss_final"):
        assert key in info
    assert info["eval"]["samples_per_problem"] == 16


@needs_bundle
@pytest.mark.slow
def test_bundle_scores_what_its_build_recorded(bundled):
    """Measured here, not read from build_info.json: mean@16 of the bundled policy on the first 200
    test problems (16 samples each, temperature 1, the build's 96-token cap) is low but above zero,
    as advertised, and agrees with the score the build recorded on all 820 within 4 standard errors
    (measured 3.9% +- 0.4 against 3.46% recorded, with torch 2.13 on CPU)."""
    from tsd.eval.runner import evaluate_mean_at_k
    from tsd.samplers.hf import HFSampler

    model, tok = bundled
    info = json.loads((TINY_POLICY_DIR / "build_info.json").read_text())["eval"]
    env = CountdownEnv()
    sampler = HFSampler(model, tok, temperature=1.0, seed=0)
    res = evaluate_mean_at_k(sampler, env, env.test[:200], k=16, max_new_tokens=96, progress=False)
    mean, se = res["mean@16"], res["mean@16_se"]
    assert 0.005 <= mean <= 0.15, res
    assert abs(mean - info["mean@16"]) <= 4 * se, (mean, se, info["mean@16"])
    pass_se = (info["pass@16"] * (1 - info["pass@16"]) / 200) ** 0.5
    assert abs(res["pass@16"] - info["pass@16"]) <= 4 * pass_se, (res["pass@16"], info["pass@16"])


@needs_bundle
def test_bundle_samples_tag_structured_text(bundled):
    model, tok = bundled
    from tsd.rollouts.base import decode_completion, encode_prompt
    from tsd.samplers.hf import HFSampler

    env = CountdownEnv(n_train=0, n_test=0)
    sampler = HFSampler(model, tok, temperature=1.0, seed=0)
    outs = sampler.sample(
        [encode_prompt(env, p, tok) for p in PROBLEMS[:4]], n=8, max_new_tokens=80, stop="answer"
    )
    samples = [[decode_completion(tok, c.token_ids) for c in conts] for conts in outs]
    flat = [c for per_problem in samples for c in per_problem]
    assert len(flat) == 32
    structured = [c for c in flat if c.startswith("<step>") and "</step>" in c and c.endswith("</answer>")]
    assert len(structured) >= 8, flat[:8]
    scores = [env.score(c, p) for p, cs in zip(PROBLEMS, samples) for c in cs]
    assert sum(s.valid for s in scores) >= 8


# ---------------------------------------------------------------------------------------------- tokenizer


def test_char_tokenizer_round_trips_prompts_and_completions():
    tok = build_char_tokenizer()
    env = CountdownEnv(n_train=0, n_test=0)
    rng = random.Random(0)
    texts = []
    for p in PROBLEMS:
        texts.append(env.plain_prompt(p))
        texts += [sample_completion(p, rng, error_rate=0.5)[0] for _ in range(4)]
    texts.append("".join(f"<step>{d}{op}{d}=0123456789</step>" for d, op in zip("0123456789", "+-*/()=,[]")))
    texts.append("[1,2,3,4]->10\n<answer>(1+2)*3-4/1</answer>")
    unk = tok.unk_token_id
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert unk not in ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        # one token per character outside the tags; one token per tag
        bare = text
        for tag in TAGS:
            bare = bare.replace(tag, "")
        n_tags = sum(text.count(tag) for tag in TAGS)
        assert len(ids) == len(bare) + n_tags
    for tag in TAGS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1
    for special in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(special) != unk or special == tok.unk_token


def test_char_tokenizer_padded_to_a_vocabulary_encodes_alike_and_decodes_every_id():
    """``vocab_size`` (scripts/gpu_check.py: a random model of Qwen2.5's vocabulary) adds filler
    tokens after the base vocabulary: text keeps its ids, and every id up to the size decodes."""
    base, tok = build_char_tokenizer(), build_char_tokenizer(vocab_size=1024)
    assert len(base) < 1024 and len(tok) == 1024
    text = "<step>12+3=15</step>\n<answer>(12+3)*1</answer>"
    assert tok.encode(text, add_special_tokens=False) == base.encode(text, add_special_tokens=False)
    assert (tok.pad_token_id, tok.eos_token_id) == (base.pad_token_id, base.eos_token_id)
    assert tok.decode([len(base), 1023]) == f"<t{len(base)}><t1023>"
    assert tok.unk_token_id not in tok.convert_tokens_to_ids([f"<t{i}>" for i in range(len(base), 1024)])
    assert len(build_char_tokenizer(vocab_size=len(base))) == len(base)
    with pytest.raises(ValueError, match="vocab_size"):
        build_char_tokenizer(vocab_size=len(base) - 1)


# ---------------------------------------------------------------------------------------------- traces


def test_traces_are_graded_as_their_kind():
    env = CountdownEnv(n_train=0, n_test=0)
    rng = random.Random(1)
    seen, varied = set(), 0
    for p in PROBLEMS:
        solutions = {tuple(random_solution(p.numbers, p.target, rng)) for _ in range(10)}
        varied += len(solutions) >= 2
        for _ in range(30):
            completion, kind = sample_completion(p, rng, error_rate=0.5)
            seen.add(kind)
            s = env.score(completion, p)
            assert s.valid
            assert s.correct == (kind == "correct"), (completion, kind)
    assert seen == {"correct", "wander", "slip"}
    assert varied >= 4  # the trace sampler is not deterministic per problem (some have one solution)


def test_solutions_are_chained_when_possible():
    rng = random.Random(0)
    for p in PROBLEMS:
        for _ in range(5):
            steps = random_solution(p.numbers, p.target, rng)
            assert steps[-1][3] == p.target and len(steps) == len(p.numbers) - 1
            for prev, step in zip(steps, steps[1:]):
                assert prev[3] in (step[0], step[2])  # every step uses the previous result
    # 91 = (9+4)*(5+2) has no chained solution: the search falls back to a tree
    steps = random_solution((4, 5, 9, 2), 91, rng)
    assert steps is not None and steps[-1][3] == 91


# ---------------------------------------------------------------------------------------------- build


def _tiny_build(seed: int) -> dict[str, torch.Tensor]:
    cfg = TinyBuildConfig(seed=seed, steps=3, batch_size=4, hidden=32, layers=1, warmup=1, threads=1)
    torch.manual_seed(1234)  # the build must not depend on the global RNG state
    random.seed(1234)
    tok = build_char_tokenizer()
    model = make_policy(tok, cfg)
    summary = train_policy(model, tok, PROBLEMS, cfg, log=None)
    assert summary["steps_done"] == 3
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_build_is_deterministic():
    a, b, c = _tiny_build(0), _tiny_build(0), _tiny_build(1)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_load_policy_detects_the_char_tokenizer_by_marker(tmp_path):
    tok = build_char_tokenizer()
    model = make_policy(tok, TinyBuildConfig(hidden=32, layers=1))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[CHAR_TOKENIZER_MARKER] = True
    cfg_path.write_text(json.dumps(cfg))
    assert is_char_tokenizer_dir(tmp_path)
    loaded, loaded_tok = load_policy(str(tmp_path))
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert loaded_tok.decode(loaded_tok.encode("1 + 2", add_special_tokens=False)) == "1 + 2"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # without the marker the directory is an ordinary transformers one (AutoTokenizer)
    del cfg[CHAR_TOKENIZER_MARKER]
    cfg_path.write_text(json.dumps(cfg))
    assert not is_char_tokenizer_dir(tmp_path)


# ---------------------------------------------------------------------------------------------- layout
def lm_only_top_level(path) -> None:
    """What vLLM needs of a model directory: every top-level ``*.safetensors`` holds only tensors
    the LM has (vLLM loads them all; a value-head tensor stops the engine: "no parameter 'fc1'")."""
    from safetensors import safe_open

    from tsd.models.policy_value import VALUE_HEAD_CONFIG, VALUE_HEAD_FILE

    files = sorted(path.glob("*.safetensors"))
    assert [f.name for f in files] == ["model.safetensors"]
    with safe_open(str(files[0]), "pt") as f:
        assert not any(k.startswith(("fc1", "fc2", "value_head")) for k in f.keys())  # noqa: SIM118
    assert (path / VALUE_HEAD_FILE).exists() and (path / VALUE_HEAD_CONFIG).exists()


@needs_bundle
def test_bundle_keeps_the_value_head_out_of_the_lm_files():
    lm_only_top_level(TINY_POLICY_DIR)


def test_saved_policy_round_trips_with_the_value_head_in_its_folder(tmp_path):
    tok = build_char_tokenizer()
    model = make_policy(tok, TinyBuildConfig(hidden=32, layers=1))
    torch.nn.init.normal_(model.value_head.fc2.weight, std=0.5)  # not the zero init
    model.save_pretrained(tmp_path)
    lm_only_top_level(tmp_path)
    loaded = PolicyValueModel.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_the_older_layout_is_still_read_and_replaced_on_save(tmp_path):
    from safetensors.torch import save_file

    from tsd.models.policy_value import LEGACY_VALUE_HEAD_FILES, VALUE_HEAD_DIR

    tok = build_char_tokenizer()
    model = make_policy(tok, TinyBuildConfig(hidden=32, layers=1))
    torch.nn.init.normal_(model.value_head.fc2.weight, std=0.5)
    model.save_pretrained(tmp_path)
    # rewrite it as an export from before the value_head/ folder
    head = tmp_path / VALUE_HEAD_DIR
    save_file(
        {k: v.contiguous() for k, v in model.value_head.state_dict().items()},
        str(tmp_path / LEGACY_VALUE_HEAD_FILES[0]),
    )
    (tmp_path / LEGACY_VALUE_HEAD_FILES[1]).write_text((head / "config.json").read_text())
    for f in head.iterdir():
        f.unlink()
    head.rmdir()
    old = PolicyValueModel.from_pretrained(tmp_path)
    assert torch.equal(old.value_head.fc2.weight, model.value_head.fc2.weight)
    old.save_pretrained(tmp_path)  # an export over an old one leaves only the new layout
    lm_only_top_level(tmp_path)
    assert not any((tmp_path / name).exists() for name in LEGACY_VALUE_HEAD_FILES)
