"""Test helpers: comparisons that report how far off a result is, not just that it is off, and the reference side of
the fused decode step (shared by the CPU-op, CUDA-harness and GPU tests)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from torch import Tensor

from less_cuda.core import reference
from less_cuda.core.state import SlotCache

WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
"""Real text for the tests that need it: beside the repository, as the project's machines and CI lay it out."""


def missing_input(what: str) -> NoReturn:
    """A test input from outside the repository is missing (the WikiText-2 text beside it, the SmolLM2 wheel that
    `make test` installs). Outside CI that is a skip with the reason; under CI, which must provide both, a failure,
    so that no test is skipped there silently."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must provide it)")
    pytest.skip(what)

# Relative error budget per dtype, as a multiple of the dtype's unit roundoff: fp32 tight, half types loose.
_EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
_ULPS = {torch.float32: 256, torch.bfloat16: 8, torch.float16: 16}


def error_ratio(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max(max |expected|, tiny): a relative error of the whole tensor."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp(min=1e-30)) if e.numel() else 0.0


def assert_close_ratio(actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None, what: str = "") -> None:
    """Assert that actual matches expected to within a dtype-based relative error, and say by how much it misses."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{what}: non-finite values differ"
    budget = _ULPS.get(dtype, 256) * _EPS.get(dtype, 2.0**-23)
    ratio = error_ratio(actual, expected)
    assert ratio <= budget, f"{what}: relative error {ratio:.3e} exceeds {budget:.3e} ({ratio / budget:.1f}x) for {dtype}"


def clone_cache(cache: SlotCache) -> SlotCache:
    return SlotCache(*(x.clone() for x in vars(cache).values()))


def reference_steps(cache, q, k, v, phi_q, psi_k, valid, scale, policy, budget, recent, sinks):
    """reference.decode_step token by token with the op's bookkeeping: a token's position is next_position, which
    advances by the real tokens. Shapes as `ops.less_decode_step_` (one token [B, H, D] or T tokens [B, H, T, D])."""
    single = q.dim() == 3
    if single:
        q, k, v = q[:, :, None], k[:, :, None], v[:, :, None]
        phi_q, psi_k = (None if x is None else x[:, :, None] for x in (phi_q, psi_k))
        valid = None if valid is None else valid[:, None]
    outs = []
    for t in range(q.shape[2]):
        real = torch.ones(q.shape[0], dtype=torch.bool) if valid is None else valid[:, t]
        position = torch.where(real, cache.next_position, torch.full_like(cache.next_position, reference.EMPTY))
        phi_t, psi_t = (None if x is None else x[:, :, t] for x in (phi_q, psi_k))
        outs.append(reference.decode_step(cache, q[:, :, t], k[:, :, t], v[:, :, t], phi_t, psi_t, position, scale,
                                          policy, budget, recent, sinks))  # fmt: skip
        cache.next_position += real.to(torch.int32)
    return outs[0] if single else torch.stack(outs, dim=2)


def assert_same_step(cache: SlotCache, expected: SlotCache, out: Tensor, expected_out: Tensor, what: str = "") -> None:
    """A fused step against the reference from the same state: bookkeeping and the token's copies exactly equal,
    the numbers within the dtype's ratio tolerance."""
    assert torch.equal(cache.pos, expected.pos), f"{what}positions (victims) differ"
    assert torch.equal(cache.next_position, expected.next_position), f"{what}next positions differ"
    assert_close_ratio(out, expected_out, what=f"{what}out")
    for name in ("k", "v", "psi"):  # copies of the token: exact
        assert torch.equal(getattr(cache, name), getattr(expected, name)), f"{what}{name} slots differ"
    assert_close_ratio(cache.scores, expected.scores, torch.float32, what=f"{what}scores")
    assert_close_ratio(cache.H, expected.H, torch.float32, what=f"{what}H")
    assert_close_ratio(cache.z, expected.z, torch.float32, what=f"{what}z")
