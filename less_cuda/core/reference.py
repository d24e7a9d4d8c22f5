"""Pure-PyTorch ground truth for every LESS computation.

Written for readers, not for speed. Every kernel (C++ CPU, CUDA) and the transformers integration are checked
against these functions.

Layout and names used throughout (one layer):
    B   batch,            Hq  query heads,    Hkv  KV heads,   G = Hq // Hkv  query heads per KV head
    S   cache slots,      D   head_dim,       R    rank of the low-rank state,  T  sequence length
    pos [B, Hkv, S] int32: absolute token position held by a slot, EMPTY (-1) for a free slot
    H   [B, Hkv, R, D] fp32 and z [B, Hkv, R] fp32: the low-rank state, sum of psi(k)^T v and psi(k) of evicted tokens

Query head `h` belongs to KV head `h // G` (the `repeat_kv` convention of transformers).

Decode attention over the kept slots and the state is
    out = (phi(q) H + sum_j e^{s_j} v_j) / (phi(q) z + sum_j e^{s_j}),   s_j = scale * q . k_j
computed as a merge of two attention states (output, log-sum-exp): the sparse softmax state and the low-rank state
(phi(q) H / phi(q) z, log phi(q) z). An empty state (phi(q) z == 0) has log-sum-exp -inf and drops out exactly.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .policy import H2O, LAMBDA  # noqa: F401  (the policy ids, read here as reference.H2O / .LAMBDA by the tests)
from .ranking import WINDOW_POOL, eviction_key, window_rows
from .state import EMPTY, SlotCache


# ---------------------------------------------------------------------------------------------------------------
# Attention states
# ---------------------------------------------------------------------------------------------------------------
def merge_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tensor:
    """Merge two normalised attention states.

    o_*: [..., D] outputs, lse_*: [...] log of their normalisers (-inf for an empty state).
    Returns (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b}), and 0 when both are empty.
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a = torch.exp(lse_a - m)
    w_b = torch.exp(lse_b - m)
    total = w_a + w_b
    total = torch.where(total > 0, total, torch.ones_like(total))
    return (w_a[..., None] * o_a + w_b[..., None] * o_b) / total[..., None]


def lowrank_state(phi_q: Tensor, H: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Attention state of the low-rank term.

    phi_q: [B, Hkv, G, R], H: [B, Hkv, R, D], z: [B, Hkv, R] -> (o [B, Hkv, G, D], lse [B, Hkv, G]).
    """
    return normalise(torch.einsum("bhgr,bhrd->bhgd", phi_q, H), torch.einsum("bhgr,bhr->bhg", phi_q, z))


def normalise(num: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    """State of an unnormalised attention sum: num [..., D], den [...] >= 0 -> (num / den, log den).
    den == 0 is the empty state (o = 0, lse = -inf), so an all-zero low-rank state adds nothing."""
    has_mass = den > 0
    safe_den = torch.where(has_mass, den, torch.ones_like(den))
    lse = torch.where(has_mass, torch.log(safe_den), torch.full_like(den, -math.inf))
    return num / safe_den[..., None], lse


def sparse_state(scores: Tensor, allowed: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax attention state over the allowed keys.

    scores: [..., N] fp32 logits, allowed: [..., N] bool (broadcastable), v: [..., N, D] fp32.
    Returns (o [..., D], lse [...], probs [..., N]); a row with no allowed key gives o = 0, lse = -inf, probs = 0.
    """
    s = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.where(allowed, torch.exp(s - safe_lse[..., None]), torch.zeros_like(s))
    return probs @ v, lse, probs


# ---------------------------------------------------------------------------------------------------------------
# Op (c): fused decode attention
# ---------------------------------------------------------------------------------------------------------------
def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    phi_q: Optional[Tensor],
    H: Optional[Tensor],
    z: Optional[Tensor],
    scale: float,
) -> tuple[Tensor, Tensor]:
    """One decode step of LESS attention for every query head.

    q [B, Hq, D]; k, v [B, Hkv, S, D]; pos [B, Hkv, S] (slots with pos < 0 are ignored);
    phi_q [B, Hq, R], H [B, Hkv, R, D], z [B, Hkv, R] (all three given, or all None for sparse-only attention).
    Returns out [B, Hq, D] in q's dtype and probs [B, Hkv, S] fp32: the softmax probabilities over the occupied
    slots only (the low-rank mass is not in their normaliser), summed over the G query heads of each KV head.
    """
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qg = q.float().view(B, Hkv, G, D)
    logits = torch.einsum("bhgd,bhsd->bhgs", qg, k.float()) * scale
    occupied = (pos >= 0)[:, :, None, :]
    o, lse, probs = sparse_state(logits, occupied, v.float())
    if phi_q is not None:
        o_lr, lse_lr = lowrank_state(phi_q.float().view(B, Hkv, G, phi_q.shape[-1]), H, z)
        o = merge_states(o, lse, o_lr, lse_lr)
    return o.reshape(B, Hq, D).to(q.dtype), probs.sum(dim=2)


