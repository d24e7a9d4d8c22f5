"""The "less" attention implementation for transformers: how a model's attention call reaches its `LessLayer`.

transformers' attention modules call `past_key_values.update(k, v, layer_idx)` and then the function registered
under `config._attn_implementation`, which is not given the cache. A `LessLayer.update` therefore announces itself
together with the key tensor it returns (`announce`); the "less" attention function claims the layer when it is
called with that very tensor, so an announcement can only ever be claimed by the attention call it belongs to.

Registered at import:
- `AttentionInterface["less"]`: `less_attention`. With a LessLayer: exact attention and prompt compression on the
  layer's first call, the compressed decode step afterwards. Without one (another cache, no cache, or a layer kind
  LESS does not compress, such as sliding-window layers) it is exactly transformers' "sdpa".
- `AttentionMaskInterface["less"]`: transformers' sdpa mask. A custom attention name without a mask function gets
  `attention_mask=None`, even with padding; the boolean sdpa mask is what tells real tokens from padding here.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .prefill import prefill_attention

ATTN_IMPLEMENTATION = "less"

# (layer, the key tensor its update returned), waiting for the attention call that receives that tensor.
_announced: ContextVar[Optional[tuple[Any, Tensor]]] = ContextVar("less_announced_layer", default=None)


def announce(layer: Any, key_states: Tensor) -> None:
    """Called by `LessLayer.update`: the next attention call given `key_states` belongs to `layer`."""
    _announced.set((layer, key_states))


def _claim(key: Tensor) -> Optional[Any]:
    announced = _announced.get()
    if announced is None or announced[1] is not key:
        return None
    _announced.set(None)
    return announced[0]


def _real_tokens(attention_mask: Optional[Tensor], batch: int, q_len: int, device: torch.device) -> Tensor:
    """Which of the q_len new tokens are real, [B, q_len] bool.

    A real token's key is visible to its own query and a pad token's never is, so this is the diagonal of the last
    q_len mask columns. No mask means no padding (sdpa_mask skips it then). A float (additive) mask, as a caller may
    pass ready-made, marks visible entries with 0.
    """
    if attention_mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool, device=device)
    visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return torch.diagonal(visible[:, 0, :, -q_len:], dim1=-2, dim2=-1).expand(batch, q_len)


def less_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function. query [B, Hq, T, D]; key, value [B, Hkv, T, D] (what the cache's update
    returned); attention_mask the boolean sdpa mask [B, 1, T, kv_len] or None. Returns (out [B, T, Hq, D], None).

    With a LessLayer, the first call of a generation is the prompt: its output is exact causal attention (under
    H2O from `prefill_attention`, whose one pass also gives the column sums the layer ranks tokens by; sdpa under
    Λ), then the layer compresses the prompt. Every later call goes through the layer's decode step.
    """
    layer = _claim(key)
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    B, _, T, _ = query.shape
    valid = _real_tokens(attention_mask, B, T, query.device)
    if not layer.is_prefilled:
        # H2O ranks the prompt's tokens by their attention columns: one pass yields the output and those sums. Logit
        # softcaps and position biases are sdpa's to handle (or refuse), as before.
        if layer.policy.kind == "h2o" and kwargs.get("softcap") is None and kwargs.get("position_bias") is None:
            out, scores = prefill_attention(query, key, value, valid, scale)
            layer.prefill(query, key, value, valid, scale, scores=scores)
            return out.transpose(1, 2), None
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scale, **kwargs)
        layer.prefill(query, key, value, valid, scale)
        return out, None
    return layer.decode(query, key, value, valid, scale).transpose(1, 2), None


def use_less_attention(model: PreTrainedModel) -> None:
    """Switch `model` to the "less" attention implementation."""
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


AttentionInterface.register(ATTN_IMPLEMENTATION, less_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
