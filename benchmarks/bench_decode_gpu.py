"""GPU decode-step cost of the LESS CUDA kernels against the memory roofline, measured in one run.

For each setting (SmolLM2-like heads 9/3/64 and Llama-like 32/8/128, bf16, rank 8; batch 1, 8, 64; budgets
128-2048 slots) it prints the microseconds of decode_attention alone, of a whole decode step as the chain of ops
(attention, score + eviction, gathering and folding the victim: 4-6 kernels) and of the fused step
(less_decode_step_ on a SlotCache: insert, attend, score, evict, fold in 1 launch, 2 when split), all replayed from a
CUDA graph so that Python launch overhead is not measured, and the bandwidth the attention and the fused step achieve
against a device-to-device copy measured on the same GPU in the same run (ratio 1.0 = copy speed, the practical
roofline), and torch's scaled_dot_product_attention over the same full cache (no compression, no eviction: what the
fused step replaces). The settings rotate over enough copies of their tensors to keep the L2 cache from serving them.
docs/cuda_design.md has the expected numbers (estimates until measured).

Run: .venv/bin/python benchmarks/bench_decode_gpu.py [--iters N] [--models smollm2 llama] [--batches 1 8 64]
     [--budgets 128 512 2048]  (S = budget + 1 slots)
It exits cleanly, saying why, without a GPU or without the extension's CUDA kernels. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import math
import platform

import torch
import torch.nn.functional as F

from less_cuda import less_decode_attention, less_score_and_evict_, less_state_update_
from less_cuda.core.ops import less_decode_step_
from less_cuda.core import reference as ref
from less_cuda.core import state as slots

HEADS = {"smollm2": (9, 3, 64), "llama": (32, 8, 128)}
RANK = 8
ROTATION_BYTES = 256 << 20  # > 4x an H100's 50 MB L2


def make_setting(model: str, B: int, budget: int) -> tuple[slots.SlotCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A full cache (budget + 1 slots held, so every step evicts), q, phi(q), and the slot positions to refill. The
    fused step keeps it full by itself: it inserts a token, then evicts one."""
    Hq, Hkv, D = HEADS[model]
    S = budget + 1
    cache = slots.SlotCache.empty(B, Hkv, S, D, RANK, torch.bfloat16, device="cuda")
    cache.k.normal_()
    cache.v.normal_()
    cache.psi.uniform_()
    positions = torch.arange(S, dtype=torch.int32, device="cuda").expand_as(cache.pos).contiguous()
    cache.pos.copy_(positions)
    cache.next_position.fill_(S)
    q = torch.randn(B, Hq, D, device="cuda").to(torch.bfloat16)
    phi = torch.rand(B, Hq, RANK, device="cuda")
    return cache, q, phi, positions


def attention_bytes(model: str, B: int, budget: int) -> int:
    """Bytes decode_attention must move: K and V, pos read and probs written, q and out, the low-rank state."""
    Hq, Hkv, D = HEADS[model]
    S, elem = budget + 1, 2
    state = 4 * (B * Hkv * RANK * (D + 1) + B * Hq * RANK)
    return 2 * B * Hkv * S * D * elem + 8 * B * Hkv * S + 2 * B * Hq * D * elem + state


def step_bytes(model: str, B: int, budget: int) -> int:
    """Bytes a whole fused step must move: the attention's (probs stay on chip), score/evict's scores read and
    written and pos read again (12 per slot), the new token's k, v, psi into its slot, and the victim's fold (its v and
    psi read, H and z read and written)."""
    Hq, Hkv, D = HEADS[model]
    S, elem = budget + 1, 2
    token = B * Hkv * (2 * 2 * D * elem + 2 * 4 * RANK)
    fold = B * Hkv * (D * elem + 4 * RANK + 8 * RANK * (D + 1))
    return attention_bytes(model, B, budget) - 4 * B * Hkv * S + 12 * B * Hkv * S + token + fold


