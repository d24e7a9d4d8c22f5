"""The C++ CPU kernels (csrc/cpu/*.cpp) against less_cuda/reference.py.

Decode attention and the state fold are compared with a dtype-based error ratio (the kernels and the reference
both compute in fp32 from the same inputs, so probs and the state are held to fp32 tolerance for every dtype).
Score accumulation and eviction are exact: same victims, same scores, same positions.
"""

import random

import pytest
import torch

import less_cuda._C  # noqa: F401  (registers torch.ops.less_cuda)
from helpers import assert_close_ratio
from less_cuda.core import reference as ref
from less_cuda import less_decode_attention, less_score_and_evict_
from less_cuda.core import state as slots
from op_inputs import decode_inputs

ops = torch.ops.less_cuda
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def check_decode(args, what):
    out, probs = ops.decode_attention(*args)
    ref_out, ref_probs = ref.decode_attention(*args)
    assert out.dtype == args[0].dtype and probs.dtype == torch.float32
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    assert_close_ratio(out, ref_out, what=f"{what} out")
    assert_close_ratio(probs, ref_probs, torch.float32, what=f"{what} probs")
    assert (probs[args[3] < 0] == 0).all(), f"{what}: probability mass on an empty slot"
    return out, probs


# ---------------------------------------------------------------------------------------------------------------
# (c) decode attention
# ---------------------------------------------------------------------------------------------------------------
# (B, Hkv, G, S, D, R, fill, empty_row): GQA groups 1, 3, 4, 8; head dims 64, 128, 256; ranks 0 (none), 4, 8, 16.
HAND_PICKED = [
    (1, 1, 1, 1, 64, 0, 1.0, False),
    (1, 2, 4, 16, 128, 8, 1.0, False),
    (2, 2, 3, 33, 64, 4, 0.5, True),
    (3, 1, 8, 50, 256, 16, 0.7, True),
    (5, 2, 4, 9, 128, 0, 0.3, True),
    (4, 3, 1, 65, 64, 8, 0.0, False),  # every row empty: out is the state alone
    (2, 2, 8, 20, 128, 0, 0.0, False),  # every row empty and no state: out = 0
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HAND_PICKED, ids=lambda c: "B{}_Hkv{}_G{}_S{}_D{}_R{}_fill{}_empty{}".format(*c))
def test_decode_attention_matches_reference(shape, dtype):
    B, Hkv, G, S, D, R, fill, empty_row = shape
    check_decode(decode_inputs(B, Hkv, G, S, D, R, dtype, fill, seed=S, empty_row=empty_row), str(shape))


def sweep_configs(n=30, seed=0):
    rng = random.Random(seed)
    return [
        dict(B=rng.randint(1, 5), Hkv=rng.randint(1, 3), G=rng.choice([1, 3, 4, 8]), S=rng.choice([1, 7, 33, 100]),
             D=rng.choice([64, 128, 256]), R=rng.choice([0, 4, 8, 16]), fill=rng.choice([0.2, 0.6, 0.9, 1.0]),
             empty_row=rng.random() < 0.3, dtype=rng.choice(DTYPES), seed=i)
        for i in range(n)
    ]


