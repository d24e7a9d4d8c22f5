"""Timing `generate` as a user runs it: prefill apart from decode, and the bytes the KV cache holds afterwards.
Shared by the demo and the end-to-end benchmarks."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, StoppingCriteria, StoppingCriteriaList

from ..hf.cache import LessCache
from ..hf.memory import layer_nbytes


class StepClock(StoppingCriteria):
    """Timestamps each generation step (never stops generation): the first comes right after the prefill."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.device.type == "cuda":  # the step's kernels must have run, not just been queued
            torch.cuda.synchronize(input_ids.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class GenerationTiming:
    """One greedy `generate` call: new token ids [B, new_tokens], the cache it filled, seconds until the first new
    token (prefill), and decode throughput in new tokens per second per row, timed from the first new token."""

    tokens: torch.Tensor
    cache: object
    prefill_s: float
    decode_tokens_per_s: float


def timed_generate(model: PreTrainedModel, inputs: dict, new_tokens: int, **kwargs) -> GenerationTiming:
    """Greedy generation of exactly `new_tokens` (>= 2) tokens per row; kwargs go to `generate` (e.g. a cache)."""
    if new_tokens < 2:
        raise ValueError(f"decode speed needs at least 2 new tokens, got {new_tokens}")
    clock = StepClock()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        stopping_criteria=StoppingCriteriaList([clock]), return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    rate = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
    tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    return GenerationTiming(tokens, out.past_key_values, clock.times[0] - start, rate)


def kv_cache_bytes(cache) -> int:
    """Bytes held by a cache: a LessCache reports its own; a DynamicCache holds K and V of every token."""
    if isinstance(cache, LessCache):
        return cache.memory_report().total
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"expected a LessCache or a DynamicCache, got {type(cache).__name__}")
    return sum(layer_nbytes(layer) for layer in cache.layers)
