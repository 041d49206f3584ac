"""ExclusionLogitsProcessor: :class:`~tsd.samplers.exclusion.RowProcessor` as a vLLM logits processor.

:class:`~tsd.samplers.vllm.VLLMSampler` starts its engine with
``logits_processors=["tsd.samplers.vllm_logits:ExclusionLogitsProcessor"]`` and sends every request
its temperature, top-p and excluded continuations in ``SamplingParams.extra_args`` (vLLM itself gets
temperature 1 and top-p 1, so what it samples from and reports is this processor's output). The
engine loads this module in the process that runs its model (imports vLLM: not importable without).

This is the interface of vLLM's V1 model runner (``vllm.v1.sample.logits_processor``): per-request
state by batch index through ``update_state(BatchUpdate)``, ``apply(logits)`` on the whole batch
before temperature (not argmax-invariant: it changes which token is likeliest). vLLM 0.32 picks its
V2 model runner by default on GPUs with Triton, whose processors have another interface, so the
sampler asks for the V1 runner (``VLLM_USE_V2_MODEL_RUNNER=0``), the one the CPU build runs and the
tests check.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python -m pytest tests/test_vllm_sampler.py -m vllm -k replacement
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from tsd.samplers.exclusion import RowProcessor, parse_row_args

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig


class ExclusionLogitsProcessor(LogitsProcessor):
    """Turns each request's logits into the policy's log-probs (temperature, top-p), with the
    mass of its excluded continuations taken off (:mod:`tsd.samplers.exclusion`)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_row_args(sampling_params.extra_args)  # ValueError: vLLM refuses the request

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.rows = RowProcessor()

    def is_argmax_invariant(self) -> bool:
        return False  # an excluded token can be the likeliest one

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.rows.update(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.rows.apply(logits)