def make_token(model: str, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The new token's k, v and psi(k) for the fused step."""
    _, Hkv, D = HEADS[model]
    k, v = (torch.randn(B, Hkv, D, device="cuda").to(torch.bfloat16) for _ in range(2))
    return k, v, torch.rand(B, Hkv, RANK, device="cuda")


def attend(cache, q, phi, positions):
    return less_decode_attention(q, cache.k, cache.v, cache.pos, phi, cache.H, cache.z)


def sdpa(cache, q, phi, positions):
    """Full-cache attention for the same query (GQA through enable_gqa): the uncompressed baseline."""
    return F.scaled_dot_product_attention(q[:, :, None], cache.k, cache.v, enable_gqa=True)


def decode_step(cache, q, phi, positions, budget):
    out, probs = attend(cache, q, phi, positions)
    victim = less_score_and_evict_(cache.scores, cache.pos, probs, "h2o", budget, recent=budget // 2)
    less_state_update_(cache.H, cache.z, *ref.victim_tokens(cache, victim))
    cache.pos.copy_(positions)  # refill the freed slot so that the next replay evicts again
    return out


def fused_step(cache, q, phi, positions, token, budget):
    k, v, psi = token
    return less_decode_step_(cache, q, k, v, phi, psi, None, "h2o", budget, recent=budget // 2)


def graph_time_us(fns, iters: int) -> float:
    """Microseconds per call of the callables in `fns`, run in turn from one CUDA graph, replayed `iters` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # warm-up (allocations, lazy init) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (iters * len(fns))


def copy_time_us(nbytes: int, copies: int, iters: int) -> float:
    """A device-to-device copy moving `nbytes` (nbytes / 2 read, nbytes / 2 written), rotated like the setting."""
    pairs = []
    for _ in range(copies):
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        pairs.append((src, torch.empty_like(src)))
    return graph_time_us([lambda s=s, d=d: d.copy_(s) for s, d in pairs], iters)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--models", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--budgets", nargs="+", type=int, default=[128, 512, 2048])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode_gpu: skipped, no CUDA device")
        return 0
    if not all(torch._C._dispatch_has_kernel_for_dispatch_key(f"less_cuda::{op}", "CUDA")
               for op in ("decode_attention", "decode_step_")):
        print("bench_decode_gpu: skipped, the extension was built without its CUDA kernels")
        return 0
    props = torch.cuda.get_device_properties(0)
    print(f"machine: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}, host {platform.node()}")
    print(f"setting: bf16 K/V, rank {RANK}, S = budget + 1 slots all held (every step evicts), CUDA-graph replay, "
          f"{args.iters} iterations, tensors rotated over >= {ROTATION_BYTES >> 20} MiB")
    print("columns: attention alone, the step as a chain of ops, the fused step, full-cache SDPA on the same K/V; GB/s "
          "and ratio to the copy for the attention's bytes (MB) and the fused step's (step MB); fused / SDPA time")
    header = f"{'model':8} {'B':>3} {'budget':>6} {'MB':>8} {'step MB':>8} {'attn us':>9} {'chain us':>9} " \
             f"{'fused us':>9} {'sdpa us':>9} {'attn GB/s':>10} {'fused GB/s':>10} {'copy GB/s':>10} {'attn':>6} " \
             f"{'fused':>6} {'f/sdpa':>6}"
    print(header)
    print("-" * len(header))
    for model in args.models:
        for B in args.batches:
            for budget in args.budgets:
                nbytes, fused_bytes = attention_bytes(model, B, budget), step_bytes(model, B, budget)
                copies = max(1, math.ceil(ROTATION_BYTES / nbytes))
                settings = [make_setting(model, B, budget) for _ in range(copies)]
                tokens = [make_token(model, B) for _ in range(copies)]
                attn_us = graph_time_us([lambda s=s: attend(*s) for s in settings], args.iters)
                chain_us = graph_time_us([lambda s=s: decode_step(*s, budget) for s in settings], args.iters)
                fused_us = graph_time_us(
                    [lambda s=s, t=t: fused_step(*s, t, budget) for s, t in zip(settings, tokens)], args.iters
                )
                sdpa_us = graph_time_us([lambda s=s: sdpa(*s) for s in settings], args.iters)
                copy_us = copy_time_us(nbytes, copies, args.iters)
                attn_bw, copy_bw = nbytes / attn_us / 1e3, nbytes / copy_us / 1e3
                fused_bw = fused_bytes / fused_us / 1e3
                print(f"{model:8} {B:>3} {budget:>6} {nbytes / 1e6:>8.2f} {fused_bytes / 1e6:>8.2f} {attn_us:>9.2f} "
                      f"{chain_us:>9.2f} {fused_us:>9.2f} {sdpa_us:>9.2f} {attn_bw:>10.0f} {fused_bw:>10.0f} "
                      f"{copy_bw:>10.0f} {attn_bw / copy_bw:>6.2f} {fused_bw / copy_bw:>6.2f} {fused_us / sdpa_us:>6.2f}")
                del settings, tokens
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
