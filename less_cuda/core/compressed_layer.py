"""What one compressed attention layer does, wherever it runs (transformers' `LessLayer`, the vLLM state layer):

- `prefill`: prompt -> state. The policy ranks the prompt's tokens (H2O by attention scores, Λ by position), keeps
  `budget` of them in the slots and folds every other one into H, z. H2O's ranking comes from a pass of exact
  causal attention over the prompt (`prefill_attention`), whose output comes with it.
- `decode`: new tokens -> output, in place on the state: the fused decode step for each token in turn.

feature_maps is the layer's φ/ψ (`LayerFeatureMaps`), or None for the sparse policy alone (R = 0: no state).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .feature_maps import LayerFeatureMaps
from .ops import less_decode_step_
from .policy import ResolvedPolicy
from .prefill import compress_prompt, prefill_attention
from .state import SlotCache


@torch.no_grad()
def prefill(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float, policy: ResolvedPolicy,
            feature_maps: Optional[LayerFeatureMaps], attend: bool = False) -> tuple[Optional[Tensor], SlotCache]:
    """Compress a prompt into the layer's state. q [B, Hq, T, D]; k, v [B, Hkv, T, D]; valid [B, T] bool.

    Returns (out, state): out [B, Hq, T, D] in q's dtype, exact causal attention over the prompt (real rows see the
    real keys at or before them, pad rows are 0), or None when the policy needed no attention pass to rank the prompt
    and `attend` did not ask for one (the caller runs its own attention then); state, a `SlotCache` with
    `policy.num_slots` slots.
    """
    out = scores = None
    if policy.scores_prompt or attend:
        out, scores = prefill_attention(q, k, v, valid, scale, window=policy.prompt_window)
    return out, compress(k, v, valid, scores, policy, feature_maps)


@torch.no_grad()
def compress(k: Tensor, v: Tensor, valid: Tensor, scores: Optional[Tensor], policy: ResolvedPolicy,
             feature_maps: Optional[LayerFeatureMaps]) -> SlotCache:
    """A prompt's state from its K/V and the H2O scores it is ranked by. k, v [B, Hkv, T, D]; valid [B, T] bool;
    scores [B, Hkv, T] fp32 (`prefill_attention`'s for `policy.prompt_window`); Λ orders by position alone and takes
    None. Prefill calls it after its attention pass; `hf.prompt_record` with scores from a pass shared by several
    policies."""
    if not policy.scores_prompt:
        scores = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
    elif scores is None:
        raise ValueError("H2O ranks a prompt by its attention scores: give the scores of its prefill pass")
    psi = k.new_zeros(*k.shape[:3], 0, dtype=torch.float32) if feature_maps is None else feature_maps.psi(k)
    return compress_prompt(k, v, psi, valid, scores, policy)


@torch.no_grad()
def decode(state: SlotCache, q: Tensor, k: Tensor, v: Tensor, valid: Optional[Tensor], scale: float,
           policy: ResolvedPolicy, feature_maps: Optional[LayerFeatureMaps],
           state_rows: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """The decode step for each of T new tokens in turn, in one fused op call, in place on `state`.
    q [B, Hq, T, D]; k, v [B, Hkv, T, D]; valid [B, T] bool, or None when every token is real; state_rows [B] int64
    when `state` is a pool of rows (`ops.less_decode_step_`). Returns out [B, Hq, T, D]. A pad token takes no slot,
    adds no score and evicts nothing."""
    phi = psi = None
    if feature_maps is not None:  # phi(q), psi(k) once for all of the call's tokens
        phi, psi = feature_maps.features(q, k)
    return less_decode_step_(state, q, k, v, phi, psi, valid, *policy.as_args(), scale=scale, state_rows=state_rows)
