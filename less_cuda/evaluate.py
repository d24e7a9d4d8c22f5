"""Perplexity of a frozen model with full attention, a sparse policy (H2O or Λ), Baseline+ and LESS, in the parallel
form (`less-cuda eval`).

Every full-attention layer runs the "less_parallel" attention function: the policy's kept sets for the whole
sequence come from `slots.stream_kept_masks` driven by the compiled ops (the policy code of the cache), and the
output from `reference.parallel_attention` with φ(q), ψ(k) of the layer's post-RoPE queries and keys (LESS) or
without them (the sparse policy alone). Unlike training, nothing is teacher-forced: each layer sees the hidden
states that the compressed layers below it produced.

Baseline+ is the sparse policy given the bytes LESS's state costs as extra cached tokens (`baseline_plus`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import ops, reference, slots
from .feature_maps import FeatureMaps
from .policy import Policy

ATTENTION = "less_parallel"
METHODS = ("full", "sparse", "baseline_plus", "less")


def lowrank_state_bytes(head_dim: int, rank: int, num_slots: int) -> int:
    """fp32 bytes LESS adds per (layer, batch row, KV head): H (R x D), z (R) and psi(k) of every slot (R each)."""
    return 4 * rank * (head_dim + 1 + num_slots)


def baseline_plus(policy: Policy, length: int, head_dim: int, rank: int, dtype: torch.dtype) -> Policy:
    """The sparse policy given, as extra tokens, the bytes LESS's state costs at sequence length `length`.

    Extra tokens = ceil(state bytes / (K + V bytes of one token in `dtype`)): rounded up, in the baseline's favour.
    The token-count fields keep their meaning (H2O's `recent` stays a share of the larger budget when it was left to
    its default or given as a fraction; Λ keeps its sinks and gives the extra slots to recent tokens).
    """
    resolved = policy.resolve(length)
    token_bytes = 2 * head_dim * torch.finfo(dtype).bits // 8
    extra = math.ceil(lowrank_state_bytes(head_dim, rank, resolved.num_slots) / token_bytes)
    return replace(policy, budget=resolved.budget + extra)


def parallel_attention_function(policy: Policy, feature_maps: Optional[FeatureMaps]) -> Callable:
    """A transformers attention function applying `policy` (and LESS when `feature_maps` is given) at every layer.

    transformers calls it as f(module, query [B, Hq, T, D], key, value [B, Hkv, T, D], attention_mask, scaling=...)
    with post-RoPE query/key; `module.layer_idx` names the layer. Returns (out [B, T, Hq, D], None). The sequences
    must have no padding (packed text): the policy and the causal structure come from the masks, not from
    `attention_mask`.
    """

    def attend(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
               scaling: Optional[float] = None, **kwargs) -> tuple[Tensor, None]:
        if attention_mask is not None and not bool(attention_mask.any(dim=-2).all()):  # a key no query sees: padding
            raise ValueError("the parallel-form evaluation takes unpadded sequences")
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        resolved = policy.resolve(query.shape[2])
        kept = slots.stream_kept_masks(
            query, key, scale, *resolved.as_args(), attend=ops.less_decode_attention, evict_=ops.less_score_and_evict_
        )
        layer = module.layer_idx
        lowrank = feature_maps is not None and feature_maps.has_layer(layer)
        phi = feature_maps.phi(layer, query) if lowrank else None
        psi = feature_maps.psi(layer, key) if lowrank else None
        return reference.parallel_attention(query, key, value, kept, phi, psi, scale).transpose(1, 2), None

    return attend


@contextmanager
def attention_function(model, function: Callable, name: str = ATTENTION) -> Iterator[None]:
    """Run `model` with `function` registered as its attention implementation `name` within the block."""
    AttentionInterface.register(name, function)
    # A custom name without a mask function would get no mask at all; with the sdpa one `attend` can refuse padding.
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def perplexity(model, sequences: Tensor, function: Optional[Callable] = None, batch_size: int = 1,
               desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over sequences [N, T] (every position but the first), with `function` as the
    attention implementation, or the model's own (full attention) when None."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with attention_function(model, function) if function is not None else nullcontext():
        for start in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch", leave=False):
            ids = sequences[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


@dataclass
class Comparison:
    """Perplexities of one policy setting over sequences of `length` tokens; `gap_closed` is the share of the sparse
    policy's perplexity increase over full attention that LESS removes: (sparse - less) / (sparse - full)."""

    policy: Policy
    baseline_plus: Policy
    length: int
    perplexity: dict[str, float]

    @property
    def gap_closed(self) -> float:
        p = self.perplexity
        return (p["sparse"] - p["less"]) / (p["sparse"] - p["full"])

    def table(self) -> str:
        budget, plus = self.policy.resolve(self.length).budget, self.baseline_plus.resolve(self.length).budget
        names = {"full": "full cache", "sparse": self.policy.kind, "baseline_plus": f"Baseline+ ({plus} tokens)",
                 "less": "LESS"}
        lines = [f"{self.policy.kind}, budget {budget} of {self.length} tokens", f"{'method':<24} {'perplexity':>10}"]
        lines += [f"{names[m]:<24} {self.perplexity[m]:>10.3f}" for m in METHODS if m in self.perplexity]
        if all(m in self.perplexity for m in ("full", "sparse", "less")):
            lines.append(f"LESS closes {100 * self.gap_closed:.1f}% of the {self.policy.kind} -> full-cache gap")
        return "\n".join(lines)


def compare(model, sequences: Tensor, policy: Policy, feature_maps: FeatureMaps, batch_size: int = 1,
            methods: tuple[str, ...] = METHODS) -> Comparison:
    """Perplexity of `model` over sequences [N, T] with full attention, `policy` alone, Baseline+ and LESS."""
    dtype = next(model.parameters()).dtype
    plus = baseline_plus(policy, sequences.shape[1], feature_maps.config.head_dim, feature_maps.rank, dtype)
    functions = {
        "full": None,
        "sparse": parallel_attention_function(policy, None),
        "baseline_plus": parallel_attention_function(plus, None),
        "less": parallel_attention_function(policy, feature_maps),
    }
    ppl = {m: perplexity(model, sequences, functions[m], batch_size, desc=m) for m in methods}
    return Comparison(policy, plus, sequences.shape[1], ppl)
