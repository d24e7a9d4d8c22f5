"""Perplexity evaluation in its three forms (parallel, streaming, prefill), Baseline+'s byte accounting, and the
command line."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from less_cuda import cli
from less_cuda.core.feature_maps import FeatureMaps, FeatureMapsConfig
from less_cuda.core.policy import Policy, baseline_plus, lowrank_state_bytes
from less_cuda.eval.comparison import gap_closed
from less_cuda.eval.perplexity import cache_perplexity, compare, perplexity
from less_cuda.hf.attention import attention_function
from less_cuda.hf.cache import LessCache
from less_cuda.hf.models import load_model
from less_cuda.hf.parallel import ATTENTION, parallel_attention_function
from helpers import WIKITEXT, missing_input
from tiny import tiny_qwen2_with_a_sliding_layer, random_feature_maps, prompts


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
        for layer in silent.layers.values():
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
    assert result.gap_closed["sparse"] == pytest.approx((p["sparse"] - p["less"]) / (p["sparse"] - p["full"]))
    assert result.gap_closed["baseline_plus"] == pytest.approx(
        (p["baseline_plus"] - p["less"]) / (p["baseline_plus"] - p["full"]))
    assert "LESS closes" in result.table() and "Baseline+" in result.table()


def test_gap_closed_needs_both_ends():
    assert gap_closed({"full": 10.0, "sparse": 14.0, "less": 11.0}, "sparse") == pytest.approx(0.75)
    assert gap_closed({"full": 10.0, "sparse": 14.0}, "sparse") is None  # no LESS
    assert gap_closed({"full": 10.0, "sparse": 10.0, "less": 10.0}, "sparse") is None  # no gap to close


@pytest.mark.parametrize("kind", ["h2o", "lambda"])
def test_streaming_form_is_the_parallel_form(tiny, kind):
    """The real LessCache fed one token per forward call gives the parallel form's perplexity."""
    model, sequences, h2o_maps = tiny
    feature_maps = FeatureMaps(replace(h2o_maps.config, policy={"kind": kind}))
    feature_maps.load_state_dict(h2o_maps.state_dict())
    policy = Policy(kind, budget=0.2, sinks=2)  # a fraction: the streaming form resolves it against T
    methods = ("sparse", "baseline_plus", "less")
    parallel = compare(model, sequences, policy, feature_maps, methods=methods)
    streaming = compare(model, sequences, policy, feature_maps, methods=methods, form="streaming", batch_size=2)
    for method in methods:
        assert streaming.perplexity[method] == pytest.approx(parallel.perplexity[method], rel=1e-4), method
    assert streaming.budget_tokens == parallel.budget_tokens
    T = sequences.shape[1]  # Baseline+'s extra slots split between recent and heavy hitters as in the parallel form
    assert streaming.baseline_plus.resolve(T) == parallel.baseline_plus.resolve(T)
    assert model.config._attn_implementation == "sdpa"  # the cache switched it to "less"; restored after


def test_sliding_window_layers_keep_their_window_in_the_parallel_form():
    """Only full-attention layers are compressed: a sliding-window layer keeps its window (6 of 20 tokens here) in
    the parallel form as in the streaming cache, where it has its own cache layer."""
    model = tiny_qwen2_with_a_sliding_layer()
    sequences = torch.stack(prompts(20, 20))
    feature_maps = random_feature_maps(model, layers=[0])
    everything = Policy("h2o", budget=20)
    assert perplexity(model, sequences, parallel_attention_function(everything, feature_maps)) == pytest.approx(
        perplexity(model, sequences), rel=1e-5)
    policy = Policy("h2o", budget=0.3)
    parallel = compare(model, sequences, policy, feature_maps, methods=("full", "less"))
    streaming = compare(model, sequences, policy, feature_maps, methods=("less",), form="streaming", batch_size=2)
    assert streaming.perplexity["less"] == pytest.approx(parallel.perplexity["less"], rel=1e-4)
    assert parallel.perplexity["less"] != pytest.approx(parallel.perplexity["full"], rel=1e-4)  # layer 0 evicts