@pytest.mark.parametrize("cfg", sweep_configs(), ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_decode_attention_random_sweep(cfg):
    check_decode(decode_inputs(**cfg), str(cfg))


def test_empty_rows_give_state_or_zero():
    q, k, v, pos, phi, H, z, scale = decode_inputs(2, 2, 4, 8, 64, 8, torch.float32, 1.0, seed=1, empty_row=True)
    out, probs = ops.decode_attention(q, k, v, pos, None, None, None, scale)
    assert (out[0, :4] == 0).all() and (probs[0, 0] == 0).all()
    out, _ = ops.decode_attention(q, k, v, pos, phi, H, z, scale)
    o_lr, _ = ref.lowrank_state(phi.view(2, 2, 4, 8), H, z)
    assert_close_ratio(out[0, :4], o_lr[0, 0], what="state-only row")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_state_is_exactly_softmax_attention(dtype):
    B, Hkv, G, S, D, R = 2, 2, 4, 24, 128, 8
    q, k, v, pos, phi, H, z, scale = decode_inputs(B, Hkv, G, S, D, R, dtype, 0.6, seed=3, empty_row=True)
    sparse = ops.decode_attention(q, k, v, pos, None, None, None, scale)
    merged = ops.decode_attention(q, k, v, pos, phi, torch.zeros_like(H), torch.zeros_like(z), scale)
    assert torch.equal(merged[0], sparse[0]) and torch.equal(merged[1], sparse[1])

    full = torch.arange(S, dtype=torch.int32).expand(B, Hkv, S).contiguous()
    out, _ = ops.decode_attention(q, k, v, full, phi, torch.zeros_like(H), torch.zeros_like(z), scale)
    kg = k.float().repeat_interleave(G, dim=1)
    vg = v.float().repeat_interleave(G, dim=1)
    expected = torch.softmax(torch.einsum("bhd,bhsd->bhs", q.float(), kg) * scale, dim=-1)
    assert_close_ratio(out, torch.einsum("bhs,bhsd->bhd", expected, vg).to(dtype), what="full cache")


def test_decode_attention_independent_of_thread_count():
    args = decode_inputs(4, 2, 4, 40, 128, 8, torch.bfloat16, 0.7, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.decode_attention(*args)
    finally:
        torch.set_num_threads(threads)
    many = ops.decode_attention(*args)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


# ---------------------------------------------------------------------------------------------------------------
# (a) score accumulation and eviction: exact
# ---------------------------------------------------------------------------------------------------------------
def check_evict(scores, pos, probs, policy, budget, recent, sinks):
    ours_scores, ours_pos = scores.clone(), pos.clone()
    victim = ops.score_and_evict_(ours_scores, ours_pos, probs, policy, budget, recent, sinks)
    ref_victim = ref.score_and_evict_(scores, pos, probs, policy, budget, recent, sinks)
    assert victim.dtype == torch.int64
    assert torch.equal(victim, ref_victim), f"victims {victim.tolist()} != {ref_victim.tolist()}"
    assert torch.equal(ours_pos, pos) and torch.equal(ours_scores, scores)
    return victim


@pytest.mark.parametrize("policy", [ref.H2O, ref.LAMBDA], ids=["h2o", "lambda"])
@pytest.mark.parametrize("seed", range(4))
def test_score_and_evict_matches_reference(policy, seed):
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, S = 3, 4, 40
    budget = [8, 20, 35, 39][seed]
    positions = torch.stack([torch.randperm(100, generator=gen)[:S] for _ in range(B * Hkv)]).view(B, Hkv, S)
    occupied = torch.rand(B, Hkv, S, generator=gen) < 0.9
    pos = torch.where(occupied, positions, ref.EMPTY).to(torch.int32)
    scores = torch.rand(B, Hkv, S, generator=gen) * occupied
    probs = torch.rand(B, Hkv, S, generator=gen) * occupied
    victim = check_evict(scores, pos, probs, policy, budget, recent=4, sinks=3)
    assert (victim >= 0).any()


@pytest.mark.parametrize("policy", [ref.H2O, ref.LAMBDA], ids=["h2o", "lambda"])
def test_eviction_ties_go_to_the_lowest_slot(policy):
    gen = torch.Generator().manual_seed(0)
    B, Hkv, S = 2, 3, 16
    pos = torch.randint(0, 6, (B, Hkv, S), generator=gen, dtype=torch.int32)  # duplicated positions
    pos[:, :, ::5] = ref.EMPTY
    zeros = torch.zeros(B, Hkv, S)
    duplicated = torch.randint(0, 3, (B, Hkv, S), generator=gen).float()
    for scores, probs in [(zeros, zeros), (duplicated, zeros), (zeros, duplicated / 4)]:
        victim = check_evict(scores.clone(), pos.clone(), probs, policy, budget=4, recent=1, sinks=1)
        assert (victim >= 0).all()


@pytest.mark.parametrize("policy", [ref.H2O, ref.LAMBDA], ids=["h2o", "lambda"])
def test_no_eviction_when_within_budget_or_nothing_evictable(policy):
    S = 12
    within = torch.arange(S, dtype=torch.int32).view(1, 1, S).repeat(1, 2, 1)
    within[:, :, 6:] = ref.EMPTY
    protected = torch.full((1, 2, S), 0, dtype=torch.int32)  # all sinks for Λ, all newest for H2O when recent > 0
    evictable = torch.arange(S, dtype=torch.int32).view(1, 1, S).repeat(1, 2, 1)
    probs = torch.rand(1, 2, S)
    for pos, evicts in [(within, False), (protected, False), (evictable, True)]:
        victim = check_evict(torch.rand(1, 2, S), pos, probs, policy, budget=6, recent=2, sinks=2)
        assert ((victim >= 0) == evicts).all()


# ---------------------------------------------------------------------------------------------------------------
# (b) state fold and in-place update
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,R,D", [(1, 4, 64), (7, 8, 128), (300, 16, 128), (300, 8, 256)])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_state_fold_and_update_match_reference(N, R, D, dtype, masked):
    gen = torch.Generator().manual_seed(N + R + D)
    B, Hkv = 2, 3
    psi = torch.rand(B, Hkv, N, R, generator=gen)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(dtype)
    mask = torch.rand(B, Hkv, N, generator=gen) < 0.5 if masked else None
    ref_dH, ref_dz = ref.state_fold(psi, v, mask)

    dH, dz = ops.state_fold(psi, v, mask)
    assert_close_ratio(dH, ref_dH, torch.float32, what="dH")
    assert_close_ratio(dz, ref_dz, torch.float32, what="dz")

    H, z = torch.randn(B, Hkv, R, D, generator=gen), torch.rand(B, Hkv, R, generator=gen)
    H_new, z_new = H.clone(), z.clone()
    assert ops.state_update_(H_new, z_new, psi, v, mask) is None
    assert_close_ratio(H_new, H + ref_dH, torch.float32, what="H")
    assert_close_ratio(z_new, z + ref_dz, torch.float32, what="z")


def test_state_fold_all_masked_out_is_zero():
    psi, v = torch.rand(2, 2, 5, 4), torch.randn(2, 2, 5, 64)
    dH, dz = ops.state_fold(psi, v, torch.zeros(2, 2, 5, dtype=torch.bool))
    assert not dH.any() and not dz.any()


# ---------------------------------------------------------------------------------------------------------------
# The stream: reference.decode_step run through the ops
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [ref.H2O, ref.LAMBDA], ids=["h2o", "lambda"])
def test_decode_stream_matches_reference(policy, monkeypatch):
    gen = torch.Generator().manual_seed(policy)
    B, Hkv, G, D, R, T, budget = 2, 2, 2, 64, 8, 300, 32
    q = torch.randn(T, B, Hkv * G, D, generator=gen)
    k, v = torch.randn(T, B, Hkv, D, generator=gen), torch.randn(T, B, Hkv, D, generator=gen)
    phi, psi = torch.rand(T, B, Hkv * G, R, generator=gen), torch.rand(T, B, Hkv, R, generator=gen)

    def stream():
        cache = slots.SlotCache.empty(B, Hkv, budget + 1, D, R, torch.float32)
        for t in range(T):
            out = ref.decode_step(cache, q[t], k[t], v[t], phi[t], psi[t], torch.full((B,), t), D**-0.5,
                                  policy, budget, recent=8, sinks=4)
            yield out, cache.pos.clone(), cache.H.clone()

    expected = list(stream())
    monkeypatch.setattr(ref, "decode_attention", ops.decode_attention)
    monkeypatch.setattr(ref, "score_and_evict_", ops.score_and_evict_)
    monkeypatch.setattr(ref, "state_fold", ops.state_fold)
    for t, ((out, pos, H), (ref_out, ref_pos, ref_H)) in enumerate(zip(stream(), expected)):
        assert torch.equal(pos, ref_pos), f"step {t}: kept positions differ"
        assert_close_ratio(out, ref_out, what=f"step {t} out")
        assert_close_ratio(H, ref_H, what=f"step {t} H")


@pytest.mark.parametrize("policy", [ref.H2O, ref.LAMBDA], ids=["h2o", "lambda"])
def test_stream_kept_masks_with_ops(policy):
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 4, 120, 64, generator=gen), torch.randn(2, 2, 120, 64, generator=gen)
    args = (q, k, 0.125, policy, 24, 6, 3)
    # stream_kept_masks hands `attend` the strided slice q[:, :, t]; the op takes contiguous tensors only.
    attend = lambda q_t, *rest: ops.decode_attention(q_t.contiguous(), *rest)  # noqa: E731
    kept = slots.stream_kept_masks(*args, attend=attend, evict_=ops.score_and_evict_)
    assert torch.equal(kept, slots.stream_kept_masks(*args, attend=ref.decode_attention, evict_=ref.score_and_evict_))


