"""One layer's compressed cache (`SlotCache`) and the slot bookkeeping that runs in production: prompt selection and
packing after prefill, and the token-by-token policy driver that training and evaluation use.

The eviction order is `ranking.eviction_key`; the compiled decode step (`ops.less_decode_step_`) works in place on a
`SlotCache`, and `reference.decode_step` is its ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .policy import LAMBDA
from .ranking import eviction_key

EMPTY = -1
"""Position value of a free slot."""


def token_positions(valid: Tensor) -> Tensor:
    """Position of each real token among the real tokens of its row: [B, T] bool -> [B, T] int32, EMPTY on padding."""
    pos = (valid.cumsum(dim=-1) - 1).to(torch.int32)
    return torch.where(valid, pos, torch.full_like(pos, EMPTY))


def prefill_keep(
    scores: Tensor, valid: Tensor, policy: int, budget: int, recent: int, sinks: int
) -> Tensor:
    """Which prompt tokens stay in the slots after prefill.

    scores [B, Hkv, T] fp32 (`prefill.prefill_attention`: column sums or window scores), valid [B, T] bool.
    Evicts tokens in ascending `eviction_key` order (ties: earliest position first, as in the decode rule) until
    at most `budget` remain. Returns keep [B, Hkv, T] bool; padding is never kept.
    """
    pos = token_positions(valid)[:, None, :].expand_as(scores)
    newest = pos.max(dim=-1).values
    key = eviction_key(policy, scores, pos, newest, recent, sinks)
    order = torch.sort(key, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
    n_evict = (valid.sum(dim=-1) - budget).clamp(min=0)[:, None, None]
    return (pos >= 0) & (rank >= n_evict)


def gather_tokens(keep: Tensor, num_slots: int, *per_token: Tensor) -> tuple[Tensor, ...]:
    """Pack the kept tokens of each (b, h), in position order, into the first slots.

    keep [B, Hkv, T] bool; per_token: tensors [B, Hkv, T, ...] (k, v, psi, scores, positions...).
    Returns, for each, a [B, Hkv, num_slots, ...] tensor, followed by pos [B, Hkv, num_slots] int32 giving the slot's
    index into T or EMPTY. Raises if a row keeps more tokens than there are slots.
    """
    B, Hkv, T = keep.shape
    if int(keep.sum(dim=-1).max()) > num_slots:
        raise ValueError(f"{int(keep.sum(dim=-1).max())} kept tokens do not fit in {num_slots} slots")
    padded = torch.nn.functional.pad(keep, (0, num_slots))  # extra never-kept columns fill the spare slots
    order = torch.sort((~padded).to(torch.int8), dim=-1, stable=True).indices[..., :num_slots]  # kept first
    filled = torch.gather(padded, -1, order)
    order = torch.where(filled, order, torch.zeros_like(order))
    out = []
    for t in per_token:
        idx = order.reshape(B, Hkv, num_slots, *([1] * (t.dim() - 3))).expand(B, Hkv, num_slots, *t.shape[3:])
        g = torch.gather(t, 2, idx)
        out.append(g * filled.reshape(B, Hkv, num_slots, *([1] * (t.dim() - 3))).to(g.dtype))
    index = torch.where(filled, order.to(torch.int32), torch.full_like(order, EMPTY, dtype=torch.int32))
    return (*out, index)


@dataclass
class SlotCache:
    """One layer's compressed cache, everything a decode step reads and updates in place.

    k, v [B, Hkv, S, D] in the model's dtype; psi [B, Hkv, S, R] fp32 (psi(k) kept per slot so that the victim can
    be folded without recomputing it); pos [B, Hkv, S] int32 (EMPTY for a free slot); scores [B, Hkv, S] fp32 (H2O's
    accumulated attention); H [B, Hkv, R, D] and z [B, Hkv, R] fp32, the low-rank state (R = 0 without one);
    next_position [B] int32, the position the next real token of each row gets.
    """

    k: Tensor
    v: Tensor
    psi: Tensor
    pos: Tensor
    scores: Tensor
    H: Tensor
    z: Tensor
    next_position: Tensor

    @staticmethod
    def empty(B: int, Hkv: int, S: int, D: int, R: int, dtype: torch.dtype, device=None) -> "SlotCache":
        f32 = dict(dtype=torch.float32, device=device)
        return SlotCache(
            k=torch.zeros(B, Hkv, S, D, dtype=dtype, device=device),
            v=torch.zeros(B, Hkv, S, D, dtype=dtype, device=device),
            psi=torch.zeros(B, Hkv, S, R, **f32),
            pos=torch.full((B, Hkv, S), EMPTY, dtype=torch.int32, device=device),
            scores=torch.zeros(B, Hkv, S, **f32),
            H=torch.zeros(B, Hkv, R, D, **f32),
            z=torch.zeros(B, Hkv, R, **f32),
            next_position=torch.zeros(B, dtype=torch.int32, device=device),
        )


def first_free_slot(pos: Tensor) -> Tensor:
    """[B, Hkv, S] -> [B, Hkv] int64: the lowest free slot (0 if none is free; the stream keeps one free)."""
    return (pos < 0).to(torch.int8).argmax(dim=-1)


def stream_kept_masks(
    q: Tensor,
    k: Tensor,
    scale: float,
    policy: int,
    budget: int,
    recent: int,
    sinks: int,
    attend: Callable,
    evict_: Callable,
) -> Tensor:
    """Run the policy token by token from position 0 and record what each query attends to.

    q [B, Hq, T, D], k [B, Hkv, T, D]. Returns kept [B, Hkv, T, T] bool: kept[b, h, t, j] is True when token j sits
    in a slot during step t's attention (j <= t). The evicted set of step t is (j <= t) & ~kept[..., t, j].
    The probabilities that drive H2O do not depend on the low-rank state, so none is needed here.
    `attend` / `evict_`: the compiled ops (`ops.less_decode_attention`, `ops.less_score_and_evict_`) or the reference's,
    which share these signatures.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    S = budget + 1
    pos = torch.full((B, Hkv, S), EMPTY, dtype=torch.int32, device=q.device)
    scores = torch.zeros(B, Hkv, S, dtype=torch.float32, device=q.device)
    slot_k = k.new_zeros(B, Hkv, S, D)
    kept = torch.zeros(B, Hkv, T, T + 1, dtype=torch.bool, device=q.device)  # column T catches free slots
    for t in range(T):
        slot = first_free_slot(pos)[..., None]
        slot_k.scatter_(2, slot[..., None].expand(-1, -1, 1, D), k[:, :, t : t + 1])
        pos.scatter_(2, slot, t)
        scores.scatter_(2, slot, 0.0)
        kept[:, :, t].scatter_(-1, torch.where(pos >= 0, pos, T).long(), True)
        _, probs = attend(q[:, :, t], slot_k, slot_k, pos, None, None, None, scale)
        evict_(scores, pos, probs, policy, budget, recent, sinks)
    return kept[..., :T]


def kept_masks(q: Tensor, k: Tensor, scale: float, policy: int, budget: int, recent: int, sinks: int,
               attend: Callable, evict_: Callable) -> Tensor:
    """`stream_kept_masks`, with Λ's built directly: Λ's choices depend on positions alone (step t holds the first
    `sinks` tokens and the newest budget + 1 - sinks up to t), so its T-step loop is not needed. The tests check the
    two agree."""
    if policy != LAMBDA:
        return stream_kept_masks(q, k, scale, policy, budget, recent, sinks, attend, evict_)
    T = q.shape[2]
    step = torch.arange(T, device=q.device)[:, None]
    token = torch.arange(T, device=q.device)[None, :]
    kept = (token <= step) & ((token < sinks) | (token > step - (budget + 1 - sinks)))
    return kept.expand(q.shape[0], k.shape[1], T, T)
