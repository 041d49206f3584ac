#!/usr/bin/env bash
# The whole test suite (slow, Redis and multi-process tests included), as CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
exec python3 -m pytest -q "$@"
