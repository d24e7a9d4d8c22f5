#!/usr/bin/env bash
# Everything a lent GPU can tell about the CUDA kernels, in one command, from a bare machine: a Python with torch
# (any CUDA build; the extension is compiled against it) and pytest. Under 8 minutes on one H100 or H200.
#   1. build the extension for this GPU's architecture only, in a copy of the tree (never the checkout's own build)
#   2. tests/test_cuda_gpu.py (parity with the reference on every path, CUDA graphs, next_position at its limit) and
#      tests/test_build.py with the CUDA kernels required
#   3. benchmarks/compute_sanitizer.sh: memcheck, racecheck, synccheck on each launch path
#   4. the decode benchmark at B = 1 and B = 64, S = 2048, Llama-like heads (32 / 8 / 128), bf16: the kernels against
#      a plain copy of the same bytes and against full-cache SDPA (benchmarks/bench_decode_gpu.py)
#   5. an Nsight Compute summary of the attention kernels (speed of light, occupancy, launch statistics), if ncu exists
# Every step's output goes to $OUT/<step>.txt (default OUT=benchmarks/results/gpu_check), with summary.txt listing
# each step's status and seconds. Without a GPU the build and the CPU-side checks still run and the GPU steps say "skipped", so
# a rehearsal here can fail only on what needs a GPU.
#
# Run: benchmarks/gpu_check.sh   (PY: the Python with torch, default python3; GPU_ARCH: e.g. 9.0, default the
#      device's; MAX_JOBS: compile jobs, default the core count)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-python3}
[[ $PY == */* && $PY != /* ]] && PY=$ROOT/$PY  # the steps run in the copy
OUT=$(mkdir -p "${OUT:-benchmarks/results/gpu_check}" && cd "${OUT:-benchmarks/results/gpu_check}" && pwd)
SRC="$OUT/src"
# PYTHONPATH=.: the copy's less_cuda, ahead of any installed (or editable) one.
export MAX_JOBS=${MAX_JOBS:-$(nproc)} OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=.
status=0
: > "$OUT/summary.txt"

# step NAME COMMAND...: runs COMMAND in the build copy, output to $OUT/NAME.txt, status and time to summary.txt.
step() {
  local name=$1 start=$SECONDS rc
  shift
  echo "== $name: $*"
  (cd "$SRC" && "$@") > "$OUT/$name.txt" 2>&1
  rc=$?
  tail -n 3 "$OUT/$name.txt"
  printf '%-16s %-7s %4ds  %s\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAILED)" $((SECONDS - start)) "$*" \
    >> "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}

has_gpu=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null) || {
  echo "gpu_check.sh: $PY cannot import torch" | tee "$OUT/summary.txt"
  exit 1
}
if [ "$has_gpu" = 1 ]; then
  arch=${GPU_ARCH:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
else
  arch=${GPU_ARCH:-9.0}
  echo "gpu_check.sh: no CUDA device; building for sm_${arch/./} and skipping the GPU steps"
fi
"$PY" - > "$OUT/machine.txt" 2>&1 <<'PYTHON'
import platform, torch
print(f"host {platform.node()}, python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
PYTHON
cat "$OUT/machine.txt"

# The tree as git sees it (tracked and untracked, not ignored), or without git all but the build products and
# virtual environments; never this script's own output.
rm -rf "$SRC" && mkdir -p "$SRC"
(git ls-files -co --exclude-standard 2>/dev/null ||
  find . \( -name .git -o -name ".venv*" -o -path ./build -o -name "*.so" \) -prune -o -type f -print) |
  sed 's|^\./||' | grep -v "^${OUT#"$ROOT"/}/" | tar -cf - -T - | tar -xf - -C "$SRC"

step build env TORCH_CUDA_ARCH_LIST="$arch" LESS_CUDA_FORCE_CUDA=$has_gpu "$PY" setup.py -q build_ext --inplace
expect=()
[ "$has_gpu" = 1 ] && expect=(LESS_CUDA_EXPECT_CUDA=1)
step tests env ${expect[@]+"${expect[@]}"} "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_gpu.py \
  tests/test_build.py -rs
step sanitizer env PY="$PY" bash benchmarks/compute_sanitizer.sh
step bench "$PY" benchmarks/bench_decode_gpu.py --models llama --batches 1 64 --budgets 2047
if command -v ncu > /dev/null && [ "$has_gpu" = 1 ]; then
  step ncu ncu --kernel-name regex:"decode_(step|chunk|combine)" --launch-count 6 \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    "$PY" benchmarks/bench_decode_gpu.py --models llama --batches 1 64 --budgets 2047 --iters 1
else
  echo "ncu skipped: $(command -v ncu > /dev/null && echo 'no CUDA device' || echo 'ncu not found')" | tee "$OUT/ncu.txt"
fi

echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
exit $status
