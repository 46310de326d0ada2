#!/bin/bash
# The one command to run on a GPU machine (README "Checking on a GPU"):
#   bash scripts/gpu_check.sh            # CUDA checks, ~4-5 min on an H100
#   bash scripts/gpu_check.sh --dry-run  # the same on the CPU, small sizes (`cargo test` runs it)
# Needs only a sae binary built elsewhere (target/release/sae, or SAE_BIN) and
# that machine's own Python with torch 2.11 (SAE_GPU_PYTHON, default
# /opt/torch/.venv/bin/python; the dry run uses SAE_PYTHON): the binary's
# libtorch is that Python's torch/lib (its build-time rpath does not exist
# there). Nothing is installed. Writes gpu_check.md to $OUT, or to the
# current directory when OUT is unset; exits 1 if a check failed or was flagged.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DRY=
if [ "${1:-}" = --dry-run ]; then
  DRY=--dry-run
  PY=${SAE_PYTHON:-$ROOT/third_party/venv/bin/python}
else
  PY=${SAE_GPU_PYTHON:-/opt/torch/.venv/bin/python}
fi
if [ ! -x "$PY" ]; then
  echo "gpu_check: no Python at $PY (set ${DRY:+SAE_PYTHON}${DRY:-SAE_GPU_PYTHON} to one with torch 2.11)" >&2
  exit 2
fi
BIN=${SAE_BIN:-$ROOT/target/release/sae}
if [ ! -x "$BIN" ]; then
  echo "gpu_check: no sae binary at $BIN: build one (cargo build --release) and carry target/release/sae" >&2
  exit 2
fi
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
  echo "gpu_check: $PY cannot import torch" >&2; exit 2; }
# torch's CUDA libraries beside it (cudart, cublas, NCCL, cuDNN, ...: the binary links libnccl
# itself), where the wheel keeps them.
CUDA_LIBS=$(ls -d "$TORCH_LIB"/../../nvidia/*/lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="$TORCH_LIB:$CUDA_LIBS${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/scripts/gpu_check.py" "$BIN" "${OUT:-$PWD}" $DRY
