#!/usr/bin/env bash
# `make fuzz`: each target for FUZZ_SECONDS (default 60). Needs cargo-fuzz
# (installed here if missing) and libtorch on the loader path (the fuzz
# binaries do not get the main crate's rpath).
set -euo pipefail
cd "$(dirname "$0")"
secs=${FUZZ_SECONDS:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export LD_LIBRARY_PATH="$(cd .. && pwd)/third_party/venv/lib/python3.11/site-packages/torch/lib:${LD_LIBRARY_PATH:-}"
# cargo-fuzz needs nightly flags; the stable toolchain accepts them this way.
export RUSTC_BOOTSTRAP=1
for t in npy config; do
  mkdir -p "corpus/$t"
  echo "==> fuzzing $t for ${secs}s"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -max_len=4096 2>&1 \
    | grep -E "^(#[0-9]+ +DONE|Done|==|INFO: Loaded|SUMMARY|.*(panicked|ERROR|crash))" || true
  # libFuzzer exits non-zero on a finding; the artifact is kept in artifacts/$t.
  if ls "artifacts/$t"/crash-* "artifacts/$t"/oom-* "artifacts/$t"/timeout-* >/dev/null 2>&1; then
    echo "FINDING in $t: see fuzz/artifacts/$t"; exit 1
  fi
done
