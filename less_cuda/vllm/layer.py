"""The LESS state layer: a full-attention layer whose per-request cache is a constant-size state that vLLM
allocates and hands over like a Mamba layer's.

State of one request (its row in each tensor), for the layer's Hkv KV heads on this rank and S = budget + 1 slots:
    k, v [Hkv, S, D] (model dtype), psi [Hkv, S, R], pos [Hkv, S] int32, scores [Hkv, S], H [Hkv, R, D], z [Hkv, R]
    (fp32), next_position [1] int32
which is `state.SlotCache` for one batch row; without feature maps (R = 0) psi, H and z are not stored.

Per step the layer does what `LessCache` does for the same tokens:
- a request's first tokens (no tokens computed before, a whole prompt or the first chunk of a chunked prefill) get
  exact causal attention, and the policy compresses them into the request's row (`compressed_layer.prefill`); this
  rewrites the whole row, so the stale data a new request's row holds never leaks in;
- every other request's new tokens (decodes and later prefill chunks) stream through the decode rule: one fused
  decode step for all of them (`compressed_layer.decode`), the rows gathered from and written back to the state
  tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ..core import compressed_layer
from ..core.feature_maps import LayerFeatureMaps
from ..core.state import SlotCache
from .backend import LessStateMetadata
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

    def _rows(self, rows: Tensor) -> SlotCache:
        """The SlotCache of the requests whose state rows are `rows` (a copy, [len(rows), ...] per field)."""
        cache = {name: t[rows] for name, t in zip(self.stored_fields, self.kv_cache)}
        cache["next_position"] = cache["next_position"].view(-1)
        if not self.settings.rank:
            B, Hkv, S, D = cache["k"].shape
            empty = dict(dtype=torch.float32, device=rows.device)
            cache.update(psi=torch.zeros(B, Hkv, S, 0, **empty), H=torch.zeros(B, Hkv, 0, D, **empty),
                         z=torch.zeros(B, Hkv, 0, **empty))  # fmt: skip
        return SlotCache(**cache)

    def _store(self, rows: Tensor, cache: SlotCache) -> None:
        for name, t in zip(self.stored_fields, self.kv_cache):
            t[rows] = getattr(cache, name).view(-1, *t.shape[1:])

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = torch.zeros_like(q)
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if metadata is None:  # vLLM's profiling run: no state is bound yet
            return out
        assert isinstance(metadata, LessStateMetadata)
        n = metadata.num_tokens
        q = q[:n].view(n, self.num_heads, self.head_dim)
        k = k[:n].view(n, self.num_kv_heads, self.head_dim)
        v = v[:n].view(n, self.num_kv_heads, self.head_dim)
        flat = out[:n].view(n, self.num_heads, self.head_dim)
        starts = metadata.query_start.tolist()
        fresh = (metadata.computed == 0).tolist()
        for i in (i for i, is_new in enumerate(fresh) if is_new):
            self._prefill(metadata.state_rows[i : i + 1], q, k, v, flat, starts[i], starts[i + 1])
        streaming = [i for i, is_new in enumerate(fresh) if not is_new]
        if streaming:
            self._stream(metadata, streaming, q, k, v, flat)
        return out

    def _prefill(self, row: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, start: int, end: int) -> None:
        """Exact attention over one request's first tokens, then their compression into its state row."""
        q, k, v = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, T, D]
        valid = torch.ones(1, end - start, dtype=torch.bool, device=q.device)
        attended, state = compressed_layer.prefill(q, k, v, valid, self.scale, self.settings.resolved,
                                                   self.feature_maps, attend=True)
        self._store(row, state)
        out[start:end] = attended[0].transpose(0, 1)

    def _stream(self, metadata: LessStateMetadata, requests: list[int], q: Tensor, k: Tensor, v: Tensor,
                out: Tensor) -> None:  # fmt: skip
        """The decode rule for the new tokens of every request that has a state, in one op call. Requests with
        fewer new tokens than the longest are right-padded; pad tokens take no slot and change nothing."""
        index = torch.tensor(requests)
        starts = metadata.query_start[index]
        lengths = metadata.query_start[index + 1] - starts
        steps = torch.arange(int(lengths.max()))
        valid = steps[None, :] < lengths[:, None]  # [B, T]
        tokens = (starts[:, None] + torch.minimum(steps[None, :], lengths[:, None] - 1)).to(q.device)
        q, k, v = (t[tokens].transpose(1, 2).contiguous() for t in (q, k, v))  # [B, heads, T, D]
        rows = metadata.state_rows[index.to(metadata.state_rows.device)]
        state = self._rows(rows)
        step_valid = None if bool(valid.all()) else valid.to(q.device)
        attended = compressed_layer.decode(state, q, k, v, step_valid, self.scale, self.settings.resolved,
                                           self.feature_maps)
        self._store(rows, state)
        valid = valid.to(q.device)
        out[tokens[valid]] = attended.transpose(1, 2)[valid]
