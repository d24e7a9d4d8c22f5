"""LESS on an instruction-tuned model: a long prompt with facts to recall, answered with a full KV cache, with the
sparse-only policy, and with LESS (the policy + the learned low-rank state) at the same budget, all with LessPress's
defaults (H2O, its default prompt ranking, the shipped feature maps).

Run: make demo   (or .venv/bin/python examples/demo.py [--model smollm2]; `make demo MODEL=...`).
CPU is fine (about three minutes for Qwen2.5-Coder-0.5B-Instruct, the default, a model that uses long contexts); a
CUDA GPU is used when there is one.
"""

from __future__ import annotations

import argparse
import time

import torch

from less_cuda.eval.timing import kv_cache_bytes, timed_generate
from less_cuda.hf.press import LessPress, apply
from less_cuda.hf.models import load_model

BUDGET = 0.1  # of the prompt's tokens kept per layer and KV head: within 2x of the shipped maps' 5%
NEW_TOKENS = 32

FACTS = [
    "The lighthouse keeper of Briarwick is a woman named Marta Olsen.",
    "The old stone bridge over the Tarn river was finished in the year 1847.",
    "The harbour master keeps exactly seventeen blue rowing boats.",
]
TOPICS = [
    ("market", "fishmongers", "the square", "salted herring"),
    ("school", "teachers", "the hill", "slate boards"),
    ("bakery", "bakers", "Mill Lane", "rye loaves"),
    ("weather", "farmers", "the moor", "autumn storms"),
    ("festival", "musicians", "the green", "lantern boats"),
    ("railway", "porters", "the station", "coal wagons"),
    ("ferry", "sailors", "the pier", "mail sacks"),
]


def town_notes() -> str:
    """A generated multi-paragraph text (about 1,100 tokens) with the facts to recall at its start."""
    paragraphs = ["Notes on the town of Briarwick. " + " ".join(FACTS)]
    for place, people, where, thing in TOPICS:
        paragraphs.append(
            f"The {place} of Briarwick is run by the {people}, who meet every morning at {where}. "
            f"In spring the {people} talk mostly about {thing}, and in summer they talk about little else. "
            f"Visitors often ask the {people} for directions to {where}, and the {people} are always glad to help. "
            f"Records of the {place} go back many generations; each one mentions {thing} and the weather. "
            f"Children in Briarwick learn early that {where} belongs to the {people} before sunrise. "
            f"When the {place} closes for the winter, the {people} store their {thing} in a shed near {where}. "
            f"Most evenings the {people} walk home past {where}, greeting neighbours and talking about {thing}."
        )
    return "\n\n".join(paragraphs)


QUESTION = "Answer from the notes: who is the lighthouse keeper, and in which year was the stone bridge finished?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="an instruction-tuned model load_model takes: "
                        "'qwen2.5-coder-0.5b' or 'smollm2' (shipped maps), or a model directory / .gguf with a chat "
                        "template")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, torch.float32)
    model = model.to(device)
    print(f"{model.config.name_or_path} loaded on {device} in {time.perf_counter() - t0:.0f} s")

    messages = [{"role": "user", "content": town_notes() + "\n\n" + QUESTION}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt").to(device)
    prompt_len = inputs["input_ids"].shape[1]
    press = LessPress(budget=BUDGET)
    print(f"prompt: {prompt_len} tokens; {press}: {round(BUDGET * prompt_len)} tokens kept per layer and KV head; "
          f"{NEW_TOKENS} new tokens\n")

    policy = press.policy.kind.upper()
    runs = {"full cache": None, f"{policy} (sparse only)": dict(lowrank=False), f"LESS ({policy} + low-rank)": dict()}
    try:
        press.feature_maps_for(model)
    except ValueError as error:
        del runs[f"LESS ({policy} + low-rank)"]
        print(f"LESS skipped: {error}\n")

    for name, settings in runs.items():
        if settings is None:
            result = timed_generate(model, inputs, NEW_TOKENS)
        else:
            with apply(model, budget=BUDGET, **settings):
                result = timed_generate(model, inputs, NEW_TOKENS)
        answer = tokenizer.decode(result.tokens[0], skip_special_tokens=True).strip()
        print(f"== {name}")
        print(f"   KV cache: {kv_cache_bytes(result.cache) / 2**20:.2f} MiB   prefill: {result.prefill_s:.2f} s   "
              f"decode: {result.decode_tokens_per_s:.1f} tokens/s")
        print(f"   answer: {answer!r}\n")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
