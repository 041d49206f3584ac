"""Which GPU each rank's vLLM engine runs on, decided before CUDA starts.

A vLLM engine takes the *first visible* GPU: its worker calls ``torch.cuda.set_device("cuda:0")``
(its own local rank 0), in its own process (``VLLM_ENABLE_V1_MULTIPROCESSING=1``, vLLM's default)
or in the caller's (``=0``). So a generator rank on ``cuda:k`` whose process still sees every GPU
puts its in-process engine on GPU 0, beside the trainer there: six generators, six engines on one
GPU. Narrowing ``CUDA_VISIBLE_DEVICES`` only while vLLM spawns its engine process
(``tsd.samplers.vllm.visible_gpu``) fixes the multi-process engine but not the in-process one.

So a generator rank narrows ``CUDA_VISIBLE_DEVICES`` to its own GPU for its whole life, before its
first CUDA call (:func:`narrow_to_rank_gpu`, called by the launcher): its device becomes
``cuda:0``, which *is* its GPU, and everything it starts (an in-process engine, an engine process,
the value copy, the sync group's NCCL communicator) lands there. If CUDA already started in the
process (the variable is read once, at CUDA's start) the narrowing cannot hold, and an in-process
engine on any GPU but the first visible one is refused with one line.

Trainer ranks keep the whole node's view (Lightning's ``cuda:<local rank>``; FSDP2 and NCCL need
nothing else). Trainer rank 0 (always local rank 0) hosts the evaluation engine; because its process
already has the trainers' default process group, which vLLM's in-process engine would take for its
own world, that engine always runs in a process of its own (:func:`engine_in_own_process`).

    python -m pytest tests/test_placement.py -q     # the decision for every rank of an 8-GPU node
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping

from tsd.config import ConfigError

log = logging.getLogger(__name__)

VISIBLE = "CUDA_VISIBLE_DEVICES"
MULTIPROC = "VLLM_ENABLE_V1_MULTIPROCESSING"


def visible_ids(env: Mapping[str, str], device_count: int) -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indices or UUIDs);
    every GPU of the node when the variable is unset."""
    value = env.get(VISIBLE)
    if value is None:
        return [str(i) for i in range(device_count)]
    return [v.strip() for v in value.split(",") if v.strip()]


def rank_gpu(local_rank: int, env: Mapping[str, str], device_count: int) -> str:
    """The GPU (as ``CUDA_VISIBLE_DEVICES`` names it) of the rank with this local rank: the
    ``local_rank``-th visible one, as Lightning's ``cuda:<local rank>`` is."""
    ids = visible_ids(env, device_count)
    if not 0 <= local_rank < len(ids):
        raise ConfigError(
            f"trainer.devices: local rank {local_rank} has no GPU of its own ({len(ids)} visible: "
            f"{','.join(ids) or 'none'}) (accepted: at most one rank per visible GPU)"
        )
    return ids[local_rank]


def in_process_engine(env: Mapping[str, str]) -> bool:
    """Whether vLLM will run its engine in the caller's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    return env.get(MULTIPROC, "1").strip().lower() in ("0", "false")


def engine_gpu(local_rank: int, env: Mapping[str, str], device_count: int, narrowed: bool) -> str:
    """The GPU a generator rank's vLLM engine uses, given the environment of the rank's process
    (``narrowed``: it narrowed ``CUDA_VISIBLE_DEVICES`` to its GPU, and its device is ``cuda:0``;
    else its device is ``cuda:<local rank>`` of the node's view). An in-process engine takes the
    first GPU the process sees; an engine process is spawned with the variable narrowed to the
    rank's device (``tsd.samplers.vllm.visible_gpu``)."""
    ids = visible_ids(env, device_count)
    if in_process_engine(env):
        return ids[0]  # vLLM's worker: cuda:0 of what the process sees
    return ids[0] if narrowed else rank_gpu(local_rank, env, device_count)


def narrow_to_rank_gpu(
    local_rank: int,
    env: MutableMapping[str, str] | None = None,
    device_count: int | None = None,
    cuda_started: bool | None = None,
) -> str | None:
    """Make this process see only its rank's GPU (``CUDA_VISIBLE_DEVICES=<its GPU>``), before CUDA
    starts; returns the GPU's name, or None when the process has no GPU to narrow to (CPU). If CUDA
    already started, the variable no longer counts: an in-process engine would then land on the first
    visible GPU, so unless that is the rank's own, this refuses with the fix."""
    import torch

    env = os.environ if env is None else env
    count = torch.cuda.device_count() if device_count is None else device_count
    if count < 1 and VISIBLE not in env:
        return None
    gpu = rank_gpu(local_rank, env, count)
    started = torch.cuda.is_initialized() if cuda_started is None else cuda_started
    if started:
        first = visible_ids(env, count)[0]
        if in_process_engine(env) and gpu != first:
            raise ConfigError(
                f"{MULTIPROC}=0: CUDA started in this generator process before it could narrow "
                f"{VISIBLE} to its GPU {gpu}, so vLLM's in-process engine would run on GPU {first} "
                f"(accepted: unset {MULTIPROC} or set it to 1: the engine then gets a process on GPU {gpu})"
            )
        return None
    env[VISIBLE] = gpu
    log.info(
        "local rank %d: %s=%s (its vLLM engine and everything else on that GPU)", local_rank, VISIBLE, gpu
    )
    return gpu


def engine_in_own_process(
    env: MutableMapping[str, str] | None = None, has_default_group: bool | None = None
) -> bool:
    """Before a vLLM engine starts in a process that already has a default process group (trainer
    rank 0's evaluation engine: the trainers' group): vLLM's in-process engine would take that group
    for its own world (``init_distributed_environment`` keeps an initialised one) and fail or hang on
    the trainers' collectives, so the engine gets a process of its own (sets
    ``VLLM_ENABLE_V1_MULTIPROCESSING=1``; returns True when it changed it)."""
    env = os.environ if env is None else env
    if has_default_group is None:
        import torch.distributed as dist

        has_default_group = dist.is_available() and dist.is_initialized()
    if not has_default_group or not in_process_engine(env):
        return False
    env[MULTIPROC] = "1"
    log.warning(
        "%s=0 asked for in-process vLLM engines, but this process already has a process group (a trainer "
        "rank's): its engine runs in a process of its own",
        MULTIPROC,
    )
    return True