def test_prefill_form_scores_the_continuation(tiny):
    model, sequences, feature_maps = tiny
    T, prompt = sequences.shape[1], 32
    result = compare(model, sequences, Policy("h2o", budget=0.25), feature_maps, form="prefill", prompt_length=prompt)
    assert result.budget_tokens == 8  # a quarter of the prompt, not of the sequence
    assert result.perplexity["full"] == pytest.approx(perplexity(model, sequences, first_target=prompt))
    assert result.perplexity["sparse"] != pytest.approx(result.perplexity["full"], rel=1e-4)
    assert f"the {T - prompt} tokens after a {prompt}-token prompt" in result.table()
    # A budget holding the whole sequence is the full cache, through the real prefill and decode path.
    everything = cache_perplexity(model, sequences, lambda: LessCache(model, None, Policy("h2o", budget=T)), prompt)
    assert everything == pytest.approx(result.perplexity["full"], rel=1e-5)


def test_prefill_form_ranks_the_prompt_as_the_policy_says(tiny):
    """The prefill form's cache takes the policy's prefill ranking: window and sum score differently, and the table
    and results say which one ran."""
    model, sequences, feature_maps = tiny
    results = {mode: compare(model, sequences, Policy("h2o", budget=0.25, prefill_scores=mode, prefill_window=4),
                             feature_maps, methods=("sparse",), form="prefill", prompt_length=32)
               for mode in ("sum", "window")}
    assert results["sum"].perplexity["sparse"] != pytest.approx(results["window"].perplexity["sparse"], rel=1e-6)
    assert "prompt ranked by column sums" in results["sum"].table()
    assert "prompt ranked by the last 4 rows" in results["window"].table()
    assert results["window"].to_json()["policy"]["prefill_scores"] == "window"


def test_cache_perplexity_refuses_a_prompt_without_continuation(tiny):
    model, sequences, _ = tiny
    with pytest.raises(ValueError, match="prompt must be 1 to 47 tokens"):
        cache_perplexity(model, sequences, lambda: None, prompt_length=48)


def test_compare_refuses_an_unknown_form_or_method(tiny):
    model, sequences, feature_maps = tiny
    with pytest.raises(ValueError, match="form must be one of"):
        compare(model, sequences, Policy("h2o", budget=8), feature_maps, form="batched")
    with pytest.raises(ValueError, match="unknown methods"):
        compare(model, sequences, Policy("h2o", budget=8), feature_maps, methods=("less", "quest"))
    with pytest.raises(ValueError, match="need feature maps"):
        compare(model, sequences, Policy("h2o", budget=8), None, methods=("sparse", "less"))


def test_padding_is_refused(tiny):
    model, sequences, _ = tiny
    mask = torch.ones_like(sequences)
    mask[0, :4] = 0
    with attention_function(model, parallel_attention_function(Policy("h2o", budget=8), None), ATTENTION):
        with pytest.raises(ValueError, match="unpadded"):
            model(input_ids=sequences, attention_mask=mask)


def test_eval_command(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    cli.main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "articles.txt"),
              "--output", str(tmp_path / "ckpt"), "--seq-len", "48", "--budget", "8", "--sequences", "2",
              "--val-sequences", "1", "--val-fraction", "0.25", "--epochs", "1", "--rank", "4", "--hidden", "8"])
    common = ["eval", "--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "articles.txt"),
              "--checkpoint", str(tmp_path / "ckpt"), "--seq-len", "48", "--sequences", "2", "--val-fraction", "0.25"]
    cli.main([*common, "--budgets", "8,0.25", "--output", str(tmp_path / "eval.json"), "--plot"])
    out = capsys.readouterr().out
    assert "Baseline+" in out and "LESS closes" in out
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["kind"] == "perplexity" and saved["form"] == "parallel" and saved["sequences"] == 2
    assert saved["settings"]["checkpoint"] == str(tmp_path / "ckpt") and "package_version" in saved
    assert [r["budget_tokens"] for r in saved["results"]] == [8, 12]  # 8 tokens, then a quarter of 48
    for entry in saved["results"]:
        assert set(entry["perplexity"]) == {"full", "sparse", "baseline_plus", "less"}
        assert set(entry["gap_closed"]) == {"sparse", "baseline_plus"}
    assert (tmp_path / "eval.png").stat().st_size > 5000
    cli.main([*common, "--budget", "8", "--form", "prefill", "--prompt-fraction", "0.5", "--methods", "full,less",
              "--output", str(tmp_path / "prefill.json")])
    saved = json.loads((tmp_path / "prefill.json").read_text())
    assert saved["form"] == "prefill" and saved["prompt_length"] == 24
    assert set(saved["results"][0]["perplexity"]) == {"full", "less"}
    with pytest.raises(SystemExit, match="one policy"):
        cli.main([*common, "--policy", "h2o,lambda"])
    with pytest.raises(SystemExit, match="unknown methods"):
        cli.main([*common, "--methods", "full,quest"])


