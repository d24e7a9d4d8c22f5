"""The long-context task suite: every task's generator (exact length, answers, determinism) on two toy tokenizers, the
scoring, the one-prefill record against each method's own generate (token for token, both protocols), and the suite
and its command on a tiny model."""

import json
import re
from collections import Counter

import pytest
import torch

from less_cuda import cli
from less_cuda.core.policy import Policy, baseline_plus
from less_cuda.eval import tasks as T
from less_cuda.eval.methods import PROTOCOLS, SUITE_METHODS, TASKS
from less_cuda.eval.suite import evaluate_suite, format_table, greedy_answer, suite_method
from less_cuda.eval.tasks import TaskPrompts, score
from less_cuda.hf.cache import LessCache
from less_cuda.hf.prompt_record import record_prompt
from tiny import article_text, random_feature_maps, tiny_llama, tiny_qwen2_with_a_sliding_layer, toy_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = article_text()
TEMPLATES = [T.NEEDLE_INTRO, T.NEEDLE, T.ONE_QUESTION, T.ALL_QUESTION, T.VARIABLE_INTRO, T.VARIABLE_QUESTION,
             T.COMMON_INTRO, T.COMMON_QUESTION, T.FREQUENT_INTRO, T.FREQUENT_QUESTION, T.FACT_INTRO,
             " ".join(T.ADJECTIVES + T.NOUNS), "0123456789", TEXT[:3000]]
LENGTH = 1500
RETRIEVAL = ("needle_noise", "needle_text", "multikey", "multivalue", "multiquery", "fact_qa")


@pytest.fixture(scope="module", params=["byte_level", "bos_first"])
def tokenizer(request):
    return toy_tokenizer(request.param == "bos_first", TEMPLATES)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return TaskPrompts(tokenizer, TEXT)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_the_exact_length_and_is_deterministic(tokenizer, prompts, task):
    sample = prompts.sample(task, LENGTH, seed=3)
    assert len(sample.prompt_ids) == LENGTH == sample.length
    assert prompts.sample(task, LENGTH, seed=3) == sample
    assert prompts.sample(task, LENGTH, seed=4).prompt_ids != sample.prompt_ids
    assert sample.answers and all(a.strip() for a in sample.answers)
    adds_bos = tokenizer("a").input_ids[0] == tokenizer.bos_token_id
    assert (sample.context_ids[0] == tokenizer.bos_token_id) == adds_bos
    question = tokenizer.decode(sample.question_ids).strip()
    assert question.endswith(("is", "are", "are:", "was", "kept a", "year"))
    # Room for every answer with its separators.
    answer_tokens = sum(len(tokenizer(" " + a, add_special_tokens=False).input_ids) for a in sample.answers)
    assert sample.max_new_tokens >= answer_tokens


@pytest.mark.parametrize("task", RETRIEVAL)
def test_retrieval_answers_occur_once_in_the_context(tokenizer, prompts, task):
    for seed in range(3):
        sample = prompts.sample(task, LENGTH, seed)
        context = tokenizer.decode(sample.context_ids)
        for answer in sample.answers:
            assert context.count(answer) == 1, (task, answer)
    needles = re.findall(r"special magic numbers? for ([\w-]+) is: (\d+)", context)
    expected = {"needle_noise": 1, "needle_text": 1, "multikey": 4, "multivalue": 4, "multiquery": 4}.get(task, 0)
    assert len(needles) == expected
    question = tokenizer.decode(sample.question_ids)
    if task == "multikey":  # the asked key is one of four; the others' values are distractors, not answers
        asked = [value for key, value in needles if key in question]
        assert asked == list(sample.answers) and len({key for key, _ in needles}) == 4
    if task in ("multivalue", "multiquery"):
        assert sorted(value for _, value in needles) == sorted(sample.answers)
        assert all(key in question for key, _ in needles)


def test_variable_tracking_answers_are_the_chain_of_the_asked_value(tokenizer, prompts):
    sample = prompts.sample("variable_tracking", LENGTH, seed=5)
    context = tokenizer.decode(sample.context_ids)
    value = re.search(r"value (\d+)", tokenizer.decode(sample.question_ids)).group(1)
    holds = set(re.findall(rf"VAR (\w+) = {value}\b", context))
    for _ in range(10):  # follow the assignments to the end of the chain
        holds |= {b for b, a in re.findall(r"VAR (\w+) = VAR (\w+)", context) if a in holds}
    assert holds == set(sample.answers) and len(holds) == 5


def test_common_words_answers_are_the_ten_most_repeated(tokenizer, prompts):
    sample = prompts.sample("common_words", LENGTH, seed=1)
    counts = Counter(re.findall(r"\n\d+\. (\w+)", tokenizer.decode(sample.context_ids)))
    common = {word: counts[word] for word in sample.answers}
    assert len(common) == 10 and min(common.values()) > max(n for w, n in counts.items() if w not in common)


def test_frequent_words_answers_are_the_three_most_frequent(tokenizer, prompts):
    sample = prompts.sample("frequent_words", LENGTH, seed=2)
    body = tokenizer.decode(sample.context_ids).split("....", 1)[1]
    ranked = Counter(body.split()).most_common(4)
    assert tuple(word for word, _ in ranked[:3]) == sample.answers and ranked[2][1] > ranked[3][1]


def test_a_length_too_short_or_an_unknown_task_is_refused(prompts):
    with pytest.raises(ValueError, match="needle_text: a length of 40 tokens is too short"):
        prompts.sample("needle_text", 40, seed=0)
    with pytest.raises(ValueError, match="unknown task 'needles'"):
        prompts.sample("needles", LENGTH, seed=0)


