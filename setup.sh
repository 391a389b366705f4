#!/usr/bin/env bash
# Install the dependencies into the current Python (use a venv or conda env if you prefer).
#   bash setup.sh          runtime dependencies
#   bash setup.sh --dev    plus the test dependencies (pytest, HF PEFT as a reference)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# torch and torchvision must be a matching pair. Skip if a working pair is already there.
if ! $PY -c "import torch, torchvision" >/dev/null 2>&1; then
  if [ "$(uname -m)" = "x86_64" ]; then
    $PY -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  else
    $PY -m pip install -q "torch==2.9.1" "torchvision==0.24.1"
  fi
fi
if [ "${1:-}" = "--dev" ]; then
  $PY -m pip install -q -r requirements-dev.txt
else
  $PY -m pip install -q -r requirements.txt
fi
# Build the native crop resize (Pillow's bytes, faster); without a C compiler Pillow does it.
$PY -c "import sys; from datasets.resample import main; sys.exit(main([]))" || true
