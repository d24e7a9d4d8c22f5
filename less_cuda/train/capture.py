"""What each attention layer of a frozen model sees: its post-RoPE q, k, v over a set of sequences, captured in one
forward pass of the unmodified model (exact attention). The per-layer stage of `less-cuda train` fits φ/ψ on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..hf.attention import attention_function

CAPTURE_ATTENTION = "less_capture"


@dataclass
class LayerCapture:
    """One layer's attention inputs over N sequences: q [N, Hq, T, D], k, v [N, Hkv, T, D] (post-RoPE, model
    dtype); the logit scale; o_proj [hidden, Hq * D], the frozen output projection the loss is measured through."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    o_proj: Tensor


@torch.no_grad()
def capture(
    model, sequences: Tensor, layers: list[int], batch_size: int, desc: str = "capture"
) -> dict[int, LayerCapture]:
    """Run the frozen model (exact attention) over sequences [N, T] and keep the q, k, v of `layers` (on the CPU)."""
    captures: dict[int, LayerCapture] = {}
    rows = slice(0, 0)  # the sequences of the current batch

    def record(module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        if layer in layers:
            if layer not in captures:  # filled in place: concatenating per-batch pieces would need twice the memory
                empty = lambda t: t.new_empty(len(sequences), *t.shape[1:], device="cpu")  # noqa: E731
                scale = query.shape[-1] ** -0.5 if scaling is None else scaling
                captures[layer] = LayerCapture(empty(query), empty(key), empty(value), scale,
                                               module.o_proj.weight.detach().float().cpu())
            captures[layer].q[rows], captures[layer].k[rows], captures[layer].v[rows] = query, key, value
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    device = next(model.parameters()).device
    base = model.get_decoder()  # the logits are not needed
    with attention_function(model, record, CAPTURE_ATTENTION):
        for first in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch", leave=False):
            rows = slice(first, first + batch_size)
            base(input_ids=sequences[rows].to(device), use_cache=False)
    return captures
