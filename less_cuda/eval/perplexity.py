"""Perplexity of a frozen model with full attention, a sparse policy (H2O or Λ), Baseline+ and LESS
(`less-cuda eval`), in three forms:

- "parallel": every full-attention layer runs the "less_parallel" attention function. The policy's kept sets for
  the whole sequence come from `state.kept_masks` driven by the compiled ops (the policy code of the cache),
  and the output from `reference.parallel_attention` with φ(q), ψ(k) of the layer's post-RoPE queries and keys
  (LESS) or without them (the sparse policy alone). Every token streams through the policy from the start.
- "streaming": the real `LessCache`, fed one token per forward call from the first token on, the budget resolved
  against the whole sequence. It is the parallel form computed the way generation computes it, and agrees with it.
- "prefill": what `generate` does. The first P tokens are a prompt that the `LessCache` compresses at prefill (the
  budget resolved against P); the rest stream through the decode rule, and only they are scored.

Nothing is teacher-forced: each layer sees the hidden states that the compressed layers below it produced.
Baseline+ is the sparse policy given the bytes LESS's state costs as extra cached tokens (`baseline_plus`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..core import ops, reference, state
from ..hf.attention import keep_attention_implementation
from ..hf.models import full_attention_layers
from ..hf.cache import LessCache
from ..core.feature_maps import FeatureMaps
from ..core.policy import Policy

ATTENTION = "less_parallel"
METHODS = ("full", "sparse", "baseline_plus", "less")
FORMS = ("parallel", "streaming", "prefill")


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


def _token_counts(policy: Policy, length: int) -> Policy:
    """`policy` with its fractional budget and H2O recent share resolved against `length` tokens."""
    resolved = policy.resolve(length)
    return replace(policy, budget=resolved.budget, recent=resolved.recent if policy.kind == "h2o" else None)


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


@contextmanager
def attention_function(model, function: Callable, name: str = ATTENTION) -> Iterator[None]:
    """Run `model` with `function` registered as its attention implementation `name` within the block."""
    AttentionInterface.register(name, function)
    # A custom name without a mask function would get no mask at all; with the sdpa one `attend` can refuse padding.
    AttentionMaskInterface.register(name, sdpa_mask)
    with keep_attention_implementation(model):
        model.set_attn_implementation(name)
        yield


def _nll(logits: Tensor, ids: Tensor, offset: int, first_target: int) -> tuple[float, int]:
    """Summed next-token NLL and count for logits [B, L, V] of positions offset .. offset + L - 1 of ids [B, T],
    counting only the targets at positions >= first_target (position p predicts ids[:, p + 1])."""
    start = max(first_target - 1 - offset, 0)
    stop = min(logits.shape[1], ids.shape[1] - 1 - offset)
    if start >= stop:
        return 0.0, 0
    targets = ids[:, offset + start + 1 : offset + stop + 1]
    nll = F.cross_entropy(logits[:, start:stop].flatten(0, 1).float(), targets.flatten(), reduction="sum")
    return float(nll), targets.numel()


def _batches(sequences: Tensor, batch_size: int, desc: str) -> Iterator[Tensor]:
    return tqdm(sequences.split(batch_size), desc=desc, unit="batch", leave=False)


@torch.no_grad()
def perplexity(model, sequences: Tensor, function: Optional[Callable] = None, batch_size: int = 1,
               desc: str = "perplexity", first_target: int = 1) -> float:
    """exp(mean next-token NLL) over sequences [N, T] (the targets at positions >= first_target), with `function` as
    the attention implementation, or the model's own (full attention) when None."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with attention_function(model, function) if function is not None else nullcontext():
        for ids in _batches(sequences, batch_size, desc):
            ids = ids.to(device)
            n, c = _nll(model(input_ids=ids, use_cache=False).logits, ids, 0, first_target)
            nll, count = nll + n, count + c
    return math.exp(nll / count)


@torch.no_grad()
def cache_perplexity(model, sequences: Tensor, make_cache: Callable[[], Cache], prompt_length: int,
                     chunk: Optional[int] = None, batch_size: int = 1, desc: str = "perplexity") -> float:
    """exp(mean NLL) of the tokens after the first `prompt_length` of sequences [N, T], each batch through a fresh
    cache from `make_cache`: the prompt in one forward call (prefill), then the rest `chunk` tokens per call
    (None: all in one call, which the cache streams through the decode rule token by token)."""
    device = next(model.parameters()).device
    T = sequences.shape[1]
    if not 0 < prompt_length < T:
        raise ValueError(f"the prompt must be 1 to {T - 1} tokens of the {T}-token sequences, got {prompt_length}")
    step = chunk or T - prompt_length
    bounds = [(0, prompt_length)] + [(s, min(s + step, T)) for s in range(prompt_length, T, step)]
    nll, count = 0.0, 0
    with keep_attention_implementation(model):
        for ids in _batches(sequences, batch_size, desc):
            ids, cache = ids.to(device), make_cache()
            for start, stop in bounds:
                logits = model(input_ids=ids[:, start:stop], past_key_values=cache, use_cache=True).logits
                n, c = _nll(logits, ids, start, prompt_length)
                nll, count = nll + n, count + c
    return math.exp(nll / count)


