"""`LessLayer`: one full-attention layer of a transformers cache under LESS (H2O or Λ, with or without the low-rank
state). It owns the layer's `SlotCache`; what it does with a prompt and with new tokens is `core.compressed_layer`.

Positions given to the policy are each real token's index among the real tokens of its row
(`state.token_positions`), so left padding shifts nothing; pad tokens are never attended, scored, kept or folded.

A prompt fed to a fresh layer in one forward call is compressed at once. Chunked prefill in that sense is not
offered: the selection needs the attention columns of the whole prompt, and a chunk cannot know them. Tokens that
arrive in later calls (decode, generate's `prefill_chunk_size`, continuing a conversation) stream through the decode
rule one at a time, which is the contract's streaming form of the same policy; a fractional budget is resolved on
the first call's length.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from ..core import compressed_layer
from ..core.feature_maps import FeatureMaps
from ..core.policy import Policy, ResolvedPolicy
from ..core.state import SlotCache
from .attention import announce


class LessLayer(CacheLayerMixin):
    """One full-attention layer under LESS.

    State: a `SlotCache` with S = budget + 1 slots per (batch row, KV head) and R = 0 without feature maps.
    feature_maps: the model's φ/ψ (the layer takes its own), or None for the sparse policy alone.

    transformers' protocol: `update` receives the new tokens' k/v and returns them unchanged (a compressed layer
    cannot hand back the full history); the "less" attention function then calls `prefill` (first call) or
    `decode`, which runs the fused decode step (`ops.less_decode_step_`): one op call per layer and forward.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False  # evicted tokens are folded into H, z for good: there is no rolling back
    supports_early_init = False  # slot count depends on the prompt (fractional budgets)

    def __init__(self, layer_idx: int, policy: Policy, feature_maps: Optional[FeatureMaps]):
        super().__init__()
        self.layer_idx = layer_idx
        self.policy = policy
        self.feature_maps = None if feature_maps is None else feature_maps.layer(layer_idx)
        self.resolved: Optional[ResolvedPolicy] = None
        self.slots: Optional[SlotCache] = None
        self.seen = 0  # columns seen, padding included: what transformers counts for masks and positions
        self.awaiting_attention = False

    @property
    def is_prefilled(self) -> bool:
        return self.slots is not None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Record the new tokens and hand them on to the "less" attention call, which does the work."""
        if self.awaiting_attention:
            raise self.unattended_error()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self.awaiting_attention = True
        announce(self, key_states)
        return key_states, value_states

    def unattended_error(self) -> RuntimeError:
        """The error for an update that comes before the previous update's attention call."""
        return RuntimeError(
            f"LessCache layer {self.layer_idx} was updated twice without the 'less' attention in between: the "
            "model's attention implementation must be 'less' (LessCache(model, ...) and less_cuda.apply set it)"
        )

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float) -> Optional[Tensor]:
        """Compress a prompt into the slots and the state (`compressed_layer.prefill`). q [B, Hq, T, D]; k, v
        [B, Hkv, T, D]; valid [B, T] bool. The budget resolves against the longest row's real tokens.

        Returns the prompt's exact causal attention [B, Hq, T, D] when ranking it took that pass (H2O), else None.
        """
        self.awaiting_attention = False
        self.resolved = self.policy.resolve(int(valid.sum(dim=-1).max()))
        out, self.slots = compressed_layer.prefill(q, k, v, valid, scale, self.resolved, self.feature_maps)
        return out

    def compress(self, k: Tensor, v: Tensor, valid: Tensor, scores: Optional[Tensor]) -> None:
        """Take a prompt ranked elsewhere (`hf.prompt_record`): k, v [B, Hkv, T, D]; valid [B, T] bool; scores
        [B, Hkv, T] fp32, the H2O ranking of `self.policy` (None under Λ). The layer then holds what `prefill` of the
        same prompt would have left; its attention output is the caller's."""
        if self.is_prefilled or self.seen:
            raise RuntimeError(f"LessCache layer {self.layer_idx} already holds tokens: compress a prompt into a fresh "
                               "cache")
        self.lazy_initialization(k, v)
        self.seen = k.shape[-2]
        self.resolved = self.policy.resolve(int(valid.sum(dim=-1).max()))
        self.slots = compressed_layer.compress(k, v, valid, scores, self.resolved, self.feature_maps)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float) -> Tensor:
        """The decode step for each of T new tokens in turn (`compressed_layer.decode`). q [B, Hq, T, D]; k, v
        [B, Hkv, T, D]; valid [B, T]. Returns out [B, Hq, T, D]."""
        self.awaiting_attention = False
        return compressed_layer.decode(self.slots, q, k, v, valid, scale, self.resolved, self.feature_maps)

    def get_seq_length(self) -> int:
        """Tokens seen (columns, padding included), not slots kept: transformers derives positions from it."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask is sized as for a full cache; only its padding pattern over the new tokens is read.
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1  # any number of tokens fits

    def nbytes(self) -> int:
        """Bytes held: k, v, psi, pos, scores, H, z and next_position."""
        if self.slots is None:
            return 0
        return sum(t.nelement() * t.element_size() for t in vars(self.slots).values())

    def full_nbytes(self) -> int:
        """Bytes a full cache (transformers' DynamicLayer) would hold for the same tokens: K and V of every column."""
        if self.slots is None:
            return 0
        B, Hkv, _, D = self.slots.k.shape
        return 2 * B * Hkv * self.seen * D * self.slots.k.element_size()

    def _map_rows(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply a batch-dimension selection to every per-row tensor."""
        if self.slots is not None:
            self.slots = replace(self.slots, **{name: fn(t) for name, t in vars(self.slots).items()})

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes the state of row beam_idx[i]."""
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_rows(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a LessCache cannot be cropped: evicted tokens are folded into the state for good")

    def reset(self) -> None:
        self.resolved = self.slots = None
        self.seen = 0
        self.awaiting_attention = self.is_initialized = False