# ---------------------------------------------------------------------------------------------------------------
# Op (a): H2O score accumulation and eviction
# ---------------------------------------------------------------------------------------------------------------
def score_and_evict_(
    scores: Tensor, pos: Tensor, probs: Tensor, policy: int, budget: int, recent: int, sinks: int
) -> Tensor:
    """Accumulate H2O scores, then evict at most one token per (b, h) when more than `budget` are held; in place.

    scores [B, Hkv, S] fp32, pos [B, Hkv, S] int32, probs [B, Hkv, S] fp32 (from `decode_attention`).
    H2O adds probs to the occupied slots' scores and evicts the lowest-score slot outside the recent window
    (positions > newest - recent); ties go to the lowest slot index. Λ evicts the oldest non-sink token.
    The freed slot gets pos = EMPTY and score 0. Returns victim [B, Hkv] int64: the freed slot, or -1.
    """
    occupied = pos >= 0
    if policy == H2O:
        scores += torch.where(occupied, probs, torch.zeros_like(probs))
    newest = pos.max(dim=-1).values
    key = eviction_key(policy, scores, pos, newest, recent, sinks)
    victim = key.argmin(dim=-1)  # first minimum: ties go to the lowest slot index
    must_evict = (occupied.sum(dim=-1) > budget) & torch.isfinite(key.amin(dim=-1))
    victim = torch.where(must_evict, victim, torch.full_like(victim, -1))
    freed = torch.zeros_like(occupied).scatter_(-1, victim.clamp(min=0)[..., None], True) & must_evict[..., None]
    pos.masked_fill_(freed, EMPTY)
    scores.masked_fill_(freed, 0.0)
    return victim


