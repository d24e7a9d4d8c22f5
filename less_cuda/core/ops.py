"""Thin, autograd-aware Python entry points to the compiled LESS ops (`torch.ops.less_cuda.*`).

Each op is declared once in csrc/ops.cpp; the CPU and CUDA kernels register themselves for their dispatch keys.
Here each op gets a fake (meta) implementation for tracing and, where training needs it, a gradient. The math of
every op is `less_cuda.reference`; backward passes recompute through it, which is exact and simple, and the
kernels stay forward-only.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .._build import load_extension
from . import reference
from .policy import policy_id
from .state import SlotCache

load_extension()  # less_cuda._C's op registrations, once its build record matches the running torch
_ops = torch.ops.less_cuda


def _check_tensors(required: dict[str, object], optional: Optional[dict[str, object]] = None) -> None:
    """The wrappers' own check, before they touch an argument: a non-tensor fails with its name, not as an
    AttributeError inside the wrapper. Everything about the tensors themselves the ops check (csrc/checks.cpp)."""
    for name, t in required.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"less_cuda: {name} must be a tensor, got {type(t).__name__}")
    for name, t in (optional or {}).items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"less_cuda: {name} must be a tensor or None, got {type(t).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# (c) decode attention
# ---------------------------------------------------------------------------------------------------------------
@torch.library.register_fake("less_cuda::decode_attention")
def _decode_attention_fake(q, k, v, pos, phi_q, H, z, scale):
    B, Hq, D = q.shape
    return q.new_empty(B, Hq, D), q.new_empty(B, k.shape[1], k.shape[2], dtype=torch.float32)


def _decode_attention_setup(ctx, inputs, output):
    q, k, v, pos, phi_q, H, z, scale = inputs
    ctx.save_for_backward(q, k, v, pos, phi_q, H, z)
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])


def _decode_attention_backward(ctx, grad_out, _grad_probs):
    q, k, v, pos, phi_q, H, z = ctx.saved_tensors
    inputs = [q, k, v, phi_q, H, z]
    wanted = [t is not None and ctx.needs_input_grad[i] for t, i in zip(inputs, (0, 1, 2, 4, 5, 6))]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(w) if t is not None else None for t, w in zip(inputs, wanted)]
        out, _ = reference.decode_attention(leaves[0], leaves[1], leaves[2], pos, *leaves[3:], ctx.scale)
        diff = [t for t, w in zip(leaves, wanted) if w]
        grads = iter(torch.autograd.grad(out, diff, grad_out, allow_unused=True)) if diff else iter(())
    gq, gk, gv, gphi, gH, gz = (next(grads) if w else None for w in wanted)
    return gq, gk, gv, None, gphi, gH, gz, None


torch.library.register_autograd(
    "less_cuda::decode_attention", _decode_attention_backward, setup_context=_decode_attention_setup
)


def default_scale(q: Tensor, scale: Optional[float]) -> float:
    """The logit scale: `scale`, or 1 / sqrt(head_dim). head_dim 0 gives NaN, which the ops reject with a message
    naming the head dim (not a ZeroDivisionError here). A given scale must be finite: NaN or inf would turn every
    logit into NaN. (Checked here, not in the ops: the op schemas' checks in csrc/checks.h do not take the scale.)"""
    if scale is None:
        return q.shape[-1] ** -0.5 if q.shape[-1] > 0 else math.nan
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"less_cuda: scale must be a finite number or None, got {scale!r}")
    return value


def less_decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    phi_q: Optional[Tensor] = None,
    H: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """One decode step of LESS attention over the kept slots plus the low-rank state.

    Args:
        q: [B, Hq, D] queries of the new token (fp32, bf16 or fp16).
        k, v: [B, Hkv, S, D] slot keys and values, q's dtype; Hq must be a multiple of Hkv (GQA / MQA).
        pos: [B, Hkv, S] int32 token position per slot, negative for a free slot.
        phi_q: [B, Hq, R] fp32 phi(q); H: [B, Hkv, R, D] fp32; z: [B, Hkv, R] fp32. All three, or none for
            sparse-only attention.
        scale: logit scale, default 1 / sqrt(D).
        state_rows: [B] int64, distinct: `cache` is then a pool of N rows (every field [N, ...], e.g. a serving
            engine's per-request state) and batch row b updates row state_rows[b] in place, with no gather and no
            scatter. Each field's rows may be a stride apart (contiguous inside), as vLLM lays out its state pages.
    Returns:
        out: [B, Hq, D] in q's dtype; (phi(q)H + sum_j e^{s_j} v_j) / (phi(q)z + sum_j e^{s_j}).
        probs: [B, Hkv, S] fp32 softmax probabilities over the occupied slots, summed over each KV head's
            query heads (what H2O accumulates). Not differentiable.
    Differentiable in q, k, v, phi_q, H and z.
    """
    _check_tensors(dict(q=q, k=k, v=v, pos=pos), dict(phi_q=phi_q, H=H, z=z))
    scale = default_scale(q, scale)
    q, k, v, pos, phi_q, H, z = (None if t is None else t.contiguous() for t in (q, k, v, pos, phi_q, H, z))
    return _ops.decode_attention(q, k, v, pos, phi_q, H, z, scale)


