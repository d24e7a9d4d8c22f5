"""Long decode streams through the fused op (less_decode_step_): 20,000 steps by default (CI), 100,000 with
LESS_LONG_STREAM_STEPS=100000 (`make test-long`). Every output, H and z stays finite, and at ten checkpoints along the
way one step from the stream's current state is checked against reference.decode_step run on a copy of it.

The batch rows hold three states side by side: one that grows from zero as tokens are evicted, one that stays all
zero (phi = psi = 0: exactly softmax attention), and one whose z starts near 1e30 (the state outweighs every slot).
Calls of 50 tokens (a few of them pad tokens) cycle through three kinds of queries: ordinary ones, and ones whose
logits are all around +1e4 or all around -1e4 (q along the direction that every key shares), where only the
max-subtracted softmax and the log-space merge keep the numbers finite.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_same_step, clone_cache, error_ratio, reference_steps

from less_cuda.core import ops
from less_cuda.core import reference as ref
from less_cuda.core.state import SlotCache

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STEPS = int(os.environ.get("LESS_LONG_STREAM_STEPS", "20000"))
CHECKPOINTS = 10
B, HKV, G, D, R, BUDGET, T = 3, 2, 3, 64, 8, 64, 50  # rows: growing state, all-zero state, huge z
SCALE = D**-0.5
EXTREME_LOGIT = 1e4  # the size of every logit of an extreme query, before the keys' spread
KINDS = ("ordinary", "all logits large", "all logits very negative")


def tokens(gen: torch.Generator, n: int, kind: str, dtype: torch.dtype) -> dict:
    """n new tokens per row. Every key has 3 (+-0.3) along dimension 0, so a query along that dimension gives
    logits of one sign for all slots; phi(q), psi(k) of row 1 are zero, so its state stays empty."""
    q = torch.randn(B, HKV * G, n, D, generator=gen)
    k = torch.randn(B, HKV, n, D, generator=gen)
    k[..., 0] = 3.0 + 0.3 * torch.randn(B, HKV, n, generator=gen)
    if kind != "ordinary":
        sign = 1.0 if kind == "all logits large" else -1.0
        q = 0.1 * q
        q[..., 0] = sign * EXTREME_LOGIT / (3.0 * SCALE)
    phi, psi = torch.rand(B, HKV * G, n, R, generator=gen), torch.rand(B, HKV, n, R, generator=gen)
    phi[1], psi[1] = 0.0, 0.0
    v = torch.randn(B, HKV, n, D, generator=gen)
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), phi_q=phi, psi_k=psi)


def huge_z_cache(dtype: torch.dtype, gen: torch.Generator) -> SlotCache:
    """An empty cache whose row 2 starts from a state with z near 1e30 and H consistent with it (|H| <~ z |v|)."""
    cache = SlotCache.empty(B, HKV, BUDGET + 1, D, R, dtype)
    cache.z[2] = 1e30 * torch.empty(HKV, R).uniform_(0.5, 1.0, generator=gen)
    cache.H[2] = cache.z[2, :, :, None] * torch.randn(HKV, R, D, generator=gen) * 0.5
    return cache


def assert_step(cache: SlotCache, expected: SlotCache, out: torch.Tensor, ref_out: torch.Tensor, kind: str,
                what: str) -> None:  # fmt: skip
    """helpers.assert_same_step, except that for extreme logits `out` is held to what fp32 can resolve: a logit of
    size L only to about L * 2^-24, an error that the reference's own softmax, exp(s - logsumexp(s)), passes on to
    every probability (at |L| = 1e4, about 1e-3 relative, where the kernels, normalising by the sum, do better)."""
    if kind == "ordinary":
        return assert_same_step(cache, expected, out, ref_out, what)
    ratio = error_ratio(out, ref_out)
    assert ratio <= 16 * EXTREME_LOGIT * 2**-24, f"{what}out: relative error {ratio:.3e}"
    assert_same_step(cache, expected, ref_out, ref_out, what)  # the rest as usual (out checked above)


def assert_finite(cache: SlotCache, out: torch.Tensor, step: int) -> None:
    assert torch.isfinite(out).all(), f"step {step}: non-finite output"
    assert torch.isfinite(cache.H).all() and torch.isfinite(cache.z).all(), f"step {step}: non-finite state"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("policy", ["h2o", "lambda"])
def test_long_stream_stays_finite_and_matches_the_reference(policy, dtype):
    gen = torch.Generator().manual_seed(0)
    policy_id = ref.H2O if policy == "h2o" else ref.LAMBDA
    recent, sinks = (BUDGET // 2, 0) if policy == "h2o" else (BUDGET - 4, 4)
    cache = huge_z_cache(dtype, gen)
    real_tokens = torch.zeros(B, dtype=torch.int32)
    every, checkpoint, step, calls = max(1, STEPS // CHECKPOINTS), 0, 0, 0
    while step < STEPS:
        if step >= checkpoint:  # one step from the current state, through the op and through the reference
            kind = KINDS[checkpoint // every % len(KINDS)]
            token = {name: t[:, :, 0] for name, t in tokens(gen, 1, kind, dtype).items()}
            expected = clone_cache(cache)
            ref_out = reference_steps(expected, token["q"], token["k"], token["v"], token["phi_q"], token["psi_k"],
                                      None, SCALE, policy_id, BUDGET, recent, sinks)  # fmt: skip
            out = ops.less_decode_step_(cache, **token, valid=None, policy=policy, budget=BUDGET, recent=recent,
                                        sinks=sinks)  # fmt: skip
            assert_step(cache, expected, out, ref_out, kind, f"step {step} ({kind}): ")
            assert_finite(cache, out, step)
            real_tokens += 1
            step, checkpoint = step + 1, checkpoint + every
        n = min(T, STEPS - step)
        valid = torch.rand(B, n, generator=gen) > 0.05
        batch = tokens(gen, n, KINDS[calls % len(KINDS)], dtype)
        out = ops.less_decode_step_(cache, **batch, valid=valid, policy=policy, budget=BUDGET, recent=recent,
                                    sinks=sinks)  # fmt: skip
        assert_finite(cache, out, step)
        real_tokens += valid.sum(dim=1, dtype=torch.int32)
        step, calls = step + n, calls + 1
    assert torch.equal(cache.next_position, real_tokens)
    assert int((cache.pos >= 0).sum(-1).min()) == BUDGET  # full, and never over
    assert not cache.H[1].any() and not cache.z[1].any(), "the all-zero state took mass"
    assert (cache.z[0] > 0).all() and (cache.z[2] > 1e29).all()
