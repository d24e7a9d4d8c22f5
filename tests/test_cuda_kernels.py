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
from helpers import assert_close_ratio, assert_same_step, clone_cache, reference_steps

from less_cuda.core import ops as less_ops
from less_cuda.core import reference

from less_cuda.core import state as slots

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "csrc" / "testing"))
import harness_build  # noqa: E402
from op_inputs import harness_decode_inputs, step_inputs

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


def row_ptr(t):
    """A state tensor [N, ...] whose rows are contiguous but may be a stride apart (a pool laid out in pages)."""
    assert t.device.type == "cpu" and (t.shape[0] == 0 or t[0].is_contiguous())
    return ctypes.c_void_p(t.data_ptr())


PLAN_FIELDS = ("chunks", "head_tiles", "tile", "tiles", "split", "p_in_workspace", "vectorized")


class HarnessOps:
    """The op signatures of less_cuda.reference, computed by the CUDA kernels in the harness."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.less_harness_decode_attention.argtypes = [P] * 9 + [I64] * 6 + [I32, F32, I32, I64, I64, P]
        lib.less_harness_decode_step.argtypes = (
            [P] * 15 + [I64] * 7 + [I32, F32] + [I32] * 4 + [P, I64, P] + [I32, I64, I64, P]
        )
        lib.less_harness_score_and_evict.argtypes = [P] * 4 + [I64, I64] + [I32] * 4
        lib.less_harness_state_fold.argtypes = [P] * 5 + [I64] * 4 + [I32, I32]
        self.last_plan: dict = {}

    def _plan(self, plan):
        self.last_plan = dict(zip(PLAN_FIELDS, plan.tolist()))

    def set_occupancy(self, blocks_per_sm: int):
        """What the planner's occupancy query answers (a GPU answers from the compiled kernel)."""
        self.lib.less_harness_set_occupancy(blocks_per_sm)

    def decode_attention(self, q, k, v, pos, phi_q, H, z, scale, *, chunk=0, tile=0, num_sms=H100_SMS):
        B, Hq, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        R = 0 if phi_q is None else phi_q.shape[-1]
        out = torch.empty_like(q)
        probs = torch.empty(B, Hkv, S, dtype=torch.float32)
        plan = torch.zeros(len(PLAN_FIELDS), dtype=torch.int64)
        code = self.lib.less_harness_decode_attention(
            ptr(q), ptr(k), ptr(v), ptr(pos), ptr(phi_q), ptr(H), ptr(z), ptr(out), ptr(probs),
            B, Hq, Hkv, S, D, R, SCALAR_KIND[q.dtype], scale, num_sms, chunk, tile, ptr(plan),
        )  # fmt: skip
        harness_build.check(self.lib, code)
        self._plan(plan)
        return out, probs

    def decode_step_(self, cache, q, k, v, phi_q, psi_k, valid, scale, policy, budget, recent, sinks, *,
                     state_rows=None, chunk=0, tile=0, num_sms=H100_SMS):
        """ops.less_decode_step_'s signature, in place on `cache` (a SlotCache, next_position included): q [B, Hq, T, D]
        or [B, Hq, D] for one token, and so on; valid [B, T] / [B] or None. state_rows [B] int64: `cache` is a pool of
        N rows (each field's rows contiguous, a stride apart) and batch row b updates row state_rows[b]."""
        single = q.dim() == 3
        if single:
            q, k, v = q[:, :, None], k[:, :, None], v[:, :, None]
            phi_q, psi_k = (None if x is None else x[:, :, None] for x in (phi_q, psi_k))
            valid = None if valid is None else valid[:, None]
        q, k, v, phi_q, psi_k, valid = (None if x is None else x.contiguous() for x in (q, k, v, phi_q, psi_k, valid))
        B, Hq, T, D = q.shape
        Hkv, S, R = cache.k.shape[1], cache.k.shape[2], cache.psi.shape[-1]
        state = [cache.k, cache.v, cache.psi, cache.pos, cache.scores, cache.H, cache.z, cache.next_position]
        strides = torch.tensor([t.stride(0) for t in state], dtype=torch.int64)
        out = torch.empty_like(q)
        plan = torch.zeros(len(PLAN_FIELDS), dtype=torch.int64)
        code = self.lib.less_harness_decode_step(
            *map(row_ptr, state), ptr(q), ptr(k), ptr(v), ptr(phi_q), ptr(psi_k), ptr(valid), ptr(out), B, Hq, Hkv,
            S, D, R, T, SCALAR_KIND[q.dtype], scale, policy, budget, recent, sinks, ptr(state_rows),
            cache.k.shape[0], ptr(strides), num_sms, chunk, tile, ptr(plan),
        )  # fmt: skip
        harness_build.check(self.lib, code)
        self._plan(plan)
        return out[:, :, 0] if single else out

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


