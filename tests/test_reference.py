"""Self-consistency of the ground truth: the streaming and parallel forms agree, an empty state is softmax
attention, prefill selection honours budgets and padding."""

import math

import pytest
import torch
import torch.nn.functional as F

from less_cuda.core import reference as ref
from less_cuda.core import state as slots
from less_cuda.core.policy import Policy


def _stream(q, k, v, phi, psi, scale, policy, budget, recent, sinks):
    B, Hkv, T, D = k.shape
    cache = slots.SlotCache.empty(B, Hkv, budget + 1, D, psi.shape[-1] if psi is not None else 1, k.dtype)
    outs = []
    for t in range(T):
        outs.append(
            ref.decode_step(
                cache, q[:, :, t], k[:, :, t], v[:, :, t],
                None if phi is None else phi[:, :, t], None if psi is None else psi[:, :, t],
                torch.full((B,), t), scale, policy, budget, recent, sinks,
            )
        )
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("policy,budget,recent,sinks", [(ref.H2O, 10, 4, 0), (ref.H2O, 6, 0, 0), (ref.LAMBDA, 9, 0, 2)])
@pytest.mark.parametrize("lowrank", [True, False])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (8, 1)])
def test_parallel_form_equals_stream(policy, budget, recent, sinks, lowrank, Hq, Hkv):
    torch.manual_seed(0)
    B, T, D, R = 2, 48, 16, 4
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    phi = torch.rand(B, Hq, T, R) if lowrank else None
    psi = torch.rand(B, Hkv, T, R) if lowrank else None
    scale = D**-0.5
    kept = slots.stream_kept_masks(q, k, scale, policy, budget, recent, sinks, attend=ref.decode_attention,
                                   evict_=ref.score_and_evict_)
    assert kept.sum(-1).max() == budget + 1
    parallel = ref.parallel_attention(q, k, v, kept, phi, psi, scale)
    torch.testing.assert_close(parallel, _stream(q, k, v, phi, psi, scale, policy, budget, recent, sinks))


