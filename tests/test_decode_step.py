"""The fused decode step (less_cuda::decode_step_, C++ CPU kernel) against reference.decode_step: one step over a
grid of shapes, policies and dtypes, multi-token calls, long streams with padding, ties, opcheck and bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_ratio, assert_same_step, clone_cache, reference_steps

from less_cuda.core import ops
from less_cuda.core import reference as ref
from less_cuda.core.state import SlotCache
from op_inputs import new_token, paged_pool, place_rows, random_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POLICIES = {"h2o": ref.H2O, "lambda": ref.LAMBDA}


def run_both(cache, q, k, v, phi, psi, valid, policy, budget, recent, sinks, scale):
    expected = clone_cache(cache)
    ref_out = reference_steps(expected, q, k, v, phi, psi, valid, scale, policy, budget, recent, sinks)
    out = ops.less_decode_step_(cache, q, k, v, phi, psi, valid, policy, budget, recent, sinks, scale=scale)
    return out, ref_out, expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("R", [0, 8])
@pytest.mark.parametrize(
    "Hq,Hkv,D,S,occupied",
    [(4, 4, 64, 9, 8), (9, 3, 64, 33, 32), (8, 2, 128, 17, 10), (16, 2, 256, 12, 11), (12, 1, 96, 20, 20),
     (12, 1, 80, 7, 0), (24, 2, 64, 65, 64)],
    ids=["G1", "G3", "G4-partly-empty", "G8-D256", "MQA-G12-D96-full", "D80-empty", "G12"],
)  # fmt: skip
def test_one_step_matches_reference(dtype, policy, R, Hq, Hkv, D, S, occupied):
    gen = torch.Generator().manual_seed(Hq * 100 + S + R)
    policy_id = POLICIES[policy]
    budget = S - 1
    cache = random_cache(2, Hkv, S, D, R, dtype, min(occupied, budget), gen)
    q, k, v, phi, psi = new_token(2, Hq, Hkv, D, R, dtype, gen)
    phi, psi = (phi, psi) if R else (None, None)
    out, ref_out, expected = run_both(cache, q, k, v, phi, psi, None, policy_id, budget, budget // 2, 2, D**-0.5)
    assert_same_step(cache, expected, out, ref_out, f"{policy} R={R}: ")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("R", [0, 8])
def test_stream_with_padding_matches_reference(dtype, policy, R):
    """300 steps from an empty cache, with pad tokens in one row: every step's bookkeeping equals the reference's."""
    gen = torch.Generator().manual_seed(11 + R)
    B, Hkv, G, D, budget, T = 2, 2, 3, 64, 24, 300
    policy_id = POLICIES[policy]
    cache = SlotCache.empty(B, Hkv, budget + 1, D, R, dtype)
    expected = clone_cache(cache)
    for t in range(T):
        q, k, v, phi, psi = new_token(B, Hkv * G, Hkv, D, R, dtype, gen)
        phi, psi = (phi, psi) if R else (None, None)
        real = torch.tensor([True, t % 7 != 3])
        ref_out = reference_steps(expected, q, k, v, phi, psi, real, D**-0.5, policy_id, budget, 8, 4)
        out = ops.less_decode_step_(cache, q, k, v, phi, psi, real, policy, budget, 8, 4)
        assert torch.equal(cache.pos, expected.pos), f"step {t}: kept positions differ"
        assert_close_ratio(out[real], ref_out[real], what=f"step {t} out")
        assert_close_ratio(cache.H, expected.H, torch.float32, what=f"step {t} H")
    assert int((cache.pos >= 0).sum(-1).min()) == budget


def test_ties_evict_the_lowest_slot():
    """Identical keys add identical probabilities, so slots 3 and 5 stay tied at the lowest score: H2O evicts the
    lower slot, as torch.argmin does."""
    B, Hkv, S, D = 1, 1, 6, 64
    cache = SlotCache.empty(B, Hkv, S, D, 0, torch.float32)
    cache.k[:] = 1.0
    cache.pos[0, 0, 1:] = torch.tensor([4, 0, 1, 2, 3], dtype=torch.int32)
    cache.scores[0, 0] = torch.tensor([0.0, 0.5, 0.3, 0.1, 0.2, 0.1])
    cache.next_position.fill_(5)
    q, k, v = torch.ones(B, 1, D), torch.ones(B, Hkv, D), torch.ones(B, Hkv, D)
    out, ref_out, expected = run_both(cache, q, k, v, None, None, None, ref.H2O, 5, 1, 0, 0.125)
    assert_same_step(cache, expected, out, ref_out, "ties: ")
    assert cache.pos[0, 0].tolist() == [5, 4, 0, -1, 2, 3]


def test_pad_token_takes_no_slot_and_evicts_nothing():
    gen = torch.Generator().manual_seed(3)
    cache = random_cache(1, 2, 9, 64, 4, torch.float32, 8, gen)
    before = clone_cache(cache)
    q, k, v, phi, psi = new_token(1, 4, 2, 64, 4, torch.float32, gen)
    ops.less_decode_step_(cache, q, k, v, phi, psi, torch.tensor([False]), "h2o", 8, 4)
    assert torch.equal(cache.pos, before.pos)
    assert torch.equal(cache.next_position, before.next_position)
    assert torch.equal(cache.scores, before.scores)
    assert torch.equal(cache.H, before.H) and torch.equal(cache.z, before.z)


def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    cache = random_cache(2, 2, 9, 64, 4, torch.float32, 8, gen)
    q, k, v, phi, psi = new_token(2, 4, 2, 64, 4, torch.float32, gen)
    step = (q[:, :, None], k[:, :, None], v[:, :, None], phi[:, :, None], psi[:, :, None])
    for valid in (None, torch.tensor([[True], [False]])):
        args = (*vars(clone_cache(cache)).values(), *step, valid, 0.125, ref.H2O, 8, 4, 0)
        torch.library.opcheck(torch.ops.less_cuda.decode_step_.default, args)
    pool = random_cache(3, 2, 9, 64, 4, torch.float32, 8, gen)
    args = (*vars(pool).values(), *step, None, 0.125, ref.H2O, 8, 4, 0, torch.tensor([2, 0]))
    torch.library.opcheck(torch.ops.less_cuda.decode_step_.default, args)


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) fails on any graph break, so the op traces as one node."""
    gen = torch.Generator().manual_seed(6)
    cache = random_cache(1, 2, 9, 64, 4, torch.float32, 8, gen)
    expected = clone_cache(cache)
    q, k, v, phi, psi = new_token(1, 4, 2, 64, 4, torch.float32, gen)

    def step(cache, q, k, v, phi, psi):
        return ops.less_decode_step_(cache, q, k, v, phi, psi, None, "h2o", 8, 4)

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(cache, q, k, v, phi, psi)
    ref_out = reference_steps(expected, q, k, v, phi, psi, None, 0.125, ref.H2O, 8, 4, 0)
    assert_same_step(cache, expected, out, ref_out, "compiled: ")