KERNEL_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + [ROOT / "csrc" / "testing" / "kernel_entry_points.cpp"]


@pytest.fixture(scope="module")
def ops():
    lib = harness_build.load("kernels", KERNEL_SOURCES)
    harness_build.set_schedule(lib, "forward")
    return HarnessOps(lib)


def check_decode(ops, q, k, v, pos, lowrank, **plan):
    scale = q.shape[-1] ** -0.5
    state = lowrank or (None, None, None)
    out, probs = ops.decode_attention(q, k, v, pos, *state, scale, **plan)
    ref_out, ref_probs = reference.decode_attention(q, k, v, pos, *state, scale)
    assert_close_ratio(out, ref_out, what="out")
    assert_close_ratio(probs, ref_probs, torch.float32, what="probs")
    assert torch.all(probs[pos < 0] == 0)
    return out, probs


def kernel_grid(paths: dict):
    """The grid both attention kernels are checked over: GQA groups G up to a block's 4 and 8 heads (the two
    instances) and beyond (12), head dims of the three vectorised instances (64, 128, 256) and one that fills only
    part of its instance's row (96 in the 128 one), every dtype, and each launch path."""
    grid = [pytest.mark.parametrize("G", [1, 3, 4, 8, 12]), pytest.mark.parametrize("D", [64, 128, 256, 96]),
            pytest.mark.parametrize("dtype", DTYPES, ids=str), pytest.mark.parametrize("path", list(paths))]

    def decorate(test):
        for mark in grid:  # innermost first, as stacked decorators apply
            test = mark(test)
        return test

    return decorate


# Plan overrides that reach each path with small shapes: one block per row and one shared-memory tile; one block
# walking several tiles (p through the workspace); several chunks merged by the combine kernel.
PATHS = {"one chunk": dict(chunk=0, num_sms=1), "tiles": dict(chunk=0, tile=8, num_sms=1), "split": dict(chunk=16)}


@kernel_grid(PATHS)
def test_decode_attention_matches_reference(ops, G, D, dtype, path):
    """GQA groups up to a block's 8 heads and beyond (12: two head tiles, always the split path); head_dim 96 in the
    128 instance; free slots and one (b, h) with none occupied (the output is then the low-rank state alone)."""
    q, k, v, pos, lowrank = harness_decode_inputs(B=2, Hkv=2, G=G, S=37, D=D, R=5, dtype=dtype, seed=G * 1000 + D)
    check_decode(ops, q, k, v, pos, lowrank, **PATHS[path])
    plan = ops.last_plan
    assert plan["head_tiles"] == (G + 7) // 8
    assert plan["chunks"] == (3 if path == "split" else 1)
    assert plan["tiles"] == {"one chunk": 1, "tiles": 5, "split": 3}[path]
    assert plan["split"] == (path == "split" or G > 8)
    assert plan["vectorized"]


# Rows that are not whole 16-byte vectors.
GENERIC_DIMS = [(98, torch.bfloat16), (100, torch.float16), (9, torch.float32), (250, torch.float32)]


@pytest.mark.parametrize("D,dtype", GENERIC_DIMS)
@pytest.mark.parametrize("G", [3, 8])
@pytest.mark.parametrize("path", ["one chunk", "split"])
def test_decode_attention_generic_head_dims(ops, D, dtype, G, path):
    """Any head_dim up to 256 runs (element loads, a warp per row), never an error."""
    q, k, v, pos, lowrank = harness_decode_inputs(B=2, Hkv=2, G=G, S=37, D=D, R=4, dtype=dtype, seed=D)
    check_decode(ops, q, k, v, pos, lowrank, **PATHS[path])
    assert not ops.last_plan["vectorized"]


# Each instance (D = 64, 128, 256) and each dtype at least once.
PARTIAL_VECTOR_DIMS = [(8, torch.float32), (32, torch.bfloat16), (80, torch.bfloat16), (112, torch.float16),
                       (160, torch.float32), (192, torch.bfloat16)]


@pytest.mark.parametrize("D,dtype", PARTIAL_VECTOR_DIMS)
def test_partial_vector_rows_take_the_vectorised_path(ops, D, dtype):
    """Rows of whole 16-byte vectors shorter than their instance's (8, 32 in the D = 64 one; 80, 112 in 128; 160,
    192 in 256) load 16 bytes at a time on the lanes their vectors fall to; the other lanes' columns count as zero.
    Both ops, one-chunk and split paths."""
    q, k, v, pos, lowrank = harness_decode_inputs(B=2, Hkv=2, G=3, S=37, D=D, R=4, dtype=dtype, seed=D)
    for path in ("one chunk", "split"):
        check_decode(ops, q, k, v, pos, lowrank, **PATHS[path])
        assert ops.last_plan["vectorized"]
        inputs = step_inputs(2, 2, 3, 21, D, 4, dtype, seed=D, full={(1, 1)}, pad=(1,))
        check_step(ops, *inputs, reference.H2O, 20, 4, 0, **STEP_PATHS["single" if path == "one chunk" else path])
        assert ops.last_plan["vectorized"]


