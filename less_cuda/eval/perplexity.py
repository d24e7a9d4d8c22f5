"""Perplexity of a frozen model with full attention, a sparse policy (H2O or Λ), Baseline+ and LESS
(`less-cuda eval`), in three forms (`methods.FORMS`):

- "parallel": every full-attention layer runs the parallel form (`hf.parallel`): every token streams through the
  policy from the start, computed for the whole sequence at once.
- "streaming": the real `LessCache`, fed one token per forward call from the first token on, the budget resolved
  against the whole sequence. It is the parallel form computed the way generation computes it, and agrees with it.
- "prefill": what `generate` does. The first P tokens are a prompt that the `LessCache` compresses at prefill (the
  budget resolved against P); the rest stream through the decode rule, and only they are scored.

Nothing is teacher-forced: each layer sees the hidden states that the compressed layers below it produced.
Baseline+ is the sparse policy given the bytes LESS's state costs as extra cached tokens (`policy.baseline_plus`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from ..core.feature_maps import FeatureMaps
from ..core.policy import Policy, baseline_plus
from ..hf.attention import attention_function, keep_attention_implementation
from ..hf.cache import LessCache
from ..hf.parallel import ATTENTION, parallel_attention_function
from .comparison import Comparison
from .methods import FORMS, METHODS


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
    with attention_function(model, function, ATTENTION) if function is not None else nullcontext():
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
        policy, plus = policy.in_tokens(T), plus.in_tokens(T)
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
