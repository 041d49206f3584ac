#!/usr/bin/env bash
# The whole test suite (slow, Redis and multi-process tests included), as CI runs it.
# Two pytest workers (pytest-xdist): most tests use one core, and the box has two; the suite took
# 9.6 min in one process on an idle 2-core box. TSD_TEST_WORKERS=0 runs it in one process.
# PYTHON=.venv-vllm/bin/python TSD_TEST_WORKERS=0 bash scripts/test.sh -m vllm   # the real-vLLM tests (CPU build)
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
workers="${TSD_TEST_WORKERS:-2}"
if [ "$workers" != "0" ]; then
  set -- -n "$workers" "$@"
fi
exec "${PYTHON:-python3}" -m pytest -q "$@"
