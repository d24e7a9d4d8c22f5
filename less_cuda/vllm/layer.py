"""The LESS state layer: a full-attention layer whose per-request cache is a constant-size state that vLLM
allocates and hands over like a Mamba layer's.

State of one request (its row in each tensor), for the layer's Hkv KV heads on this rank and S = budget + 1 slots:
    k, v [Hkv, S, D] (model dtype), psi [Hkv, S, R], pos [Hkv, S] int32, scores [Hkv, S], H [Hkv, R, D], z [Hkv, R]
    (fp32), next_position [1] int32
which is `state.SlotCache` for one batch row; without feature maps (R = 0) psi, H and z are not stored.

Per step the layer does what `LessCache` does for the same tokens, on groups the metadata builder prepared
(`backend.LessStateMetadata`):
- requests with no tokens before this step (a whole prompt or the first chunk of a chunked prefill) get exact
  causal attention together, right-padded to the longest, and the policy compresses them into their rows
  (`compressed_layer.prefill`); this rewrites each whole row, so the stale data a new request's row holds never
  leaks in;
- every other request's new tokens (decodes and later prefill chunks) stream through the decode rule in one fused op
  call that updates their rows of vLLM's state tensors in place (`state_rows`): each slot byte is read once and
  only the new token's slot is written, with no gather before the step and no scatter after it. The step reads
  device tensors only: no host synchronisation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.utils.torch_utils import LayerNameType, _encode_layer_name, _resolve_layer_name, direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ..core import compressed_layer
from ..core.feature_maps import LayerFeatureMaps
from ..core.state import SlotCache
from .backend import LessStateMetadata, RequestGroup
from .settings import ServingSettings

LOWRANK_FIELDS = ("psi", "H", "z")
"""SlotCache fields that exist only with feature maps (R > 0)."""


def state_shapes(settings: ServingSettings, num_kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """Per-request shape of each stored SlotCache field, in storage order."""
    S, R, Hkv, D = settings.resolved.num_slots, settings.rank, num_kv_heads, head_dim
    shapes = {"k": (Hkv, S, D), "v": (Hkv, S, D), "psi": (Hkv, S, R), "pos": (Hkv, S), "scores": (Hkv, S),
              "H": (Hkv, R, D), "z": (Hkv, R), "next_position": (1,)}  # fmt: skip
    return {name: shape for name, shape in shapes.items() if R or name not in LOWRANK_FIELDS}


def state_dtypes(settings: ServingSettings, model_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """dtype of each stored SlotCache field, in the order of `state_shapes`."""
    dtypes = {"k": model_dtype, "v": model_dtype, "psi": torch.float32, "pos": torch.int32, "scores": torch.float32,
              "H": torch.float32, "z": torch.float32, "next_position": torch.int32}  # fmt: skip
    return {name: dtypes[name] for name in state_shapes(settings, 1, 1)}


class LessStateLayer(MambaBase, nn.Module):
    """Stands in for vLLM's `Attention` in one decoder layer: forward(q, k, v) with q [N, Hq * D] and k, v
    [N, Hkv * D] after RoPE, the heads of this tensor-parallel rank; returns [N, Hq * D]."""

    def __init__(
        self,
        prefix: str,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        model_dtype: torch.dtype,
        settings: ServingSettings,
        feature_maps: Optional[LayerFeatureMaps],
    ):
        nn.Module.__init__(self)
        self.prefix = prefix
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.model_dtype = model_dtype
        self.settings = settings
        # Not a submodule: vLLM's weight loader would look for φ/ψ in the base model's checkpoint.
        object.__setattr__(self, "feature_maps", feature_maps)
        context = get_current_vllm_config().compilation_config.static_forward_context
        context.pop(prefix, None)  # the Attention this layer replaces registered itself under the same name
        context[prefix] = self
        self.kv_cache = (torch.tensor([]),)
        self.stored_fields = tuple(state_shapes(settings, num_kv_heads, head_dim))  # names of the kv_cache tensors

    # MambaBase: what vLLM allocates per request, and which backend builds the step metadata.
    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return tuple(state_shapes(self.settings, self.num_kv_heads, self.head_dim).values())

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return tuple(state_dtypes(self.settings, self.model_dtype).values())

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.CUSTOM

    def pool(self) -> SlotCache:
        """The state tensors vLLM allocated for this layer as one `SlotCache` over all its rows (views, no copy):
        the decode step updates the running requests' rows in place."""
        cache = dict(zip(self.stored_fields, self.kv_cache))
        cache["next_position"] = cache["next_position"][:, 0]
        if not self.settings.rank:  # no low-rank state: empty fields, which take no memory
            N, Hkv, S, D = cache["k"].shape
            empty = dict(dtype=torch.float32, device=cache["k"].device)
            cache.update(psi=torch.empty(N, Hkv, S, 0, **empty), H=torch.empty(N, Hkv, 0, D, **empty),
                         z=torch.empty(N, Hkv, 0, **empty))  # fmt: skip
        return SlotCache(**cache)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = torch.empty_like(q)
        torch.ops.vllm.less_state_attention(q, k, v, out, _encode_layer_name(self.prefix))
        return out

    def attend(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> None:
        """The layer's step, into `out` (what the registered op runs)."""
        out.zero_()  # the rows of padding tokens (vLLM pads batches to captured sizes)
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if metadata is None:  # vLLM's profiling run: no state is bound yet
            return
        assert isinstance(metadata, LessStateMetadata)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        pool = self.pool()
        for group, attend in ((metadata.fresh, self._prefill), (metadata.stream, self._stream)):
            if group is not None:
                requests = (t[group.tokens].transpose(1, 2).contiguous() for t in (q, k, v))  # [n, heads, T, D]
                attended = attend(pool, group, *requests)
                attended = attended.transpose(1, 2).reshape(-1, out.shape[-1])  # [n * T, Hq * D]
                if group.real is not None:
                    attended = attended.index_select(0, group.real)
                out.index_copy_(0, group.destination, attended)

    def _prefill(self, pool: SlotCache, group: RequestGroup, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Exact causal attention over the fresh requests' tokens, then their compression into their state rows."""
        valid = group.valid if group.valid is not None else torch.ones(q.shape[0], q.shape[2], dtype=torch.bool,
                                                                       device=q.device)  # fmt: skip
        attended, state = compressed_layer.prefill(q, k, v, valid, self.scale, self.settings.resolved,
                                                   self.feature_maps, attend=True)
        for name, field in vars(pool).items():
            if field.numel():
                field[group.rows] = getattr(state, name)
        return attended

    def _stream(self, pool: SlotCache, group: RequestGroup, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The decode rule for the new tokens of every request that has a state: one op call, in place on the
        requests' rows of the pool. Pad tokens take no slot and change nothing."""
        return compressed_layer.decode(pool, q, k, v, group.valid, self.scale, self.settings.resolved,
                                       self.feature_maps, state_rows=group.rows)


@eager_break_during_capture
def less_state_attention(q: Tensor, k: Tensor, v: Tensor, output: Tensor, layer_name: LayerNameType) -> None:
    """`vllm::less_state_attention`: a LESS layer's step as one op that torch.compile does not trace into, as vLLM's
    own attention and Mamba layers are. The engine then compiles the rest of the model and splits its graph here
    (`less_cuda.vllm.register` adds the op to vLLM's splitting ops)."""
    layer = get_forward_context().no_compile_layers[_resolve_layer_name(layer_name)]
    layer.attend(q, k, v, output)


direct_register_custom_op(op_name="less_state_attention", op_func=less_state_attention, mutates_args=["output"])
