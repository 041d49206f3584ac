"""Shared fixtures: deterministic seeds, one torch thread (the CI box has 2 cores), and a small
random Qwen2 policy with the bundled character tokenizer for fast tests."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    # (an in-process vLLM engine owns the group it made, and destroys it at its shutdown)
    vllm_test = request.node.get_closest_marker("vllm") is not None
    if torch.distributed.is_available() and torch.distributed.is_initialized() and not vllm_test:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def char_tokenizer():
    from tsd.models.char_tokenizer import build_char_tokenizer

    return build_char_tokenizer()


def make_random_policy(tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A freshly initialised Qwen2 policy + value head over ``tokenizer`` (untrained)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tsd.models.policy_value import PolicyValueModel

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return PolicyValueModel(Qwen2ForCausalLM(cfg)).eval()


@pytest.fixture
def random_policy(char_tokenizer):
    return make_random_policy(char_tokenizer)


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory):
    """The bundled tiny policy when it has been built, else a random one saved the same way."""
    import json

    from tsd import TINY_POLICY_DIR
    from tsd.models.char_tokenizer import build_char_tokenizer

    if (TINY_POLICY_DIR / "model.safetensors").exists():
        return str(TINY_POLICY_DIR)
    d = tmp_path_factory.mktemp("random_policy")
    tok = build_char_tokenizer()
    make_random_policy(tok, hidden=64).save_pretrained(d)
    tok.save_pretrained(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["tsd_char_tokenizer"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(d)


def compose_train(overrides: list[str], output_dir) -> object:
    """The train config as ``python train.py OVERRIDES`` would build it, writing to output_dir."""
    from hydra import compose, initialize_config_dir

    from tsd.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[*overrides, f"paths.output_dir={output_dir}", "logger=csv"],
        )


@pytest.fixture(scope="session")
def redis_url():
    """One real redis-server on a free loopback port for the whole session (or
    $TSD_TEST_REDIS_URL); skipped with the reason when the binary is missing."""
    from redis_server import MISSING_REASON, RedisServerNotFound, redis_for_tests

    try:
        with redis_for_tests() as url:
            yield url
    except RedisServerNotFound:
        pytest.skip(reason=MISSING_REASON)
