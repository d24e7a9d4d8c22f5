"""One exact prefill of a prompt, compressed many ways: `record_prompt` runs the model once over a prompt and keeps
every layer's K/V and the H2O rankings of two prefixes (the whole prompt, and its context without the question); a
`PromptRecord` then builds the cache any method would hold after its own prefill of either prefix.

A LESS prefill is exact attention over the prompt, so the prompt's logits are the same for every method and only the
compression of its K/V differs; a task suite that compares many policies, budgets and rankings pays for one forward
pass per prompt instead of one per method. The rankings come from that pass's probabilities
(`core.prefill.prefill_rankings`): the column sums of the whole prompt (bit for bit those of a `LessCache` prefill)
and of its context rows, and the window sums of the last W rows before each end.

    record = record_prompt(model, ids, context_length=C)           # ids [1, T]
    cache = record.compressed_cache(model, policy, feature_maps, C)  # as LessCache(...) after prefilling ids[:, :C]
    full = record.full_cache(model, T)                              # a DynamicCache of the whole prompt
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..core.feature_maps import FeatureMaps
from ..core.policy import DEFAULT_PREFILL_WINDOW, Policy
from ..core.prefill import pool_window, prefill_rankings
from ..core.ranking import window_rows
from .attention import attention_function
from .cache import LessCache
from .layer import LessLayer
from .models import full_attention_layers

_RECORDING = "less_record"


@dataclass
class PromptRecord:
    """What one exact forward pass over a prompt leaves for compressing it, per layer.

    ids [1, T]; context_length C (the prefix before the question; C = T when there is none); window W, the rows of
    the window ranking; keys, values: every layer's K/V [1, Hkv, T, D]; column_sums {end: per full-attention layer
    [1, Hkv, end]} and window_sums {end: ...} (unpooled) for end in (C, T); last_logits [1, V], the logits after the
    whole prompt (every method's first new token comes from them).
    """

    ids: Tensor
    context_length: int
    window: int
    keys: list[Tensor]
    values: list[Tensor]
    column_sums: dict[int, dict[int, Tensor]]
    window_sums: dict[int, dict[int, Tensor]]
    last_logits: Tensor

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def _check_end(self, end: int) -> None:
        if end not in self.column_sums:
            raise ValueError(f"a record ranks its prompt's end ({self.length}) and its context ({self.context_length})"
                             f", not a prefix of {end} tokens")

    def scores(self, layer: int, policy: Policy, end: int) -> Optional[Tensor]:
        """The prefill scores [1, Hkv, end] `policy` ranks the first `end` tokens by at full-attention `layer`, as its
        own prefill computes them; None under Λ, which ranks by position."""
        self._check_end(end)
        if not policy.scores_prompt:
            return None
        window = policy.prompt_window
        if window is None:
            return self.column_sums[end][layer]
        if window != self.window:
            raise ValueError(f"this record ranks windows of {self.window} rows, the policy asks for {window}")
        return pool_window(self.window_sums[end][layer])

    def compressed_cache(self, model: PreTrainedModel, policy: Policy, feature_maps: Optional[FeatureMaps],
                         end: int) -> LessCache:
        """A `LessCache` holding the first `end` tokens (the context or the whole prompt) as its own prefill of them
        would: the same kept tokens, state and scores. Decode from it with model forwards or `generate`."""
        self._check_end(end)
        cache = LessCache(model, feature_maps, policy)
        valid = torch.ones(1, end, dtype=torch.bool, device=self.ids.device)
        for i, layer in enumerate(cache.layers):
            k, v = self.keys[i][:, :, :end], self.values[i][:, :, :end]
            if isinstance(layer, LessLayer):
                layer.compress(k, v, valid, self.scores(i, policy, end))
            else:  # a sliding-window layer keeps its own window of the prefix
                layer.update(k, v)
        cache.record_tokens(self.ids[:, :end])
        return cache

    def full_cache(self, model: PreTrainedModel, end: int) -> DynamicCache:
        """The model's own cache (`DynamicCache`) after the first `end` tokens."""
        self._check_end(end)
        cache = DynamicCache(config=model.config)
        for i in range(len(self.keys)):
            cache.update(self.keys[i][:, :, :end], self.values[i][:, :, :end], i)
        return cache


@torch.no_grad()
def record_prompt(model: PreTrainedModel, ids: Tensor, context_length: Optional[int] = None,
                  window: int = DEFAULT_PREFILL_WINDOW) -> PromptRecord:
    """One exact forward pass over `ids` [1, T] that keeps what compressing it needs (`PromptRecord`).

    context_length: C, the prompt's first tokens that come before its question (default T: no question); the
    record can build each method's cache after C tokens or after all T. window: W, the rows H2O's window ranking
    reads. One prompt at a time: a batch would need padding, and its rows different prefixes.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"record_prompt takes one prompt, ids [1, T]; got {list(ids.shape)}")
    T = ids.shape[1]
    C = T if context_length is None else context_length
    if not 0 < C <= T:
        raise ValueError(f"context_length must be in [1, {T}] for a prompt of {T} tokens, got {C}")
    if window < 1:
        raise ValueError(f"window must be at least 1 query row, got {window}")
    full_layers = set(full_attention_layers(model.config))
    valid = torch.ones(1, T, dtype=torch.bool, device=ids.device)
    # Rows of three rankings besides the whole prompt's column sums: the context's rows, and each end's window.
    row_weights = torch.stack([
        (torch.arange(T, device=ids.device) < C)[None].float(),
        _padded(window_rows(valid[:, :C], window)[0], T),
        window_rows(valid, window)[0].float(),
    ])
    keys, values = {}, {}
    column_sums: dict[int, dict[int, Tensor]] = {C: {}, T: {}}
    window_sums: dict[int, dict[int, Tensor]] = {C: {}, T: {}}

    def record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        i = module.layer_idx
        keys[i], values[i] = key, value
        if i not in full_layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out, sums, weighted = prefill_rankings(query, key, value, valid, scale, row_weights)
        column_sums[T][i], column_sums[C][i] = sums, weighted[0][..., :C]
        window_sums[C][i], window_sums[T][i] = weighted[1][..., :C], weighted[2]
        if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scale, **kwargs)
        return out.transpose(1, 2), None

    with attention_function(model, record, _RECORDING):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    layers = range(len(keys))
    return PromptRecord(ids, C, window, [keys[i] for i in layers], [values[i] for i in layers], column_sums,
                        window_sums, logits)


def _padded(rows: Tensor, length: int) -> Tensor:
    """A [1, L] bool row mask as fp32 weights over `length` rows (0 after L)."""
    weights = torch.zeros(rows.shape[0], length, device=rows.device)
    weights[:, : rows.shape[1]] = rows.float()
    return weights
