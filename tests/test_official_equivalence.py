"""The fixed-slot stream (what the kernels and the cache do) against the official LESS formulation.

The official generative code (hdong920/LESS, src/inference/generative/llama_gen.py, batch size 1) keeps the
whole cache and a 0/1 mask over it: attention logits outside the mask are suppressed, H2O scores live on every
position and are zeroed when a token leaves the mask, and the low-rank state is updated with the tokens whose mask
bit fell (`eliminated = previous mask - next mask`). The code below is our own plain-PyTorch rendering of that
masked-full-cache formulation. It is run side by side with `reference.py`'s fixed slots.

Two deliberate differences of the contract are written out here rather than hidden:
- Budget. The official mask for step t is chosen at the end of step t-1 and counts the incoming token, and the
  token leaving the recent window sits out one step before it competes for a heavy slot. Our contract keeps
  `budget` tokens between steps; the new token joins them, everyone competes at once. `masked_full_cache` below
  follows the contract. For Λ the two agree exactly once the budget is mapped (official sinks + recent r ==
  ours with budget sinks + r - 1): `official_lambda` is a literal rendering of the official mask rule and is
  checked against our stream.
- The official code clamps φ(q) and φ(q)z at 1e-6 before taking logs; we use the exact rule (an empty state has
  log-sum-exp -inf) so an untouched state gives exactly softmax attention.
"""

import math

import pytest
import torch

from less_cuda.core import reference as ref
from less_cuda.core import state as slots


def fixed_slot_stream(q, k, v, phi, psi, scale, prompt_len, policy, budget, recent, sinks):
    """Prefill the first `prompt_len` tokens, then decode the rest one by one, through reference.py's slots.
    q [1, Hq, T, D], k/v [1, Hkv, T, D], phi [1, Hq, T, R], psi [1, Hkv, T, R].
    Returns (outputs of the decode steps [1, Hq, T - P, D], positions kept after each decode step: sets per head)."""
    B, Hkv, T, D = k.shape
    P = prompt_len
    valid = torch.ones(B, P, dtype=torch.bool)
    scores = ref.prefill_scores(q[:, :, :P], k[:, :, :P], valid, scale)
    keep = slots.prefill_keep(scores, valid, policy, budget, recent, sinks)
    cache = slots.SlotCache.empty(B, Hkv, budget + 1, D, psi.shape[-1], k.dtype)
    positions = torch.arange(P).expand(B, Hkv, P)
    cache.k, cache.v, cache.psi, cache.scores, _, cache.pos = slots.gather_tokens(
        keep, budget + 1, k[:, :, :P], v[:, :, :P], psi[:, :, :P], scores, positions
    )
    cache.H, cache.z = ref.state_fold(psi[:, :, :P], v[:, :, :P], valid[:, None] & ~keep)
    outs, kept = [], []
    for t in range(P, T):
        out = ref.decode_step(
            cache, q[:, :, t], k[:, :, t], v[:, :, t], phi[:, :, t], psi[:, :, t], torch.tensor([t]), scale,
            policy, budget, recent, sinks,
        )
        outs.append(out)
        kept.append([set(p for p in cache.pos[0, h].tolist() if p >= 0) for h in range(Hkv)])
    return torch.stack(outs, dim=2), kept


def _attend_masked(q_t, k, v, mask, phi_t, H, z, scale):
    """Official-style step: logits over the full cache, those outside `mask` suppressed; low-rank state merged.
    q_t [Hq, D], k/v [Hkv, N, D], mask [Hkv, N] bool, phi_t [Hq, R], H [Hkv, R, D], z [Hkv, R]."""
    Hq, Hkv = q_t.shape[0], k.shape[0]
    G = Hq // Hkv
    kv = k.repeat_interleave(G, 0)
    logits = torch.einsum("hd,hnd->hn", q_t, kv) * scale
    logits = logits.masked_fill(~mask.repeat_interleave(G, 0), -math.inf)
    sparse_lse = torch.logsumexp(logits, -1)
    probs = torch.softmax(logits, -1)
    sparse = torch.einsum("hn,hnd->hd", probs, v.repeat_interleave(G, 0))
    num = torch.einsum("hr,hrd->hd", phi_t, H.repeat_interleave(G, 0))
    den = torch.einsum("hr,hr->h", phi_t, z.repeat_interleave(G, 0))
    total = torch.exp(sparse_lse) + den
    out = (torch.exp(sparse_lse)[:, None] * sparse + num) / total[:, None]
    return out, probs.view(Hkv, G, -1).sum(1)


