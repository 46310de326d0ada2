# Every target does its own set-up: a fresh clone needs only `make demo` or `make test`.
SHELL := /bin/bash
VENV     := third_party/venv
PY       := $(VENV)/bin/python
TORCH    := 2.11.0
STAMP    := $(VENV)/.installed-torch-$(TORCH)
# sae_lens 6.x, for the SAELens interop tests (tests/interop.rs): ~50 s, ~0.9 GB.
SAELENS  := sae-lens>=6,<7
SAELENS_STAMP := $(VENV)/.installed-sae-lens-6
# The CUDA headers the NCCL part of the c10d shim (src/dist/c10d_nccl.cpp)
# needs beyond the torch wheel's own nvidia-* packages: CUDA's crt/ headers
# and cccl, of the wheel's CUDA 13.0 (its nvidia-cuda-runtime 13.0.96,
# nvidia-cuda-nvrtc 13.0.88). ~20 MB, headers only.
CUDA_HEADERS := nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
CUDA_HEADERS_STAMP := $(VENV)/.installed-cuda-headers-13.0
# scikit-learn, the OMP reference of the pursuit tests (tests/pursuit.rs).
SKLEARN_STAMP := $(VENV)/.installed-sklearn
# schedulefree 1.4.1, whose wrapper tests/reference/recipes.py copies (checked
# against the package by tests/parity.rs).
SCHEDULEFREE := schedulefree==1.4.1
SCHEDULEFREE_STAMP := $(VENV)/.installed-schedulefree-1.4.1
# ml_dtypes (numpy's bfloat16), for the bfloat16 .npy tests (tests/precision.rs).
ML_DTYPES_STAMP := $(VENV)/.installed-ml-dtypes
BIN      := target/release/sae

# A user's own libtorch (LIBTORCH=/path/to/libtorch) is honoured; otherwise
# the build uses the torch wheel in the project venv.
ifdef LIBTORCH
CARGO_ENV :=
SETUP_DEPS :=
else
CARGO_ENV := LIBTORCH_USE_PYTORCH=1 VIRTUAL_ENV=$(CURDIR)/$(VENV) PATH="$(CURDIR)/$(VENV)/bin:$$PATH"
SETUP_DEPS := $(STAMP) $(CUDA_HEADERS_STAMP)
endif
# Tests call Python references through this interpreter.
export SAE_PYTHON := $(CURDIR)/$(PY)

.PHONY: setup saelens sklearn schedulefree ml-dtypes browser build demo digits digits-table synth-table test parity bench fuzz clean fmt lint

setup: $(STAMP) $(CUDA_HEADERS_STAMP)

$(STAMP):
	@echo "==> creating $(VENV) with torch==$(TORCH) (one-time, ~1 min)"
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH)" numpy safetensors
	touch $@

$(CUDA_HEADERS_STAMP): $(STAMP)
	@echo "==> installing CUDA headers for NCCL into $(VENV) (one-time)"
	$(PY) -m pip install --quiet $(CUDA_HEADERS)
	touch $@

# sae_lens into the venv, torch kept at $(TORCH).
saelens: $(SAELENS_STAMP)

$(SAELENS_STAMP): $(STAMP)
	@echo "==> installing sae_lens 6.x into $(VENV) (one-time, ~1 min, ~0.9 GB)"
	$(PY) -m pip install --quiet "$(SAELENS)" "torch==$(TORCH)"
	touch $@

sklearn: $(SKLEARN_STAMP)

$(SKLEARN_STAMP): $(STAMP)
	@echo "==> installing scikit-learn into $(VENV) (one-time)"
	$(PY) -m pip install --quiet scikit-learn
	touch $@

schedulefree: $(SCHEDULEFREE_STAMP)

$(SCHEDULEFREE_STAMP): $(STAMP)
	@echo "==> installing $(SCHEDULEFREE) into $(VENV) (one-time)"
	$(PY) -m pip install --quiet "$(SCHEDULEFREE)" "torch==$(TORCH)"
	touch $@

ml-dtypes: $(ML_DTYPES_STAMP)

$(ML_DTYPES_STAMP): $(STAMP)
	@echo "==> installing ml_dtypes into $(VENV) (one-time)"
	$(PY) -m pip install --quiet "ml_dtypes==0.7.0"
	touch $@

# Headless Chromium for the page tests (tests/latents.rs): Debian's
# `chromium`, installed when missing if this runs as root (as CI does);
# otherwise this fails, saying so.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "==> installing chromium (apt-get, one-time)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "chromium is missing and cannot be installed here: apt-get install chromium (as root)"; exit 1; \
	  fi; }

build: $(SETUP_DEPS)
	$(CARGO_ENV) cargo build --release --locked

demo: build
	@bash scripts/demo.sh

