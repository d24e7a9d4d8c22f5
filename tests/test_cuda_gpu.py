"""The CUDA ops on a real GPU (torch.ops.less_cuda.* on cuda tensors) match less_cuda.reference; skipped where there
is no GPU. tests/test_cuda_kernels.py runs the same kernel source on the CPU through the harness everywhere.

One test runs everywhere: the extension either registers all four CUDA kernels or none, and has them when it must
(LESS_CUDA_EXPECT_CUDA=1, set by CI's CUDA build).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close_ratio
from test_cuda_kernels import decode_inputs

import less_cuda  # noqa: F401  (loads the op registrations)
from less_cuda import reference

OPS = ["decode_attention", "score_and_evict_", "state_fold", "state_update_"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.less_cuda


def has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"less_cuda::{op}", "CUDA")


def test_cuda_registrations_come_together():
    registered = [has_cuda_kernel(op) for op in OPS]
    assert all(registered) or not any(registered), dict(zip(OPS, registered))
    if os.environ.get("LESS_CUDA_EXPECT_CUDA") == "1":
        assert all(registered), "LESS_CUDA_EXPECT_CUDA=1 but the extension has no CUDA kernels"
    if torch.version.cuda is None:
        assert not any(registered)


needs_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_cuda_kernel("decode_attention")),
    reason="no CUDA device (the kernels run in the CPU harness only), or the extension has no CUDA kernels",
)


def cuda(*tensors):
    return [t.cuda() if t is not None else None for t in tensors]


@needs_kernels
@pytest.mark.parametrize("regime", ["one chunk", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 3, 4, 8, 12])
def test_decode_attention(G, D, dtype, regime):
    """'one chunk': enough (batch, KV head) blocks to fill the GPU; 'split': two rows of 300 slots, which the
    heuristic splits into chunks merged by the combine kernel."""
    B, Hkv, S = (48, 4, 40) if regime == "one chunk" else (1, 2, 300)
    q, k, v, pos, lowrank = decode_inputs(B, Hkv, G, S, D, R=8, dtype=dtype, seed=G * 1000 + D)
    scale = D**-0.5
    for state in (lowrank, (None, None, None)):
        out, probs = ops.decode_attention(*cuda(q, k, v, pos, *state), scale)
        ref_out, ref_probs = reference.decode_attention(q, k, v, pos, *state, scale)
        assert_close_ratio(out.cpu(), ref_out, what="out")
        assert_close_ratio(probs.cpu(), ref_probs, torch.float32, what="probs")


@needs_kernels
@pytest.mark.parametrize("policy,budget,recent,sinks", [(0, 20, 4, 0), (0, 39, 8, 0), (1, 20, 0, 4), (1, 500, 0, 2)])
def test_score_and_evict(policy, budget, recent, sinks):
    g = torch.Generator().manual_seed(budget)
    B, Hkv, S = 3, 4, 600
    pos = torch.randperm(B * Hkv * S, generator=g).view(B, Hkv, S).to(torch.int32)
    pos[torch.rand(B, Hkv, S, generator=g) < 0.1] = reference.EMPTY
    scores = torch.rand(B, Hkv, S, generator=g).round(decimals=1)  # many exact ties
    probs = torch.zeros(B, Hkv, S)
    probs[1] = torch.rand(Hkv, S, generator=g)
    ref_scores, ref_pos = scores.clone(), pos.clone()
    ref_victim = reference.score_and_evict_(ref_scores, ref_pos, probs, policy, budget, recent, sinks)
    gpu_scores, gpu_pos = cuda(scores, pos)
    victim = ops.score_and_evict_(gpu_scores, gpu_pos, probs.cuda(), policy, budget, recent, sinks)
    assert torch.equal(victim.cpu(), ref_victim)
    assert torch.equal(gpu_pos.cpu(), ref_pos)
    assert_close_ratio(gpu_scores.cpu(), ref_scores, torch.float32, what="scores")


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,masked", [(1, True), (300, False), (300, True)])
def test_state_fold_and_update(dtype, N, masked):
    g = torch.Generator().manual_seed(N)
    B, Hkv, R, D = 2, 3, 8, 128
    psi = torch.rand(B, Hkv, N, R, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    mask = torch.rand(B, Hkv, N, generator=g) < 0.6 if masked else None
    ref_dH, ref_dz = reference.state_fold(psi, v, mask)
    dH, dz = ops.state_fold(*cuda(psi, v, mask))
    assert_close_ratio(dH.cpu(), ref_dH, torch.float32, what="dH")
    assert_close_ratio(dz.cpu(), ref_dz, torch.float32, what="dz")
    H, z = torch.randn(B, Hkv, R, D, generator=g), torch.rand(B, Hkv, R, generator=g)
    gpu_H, gpu_z = cuda(H, z)
    ops.state_update_(gpu_H, gpu_z, *cuda(psi, v, mask))
    assert_close_ratio(gpu_H.cpu(), H + ref_dH, torch.float32, what="H")
    assert_close_ratio(gpu_z.cpu(), z + ref_dz, torch.float32, what="z")


@needs_kernels
def test_decode_step_is_graph_capturable():
    """attend + score/evict + fold in one CUDA graph: no op synchronises with the host. Replays match eager."""
    B, Hkv, G, S, D, R = 2, 3, 3, 65, 64, 8
    q, k, v, pos, lowrank = decode_inputs(B, Hkv, G, S, D, R, torch.bfloat16, seed=0)
    q, k, v, pos, phi_q, H, z = cuda(q, k, v, pos, *lowrank)
    pos = pos.abs()  # all occupied: one eviction per row
    scores = torch.rand(B, Hkv, S, device="cuda")

    def step(scores, pos, H, z):
        _, probs = ops.decode_attention(q, k, v, pos, phi_q, H, z, 0.125)
        victim = ops.score_and_evict_(scores, pos, probs, 0, S - 1, 4, 0)
        slot = victim.clamp(min=0)[..., None, None]
        psi = torch.full((B, Hkv, 1, R), 0.5, device="cuda")
        ops.state_update_(H, z, psi, torch.gather(v, 2, slot.expand(-1, -1, 1, D)), (victim >= 0)[..., None])

    eager = [t.clone() for t in (scores, pos, H, z)]
    step(*eager)
    graphed = [t.clone() for t in (scores, pos, H, z)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture, as torch.cuda.graphs recommends
        step(*[t.clone() for t in (scores, pos, H, z)])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(*graphed)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b)


@needs_kernels
def test_opcheck():
    """Schema, fake (meta) kernels and autograd registration agree with the CUDA kernels."""
    q, k, v, pos, lowrank = decode_inputs(2, 2, 3, 33, 64, 4, torch.bfloat16, seed=1)
    q, k, v, pos, phi_q, H, z = cuda(q, k, v, pos, *lowrank)
    torch.library.opcheck(ops.decode_attention.default, (q, k, v, pos, phi_q, H, z, 0.125))
    scores = torch.rand(2, 2, 33, device="cuda")
    torch.library.opcheck(ops.score_and_evict_.default, (scores, pos.clone(), torch.rand_like(scores), 0, 20, 4, 0))
    psi = torch.rand(2, 2, 33, 4, device="cuda")
    torch.library.opcheck(ops.state_fold.default, (psi, v, pos >= 0))
    torch.library.opcheck(ops.state_update_.default, (H.clone(), z.clone(), psi, v, pos >= 0))
