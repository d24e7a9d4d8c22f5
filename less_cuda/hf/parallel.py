"""The whole-sequence (parallel) form of a compressed model, for evaluation and training: a transformers attention
function that applies the policy at every full-attention layer of every position at once.

The policy's kept sets for the whole sequence come from `state.kept_masks` driven by the compiled ops (the policy
code of the cache), and the output from `reference.parallel_attention` (evaluation: the ground truth) or
`step_attention.kept_attention` (training: the same values through the ops, differentiable), with φ(q), ψ(k) of the
layer's post-RoPE queries and keys (LESS) or without them (the sparse policy alone). Every token streams through the
policy from the start.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..core import ops, reference, state
from ..core.feature_maps import FeatureMaps
from ..core.policy import Policy
from .models import full_attention_layers

ATTENTION = "less_parallel"
"""The name the parallel form registers its attention function under (`attention.attention_function`)."""


def parallel_attention_function(policy: Policy, feature_maps: Optional[FeatureMaps],
                                attention: Callable = reference.parallel_attention) -> Callable:
    """A transformers attention function applying `policy` (and LESS when `feature_maps` is given) at every
    full-attention layer. Other layers (sliding-window ones) run sdpa with the mask transformers made for them, as
    LessCache leaves them their own cache layers.

    transformers calls it as f(module, query [B, Hq, T, D], key, value [B, Hkv, T, D], attention_mask, scaling=...)
    with post-RoPE query/key; `module.layer_idx` names the layer. Returns (out [B, T, Hq, D], None). The sequences
    must have no padding (packed text): the policy and the causal structure come from the masks, not from
    `attention_mask`. `attention` computes the output from the kept masks: `reference.parallel_attention` (the
    ground truth, for evaluation) or `step_attention.kept_attention` (the same through the ops, for training).
    """

    def attend(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
               scaling: Optional[float] = None, **kwargs) -> tuple[Tensor, None]:
        if module.layer_idx not in full_attention_layers(module.config):
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if attention_mask is not None and not bool(attention_mask.any(dim=-2).all()):  # a key no query sees: padding
            raise ValueError("the parallel-form evaluation takes unpadded sequences")
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        device = query.device.type
        if torch.is_autocast_enabled(device):
            # Under autocast the projections and RoPE can hand over mixed dtypes; the ops take one (the autocast
            # one, as sdpa would), with φ(q), ψ(k) and the state in fp32 as at inference.
            query, key, value = (x.to(torch.get_autocast_dtype(device)) for x in (query, key, value))
        with torch.autocast(device, enabled=False):
            resolved = policy.resolve(query.shape[2])
            with torch.no_grad():  # the policy's discrete choices take no gradient
                kept = state.kept_masks(query, key, scale, *resolved.as_args(), attend=ops.less_decode_attention,
                                        evict_=ops.less_score_and_evict_)
            layer = module.layer_idx
            lowrank = feature_maps is not None and feature_maps.has_layer(layer)
            phi = feature_maps.phi(layer, query) if lowrank else None
            psi = feature_maps.psi(layer, key) if lowrank else None
            return attention(query, key, value, kept, phi, psi, scale).transpose(1, 2), None

    return attend
