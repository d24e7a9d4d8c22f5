"""Passkey retrieval: prompts from two small in-memory tokenizers (a byte-level BPE that names a BOS token but does not
add it, as SmolLM2's; a SentencePiece-style one that puts <s> first, as Llama's), the grid on a tiny random Llama,
and, marked smollm2, both on the real SmolLM2-135M-Instruct."""

import json
import string

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import WIKITEXT, missing_input
from tiny import toy_tokenizer
from less_cuda.hf.models import model_layout
from less_cuda.core.feature_maps import FeatureMaps, FeatureMapsConfig
from less_cuda.core.policy import Policy
from less_cuda.eval.haystack import DEFAULT_FILLER, SNAP_TOKENS, answer_found
from less_cuda.eval.passkey import INTRO, METHODS, Needle, PasskeyPrompts, evaluate_passkey, format_table

# One intra-op thread: on a busy 2-core machine a second thread makes SmolLM2's generate several times slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROW_KEYS = {"method", "policy", "budget", "context_length", "depth", "accuracy", "trials"}
SETTINGS_KEYS = {"policy", "budgets", "context_lengths", "depths", "trials", "seed", "filler", "needle", "feature_maps",
                 "prefill_scores", "prefill_window"}


PASSKEY_TEXTS = [DEFAULT_FILLER, INTRO, Needle().text, Needle().question, string.digits]


@pytest.fixture(scope="module", params=["byte_level", "bos_first"])
def tokenizer(request):
    return toy_tokenizer(request.param == "bos_first", PASSKEY_TEXTS)


def check_sample(tokenizer, prompts: PasskeyPrompts, sample, retokenized_slack: int) -> None:
    """The sample's length is exact, the needle is whole at needle_position, at most SNAP_TOKENS from its exact depth,
    and the decoded prompt re-tokenizes to within `retokenized_slack` tokens of the requested length."""
    ids, length = sample.prompt_ids, sample.context_length
    assert len(ids) == length
    intro = len(tokenizer(INTRO).input_ids)  # with the BOS exactly when the tokenizer adds one
    fill = length - prompts.minimum_length(sample.answer) + 1
    exact = intro + round(sample.depth * fill)
    assert abs(sample.needle_position - exact) <= SNAP_TOKENS, (sample.needle_position, exact)
    needle = prompts.needle.text.format(answer=sample.answer)
    assert tokenizer.decode(ids[sample.needle_position :]).lstrip().startswith(needle)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.count(sample.answer) == 1
    assert text.endswith(prompts.needle.question)
    assert abs(len(tokenizer(text).input_ids) - length) <= retokenized_slack