# ---------------------------------------------------------------------------------------------------------------
# Op (b): rank-R state update
# ---------------------------------------------------------------------------------------------------------------
def state_fold(psi: Tensor, v: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """What N tokens add to the low-rank state.

    psi [B, Hkv, N, R] (psi(k), non-negative), v [B, Hkv, N, D], mask [B, Hkv, N] bool or None (all tokens).
    Returns dH [B, Hkv, R, D] = sum_n psi_n^T v_n and dz [B, Hkv, R] = sum_n psi_n, over masked-in tokens, fp32.
    """
    psi = psi.float()
    if mask is not None:
        psi = psi * mask[..., None].to(psi.dtype)
    return torch.einsum("bhnr,bhnd->bhrd", psi, v.float()), psi.sum(dim=2)


# ---------------------------------------------------------------------------------------------------------------
# Prefill: H2O scores of a prompt, by the column sums or by the window of its last query rows
# ---------------------------------------------------------------------------------------------------------------
def prefill_scores(q: Tensor, k: Tensor, valid: Tensor, scale: float, chunk: int = 128) -> Tensor:
    """H2O scores of a prompt: column sums of its causal attention probabilities.

    q [B, Hq, T, D], k [B, Hkv, T, D], valid [B, T] bool (False on padding).
    Returns [B, Hkv, T] fp32, summed over query rows and the G query heads of each KV head; 0 on padding.
    Queries are processed `chunk` rows at a time, each against only the columns it can see (causal), so the
    probability matrix never exceeds [B, Hq, chunk, T].
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    kt = k.float().transpose(-1, -2)
    scores = torch.zeros(B, Hkv, T, dtype=torch.float32, device=q.device)
    cols = torch.arange(T, device=q.device)
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        # The G query heads of a KV head are adjacent, so one plain batched matmul per KV head covers them all.
        qc = q[:, :, start:end].float().reshape(B, Hkv, G * (end - start), D)
        logits = (qc @ kt[..., :end]).view(B, Hkv, G, end - start, end)
        allowed = (cols[:end] <= cols[start:end, None])[None] & valid[:, None, :end] & valid[:, start:end, None]
        # No gradient flows here, so the plain masked softmax will do; a padding row (all -inf) gives NaN -> 0.
        probs = logits.mul_(scale).masked_fill_(~allowed[:, None, None], -math.inf).softmax(dim=-1).nan_to_num_(0.0)
        scores[..., :end] += probs.sum(dim=(2, 3))
    return scores


def prefill_window_scores(q: Tensor, k: Tensor, valid: Tensor, scale: float, window: int) -> Tensor:
    """H2O scores of a prompt by what its end asks for (SnapKV): the attention of its last `window` query rows.

    q [B, Hq, T, D], k [B, Hkv, T, D], valid [B, T] bool (False on padding); window W >= 1.
    A row's window is its last min(W, real tokens) real query rows; their causal attention probabilities are summed
    over those rows and the G query heads of each KV head (for W >= the prompt, the column sums of
    `prefill_scores`), then max-pooled over key positions with kernel WINDOW_POOL, stride 1.
    Returns [B, Hkv, T] fp32; 0 on padding.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    in_window, first = window_rows(valid, window)
    rows = torch.arange(first, T, device=q.device)
    cols = torch.arange(T, device=q.device)
    qw = q[:, :, first:].float().reshape(B, Hkv, G * (T - first), D)
    logits = (qw @ k.float().transpose(-1, -2)).view(B, Hkv, G, T - first, T) * scale
    allowed = (cols <= rows[:, None])[None] & valid[:, None, :] & in_window[:, first:, None]
    # A row outside the window (or a pad row) is all -inf: NaN -> 0, it adds nothing.
    probs = logits.masked_fill(~allowed[:, None, None], -math.inf).softmax(dim=-1).nan_to_num(0.0)
    summed = probs.sum(dim=(2, 3))
    pooled = torch.nn.functional.max_pool1d(summed, WINDOW_POOL, stride=1, padding=WINDOW_POOL // 2)
    return pooled.masked_fill(~valid[:, None, :], 0.0)


# ---------------------------------------------------------------------------------------------------------------
# The fixed-slot stream: what one layer of the compressed cache does
# ---------------------------------------------------------------------------------------------------------------
def insert_token(cache: SlotCache, k: Tensor, v: Tensor, psi: Tensor, position: Tensor) -> None:
    """Write one new token per (b, h) into its first free slot, in place.

    k, v [B, Hkv, D]; psi [B, Hkv, R]; position [B] int (the token's position in its sequence).
    """
    slot = (cache.pos < 0).to(torch.int8).argmax(dim=-1)[..., None]  # lowest free slot (0 if none is free)
    cache.k.scatter_(2, slot[..., None].expand(-1, -1, 1, k.shape[-1]), k[:, :, None].to(cache.k.dtype))
    cache.v.scatter_(2, slot[..., None].expand(-1, -1, 1, v.shape[-1]), v[:, :, None].to(cache.v.dtype))
    cache.psi.scatter_(2, slot[..., None].expand(-1, -1, 1, psi.shape[-1]), psi[:, :, None].float())
    cache.pos.scatter_(2, slot, position.to(torch.int32)[:, None, None].expand_as(slot))
    cache.scores.scatter_(2, slot, 0.0)


def victim_tokens(cache: SlotCache, victim: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What `state_fold` needs to fold the evicted tokens: psi [B, Hkv, 1, R], v [B, Hkv, 1, D] of each victim slot
    (still intact: eviction only marks the slot free) and mask [B, Hkv, 1], False where nothing was evicted.
    victim: [B, Hkv] int64 from `score_and_evict_`."""
    slot = victim.clamp(min=0)[..., None, None]
    psi = torch.gather(cache.psi, 2, slot.expand(-1, -1, 1, cache.psi.shape[-1]))
    v = torch.gather(cache.v, 2, slot.expand(-1, -1, 1, cache.v.shape[-1]))
    return psi, v, (victim >= 0)[..., None]


def decode_step(
    cache: SlotCache,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: Optional[Tensor],
    psi_k: Optional[Tensor],
    position: Tensor,
    scale: float,
    policy: int,
    budget: int,
    recent: int,
    sinks: int,
) -> Tensor:
    """The decode step of the contract, in place on `cache`: insert, attend (state taken before eviction),
    accumulate scores, evict one token and fold it into H, z.

    q [B, Hq, D]; k, v [B, Hkv, D]; phi_q [B, Hq, R] and psi_k [B, Hkv, R], or both None (sparse policy only);
    position [B], negative for a pad token: its k, v land in a slot that stays free, its attention adds no score,
    so nothing is evicted for it. Returns out [B, Hq, D].
    """
    if psi_k is None:
        psi_k = k.new_zeros(*k.shape[:2], cache.psi.shape[-1], dtype=torch.float32)
    insert_token(cache, k, v, psi_k, position)
    state = (cache.H, cache.z) if phi_q is not None else (None, None)
    out, probs = decode_attention(q, cache.k, cache.v, cache.pos, phi_q, *state, scale)
    probs = probs * (position >= 0).to(probs.dtype)[:, None, None]  # a pad query's attention is no evidence
    victim = score_and_evict_(cache.scores, cache.pos, probs, policy, budget, recent, sinks)
    dH, dz = state_fold(*victim_tokens(cache, victim))
    cache.H += dH
    cache.z += dz
    return out


# ---------------------------------------------------------------------------------------------------------------
# Parallel form: the whole sequence at once, given the policy's kept sets
# ---------------------------------------------------------------------------------------------------------------
def parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kept: Tensor,
    phi_q: Optional[Tensor],
    psi_k: Optional[Tensor],
    scale: float,
) -> Tensor:
    """LESS attention for all positions at once.

    q [B, Hq, T, D]; k, v [B, Hkv, T, D]; kept [B, Hkv, T, T] bool (from `stream_kept_masks`);
    phi_q [B, Hq, T, R] and psi_k [B, Hkv, T, R], or both None (sparse policy only).
    Row t attends softmax-style to kept[..., t, :] and linearly, through phi(q_t) . psi(k_j), to the evicted
    tokens j <= t. Returns out [B, Hq, T, D] in q's dtype; differentiable in q, k, v, phi_q and psi_k.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qg = q.float().view(B, Hkv, G, T, D)
    vf = v.float()[:, :, None]
    logits = qg @ k.float()[:, :, None].transpose(-1, -2) * scale
    o, lse, _ = sparse_state(logits, kept[:, :, None], vf)
    if phi_q is None:
        return o.reshape(B, Hq, T, D).to(q.dtype)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    evicted = (causal & ~kept).to(torch.float32)[:, :, None]
    linear = (phi_q.float().view(B, Hkv, G, T, -1) @ psi_k.float()[:, :, None].transpose(-1, -2)) * evicted
    o_lr, lse_lr = normalise(linear @ vf, linear.sum(dim=-1))
    return merge_states(o, lse, o_lr, lse_lr).reshape(B, Hq, T, D).to(q.dtype)
