"""The integration on the real SmolLM2-135M-Instruct, in a reduced form: one model load per module, short prompts.
LESS with its low-rank state runs only where a checkpoint for SmolLM2 is shipped; the sparse-only baselines always."""

import pytest
import torch

from less_cuda.hf.press import apply
from tiny import greedy

pytestmark = pytest.mark.smollm2

SETTINGS = [("h2o", False), ("lambda", False), ("h2o", True), ("lambda", True)]  # (policy, lowrank)


def chat(tokenizer, text: str) -> dict:
    messages = [{"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, return_tensors="pt")


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


def test_a_text_generation_pipeline_runs_under_a_press(smollm2, monkeypatch):
    """transformers' pipeline calls `model.generate` itself: inside the press block every call gets a LessCache."""
    from transformers import pipeline

    import less_cuda.hf.press
    from less_cuda import LessPress

    model, tokenizer = smollm2
    made = []

    class RecordingCache(less_cuda.hf.press.LessCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(less_cuda.hf.press, "LessCache", RecordingCache)
    story = " ".join(f"Step {i}: the robot moved crate {i} to shelf {i % 7}." for i in range(1, 31))
    prompt = story + " Where did crate 12 go?"
    press = LessPress(policy="h2o", budget=32)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    with press(model):
        text = generator(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert model.config._attn_implementation != "less" and "generate" not in vars(model)
    assert len(made) >= 2 and made[1].layers[0].resolved.budget == 32  # [0]: the check on entering
    inputs = tokenizer(prompt, return_tensors="pt")
    expected = greedy(model, inputs, 8, past_key_values=press.cache(model))
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_a_gguf_file_loads_as_a_model_path(smollm2):
    """`--model path/to/file.gguf` is `--model path/to --gguf-file file.gguf`, as from_pretrained takes it."""
    from less_cuda.hf.models import load_model, smollm2_gguf_path

    model, tokenizer = smollm2
    loaded, loaded_tokenizer = load_model(str(smollm2_gguf_path()), torch.float32)
    ids = tokenizer("The pass key is 12345.", return_tensors="pt")["input_ids"]
    assert loaded_tokenizer("The pass key is 12345.", return_tensors="pt")["input_ids"].equal(ids)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