@pytest.mark.parametrize("length", [150, 257, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_prompt_has_the_exact_length_and_the_needle_at_its_depth(tokenizer, length, depth):
    prompts = PasskeyPrompts(tokenizer)
    sample = prompts.sample(length, depth, seed=3)
    check_sample(tokenizer, prompts, sample, retokenized_slack=2)
    # The default filler has a sentence boundary every few tokens, so the needle always goes between sentences.
    before = tokenizer.decode(sample.prompt_ids[: sample.needle_position], skip_special_tokens=True)
    assert before.rstrip().endswith(".")


def test_prompt_is_deterministic_in_its_seed(tokenizer):
    prompts = PasskeyPrompts(tokenizer)
    first, again, other = (prompts.sample(300, 0.4, seed) for seed in (7, 7, 8))
    assert first == again
    assert first.answer != other.answer
    assert all(len(s.answer) == 5 and s.answer.isdigit() for s in (first, other))
    assert (first.context_length, first.depth, first.seed) == (300, 0.4, 7)


def test_bos_only_where_the_tokenizer_puts_it_first(tokenizer):
    ids = PasskeyPrompts(tokenizer).sample(200, 0.5, seed=0).prompt_ids
    adds_bos = tokenizer("a").input_ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == adds_bos
    assert (ids[0] == tokenizer.bos_token_id) == adds_bos


def test_fact_needle_in_user_text_from_a_string_or_a_file(tokenizer, tmp_path):
    text = " ".join(f"Ship {chr(65 + i % 26)} sailed on day {i}." for i in range(200))
    needle = Needle("The secret city is {answer}.", "What is the secret city? The secret city is", answer="Lisbon")
    prompts = PasskeyPrompts(tokenizer, text, needle)
    samples = [prompts.sample(400, 0.5, seed) for seed in range(4)]
    for sample in samples:
        assert sample.answer == "Lisbon"
        check_sample(tokenizer, prompts, sample, retokenized_slack=3)
    assert len({tuple(s.prompt_ids) for s in samples}) > 1  # the seed picks where in the text the filler starts

    path = tmp_path / "filler.txt"
    path.write_text(text)
    for source in (path, str(path)):
        from_file = PasskeyPrompts(tokenizer, source, needle)
        assert from_file.sample(400, 0.5, 2) == samples[2]
        assert str(path) in from_file.filler_description


def test_answer_that_the_filler_contains_is_refused(tokenizer):
    with pytest.raises(ValueError, match="contains the answer"):
        PasskeyPrompts(tokenizer, needle=Needle(answer="green")).sample(300, 0.5, seed=0)


@pytest.mark.parametrize("length,depth,match", [(300, -0.1, "depth"), (300, 1.5, "depth"), (40, 0.5, "context_length")])
def test_sample_refuses_bad_arguments(tokenizer, length, depth, match):
    with pytest.raises(ValueError, match=match):
        PasskeyPrompts(tokenizer).sample(length, depth, seed=0)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"context_lengths": []}, "context_lengths"),
        ({"depths": []}, "depths"),
        ({"budgets": []}, "budgets"),
        ({"methods": ()}, "methods"),
        ({"methods": ("full", "dense")}, "methods"),
        ({"depths": [0.5, 1.5]}, "depth"),
        ({"context_lengths": [300, 40]}, "context_length"),
        ({"budgets": [1]}, "budgets"),
        ({"policy": "lambda", "budgets": [0.05], "context_lengths": [60]}, "budgets"),  # 3 tokens, not above 4 sinks
        ({"policy": "lru"}, "policy"),
        ({"trials": 0}, "trials"),
        ({"policy": lambda: Policy("h2o", prefill_scores="snapkv")}, "prefill_scores"),
        ({"policy": lambda: Policy("h2o", prefill_window=0)}, "prefill_window"),
    ],
)
def test_evaluate_refuses_bad_arguments_before_running_the_model(tokenizer, override, match):
    args = dict(context_lengths=[300], depths=[0.5], budgets=[0.1], trials=1) | override
    with pytest.raises(ValueError, match=match):  # a policy given as a factory is built here, inside the check
        evaluate_passkey(None, tokenizer, **{k: v() if callable(v) else v for k, v in args.items()})


@pytest.mark.parametrize(
    "continuation,found",
    [(" 48213. Remember", True), ("48213", True), (" is 48213\n", True), (" 482135.", False), (" 148213", False),
     (" 4821", False), (" 48 213", False)],
)
def test_the_answer_counts_only_as_a_whole_number(continuation, found):
    assert answer_found(continuation, "48213") == found


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.config.name_or_path = "tiny-llama"
    return model


def random_feature_maps(model, kind: str) -> FeatureMaps:
    layout = model_layout(model.config)
    config = FeatureMapsConfig(base_model="tiny", **layout, layers=list(range(layout["num_layers"])),
                               policy={"kind": kind}, rank=4, kernel_hidden=16)
    torch.manual_seed(1)
    return FeatureMaps(config)


def check_report(report: dict, lengths, depths, budgets, policy: str, trials: int) -> list[dict]:
    """The report follows the schema the plotting module reads; returns its rows."""
    assert json.loads(json.dumps(report)) == report
    assert set(report) == {"kind", "model", "package_version", "settings", "results"}
    assert report["kind"] == "passkey" and isinstance(report["package_version"], str)
    settings = report["settings"]
    assert set(settings) == SETTINGS_KEYS
    assert (settings["policy"], settings["budgets"], settings["context_lengths"], settings["depths"],
            settings["trials"]) == (policy, budgets, lengths, depths, trials)
    rows = report["results"]
    expected = [(length, depth, "full", None, None) for length in lengths for depth in depths]
    expected += [(length, depth, m, policy, b) for length in lengths for depth in depths for b in budgets
                 for m in METHODS[1:]]
    got = [(r["context_length"], r["depth"], r["method"], r["policy"], r["budget"]) for r in rows]
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    for row in rows:
        assert set(row) == ROW_KEYS and row["trials"] == trials and 0.0 <= row["accuracy"] <= 1.0
        assert row["accuracy"] * trials == round(row["accuracy"] * trials)
    return rows