@pytest.mark.parametrize("T, budget, sinks", [(120, 24, 3), (40, 8, 0), (30, 40, 4), (64, 5, 4), (1, 2, 1)])
def test_lambda_kept_masks_in_closed_form_equal_the_loop(T, budget, sinks):
    gen = torch.Generator().manual_seed(T)
    q, k = torch.randn(2, 4, T, 64, generator=gen), torch.randn(2, 2, T, 64, generator=gen)
    args = (q, k, 0.125, ref.LAMBDA, budget, 0, sinks)
    closed = slots.kept_masks(*args, attend=ref.decode_attention, evict_=ref.score_and_evict_)
    assert torch.equal(closed, slots.stream_kept_masks(*args, attend=ref.decode_attention, evict_=ref.score_and_evict_))


# ---------------------------------------------------------------------------------------------------------------
# Bad input is a clear error
# ---------------------------------------------------------------------------------------------------------------
def test_decode_attention_rejects_bad_input():
    q, k, v, pos, phi, H, z, scale = decode_inputs(1, 2, 2, 8, 64, 4, torch.float32, 1.0, seed=0)
    with pytest.raises(RuntimeError, match="pos must be Int"):
        ops.decode_attention(q, k, v, pos.long(), None, None, None, scale)
    with pytest.raises(RuntimeError, match="v must have shape"):
        ops.decode_attention(q, k, v[:, :, :4].contiguous(), pos, None, None, None, scale)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        ops.decode_attention(q[:, :3].contiguous(), k, v, pos, None, None, None, scale)
    with pytest.raises(RuntimeError, match="k must be"):
        ops.decode_attention(q, k.half(), v, pos, None, None, None, scale)
    with pytest.raises(RuntimeError, match="given together"):
        ops.decode_attention(q, k, v, pos, phi, H, None, scale)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, pos, None, None, None, scale)