def test_rejects_bad_input():
    gen = torch.Generator().manual_seed(7)
    cache = random_cache(1, 2, 9, 64, 4, torch.float32, 8, gen)
    q, k, v, phi, psi = new_token(1, 4, 2, 64, 4, torch.float32, gen)
    step = ops.less_decode_step_
    with pytest.raises(RuntimeError, match="cannot hold the budget"):
        step(cache, q, k, v, phi, psi, None, "h2o", 9, 4)
    with pytest.raises(RuntimeError, match="valid must be Bool"):
        step(cache, q, k, v, phi, psi, torch.ones(1, dtype=torch.int32), "h2o", 8, 4)
    with pytest.raises(RuntimeError, match="phi_q must have shape"):
        step(cache, q, k, v, phi[..., :3], psi, None, "h2o", 8, 4)
    with pytest.raises(RuntimeError, match="k must be"):
        step(cache, q, k.half(), v, phi, psi, None, "h2o", 8, 4)
    with pytest.raises(RuntimeError, match="must exceed recent"):
        step(cache, q, k, v, phi, psi, None, "h2o", 8, 8)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        step(cache, q[:, :3], k, v, phi[:, :3], psi, None, "h2o", 8, 4)
    with pytest.raises(RuntimeError, match="given together"):
        step(cache, q, k, v, None, psi, None, "h2o", 8, 4)
    with pytest.raises(RuntimeError, match="needed for a rank-4 state"):
        step(cache, q, k, v, None, None, None, "h2o", 8, 4)
    empty = SlotCache.empty(1, 2, 9, 0, 4, torch.float32)
    with pytest.raises(RuntimeError, match="head_dim must be positive"):
        step(empty, q[..., :0], k[..., :0], v[..., :0], phi, psi, None, "h2o", 8, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R", [0, 8])
def test_multi_token_call_equals_token_by_token(dtype, R):
    """T tokens in one call (strided slices of the model's [B, T, H, D] layout, pad tokens among them) step exactly
    like T single-token reference steps."""
    gen = torch.Generator().manual_seed(13)
    B, Hkv, G, D, S, T = 2, 2, 3, 64, 17, 6
    cache = random_cache(B, Hkv, S, D, R, dtype, 12, gen)
    expected = clone_cache(cache)
    q = torch.randn(B, T, Hkv * G, D, generator=gen).to(dtype).transpose(1, 2)
    k, v = (torch.randn(B, T, Hkv, D, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))
    phi, psi = torch.rand(B, Hkv * G, T, R, generator=gen), torch.rand(B, Hkv, T, R, generator=gen)
    phi, psi = (phi, psi) if R else (None, None)
    valid = torch.tensor([[True] * T, [False, True, True, False, True, True]])
    out = ops.less_decode_step_(cache, q, k, v, phi, psi, valid, "h2o", S - 1, 4)
    for t in range(T):
        maps = (phi[:, :, t], psi[:, :, t]) if R else (None, None)
        ref_out = reference_steps(expected, q[:, :, t], k[:, :, t], v[:, :, t], *maps, valid[:, t], D**-0.5, ref.H2O,
                                  S - 1, 4, 0)  # fmt: skip
        real = valid[:, t]
        assert_close_ratio(out[:, :, t][real], ref_out[real], what=f"token {t} out")
    assert torch.equal(cache.pos, expected.pos) and torch.equal(cache.next_position, expected.next_position)
    assert_close_ratio(cache.H, expected.H, torch.float32, what="H")
    assert_close_ratio(cache.scores, expected.scores, torch.float32, what="scores")


def pool_bytes(pool: SlotCache) -> torch.Tensor:
    """The pool's whole byte buffer (every field views the same storage)."""
    storage = pool.k.untyped_storage()
    return torch.tensor([], dtype=torch.uint8).set_(storage).clone()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("R", [0, 8])
def test_step_in_place_on_pool_rows_equals_step_on_gathered_rows(dtype, policy, R):
    """state_rows: the step on a vLLM-like pool (fields interleaved in pages, rows a page apart, unused rows holding
    random bytes and NaNs) updates exactly the given rows, bit for bit as the step on those rows gathered into a
    contiguous cache; every other byte of the pool is untouched. Three tokens, pad tokens among them."""
    gen = torch.Generator().manual_seed(17 + R)
    B, N, Hkv, G, D, S, T = 3, 7, 2, 3, 64, 17, 3
    cache = random_cache(B, Hkv, S, D, R, dtype, 12, gen)
    pool = paged_pool(N, Hkv, S, D, R, dtype, gen)
    rows = torch.tensor([5, 0, 3])
    place_rows(pool, rows, cache)
    before = pool_bytes(pool)
    q = torch.randn(B, Hkv * G, T, D, generator=gen).to(dtype)
    k, v = (torch.randn(B, Hkv, T, D, generator=gen).to(dtype) for _ in range(2))
    phi, psi = (torch.rand(B, Hkv * G, T, R, generator=gen), torch.rand(B, Hkv, T, R, generator=gen)) if R else (None, None)
    valid = torch.tensor([[True, True, True], [False, True, True], [True, False, True]])
    expected = clone_cache(cache)
    want = ops.less_decode_step_(expected, q, k, v, phi, psi, valid, policy, S - 1, 4, 2)
    out = ops.less_decode_step_(pool, q, k, v, phi, psi, valid, policy, S - 1, 4, 2, state_rows=rows)
    assert torch.equal(out[valid[:, None, :].expand(-1, Hkv * G, -1)], want[valid[:, None, :].expand(-1, Hkv * G, -1)])
    for name, field in vars(pool).items():
        assert torch.equal(field[rows], getattr(expected, name)), f"{name} of the pool's rows"
    after = pool_bytes(pool)
    place_rows(pool, rows, cache)  # the rows' old contents back: the rest of the pool must be as it was
    assert torch.equal(pool_bytes(pool), before), "the step wrote outside its rows"
    assert not torch.equal(after, before)


def test_state_rows_rejects_bad_rows_and_shared_memory():
    gen = torch.Generator().manual_seed(19)
    pool = paged_pool(4, 2, 9, 64, 4, torch.float32, gen)
    place_rows(pool, torch.arange(4), random_cache(4, 2, 9, 64, 4, torch.float32, 8, gen))
    q, k, v, phi, psi = new_token(2, 4, 2, 64, 4, torch.float32, gen)

    def step(cache, rows):
        return ops.less_decode_step_(cache, q, k, v, phi, psi, None, "h2o", 8, 4, state_rows=rows)

    with pytest.raises(RuntimeError, match="holds row 1 twice"):
        step(pool, torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match=r"state_rows\[1\] = 4 is outside the state's 4 rows"):
        step(pool, torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match="state_rows must be Long"):
        step(pool, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="state_rows must have shape"):
        step(pool, torch.tensor([0, 1, 2]))
    inside_psi = torch.as_strided(pool.psi, pool.scores.shape, (pool.psi.stride(0), 9, 1), pool.psi.storage_offset())
    overlapping = SlotCache(**{**vars(pool), "scores": inside_psi})
    with pytest.raises(RuntimeError, match="must not share memory"):
        step(overlapping, torch.tensor([0, 1]))
    pool.z[2, 0, 1] = float("nan")
    with pytest.raises(RuntimeError, match=r"z must be finite and >= 0 .* at index \[2, 0, 1\]"):
        step(pool, torch.tensor([0, 2]))
    step(pool, torch.tensor([0, 1]))  # row 2's NaN is not read when row 2 is not stepped
