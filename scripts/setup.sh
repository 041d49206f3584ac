#!/usr/bin/env bash
# Install tsd and its test tools into the current Python (3.10+). The CPU build of torch first:
# on this kind of machine it is on disk; elsewhere pip fetches it from the CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.13.0 || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install -q -e ".[dev]"
