"""The CUDA ops on a real GPU (torch.ops.less_cuda.* on cuda tensors) match less_cuda.reference; skipped where there
is no GPU. tests/test_cuda_kernels.py runs the same kernel source on the CPU through the harness everywhere.

One test runs everywhere: the extension either registers all five CUDA kernels or none, and has them when it must
(LESS_CUDA_EXPECT_CUDA=1, set by CI's CUDA build).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close_ratio, clone_cache, reference_steps

import less_cuda  # noqa: F401  (loads the op registrations)
from less_cuda.core import ops as less_ops
from less_cuda.core import reference
from less_cuda.core import state as slots
from op_inputs import harness_decode_inputs, step_inputs

OPS = ["decode_attention", "score_and_evict_", "state_fold", "state_update_", "decode_step_"]
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
    not (torch.cuda.is_available() and all(has_cuda_kernel(op) for op in OPS)),
    reason="no CUDA device (the kernels run in the CPU harness only), or the extension has no CUDA kernels",
)
needs_two_gpus = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2), reason="needs two CUDA devices"
)


def cuda(*tensors):
    return [t.cuda() if t is not None else None for t in tensors]


# The long-row regime ("tiles", 4097 slots per row) is kept small: bf16, G <= 4, D <= 128 cover its loop.
ATTENTION_CASES = [
    (G, D, dtype, regime)
    for regime in ("one chunk", "tiles", "split")
    for dtype in DTYPES
    for D in (64, 128, 256, 96, 100)
    for G in (1, 3, 4, 8, 12)
    if regime != "tiles" or (G <= 4 and D <= 128 and dtype == torch.bfloat16)
]


@needs_kernels
@pytest.mark.parametrize("G,D,dtype,regime", ATTENTION_CASES)
def test_decode_attention(G, D, dtype, regime):
    """'one chunk': enough (batch, KV head) blocks to fill the GPU; 'tiles': 136 rows (as many as an H100's or
    H200's SMs, and more), each block walking 4097 slots in shared-memory tiles; 'split': two rows of 300 slots,
    which the heuristic splits into chunks merged by the combine kernel. D = 96 takes the D = 128 vectorised
    instance, D = 100 (fp16 / bf16 rows of 200 bytes) the generic path."""
    B, Hkv, S = {"one chunk": (48, 4, 40), "tiles": (34, 4, 4097), "split": (1, 2, 300)}[regime]
    q, k, v, pos, lowrank = harness_decode_inputs(B, Hkv, G, S, D, R=8, dtype=dtype, seed=G * 1000 + D)
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
    q, k, v, pos, lowrank = harness_decode_inputs(B, Hkv, G, S, D, R, torch.bfloat16, seed=0)
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


def to_device(cache, device="cuda"):
    return slots.SlotCache(*(x.to(device) for x in vars(cache).values()))


def assert_same_cache(cache, expected, what=""):
    """Bookkeeping exactly equal; numbers within the dtype's ratio tolerance (the GPU's exp and summation order differ
    from the CPU's in the last bits)."""
    cache = to_device(cache, "cpu")
    assert torch.equal(cache.pos, expected.pos), f"{what}positions (victims) differ"
    assert torch.equal(cache.next_position, expected.next_position), f"{what}next positions differ"
    for name in ("k", "v", "psi"):
        assert torch.equal(getattr(cache, name), getattr(expected, name)), f"{what}{name} slots differ"
    assert_close_ratio(cache.scores, expected.scores, torch.float32, what=f"{what}scores")
    assert_close_ratio(cache.H, expected.H, torch.float32, what=f"{what}H")
    assert_close_ratio(cache.z, expected.z, torch.float32, what=f"{what}z")


def gpu_step(cache, q, k, v, phi, psi, valid, policy, budget, recent, sinks, device="cuda"):
    args = [None if t is None else t.to(device) for t in (q, k, v, phi, psi, valid)]
    return less_ops.less_decode_step_(cache, *args, policy, budget, recent, sinks, scale=q.shape[-1] ** -0.5)


@needs_kernels
@pytest.mark.parametrize("regime", ["single", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128, 256, 96])
@pytest.mark.parametrize("G", [1, 3, 4, 8, 12])
def test_decode_step(G, D, dtype, regime):
    """The fused step against reference.decode_step. 'single': enough (batch, KV head) rows to fill the GPU, one
    launch; 'split': two rows of 300 slots, chunk kernel + finishing kernel (G = 12 always splits). Both policies,
    with and without a low-rank state; a row with no free slot; a pad token."""
    B, Hkv, S = (48, 4, 40) if regime == "single" else (1, 2, 300)
    for R, policy, recent, sinks in [(8, reference.H2O, 4, 0), (0, reference.LAMBDA, 0, 3)]:
        cache, q, k, v, phi, psi, valid = step_inputs(
            B, Hkv, G, S, D, R, dtype, seed=G * 100 + D + R, full={(0, 0)}, pad=(1,) if B > 1 else ()
        )
        expected = clone_cache(cache)
        ref_out = reference_steps(expected, q, k, v, phi, psi, valid, D**-0.5, policy, S - 1, recent, sinks)
        gpu = to_device(cache)
        out = gpu_step(gpu, q, k, v, phi, psi, valid, policy, S - 1, recent, sinks)
        assert_close_ratio(out.cpu(), ref_out, what=f"R={R}: out")
        assert_same_cache(gpu, expected, what=f"R={R}: ")


@needs_kernels
@pytest.mark.parametrize("regime", ["single", "split"])
def test_decode_step_multi_token_call(regime):
    """Three tokens per call, stepped in turn, a pad among them: next_position advances on the device."""
    B, Hkv, G, S, D, R, T = (48, 4, 4, 40, 128, 8, 3) if regime == "single" else (1, 2, 4, 300, 128, 8, 3)
    cache, *_ = step_inputs(B, Hkv, G, S, D, R, torch.bfloat16, seed=T)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hkv * G, T, D, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(B, Hkv, T, D, generator=g).to(torch.bfloat16) for _ in range(2))
    phi, psi = torch.rand(B, Hkv * G, T, R, generator=g), torch.rand(B, Hkv, T, R, generator=g)
    valid = torch.rand(B, T, generator=g) > 0.3
    expected = clone_cache(cache)
    ref_out = reference_steps(expected, q, k, v, phi, psi, valid, D**-0.5, reference.H2O, S - 1, 4, 0)
    gpu = to_device(cache)
    out = gpu_step(gpu, q, k, v, phi, psi, valid, reference.H2O, S - 1, 4, 0)
    assert_close_ratio(out.cpu(), ref_out, what="out")
    assert_same_cache(gpu, expected)


