# Every target does its own set-up: a fresh clone needs only `make demo` or `make test`.
SHELL := /bin/bash
VENV     := third_party/venv
PY       := $(VENV)/bin/python
TORCH    := 2.11.0
STAMP    := $(VENV)/.installed-torch-$(TORCH)
BIN      := target/release/sae

# A user's own libtorch (LIBTORCH=/path/to/libtorch) is honoured; otherwise
# the build uses the torch wheel in the project venv.
ifdef LIBTORCH
CARGO_ENV :=
SETUP_DEPS :=
else
CARGO_ENV := LIBTORCH_USE_PYTORCH=1 VIRTUAL_ENV=$(CURDIR)/$(VENV) PATH="$(CURDIR)/$(VENV)/bin:$$PATH"
SETUP_DEPS := $(STAMP)
endif
# Tests call Python references through this interpreter.
export SAE_PYTHON := $(CURDIR)/$(PY)

.PHONY: setup build demo test parity clean fmt lint

setup: $(STAMP)

$(STAMP):
	@echo "==> creating $(VENV) with torch==$(TORCH) (one-time, ~1-2 min)"
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH)" numpy safetensors
	touch $@

build: $(SETUP_DEPS)
	$(CARGO_ENV) cargo build --release --locked

demo: build
	@bash scripts/demo.sh

test: $(STAMP) build
	$(CARGO_ENV) cargo test --release --locked -- --test-threads=2

# Training parity with the plain-PyTorch references in tests/reference/:
# runs tests/parity.rs only, then tabulates its PARITY lines (also on failure).
PARITY_LOG := target/parity.log
PARITY_ROW := %-20s %7s %6s %13s %13s %13s  %s\n
parity: $(STAMP) build
	@status=0; set -o pipefail; \
	$(CARGO_ENV) cargo test --release --locked --test parity -- --nocapture --test-threads=1 \
	    2>&1 | tee $(PARITY_LOG) || status=$$?; \
	echo; echo "Parity with PyTorch (loss: relative 1e-5 per logged step; weights: absolute 1e-5)"; \
	printf '$(PARITY_ROW)' case epochs steps 'max|dloss|' 'max rel dloss' 'max|dweight|' result; \
	grep -o 'PARITY[[:blank:]].*' $(PARITY_LOG) | awk -F'\t' -v fmt='$(PARITY_ROW)' '{printf fmt, $$2, $$3, $$4, $$5, $$6, $$7, $$8}'; \
	exit $$status

fmt:
	cargo fmt

lint: $(SETUP_DEPS)
	cargo fmt --check
	$(CARGO_ENV) cargo clippy --release --all-targets -- -D warnings

clean:
	cargo clean
