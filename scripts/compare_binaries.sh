#!/bin/bash
# Behaviour unchanged? Trains 29 configs (every activation and penalty,
# resampling, tied, deep, transcoder, noise, schedules, full batch, streamed
# and in-memory data, valid splits) plus an extended resume with two `sae`
# binaries and compares their outputs byte for byte: weights, TorchScript,
# metrics.jsonl, checkpoint, plots, config.yaml (keys the new build adds
# aside) and summary.json (timings and world_size aside). Prints one line per case;
# exits 1 if any differs. Build the old binary from a worktree, e.g.
#   git worktree add /tmp/base REV && (cd /tmp/base && make build)
#   scripts/compare_binaries.sh target/release/sae /tmp/base/target/release/sae
NEW=${1:?usage: compare_binaries.sh NEW_SAE OLD_SAE [WORKDIR]}; OLD=${2:?usage: compare_binaries.sh NEW_SAE OLD_SAE [WORKDIR]}
D=${3:-$(mktemp -d)}; rm -rf "$D"; mkdir -p "$D"
$OLD data synth --out $D/x.npy --n 600 --d-in 12 --features 20 --active 3 --seed 1 --truth $D/truth.npy >/dev/null
$OLD data synth --out $D/v.npy --n 100 --d-in 12 --features 20 --active 3 --seed 2 >/dev/null
$OLD data synth --out $D/y.npy --n 600 --d-in 7 --features 20 --active 3 --seed 1 >/dev/null
$OLD data synth --out $D/big.npy --n 70000 --d-in 8 --features 20 --active 3 --seed 3 >/dev/null
$OLD data synth --out $D/bigv.npy --n 500 --d-in 8 --features 20 --active 3 --seed 4 >/dev/null
cat > $D/base.yaml <<Y
data: {train: $D/x.npy, valid: $D/v.npy, truth: $D/truth.npy}
model: {d_hidden: 32}
train: {epochs: 3, batch_size: 64, checkpoint_every: 7, threads: 1}
Y
cases=(
 "relu_l1|"
 "relu_l1_std|data.normalize=standardize model.init_scheme=sae"
 "sigmoid_kl|model.activation=sigmoid sparsity.penalty=kl"
 "relu_meanabs|sparsity.penalty=mean_abs train.optimizer.name=adamw train.optimizer.weight_decay=0.01"
 "topk|model.activation=topk model.k=4 sparsity.penalty=none"
 "topk_auxk|model.activation=topk model.k=4 sparsity.penalty=auxk train.dead_window=5 sparsity.weight=0.03"
 "batchtopk|model.activation=batchtopk model.k=4 sparsity.penalty=none"
 "batchtopk_auxk|model.activation=batchtopk model.k=3 sparsity.penalty=auxk train.dead_window=3"
 "jumprelu_l0|model.activation=jumprelu sparsity.penalty=l0 sparsity.weight=0.01"
 "jumprelu_l1|model.activation=jumprelu"
 "gated|model.activation=gated"
 "matryoshka|model.activation=matryoshka_batchtopk model.k=4 model.matryoshka_widths=[8,16] sparsity.penalty=none"
 "matching_pursuit|model.activation=matching_pursuit model.k=3 model.tied=true sparsity.penalty=none"
 "gated_resample|model.activation=gated train.resample_every=5 train.dead_window=2"
 "relu_resample|train.resample_every=4 train.dead_window=2 sparsity.weight=0.3"
 "tied|model.tied=true"
 "tied_resample|model.tied=true train.resample_every=4 train.dead_window=2 sparsity.weight=0.3"
 "deep|model.hidden=[16,8] model.d_hidden=8 model.apply_b_dec_to_input=false"
 "unitnorm_clip|train.unit_norm_decoder=true train.grad_clip=0.1 train.lr_schedule=cosine train.lr_warmup_steps=3 train.lr_decay_steps=4 sparsity.warmup_steps=5"
 "noise_gauss|train.input_noise=gaussian"
 "noise_mask|train.input_noise=mask train.shuffle=false"
 "transcoder|model.apply_b_dec_to_input=false data.target=$D/y.npy data.valid=null data.truth=null data.valid_fraction=0.2"
 "validfrac|data.valid=null data.valid_fraction=0.1 model.b_dec_init=geometric_median"
 "full|train.batch_size=full train.epochs=5"
 "bdec_mean|model.b_dec_init=mean model.decoder_activation=sigmoid data.normalize=minmax"
 "stream|data.train=$D/big.npy data.valid=$D/bigv.npy data.truth=null train.batch_size=4096 train.epochs=2 data.stream=true"
 "stream_noshuf|data.train=$D/big.npy data.valid=$D/bigv.npy data.truth=null train.batch_size=3000 train.epochs=2 data.stream=true train.shuffle=false"
 "big_inmem|data.train=$D/big.npy data.valid=$D/bigv.npy data.truth=null train.batch_size=4096 train.epochs=2"
 "logevery|train.log_every=5 train.epochs=4"
)
fail=0
for c in "${cases[@]}"; do
  name=${c%%|*}; sets=${c#*|}; args=()
  for s in $sets; do args+=(--set "$s"); done
  for which in new old; do
    bin=$NEW; [ $which = old ] && bin=$OLD
    $bin train -q --config $D/base.yaml --out $D/$name.$which "${args[@]}" > $D/$name.$which.out 2>&1 || echo "  $which failed: $(tail -1 $D/$name.$which.out)"
  done
  ok=1
  for f in model.safetensors model.pt metrics.jsonl checkpoint/state.safetensors plots/loss.png plots/firing_frequency.png; do
    cmp -s $D/$name.new/$f $D/$name.old/$f || { ok=0; echo "  $name: $f differs"; }
  done
  python3 - $D/$name.new/summary.json $D/$name.old/summary.json <<'P' || ok=0
import json,sys
a,b=[json.load(open(p)) for p in sys.argv[1:]]
for d in (a,b):
    d.pop('seconds'); d.pop('samples_per_second'); d.pop('world_size', None); d.pop('precision', None)
if a!=b: print("  summary differs"); sys.exit(1)
P
  # config.yaml: every line of the old one, in order; the new may add keys (new defaults).
  cmp -s <(grep -Fxf $D/$name.old/config.yaml $D/$name.new/config.yaml) $D/$name.old/config.yaml || { ok=0; echo "  $name: config.yaml differs"; }
  [ $ok = 1 ] && echo "same $name" || { echo "DIFF $name"; fail=1; }
done
# resume: interrupt-free resume after extending epochs, both binaries
for which in new old; do bin=$NEW; [ $which = old ] && bin=$OLD
  $bin train -q --config $D/base.yaml --out $D/res.$which --set model.activation=batchtopk --set model.k=4 --set sparsity.penalty=none >/dev/null 2>&1
  $bin train -q --resume $D/res.$which --set train.epochs=5 >/dev/null 2>&1
done
cmp -s $D/res.new/model.safetensors $D/res.old/model.safetensors && cmp -s $D/res.new/metrics.jsonl $D/res.old/metrics.jsonl && echo "same resume_extend" || { echo "DIFF resume_extend"; fail=1; }
exit $fail
