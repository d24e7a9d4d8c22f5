"""Op-level CPU decode-step cost, measured side by side in one run (ratios in benchmarks/results/ratios.md):

- the fused step (`less_decode_step_`) against the eager PyTorch reference step (`reference.decode_step`);
- the fused step's K/V read rate against a plain read of the same bytes (a `sum` over them viewed as fp32: torch's
  bf16 `sum` is several times slower than memory, which would flatter the step);
- the LESS step over a 5% budget against full-cache SDPA decode attention over the whole 16k-token context, in
  bf16 and fp32.

Every step starts from a full steady state (budget held plus one free slot), so each call inserts, attends, scores,
evicts and folds, and leaves the same state shape for the next call.

Run: make bench  (or .venv/bin/python -m pytest benchmarks/test_cpu_decode.py --benchmark-only)
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import RATIOS, Ratio

from less_cuda import less_decode_step_
from less_cuda.core import reference as ref
from less_cuda.core.state import SlotCache

HEADS = {"smollm2": (9, 3, 64), "llama": (32, 8, 128)}
RANK = 8
FUSED_VS_REFERENCE = "B=8 smollm2 heads 9/3/64, 512 slots, bf16"
BANDWIDTH = "B=8 llama heads 32/8/128, 2048 slots, bf16"
LONG_CONTEXT = {dtype: f"B=8 llama heads 32/8/128, 16k context, LESS at 5% (819 tokens), {name}"
                for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"))}
CONTEXT_16K = 16384

RATIOS += [
    Ratio("fused step vs eager reference step", FUSED_VS_REFERENCE, "reference step", "fused step", 5.0),
    Ratio("K/V read rate vs a plain read of the same bytes", BANDWIDTH, "plain read", "fused step", 0.5),
    *(Ratio("LESS step vs full-cache SDPA decode", setting, "full-cache sdpa", "fused step", 15.0)
      for setting in LONG_CONTEXT.values()),
]


def steady_cache(model: str, B: int, S: int, dtype=torch.bfloat16) -> tuple[SlotCache, tuple]:
    """S - 1 slots held (the budget) and one free; the new token's q, k, v, phi(q), psi(k)."""
    Hq, Hkv, D = HEADS[model]
    g = torch.Generator().manual_seed(0)
    cache = SlotCache.empty(B, Hkv, S, D, RANK, dtype)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    cache.psi.uniform_(generator=g)
    cache.pos.copy_(torch.arange(S, dtype=torch.int32))
    cache.pos[..., -1] = ref.EMPTY
    cache.next_position.fill_(S)
    token = (
        torch.randn(B, Hq, D, generator=g).to(dtype),
        torch.randn(B, Hkv, D, generator=g).to(dtype),
        torch.randn(B, Hkv, D, generator=g).to(dtype),
        torch.rand(B, Hq, RANK, generator=g),
        torch.rand(B, Hkv, RANK, generator=g),
    )
    return cache, token


def fused_step(cache: SlotCache, token: tuple, budget: int) -> torch.Tensor:
    return less_decode_step_(cache, *token, None, "h2o", budget, budget // 2)


def reference_step(cache: SlotCache, token: tuple, budget: int) -> torch.Tensor:
    q = token[0]
    out = ref.decode_step(cache, *token, cache.next_position, q.shape[-1] ** -0.5, ref.H2O, budget, budget // 2, 0)
    cache.next_position += 1
    return out


@pytest.mark.parametrize("impl", ["fused step", "reference step"])
def test_fused_vs_reference(timed, impl):
    cache, token = steady_cache("smollm2", 8, 512)
    step = fused_step if impl == "fused step" else reference_step
    timed(FUSED_VS_REFERENCE, impl, step, cache, token, 511)


@pytest.mark.parametrize("impl", ["fused step", "plain read"])
def test_bandwidth(timed, impl):
    cache, token = steady_cache("llama", 8, 2048)
    if impl == "fused step":
        timed(BANDWIDTH, impl, fused_step, cache, token, 2047)
    else:
        kv = torch.stack([cache.k, cache.v]).view(torch.float32)  # the same bytes, read at fp32 sum speed
        timed(BANDWIDTH, impl, torch.sum, kv)


@pytest.mark.parametrize("dtype", list(LONG_CONTEXT), ids=str)
@pytest.mark.parametrize("impl", ["fused step", "full-cache sdpa"])
def test_long_context(timed, impl, dtype):
    """fp32 too: torch's CPU SDPA reads bf16 K/V far below memory speed, which flatters the bf16 ratio."""
    budget = round(0.05 * CONTEXT_16K)
    if impl == "fused step":
        cache, token = steady_cache("llama", 8, budget + 1, dtype)
        timed(LONG_CONTEXT[dtype], impl, fused_step, cache, token, budget)
    else:
        Hq, Hkv, D = HEADS["llama"]
        g = torch.Generator().manual_seed(1)
        k, v = (torch.randn(8, Hkv, CONTEXT_16K, D, generator=g).to(dtype) for _ in range(2))
        q = torch.randn(8, Hq, 1, D, generator=g).to(dtype)
        timed(LONG_CONTEXT[dtype], impl, partial(F.scaled_dot_product_attention, enable_gqa=True), q, k, v)