def test_eval_command_runs_the_passkey_task(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    output = tmp_path / "passkey.json"
    cli.main(["eval", "--task", "passkey", "--model", str(tiny_model_dir), "--policy", "h2o,lambda",
              "--methods", "full,sparse", "--lengths", "250", "--depths", "0.5", "--budgets", "16", "--trials", "1",
              "--sinks", "2", "--output", str(output), "--plot"])
    saved = json.loads(output.read_text())
    assert saved["kind"] == "passkey" and saved["settings"]["task"] == "passkey"
    rows = {(r["method"], r["policy"]) for r in saved["results"]}
    assert rows == {("full", None), ("sparse", "h2o"), ("sparse", "lambda")}  # the full cache once, not per policy
    assert (tmp_path / "passkey.png").stat().st_size > 5000
    assert "full" in capsys.readouterr().out


@pytest.fixture(scope="module")
def smollm2_held_out(smollm2):
    """SmolLM2 and the last held-out WikiText-2 sequence of 1024 tokens."""
    from less_cuda.hf.data import tokenizer_splits

    if not WIKITEXT.is_file():
        missing_input(f"WikiText-2 validation text not found at {WIKITEXT}")
    model, tokenizer = smollm2
    return model, tokenizer_splits(WIKITEXT, tokenizer, 1024, 0.1).validation[-1:]


@pytest.mark.smollm2
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["h2o", "lambda"])
def test_shipped_checkpoints_beat_sparse_and_baseline_plus_on_held_out_text(smollm2_held_out, kind):
    from less_cuda.hf.press import load_feature_maps

    model, sequence = smollm2_held_out
    feature_maps = load_feature_maps(model, "shipped", kind)  # the checkpoint shipped for SmolLM2, as apply() finds it
    result = compare(model, sequence, Policy(kind, budget=0.05), feature_maps,
                     methods=("sparse", "baseline_plus", "less"))
    ppl = result.perplexity
    assert ppl["less"] < ppl["baseline_plus"] < ppl["sparse"], ppl


@pytest.mark.smollm2
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["h2o", "lambda"])
def test_smollm2_streaming_cache_matches_the_parallel_form(smollm2_held_out, kind):
    """Reduced form: two 128-token pieces of held-out text, the shipped feature maps, 5% budget (6 tokens). The
    sparse policy runs the same cache path with an empty state."""
    from less_cuda.hf.press import load_feature_maps

    model, sequence = smollm2_held_out
    sequences = sequence.view(8, 128)[:2]
    feature_maps = load_feature_maps(model, "shipped", kind)
    policy = Policy(kind, budget=0.05, sinks=2)
    parallel = compare(model, sequences, policy, feature_maps, methods=("full", "less"))
    streaming = compare(model, sequences, policy, feature_maps, methods=("less",), form="streaming", batch_size=2)
    assert streaming.perplexity["less"] == pytest.approx(parallel.perplexity["less"], rel=1e-3)
    assert parallel.perplexity["less"] > parallel.perplexity["full"] * 1.01  # the policy does evict here