# A top-k SAE (L0 = 10) on scikit-learn's digits, with a held-out split (~10 s on
# 2 cores: 9 s measured, 2026-12-06).
digits: build $(SKLEARN_STAMP)
	$(PY) scripts/digits.py digits
	target/release/sae train --config configs/digits.yaml --out runs/digits --force
	target/release/sae eval --model runs/digits --data digits/digits_valid.npy --encoder omp --k 10
	target/release/sae latents --model runs/digits --data digits/digits_train.npy \
	    --labels digits/digits_train_labels.txt --out runs/digits/latents
	@echo "open runs/digits/latents/index.html and runs/digits/report.html in a browser"

# Held-out FVU at L0 = 10 on digits for PCA, each architecture and each
# encoder (own, OMP, MP); writes the table into BENCHMARKS.md (~1 min: 57 s on 2 cores, 2026-12-06).
digits-table: build $(SKLEARN_STAMP)
	$(PY) scripts/digits.py digits
	$(PY) scripts/digits_table.py $(BIN) digits runs/digits-table
	$(PY) scripts/bench_report.py runs/digits-table/table.md BENCHMARKS.md digits \
	    "Reconstruction at L0 = 10 on real data (digits)"

# Each architecture, ours against SAELens's own trainer, on SynthSAEBench data
# from sae_lens.synthetic's generator (scaled down), scored with SynthSAEBench's
# metrics; writes the table into BENCHMARKS.md (a few minutes on 2 quiet cores).
synth-table: $(SAELENS_STAMP) build
	$(PY) scripts/synth_table.py $(BIN) runs/synth-table
	$(PY) scripts/bench_report.py runs/synth-table/table.md BENCHMARKS.md synth \
	    "Ground truth: SynthSAEBench-style data (issue 23)"

# SAE_REQUIRE_SAELENS: the SAELens interop tests fail (not skip) without
# sae_lens, the pursuit tests without scikit-learn, the signum check without
# schedulefree and the bfloat16 .npy tests without ml_dtypes; SAE_REQUIRE_BROWSER:
# the page tests fail without headless Chromium.
# Unit and integration tests (no doc-tests: there are none), then one
# closing line with the totals over every test binary.
TEST_LOG := target/test.log
test: $(STAMP) $(SAELENS_STAMP) $(SKLEARN_STAMP) $(SCHEDULEFREE_STAMP) $(ML_DTYPES_STAMP) browser build
	@set -o pipefail; SAE_REQUIRE_SAELENS=1 SAE_REQUIRE_BROWSER=1 $(CARGO_ENV) cargo test --release --locked --lib --bins --tests \
	    -- --test-threads=2 2>&1 | tee $(TEST_LOG)
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "%d passed, %d failed\n", p, f}' $(TEST_LOG)

# Training parity with the plain-PyTorch references in tests/reference/:
# runs tests/parity.rs only, then tabulates its PARITY lines (also on failure).
PARITY_LOG := target/parity.log
PARITY_ROW := %-20s %7s %6s %13s %13s %13s  %s\n
parity: $(STAMP) $(SCHEDULEFREE_STAMP) build
	@status=0; set -o pipefail; \
	$(CARGO_ENV) cargo test --release --locked --test parity -- --nocapture --test-threads=1 \
	    2>&1 | tee $(PARITY_LOG) || status=$$?; \
	echo; echo "Parity with PyTorch (loss: relative 1e-5 per logged step; weights: absolute 1e-5)"; \
	printf '$(PARITY_ROW)' case epochs steps 'max|dloss|' 'max rel dloss' 'max|dweight|' result; \
	grep -o 'PARITY[[:blank:]].*' $(PARITY_LOG) | awk -F'\t' -v fmt='$(PARITY_ROW)' '{printf fmt, $$2, $$3, $$4, $$5, $$6, $$7, $$8}'; \
	exit $$status

# Ours vs a plain PyTorch loop and vs SAELens's own training step (sae_lens,
# as `make test` installs it), same maths and threads, alternating runs;
# prints the table and writes it into BENCHMARKS.md. BENCH_ARGS=--quick for a short run;
# BENCH_ARGS="--only S,OOC" runs some parts and leaves BENCHMARKS.md alone.
BENCH_DIR := target/bench
bench: $(SAELENS_STAMP) build
	$(PY) scripts/bench.py $(BIN) $(BENCH_DIR) $(BENCH_ARGS)
	$(PY) scripts/bench_report.py $(BENCH_DIR)/table.md BENCHMARKS.md

# cargo-fuzz targets (fuzz/): the .npy reader and the config parser,
# FUZZ_SECONDS each (default 60).
fuzz: $(SETUP_DEPS)
	$(CARGO_ENV) bash fuzz/run.sh

fmt:
	cargo fmt

lint: $(SETUP_DEPS)
	cargo fmt --check
	$(CARGO_ENV) cargo clippy --release --all-targets -- -D warnings

clean:
	cargo clean