@needs_kernels
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("regime", ["single", "split"])
def test_decode_step_in_a_cuda_graph(regime, T):
    """A whole decode step captured in a CUDA graph: 'single' has a (batch, KV head) row per SM and more (one launch
    per token), 'split' is B = 1, Hkv = 8, G = 4, D = 128, S = 4096 (chunk kernel + finishing kernel); T tokens per
    call. No host synchronisation, workspace from the graph's pool. Two replays equal two eager steps bit for bit
    (next_position advances on the device each time)."""
    Hkv, G, D, R = 8, 4, 128, 8
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    B, S = (-(-sms // Hkv), 300) if regime == "single" else (1, 4096)
    cache, *_ = step_inputs(B, Hkv, G, S, D, R, torch.bfloat16, seed=0)
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, Hkv * G, T, D, generator=g).to(torch.bfloat16).cuda()
    k, v = (torch.randn(B, Hkv, T, D, generator=g).to(torch.bfloat16).cuda() for _ in range(2))
    phi, psi = torch.rand(B, Hkv * G, T, R, generator=g).cuda(), torch.rand(B, Hkv, T, R, generator=g).cuda()
    eager, graphed = to_device(cache), to_device(cache)

    def step(c):
        return less_ops.less_decode_step_(c, q, k, v, phi, psi, None, "h2o", S - 1, recent=64)

    eager_outs = [step(eager).clone() for _ in range(2)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture, on a throwaway copy
        step(to_device(cache))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step(graphed)
    graphed_outs = []
    for _ in range(2):
        graph.replay()
        graphed_outs.append(graph_out.clone())
    torch.cuda.synchronize()
    for a, b in zip(graphed_outs, eager_outs):
        assert torch.equal(a, b)
    for a, b in zip(vars(graphed).values(), vars(eager).values()):
        assert torch.equal(a, b)
    assert torch.equal(graphed.next_position.cpu(), cache.next_position + 2 * T)


@needs_kernels
def test_decode_step_near_tie_evicts_as_the_cpu_path():
    """tests/test_cuda_kernels.py's near-tie (two scores 32 ulps apart, which --use_fast_math's exp would tie): the
    victim of the reference and the CPU op."""
    from test_cuda_kernels import near_tie_step

    cache, args = near_tie_step()
    ref, cpu = clone_cache(cache), clone_cache(cache)
    reference_steps(ref, *args)
    less_ops.less_decode_step_(cpu, *args[:6], "h2o", *args[8:], scale=args[6])
    gpu = to_device(cache)
    less_ops.less_decode_step_(gpu, *(t.cuda() if t is not None else None for t in args[:6]), "h2o", *args[8:],
                               scale=args[6])
    assert torch.equal(gpu.pos.cpu(), ref.pos) and torch.equal(cpu.pos, ref.pos)


@needs_kernels
def test_decode_step_next_position_limit():
    """next_position = 2^24 - T is the last start that fits: positions up to 2^24 - 1 as on the CPU, next_position
    2^24 after. A call from 2^24 must stop with a launch failure instead of
    handing out positions from 0 again; it runs in a subprocess, since a trapped kernel ends the process's CUDA
    context."""
    limit, T = 1 << 24, 3
    cache, q, k, v, phi, psi, _ = step_inputs(2, 4, 2, 40, 128, 8, torch.bfloat16, seed=5)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, T, 128, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 4, T, 128, generator=g).to(torch.bfloat16) for _ in range(2))
    phi, psi = torch.rand(2, 8, T, 8, generator=g), torch.rand(2, 4, T, 8, generator=g)
    cache.next_position.fill_(limit - T)
    expected = clone_cache(cache)
    reference_steps(expected, q, k, v, phi, psi, None, 128**-0.5, reference.LAMBDA, 39, 0, 2)
    gpu = to_device(cache)
    gpu_step(gpu, q, k, v, phi, psi, None, reference.LAMBDA, 39, 0, 2)
    assert_same_cache(gpu, expected)
    assert gpu.next_position.tolist() == [limit, limit]
    script = textwrap.dedent(f"""
        import torch
        import less_cuda  # noqa: F401
        from less_cuda.core import ops
        from less_cuda.core.state import SlotCache
        cache = SlotCache.empty(1, 4, 40, 128, 0, torch.bfloat16, device="cuda")
        cache.next_position.fill_({limit})
        q = torch.randn(1, 8, 1, 128, device="cuda").to(torch.bfloat16)
        k, v = (torch.randn(1, 4, 1, 128, device="cuda").to(torch.bfloat16) for _ in range(2))
        ops.less_decode_step_(cache, q, k, v, None, None, None, "lambda", 39, sinks=2)
        torch.cuda.synchronize()
        print("no error")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no error" not in done.stdout, done.stdout + done.stderr
    # The kernel's printf before its __trap says why; CUDA does not promise to flush it after a trap, so only the
    # failure itself is required.
    assert "CUDA error" in done.stderr, done.stdout + done.stderr


@needs_kernels
@pytest.mark.parametrize("regime", ["single", "split"])
def test_decode_step_runs_twice_bit_identically(regime):
    """No atomics in the arithmetic, fixed reduction orders: the same step twice gives the same bits."""
    B, Hkv, S = (48, 4, 40) if regime == "single" else (1, 2, 300)
    cache, *token = step_inputs(B, Hkv, 4, S, 128, 8, torch.float16, seed=7, pad=(1,) if B > 1 else ())
    runs = []
    for _ in range(2):
        gpu = to_device(cache)
        out = gpu_step(gpu, *token, reference.H2O, S - 1, 4, 0)
        runs.append([out, *vars(gpu).values()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@needs_kernels
@needs_two_gpus
def test_ops_on_the_second_gpu_while_the_first_is_current():
    """Tensors on cuda:1 with device 0 current: the ops guard the tensors' device and launch on its stream."""
    torch.cuda.set_device(0)
    cache, *token = step_inputs(1, 2, 4, 300, 128, 8, torch.bfloat16, seed=3)
    expected = clone_cache(cache)
    ref_out = reference_steps(expected, *token, 128**-0.5, reference.H2O, 299, 4, 0)
    gpu = to_device(cache, "cuda:1")
    out = gpu_step(gpu, *token, reference.H2O, 299, 4, 0, device="cuda:1")
    assert out.device == torch.device("cuda:1")
    assert_close_ratio(out.cpu(), ref_out, what="out")
    assert_same_cache(gpu, expected)
    q, k, v, pos, lowrank = harness_decode_inputs(1, 2, 4, 300, 96, R=4, dtype=torch.float16, seed=1)
    out, probs = ops.decode_attention(*[t.to("cuda:1") for t in (q, k, v, pos, *lowrank)], 0.1)
    ref_out, ref_probs = reference.decode_attention(q, k, v, pos, *lowrank, 0.1)
    assert_close_ratio(out.cpu(), ref_out, what="decode_attention out")
    assert_close_ratio(probs.cpu(), ref_probs, torch.float32, what="decode_attention probs")
    assert torch.cuda.current_device() == 0


@needs_kernels
def test_opcheck():
    """Schema, fake (meta) kernels and autograd registration agree with the CUDA kernels."""
    q, k, v, pos, lowrank = harness_decode_inputs(2, 2, 3, 33, 64, 4, torch.bfloat16, seed=1)
    q, k, v, pos, phi_q, H, z = cuda(q, k, v, pos, *lowrank)
    torch.library.opcheck(ops.decode_attention.default, (q, k, v, pos, phi_q, H, z, 0.125))
    scores = torch.rand(2, 2, 33, device="cuda")
    torch.library.opcheck(ops.score_and_evict_.default, (scores, pos.clone(), torch.rand_like(scores), 0, 20, 4, 0))
    psi = torch.rand(2, 2, 33, 4, device="cuda")
    torch.library.opcheck(ops.state_fold.default, (psi, v, pos >= 0))
    torch.library.opcheck(ops.state_update_.default, (H.clone(), z.clone(), psi, v, pos >= 0))
    cache, tq, tk, tv, tphi, tpsi, _ = step_inputs(2, 2, 2, 9, 64, 4, torch.float32, seed=5)
    token = [t[:, :, None].cuda() for t in (tq, tk, tv, tphi, tpsi)]
    for valid in (None, torch.tensor([[True], [False]], device="cuda")):
        args = (*vars(to_device(cache)).values(), *token, valid, 0.125, reference.H2O, 8, 4, 0)
        torch.library.opcheck(ops.decode_step_.default, args)
