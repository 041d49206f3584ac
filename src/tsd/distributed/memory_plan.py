"""The per-device memory plan of a generator/trainer run, checked before anything is loaded.

    python -m tsd.distributed.memory_plan experiment=mcts_countdown_paper trainer.devices=8   # the table
    python -m tsd.distributed.memory_plan experiment=mcts_countdown_paper strategy.device_memory_gib=79.6

Every rank of ``strategy=generator_trainer`` owns one device (a GPU; on CPU the ranks share the
host). What each process puts there follows from the model's configuration (its parameter counts,
from a model built on the ``meta`` device: exact for any architecture, nothing is loaded) and from
the run's settings. The plan lists each item with the setting that sizes it, sums each device, and
:meth:`MemoryPlan.check` refuses a run whose plan exceeds the device, in one line that names the
settings to change, before any model is loaded or any process is started.

**A trainer** (each of the T trainer ranks), FSDP2 over the trainers (ZeRO-3: Rajbhandari et al.,
2020, Table 1's ``(2 + 2 + K) Psi / N`` with fp32 masters):

- master weights, gradients and AdamW's two moments, sharded: ``P x (w + g + 8) / T`` bytes (``w``,
  ``g``: the master and gradient bytes per parameter, 4 each in fp32);
- the unsharded compute weights FSDP2 gathers around a unit: the largest unit (the root: the
  embedding) plus two blocks (the one running and the one prefetched), in the compute dtype;
- the frozen reference for the KL term (``loss.c_kl > 0``), replicated, in the model's dtype;
- activations of one micro-batch: see :func:`trainer_items`;
- trainer rank 0 also flattens the full state for a weight sync onto its device (NCCL sends from
  there), and hosts the evaluation engine (``callbacks.eval``) with its own value copy.

**A generator**: the value copy (the transformers model that values MCTS leaves), the received
weights (the buffers of a broadcast being received plus a staged older copy not yet swapped in), the
value forward over ``value_batch_size`` states, and the sampler's engine
(:meth:`tsd.samplers.base.Sampler.device_memory`: for vLLM its weights, KV cache and workspace, or
the share ``gpu_memory_utilization`` it takes when no ``kv_cache_gib`` is given).

**vLLM's start-up check.** vLLM refuses to start unless the device's *free* memory is at least
``gpu_memory_utilization x total``, even when ``kv_cache_gib`` sizes its cache
(``vllm/v1/worker/utils.py: request_memory``). The plan checks that too, against what is on the
device when the engine starts (a trainer's state, the value copy).

**Derived settings** (:attr:`MemoryPlan.derived`): with a generator's KV cache known, the problems
one rollout can keep in flight (``generation.problems_per_rollout``: a wave's ``sequences per
problem x (prompt + max_new_tokens)`` tokens must fit the cache) and the evaluation's
``problems_per_batch`` (``k`` samples per problem). The ``*_paper`` experiments take their values
from here; ``tests/test_memory_plan.py`` keeps them equal.

Figures that are estimates, not counts, are named constants below (CUDA context and allocator
slack, vLLM's workspace, the prompt's length); ``scripts/gpu_check.py`` measures them on a device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsd.config import ConfigError

GIB = float(1 << 30)
#: a GPU process's CUDA context, NCCL's buffers and the caching allocator's slack (estimate)
GPU_PROCESS_GIB = 2.0
#: a CPU process's Python, torch and transformers (measured: ~0.6-0.9 GiB RSS here)
CPU_PROCESS_GIB = 0.8
#: vLLM's engine beside its weights and KV cache: the profile run's activations, CUDA graphs, the
#: sampler's (max_num_seqs, V) fp32 logits (estimate; vLLM logs it at start-up)
VLLM_WORKSPACE_GIB = 2.0
#: an engine in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=1): its own CUDA context
VLLM_PROCESS_GIB = 0.6
#: a Countdown chat prompt (system prompt + the problem) in Qwen's tokens (~230 measured)
PROMPT_TOKENS = 256
#: the known hub ids whose configuration is shipped (the plan needs no download)
SHIPPED_CONFIGS = {
    "Qwen/Qwen2.5-1.5B-Instruct": "qwen2_5_1_5b_config.json",
    "Qwen/Qwen2.5-1.5B": "qwen2_5_1_5b_config.json",
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------------------- the model's shape
@dataclass(frozen=True)
class ModelShape:
    """Parameter counts and cache sizes of a causal LM + tsd's value head, from its configuration."""

    lm_params: int
    #: the value head's MLP (``H x H + H``, then ``H + 1``)
    value_params: int
    #: parameters of the root FSDP unit (everything outside the transformer blocks: embedding,
    #: final norm, an untied LM head) and of the largest block
    root_params: int
    block_params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    tied: bool
    #: K and V of one token over every layer, in elements (x the KV dtype's bytes)
    kv_elems_per_token: int

    @property
    def params(self) -> int:
        """The trained policy: LM + value head."""
        return self.lm_params + self.value_params

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Count on a model built on the ``meta`` device (no memory, exact for any architecture)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config)
        from tsd.models.policy_value import PolicyValueModel

        with torch.device("meta"):
            policy = PolicyValueModel(lm)
        blocks = policy.transformer_blocks()
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 (tied: once)
        lm_params = count(lm)
        block_params = max((count(b) for b in blocks), default=0)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        return cls(
            lm_params=lm_params,
            value_params=count(policy.value_head),
            root_params=lm_params - sum(count(b) for b in blocks),
            block_params=block_params,
            layers=int(text.num_hidden_layers),
            hidden=int(text.hidden_size),
            intermediate=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
            vocab=int(text.vocab_size),
            tied=bool(getattr(text, "tie_word_embeddings", False)),
            kv_elems_per_token=2 * int(text.num_hidden_layers) * kv_heads * head_dim,
        )

    @classmethod
    def of(cls, name_or_path: str | Path) -> ModelShape:
        """The shape of ``model.name_or_path``: its directory's ``config.json``, the hub cache's, or
        the configuration tsd ships for a known hub id (:data:`SHIPPED_CONFIGS`)."""
        from transformers import AutoConfig

        from tsd import ASSETS_DIR
        from tsd.models.source import resolve_policy_path

        path = resolve_policy_path(name_or_path)
        if isinstance(path, Path):
            return cls.from_config(AutoConfig.from_pretrained(str(path)))
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(path), "config.json")
        except Exception:  # noqa: BLE001 - no hub client: fall back to the shipped configs
            cached = None
        if isinstance(cached, str):
            return cls.from_config(AutoConfig.from_pretrained(str(Path(cached).parent)))
        if str(path) in SHIPPED_CONFIGS:
            from transformers import PretrainedConfig

            data = json.loads((ASSETS_DIR / SHIPPED_CONFIGS[str(path)]).read_text())
            cfg_cls = AutoConfig.for_model(data["model_type"]).__class__
            assert issubclass(cfg_cls, PretrainedConfig)
            return cls.from_config(cfg_cls(**{k: v for k, v in data.items() if k != "model_type"}))
        raise ConfigError(
            f"model.name_or_path: {name_or_path!r}: no config.json to plan the memory from (accepted: a local "
            "model directory, a hub id in the local cache, or strategy.device_memory_gib=null on CPU)"
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.kv_elems_per_token * dtype_bytes


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PlanItem:
    """One thing on a device: what, how much, and the setting that sizes it ("" if none does)."""

    what: str
    gib: float
    setting: str = ""
    #: already on the device when the process's vLLM engine starts (its start-up check counts it)
    before_engine: bool = True


@dataclass
class DevicePlan:
    """One device: the processes on it and their items; ``engine_need_gib``: the free memory the
    engine's start-up check asks for (``gpu_memory_utilization x total``), if an engine starts here."""

    name: str
    items: list[tuple[str, PlanItem]] = field(default_factory=list)  # (process, item)
    engine_need: tuple[float, str] | None = None  # (GiB, setting)

    def add(self, process: str, items: Sequence[PlanItem]) -> None:
        self.items += [(process, it) for it in items]

    @property
    def total_gib(self) -> float:
        return sum(it.gib for _, it in self.items)

    @property
    def before_engine_gib(self) -> float:
        return sum(it.gib for _, it in self.items if it.before_engine)


@dataclass
class MemoryPlan:
    """Every device of a run, the device size checked against, and the settings that follow."""

    device_gib: float | None
    device_name: str
    devices: list[DevicePlan]
    derived: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Why the plan does not fit, one reason per device (empty: it fits or nothing to check)."""
        if self.device_gib is None:
            return []
        out = []
        for d in self.devices:
            if d.total_gib > self.device_gib:
                big = sorted(d.items, key=lambda x: -x[1].gib)
                names = ", ".join(f"{it.what} {it.gib:.1f}" for _, it in big[:4])
                settings = list(dict.fromkeys(it.setting for _, it in big if it.setting))[:3]
                out.append(
                    f"{d.name} needs {d.total_gib:.1f} GiB of {self.device_gib:.1f} ({names}, ...): "
                    f"lower {' or '.join(settings) or 'the batch'}"
                )
            elif d.engine_need is not None:
                need, setting = d.engine_need
                free = self.device_gib - d.before_engine_gib
                if need > free + 1e-9:
                    out.append(
                        f"{d.name}: vLLM starts only with {need:.1f} GiB free ({setting} x {self.device_gib:.1f}) "
                        f"but {free:.1f} are free when it starts: set {setting} <= {free / self.device_gib:.2f}"
                    )
        return out

    def check(self) -> None:
        """Raise one-line :class:`~tsd.config.ConfigError` if any device is over its size."""
        problems = self.problems()
        if problems:
            raise ConfigError(
                f"memory plan ({self.device_name}): {'; '.join(problems)} "
                "(the whole plan: python -m tsd.distributed.memory_plan <the same overrides>)"
            )

    def table(self) -> str:
        """The plan as a markdown table, one row per item, a total per device."""
        size = f"{self.device_gib:.1f} GiB" if self.device_gib is not None else "not checked"
        lines = [
            f"memory plan: {self.device_name} ({size})",
            "",
            "| device | process | item | GiB | set by |",
        ]
        lines.append("| --- | --- | --- | ---: | --- |")
        for d in self.devices:
            for proc, it in d.items:
                lines.append(f"| {d.name} | {proc} | {it.what} | {it.gib:.2f} | {it.setting} |")
            free = f" ({self.device_gib - d.total_gib:+.1f} left)" if self.device_gib is not None else ""
            lines.append(f"| **{d.name}** | | **total** | **{d.total_gib:.2f}** |{free} |")
        if self.derived:
            lines += ["", "derived: " + ", ".join(f"{k} = {v}" for k, v in self.derived.items())]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- the items
def gib(n_bytes: float) -> float:
    return n_bytes / GIB


def trainer_items(
    shape: ModelShape,
    trainers: int,
    *,
    master_bytes: int,
    grad_bytes: int,
    compute_bytes: int,
    ref_bytes: int | None,
    micro_tokens: int,
    checkpointing: bool,
    logprob_chunk: int,
    on_gpu: bool,
) -> list[PlanItem]:
    """One FSDP2 trainer rank. Activations of one micro-batch of ``micro_tokens`` tokens: with
    activation checkpointing each block keeps its input (``H`` values per token) and one block at a
    time holds its inner activations (~``10 H + 3 I`` values per token: q/k/v/o, the norms' outputs,
    the MLP's gate, up and product); without it every block holds those. The target log-probs take
    ``logprob_chunk`` tokens of ``V`` fp32 logits at a time (logits, their softmax and its gradient)."""
    P, T = shape.params, trainers
    inner = (10 * shape.hidden + 3 * shape.intermediate) * compute_bytes  # one block, per token
    kept = shape.hidden * compute_bytes  # a block's checkpointed input, per token
    per_token = shape.layers * kept + inner if checkpointing else shape.layers * (kept + inner)
    chunk = min(logprob_chunk, micro_tokens) if logprob_chunk > 0 else micro_tokens
    items = [
        PlanItem(
            "process (CUDA context, NCCL, allocator slack)" if on_gpu else "process",
            GPU_PROCESS_GIB if on_gpu else CPU_PROCESS_GIB,
        ),
        PlanItem(
            "master weights (shard)", gib(P * master_bytes / T), "strategy.num_generators / trainer.devices"
        ),
        PlanItem("gradients (shard)", gib(P * grad_bytes / T), "strategy.num_generators / trainer.devices"),
        PlanItem("AdamW moments (shard)", gib(P * 8 / T), "strategy.num_generators / trainer.devices"),
        # FSDP2 gathers a unit's weights in the compute dtype (the root, the embedding, and the
        # block running and the one prefetched), its backward holds the unit's unsharded gradient in
        # that dtype and an fp32 copy for the fp32 reduce-scatter (the largest: the root's)
        PlanItem(
            "gathered weights + unsharded gradients (root unit + 2 blocks)",
            gib(
                (shape.root_params + 2 * shape.block_params) * compute_bytes * 2
                + (shape.root_params * 4 if compute_bytes != 4 else 0)
            ),
        ),
        PlanItem(
            f"activations ({micro_tokens} tokens{', checkpointed' if checkpointing else ''})",
            gib(micro_tokens * per_token + 3 * chunk * shape.vocab * 4),
            "module.micro_batch_size",
        ),
    ]
    # the chunked log-probs' backward upcasts the LM head to fp32 and accumulates its gradient in
    # fp32 (tsd.models.logprobs: V x H x 4 bytes each; the upcast is no copy when it is fp32)
    head = shape.vocab * shape.hidden * 4
    items.append(
        PlanItem(
            "LM head in fp32 (log-probs' backward: weight + gradient)",
            gib(head * (1 if compute_bytes == 4 else 2)),
        )
    )
    if ref_bytes is not None:
        items.append(PlanItem("KL reference (replicated)", gib(shape.lm_params * ref_bytes), "loss.c_kl"))
    return items


def generator_items(
    shape: ModelShape, *, model_bytes: int, value_batch_size: int, seq_tokens: int, on_gpu: bool
) -> list[PlanItem]:
    """A generator rank besides its engine: the value copy, the weights a sync brings (the buffers
    being received while an older received copy waits to be swapped in) and the value forward
    (one block's activations over ``value_batch_size`` states at a time, no gradients)."""
    state = gib(shape.params * model_bytes)
    forward = value_batch_size * seq_tokens * (4 * shape.hidden + 3 * shape.intermediate) * model_bytes
    return [
        PlanItem(
            "process (CUDA context, NCCL, allocator slack)" if on_gpu else "process",
            GPU_PROCESS_GIB if on_gpu else CPU_PROCESS_GIB,
        ),
        PlanItem("value copy", state, "model.dtype"),
        PlanItem("received weights (receiving + staged)", 2 * state, "model.dtype", before_engine=False),
        PlanItem("value forward", gib(forward), "sampler.value_batch_size", before_engine=False),
    ]


def _bytes(dtype: str) -> int:
    return DTYPE_BYTES[str(dtype)]


def engine_kv_tokens(shape: ModelShape, engine: Sequence[PlanItem], kv_dtype_bytes: int) -> int:
    """Tokens the engine's KV cache holds (0 if it has none)."""
    kv = sum(it.gib for it in engine if it.what.endswith("KV cache"))
    return int(kv * GIB // shape.kv_bytes_per_token(kv_dtype_bytes))


def max_num_seqs(sampler_kwargs: Mapping[str, Any], device_gib: float | None, on_gpu: bool) -> int:
    """The sequences vLLM runs at once: ``llm_kwargs.max_num_seqs``, else vLLM 0.32's offline
    default (``EngineArgs._set_default_max_num_seqs_and_batched_tokens_args``: 1024 on a GPU of 70
    GiB or more, 256 on smaller ones and on CPU)."""
    given = dict(sampler_kwargs.get("llm_kwargs") or {}).get("max_num_seqs")
    if given is not None:
        return int(given)
    return 1024 if on_gpu and (device_gib or 0) >= 70 else 256


def in_flight(shape: ModelShape, engine: Sequence[PlanItem], kwargs: Mapping[str, Any], seq_tokens: int,
              kv_dtype_bytes: int, device_gib: float | None, on_gpu: bool) -> int:  # fmt: skip
    """Sequences of ``seq_tokens`` the engine runs at once: what its KV cache holds, at most
    ``max_num_seqs`` (0: no KV cache, not an engine)."""
    tokens = engine_kv_tokens(shape, engine, kv_dtype_bytes)
    if not tokens:
        return 0
    return min(tokens // seq_tokens, max_num_seqs(kwargs, device_gib, on_gpu))


# ---------------------------------------------------------------------------- the plan of a run
def device_total_gib(accelerator: str) -> tuple[float | None, str]:
    """The size of one device and its name, without initialising CUDA (the ranks are forked
    later, and a generator narrows ``CUDA_VISIBLE_DEVICES`` before CUDA starts): NVML's total of
    the first visible GPU (``nvidia-smi`` if pynvml is missing); on CPU the host's ``MemTotal``."""
    if accelerator == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GIB, "the host (every rank on one CPU)"
        except OSError:
            pass
        return None, "the host"
    visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        h = (
            pynvml.nvmlDeviceGetHandleByIndex(int(visible))
            if visible.isdigit()
            else pynvml.nvmlDeviceGetHandleByUUID(visible)
        )
        return pynvml.nvmlDeviceGetMemoryInfo(h).total / GIB, str(pynvml.nvmlDeviceGetName(h))
    except Exception:  # noqa: BLE001 - no pynvml: ask nvidia-smi
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total,name", "--format=csv,noheader,nounits", "-i", visible],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()[0]  # fmt: skip
        mib, name = out.split(",", 1)
        return float(mib) / 1024, name.strip()
    except Exception:  # noqa: BLE001 - no GPU to read: the plan is shown, not checked
        return None, "a GPU (size unknown: set strategy.device_memory_gib)"


def plan_generator_trainer(
    cfg: Any,
    *,
    shape: ModelShape,
    make_sampler: Any,
    sequences_per_problem: int,
    eval_callback: Any | None,
    device_gib: float | None,
    device_name: str,
    on_gpu: bool,
) -> MemoryPlan:
    """The plan of ``strategy=generator_trainer``: one device per rank on a GPU node (trainer rank 0's,
    the other trainers', each generator's); on CPU every rank on the one host.

    ``make_sampler``: the run's sampler factory (a ``functools.partial`` of the sampler class, as
    Hydra builds it), whose class plans its engine (``Sampler.device_memory``);
    ``sequences_per_problem``: what one problem keeps in flight in a rollout (MCTS: workers x K).
    """
    G = int(cfg.strategy.num_generators)
    W = int(cfg.trainer.devices) * int(cfg.trainer.get("num_nodes", 1))
    T = W - G
    if T < 1:
        raise ConfigError(f"strategy.num_generators: {G} generators leave no trainer among {W} ranks")
    # the trainer (docs/paper_scale.md): fp32 master weights, gradients and AdamW state; compute,
    # the KL reference and every copy the generators, the sync and the export read in model.dtype
    model_bytes = _bytes(cfg.model.dtype)
    seq = PROMPT_TOKENS + int(cfg.rollout.get("max_new_tokens", 512))
    batch = int(cfg.data.batch_size)
    micro = int(cfg.module.get("micro_batch_size") or 0) or batch  # 0: the whole batch at once
    c_kl = float(cfg.loss.get("c_kl", 0.0) or 0.0)
    trainer = trainer_items(
        shape,
        T,
        master_bytes=4,
        grad_bytes=4,
        compute_bytes=model_bytes,
        ref_bytes=model_bytes if c_kl > 0 else None,
        micro_tokens=micro * seq,
        checkpointing=bool(cfg.module.get("activation_checkpointing", False)),
        logprob_chunk=int(cfg.module.get("logprob_chunk_tokens", 0) or 0),
        on_gpu=on_gpu,
    )
    sampler_cls, sampler_kwargs = make_sampler.func, dict(make_sampler.keywords)
    gen_engine = sampler_cls.device_memory(
        shape, sampler_kwargs, model_dtype=cfg.model.dtype, device_gib=device_gib, on_gpu=on_gpu,
        setting="sampler", seq_tokens=seq,
    )  # fmt: skip
    gen = generator_items(
        shape,
        model_bytes=model_bytes,
        value_batch_size=int(sampler_kwargs.get("value_batch_size", 64)),
        seq_tokens=seq,
        on_gpu=on_gpu,
    )
    sync_send = PlanItem(
        "weight sync: flattened state", gib(shape.params * model_bytes), "model.dtype", False
    )
    eval_items: list[PlanItem] = []
    eval_need = None
    if eval_callback is not None:
        eval_kwargs = {**sampler_kwargs, **dict(eval_callback.sampler_kwargs)}
        ev_seq = PROMPT_TOKENS + int(eval_callback.max_new_tokens)
        eval_items = sampler_cls.device_memory(
            shape, eval_kwargs, model_dtype=cfg.model.dtype, device_gib=device_gib, on_gpu=on_gpu,
            setting="callbacks.eval.sampler_kwargs", seq_tokens=ev_seq,
        )  # fmt: skip
        eval_items = [PlanItem(f"eval {it.what}", it.gib, it.setting, False) for it in eval_items]
        eval_items.insert(0, PlanItem("eval value copy", gib(shape.params * model_bytes), "model.dtype"))
        eval_need = sampler_cls.startup_need(eval_kwargs, device_gib, on_gpu, "callbacks.eval.sampler_kwargs")
    gen_need = sampler_cls.startup_need(sampler_kwargs, device_gib, on_gpu, "sampler")
    # the problems a rollout (an evaluation batch) keeps in flight: as many sequences as the engine
    # runs at once (its KV cache, at most max_num_seqs); more would queue inside the engine
    derived: dict[str, int] = {}
    gen_seqs = in_flight(shape, gen_engine, sampler_kwargs, seq, model_bytes, device_gib, on_gpu)
    if gen_seqs:
        derived["generation.problems_per_rollout"] = max(1, gen_seqs // sequences_per_problem)
    if eval_callback is not None:
        ev_seqs = in_flight(shape, eval_items, eval_kwargs, ev_seq, model_bytes, device_gib, on_gpu)
        if ev_seqs:
            derived["callbacks.eval.problems_per_batch"] = max(1, ev_seqs // int(eval_callback.k))
    # a checkpoint gathers the full fp32 model and AdamW state onto trainer rank 0, on the host
    # (GeneratorTrainerStrategy: full_state_dict, cpu_offload), while it is written
    ckpt = PlanItem(
        "checkpoint: full fp32 model + AdamW state (host)",
        gib(shape.params * 12),
        "callbacks.checkpoint",
        False,
    )
    notes = [
        f"{T} trainers + {G} generators; a sequence is {PROMPT_TOKENS} prompt + {seq - PROMPT_TOKENS} new tokens",
        f"host memory of trainer rank 0 while a checkpoint is written: {ckpt.gib:.1f} GiB more",
    ]
    if on_gpu:
        rank0 = DevicePlan("trainer rank 0's GPU")
        rank0.add("trainer 0", [*trainer, sync_send])
        if eval_items:
            rank0.add("eval engine", eval_items)
            rank0.engine_need = eval_need
        devices = [rank0]
        if T > 1:
            other = DevicePlan("a trainer's GPU (ranks 1..)")
            other.add("trainer", trainer)
            devices.append(other)
        g = DevicePlan("a generator's GPU")
        g.add("generator", gen)
        g.add("generator's engine", gen_engine)
        g.engine_need = gen_need
        devices.append(g)
        return MemoryPlan(device_gib, device_name, devices, derived, notes)
    host = DevicePlan("the host")
    # one machine: train.py forks the ranks and keeps the policy it loaded (fp32 masters) until they end
    host.add(
        "train.py (the launcher)",
        [
            PlanItem("process", CPU_PROCESS_GIB),
            PlanItem("the loaded policy (fp32)", gib(shape.params * 4), "", True),
        ],
    )
    host.add("trainer 0", [*trainer, sync_send, ckpt, *eval_items])
    for r in range(1, T):
        host.add(f"trainer {r}", trainer)
    for j in range(G):
        host.add(f"generator {j}", [*gen, *gen_engine])
    notes.append("on CPU every rank shares the host: the device is the host's memory")
    return MemoryPlan(device_gib, device_name, [host], derived, notes)


def plan_run(cfg: Any, *, rollout: Any, make_sampler: Any, eval_callback: Any | None) -> MemoryPlan:
    """The plan of the run ``cfg`` describes, with the device size read (or configured)."""
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    on_gpu = accelerator in ("gpu", "cuda", "auto") and _gpu_visible()
    configured = cfg.strategy.get("device_memory_gib")
    device_gib: float | None
    if configured is not None:
        device_gib, name = float(configured), "a device of strategy.device_memory_gib"
        on_gpu = accelerator != "cpu"
    else:
        device_gib, name = device_total_gib("gpu" if on_gpu else "cpu")
        if not on_gpu and accelerator != "cpu":  # a GPU config on a machine without one: show only
            device_gib, name = None, "a GPU (none here: set strategy.device_memory_gib to check)"
            on_gpu = True
    shape = ModelShape.of(cfg.model.name_or_path)
    return plan_generator_trainer(
        cfg,
        shape=shape,
        make_sampler=make_sampler,
        sequences_per_problem=int(getattr(rollout, "sequences_per_problem", 1)),
        eval_callback=eval_callback,
        device_gib=device_gib,
        device_name=name,
        on_gpu=on_gpu,
    )


def _gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or bool(os.environ.get("TSD_ASSUME_GPU"))


def plan_overrides(overrides: Sequence[str]) -> MemoryPlan:
    """The plan of ``train.py``'s config composed with these overrides (nothing is built but the
    rollout, the sampler's factory and the evaluation callback; no model is loaded)."""
    from hydra import compose, initialize_config_dir

    from tsd.callbacks import MeanAtKEval
    from tsd.config import build, config_dir

    overrides = list(overrides)
    if not any(o.startswith("paths.output_dir=") for o in overrides):  # nothing is written
        overrides.append(f"paths.output_dir={Path.cwd() / 'outputs' / 'memory_plan'}")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    callbacks = {k: build(v, f"callbacks.{k}") for k, v in (cfg.get("callbacks") or {}).items() if v}
    ev = next((cb for cb in callbacks.values() if isinstance(cb, MeanAtKEval)), None)
    return plan_run(cfg, rollout=build(cfg.rollout, "rollout"), make_sampler=build(cfg.sampler, "sampler"),
                    eval_callback=ev)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan of ``train.py``'s config with these overrides (and whether it fits)."""
    plan = plan_overrides(sys.argv[1:] if argv is None else argv)
    print(plan.table())
    problems = plan.problems()
    print("\nfits" if not problems else "\nDOES NOT FIT: " + "; ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
