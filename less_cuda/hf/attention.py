"""The "less" attention implementation for transformers: how a model's attention call reaches its `LessLayer`.

transformers' attention modules call `past_key_values.update(k, v, layer_idx)` and then the function registered
under `config._attn_implementation`, which is not given the cache. A `LessLayer.update` therefore announces itself
together with the key tensor it returns (`announce`); the "less" attention function claims the layer when it is
called with that very tensor, so an announcement can only ever be claimed by the attention call it belongs to.

Registered at import:
- `AttentionInterface["less"]`: `less_attention`. With a LessLayer: exact attention and prompt compression on the
  layer's first call, the compressed decode step afterwards. Without one (another cache, no cache, or a layer kind
  LESS does not compress, such as sliding-window layers) it runs the implementation the model had before it was
  switched to "less": "eager" (the model's own eager function) or "sdpa". Other implementations (flash, flex) take
  masks of another form, so their layers run "sdpa" instead, with a warning when the model is switched.
- `AttentionMaskInterface["less"]`: transformers' sdpa mask. A custom attention name without a mask function gets
  `attention_mask=None`, even with padding; the boolean sdpa mask is what tells real tokens from padding here.

`attention_function` runs a model with any attention function for the length of a block (the parallel evaluation
form, and training's capture and end-to-end stage, run their own that way).
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "less"
FALLBACKS = ("sdpa", "eager")  # what a layer without a LessLayer can run with the boolean sdpa mask it is given
_FALLBACK_ATTRIBUTE = "_less_fallback_attention"  # the function, set on the attention modules by use_less_attention

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

    With a LessLayer, the first call of a generation is the prompt: the layer compresses it, and its output is exact
    causal attention (under H2O from the pass that ranked the prompt's tokens, `compressed_layer.prefill`; sdpa
    under Λ). Every later call goes through the layer's decode step.
    """
    layer = _claim(key)
    if layer is None:
        fallback = getattr(module, _FALLBACK_ATTRIBUTE, sdpa_attention_forward)
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    B, _, T, _ = query.shape
    valid = _real_tokens(attention_mask, B, T, query.device)
    if not layer.is_prefilled:
        # H2O ranks the prompt's tokens by a pass of exact attention, whose output comes with it; Λ needs no pass, and
        # logit softcaps and position biases are sdpa's to handle (or refuse): then sdpa gives the output.
        out = layer.prefill(query, key, value, valid, scale)
        if out is not None and kwargs.get("softcap") is None and kwargs.get("position_bias") is None:
            return out.transpose(1, 2), None
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scale, **kwargs)
        return out, None
    return layer.decode(query, key, value, valid, scale).transpose(1, 2), None


def _eager_with_sdpa_mask(eager: Callable) -> Callable:
    """A model's eager attention function taking the boolean sdpa mask (None: causal, no padding) instead of the
    additive mask eager attention adds to its logits."""

    def attend(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], **kwargs):
        if attention_mask is None:
            q_len, kv_len = query.shape[-2], key.shape[-2]
            attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        if attention_mask.dtype == torch.bool:
            blocked = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
            attention_mask = blocked.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, attention_mask, **kwargs)

    return attend


def _fallback(module: nn.Module, implementation: str) -> Callable:
    """The attention function for a layer without a LessLayer: the model's eager function (taking the sdpa mask) for
    "eager", else sdpa."""
    if implementation == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is not None:
            return _eager_with_sdpa_mask(eager)
    return sdpa_attention_forward


def use_less_attention(model: PreTrainedModel) -> None:
    """Switch `model` to the "less" attention implementation; layers without a LessLayer keep running the
    implementation it had ("eager" or "sdpa"; others fall back to "sdpa", with a warning)."""
    previous = model.config._attn_implementation
    if previous == ATTN_IMPLEMENTATION:
        return
    fallback = previous if previous in FALLBACKS else "sdpa"
    if fallback != previous:
        warnings.warn(f"LESS: layers without a LessLayer run 'sdpa' instead of the model's {previous!r} attention",
                      stacklevel=3)
    for module in model.modules():  # the attention modules are the ones handed to the attention function
        if hasattr(module, "layer_idx") and hasattr(module, "config"):
            setattr(module, _FALLBACK_ATTRIBUTE, _fallback(module, fallback))  # resolved once, not per call
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


@contextmanager
def keep_attention_implementation(model: PreTrainedModel) -> Iterator[None]:
    """Within the block the model may be switched to other attention implementations; on exit it gets back the one
    it had on entry."""
    previous = model.config._attn_implementation
    try:
        yield
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)


@contextmanager
def attention_function(model: PreTrainedModel, function: Callable, name: str) -> Iterator[None]:
    """Run `model` with `function` registered as its attention implementation `name` within the block (the
    parallel evaluation form, training's capture and its end-to-end stage run their own attention this way)."""
    AttentionInterface.register(name, function)
    # A custom name without a mask function would get no mask at all; with the sdpa one `function` sees the padding.
    AttentionMaskInterface.register(name, sdpa_mask)
    with keep_attention_implementation(model):
        model.set_attn_implementation(name)
        yield


AttentionInterface.register(ATTN_IMPLEMENTATION, less_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