def test_empty_state_is_exactly_softmax_attention():
    torch.manual_seed(1)
    B, Hq, Hkv, S, D, R = 2, 6, 3, 20, 32, 8
    q, k, v = torch.randn(B, Hq, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    pos = torch.arange(S, dtype=torch.int32).expand(B, Hkv, S).contiguous()
    H, z = torch.zeros(B, Hkv, R, D), torch.zeros(B, Hkv, R)
    with_state, probs = ref.decode_attention(q, k, v, pos, torch.rand(B, Hq, R), H, z, D**-0.5)
    sparse_only, _ = ref.decode_attention(q, k, v, pos, None, None, None, D**-0.5)
    assert torch.equal(with_state, sparse_only)
    sdpa = F.scaled_dot_product_attention(q[:, :, None], k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(sparse_only, sdpa[:, :, 0])
    torch.testing.assert_close(probs.sum(-1), torch.full((B, Hkv), 2.0))


def test_decode_attention_is_the_contract_formula():
    """out = (phi H + sum e^s v) / (phi z + sum e^s), written out directly."""
    torch.manual_seed(2)
    B, Hq, Hkv, S, D, R = 1, 2, 1, 7, 8, 3
    q, k, v = torch.randn(B, Hq, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    pos = torch.tensor([[[0, 1, -1, 3, 4, -1, 6]]], dtype=torch.int32)
    phi, H, z = torch.rand(B, Hq, R), torch.rand(B, Hkv, R, D), torch.rand(B, Hkv, R)
    out, _ = ref.decode_attention(q, k, v, pos, phi, H, z, 0.5)
    e = torch.exp(0.5 * torch.einsum("bgd,bsd->bgs", q, k[:, 0])) * (pos[:, 0] >= 0)[:, None]
    expected = (phi @ H[:, 0] + e @ v[:, 0]) / ((phi * z[:, 0, None]).sum(-1) + e.sum(-1))[..., None]
    torch.testing.assert_close(out, expected)


def test_empty_row_gives_zero_not_nan():
    q, kv = torch.randn(1, 2, 4), torch.randn(1, 1, 3, 4)
    pos = torch.full((1, 1, 3), ref.EMPTY, dtype=torch.int32)
    out, probs = ref.decode_attention(q, kv, kv, pos, None, None, None, 1.0)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(probs, torch.zeros_like(probs))


def test_eviction_ties_go_to_lowest_slot():
    scores = torch.zeros(1, 1, 5)
    pos = torch.tensor([[[7, 3, 9, 1, 12]]], dtype=torch.int32)
    victim = ref.score_and_evict_(scores, pos, torch.zeros(1, 1, 5), ref.H2O, 4, 1, 0)
    assert victim.tolist() == [[0]] and pos.tolist() == [[[-1, 3, 9, 1, 12]]]
    pos = torch.tensor([[[7, 3, 9, 1, 12]]], dtype=torch.int32)
    victim = ref.score_and_evict_(scores, pos, torch.zeros(1, 1, 5), ref.LAMBDA, 4, 0, 2)
    assert victim.tolist() == [[1]]  # the oldest non-sink: position 3 (positions 0, 1 are sinks)


@pytest.mark.parametrize("policy", [Policy("h2o", 8, recent=3), Policy("lambda", 8, sinks=2)])
def test_prefill_keep_respects_budget_and_padding(policy):
    torch.manual_seed(3)
    B, Hq, Hkv, T, D = 3, 4, 2, 20, 8
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    valid[2, :16] = False  # a prompt shorter than the budget
    q, k = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D)
    scores = ref.prefill_scores(q, k, valid, D**-0.5, chunk=7)
    assert torch.all(scores[~valid[:, None].expand_as(scores)] == 0)
    p = policy.resolve(T)
    keep = slots.prefill_keep(scores, valid, p.policy_id, p.budget, p.recent, p.sinks)
    n_valid = valid.sum(-1)
    assert torch.equal(keep.sum(-1), n_valid.clamp(max=p.budget)[:, None].expand(B, Hkv))
    assert not keep[~valid[:, None].expand_as(keep)].any()
    positions = slots.token_positions(valid)
    for b in range(B):
        newest = positions[b].max()
        for h in range(Hkv):
            kept_pos = set(positions[b][keep[b, h]].tolist())
            if p.policy_id == ref.H2O:
                assert set(range(newest - p.recent + 1, newest + 1)) <= kept_pos
            elif n_valid[b] > p.budget:
                assert kept_pos == set(range(p.sinks)) | set(range(newest - p.recent + 1, newest + 1))


def test_prefill_scores_are_attention_column_sums():
    torch.manual_seed(4)
    q, k = torch.randn(1, 2, 9, 4), torch.randn(1, 1, 9, 4)
    scores = ref.prefill_scores(q, k, torch.ones(1, 9, dtype=torch.bool), 0.5, chunk=4)
    logits = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(scores[0, 0], torch.softmax(logits, -1).sum((1, 2))[0])


def test_window_scores_are_the_last_rows_attention_max_pooled():
    torch.manual_seed(4)
    q, k = torch.randn(1, 2, 9, 4), torch.randn(1, 1, 9, 4)
    scores = ref.prefill_window_scores(q, k, torch.ones(1, 9, dtype=torch.bool), 0.5, window=3)
    logits = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -math.inf)
    last_rows = torch.softmax(logits, -1)[0, :, -3:].sum((0, 1))  # [9]: the last 3 query rows of both heads
    reach = ref.WINDOW_POOL // 2
    pooled = torch.stack([last_rows[max(0, j - reach) : j + reach + 1].max() for j in range(9)])
    torch.testing.assert_close(scores[0, 0], pooled)


def test_window_scores_clip_the_window_to_each_rows_real_tokens():
    """Left padding shifts nothing, and a window beyond a prompt scores all of its rows: the pooled column sums."""
    torch.manual_seed(5)
    T, pad = 12, 4
    q, k = torch.randn(2, 4, T, 8), torch.randn(2, 2, T, 8)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :pad] = False
    for window in (1, 5, T - pad, T + 7):
        padded = ref.prefill_window_scores(q, k, valid, 0.3, window)
        alone = ref.prefill_window_scores(q[1:, :, pad:], k[1:, :, pad:], valid[1:, pad:], 0.3, window)
        torch.testing.assert_close(padded[1, :, pad:], alone[0])
        assert padded[1, :, :pad].eq(0).all()
    whole = ref.prefill_window_scores(q, k, valid, 0.3, window=T)
    sums = ref.prefill_scores(q, k, valid, 0.3)
    pooled = torch.nn.functional.max_pool1d(sums, ref.WINDOW_POOL, stride=1, padding=ref.WINDOW_POOL // 2)
    torch.testing.assert_close(whole, pooled.masked_fill(~valid[:, None], 0.0))


def test_gather_tokens_packs_kept_tokens_in_position_order():
    keep = torch.tensor([[[True, False, True, True, False]]])
    values = torch.arange(5.0).view(1, 1, 5, 1) + 10
    (packed, index) = slots.gather_tokens(keep, 4, values)
    assert index.tolist() == [[[0, 2, 3, -1]]]
    assert packed.flatten().tolist() == [10.0, 12.0, 13.0, 0.0]
    with pytest.raises(ValueError, match="do not fit"):
        slots.gather_tokens(keep, 2, values)


def test_state_fold_masks_tokens():
    psi, v = torch.rand(1, 1, 3, 2), torch.randn(1, 1, 3, 4)
    mask = torch.tensor([[[True, False, True]]])
    dH, dz = ref.state_fold(psi, v, mask)
    torch.testing.assert_close(dH[0, 0], psi[0, 0, [0, 2]].T @ v[0, 0, [0, 2]])
    torch.testing.assert_close(dz[0, 0], psi[0, 0, [0, 2]].sum(0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="h2o", budget=4, recent=4), "budget > recent"),
        (dict(kind="lambda", budget=4, sinks=4), "budget > sinks"),
        (dict(kind="snap", budget=4), "policy kind"),
        (dict(kind="h2o", budget=1.5), r"\(0, 1\]"),
        (dict(kind="h2o", budget=1), "at least 2"),
    ],
)
def test_policy_rejects_bad_budgets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Policy(**kwargs).resolve(100)


def test_policy_resolves_fractions():
    assert Policy("h2o", 0.05).resolve(1024).as_args() == (ref.H2O, 51, 25, 0)
    assert Policy("lambda", 0.05, sinks=4).resolve(1024).as_args() == (ref.LAMBDA, 51, 47, 4)
