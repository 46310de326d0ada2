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
"$sae" train --config configs/quickstart.yaml --set data.truth=demo/truth.npy --out demo/run --force
echo "==> codes for Python: demo/codes.npz (sparse: about 2 MB where dense float32 is 100 MB)"
"$sae" encode --model demo/run --data demo/x.npy --sparse --out demo/codes.npz
echo "done: scipy.sparse.load_npz('demo/codes.npz') in Python; run files in demo/run/"
