#!/bin/bash
# train.precision: bf16 on CUDA (issue 24), in one short run for a GPU machine:
# `sae info`, then SAELens standard (ReLU + L1) and top-k trained by `sae` on
# cuda in fp32 and bf16 and by tests/reference/saelens.py on cuda (bf16:
# torch.autocast('cuda', dtype=torch.bfloat16) around forward + loss), from
# the same weights and batches. For each case it prints the largest relative
# loss and absolute weight differences, and checks them against the bf16
# drift tolerance of tests/parity.rs (BF16_DRIFT: loss 2^-10 relative,
# weights 2^-9 absolute), and that bf16 is visible (the two references
# differ by more). On CPU the same cases pass (cargo test --test parity bf16).
#   scripts/gpu_bf16_check.sh [SAE] [WORKDIR]     (exit 1 on any FAIL)
# DEV=cpu runs the same on the CPU (a dry run of this script).
set -uo pipefail
SAE=${1:-target/release/sae}
D=${2:-$(mktemp -d)}
PY=${SAE_PYTHON:-third_party/venv/bin/python}
DEV=${DEV:-cuda}
R=tests/reference
export CUBLAS_WORKSPACE_CONFIG=:4096:8 # torch.use_deterministic_algorithms on CUDA
mkdir -p "$D"
$SAE info || exit 1
$PY $R/make_inputs.py --out "$D/in" --data-kind sparse --init-kind sae --hidden 32 --seed 3 --n 500 >/dev/null || exit 1
fail=0
for arch in standard topk; do
  if [ $arch = standard ]; then act="relu"; pen="l1"; extra=(--l1-coefficient 0.005)
  else act="topk, k: 4"; pen="none"; extra=(--k 4); fi
  for prec in fp32 bf16; do
    cat > "$D/$arch.$prec.yaml" <<Y
seed: 0
device: $DEV
data: {train: $D/in/x.npy}
model: {init: $D/in/init.safetensors, d_hidden: 32, activation: $act}
sparsity: {penalty: $pen, weight: 0.005}
train: {epochs: 200, batch_size: full, shuffle: false, log_every: 1, threads: 1, precision: $prec, sparse_step: never,
        optimizer: {name: adam, lr: 0.003}}
Y
    $SAE train -q --config "$D/$arch.$prec.yaml" --out "$D/$arch.$prec.sae" --force >/dev/null || { echo "FAIL $arch $prec: sae train"; fail=1; }
    $PY $R/saelens.py --data "$D/in/x.npy" --init "$D/in/init.safetensors" --out "$D/$arch.$prec.ref" \
      --epochs 200 --lr 0.003 --batch-size full --architecture $arch "${extra[@]}" \
      --device $DEV --precision $prec || { echo "FAIL $arch $prec: reference"; fail=1; }
  done
  $PY - "$D" $arch $DEV <<'P' || fail=1
import json, sys
sys.path.insert(0, "tests/reference")
import common
import numpy as np
d, arch, dev = sys.argv[1], sys.argv[2], sys.argv[3]
def losses(p):
    return [json.loads(l) for l in open(p)]
def weights(p):
    return common.read_safetensors(p)
def diff(a, b, wa, wb):
    rel = max(max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-30) for k in ("loss", "mse"))
              for x, y in zip(a, b))
    dw = max(float(np.abs(wa[k] - wb[k]).max()) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    return rel, dw
ok = True
for prec in ("fp32", "bf16"):
    s = json.load(open(f"{d}/{arch}.{prec}.sae/summary.json"))
    assert s["precision"] == prec and s["device"].startswith(dev), (s["precision"], s["device"])
    rel, dw = diff(losses(f"{d}/{arch}.{prec}.sae/metrics.jsonl"),
                   losses(f"{d}/{arch}.{prec}.ref/losses.jsonl"),
                   weights(f"{d}/{arch}.{prec}.sae/model.safetensors"),
                   weights(f"{d}/{arch}.{prec}.ref/weights.safetensors"))
    good = rel <= 2**-10 and dw <= 2**-9
    ok &= good
    print(f"{'ok  ' if good else 'FAIL'} {arch} {prec} sae vs torch on {dev}: max rel dloss {rel:.3e}, max |dweight| {dw:.3e}")
rel, dw = diff(losses(f"{d}/{arch}.bf16.ref/losses.jsonl"), losses(f"{d}/{arch}.fp32.ref/losses.jsonl"),
               weights(f"{d}/{arch}.bf16.ref/weights.safetensors"), weights(f"{d}/{arch}.fp32.ref/weights.safetensors"))
seen = rel > 2**-10 and dw > 2**-9
ok &= seen
print(f"{'ok  ' if seen else 'FAIL'} {arch} torch bf16 vs fp32 on {dev} (must differ): max rel dloss {rel:.3e}, max |dweight| {dw:.3e}")
sys.exit(0 if ok else 1)
P
done
exit $fail