def test_head_dim_zero_and_policy_names_fail_clearly():
    """Through the public wrappers: head_dim 0 is the op's message (no ZeroDivisionError), and a policy name is taken
    in any case, an unknown one naming the choices (no bare KeyError)."""
    q, k, pos = torch.zeros(1, 2, 0), torch.zeros(1, 1, 4, 0), torch.zeros(1, 1, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="head_dim must be positive"):
        less_decode_attention(q, k, k, pos)
    scores, probs = torch.zeros(1, 1, 4), torch.rand(1, 1, 4)
    lower, upper = scores.clone(), scores.clone()
    victims = [less_score_and_evict_(s, torch.arange(4, dtype=torch.int32).view(1, 1, 4), probs, name, 3, 1)
               for s, name in ((lower, "h2o"), (upper, "H2O"))]  # fmt: skip
    assert torch.equal(victims[0], victims[1]) and torch.equal(lower, upper)
    with pytest.raises(ValueError, match=r"policy must be one of \['h2o', 'lambda'\]"):
        less_score_and_evict_(scores, torch.zeros(1, 1, 4, dtype=torch.int32), probs, "heavy", 3, 1)


def test_score_and_evict_rejects_bad_input():
    scores, probs = torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)
    pos = torch.zeros(1, 2, 8, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="unknown policy id 7"):
        ops.score_and_evict_(scores, pos, probs, 7, 4, 1, 1)
    with pytest.raises(RuntimeError, match="pos must be Int"):
        ops.score_and_evict_(scores, pos.long(), probs, 0, 4, 1, 1)
    with pytest.raises(RuntimeError, match="probs must have shape"):
        ops.score_and_evict_(scores, pos, probs[:, :1].contiguous(), 0, 4, 1, 1)
    with pytest.raises(RuntimeError, match="must exceed recent"):
        ops.score_and_evict_(scores, pos, probs, 0, 4, 4, 1)


def test_state_ops_reject_bad_input():
    psi, v = torch.rand(1, 2, 5, 4), torch.randn(1, 2, 5, 64)
    with pytest.raises(RuntimeError, match="mask must be Bool"):
        ops.state_fold(psi, v, torch.ones(1, 2, 5))
    with pytest.raises(RuntimeError, match="v must have shape"):
        ops.state_fold(psi, v[:, :, :3].contiguous(), None)
    with pytest.raises(RuntimeError, match="H must have shape"):
        ops.state_update_(torch.zeros(1, 2, 4, 32), torch.zeros(1, 2, 4), psi, v, None)
