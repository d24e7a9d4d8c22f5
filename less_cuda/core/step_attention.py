"""The compressed cache's decode output at every step of whole sequences at once, for training.

`policy_steps` runs the policy over a sequence through the compiled ops, as the cache does (`state.kept_masks`:
H2O's token-by-token loop driven by `ops.less_decode_attention` / `ops.less_score_and_evict_`, Λ's in closed form),
and records which tokens occupy the slots at each step and when each token leaves them. The policy's choices do not
depend on φ/ψ. `step_attention` then computes step t's output as `ops.less_decode_attention` of query t over step t's
slots and the state H_t, z_t folded (`ops.less_state_fold`) from every token evicted before t: O((S + R) D) per step
instead of the O(T D) per row of the masked parallel form (`reference.parallel_attention`), which the tests check it
against together with a literal token-by-token decode loop. It is differentiable in q, k, v, φ(q) and ψ(k) through
the ops' autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import ops, state
from .policy import ResolvedPolicy


@dataclass
class PolicySteps:
    """What the policy did over B sequences of T tokens, for one layer.

    slots [B, T, Hkv, S] int32: the tokens (indices into T, in position order) that occupy the S = budget + 1 slots
        during step t's attention, EMPTY for a free slot.
    evicted_at [B, Hkv, T] int64: the first step whose attention no longer sees the token (T if it never leaves);
        the state H_t, z_t of step t holds exactly the tokens with evicted_at <= t.
    """

    slots: Tensor
    evicted_at: Tensor

    def select(self, index: Tensor) -> "PolicySteps":
        return PolicySteps(self.slots[index], self.evicted_at[index])

    @staticmethod
    def from_kept(kept: Tensor, num_slots: int) -> "PolicySteps":
        """The steps described by kept [B, Hkv, T, T] bool (`state.stream_kept_masks`), which holds at most
        `num_slots` tokens per step."""
        B, Hkv, T, _ = kept.shape
        (slot_index,) = state.gather_tokens(kept.transpose(1, 2).reshape(B * T, Hkv, T), num_slots)
        # Eviction is final, so the evicted sets grow step by step and one step index per token describes them all.
        evicted = torch.ones(T, T, dtype=torch.bool, device=kept.device).tril() & ~kept
        left = evicted.any(dim=2)
        first = evicted.to(torch.int8).argmax(dim=2)
        evicted_at = torch.where(left, first, torch.full_like(first, T))
        return PolicySteps(slot_index.view(B, T, Hkv, -1), evicted_at)


def policy_steps(q: Tensor, k: Tensor, scale: float, policy: ResolvedPolicy) -> PolicySteps:
    """Run the policy over q [B, Hq, T, D], k [B, Hkv, T, D] through the compiled ops, as the cache does."""
    kept = state.kept_masks(
        q, k, scale, *policy.as_args(), attend=ops.less_decode_attention, evict_=ops.less_score_and_evict_
    )
    return PolicySteps.from_kept(kept, policy.num_slots)


def batched_policy_steps(q: Tensor, k: Tensor, scale: float, policy: ResolvedPolicy, desc: str,
                         batch_size: int = 8) -> PolicySteps:
    """`policy_steps` over N sequences, `batch_size` at a time (the policy's token-by-token loop costs about the same
    for one sequence as for eight)."""
    pieces = [policy_steps(q[first : first + batch_size], k[first : first + batch_size], scale, policy)
              for first in tqdm(range(0, len(q), batch_size), desc=desc, unit="batch", leave=False)]
    return PolicySteps(torch.cat([p.slots for p in pieces]), torch.cat([p.evicted_at for p in pieces]))


def _by_step(x: Tensor) -> Tensor:
    """[B, H, T, ...] -> [B * T, H, ...]: every step becomes a batch row of the decode ops."""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], x.shape[1], *x.shape[3:])


def step_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    steps: PolicySteps,
    phi_q: Optional[Tensor],
    psi_k: Optional[Tensor],
    scale: float,
    at: Optional[Tensor] = None,
) -> Tensor:
    """The compressed cache's decode output at many steps at once.

    k, v [B, Hkv, T, D] and psi_k [B, Hkv, T, R]: every token; steps from `policy_steps`; at [M] int64, increasing:
    the steps to compute (default all T); q [B, Hq, M, D] and phi_q [B, Hq, M, R]: the queries of those steps.
    phi_q and psi_k may both be None for the sparse policy alone. Returns out [B, Hq, M, D] in q's dtype,
    differentiable in phi_q and psi_k: row m is `ops.less_decode_attention` of the query over the slots of step at[m]
    and the state of the tokens evicted before it, exactly what `reference.decode_step` computes at that step.
    """
    B, Hq, M, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    slots = steps.slots if at is None else steps.slots[:, at]  # [B, M, Hkv, S]
    S = slots.shape[-1]
    arange = lambda n: torch.arange(n, device=q.device)  # noqa: E731
    # Row indices into k, v viewed as [B * Hkv * T, D]: whole-row copies, much cheaper than an element-wise gather.
    rows = (slots.clamp(min=0).long() + ((arange(B)[:, None] * Hkv + arange(Hkv)) * T)[:, None, :, None]).view(-1)
    k_slots = k.reshape(-1, D).index_select(0, rows).view(B * M, Hkv, S, D)
    v_slots = v.reshape(-1, D).index_select(0, rows).view(B * M, Hkv, S, D)
    state: tuple[Optional[Tensor], ...] = (None, None, None)
    if phi_q is not None:
        R = psi_k.shape[-1]
        # What each token adds to the state (its own fold), binned by the first computed step that no longer sees
        # it, then summed up to each computed step.
        dH, dz = ops.less_state_fold(_by_step(psi_k)[:, :, None].contiguous(), _by_step(v)[:, :, None].contiguous())
        first_step = torch.searchsorted(arange(T) if at is None else at, steps.evicted_at)  # [B, Hkv, T] in [0, M]
        bins = ((arange(B)[:, None, None] * (M + 1) + first_step) * Hkv + arange(Hkv)[:, None]).transpose(1, 2)
        H = dH.new_zeros(B * (M + 1) * Hkv, R * D).index_add(0, bins.reshape(-1), dH.view(-1, R * D))
        z = dz.new_zeros(B * (M + 1) * Hkv, R).index_add(0, bins.reshape(-1), dz.view(-1, R))
        H = H.view(B, M + 1, Hkv, R * D).cumsum(dim=1)[:, :M]
        z = z.view(B, M + 1, Hkv, R).cumsum(dim=1)[:, :M]
        state = (_by_step(phi_q).contiguous(), H.reshape(B * M, Hkv, R, D), z.reshape(B * M, Hkv, R))
    pos = slots.reshape(B * M, Hkv, S)
    out, _ = ops.less_decode_attention(_by_step(q).contiguous(), k_slots, v_slots, pos, *state, scale)
    return out.view(B, M, Hq, D).transpose(1, 2)


def kept_attention(q: Tensor, k: Tensor, v: Tensor, kept: Tensor, phi_q: Optional[Tensor], psi_k: Optional[Tensor],
                   scale: float) -> Tensor:
    """`reference.parallel_attention`'s contract (kept [B, Hkv, T, T] from `state.stream_kept_masks`, out
    [B, Hq, T, D]) computed step by step through the ops: the same values at O((S + R) D) per step, differentiable
    in q, k, v, phi_q and psi_k."""
    steps = PolicySteps.from_kept(kept, max(1, int(kept.sum(dim=-1).max())))
    return step_attention(q, k, v, steps, phi_q, psi_k, scale)
