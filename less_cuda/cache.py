"""The compressed KV cache for transformers: `LessLayer` owns one full-attention layer's fixed slots, H2O scores and
low-rank state; `LessCache` is a transformers `Cache` whose full-attention layers are LessLayers.

Per layer, batch row and KV head the cache holds `budget + 1` slots (the budget plus the incoming token) and the
rank-R state H, z: its size stops growing once the budget is reached. The sparse-only baselines are the same
machinery with R = 0 (no feature maps, an empty state that attention ignores exactly).

Positions given to the policy are each real token's index among the real tokens of its row
(`slots.token_positions`), so left padding shifts nothing; pad tokens are never attended, scored, kept or folded.

A prompt fed to a fresh cache in one forward call is compressed at once (exact attention, H2O column sums, keep
the recent and top-scoring tokens, fold the rest). Chunked prefill in that sense is not offered: the selection needs
the attention columns of the whole prompt, and a chunk cannot know them. Tokens that arrive in later calls (decode,
generate's `prefill_chunk_size`, continuing a conversation) stream through the decode rule one at a time, which is
the contract's streaming form of the same policy; a fractional budget is resolved on the first call's length.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, get_layer_types_and_kwargs

from . import reference, slots
from .attention import announce, use_less_attention
from .feature_maps import FeatureMaps
from .ops import less_decode_step_
from .policy import Policy, ResolvedPolicy
from .prefill import compress_prompt, prefill_attention


def model_layout(config: PretrainedConfig) -> dict:
    """The model facts a feature-map checkpoint must agree with (keys of `FeatureMapsConfig.layout`)."""
    config = config.get_text_config(decoder=True)
    return {
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "hidden_size": config.hidden_size,
    }


class LessLayer(CacheLayerMixin):
    """One full-attention layer under LESS (H2O or Λ, with or without the low-rank state).

    State: a `slots.SlotCache` with S = budget + 1 slots per (batch row, KV head) and R = 0 without feature maps.

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
        self.feature_maps = feature_maps
        self.resolved: Optional[ResolvedPolicy] = None
        self.slots: Optional[slots.SlotCache] = None
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
            raise RuntimeError(
                f"LessCache layer {self.layer_idx} was updated twice without the 'less' attention in between: the "
                "model's attention implementation must be 'less' (LessCache(model, ...) and less_cuda.apply set it)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self.awaiting_attention = True
        announce(self, key_states)
        return key_states, value_states

    def _psi(self, k: Tensor) -> Tensor:
        """psi(k) [B, Hkv, T, R]; R = 0 without feature maps."""
        if self.feature_maps is None:
            return k.new_zeros(*k.shape[:3], 0, dtype=torch.float32)
        return self.feature_maps.psi(self.layer_idx, k)

    @torch.no_grad()
    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float, scores: Optional[Tensor] = None
    ) -> None:
        """Compress a prompt into the slots and the state. q [B, Hq, T, D]; k, v [B, Hkv, T, D]; valid [B, T] bool.

        H2O scores are the column sums of the prompt's causal attention, scores [B, Hkv, T] fp32: the attention
        function passes those of its own pass (`prefill.prefill_attention`); without them they are computed here.
        Λ needs none. The policy keeps `budget` tokens per row and KV head; every other real token is folded into
        H, z in one call.
        """
        self.awaiting_attention = False
        B, Hkv, T, _ = k.shape
        self.resolved = self.policy.resolve(int(valid.sum(dim=-1).max()))
        if self.resolved.policy_id == reference.H2O:
            if scores is None:
                scores = prefill_attention(q, k, v, valid, scale)[1]
        else:  # Λ orders evictions by position alone
            scores = torch.zeros(B, Hkv, T, dtype=torch.float32, device=k.device)
        self.slots = compress_prompt(k, v, self._psi(k), valid, scores, self.resolved)

    @torch.no_grad()
    def decode(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float) -> Tensor:
        """The decode step for each of T new tokens in turn, in one fused op call.
        q [B, Hq, T, D]; k, v [B, Hkv, T, D]; valid [B, T]. Returns out [B, Hq, T, D].
        A pad token takes no slot, adds no score and evicts nothing."""
        self.awaiting_attention = False
        phi = psi = None
        if self.feature_maps is not None:  # phi(q), psi(k) once for all of the call's tokens
            phi, psi = self.feature_maps.features(self.layer_idx, q, k)
        return less_decode_step_(self.slots, q, k, v, phi, psi, valid, *self.resolved.as_args(), scale=scale)

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


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held per cache layer, and what a full cache would hold for the same tokens (K and V of every column
    seen, padding included, as transformers' DynamicCache stores them). Layers LESS does not compress count the same
    in both."""

    layer_bytes: list[int]
    full_layer_bytes: list[int]

    @property
    def total(self) -> int:
        return sum(self.layer_bytes)

    @property
    def full_total(self) -> int:
        return sum(self.full_layer_bytes)

    @property
    def ratio(self) -> float:
        """total / full_total."""
        return self.total / max(self.full_total, 1)

    def __str__(self) -> str:
        mib = 2.0**20
        return f"{self.total / mib:.2f} MiB vs {self.full_total / mib:.2f} MiB for a full cache ({self.ratio:.1%})"


def layer_nbytes(layer: CacheLayerMixin) -> int:
    """Bytes of a transformers cache layer's K and V."""
    return sum(t.nelement() * t.element_size() for t in (layer.keys, layer.values) if t is not None)


class LessCache(Cache):
    """A transformers `Cache` that compresses every full-attention layer with LESS.

    Full-attention layers get a `LessLayer`; other layer kinds (e.g. sliding-window) the layer class transformers
    would use. Constructing one switches `model` to the "less" attention implementation, which is exact sdpa for any
    other cache, so `model.generate(..., past_key_values=LessCache(model, feature_maps, policy))` just works.
    A cache holds one batch of sequences: use a fresh one for each new prompt. Passing it to a later `generate` call
    continues its sequences, the new tokens streaming through the decode rule.

    Args:
        model: the causal LM (its config gives the layer kinds and layout).
        feature_maps: φ/ψ fitted for this model and policy kind, on the model's device; None for the sparse-only
            baseline of the same policy (real eviction, no low-rank state). A layer the feature maps do not cover
            (`FeatureMapsConfig.layers`) runs the sparse policy alone, as in `less_cuda.evaluate`.
        policy: a `Policy`, or its kind ("h2o" / "lambda") with the default budget.
    """

    def __init__(
        self, model: PreTrainedModel, feature_maps: Optional[FeatureMaps] = None, policy: Union[Policy, str] = "h2o"
    ):
        policy = Policy(kind=policy) if isinstance(policy, str) else policy
        if feature_maps is not None:
            feature_maps.check_compatible(model_layout(model.config), policy.kind)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
        layers = []
        for i, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
            if kind == "full_attention":
                covered = feature_maps is not None and feature_maps.has_layer(i)
                layers.append(LessLayer(i, policy, feature_maps if covered else None))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
        super().__init__(layers=layers)
        self.policy = policy
        self.feature_maps = feature_maps
        use_less_attention(model)

    def __repr__(self) -> str:
        """Policy, budget, rank, the layers compressed and the bytes held, e.g. "LessCache(h2o, budget 51 tokens
        (0.05 of the prompt), recent 25, rank 8, 30/30 layers compressed, 1.23 MiB vs 22.50 MiB for a full cache
        (5.5%) held)". Before the prompt, a fractional budget is shown as given."""
        p = self.policy
        less_layers = [layer for layer in self.layers if isinstance(layer, LessLayer)]
        resolved = next((layer.resolved for layer in less_layers if layer.resolved is not None), None)
        if resolved is None and isinstance(p.budget, int):
            resolved = p.resolve(p.budget)
        if resolved is None:
            recent = "half" if p.recent is None else p.recent
            settings = f"budget {p.budget:g} of the prompt, " + (
                f"sinks {p.sinks}" if p.kind == "lambda" else f"recent {recent}")
        else:
            fraction = f" ({p.budget:g} of the prompt)" if isinstance(p.budget, float) else ""
            kept = f"sinks {resolved.sinks}" if p.kind == "lambda" else f"recent {resolved.recent}"
            settings = f"budget {resolved.budget} tokens{fraction}, {kept}"
        rank = f"rank {self.feature_maps.rank}" if self.feature_maps is not None else "sparse only"
        held = f"{self.memory_report()} held" if any(layer.is_prefilled for layer in less_layers) else "empty"
        layers = f"{len(less_layers)}/{len(self.layers)} layers compressed"
        return f"LessCache({p.kind}, {settings}, {rank}, {layers}, {held})"

    def memory_report(self) -> MemoryReport:
        """Bytes held by each layer and in total, against a full cache of the same tokens."""
        held = [layer.nbytes() if isinstance(layer, LessLayer) else layer_nbytes(layer) for layer in self.layers]
        full = [layer.full_nbytes() if isinstance(layer, LessLayer) else layer_nbytes(layer) for layer in self.layers]
        return MemoryReport(held, full)