def test_decode_attention_unaligned_rows_take_the_generic_path(ops):
    """K and V that do not start on 16 bytes (a view at an odd element offset) cannot use 16-byte loads."""
    q, k, v, pos, lowrank = harness_decode_inputs(B=2, Hkv=2, G=4, S=37, D=128, R=4, dtype=torch.bfloat16, seed=5)
    shifted = [torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape).copy_(x) for x in (k, v)]
    check_decode(ops, q, *shifted, pos, lowrank, chunk=0, num_sms=1)
    assert not ops.last_plan["vectorized"]
    check_decode(ops, q, k, v, pos, lowrank, chunk=0, num_sms=1)
    assert ops.last_plan["vectorized"]


def test_decode_attention_long_chunk_is_not_split(ops):
    """S = 4097 slots at B = 64 fill the GPU's blocks: no split, one block walks its row in shared-memory tiles."""
    q, k, v, pos, lowrank = harness_decode_inputs(B=64, Hkv=1, G=4, S=4097, D=64, R=4, dtype=torch.bfloat16, seed=9)
    check_decode(ops, q, k, v, pos, lowrank, chunk=0, num_sms=64)
    plan = ops.last_plan
    assert plan["chunks"] == 1 and not plan["split"] and plan["tiles"] > 1 and plan["p_in_workspace"]


@pytest.mark.parametrize("Hq,Hkv,S,chunk", [(6, 2, 300, 2), (48, 1, 64, 1)])
def test_combine_kernel_segments(ops, Hq, Hkv, S, chunk):
    """The combine kernel's bounded shared memory: more chunks than a block has threads (the per-chunk weights are
    computed a segment at a time), and a group so wide that a probs block covers fewer slots (48 heads, 1-slot
    tiles)."""
    q, k, v, pos, lowrank = harness_decode_inputs(B=1, Hkv=Hkv, G=Hq // Hkv, S=S, D=64, R=3, dtype=torch.float32, seed=S)
    check_decode(ops, q, k, v, pos, lowrank, chunk=chunk)
    assert ops.last_plan["chunks"] == S // chunk


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [0, 8])
def test_decode_attention_sparse_only(ops, dtype, chunk):
    q, k, v, pos, _ = harness_decode_inputs(B=2, Hkv=3, G=3, S=29, D=64, R=0, dtype=dtype, seed=7)
    check_decode(ops, q, k, v, pos, None, chunk=chunk, num_sms=1)
    out, _ = ops.decode_attention(q, k, v, pos, None, None, None, 0.125, chunk=chunk, num_sms=1)
    assert torch.all(out[0, :3] == 0)  # no occupied slot and no state: exactly zero


@pytest.mark.parametrize("blocks_per_sm", [2, 4])
def test_split_targets_the_blocks_the_device_holds(ops, blocks_per_sm):
    """A split aims at as many blocks as the SMs hold at once, by the occupancy query (here 16 SMs, 8 rows)."""
    q, k, v, pos, lowrank = harness_decode_inputs(B=1, Hkv=8, G=4, S=1024, D=128, R=4, dtype=torch.bfloat16, seed=4)
    ops.set_occupancy(blocks_per_sm)
    try:
        check_decode(ops, q, k, v, pos, lowrank, chunk=0, num_sms=16)
    finally:
        ops.set_occupancy(2)
    assert ops.last_plan["chunks"] == 16 * blocks_per_sm // 8


