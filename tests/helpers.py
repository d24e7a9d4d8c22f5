"""Test helpers: comparisons that report how far off a result is, not just that it is off."""

from __future__ import annotations

import torch
from torch import Tensor

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