# ---------------------------------------------------------------------------------------------------------------
# (a) H2O score accumulation and eviction
# ---------------------------------------------------------------------------------------------------------------
@torch.library.register_fake("less_cuda::score_and_evict_")
def _score_and_evict_fake(scores, pos, probs, policy, budget, recent, sinks):
    return scores.new_empty(scores.shape[:2], dtype=torch.int64)


def less_score_and_evict_(
    scores: Tensor,
    pos: Tensor,
    probs: Tensor,
    policy: Union[int, str],
    budget: int,
    recent: int = 0,
    sinks: int = 0,
) -> Tensor:
    """Accumulate H2O scores and evict at most one token per (batch, KV head), in place.

    Args:
        scores: [B, Hkv, S] fp32 accumulated attention per slot (updated in place).
        pos: [B, Hkv, S] int32 slot positions (the victim's becomes -1).
        probs: [B, Hkv, S] fp32 from `less_decode_attention`.
        policy: "h2o" / "lambda" or their ids; budget: tokens kept after eviction;
            scores and pos must be contiguous (they are updated in place, so no copy is made);
        recent: H2O's protected newest tokens; sinks: Λ's protected first tokens.
    Returns:
        victim: [B, Hkv] int64 index of the freed slot, or -1 where nothing was evicted. Deterministic: the lowest
        (score, slot) among evictable slots for H2O, the oldest non-sink for Λ.
    """
    _check_tensors(dict(scores=scores, pos=pos, probs=probs))
    return _ops.score_and_evict_(scores, pos, probs, policy_id(policy), budget, recent, sinks)


# ---------------------------------------------------------------------------------------------------------------
# (b) rank-R state update
# ---------------------------------------------------------------------------------------------------------------
@torch.library.register_fake("less_cuda::state_fold")
def _state_fold_fake(psi, v, mask):
    B, Hkv, _, R = psi.shape
    return psi.new_empty(B, Hkv, R, v.shape[-1]), psi.new_empty(B, Hkv, R)


def _state_fold_setup(ctx, inputs, output):
    psi, v, mask = inputs
    ctx.save_for_backward(psi, v, mask)


def _state_fold_backward(ctx, grad_H, grad_z):
    psi, v, mask = ctx.saved_tensors
    keep = 1.0 if mask is None else mask[..., None].float()
    grad_psi = grad_v = None
    if ctx.needs_input_grad[0]:
        grad_psi = (v.float() @ grad_H.transpose(-1, -2) + grad_z[:, :, None]) * keep
    if ctx.needs_input_grad[1]:
        grad_v = ((psi.float() @ grad_H) * keep).to(v.dtype)
    return grad_psi, grad_v, None


torch.library.register_autograd("less_cuda::state_fold", _state_fold_backward, setup_context=_state_fold_setup)


@torch.library.register_fake("less_cuda::state_update_")
def _state_update_fake(H, z, psi, v, mask):
    return None


