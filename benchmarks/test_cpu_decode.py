"""CPU decode-step cost: the compiled LESS step against the pure-PyTorch reference step and against full-cache
attention over the whole context, in one run. pytest-benchmark groups each setting, so its table shows the ratios
(the multiple in brackets) of the three measured side by side; the header names the machine.

Run: make bench  (or .venv/bin/python -m pytest benchmarks/test_cpu_decode.py --benchmark-only)
"""

import pytest
import torch
import torch.nn.functional as F

from less_cuda import less_decode_attention, less_score_and_evict_, less_state_update_
from less_cuda import reference as ref

HEADS = {"smollm2": (9, 3, 64), "llama": (32, 8, 128)}
CONTEXT = 4096  # tokens seen; the full cache attends to all of them, LESS to budget + 1 slots


def _setting(model, B, budget):
    Hq, Hkv, D = HEADS[model]
    R, S = 8, budget + 1
    g = torch.Generator().manual_seed(0)
    cache = ref.SlotCache.empty(B, Hkv, S, D, R, torch.bfloat16)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    cache.psi.uniform_(generator=g)
    cache.pos.copy_(torch.arange(S, dtype=torch.int32))  # budget + 1 held: every step evicts one
    q = torch.randn(B, Hq, D, generator=g).to(torch.bfloat16)
    phi = torch.rand(B, Hq, R, generator=g)
    return cache, q, phi


def _less_step(cache, q, phi, budget):
    """The compiled ops of one decode step: attention, score + eviction, folding the victim."""
    out, probs = less_decode_attention(q, cache.k, cache.v, cache.pos, phi, cache.H, cache.z)
    victim = less_score_and_evict_(cache.scores, cache.pos, probs, "h2o", budget, recent=budget // 2)
    less_state_update_(cache.H, cache.z, *ref.victim_tokens(cache, victim))
    _refill(cache)
    return out


def _refill(cache):
    """Refill the freed slot so the next round evicts again (a small copy, paid by every implementation)."""
    cache.pos.copy_(torch.arange(cache.pos.shape[-1], dtype=torch.int32))


def _reference_step(cache, q, phi, budget):
    out, probs = ref.decode_attention(q, cache.k, cache.v, cache.pos, phi, cache.H, cache.z, q.shape[-1] ** -0.5)
    victim = ref.score_and_evict_(cache.scores, cache.pos, probs, ref.H2O, budget, budget // 2, 0)
    dH, dz = ref.state_fold(*ref.victim_tokens(cache, victim))
    cache.H += dH
    cache.z += dz
    _refill(cache)
    return out


@pytest.mark.parametrize("model", list(HEADS))
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("budget", [128, 512, 2048])
@pytest.mark.parametrize("impl", ["less_ops", "reference", "full_cache_sdpa"])
def test_decode_step(benchmark, model, B, budget, impl):
    benchmark.group = f"{model} B={B} budget={budget} context={CONTEXT}"
    cache, q, phi = _setting(model, B, budget)
    if impl == "less_ops":
        benchmark(_less_step, cache, q, phi, budget)
    elif impl == "reference":
        benchmark(_reference_step, cache, q, phi, budget)
    else:
        Hq, Hkv, D = HEADS[model]
        k = torch.randn(B, Hkv, CONTEXT, D).to(torch.bfloat16)
        benchmark(F.scaled_dot_product_attention, q[:, :, None], k, k, enable_gqa=True)