def gap_closed(perplexities: dict[str, float], reference: str) -> Optional[float]:
    """(X - LESS) / (X - full) for X = perplexities[reference]: the share of X's gap to the full cache that LESS
    removes. None when a method is missing or X equals the full cache."""
    p = perplexities
    if not all(m in p for m in ("full", "less", reference)) or p[reference] == p["full"]:
        return None
    return (p[reference] - p["less"]) / (p[reference] - p["full"])


@dataclass
class Comparison:
    """Perplexities of one policy setting in one evaluation form over sequences of `length` tokens.
    `budget_length` is what a fractional budget resolves against: the sequence (parallel, streaming) or the prompt
    (prefill, where only the tokens after the prompt are scored)."""

    policy: Policy
    baseline_plus: Policy
    length: int
    perplexity: dict[str, float]
    form: str = "parallel"
    budget_length: int = 0
    checkpoint: Optional[str] = None

    def __post_init__(self) -> None:
        self.budget_length = self.budget_length or self.length

    @property
    def gap_closed(self) -> dict[str, Optional[float]]:
        """Share of the gap to the full cache that LESS closes, against the sparse policy and against Baseline+."""
        return {x: gap_closed(self.perplexity, x) for x in ("sparse", "baseline_plus")}

    @property
    def budget_tokens(self) -> int:
        return self.policy.resolve(self.budget_length).budget

    def to_json(self) -> dict:
        """One entry of `less-cuda eval`'s "results" list."""
        return {
            "policy": asdict(self.policy), "budget_tokens": self.budget_tokens,
            "budget_fraction": self.budget_tokens / self.budget_length,
            "baseline_plus_budget": self.baseline_plus.resolve(self.budget_length).budget,
            "checkpoint": self.checkpoint, "perplexity": self.perplexity, "gap_closed": self.gap_closed,
        }

    def table(self) -> str:
        plus = self.baseline_plus.resolve(self.budget_length).budget
        names = {"full": "full cache", "sparse": self.policy.kind, "baseline_plus": f"Baseline+ ({plus} tokens)",
                 "less": "LESS"}
        scope = (f"the {self.length - self.budget_length} tokens after a {self.budget_length}-token prompt"
                 if self.form == "prefill" else f"{self.length} tokens")
        window = self.policy.score_window
        ranked = ""  # only the prefill form compresses a prompt, and only H2O ranks its tokens by scores
        if self.form == "prefill" and self.policy.kind == "h2o":
            ranked = f", prompt ranked by {'column sums' if window is None else f'the last {window} rows'}"
        lines = [f"{self.form} form, {self.policy.kind}{ranked}, budget {self.budget_tokens} tokens; scored: {scope}",
                 f"{'method':<24} {'perplexity':>10}"]
        lines += [f"{names[m]:<24} {self.perplexity[m]:>10.3f}" for m in METHODS if m in self.perplexity]
        for reference_method, closed in self.gap_closed.items():
            if closed is not None:
                lines.append(f"LESS closes {100 * closed:.1f}% of the {names[reference_method]} -> full-cache gap")
        return "\n".join(lines)


def compare(model, sequences: Tensor, policy: Policy, feature_maps: Optional[FeatureMaps], batch_size: int = 1,
            methods: tuple[str, ...] = METHODS, form: str = "parallel", prompt_length: Optional[int] = None,
            checkpoint: Optional[str] = None) -> Comparison:
    """Perplexity of `model` over sequences [N, T] with full attention, `policy` alone, Baseline+ and LESS, in the
    evaluation `form` ("parallel", "streaming" or "prefill"; see the module docstring). prompt_length: the prefill
    form's P (default T // 2)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    T = sequences.shape[1]
    budget_length = (prompt_length or T // 2) if form == "prefill" else T
    if feature_maps is None and {"less", "baseline_plus"} & set(methods):
        raise ValueError("LESS and Baseline+ (sized by the state's bytes) need feature maps")
    dtype = next(model.parameters()).dtype
    plus = (baseline_plus(policy, budget_length, feature_maps.config.head_dim, feature_maps.rank, dtype)
            if feature_maps is not None else policy)
    if form == "streaming":  # the cache resolves a fraction on its first call, one token here: resolve both now
        policy, plus = _token_counts(policy, T), _token_counts(plus, T)
    settings = {"sparse": (policy, None), "baseline_plus": (plus, None), "less": (policy, feature_maps)}
    ppl = {}
    for method in methods:
        if method == "full" or form == "parallel":
            function = None if method == "full" else parallel_attention_function(*settings[method])
            first_target = budget_length if form == "prefill" else 1
            ppl[method] = perplexity(model, sequences, function, batch_size, method, first_target)
        else:
            make_cache = lambda s=settings[method]: LessCache(model, s[1], s[0])  # noqa: E731
            prompt, chunk = (1, 1) if form == "streaming" else (budget_length, None)
            ppl[method] = cache_perplexity(model, sequences, make_cache, prompt, chunk, batch_size, method)
    return Comparison(policy, plus, T, ppl, form, budget_length, checkpoint)
