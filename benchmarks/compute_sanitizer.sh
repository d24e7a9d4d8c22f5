#!/usr/bin/env bash
# compute-sanitizer over the LESS CUDA kernels on a GPU: what the CPU harness (csrc/testing) cannot show.
#   racecheck  shared-memory data races (a missing __syncthreads between a write and a read)
#   synccheck  barrier and warp-collective misuse (divergent __syncthreads, bad shuffle masks)
#   memcheck   out-of-bounds and misaligned global / shared accesses (torch's caching allocator is switched off so
#              that every tensor is its own allocation and an overrun is caught)
# Each tool runs a small script that calls decode_attention (one chunk, several tiles, split-KV, a row shorter than
# its vectorised instance's, generic head_dim) and decode_step_ (one launch, split, G > 8, several tokens with pads)
# once each and synchronises.
#
# Run: benchmarks/compute_sanitizer.sh [racecheck synccheck memcheck]
#   PY (default .venv/bin/python), SANITIZER (default compute-sanitizer on PATH or in $CUDA_HOME/bin).
# Exits 0 with a message where there is no GPU or no sanitizer; 1 when a tool reports an error.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
TOOLS=("$@")
[ ${#TOOLS[@]} -eq 0 ] && TOOLS=(racecheck synccheck memcheck)

if [ ! -x "$SANITIZER" ]; then
  echo "compute_sanitizer.sh: skipped, compute-sanitizer not found (set SANITIZER)"
  exit 0
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "compute_sanitizer.sh: skipped, no CUDA device"
  exit 0
fi

script=$(mktemp --suffix .py)
trap 'rm -f "$script"' EXIT
cat > "$script" <<'PYTHON'
import torch

import less_cuda  # noqa: F401  (the op registrations)
from less_cuda.core.ops import less_decode_step_
from less_cuda.core.state import SlotCache

assert torch._C._dispatch_has_kernel_for_dispatch_key("less_cuda::decode_step_", "CUDA"), "no CUDA kernels built"
torch.manual_seed(0)
sms = torch.cuda.get_device_properties(0).multi_processor_count
dev = "cuda"


def attention(B, Hkv, G, S, D, dtype, R=4):
    q = torch.randn(B, Hkv * G, D, device=dev).to(dtype)
    k, v = (torch.randn(B, Hkv, S, D, device=dev).to(dtype) for _ in range(2))
    pos = torch.randperm(B * Hkv * S, device=dev).view(B, Hkv, S).int()
    pos[torch.rand(B, Hkv, S, device=dev) < 0.2] = -1
    phi = torch.rand(B, Hkv * G, R, device=dev)
    H, z = torch.randn(B, Hkv, R, D, device=dev), torch.rand(B, Hkv, R, device=dev)
    torch.ops.less_cuda.decode_attention(q, k, v, pos, phi, H, z, D**-0.5)
    torch.cuda.synchronize()
    print(f"decode_attention B={B} Hkv={Hkv} G={G} S={S} D={D} {dtype}: ok", flush=True)


def step(B, Hkv, G, S, D, dtype, T=1, R=8):
    cache = SlotCache.empty(B, Hkv, S, D, R, dtype, device=dev)
    cache.k.normal_()
    cache.v.normal_()
    cache.psi.uniform_()
    cache.pos.copy_(torch.arange(S, device=dev, dtype=torch.int32).expand(B, Hkv, S))
    cache.pos[:, :, S // 2] = -1  # one free slot per row
    cache.pos[0, 0] = torch.arange(S, device=dev, dtype=torch.int32)  # and a row with none (slot 0 overwritten)
    cache.next_position.fill_(S)
    q = torch.randn(B, Hkv * G, T, D, device=dev).to(dtype)
    k, v = (torch.randn(B, Hkv, T, D, device=dev).to(dtype) for _ in range(2))
    phi, psi = torch.rand(B, Hkv * G, T, R, device=dev), torch.rand(B, Hkv, T, R, device=dev)
    valid = torch.rand(B, T, device=dev) > 0.2
    less_decode_step_(cache, q, k, v, phi, psi, valid, "h2o", S - 1, recent=4)
    less_decode_step_(cache, q, k, v, phi, psi, valid, "lambda", S - 1, sinks=2)
    torch.cuda.synchronize()
    print(f"decode_step_ B={B} Hkv={Hkv} G={G} S={S} D={D} T={T} {dtype}: ok", flush=True)


rows = (sms + 3) // 4 * 4  # enough (batch, KV head) blocks that the planner does not split
attention(rows // 4, 4, 4, 40, 128, torch.bfloat16)  # one launch, one tile
attention(rows, 1, 8, 1300, 64, torch.float16)  # one launch, each block walks two shared-memory tiles
attention(1, 2, 4, 300, 128, torch.bfloat16)  # split-KV: chunk kernel + combine kernel
attention(1, 2, 12, 300, 64, torch.float32)  # two head tiles
attention(rows // 4, 4, 3, 40, 96, torch.bfloat16)  # 96 in the D = 128 vectorised instance
attention(rows // 4, 4, 3, 40, 100, torch.bfloat16)  # generic head_dim (rows of 200 bytes)
step(rows // 4, 4, 4, 40, 128, torch.bfloat16)  # one launch per token
step(rows, 1, 8, 1300, 64, torch.float16)  # one launch, two tiles, p through the workspace
step(1, 2, 4, 300, 128, torch.bfloat16, T=3)  # split: chunk kernel + finishing kernel, three tokens
step(1, 2, 12, 60, 100, torch.float16)  # two head tiles, generic head_dim
PYTHON

status=0
for tool in "${TOOLS[@]}"; do
  echo "== compute-sanitizer --tool $tool"
  env=()
  [ "$tool" = memcheck ] && env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  if ! env ${env[@]+"${env[@]}"} "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PY" "$script"; then
    echo "== $tool reported errors"
    status=1
  fi
done
exit $status
