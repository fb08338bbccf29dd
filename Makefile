# sparseroute: the one entry point. Every target creates or reuses .venv, installs what is
# missing (torch once: it is large), builds the extension in release mode and installs the
# wheel, so that Python always imports the installed package, never the source tree.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.sparseroute-deps
# The oldest torch that pyproject.toml accepts (read from its dependencies): `make
# test-torch-min` tests against it.
TORCH_MIN := $(shell sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
MIN_VENV := .venv-torch-min
WHEEL_STAMP := $(VENV)/.sparseroute-wheel
RUST_SOURCES := $(shell find rust/core rust/python -name '*.rs' -o -name Cargo.toml) Cargo.toml Cargo.lock
FUZZ_DIR := rust/fuzz
PY_SOURCES := $(shell find python -type f -not -path '*/__pycache__/*')

.PHONY: demo test test-rust test-python test-torch-min lint wheel bench bench-quick gpu-check memcheck fuzz clean

demo: $(WHEEL_STAMP)
	$(PY) -m sparseroute demo

test: lint test-rust $(WHEEL_STAMP) test-python

# Python tools and runtime dependencies. torch is only downloaded when the venv lacks it.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch>=$(TORCH_MIN)"
	$(PIP) install "numpy>=1.24" "pytest>=8" "hypothesis>=6.100" "maturin>=1.9,<2" ruff mypy "asv>=0.6" \
		"transformers>=5.24,<6" "matplotlib>=3.7"
	touch $@

# Build the abi3 wheel (release) and install it into the venv, replacing any earlier build.
$(WHEEL_STAMP): $(STAMP) $(RUST_SOURCES) $(PY_SOURCES) pyproject.toml
	rm -rf dist
	$(VENV)/bin/maturin build --release --out dist
	$(PIP) install --force-reinstall --no-deps dist/sparseroute-*.whl
	touch $@

wheel: $(WHEEL_STAMP)

lint: $(STAMP)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc -p sparseroute-core --no-deps --locked --quiet
	$(VENV)/bin/ruff check python tests benches docs/examples scripts
	$(VENV)/bin/ruff format --check python tests benches docs/examples scripts
	$(PY) -m mypy
	cargo fmt --manifest-path $(FUZZ_DIR)/Cargo.toml -- --check
	cargo clippy --manifest-path $(FUZZ_DIR)/Cargo.toml --all-targets --locked -- -D warnings

# The core's tests, then the fuzz checks replayed on fixed inputs (stable Rust; `make fuzz`
# searches with coverage guidance).
test-rust:
	cargo test -p sparseroute-core --locked
	cargo test --manifest-path $(FUZZ_DIR)/Cargo.toml --locked

# Run from tests/ so that `import sparseroute` can only resolve to the installed wheel.
test-python: $(WHEEL_STAMP)
	cd tests && SPARSEROUTE_REQUIRE_NVRTC=1 ../$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# The Python suite against the oldest torch that pyproject.toml accepts, in a venv of its own
# (torch is downloaded once), so that the declared minimum is a tested one. Not part of `make
# test`: a second torch is gigabytes. The sanitizer reruns of the emulated kernels are left
# out (they test the kernels, not torch's API).
test-torch-min: $(WHEEL_STAMP)
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -c "import torch, sys; sys.exit(not torch.__version__.startswith('$(TORCH_MIN).'))" \
		2>/dev/null || $(MIN_VENV)/bin/pip install "torch==$(TORCH_MIN).*" "numpy>=1.24" "pytest>=8" \
		"hypothesis>=6.100" mypy "transformers>=5.24,<6" "matplotlib>=3.7"
	$(MIN_VENV)/bin/pip install --force-reinstall --no-deps dist/sparseroute-*.whl
	cd tests && ../$(MIN_VENV)/bin/python -m pytest -p no:cacheprovider --ignore=test_cuda_memory.py \
		--ignore=test_cuda_races.py $(PYTEST_ARGS)

bench: $(WHEEL_STAMP)
	cd benches && ../$(VENV)/bin/asv machine --yes > /dev/null && ../$(VENV)/bin/asv run --python=same --show-stderr $(ASV_ARGS)
	$(PY) benches/ratios.py

bench-quick: $(WHEEL_STAMP)
	$(PY) benches/ratios.py --quick

# The Rust core's unsafe code under valgrind's memcheck (not part of `make test`: ten to twenty
# minutes). PYTEST_ARGS picks the test files; see scripts/memcheck.py.
memcheck: $(WHEEL_STAMP)
	PYTHON=$(abspath $(PY)) $(PY) scripts/memcheck.py $(PYTEST_ARGS)

# Coverage-guided fuzzing of the Rust core (not part of `make test`): each target of
# rust/fuzz for FUZZ_SECONDS under AddressSanitizer, with cargo fuzz (installed here if
# missing) on the nightly toolchain, which must be present. A failing input lands in
# rust/fuzz/artifacts/<target>/; copied into rust/fuzz/regressions/<target>/, `make test`
# replays it from then on.
FUZZ_SECONDS ?= 60
fuzz:
	command -v cargo-fuzz > /dev/null || cargo install cargo-fuzz --locked
	cd $(FUZZ_DIR) && for target in $$(cargo +nightly fuzz list --fuzz-dir .); do \
		cargo +nightly fuzz run --fuzz-dir . --features libfuzzer $$target -- \
			-max_total_time=$(FUZZ_SECONDS) -max_len=4096 || exit 1; \
	done

# CUDA kernels on a GPU: tests/gpu against the installed wheel, plus timings (see scripts/gpu-check.sh).
gpu-check: $(WHEEL_STAMP)
	git rev-parse HEAD > dist/COMMIT
	PYTHON=$(abspath $(PY)) bash scripts/gpu-check.sh

clean:
	rm -rf dist target $(VENV) $(MIN_VENV) benches/.asv
