#!/usr/bin/env bash
# The whole test suite (slow, Redis and multi-process tests included), as CI runs it.
# PYTHON=.venv-vllm/bin/python bash scripts/test.sh -m vllm   # the real-vLLM tests (CPU build)
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" -m pytest -q "$@"
