"""The CUDA kernels (csrc/cuda/*.cu), executed on the CPU by the harness (csrc/testing), match less_cuda.reference.

This is the same source nvcc compiles, run through the same launch functions (dispatch, split-KV planning and
both kernels of the split path included); only the launch mechanism differs. What the harness cannot show (races,
timing, the GPU's fast-math rounding) is in csrc/testing/README.md; tests/test_cuda_gpu.py repeats the parity on a
real GPU where there is one.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close_ratio

from less_cuda import reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "csrc" / "testing"))
import harness_build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALAR_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
H100_SMS = 132

P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def ptr(t):
    if t is None:
        return None
    assert t.is_contiguous() and t.device.type == "cpu"
    return ctypes.c_void_p(t.data_ptr())


class HarnessOps:
    """The op signatures of less_cuda.reference, computed by the CUDA kernels in the harness."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.less_harness_decode_attention.argtypes = [P] * 9 + [I64] * 6 + [I32, F32, I32, I64, P]
        lib.less_harness_score_and_evict.argtypes = [P] * 4 + [I64, I64] + [I32] * 4
        lib.less_harness_state_fold.argtypes = [P] * 5 + [I64] * 4 + [I32, I32]
        self.last_plan = (0, 0)

    def decode_attention(self, q, k, v, pos, phi_q, H, z, scale, *, chunk=0, num_sms=H100_SMS):
        B, Hq, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        R = 0 if phi_q is None else phi_q.shape[-1]
        out = torch.empty_like(q)
        probs = torch.empty(B, Hkv, S, dtype=torch.float32)
        plan = torch.zeros(2, dtype=torch.int64)
        code = self.lib.less_harness_decode_attention(
            ptr(q), ptr(k), ptr(v), ptr(pos), ptr(phi_q), ptr(H), ptr(z), ptr(out), ptr(probs),
            B, Hq, Hkv, S, D, R, SCALAR_KIND[q.dtype], scale, num_sms, chunk, ptr(plan),
        )  # fmt: skip
        harness_build.check(self.lib, code)
        self.last_plan = tuple(plan.tolist())  # (chunks, head tiles)
        return out, probs

    def score_and_evict_(self, scores, pos, probs, policy, budget, recent, sinks):
        B, Hkv, S = scores.shape
        victim = torch.empty(B, Hkv, dtype=torch.int64)
        code = self.lib.less_harness_score_and_evict(
            ptr(scores), ptr(pos), ptr(probs), ptr(victim), B * Hkv, S, policy, budget, recent, sinks
        )
        harness_build.check(self.lib, code)
        return victim

    def _fold(self, H, z, psi, v, mask, accumulate):
        B, Hkv, N, R = psi.shape
        code = self.lib.less_harness_state_fold(
            ptr(psi), ptr(v), ptr(mask), ptr(H), ptr(z), B * Hkv, N, R, v.shape[-1], SCALAR_KIND[v.dtype], accumulate
        )
        harness_build.check(self.lib, code)

    def state_fold(self, psi, v, mask):
        B, Hkv, _, R = psi.shape
        dH = torch.empty(B, Hkv, R, v.shape[-1])
        dz = torch.empty(B, Hkv, R)
        self._fold(dH, dz, psi, v, mask, 0)
        return dH, dz

    def state_update_(self, H, z, psi, v, mask):
        self._fold(H, z, psi, v, mask, 1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ops():
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + [ROOT / "csrc" / "testing" / "kernel_entry_points.cpp"]
    lib = harness_build.load("kernels", sources)
    harness_build.set_schedule(lib, "forward")
    return HarnessOps(lib)


def decode_inputs(B, Hkv, G, S, D, R, dtype, seed, empty_frac=0.25):
    """Random decode inputs with free slots (pos -1, garbage K/V) and, for b = 0, h = 0, no occupied slot at all."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, S, D, generator=g) * 1.5).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    pos = torch.randperm(B * Hkv * S, generator=g).view(B, Hkv, S).to(torch.int32)
    pos[torch.rand(B, Hkv, S, generator=g) < empty_frac] = reference.EMPTY
    if S:
        pos[0, 0] = reference.EMPTY
    lowrank = None
    if R:
        phi_q = torch.rand(B, Hkv * G, R, generator=g)
        H = torch.randn(B, Hkv, R, D, generator=g) * 3
        z = torch.rand(B, Hkv, R, generator=g) * 4
        lowrank = (phi_q, H, z)
    return q, k, v, pos, lowrank


def check_decode(ops, q, k, v, pos, lowrank, **plan):
    scale = q.shape[-1] ** -0.5
    state = lowrank or (None, None, None)
    out, probs = ops.decode_attention(q, k, v, pos, *state, scale, **plan)
    ref_out, ref_probs = reference.decode_attention(q, k, v, pos, *state, scale)
    assert_close_ratio(out, ref_out, what="out")
    assert_close_ratio(probs, ref_probs, torch.float32, what="probs")
    assert torch.all(probs[pos < 0] == 0)
    return out, probs


@pytest.mark.parametrize("path", ["one chunk", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 3, 4, 8, 12])
def test_decode_attention_matches_reference(ops, G, D, dtype, path):
    """GQA groups up to a block's 8 heads and beyond (12: two head tiles, always the split path); free slots and
    one (b, h) with none occupied (the output is then the low-rank state alone)."""
    q, k, v, pos, lowrank = decode_inputs(B=2, Hkv=2, G=G, S=37, D=D, R=5, dtype=dtype, seed=G * 1000 + D)
    chunk = 16 if path == "split" else 0
    check_decode(ops, q, k, v, pos, lowrank, chunk=chunk, num_sms=1)
    chunks, tiles = ops.last_plan
    assert tiles == (G + 7) // 8
    assert chunks == (3 if path == "split" else 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [0, 8])
def test_decode_attention_sparse_only(ops, dtype, chunk):
    q, k, v, pos, _ = decode_inputs(B=2, Hkv=3, G=3, S=29, D=64, R=0, dtype=dtype, seed=7)
    check_decode(ops, q, k, v, pos, None, chunk=chunk, num_sms=1)
    out, _ = ops.decode_attention(q, k, v, pos, None, None, None, 0.125, chunk=chunk, num_sms=1)
    assert torch.all(out[0, :3] == 0)  # no occupied slot and no state: exactly zero


@pytest.mark.parametrize("B,Hkv,S,expect_split", [(1, 3, 300, True), (8, 3, 300, True), (64, 3, 300, False)])
def test_split_heuristic(ops, B, Hkv, S, expect_split):
    """The heuristic splits when B * Hkv blocks leave an H100's SMs idle, into chunks of >= 128 slots."""
    q, k, v, pos, lowrank = decode_inputs(B=B, Hkv=Hkv, G=3, S=S, D=64, R=4, dtype=torch.bfloat16, seed=B)
    check_decode(ops, q, k, v, pos, lowrank, chunk=0, num_sms=H100_SMS)
    chunks, _ = ops.last_plan
    assert (chunks > 1) == expect_split
    assert chunks <= -(-S // 128)


def test_decode_attention_without_slots(ops):
    q, k, v, pos, lowrank = decode_inputs(B=2, Hkv=2, G=2, S=0, D=128, R=3, dtype=torch.float32, seed=3)
    out, _ = check_decode(ops, q, k, v, pos, lowrank)
    phi_q, H, z = lowrank
    o_lr, _ = reference.lowrank_state(phi_q.view(2, 2, 2, 3), H, z)
    assert_close_ratio(out, o_lr.reshape(2, 4, 128))


@pytest.mark.parametrize("schedule", ["reverse", "random"])
def test_decode_attention_does_not_depend_on_thread_order(ops, schedule):
    """Threads and blocks run in another order: results are bit-identical (no order-dependent races between
    barriers, deterministic reductions)."""
    q, k, v, pos, lowrank = decode_inputs(B=2, Hkv=2, G=4, S=45, D=128, R=4, dtype=torch.float16, seed=11)
    for chunk in (0, 16):
        harness_build.set_schedule(ops.lib, "forward")
        want = ops.decode_attention(q, k, v, pos, *lowrank, 0.1, chunk=chunk, num_sms=1)
        harness_build.set_schedule(ops.lib, schedule, seed=5)
        got = ops.decode_attention(q, k, v, pos, *lowrank, 0.1, chunk=chunk, num_sms=1)
        harness_build.set_schedule(ops.lib, "forward")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------------------------
# (a) score_and_evict_
# ---------------------------------------------------------------------------------------------------------------
def check_evict(ops, scores, pos, probs, policy, budget, recent, sinks):
    ref_scores, ref_pos = scores.clone(), pos.clone()
    victim = ops.score_and_evict_(scores, pos, probs, policy, budget, recent, sinks)
    ref_victim = reference.score_and_evict_(ref_scores, ref_pos, probs, policy, budget, recent, sinks)
    assert torch.equal(victim, ref_victim)
    assert torch.equal(pos, ref_pos)
    assert_close_ratio(scores, ref_scores, torch.float32, what="scores")
    return victim


@pytest.mark.parametrize("S", [40, 600])
@pytest.mark.parametrize("policy,budget,recent,sinks", [(0, 20, 4, 0), (0, 39, 8, 0), (1, 20, 0, 4), (1, 300, 0, 2)])
def test_score_and_evict_matches_reference(ops, S, policy, budget, recent, sinks):
    g = torch.Generator().manual_seed(S + budget)
    B, Hkv = 2, 3
    pos = torch.randperm(B * Hkv * S, generator=g).view(B, Hkv, S).to(torch.int32)
    pos[torch.rand(B, Hkv, S, generator=g) < 0.1] = reference.EMPTY
    pos[1, 2, : S - 5] = reference.EMPTY  # a row at or under budget: nothing to evict
    scores = torch.rand(B, Hkv, S, generator=g) * 5
    probs = torch.rand(B, Hkv, S, generator=g)
    victim = check_evict(ops, scores, pos, probs, policy, budget, recent, sinks)
    assert victim[1, 2] == -1


@pytest.mark.parametrize("policy", [0, 1])
def test_score_and_evict_exact_ties_go_to_the_lowest_slot(ops, policy):
    """Equal keys in slots handled by different threads and warps: the victim is torch.argmin's (lowest slot)."""
    B, Hkv, S = 1, 4, 700
    pos = torch.arange(S, dtype=torch.int32).repeat(B, Hkv, 1).contiguous()
    scores = torch.full((B, Hkv, S), 3.0)
    scores[0, 1, [5, 300, 650]] = 1.0  # three-way tie across warps
    scores[0, 2, [299, 555]] = 0.5  # tie with the lower slot in a later thread's stride
    probs = torch.zeros(B, Hkv, S)  # adds exact zeros: ties stay exact
    if policy == 1:
        pos[0, 1] = torch.randperm(S, dtype=torch.int32)  # Λ keys are positions: the oldest non-sink
    victim = check_evict(ops, scores, pos, probs, policy, budget=S - 10, recent=3, sinks=2)
    if policy == 0:
        assert victim[0].tolist() == [0, 5, 299, 0]


def test_score_and_evict_when_nothing_is_evictable(ops):
    """Over budget but every occupied slot protected (recent window / sinks): no victim."""
    S = 12
    pos = torch.tensor([[[0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, 9]]], dtype=torch.int32)
    for policy, recent, sinks in [(0, 10, 0), (1, 0, 10)]:
        check_evict(ops, torch.rand(1, 1, S), pos.clone(), torch.rand(1, 1, S), policy, 9, recent, sinks)
        victim = ops.score_and_evict_(torch.rand(1, 1, S), pos.clone(), torch.rand(1, 1, S), policy, 9, recent, sinks)
        assert victim.item() == -1


# ---------------------------------------------------------------------------------------------------------------
# (b) state_fold / state_update_
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,R,D", [(1, 8, 64), (5, 13, 128), (70, 4, 100)])
@pytest.mark.parametrize("masked", [False, True])
def test_state_fold_and_update_match_reference(ops, dtype, N, R, D, masked):
    g = torch.Generator().manual_seed(N * R + D)
    B, Hkv = 2, 3
    psi = torch.rand(B, Hkv, N, R, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    mask = torch.rand(B, Hkv, N, generator=g) < 0.6 if masked else None
    dH, dz = ops.state_fold(psi, v, mask)
    ref_dH, ref_dz = reference.state_fold(psi, v, mask)
    assert_close_ratio(dH, ref_dH, torch.float32, what="dH")
    assert_close_ratio(dz, ref_dz, torch.float32, what="dz")
    H, z = torch.randn(B, Hkv, R, D, generator=g), torch.rand(B, Hkv, R, generator=g)
    ref_H, ref_z = H + ref_dH, z + ref_dz
    ops.state_update_(H, z, psi, v, mask)
    assert_close_ratio(H, ref_H, torch.float32, what="H")
    assert_close_ratio(z, ref_z, torch.float32, what="z")


def test_state_fold_of_no_tokens_is_zero(ops):
    dH, dz = ops.state_fold(torch.rand(1, 2, 0, 3), torch.randn(1, 2, 0, 64), None)
    assert torch.equal(dH, torch.zeros(1, 2, 3, 64)) and torch.equal(dz, torch.zeros(1, 2, 3))


# ---------------------------------------------------------------------------------------------------------------
# The fixed-slot stream, step by step
# ---------------------------------------------------------------------------------------------------------------
def harness_decode_step(ops, cache, q, k, v, phi_q, psi_k, position, scale, policy, budget, recent, sinks, chunk):
    """reference.decode_step with the three kernels in place of the reference ops."""
    reference.insert_token(cache, k, v, psi_k, position)
    out, probs = ops.decode_attention(q, cache.k, cache.v, cache.pos, phi_q, cache.H, cache.z, scale, chunk=chunk)
    victim = ops.score_and_evict_(cache.scores, cache.pos, probs, policy, budget, recent, sinks)
    ops.state_update_(cache.H, cache.z, *reference.victim_tokens(cache, victim))
    return out


@pytest.mark.parametrize("policy,dtype,chunk", [(0, torch.bfloat16, 0), (0, torch.float32, 8), (1, torch.float16, 8)])
def test_stream_of_decode_steps(ops, policy, dtype, chunk):
    """300 steps: insert, attend (with the state), score, evict, fold. Each step starts both implementations from
    the kernels' state and compares everything the step produces, so tiny float differences cannot snowball."""
    B, Hkv, G, D, R, budget, steps = 2, 2, 3, 64, 6, 16, 300
    recent, sinks = (4, 0) if policy == 0 else (0, 3)
    g = torch.Generator().manual_seed(policy * 10 + chunk)
    cache = reference.SlotCache.empty(B, Hkv, budget + 1, D, R, dtype)
    scale = D**-0.5
    for t in range(steps):
        q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
        k = torch.randn(B, Hkv, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, D, generator=g).to(dtype)
        phi_q = torch.rand(B, Hkv * G, R, generator=g)
        psi_k = torch.rand(B, Hkv, R, generator=g)
        position = torch.full((B,), t, dtype=torch.int32)
        ref_cache = reference.SlotCache(*(x.clone() for x in vars(cache).values()))
        args = (q, k, v, phi_q, psi_k, position, scale, policy, budget, recent, sinks)
        ref_out = reference.decode_step(ref_cache, *args)
        out = harness_decode_step(ops, cache, *args, chunk)
        assert_close_ratio(out, ref_out, what=f"out at step {t}")
        assert torch.equal(cache.pos, ref_cache.pos), f"victims differ at step {t}"
        assert_close_ratio(cache.scores, ref_cache.scores, torch.float32, what=f"scores at step {t}")
        assert_close_ratio(cache.H, ref_cache.H, torch.float32, what=f"H at step {t}")
        assert_close_ratio(cache.z, ref_cache.z, torch.float32, what=f"z at step {t}")
    assert (cache.pos >= 0).sum(dim=-1).eq(budget).all()