@pytest.mark.parametrize("B,Hkv,S,expect_split", [(1, 3, 300, True), (8, 3, 300, True), (64, 3, 300, False)])
def test_split_heuristic(ops, B, Hkv, S, expect_split):
    """The heuristic splits when B * Hkv blocks leave an H100's SMs idle, into chunks of >= 128 slots."""
    q, k, v, pos, lowrank = harness_decode_inputs(B=B, Hkv=Hkv, G=3, S=S, D=64, R=4, dtype=torch.bfloat16, seed=B)
    check_decode(ops, q, k, v, pos, lowrank, chunk=0, num_sms=H100_SMS)
    chunks = ops.last_plan["chunks"]
    assert (chunks > 1) == expect_split
    assert chunks <= -(-S // 128)


def test_decode_attention_without_slots(ops):
    q, k, v, pos, lowrank = harness_decode_inputs(B=2, Hkv=2, G=2, S=0, D=128, R=3, dtype=torch.float32, seed=3)
    out, _ = check_decode(ops, q, k, v, pos, lowrank)
    phi_q, H, z = lowrank
    o_lr, _ = reference.lowrank_state(phi_q.view(2, 2, 2, 3), H, z)
    assert_close_ratio(out, o_lr.reshape(2, 4, 128))


@pytest.mark.parametrize("schedule", ["reverse", "random"])
def test_decode_attention_does_not_depend_on_thread_order(ops, schedule):
    """Threads and blocks run in another order: results are bit-identical (no order-dependent races between
    barriers, deterministic reductions)."""
    q, k, v, pos, lowrank = harness_decode_inputs(B=2, Hkv=2, G=4, S=45, D=128, R=4, dtype=torch.float16, seed=11)
    for plan in PATHS.values():
        harness_build.set_schedule(ops.lib, "forward")
        want = ops.decode_attention(q, k, v, pos, *lowrank, 0.1, **plan)
        harness_build.set_schedule(ops.lib, schedule, seed=5)
        got = ops.decode_attention(q, k, v, pos, *lowrank, 0.1, **plan)
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
    cache = slots.SlotCache.empty(B, Hkv, budget + 1, D, R, dtype)
    scale = D**-0.5
    for t in range(steps):
        q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
        k = torch.randn(B, Hkv, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, D, generator=g).to(dtype)
        phi_q = torch.rand(B, Hkv * G, R, generator=g)
        psi_k = torch.rand(B, Hkv, R, generator=g)
        position = torch.full((B,), t, dtype=torch.int32)
        ref_cache = clone_cache(cache)
        args = (q, k, v, phi_q, psi_k, position, scale, policy, budget, recent, sinks)
        ref_out = reference.decode_step(ref_cache, *args)
        out = harness_decode_step(ops, cache, *args, chunk)
        assert_close_ratio(out, ref_out, what=f"out at step {t}")
        assert torch.equal(cache.pos, ref_cache.pos), f"victims differ at step {t}"
        assert_close_ratio(cache.scores, ref_cache.scores, torch.float32, what=f"scores at step {t}")
        assert_close_ratio(cache.H, ref_cache.H, torch.float32, what=f"H at step {t}")
        assert_close_ratio(cache.z, ref_cache.z, torch.float32, what=f"z at step {t}")
    assert (cache.pos >= 0).sum(dim=-1).eq(budget).all()


# ---------------------------------------------------------------------------------------------------------------
# The fused decode step (decode_step_): one op, one or two launches
# ---------------------------------------------------------------------------------------------------------------


def check_step(ops, cache, q, k, v, phi_q, psi_k, valid, policy, budget, recent, sinks, what="", **plan):
    """One fused call in the harness and the reference from the same state: everything must match."""
    scale = q.shape[-1] ** -0.5
    ref = clone_cache(cache)
    args = (q, k, v, phi_q, psi_k, valid, scale, policy, budget, recent, sinks)
    ref_out = reference_steps(ref, *args)
    out = ops.decode_step_(cache, *args, **plan)
    assert_same_step(cache, ref, out, ref_out, what)
    return out


STEP_PATHS = {"single": dict(chunk=0, num_sms=1), "tiles": dict(chunk=0, tile=8, num_sms=1), "split": dict(chunk=8)}


@kernel_grid(STEP_PATHS)
def test_decode_step_matches_reference(ops, G, D, dtype, path):
    """Groups up to a block's 8 heads and beyond (12: always two launches), head_dim 96 in the 128 instance; row
    (0, 0) has no slot held, row (1, 1) no slot free, batch row 1's token is a pad."""
    policy = (G + D) % 2  # both policies over the grid
    S = 21
    inputs = step_inputs(2, 2, G, S, D, 8, dtype, seed=G * 100 + D, empty={(0, 0)}, full={(1, 1)}, pad=(1,))
    check_step(ops, *inputs, policy, S - 1, 4, 3, **STEP_PATHS[path])
    plan = ops.last_plan
    assert plan["split"] == (path == "split" or G > 8)
    assert plan["p_in_workspace"] == (path != "single" or G > 8)
    assert plan["vectorized"]


@pytest.mark.parametrize("path", list(STEP_PATHS))
@pytest.mark.parametrize("R", [0, 8])
@pytest.mark.parametrize("policy", [reference.H2O, reference.LAMBDA])
def test_decode_step_policies_rank_and_mqa(ops, policy, R, path):
    """Both policies with and without a low-rank state (R = 0: the sparse policy alone), one KV head (MQA)."""
    for seed, Hkv, G in [(1, 1, 8), (2, 3, 2)]:
        inputs = step_inputs(2, Hkv, G, 19, 64, R, torch.bfloat16, seed=seed + 10 * R, full={(0, 0)})
        check_step(ops, *inputs, policy, 18, 3, 2, what=f"Hkv={Hkv}: ", **STEP_PATHS[path])


@pytest.mark.parametrize("path", list(STEP_PATHS))
def test_decode_step_corner_rows(ops, path):
    """Every slot free; no slot free with a pad token (the pad overwrites slot 0, which then stays free); all pads;
    nothing over budget (no eviction); no evictable slot (everything in the recent window)."""
    for what, kwargs, budget, recent in [
        ("all free: ", dict(held=0), 10, 4),
        ("full + pad: ", dict(full={(0, 0), (1, 0)}, pad=(0,)), 16, 4),
        ("all pads: ", dict(pad=(0, 1)), 16, 4),
        ("under budget: ", dict(held=5), 16, 4),
        ("all recent: ", dict(held=16), 16, 20),  # a window wider than the budget (the op's checks forbid it)
    ]:
        inputs = step_inputs(2, 2, 3, 17, 64, 4, torch.float32, seed=len(what), **kwargs)
        check_step(ops, *inputs, reference.H2O, budget, recent, 0, what=what, **STEP_PATHS[path])


@pytest.mark.parametrize("path", list(STEP_PATHS))
def test_decode_step_ties_go_to_the_lowest_slot(ops, path):
    """Equal scores: with pad tokens nothing is added, so H2O's keys tie exactly and the victim is the lowest
    evictable slot (torch.argmin's rule), as in the reference; Λ's keys (positions) tie when positions repeat."""
    cache, *rest = step_inputs(2, 2, 3, 17, 64, 4, torch.float16, seed=3, pad=(0, 1), tied_scores=True)
    check_step(ops, cache, *rest, reference.H2O, 15, 2, 0, **STEP_PATHS[path])
    cache, *rest = step_inputs(2, 2, 3, 17, 64, 4, torch.float16, seed=4, pad=(0, 1))
    cache.pos[cache.pos >= 0] = 7  # every held token at the same (non-sink) position
    check_step(ops, cache, *rest, reference.LAMBDA, 15, 0, 2, **STEP_PATHS[path])


@pytest.mark.parametrize("path", list(STEP_PATHS))
def test_decode_step_multi_token_call(ops, path):
    """T = 4 tokens in one call are stepped in turn (each sees the one before's eviction), pads among them; q, k, v
    of token t are rows T apart; next_position advances by the real tokens only."""
    cache, *_ = step_inputs(2, 3, 4, 19, 64, 8, torch.bfloat16, seed=8, full={(0, 2)})
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, T, D, R = 2, 3, 4, 4, 64, 8
    q = torch.randn(B, Hkv * G, T, D, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(B, Hkv, T, D, generator=g).to(torch.bfloat16) for _ in range(2))
    phi_q, psi_k = torch.rand(B, Hkv * G, T, R, generator=g), torch.rand(B, Hkv, T, R, generator=g)
    valid = torch.tensor([[True, False, True, True], [False, True, True, False]])
    before = cache.next_position.clone()
    check_step(ops, cache, q, k, v, phi_q, psi_k, valid, reference.H2O, 18, 3, 0, **STEP_PATHS[path])
    assert torch.equal(cache.next_position, before + valid.sum(dim=1).to(torch.int32))


@pytest.mark.parametrize(
    "B,Hkv,G,S,num_sms,split,p_in_workspace",
    [
        (1, 2, 4, 128, H100_SMS, False, False),  # few rows, but S <= 128: a chunk never gets fewer slots
        (1, 2, 4, 129, H100_SMS, True, True),
        (2, 2, 4, 300, 4, False, False),  # B * Hkv blocks fill the (4-SM) device
        (1, 2, 4, 300, 4, True, True),
        (1, 2, 8, 1119, 2, False, False),  # the largest single tile for 8 heads at D = 64
        (1, 2, 8, 1120, 2, False, True),  # one more slot: two tiles, p through the workspace
        (1, 2, 9, 40, 1, True, True),  # G > 8: two head tiles
    ],
)
def test_decode_step_split_thresholds(ops, B, Hkv, G, S, num_sms, split, p_in_workspace):
    """Shapes on both sides of every threshold of the planner, with the heuristic's own choice (no overrides)."""
    inputs = step_inputs(B, Hkv, G, S, 64, 4, torch.float32, seed=S + G)
    check_step(ops, *inputs, reference.H2O, S - 1, 8, 0, num_sms=num_sms)
    assert (ops.last_plan["split"], ops.last_plan["p_in_workspace"]) == (split, p_in_workspace)


def test_decode_step_long_row_single_launch(ops):
    """S = 4097 at B = 64: one launch, each block walking its row in shared-memory tiles."""
    inputs = step_inputs(64, 1, 4, 4097, 64, 4, torch.bfloat16, seed=12, held=4000)
    check_step(ops, *inputs, reference.H2O, 4000, 64, 0, num_sms=64)
    plan = ops.last_plan
    assert not plan["split"] and plan["tiles"] > 1


@pytest.mark.parametrize(
    "policy,dtype,R,path",
    [
        (reference.H2O, torch.bfloat16, 6, "single"),
        (reference.H2O, torch.float32, 6, "split"),
        (reference.LAMBDA, torch.float16, 6, "tiles"),
        (reference.H2O, torch.float32, 0, "tiles"),
    ],
)
def test_stream_of_fused_decode_steps(ops, policy, dtype, R, path):
    """300 tokens from an empty cache, one or three per call, with a pad token now and then: positions and victims
    exactly equal, out / H / z close. Each call starts both from the kernel's state, so float differences cannot
    snowball."""
    B, Hkv, G, D, budget, tokens = 2, 2, 3, 64, 16, 300
    recent, sinks = (4, 0) if policy == reference.H2O else (0, 3)
    g = torch.Generator().manual_seed(policy * 10 + R)
    cache = slots.SlotCache.empty(B, Hkv, budget + 1, D, R, dtype)
    done = 0
    while done < tokens:
        T = 3 if done % 7 == 0 else 1  # multi-token calls step their tokens in turn
        q = torch.randn(B, Hkv * G, T, D, generator=g).to(dtype)
        k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
        phi_q = torch.rand(B, Hkv * G, T, R, generator=g) if R else None
        psi_k = torch.rand(B, Hkv, T, R, generator=g) if R else None
        valid = torch.rand(B, T, generator=g) > 0.1
        check_step(ops, cache, q, k, v, phi_q, psi_k, valid, policy, budget, recent, sinks, what=f"token {done}: ",
                   **STEP_PATHS[path])  # fmt: skip
        done += T
    assert (cache.pos >= 0).sum(dim=-1).eq(budget).all()


def near_tie_step():
    """A full row (budget 4, recent 1) where H2O must choose between two slots whose scores differ by 32 ulps:
    logits -49.9999924 and -49.9999962 (adjacent floats twice over) against three of 0, so slot 2 (the smaller
    probability) is the victim. nvcc's --use_fast_math computes exp(x) as 2^(x * log2(e)) with the product rounded
    to float, which makes the two products, hence the two probabilities, equal: the tie then evicts slot 1.
    Returns the cache and the decode_step_ arguments after the cache."""
    B, Hkv, S, D = 1, 1, 5, 64
    cache = slots.SlotCache.empty(B, Hkv, S, D, 0, torch.float32)
    cache.pos.copy_(torch.tensor([[[0, 1, 2, 3, reference.EMPTY]]], dtype=torch.int32))
    cache.scores.copy_(torch.tensor([[[5.0, 0.0, 0.0, 5.0, 0.0]]]))
    cache.k[0, 0, :4, 0] = torch.tensor([0.0, -49.99999237060547, -49.999996185302734, 0.0])
    cache.v.normal_(generator=torch.Generator().manual_seed(0))
    cache.next_position.fill_(4)
    q = torch.zeros(B, Hkv, D)
    q[..., 0] = 8.0  # with scale 1/8, the logit of a slot is its k[0]
    k, v = torch.zeros(B, Hkv, D), torch.ones(B, Hkv, D)
    return cache, (q, k, v, None, None, None, D**-0.5, reference.H2O, 4, 1, 0)


@pytest.mark.parametrize("path", list(STEP_PATHS))
def test_decode_step_near_tie_evicts_as_the_cpu_path(ops, path):
    """The victim of a near-tie is the reference's and the CPU op's (IEEE exp, no fast-math approximation)."""
    cache, args = near_tie_step()
    ref, cpu = clone_cache(cache), clone_cache(cache)
    ref_out = reference_steps(ref, *args)
    less_ops.less_decode_step_(cpu, *args[:6], "h2o", *args[8:], scale=args[6])
    out = ops.decode_step_(cache, *args, **STEP_PATHS[path])
    assert_same_step(cache, ref, out, ref_out)
    assert torch.equal(cpu.pos, ref.pos)
    assert ref.pos[0, 0].tolist() == [0, 1, -1, 3, 4]


def test_fast_math_would_evict_another_victim():
    """The harness built as nvcc --use_fast_math compiles (approximate exp and log, subnormals flushed) evicts slot 1
    in the near-tie above: the test before would fail for a fast-math build."""
    fast = HarnessOps(harness_build.load("kernels", KERNEL_SOURCES, fast_math=True))
    cache, args = near_tie_step()
    fast.decode_step_(cache, *args, **STEP_PATHS["single"])
    assert cache.pos[0, 0].tolist() == [0, -1, 2, 3, 4]


@pytest.mark.parametrize("path", list(STEP_PATHS))
def test_decode_step_next_position_limit(ops, path, capfd):
    """Positions stay below 2^24. next_position = 2^24 - T is the last start that fits: the call hands out positions
    up to 2^24 - 1 and leaves next_position at 2^24 (read back exactly, not as a ticket); the next call must then
    fail, as the CPU op refuses it, instead of reusing positions from 0."""
    T, limit = 3, 1 << 24
    cache, *_ = step_inputs(2, 3, 2, 17, 64, 4, torch.float32, seed=2)
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, D, R = 2, 3, 2, 64, 4
    q = torch.randn(B, Hkv * G, T, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    phi_q, psi_k = torch.rand(B, Hkv * G, T, R, generator=g), torch.rand(B, Hkv, T, R, generator=g)
    cache.next_position.fill_(limit - T)
    check_step(ops, cache, q, k, v, phi_q, psi_k, None, reference.LAMBDA, 16, 0, 2, **STEP_PATHS[path])
    assert cache.pos.max() == limit - 1 and cache.next_position.tolist() == [limit, limit]
    with pytest.raises(RuntimeError, match=r"__trap\(\)"):
        ops.decode_step_(cache, q[:, :, :1], k[:, :, :1], v[:, :, :1], phi_q[:, :, :1], psi_k[:, :, :1], None,
                         D**-0.5, reference.LAMBDA, 16, 0, 2, **STEP_PATHS[path])
    assert f"next_position[0] = {limit} is outside [0, 2^24 - T] with T = 1" in capfd.readouterr().out
    with pytest.raises(RuntimeError, match="next_position must be in"):
        less_ops.less_decode_step_(clone_cache(cache), q[:, :, :1], k[:, :, :1], v[:, :, :1], phi_q[:, :, :1],
                                   psi_k[:, :, :1], None, "lambda", 16, sinks=2)


@pytest.mark.parametrize("schedule", ["reverse", "random"])
def test_decode_step_does_not_depend_on_thread_order(ops, schedule):
    """Other thread and block orders give bit-identical results on every path (cache, out)."""
    inputs = step_inputs(2, 3, 4, 37, 128, 4, torch.float16, seed=21, full={(1, 1)}, pad=(1,))
    for plan in STEP_PATHS.values():
        results = []
        for order in ("forward", schedule):
            cache = clone_cache(inputs[0])
            harness_build.set_schedule(ops.lib, order, seed=5)
            out = ops.decode_step_(cache, *inputs[1:], 0.1, reference.H2O, 36, 4, 0, **plan)
            harness_build.set_schedule(ops.lib, "forward")
            results.append([out, *vars(cache).values()])
        assert all(torch.equal(a, b) for a, b in zip(*results))


# ---------------------------------------------------------------------------------------------------------------
# decode_step_ on a pool's rows (state_rows), the state laid out as vLLM lays out a layer's
# ---------------------------------------------------------------------------------------------------------------

STATE_FIELDS = ("k", "v", "psi", "pos", "scores", "H", "z", "next_position")


def page_views(raw, like, page):
    """The fields of a SlotCache like `like` ([N, ...] each) in `raw`, a byte buffer of N pages of `page` bytes, as
    vLLM binds a layer's state: each page holds one row of every stored field, back to back, and each field is an
    as_strided view whose rows are a page apart. Without a low-rank state (R = 0) psi, H and z are not stored: they
    stay `like`'s (empty) tensors."""
    views, offset = {}, 0
    for name in STATE_FIELDS:
        t = getattr(like, name)
        if t.numel() == 0:
            views[name] = t
            continue
        size, shape = t.element_size(), t.shape[1:]
        assert offset % size == 0 and page % size == 0
        views[name] = torch.as_strided(raw.view(t.dtype), t.shape, (page // size, *torch.empty(shape).stride()),
                                       offset // size)  # fmt: skip
        offset += t[0].numel() * size
    assert offset <= page
    return slots.SlotCache(**views)


def paged_pool(cache, gap, gen):
    """`cache` moved into pages (page_views) of its rows' bytes rounded up to 16, plus `gap` bytes; the bytes
    between and after the fields are random. Returns (raw, pool)."""
    used = sum(t[0].numel() * t.element_size() for t in vars(cache).values() if t.numel())
    page = -(-used // 16) * 16 + gap
    raw = torch.randint(0, 256, (cache.k.shape[0] * page,), dtype=torch.uint8, generator=gen)
    pool = page_views(raw, cache, page)
    for name in STATE_FIELDS:
        if getattr(cache, name).numel():
            getattr(pool, name).copy_(getattr(cache, name))
    return raw, pool, page


def pool_step_inputs(N, B, Hkv, G, S, D, R, T, dtype, seed):
    """A pool of N rows mid-stream (step_inputs) and T tokens for B of its rows, chosen at random in random order;
    among the tokens a pad."""
    cache, *_ = step_inputs(N, Hkv, G, S, D, R, dtype, seed=seed, full={(1, 0)}, empty={(2, 1)})
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(N, generator=g)[:B]
    q = torch.randn(B, Hkv * G, T, D, generator=g).to(dtype)
    k, v = ((torch.randn(B, Hkv, T, D, generator=g) * 1.5).to(dtype) for _ in range(2))
    phi_q = torch.rand(B, Hkv * G, T, R, generator=g) if R else None
    psi_k = torch.rand(B, Hkv, T, R, generator=g) if R else None
    valid = torch.rand(B, T, generator=g) > 0.3
    valid[0, 0], valid[1, -1] = True, False
    return cache, rows, (q, k, v, phi_q, psi_k, valid)


def check_pool_step(ops, cache, rows, inputs, policy, gap, gen, misalign=False, **plan):
    """The step on `rows` of a paged pool, in place, against the step on those rows gathered into contiguous tensors:
    out and every field of the pool's rows bit for bit equal, every other byte of the pages unchanged. `misalign`
    offsets the gathered K and V by 4 bytes, so that both take the generic (unaligned) kernels."""
    raw, pool, page = paged_pool(cache, gap, gen)
    gathered = {name: getattr(pool, name)[rows] for name in STATE_FIELDS}
    if misalign:
        for name in ("k", "v"):
            t = gathered[name]
            shifted = torch.empty(t.numel() + 8, dtype=t.dtype)[4 // t.element_size() :][: t.numel()].view(t.shape)
            gathered[name] = shifted.copy_(t)
    gathered = slots.SlotCache(**gathered)
    S, D = cache.k.shape[2:]
    args = (*inputs, D**-0.5, policy, S - 1, 3, 1)
    out_gathered = ops.decode_step_(gathered, *args, **plan)
    plan_gathered = ops.last_plan
    expected = raw.clone()
    expected_pool = page_views(expected, cache, page)
    for name in STATE_FIELDS:
        if getattr(cache, name).numel():
            getattr(expected_pool, name)[rows] = getattr(gathered, name)

    out = ops.decode_step_(pool, *args, state_rows=rows, **plan)
    assert ops.last_plan == plan_gathered
    assert torch.equal(out, out_gathered), "out differs"
    for name in STATE_FIELDS:
        assert torch.equal(getattr(pool, name)[rows], getattr(gathered, name)), f"{name} of the pool's rows differs"
    assert torch.equal(raw, expected), "bytes outside the stepped rows changed"
    return plan_gathered


@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("policy", [reference.H2O, reference.LAMBDA])
@pytest.mark.parametrize("R", [0, 6])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_step_on_pool_rows(ops, dtype, R, policy, T, path):
    """state_rows: a layer's state in vLLM's layout (pages of one byte buffer, each field an as_strided view a page
    apart, 16 spare bytes a page), stepped in place for 4 of its 7 rows in random order, is bit for bit the step on
    those rows gathered into contiguous tensors; nothing else in the buffer changes."""
    seed = SCALAR_KIND[dtype] * 100 + R * 10 + policy * 4 + T
    cache, rows, inputs = pool_step_inputs(7, 4, 2, 3, 19, 64, R, T, dtype, seed)
    plan = check_pool_step(ops, cache, rows, inputs, policy, 16, torch.Generator().manual_seed(seed),
                           **STEP_PATHS[path])  # fmt: skip
    assert plan["split"] == (path == "split") and plan["vectorized"]


@pytest.mark.parametrize("path", ["single", "split"])
def test_decode_step_on_unaligned_pool_rows(ops, path):
    """Pages of 16n + 4 bytes leave most rows of K and V unaligned for 16-byte loads: the step takes the generic
    kernels and still equals the gathered step (itself unaligned, so that both run the same instances)."""
    cache, rows, inputs = pool_step_inputs(5, 3, 2, 2, 17, 64, 4, 2, torch.bfloat16, seed=9)
    plan = check_pool_step(ops, cache, rows, inputs, reference.H2O, 4, torch.Generator().manual_seed(9),
                           misalign=True, **STEP_PATHS[path])  # fmt: skip
    assert plan["split"] == (path == "split") and not plan["vectorized"]


@pytest.mark.parametrize("path", ["single", "split"])
def test_decode_step_state_row_outside_the_pool_traps(ops, path, capfd):
    """The host checks state_rows only for CPU tensors (on a GPU they stay on the device): a row outside [0, N) stops
    the kernel with __trap(). Until then its blocks read row 0 in its place and write nothing: rows 0 and 2 stay as
    they were (the blocks of batch row 0, which run first here, update row 1)."""
    N = 3
    cache, q, k, v, phi_q, psi_k, _ = step_inputs(N, 2, 2, 17, 64, 4, torch.float32, seed=5)
    for bad in (N, -1):
        before = clone_cache(cache)
        with pytest.raises(RuntimeError, match=r"__trap\(\)"):
            ops.decode_step_(cache, q[:2], k[:2], v[:2], phi_q[:2], psi_k[:2], None, 0.125, reference.H2O, 15, 2, 0,
                             state_rows=torch.tensor([1, bad]), **STEP_PATHS[path])  # fmt: skip
        assert f"state_rows[1] = {bad} is outside the state's {N} rows" in capfd.readouterr().out
        for name in STATE_FIELDS:
            assert torch.equal(getattr(cache, name)[[0, 2]], getattr(before, name)[[0, 2]]), name
