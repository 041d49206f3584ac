"""The per-device memory plan (:mod:`tsd.distributed.memory_plan`): parameter counts of Qwen2.5-1.5B
from its shipped configuration, hand-computed items, the paper config refused as it was and accepted
as it is on an 80 GB GPU (H100: 79.6 GiB), its derived settings equal to the config's, and
``train.py`` refusing a plan over the device in one line before any model is loaded.

    python -m pytest tests/test_device_memory_plan.py -q
"""

from __future__ import annotations

import functools

import pytest
from conftest import compose_train

from tsd.config import ConfigError, build
from tsd.distributed.memory_plan import (
    GIB,
    GPU_PROCESS_GIB,
    DevicePlan,
    MemoryPlan,
    ModelShape,
    PlanItem,
    plan_run,
    trainer_items,
)

#: an 80 GB H100's total as torch.cuda.mem_get_info reports it (81,559 MiB)
H100_GIB = 79.6
QWEN = "Qwen/Qwen2.5-1.5B-Instruct"


@pytest.fixture(scope="module")
def qwen() -> ModelShape:
    return ModelShape.of(QWEN)  # the shipped config (src/tsd/assets/qwen2_5_1_5b_config.json)


def test_qwen_shape_is_counted_exactly(qwen):
    assert qwen.lm_params == 1_543_714_304  # Qwen2.5-1.5B's published count (tied embeddings once)
    assert qwen.root_params == 151_936 * 1536 + 1536  # the embedding and the final norm
    # a block: q (1536x1536 + bias), k and v (256x1536 + bias each), o (1536x1536), the MLP's three
    # 1536x8960 matrices, two norms
    block = (1536 * 1536 + 1536) + 2 * (256 * 1536 + 256) + 1536 * 1536 + 3 * 1536 * 8960 + 2 * 1536
    assert qwen.block_params == block and qwen.lm_params == qwen.root_params + 28 * block
    assert qwen.value_params == 1536 * 1536 + 1536 + 1536 + 1  # tsd's value head
    assert qwen.kv_bytes_per_token(2) == 2 * 28 * 2 * 128 * 2  # K and V, 28 layers, 2 KV heads of 128, bf16


def test_trainer_items_hand_computed(qwen):
    items = {it.what.split(" (")[0]: it.gib for it in trainer_items(
        qwen, 2, master_bytes=4, grad_bytes=4, compute_bytes=2, ref_bytes=2, micro_tokens=1000,
        checkpointing=True, logprob_chunk=256, on_gpu=True,
    )}  # fmt: skip
    P = qwen.params
    assert items["master weights"] == pytest.approx(P * 4 / 2 / GIB)
    assert items["gradients"] == pytest.approx(P * 4 / 2 / GIB)
    assert items["AdamW moments"] == pytest.approx(P * 8 / 2 / GIB)
    assert items["KL reference"] == pytest.approx(qwen.lm_params * 2 / GIB)
    unit = (qwen.root_params + 2 * qwen.block_params) * 2  # bf16 weights of the gathered units
    assert items["gathered weights + unsharded gradients"] == pytest.approx(
        (2 * unit + qwen.root_params * 4) / GIB
    )
    per_token = 28 * 1536 * 2 + (10 * 1536 + 3 * 8960) * 2  # checkpointed inputs + one block's inner
    assert items["activations"] == pytest.approx((1000 * per_token + 3 * 256 * 151_936 * 4) / GIB)
    assert items["process"] == GPU_PROCESS_GIB
    assert items["LM head in fp32"] == pytest.approx(2 * 151_936 * 1536 * 4 / GIB)  # upcast + fp32 gradient