def less_state_fold(psi: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """What N tokens add to the low-rank state: dH = sum_n psi_n^T v_n, dz = sum_n psi_n.

    Args:
        psi: [B, Hkv, N, R] fp32 psi(k) of the tokens; v: [B, Hkv, N, D] their values (fp32, bf16 or fp16);
        mask: [B, Hkv, N] bool, False for tokens to skip (padding, kept tokens); None folds all.
    Returns:
        dH: [B, Hkv, R, D] fp32, dz: [B, Hkv, R] fp32. Differentiable in psi and v.
    """
    _check_tensors(dict(psi=psi, v=v), dict(mask=mask))
    return _ops.state_fold(psi.contiguous(), v.contiguous(), None if mask is None else mask.contiguous())


def less_state_update_(H: Tensor, z: Tensor, psi: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> None:
    """In-place `H += dH; z += dz` of `less_state_fold`, for the decode path (no allocation, one writer per
    element). H: [B, Hkv, R, D] fp32, z: [B, Hkv, R] fp32; the rest as `less_state_fold`, but used as given (no
    copy), so every tensor must be contiguous."""
    _check_tensors(dict(H=H, z=z, psi=psi, v=v), dict(mask=mask))
    _ops.state_update_(H, z, psi, v, mask)


# ---------------------------------------------------------------------------------------------------------------
# The fused decode step: insert, attend, score, evict and fold in one op
# ---------------------------------------------------------------------------------------------------------------
@torch.library.register_fake("less_cuda::decode_step_")
def _decode_step_fake(k_slots, v_slots, psi_slots, pos, scores, H, z, next_position, q, k, v, phi_q, psi_k, valid,
                      scale, policy, budget, recent, sinks, state_rows=None):
    return torch.empty_like(q)


def less_decode_step_(
    cache: SlotCache,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: Optional[Tensor],
    psi_k: Optional[Tensor],
    valid: Optional[Tensor],
    policy: Union[int, str],
    budget: int,
    recent: int = 0,
    sinks: int = 0,
    scale: Optional[float] = None,
    state_rows: Optional[Tensor] = None,
) -> Tensor:
    """One layer's decode step for T new tokens in turn, in place on `cache` (`reference.decode_step` per token):
    write each token into the first free slot, attend over the slots plus the low-rank state, accumulate H2O
    scores, evict at most one token per (batch, KV head) and fold it into H, z. One op call; on CUDA one kernel
    launch per token when the slots fit a block.

    Args:
        cache: the layer's `SlotCache` (S > budget slots, R = psi's last dim), updated in place, next_position
            advanced by the real tokens.
        q: [B, Hq, T, D] the new tokens' queries; k, v: [B, Hkv, T, D] their keys and values (q's dtype).
            [B, Hq, D] / [B, Hkv, D] for a single token.
        phi_q: [B, Hq, T, R] fp32 phi(q); psi_k: [B, Hkv, T, R] fp32 psi(k). None for both when R = 0 (sparse only).
        valid: [B, T] bool, False for a pad token (it takes no slot, adds no score and evicts nothing); None when
            every token is real.
        policy: "h2o" / "lambda" or their ids; budget, recent, sinks: as `less_score_and_evict_`.
        scale: logit scale, default 1 / sqrt(D).
        state_rows: [B] int64, distinct: `cache` is then a pool of N rows (every field [N, ...], e.g. a serving
            engine's per-request state) and batch row b updates row state_rows[b] in place, with no gather and no
            scatter. Each field's rows may be a stride apart (contiguous inside), as vLLM lays out its state pages.
    Returns:
        out: [B, Hq, T, D] (or [B, Hq, D]) in q's dtype. Not differentiable (training uses the parallel form).
    """
    if not isinstance(cache, SlotCache):
        raise TypeError(f"less_cuda: cache must be a SlotCache, got {type(cache).__name__}")
    _check_tensors(dict(q=q, k=k, v=v), dict(phi_q=phi_q, psi_k=psi_k, valid=valid, state_rows=state_rows))
    single = q.dim() == 3
    if single:
        # The single-token form adds the T axis to every argument; one given with it already would reach the op one
        # dimension off and fail there with a confusing shape.
        given = dict(k=k, v=v, phi_q=phi_q, psi_k=psi_k, valid=valid)
        wrong = {n: tuple(t.shape) for n, t in given.items()
                 if t is not None and t.dim() != (1 if n == "valid" else 3)}  # fmt: skip
        if wrong:
            raise ValueError(f"less_cuda: with a single token's q {tuple(q.shape)} = [B, Hq, D], k and v must be "
                             f"[B, Hkv, D], phi_q and psi_k [B, H, R] and valid [B]; got {wrong}")
        q, k, v = q[:, :, None], k[:, :, None], v[:, :, None]
        phi_q, psi_k = (None if t is None else t[:, :, None] for t in (phi_q, psi_k))
        valid = None if valid is None else valid[:, None]
    scale = default_scale(q, scale)
    q, k, v, phi_q, psi_k, valid = (None if t is None else t.contiguous() for t in (q, k, v, phi_q, psi_k, valid))
    out = _ops.decode_step_(
        cache.k, cache.v, cache.psi, cache.pos, cache.scores, cache.H, cache.z, cache.next_position, q, k, v, phi_q,
        psi_k, valid, scale, policy_id(policy), budget, recent, sinks, state_rows,
    )  # fmt: skip
    return out[:, :, 0] if single else out


# ---------------------------------------------------------------------------------------------------------------
# Feature maps, inference form
# ---------------------------------------------------------------------------------------------------------------
@torch.library.register_fake("less_cuda::feature_maps")
def _feature_maps_fake(q, k, phi_w1, phi_w2, psi_w1, psi_w2, psi_scale, psi_interaction, psi_interaction_scale):
    R = phi_w2.shape[-1]
    return q.new_empty(*q.shape[:3], R, dtype=torch.float32), k.new_empty(*k.shape[:3], R, dtype=torch.float32)


def less_feature_maps(q: Tensor, k: Tensor, *weights: Tensor) -> tuple[Tensor, Tensor]:
    """phi(q) [B, Hq, T, R] and psi(k) [B, Hkv, T, R] fp32 of one layer in one call, without gradients: the form
    `feature_maps.LayerFeatureMaps.features` uses at decode on CPU. q [B, Hq, T, D], k [B, Hkv, T, D]; weights: phi_w1,
    phi_w2, psi_w1, psi_w2, psi_scale, psi_interaction, psi_interaction_scale (`LayerFeatureMaps.inference_weights`)."""
    _check_tensors(dict(q=q, k=k, **{f"weights[{i}]": w for i, w in enumerate(weights)}))
    return _ops.feature_maps(q.contiguous(), k.contiguous(), *weights)
