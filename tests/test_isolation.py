"""What a LessCache holds stays its own: one batch of sequences (continued, never mixed with another prompt's), one
thread at a time, and the same numbers on every run, at any thread count and whatever else shares the batch."""

from __future__ import annotations

import copy
import threading
from typing import Callable

import pytest
import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList

from less_cuda import less_decode_attention, less_score_and_evict_, less_state_fold

from less_cuda.core import ops
from less_cuda.hf.cache import LessCache
from less_cuda.hf.layer import LessLayer
from less_cuda.hf.press import apply
from less_cuda.core.policy import Policy
from tiny import VOCAB, tiny_llama, random_feature_maps, left_padded, prompts, generate, greedy
from op_inputs import decode_inputs, random_cache, new_token

WAIT = 60  # seconds a test thread waits for the other before the test fails (it never sleeps)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the determinism tests set their own thread counts


def fresh_cache(model, budget: int = 64, policy: str = "h2o") -> LessCache:
    return LessCache(model, random_feature_maps(model, policy), Policy(policy, budget=budget, sinks=2))


def extended(ids: Tensor, mask: Tensor, new: int, seed: int = 7) -> tuple[Tensor, Tensor]:
    """ids and mask followed by `new` random real tokens per row (a new turn)."""
    tokens = torch.randint(1, VOCAB, (ids.shape[0], new), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, tokens], dim=1), torch.cat([mask, mask.new_ones(ids.shape[0], new)], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# One batch of sequences: continued, or refused
# ---------------------------------------------------------------------------------------------------------------
def test_a_cache_continues_its_sequences_in_either_form():
    """generate's output plus a new turn (the whole sequence), or the new tokens alone with a mask over the whole
    sequence: with nothing evicted, either continuation is full-cache generation of the whole sequence (generate
    without a LessCache: transformers' cache, for which the "less" attention is sdpa)."""
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    cache = fresh_cache(model)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, past_key_values=cache)
    whole, whole_mask = extended(first, torch.cat([mask, mask.new_ones(2, 5)], dim=1), 3)
    second = generate(model, whole, whole_mask, 4, past_key_values=cache)
    assert torch.equal(second, generate(model, whole, whole_mask, 4))

    seen = cache.get_seq_length()
    whole = torch.cat([whole, second], dim=1)
    whole, whole_mask = extended(whole, torch.cat([whole_mask, whole_mask.new_ones(2, 4)], dim=1), 2, seed=8)
    third = generate(model, whole[:, seen:], whole_mask, 4, past_key_values=cache)  # the unfed tokens alone
    assert torch.equal(third, generate(model, whole, whole_mask, 4))


def test_a_continuation_under_eviction_runs_on():
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    cache = fresh_cache(model, budget=6)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, past_key_values=cache)
    for turn in range(3):
        ids, mask = extended(out, torch.cat([mask, mask.new_ones(2, out.shape[1] - mask.shape[1])], dim=1), 3, turn)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert cache.get_seq_length() == out.shape[1] - 1 and (cache.layers[0].slots.pos >= 0).sum(-1).eq(6).all()


@pytest.mark.parametrize(
    "make_input,message",
    [
        (lambda ids, mask: left_padded(prompts(40, 33, seed=9)), r"does not continue the 23 tokens per row .*\(rows "
                                                                 r"\[0, 1\] differ"),
        (lambda ids, mask: extended(torch.flip(ids, [0]), torch.flip(mask, [0]), 3), r"rows \[0, 1\] differ"),
        (lambda ids, mask: left_padded(prompts(5, 9, seed=9)), "given 9 tokens per row, but this LessCache already "
                                                               "holds 23"),
        (lambda ids, mask: extended(ids[:1], mask[:1], 30), "has 1 rows, but this LessCache holds 2"),
    ],
    ids=["other-prompt", "rows-swapped", "shorter", "fewer-rows"],
)
def test_a_cache_refuses_another_prompt_before_feeding_it(make_input, message):
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    cache = fresh_cache(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, past_key_values=cache)
    out_mask = torch.cat([mask, mask.new_ones(2, 4)], dim=1)
    held = {name: t.clone() for name, t in vars(cache.layers[0].slots).items()}
    with pytest.raises(ValueError, match=message + ".*use a fresh LessCache"):
        generate(model, *make_input(out, out_mask), 3, past_key_values=cache)
    assert all(torch.equal(t, getattr(cache.layers[0].slots, name)) for name, t in held.items()), "state changed"
    whole, whole_mask = extended(out, out_mask, 2)  # the refused call fed nothing: the sequences continue
    assert torch.equal(generate(model, whole, whole_mask, 3, past_key_values=cache),
                       generate(model, whole, whole_mask, 3))
    cache.reset()  # and a reset cache takes any prompt
    generate(model, *left_padded(prompts(40, 33, seed=9)), 3, past_key_values=cache)