def test_a_plan_over_the_device_is_refused_in_one_line_naming_the_settings():
    d = DevicePlan("a generator's GPU")
    d.add(
        "generator",
        [PlanItem("value copy", 3.0, "model.dtype"), PlanItem("vLLM KV cache", 80.0, "sampler.kv_cache_gib")],
    )
    with pytest.raises(ConfigError) as e:
        MemoryPlan(79.6, "H100", [d]).check()
    msg = str(e.value)
    assert "\n" not in msg and "a generator's GPU needs 83.0 GiB of 79.6" in msg
    assert "lower sampler.kv_cache_gib or model.dtype" in msg
    # vLLM's start-up check: free >= gpu_memory_utilization x total, whatever kv_cache_gib says
    d = DevicePlan("trainer rank 0's GPU")
    d.add("trainer 0", [PlanItem("shards", 30.0, "")])
    d.engine_need = (0.85 * 79.6, "callbacks.eval.sampler_kwargs.gpu_memory_utilization")
    with pytest.raises(ConfigError, match=r"vLLM starts only with 67.7 GiB free .* set callbacks.eval.sampler_kwargs"
                       r".gpu_memory_utilization <= 0.62"):  # fmt: skip
        MemoryPlan(79.6, "H100", [d]).check()
    MemoryPlan(None, "a GPU of unknown size", [d]).check()  # nothing to check against: shown only


def _plan(tmp_path, overrides: list[str], monkeypatch) -> MemoryPlan:
    from tsd.callbacks import MeanAtKEval

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # vLLM's default: engine processes
    cfg = compose_train(
        [
            "experiment=mcts_countdown_paper",
            "trainer.devices=8",
            f"strategy.device_memory_gib={H100_GIB}",
            *overrides,
        ],
        tmp_path,
    )
    ev = build(cfg.callbacks.eval, "callbacks.eval")
    assert isinstance(ev, MeanAtKEval)
    make_sampler = build(cfg.sampler, "sampler")
    assert isinstance(make_sampler, functools.partial)
    return plan_run(cfg, rollout=build(cfg.rollout, "rollout"), make_sampler=make_sampler, eval_callback=ev)


def test_train_refuses_a_plan_over_the_device_before_loading_anything(tmp_path, policy_dir, redis_url):
    from tsd.train import train

    cfg = compose_train(
        ["experiment=cispo_countdown", "debug=smoke", "strategy=generator_trainer", "buffer=redis",
         f"buffer.url={redis_url}", "trainer.devices=2", f"model.name_or_path={policy_dir}",
         "strategy.device_memory_gib=0.5"],
        tmp_path,
    )  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"^memory plan \(.*\): the host needs [\d.]+ GiB of 0.5 .*: lower "
    ):
        train(cfg)


#: the paper config's memory settings before the plan (main before issue 25)
BEFORE = [
    "sampler.kv_cache_gib=null",
    "sampler.gpu_memory_utilization=0.85",
    "callbacks.eval.sampler_kwargs=null",
    "callbacks.eval.problems_per_batch=8",
    "generation.problems_per_rollout=4",
    "module.micro_batch_size=0",
    "module.activation_checkpointing=false",
]


def test_the_paper_config_as_it_was_is_refused_in_one_line(tmp_path, monkeypatch):
    plan = _plan(tmp_path, BEFORE, monkeypatch)
    with pytest.raises(ConfigError) as e:
        plan.check()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("memory plan (")
    # the evaluation engine took vLLM's default share beside trainer rank 0's state ...
    assert (
        "trainer rank 0's GPU needs" in msg and "callbacks.eval.sampler_kwargs.gpu_memory_utilization" in msg
    )
    # ... and the generators' engines left too little for the value copy and the received weights
    assert "a generator's GPU needs" in msg and "sampler.gpu_memory_utilization" in msg


def test_the_paper_config_fits_an_80gb_gpu_and_its_settings_follow_from_the_plan(tmp_path, monkeypatch):
    plan = _plan(tmp_path, [], monkeypatch)
    plan.check()  # fits
    totals = {d.name: d.total_gib for d in plan.devices}
    assert all(t < H100_GIB * 0.8 for t in totals.values()), (
        totals
    )  # a fifth of the GPU left for the estimates
    cfg = compose_train(["experiment=mcts_countdown_paper"], tmp_path)
    assert plan.derived == {
        "generation.problems_per_rollout": cfg.generation.problems_per_rollout,
        "callbacks.eval.problems_per_batch": cfg.callbacks.eval.problems_per_batch,
    }
