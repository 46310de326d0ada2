#!/usr/bin/env bash
# `make demo`: synthetic data with known features → train → summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
sae=target/release/sae
mkdir -p demo
echo "==> sae info"
"$sae" info
echo "==> synthetic data: 50000 rows, 64 dims, 256 true features, 4 active per row"
"$sae" data synth --n 50000 --d-in 64 --features 256 --active 4 --seed 0 \
    --out demo/x.npy --truth demo/truth.npy
echo "==> training configs/quickstart.yaml"
"$sae" train --config configs/quickstart.yaml --out demo/run --force
echo "==> codes for Python: demo/codes.npy"
"$sae" encode --model demo/run --data demo/x.npy --out demo/codes.npy
echo "done: np.load('demo/codes.npy') in Python; run files in demo/run/"