def test_a_deep_copy_is_an_independent_cache():
    """transformers' recipe for reusing a prompt: compress it once, continue copies of the cache different ways."""
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    cache = fresh_cache(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    for seed in (1, 2):
        whole, whole_mask = extended(ids, mask, 3, seed)
        out = generate(model, whole, whole_mask, 4, past_key_values=copy.deepcopy(cache))
        assert torch.equal(out, generate(model, whole, whole_mask, 4)), f"continuation {seed}"
    assert cache.get_seq_length() == ids.shape[1]


def test_generating_from_embeddings_works_unchecked():
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    embeds = model.get_input_embeddings()(ids)
    expected = generate(model, ids, mask, 5)
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         past_key_values=fresh_cache(model))
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------------------------
# One thread at a time
# ---------------------------------------------------------------------------------------------------------------
class Worker(threading.Thread):
    """Runs `work` in a thread, keeping its result or exception."""

    def __init__(self, work: Callable[[], Tensor]):
        super().__init__(daemon=True)
        self.work, self.result, self.error = work, None, None

    def run(self) -> None:
        try:
            self.result = self.work()
        except Exception as error:  # noqa: BLE001  (handed to the test thread)
            self.error = error


class Pause:
    """Holds a worker at a point of its choosing (`reached`) until the test thread lets it go (`go`)."""

    def __init__(self):
        self.reached, self.released = threading.Event(), threading.Event()

    def here(self) -> None:
        self.reached.set()
        assert self.released.wait(WAIT), "the test thread never released the worker"

    def go(self, worker: Worker) -> None:
        self.released.set()
        worker.join(WAIT)


def test_a_second_thread_cannot_enter_a_running_forward():
    """The worker is held inside a forward (before layer 1); the test thread's forward through the same cache fails
    at once, and the worker's generation is exactly what it is alone."""
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    expected = generate(model, ids, mask, 4, past_key_values=fresh_cache(model, budget=6))
    cache, pause = fresh_cache(model, budget=6), Pause()
    worker = Worker(lambda: generate(model, ids, mask, 4, past_key_values=cache))
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda *_: pause.here() if threading.current_thread() is worker else None)
    try:
        worker.start()
        assert pause.reached.wait(WAIT)
        with pytest.raises(RuntimeError, match=f"in use: thread {worker.ident}'s forward through it has not finished"):
            with torch.no_grad():
                model(input_ids=ids[:, :3], attention_mask=mask[:, :3], past_key_values=cache)
        pause.go(worker)
    finally:
        hook.remove()
    assert worker.error is None and torch.equal(worker.result, expected)


class PauseAfterStep(LogitsProcessor):
    """Holds generate between two steps (after the forward of step `step`)."""

    def __init__(self, pause: Pause, step: int):
        self.pause, self.step, self.steps = pause, step, 0

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.steps += 1
        if self.steps == self.step:
            self.pause.here()
        return scores


def generate_pausing(model, cache, ids, mask, pause: Pause) -> Worker:
    """A worker generating 5 tokens with `cache`, held between its second and third step."""
    processors = LogitsProcessorList([PauseAfterStep(pause, 2)])
    worker = Worker(lambda: generate(model, ids, mask, 5, past_key_values=cache, logits_processor=processors))
    worker.start()
    assert pause.reached.wait(WAIT)
    return worker


def test_another_prompt_from_another_thread_between_steps_is_refused_and_changes_nothing():
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    expected = generate(model, ids, mask, 5, past_key_values=fresh_cache(model, budget=6))
    cache, pause = fresh_cache(model, budget=6), Pause()
    worker = generate_pausing(model, cache, ids, mask, pause)
    with pytest.raises(ValueError, match="does not continue"):
        generate(model, *left_padded(prompts(30, 25, seed=3)), 2, past_key_values=cache)
    pause.go(worker)
    assert worker.error is None and torch.equal(worker.result, expected)


def test_a_generate_step_after_another_threads_forward_fails():
    """The test thread feeds the worker's cache between two of its steps: the worker's next step fails instead of
    generating from a state that holds another thread's tokens."""
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    cache, pause = fresh_cache(model, budget=6), Pause()
    worker = generate_pausing(model, cache, ids, mask, pause)
    with torch.no_grad():
        model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask.new_ones(2, 2)], dim=1),
              past_key_values=cache)
    pause.go(worker)
    assert isinstance(worker.error, RuntimeError), worker.error
    assert f"thread {threading.get_ident()} used this LessCache after this generate call's previous step" in str(
        worker.error)


def test_a_cache_continues_in_another_thread():
    """One thread at a time, not one thread ever: a later call may continue the sequences from another thread."""
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    cache = fresh_cache(model)
    first = Worker(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                          past_key_values=cache))
    first.start()
    first.join(WAIT)
    whole, whole_mask = extended(first.result, torch.cat([mask, mask.new_ones(2, 4)], dim=1), 2)
    assert torch.equal(generate(model, whole, whole_mask, 3, past_key_values=cache),
                       generate(model, whole, whole_mask, 3))


class Interrupted(Exception):
    """E.g. a user stopping a long prefill."""


