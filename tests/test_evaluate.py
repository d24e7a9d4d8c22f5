"""Parallel-form perplexity evaluation: the attention function, Baseline+'s byte accounting, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from less_cuda import cli
from less_cuda.evaluate import (
    attention_function,
    baseline_plus,
    compare,
    lowrank_state_bytes,
    parallel_attention_function,
    perplexity,
)
from less_cuda.feature_maps import FeatureMaps, FeatureMapsConfig
from less_cuda.models import load_model
from less_cuda.policy import Policy
from helpers import WIKITEXT, missing_input
from test_train import tiny_model_dir  # noqa: F401  (a fixture)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):  # noqa: F811
    model, tokenizer = load_model(str(tiny_model_dir), torch.float32)
    ids = tokenizer((tiny_model_dir / "articles.txt").read_text(), add_special_tokens=False)["input_ids"]
    sequences = torch.tensor(ids[: 2 * 48]).view(2, 48)
    torch.manual_seed(0)
    config = FeatureMapsConfig("tiny", 2, 4, 2, 16, 64, [0, 1], {"kind": "h2o"}, rank=4, kernel_hidden=8)
    feature_maps = FeatureMaps(config)
    return model, sequences, feature_maps


def test_baseline_plus_buys_tokens_with_the_state_bytes():
    # SmolLM2 at 1024 tokens and 5%: budget 51, 52 slots; state = 4 * 8 * (64 + 1 + 52) = 3744 bytes per KV head.
    assert lowrank_state_bytes(head_dim=64, rank=8, num_slots=52) == 3744
    h2o = Policy("h2o", budget=0.05)
    plus = baseline_plus(h2o, 1024, head_dim=64, rank=8, dtype=torch.float32)  # 512 bytes per token: 7.3 -> 8
    assert plus.resolve(1024).budget == 59 and plus.resolve(1024).recent == 29
    assert baseline_plus(h2o, 1024, 64, 8, torch.bfloat16).resolve(1024).budget == 51 + 15  # 14.6 -> 15
    lam = baseline_plus(Policy("lambda", budget=0.05, sinks=4), 1024, 64, 8, torch.float32).resolve(1024)
    assert (lam.budget, lam.sinks, lam.recent) == (59, 4, 55)


def test_a_budget_holding_every_token_is_full_attention(tiny):
    model, sequences, feature_maps = tiny
    full = perplexity(model, sequences)
    everything = Policy("h2o", budget=sequences.shape[1])
    compressed = perplexity(model, sequences, parallel_attention_function(everything, feature_maps))
    assert compressed == pytest.approx(full, rel=1e-5)
    assert model.config._attn_implementation != "less_parallel"  # restored after the block


def test_less_with_an_empty_state_is_its_sparse_policy(tiny):
    model, sequences, feature_maps = tiny
    policy = Policy("h2o", budget=8)
    silent = FeatureMaps(feature_maps.config)
    silent.load_state_dict(feature_maps.state_dict())
    with torch.no_grad():
        for layer in silent.layer_kernels.values():
            layer.psi_scale.zero_()
    sparse = perplexity(model, sequences, parallel_attention_function(policy, None))
    assert perplexity(model, sequences, parallel_attention_function(policy, silent)) == pytest.approx(sparse, rel=1e-6)
    assert sparse != pytest.approx(perplexity(model, sequences), rel=1e-4)  # the policy does evict here


def test_compare_reports_every_method_and_the_gap(tiny):
    model, sequences, feature_maps = tiny
    result = compare(model, sequences, Policy("lambda", budget=8, sinks=2), feature_maps)
    assert set(result.perplexity) == {"full", "sparse", "baseline_plus", "less"}
    assert all(math.isfinite(p) for p in result.perplexity.values())
    p = result.perplexity
    assert result.gap_closed == pytest.approx((p["sparse"] - p["less"]) / (p["sparse"] - p["full"]))
    assert "LESS closes" in result.table()


def test_padding_is_refused(tiny):
    model, sequences, _ = tiny
    mask = torch.ones_like(sequences)
    mask[0, :4] = 0
    with attention_function(model, parallel_attention_function(Policy("h2o", budget=8), None)):
        with pytest.raises(ValueError, match="unpadded"):
            model(input_ids=sequences, attention_mask=mask)


def test_eval_command(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    cli.main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "articles.txt"),
              "--output", str(tmp_path / "ckpt"), "--seq-len", "48", "--budget", "8", "--sequences", "2",
              "--val-sequences", "1", "--val-fraction", "0.25", "--epochs", "1", "--rank", "4", "--hidden", "8"])
    cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "articles.txt"),
              "--checkpoint", str(tmp_path / "ckpt"), "--seq-len", "48", "--budget", "8", "--sequences", "2",
              "--val-fraction", "0.25", "--output", str(tmp_path / "eval.json")])
    out = capsys.readouterr().out
    assert "Baseline+" in out and "LESS closes" in out
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert set(saved["perplexity"]) == {"full", "sparse", "baseline_plus", "less"}


@pytest.fixture(scope="module")
def smollm2_held_out():
    """SmolLM2 and the last held-out WikiText-2 sequence of 1024 tokens."""
    from less_cuda.data import tokenizer_splits

    if not WIKITEXT.is_file():
        missing_input(f"WikiText-2 validation text not found at {WIKITEXT}")
    model, tokenizer = load_model("smollm2", torch.float32)
    return model, tokenizer_splits(WIKITEXT, tokenizer, 1024, 0.1).validation[-1:]


@pytest.mark.smollm2
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["h2o", "lambda"])
def test_shipped_checkpoints_beat_sparse_and_baseline_plus_on_held_out_text(smollm2_held_out, kind):
    from less_cuda.integration import load_feature_maps

    model, sequence = smollm2_held_out
    feature_maps = load_feature_maps(model, None, kind)  # the checkpoint shipped for SmolLM2, as apply() finds it
    result = compare(model, sequence, Policy(kind, budget=0.05), feature_maps,
                     methods=("sparse", "baseline_plus", "less"))
    ppl = result.perplexity
    assert ppl["less"] < ppl["baseline_plus"] < ppl["sparse"], ppl