def masked_full_cache(q, k, v, phi, psi, scale, prompt_len, policy, budget, recent, sinks):
    """Our rendering of the official masked-full-cache algorithm under the contract's budget rule (batch 1)."""
    _, Hkv, T, D = k.shape
    q, k, v, phi, psi = q[0], k[0], v[0], phi[0], psi[0]
    P = prompt_len
    # Prefill: column sums of the causal attention of the prompt.
    G = q.shape[0] // Hkv
    logits = torch.einsum("htd,hsd->hts", q[:, :P], k[:, :P].repeat_interleave(G, 0)) * scale
    logits = logits.masked_fill(~torch.ones(P, P, dtype=torch.bool).tril(), -math.inf)
    scores = torch.zeros(Hkv, T)
    scores[:, :P] = torch.softmax(logits, -1).sum(1).view(Hkv, G, P).sum(1)
    mask = torch.zeros(Hkv, T, dtype=torch.bool)
    mask[:, :P] = True
    if P > budget:
        mask[:, :P] = False
        for h in range(Hkv):
            if policy == ref.H2O:
                mask[h, P - recent : P] = True
                heavy = torch.topk(scores[h, : P - recent], budget - recent).indices
                mask[h, heavy] = True
            else:
                mask[h, :sinks] = True
                mask[h, P - (budget - sinks) : P] = True
    scores = scores * mask
    evicted = torch.zeros(Hkv, T, dtype=torch.bool)
    evicted[:, :P] = ~mask[:, :P]
    H = torch.einsum("hnr,hnd->hrd", psi * evicted[..., None], v)
    z = (psi * evicted[..., None]).sum(1)
    outs, kept = [], []
    for t in range(P, T):
        mask[:, t] = True
        out, probs = _attend_masked(q[:, t], k[:, : t + 1], v[:, : t + 1], mask[:, : t + 1], phi[:, t], H, z, scale)
        outs.append(out)
        scores[:, : t + 1] += probs * mask[:, : t + 1]
        previous = mask.clone()
        for h in range(Hkv):
            if int(mask[h].sum()) <= budget:
                continue
            held = torch.nonzero(mask[h]).flatten()
            if policy == ref.H2O:
                candidates = held[held <= t - recent]
                victim = candidates[torch.argmin(scores[h, candidates])]
            else:
                victim = held[held >= sinks].min()
            mask[h, victim] = False
        eliminated = (previous & ~mask).float()
        H = H + torch.einsum("hn,hnr,hnd->hrd", eliminated, psi, v)
        z = z + torch.einsum("hn,hnr->hr", eliminated, psi)
        scores = scores * mask
        kept.append([set(torch.nonzero(mask[h]).flatten().tolist()) for h in range(Hkv)])
    return torch.stack(outs, dim=1)[None], kept


def official_lambda(q, k, v, phi, psi, scale, prompt_len, sinks, recent):
    """A literal rendering of the official Λ rule: after each step the next mask keeps the `recent` newest entries
    counting the incoming token, plus the first `sinks`; the state holds exactly the masked-out tokens."""
    _, Hkv, T, D = k.shape
    q, k, v, phi, psi = q[0], k[0], v[0], phi[0], psi[0]
    cache_budget = sinks + recent
    H = torch.zeros(Hkv, psi.shape[-1], D)
    z = torch.zeros(Hkv, psi.shape[-1])
    prev_mask = None
    outs = []
    for t in range(prompt_len - 1, T):
        existing = t + 1  # tokens in the cache after this step's append
        if t >= prompt_len:
            mask = next_mask[:, :existing]
            out, _ = _attend_masked(q[:, t], k[:, :existing], v[:, :existing], mask, phi[:, t], H, z, scale)
            outs.append(out)
        next_mask = torch.ones(Hkv, existing + 1, dtype=torch.bool)
        if existing > cache_budget:
            next_mask[:, :-recent] = False
            next_mask[:, :sinks] = True
        now = next_mask[:, :existing]
        eliminated = ((prev_mask if prev_mask is not None else torch.ones_like(now)) & ~now).float()
        H = H + torch.einsum("hn,hnr,hnd->hrd", eliminated, psi[:, :existing], v[:, :existing])
        z = z + torch.einsum("hn,hnr->hr", eliminated, psi[:, :existing])
        prev_mask = next_mask
    return torch.stack(outs, dim=1)[None]


def random_stream(seed, Hq, Hkv, T, D=16, R=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, T, D, generator=g, dtype=torch.float32)
    k = torch.randn(1, Hkv, T, D, generator=g, dtype=torch.float32)
    v = torch.randn(1, Hkv, T, D, generator=g, dtype=torch.float32)
    phi = torch.rand(1, Hq, T, R, generator=g, dtype=torch.float32)
    psi = torch.rand(1, Hkv, T, R, generator=g, dtype=torch.float32) * 0.3
    return q, k, v, phi, psi, D**-0.5


# (policy, budget, recent, sinks)
POLICIES = [(ref.H2O, 12, 4, 0), (ref.H2O, 9, 0, 0), (ref.H2O, 20, 10, 0), (ref.LAMBDA, 12, 0, 4), (ref.LAMBDA, 7, 0, 1)]


@pytest.mark.parametrize("policy,budget,recent,sinks", POLICIES)
@pytest.mark.parametrize("seed", range(6))
def test_fixed_slots_match_masked_full_cache(seed, policy, budget, recent, sinks):
    Hq, Hkv = [(4, 4), (6, 2), (3, 1)][seed % 3]
    prompt_len = [5, 30, budget, 17][seed % 4]  # shorter than, longer than and equal to the budget
    args = (*random_stream(seed, Hq, Hkv, T=prompt_len + 60), prompt_len, policy, budget, recent, sinks)
    out_slots, kept_slots = fixed_slot_stream(*args)
    out_masked, kept_masked = masked_full_cache(*args)
    assert kept_slots == kept_masked
    torch.testing.assert_close(out_slots, out_masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sinks,recent", [(4, 8), (1, 3), (0, 5)])
def test_lambda_matches_official_mask_rule(seed, sinks, recent):
    prompt_len = sinks + recent + 1 + seed  # past the official rule's one-step warm-up at the budget boundary
    Hq, Hkv = [(4, 4), (6, 2)][seed % 2]
    q, k, v, phi, psi, scale = random_stream(100 + seed, Hq, Hkv, T=prompt_len + 40)
    official = official_lambda(q, k, v, phi, psi, scale, prompt_len, sinks, recent)
    ours, _ = fixed_slot_stream(q, k, v, phi, psi, scale, prompt_len, ref.LAMBDA, sinks + recent - 1, 0, sinks)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)