def test_a_forward_that_stopped_part_way_leaves_a_cache_that_says_so():
    """Layer 0 took the prompt, layer 1 never did: a retry fails instead of decoding from mismatched layers."""
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    cache = fresh_cache(model, budget=6)

    def interrupt(*_):
        raise Interrupted

    hook = model.model.layers[0].mlp.register_forward_pre_hook(interrupt)
    with pytest.raises(Interrupted):
        generate(model, ids, mask, 3, past_key_values=cache)
    hook.remove()
    with pytest.raises(RuntimeError, match=r"stopped part-way .* reset\(\) the cache"):
        generate(model, *extended(ids, mask, 2), 3, past_key_values=cache)
    cache.reset()
    assert torch.equal(generate(model, ids, mask, 3, past_key_values=cache),
                       generate(model, ids, mask, 3, past_key_values=fresh_cache(model, budget=6)))


# ---------------------------------------------------------------------------------------------------------------
# The same numbers on every run and at any thread count
# ---------------------------------------------------------------------------------------------------------------
def on_threads(threads: int, fn: Callable[[], list[Tensor]]) -> list[Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def assert_bitwise_same_across_runs_and_threads(fn: Callable[[], list[Tensor]], what: str) -> None:
    """fn() twice on one thread and twice on two: every tensor bit for bit the same."""
    first, *others = [on_threads(threads, fn) for threads in (1, 1, 2, 2)]
    for run, other in zip(("second run, 1 thread", "2 threads", "second run, 2 threads"), others):
        for i, (a, b) in enumerate(zip(first, other)):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (
                f"{what}: tensor {i} differs from the first run on 1 thread ({run})")


def op_outputs(dtype: torch.dtype) -> list[Tensor]:
    """Every output (and in-place result) of the four ops on inputs with more rows (batch x KV head) than one
    at::parallel_for grain, so that two threads split them."""
    gen = torch.Generator().manual_seed(0)
    B, Hkv, G, S, D, R, N = 24, 2, 4, 1024, 64, 8, 64
    cache = random_cache(B, Hkv, S, D, R, dtype, S - 1, gen)  # full: every step evicts and folds
    outs = [ops.less_decode_step_(cache, *new_token(B, Hkv * G, Hkv, D, R, dtype, gen), None, "h2o", S - 1, 100)
            for _ in range(3)]
    q, k, v, pos, phi, H, z, scale = decode_inputs(B, Hkv, G, S, D, R, dtype, fill=0.9, seed=1)
    out, probs = less_decode_attention(q, k, v, pos, phi, H, z, scale)
    scores = torch.rand(B, Hkv, S, generator=gen).masked_fill(pos < 0, 0.0)
    victims = less_score_and_evict_(scores, pos, probs, "h2o", 900, 64)  # most rows hold more than 900
    psi = torch.rand(B, Hkv, N, R, generator=gen)
    dH, dz = less_state_fold(psi, torch.randn(B, Hkv, N, D, generator=gen).to(dtype),
                             torch.rand(B, Hkv, N, generator=gen) < 0.7)
    return [*outs, *vars(cache).values(), out, probs, scores, pos, victims, dH, dz]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_are_bitwise_deterministic_across_runs_and_thread_counts(dtype):
    assert_bitwise_same_across_runs_and_threads(lambda: op_outputs(dtype), f"ops {dtype}")


@pytest.mark.parametrize("policy", ["h2o", "lambda"])
def test_generation_is_bitwise_deterministic_across_runs_and_thread_counts(policy):
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20, 17))

    def run() -> list[Tensor]:
        cache = fresh_cache(model, budget=6, policy=policy)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, past_key_values=cache,
                             output_logits=True, return_dict_in_generate=True)
        layers = [layer for layer in cache.layers if isinstance(layer, LessLayer)]
        return [out.sequences, *out.logits, *(t for layer in layers for t in vars(layer.slots).values())]

    assert_bitwise_same_across_runs_and_threads(run, f"{policy} generation")


STORY = [
    "The lighthouse keeper counted {n} ships before dawn, wrote each name in the log, and went to sleep.",
    "In the market, a baker sold {n} loaves of rye bread to travellers from the northern villages.",
    "Mira planted {n} apple trees along the river so that her grandchildren would have fruit.",
    "The train left the station {n} minutes late because a goat was standing on the tracks.",
]


@pytest.mark.smollm2
@pytest.mark.parametrize("policy", ["h2o", "lambda"])
def test_each_sequence_generates_the_same_alone_and_in_a_mixed_padded_batch(smollm2, policy):
    """SmolLM2 with the shipped feature maps, 8 prompts of 43 to 180 tokens left-padded together, a budget every
    prompt exceeds: each row's 8 greedy tokens equal that prompt's alone. About 25 s per policy on one thread of a
    loaded 2-core machine."""
    model, tokenizer = smollm2
    texts = [" ".join(STORY[(i + j) % 4].format(n=i + j) for j in range(2 + i)) for i in range(8)]
    lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
    assert min(lengths) > 26 and max(lengths) <= 220, lengths
    with apply(model, policy=policy, budget=26, sinks=4):  # within 2x of the checkpoints' 5% of 1024: no warning
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        together = greedy(model, batch, 8)
        for i, text in enumerate(texts):
            alone = greedy(model, tokenizer(text, return_tensors="pt"), 8)
            assert torch.equal(alone[0], together[i]), f"prompt {i} ({lengths[i]} tokens)"
