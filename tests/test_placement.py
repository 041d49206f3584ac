"""Which GPU each rank's vLLM engine would use (:mod:`tsd.distributed.placement`), for every rank of
the article's node (8 GPUs: 2 trainers, 6 generators), in-process engines or not. No GPU here: the
decision functions and the environment each rank gets are checked, and a generator rank's start
(``GeneratorTrainerStrategy.run_generator``) with CUDA's two calls replaced."""

from __future__ import annotations

import pytest
import torch

from tsd.config import ConfigError
from tsd.distributed import placement
from tsd.distributed.placement import engine_gpu, engine_in_own_process, narrow_to_rank_gpu

NODE = 8
GENERATORS = range(2, 8)  # local ranks 2..7 generate (trainers first)


@pytest.mark.parametrize("multiproc", ["0", "1"], ids=["in-process engine", "engine process"])
def test_every_generator_engine_lands_on_its_own_gpu(multiproc):
    gpus = []
    for rank in GENERATORS:
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": multiproc}
        narrow_to_rank_gpu(rank, env, device_count=NODE, cuda_started=False)
        assert env["CUDA_VISIBLE_DEVICES"] == str(rank)  # what the rank's process sees from here on
        gpus.append(engine_gpu(rank, env, device_count=1, narrowed=True))
    assert gpus == ["2", "3", "4", "5", "6", "7"]


def test_without_narrowing_in_process_engines_all_take_gpu_0():
    # the fault this fixes: VLLM_ENABLE_V1_MULTIPROCESSING=0 (the README's advice) and a rank that
    # sees the whole node: vLLM's worker takes cuda:0 of what it sees, for every generator
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert {engine_gpu(r, env, NODE, narrowed=False) for r in GENERATORS} == {"0"}
    # an engine in its own process was already narrowed for its spawn (samplers.vllm.visible_gpu)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    assert [engine_gpu(r, env, NODE, narrowed=False) for r in GENERATORS] == ["2", "3", "4", "5", "6", "7"]


def test_a_node_narrowed_by_its_scheduler_keeps_its_names():
    # SLURM or a user gave the job GPUs 4-7 (or UUIDs): local rank k gets the k-th of them
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert narrow_to_rank_gpu(3, env, device_count=4, cuda_started=False) == "7"
    assert env["CUDA_VISIBLE_DEVICES"] == "7"
    env = {"CUDA_VISIBLE_DEVICES": "GPU-aaaa, GPU-bbbb"}
    assert narrow_to_rank_gpu(1, env, device_count=2, cuda_started=False) == "GPU-bbbb"


def test_more_ranks_than_gpus_is_refused_with_the_field():
    with pytest.raises(ConfigError, match="trainer.devices: local rank 4 has no GPU of its own"):
        narrow_to_rank_gpu(4, {"CUDA_VISIBLE_DEVICES": "0,1"}, device_count=2, cuda_started=False)


def test_in_process_engine_is_refused_where_cuda_started_too_early():
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with pytest.raises(ConfigError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0: CUDA started .* GPU 0"):
        narrow_to_rank_gpu(5, env, device_count=NODE, cuda_started=True)
    # with an engine process of its own (or on the first GPU) there is nothing to refuse
    assert narrow_to_rank_gpu(5, {}, device_count=NODE, cuda_started=True) is None
    assert narrow_to_rank_gpu(0, dict(env), device_count=NODE, cuda_started=True) is None


def test_cpu_ranks_are_left_alone():
    env: dict[str, str] = {}
    assert narrow_to_rank_gpu(3, env, device_count=0, cuda_started=False) is None and env == {}


def test_a_trainer_ranks_engine_gets_its_own_process():
    # trainer rank 0's evaluation engine: its process has the trainers' group, which vLLM's
    # in-process engine would take for its own world
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert engine_in_own_process(env, has_default_group=True) and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert not engine_in_own_process(env, has_default_group=False)  # a generator: in-process it stays
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


class _Stop(Exception):
    pass


@pytest.mark.parametrize("rank", [2, 7])
def test_a_generator_rank_narrows_before_cuda_and_runs_on_its_gpu(monkeypatch, rank):
    """GeneratorTrainerStrategy.run_generator on local rank ``rank`` of an 8-GPU node: it narrows
    CUDA_VISIBLE_DEVICES to its GPU before its first CUDA call, and then uses cuda:0 (that GPU)."""
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    from tsd.distributed.strategy import GeneratorTrainerStrategy

    # the strategy sets Lightning's process-wide rank (it runs as rank `rank`): put it back after,
    # or every later in-process run of the session believes it is not rank 0 and logs nothing
    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0), raising=False)
    monkeypatch.setattr(utils_rank_zero_only, "rank", getattr(utils_rank_zero_only, "rank", 0), raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: NODE)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    seen = {}

    class Accelerator:
        def setup_device(self, device):
            import os

            seen["device"], seen["visible"] = device, os.environ.get("CUDA_VISIBLE_DEVICES")

    env = LightningEnvironment()
    env.set_world_size(NODE)
    env.set_global_rank(rank)
    strategy = GeneratorTrainerStrategy(
        num_generators=6,
        parallel_devices=[torch.device("cuda", i) for i in range(NODE)],
        cluster_environment=env,
    )
    strategy.accelerator = Accelerator()
    strategy.generator_main = lambda s: None
    monkeypatch.setattr(strategy, "_init_groups", lambda: (_ for _ in ()).throw(_Stop()))
    with pytest.raises(_Stop):
        strategy.run_generator()
    assert seen == {"device": torch.device("cuda", 0), "visible": str(rank)}
    assert strategy.is_generator and strategy.root_device == torch.device("cuda", 0)
    assert placement.engine_gpu(rank, {"CUDA_VISIBLE_DEVICES": seen["visible"]}, 1, narrowed=True) == str(
        rank
    )


# ---------------------------------------------------------------------------- roles: strategy.layout
def test_layouts_number_trainers_first_and_per_node_mixes_every_node():
    from tsd.distributed.roles import logical_ranks

    # blocked: the first ranks train (2 nodes x 4, 2 trainers: both on node 0)
    assert logical_ranks(8, 6, 2, "blocked") == list(range(8))
    # per_node, 2 nodes x 2 ranks, 2 generators: node 0 = [trainer 0, generator 0], node 1 = [trainer 1,
    # generator 1]; logical ranks: trainers 0-1, generators 2-3
    assert logical_ranks(4, 2, 2, "per_node") == [0, 2, 1, 3]
    # 2 nodes x 4, 6 generators: one trainer and three generators per node
    assert logical_ranks(8, 6, 2, "per_node") == [0, 2, 3, 4, 1, 5, 6, 7]
    assert logical_ranks(3, 1, 1, "per_node") == [0, 1, 2]  # one node: the same as blocked
    with pytest.raises(ConfigError, match="strategy.layout: per_node needs the same mix"):
        logical_ranks(4, 1, 2, "per_node")
    with pytest.raises(ConfigError, match="strategy.layout"):
        logical_ranks(4, 2, 2, "round_robin")