def test_evaluate_on_a_tiny_model_follows_the_schema():
    tokenizer = toy_tokenizer(False, PASSKEY_TEXTS)
    model = tiny_llama(len(tokenizer))
    lengths, depths, budgets = [96, 160], [0.0, 1.0], [16, 0.25]  # a token count and a fraction
    report = evaluate_passkey(model, tokenizer, lengths, depths, budgets, policy="lambda",
                              feature_maps=random_feature_maps(model, "lambda"), trials=2)
    check_report(report, lengths, depths, budgets, "lambda", trials=2)
    assert report["model"] == "tiny-llama" and report["settings"]["feature_maps"] is None  # an object, not a path

    table = format_table(report).splitlines()
    assert len(table) == 2 + len(lengths) * (1 + 2 * len(budgets))  # title, header, one line per method/budget/length
    assert table[1].split() == ["method", "policy", "budget", "length", "0.00", "1.00", "mean"]
    assert table[2].split()[:4] == ["full", "-", "-", "96"]


def test_the_prefill_ranking_reaches_every_compressed_run_and_the_report(monkeypatch):
    import less_cuda.eval.passkey

    tokenizer = toy_tokenizer(False, PASSKEY_TEXTS)
    model = tiny_llama(len(tokenizer))
    presses, apply = [], less_cuda.eval.passkey.apply

    def recording_apply(*args, **kwargs):
        presses.append(kwargs)
        return apply(*args, **kwargs)

    monkeypatch.setattr(less_cuda.eval.passkey, "apply", recording_apply)
    report = evaluate_passkey(model, tokenizer, [96], [0.5], [16], methods=("full", "sparse"), trials=1,
                              policy=Policy("h2o", prefill_scores="window", prefill_window=6))
    assert len(presses) == 1 and (presses[0]["prefill_scores"], presses[0]["prefill_window"]) == ("window", 6)
    assert (report["settings"]["prefill_scores"], report["settings"]["prefill_window"]) == ("window", 6)
    assert "H2O prefill scores: window of the last 6 rows" in format_table(report).splitlines()[0]


@pytest.mark.smollm2
def test_smollm2_prompts_with_the_default_filler_and_wikitext(smollm2):
    _, tokenizer = smollm2
    if not WIKITEXT.is_file():
        missing_input(f"WikiText-2 is not at {WIKITEXT}")
    for filler in (None, WIKITEXT):
        prompts = PasskeyPrompts(tokenizer, filler)
        for length in (256, 1024, 4096):
            for depth in (0.1, 0.5, 0.9):
                sample = prompts.sample(length, depth, seed=length)
                check_sample(tokenizer, prompts, sample, retokenized_slack=3)
                assert sample.prompt_ids[0] != tokenizer.bos_token_id  # SmolLM2 is used without a BOS


@pytest.mark.smollm2
def test_smollm2_full_cache_finds_the_key_and_a_tiny_h2o_budget_loses_it(smollm2):
    model, tokenizer = smollm2
    torch.manual_seed(0)
    lengths, depths, budgets = [128, 256], [0.2, 0.8], [0.05]
    report = evaluate_passkey(model, tokenizer, lengths, depths, budgets, policy="h2o", trials=1)
    rows = check_report(report, lengths, depths, budgets, "h2o", trials=1)
    assert report["model"] == "SmolLM2-135M-Instruct"
    assert report["settings"]["feature_maps"] == "smollm2-135m-h2o-5pct"

    def mean(method: str) -> float:
        accuracies = [r["accuracy"] for r in rows if r["method"] == method]
        return sum(accuracies) / len(accuracies)

    assert mean("full") >= 0.75, format_table(report)
    assert mean("sparse") < mean("full"), format_table(report)  # 5% keeps 6-13 tokens: the needle is evicted