def test_scoring_is_the_share_of_whole_answers_found():
    assert score("The numbers are 1234567 and 7654321.", ("1234567", "7654321")) == 1.0
    assert score("It is 1234567.", ("1234567", "7654321")) == 0.5
    assert score("It is 12345678.", ("1234567",)) == 0.0  # another number
    assert score("marta olsen", ("Marta Olsen",)) == 1.0  # any case


# --- one prefill, every method --------------------------------------------------------------------------------------

MODELS = {"llama": tiny_llama, "qwen2_sliding": tiny_qwen2_with_a_sliding_layer}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def own_generate(model, ids, context, policy, maps, protocol, new_tokens):
    """A method's own path: a LessCache fed the prompt (aware), or the context and then the question (agnostic)."""
    cache = LessCache(model, maps, policy)
    if protocol == "agnostic":
        model(input_ids=ids[:, :context], past_key_values=cache)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                         max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("method", [m for m in SUITE_METHODS if m != "full"])
def test_the_record_compresses_as_each_method_own_prefill(model, method):
    """Every method's cache from the one shared prefill answers token for token as its own generate, question-aware
    and question-agnostic, on models with and without sliding-window layers."""
    ids = torch.randint(1, 128, (1, 150), generator=torch.Generator().manual_seed(7))
    context = 124
    record = record_prompt(model, ids, context)
    memory, policy = suite_method(method)
    policy = Policy(kind=policy.kind, budget=0.1, prefill_scores=policy.prefill_scores)
    maps = random_feature_maps(model, policy.kind)
    for protocol, end in (("aware", 150), ("agnostic", context)):
        setting = policy
        if memory == "baseline_plus":
            setting = baseline_plus(policy, end, 16, maps.rank, torch.float32)
        used = maps if memory == "less" else None
        cache = record.compressed_cache(model, setting, used, end)
        if protocol == "aware":
            logits = record.last_logits
        else:
            logits = model(input_ids=ids[:, context:], past_key_values=cache).logits[:, -1]
        ours = greedy_answer(model, cache, logits, 10, set())
        assert ours == own_generate(model, ids, context, setting, used, protocol, 10), (method, protocol)


def test_the_record_holds_the_full_cache_and_refuses_what_it_cannot_build(model):
    ids = torch.randint(1, 128, (1, 90), generator=torch.Generator().manual_seed(1))
    record = record_prompt(model, ids, 70)
    full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert greedy_answer(model, record.full_cache(model, 90), record.last_logits, 8, set()) == full[0, 90:].tolist()
    with pytest.raises(ValueError, match="not a prefix of 80 tokens"):
        record.full_cache(model, 80)
    with pytest.raises(ValueError, match="windows of 8 rows, the policy asks for 4"):
        record.compressed_cache(model, Policy(budget=10, prefill_scores="window", prefill_window=4), None, 90)
    with pytest.raises(ValueError, match="one prompt"):
        record_prompt(model, ids.repeat(2, 1))
    with pytest.raises(ValueError, match="context_length must be in"):
        record_prompt(model, ids, 91)


def test_the_suite_reports_every_run_on_a_tiny_model(tiny_model_dir):
    from less_cuda.hf.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), torch.float32)
    methods = ("full", "sparse/lambda", "sparse/h2o-window")
    so_far = []
    report = evaluate_suite(model, tokenizer, (tiny_model_dir / "articles.txt").read_text(),
                            tasks=("needle_noise", "fact_qa"), lengths=(700,), budgets=(0.1, 0.2), samples=2,
                            methods=methods, on_prompt=so_far.append)
    # The report after each prompt, sample 0 of both tasks first: a run stopped early keeps as many of each.
    assert [r["timing"]["prompts"] for r in so_far] == [1, 2, 3, 4] and so_far[-1] == report
    assert {r["task"]: len(r["scores"]) for r in so_far[1]["results"]} == {"needle_noise": 1, "fact_qa": 1}
    assert "stopped after 2 of 4 prompts" in format_table(so_far[1])
    rows = report["results"]
    # The full cache once (it holds the same tokens under both protocols), each other method per protocol.
    assert len(rows) == 2 * (1 + 2 * len(PROTOCOLS) * 2)
    assert all(len(r["scores"]) == 2 and 0.0 <= r["score"] <= 1.0 for r in rows)
    assert report["timing"]["prompts"] == 4 and report["timing"]["answers"] == 4 * (1 + 2 * 2 * 2)
    assert report["timing"]["naive_estimate_seconds"] > report["timing"]["prefill_seconds"]
    assert "700 tokens, question-agnostic" in format_table(report)
    with pytest.raises(ValueError, match="protocols has unknown"):
        evaluate_suite(model, tokenizer, "text", protocols=("later",), methods=methods)


def test_eval_command_runs_the_suite(tiny_model_dir, tmp_path):
    output = tmp_path / "suite.json"
    cli.main(["eval", "--task", "ruler", "--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "articles.txt"),
              "--tasks", "needle_text,frequent_words", "--lengths", "700", "--budgets", "0.1", "--samples", "1",
              "--methods", "full,sparse/h2o", "--output", str(output), "--plot"])
    saved = json.loads(output.read_text())
    assert saved["kind"] == "suite" and saved["settings"]["tasks"] == ["needle_text", "frequent_words"]
    assert saved["arguments"]["task"] == "ruler"
    assert (tmp_path / "suite.png").stat().st_size > 5000 and (tmp_path / "suite-summary.png").stat().st_size > 5000
    with pytest.raises(SystemExit, match="unknown methods"):
        cli.main(["eval", "--task", "ruler", "--model", str(tiny_model_dir), "--policy", "lambda",
                  "--methods", "sparse/h2o"])
