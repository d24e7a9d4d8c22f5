"""The long-context task suite (`less-cuda eval --task ruler`): RULER-style tasks (`eval.tasks`) × lengths ×
budgets × two protocols, every method at equal memory, from one exact prefill per prompt.

Protocols (`PROTOCOLS`):
- "aware": the question is part of the prompt when the cache is compressed (a single-turn request);
- "agnostic": the context is compressed first and the question arrives afterwards, streaming through the
  compressed cache (a cached document, a multi-turn chat).

Methods (`SUITE_METHODS`): the full cache; for each setting (Λ, H2O with the column-sum ranking, H2O with the window
ranking) the sparse policy, its Baseline+ (the sparse policy given LESS's state bytes as extra tokens) and LESS.
The sparse settings are StreamingLLM (Λ), H2O and SnapKV (H2O, window).

One forward pass per prompt (`hf.prompt_record`) gives the K/V and every ranking of both protocols; each method's
cache is compressed from it, and only the answer (and, agnostic, the question) is decoded per method. Decoding is
greedy and stops at the model's end-of-sequence tokens or after the task's answer length.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import __version__
from ..checkpoints import checkpoint_label, find_checkpoint
from ..core.policy import Policy, baseline_plus
from ..hf.models import model_layout
from ..hf.press import SHIPPED_MAPS, FeatureMapsSource, is_shipped, load_feature_maps
from ..hf.prompt_record import PromptRecord, record_prompt
from .methods import PROTOCOLS, SUITE_METHODS, SUITE_SETTINGS, TASKS
from .tasks import TaskPrompts, TaskSample, score

HEADLINE_FLOOR = 0.5
"""A task enters the headline average only where the full cache scores at least this much: below it the task
measures the model, not the compression."""


def suite_method(name: str) -> tuple[str, Optional[Policy]]:
    """("full", None), or (memory kind, the setting's `Policy` without a budget) for a method name such as
    "less/h2o-window"."""
    if name == "full":
        return "full", None
    memory, _, setting = name.partition("/")
    kind, prefill_scores = SUITE_SETTINGS[setting]
    return memory, Policy(kind=kind, prefill_scores=prefill_scores)


def greedy_answer(model: PreTrainedModel, cache, logits: torch.Tensor, new_tokens: int, stop: set[int],
                  done: Optional[Callable[[list[int]], bool]] = None) -> list[int]:
    """Greedy continuation through `cache` from the logits [1, V] of the last token fed: at most `new_tokens`
    tokens, ending at the first one in `stop`, or once `done(tokens so far)` holds."""
    tokens: list[int] = []
    while True:
        token = int(logits.argmax(dim=-1))
        tokens.append(token)
        if token in stop or len(tokens) == new_tokens or (done is not None and done(tokens)):
            return tokens
        ids = torch.tensor([[token]], device=logits.device)
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]


def stop_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids generate stops at: the generation config's end-of-sequence ids and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


class _Runner:
    """Answers one sample under every method, budget and protocol from its record."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, methods: Sequence[str],
                 budgets: Sequence[Union[int, float]], protocols: Sequence[str], maps: dict):
        self.model, self.tokenizer = model, tokenizer
        self.methods, self.budgets, self.protocols, self.maps = methods, budgets, protocols, maps
        self.stop = stop_tokens(model, tokenizer)
        self.layout = model_layout(model.config)

    def cache(self, record: PromptRecord, method: str, budget, end: int):
        """The cache `method` holds after the first `end` tokens at `budget`."""
        memory, policy = suite_method(method)
        if memory == "full":
            return record.full_cache(self.model, end)
        policy = replace(policy, budget=budget)
        maps = self.maps.get((policy.kind, budget))
        if memory == "baseline_plus":
            policy = baseline_plus(policy, end, self.layout["head_dim"], maps.rank, self.model.dtype)
        return record.compressed_cache(self.model, policy, maps if memory == "less" else None, end)

    def answer(self, record: PromptRecord, sample: TaskSample, protocol: str, method: str, budget) -> str:
        if protocol == "aware":
            cache = self.cache(record, method, budget, record.length)
            logits = record.last_logits
        else:
            cache = self.cache(record, method, budget, record.context_length)
            question = torch.tensor([sample.question_ids], device=record.ids.device)
            logits = self.model(input_ids=question, past_key_values=cache, use_cache=True).logits[:, -1]
        done = self.line_ended if len(sample.answers) == 1 else None
        tokens = greedy_answer(self.model, cache, logits, sample.max_new_tokens, self.stop, done)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def line_ended(self, tokens: list[int]) -> bool:
        """A one-value answer is over at the end of its line: some text, then a newline. Saves decoding the rest
        of the task's token allowance, which a model fills with new questions of its own."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
        return "\n" in text and any(c.isalnum() for c in text.split("\n", 1)[0])

    def runs(self) -> list[tuple[str, str, Optional[Union[int, float]]]]:
        """(protocol, method, budget) of every answer a sample gets; the full cache once, under "aware": with the
        question streamed or prefilled, it holds the same tokens exactly."""
        runs = [("aware", "full", None)] if "full" in self.methods else []
        return runs + [(protocol, method, budget) for protocol in self.protocols for budget in self.budgets
                       for method in self.methods if method != "full"]


@torch.no_grad()
def evaluate_suite(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = (4096,),
    budgets: Sequence[Union[int, float]] = (0.05, 0.1),
    protocols: Sequence[str] = PROTOCOLS,
    samples: int = 20,
    methods: Sequence[str] = SUITE_METHODS,
    feature_maps: dict[str, FeatureMapsSource] = None,
    seed: int = 0,
    text_name: Optional[str] = None,
    on_prompt: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Scores of every method on the suite: tasks × lengths × budgets × protocols, `samples` prompts each (sample i
    of a task and length has seed `seed + i`).

    text: the real text of the text-haystack tasks (`TaskPrompts`); text_name names it in the report.
    on_prompt: called with the report so far after each prompt (e.g. to save a long run as it goes).
    feature_maps: per policy kind ("h2o", "lambda"), a `FeatureMaps`, a checkpoint directory or "shipped" (the
    default: the shipped checkpoint fitted closest to each budget); LESS and Baseline+ need them.

    Returns a JSON-able report: {"kind": "suite", "model", "package_version", "settings": {...,
    "feature_maps": {kind: checkpoint per budget}}, "timing": {...}, "results": [{"task", "length", "protocol",
    "method", "budget", "score" (mean over samples, in [0, 1]), "scores" (per sample)}, ...]}. The full cache's rows
    are under protocol "aware" and hold for both.
    Raises ValueError for an unknown task, protocol or method, an empty list or samples < 1, before the model runs.
    """
    _check_arguments(tasks, lengths, budgets, protocols, samples, methods)
    feature_maps = {kind: SHIPPED_MAPS for kind in ("h2o", "lambda")} | (feature_maps or {})
    maps, labels = _load_maps(model, methods, budgets, feature_maps)
    prompts = TaskPrompts(tokenizer, text)
    runner = _Runner(model, tokenizer, methods, budgets, protocols, maps)
    window = max((p.prefill_window for _, p in map(suite_method, methods) if p is not None), default=8)
    # Every prompt first, so that a bad length fails before the model runs; sample i of every task before sample
    # i + 1 of any, so that a run stopped early has as many samples of each task.
    drawn = [(length, task, prompts.sample(task, length, seed + i)) for length in lengths for i in range(samples)
             for task in tasks]
    settings = {"tasks": list(tasks), "lengths": list(lengths), "budgets": list(budgets),
                "protocols": list(protocols), "samples": samples, "methods": list(methods), "seed": seed,
                "text": text_name or prompts.text.description, "prefill_window": window, "feature_maps": labels}
    scores: dict[tuple, list[float]] = {}
    timing = {"prompts": 0, "prompts_planned": len(drawn), "prefill_seconds": 0.0, "answer_seconds": 0.0,
              "answers": 0}
    for length, task, sample in tqdm(drawn, desc="suite", unit="prompt"):
        start = time.perf_counter()
        ids = torch.tensor([sample.prompt_ids], device=model.device)
        record = record_prompt(model, ids, len(sample.context_ids), window)
        timing["prefill_seconds"] += time.perf_counter() - start
        timing["prompts"] += 1
        for protocol, method, budget in runner.runs():
            start = time.perf_counter()
            answer = runner.answer(record, sample, protocol, method, budget)
            timing["answer_seconds"] += time.perf_counter() - start
            timing["answers"] += 1
            scores.setdefault((task, length, protocol, method, budget), []).append(score(answer, sample.answers))
        del record
        if on_prompt is not None:
            on_prompt(_report(model, settings, timing, scores))
    return _report(model, settings, timing, scores)


def _report(model: PreTrainedModel, settings: dict, timing: dict, scores: dict[tuple, list[float]]) -> dict:
    """`evaluate_suite`'s report from the scores so far."""
    results = [{"task": task, "length": length, "protocol": protocol, "method": method, "budget": budget,
                "score": sum(values) / len(values), "scores": list(values)}
               for (task, length, protocol, method, budget), values in scores.items()]
    answers_per_prompt = timing["answers"] / max(1, timing["prompts"])
    # The naive loop runs one prefill per answer (each method's own generate) instead of one per prompt.
    naive = timing["prefill_seconds"] * answers_per_prompt + timing["answer_seconds"]
    return {"kind": "suite", "model": model.config.name_or_path, "package_version": __version__,
            "settings": settings, "timing": {**timing, "naive_estimate_seconds": naive}, "results": results}


def _check_arguments(tasks, lengths, budgets, protocols, samples, methods) -> None:
    for name, values, known in (("tasks", tasks, TASKS), ("protocols", protocols, PROTOCOLS),
                                ("methods", methods, SUITE_METHODS)):
        if len(values) == 0:
            raise ValueError(f"{name} is empty")
        unknown = [v for v in values if v not in known]
        if unknown:
            raise ValueError(f"{name} has unknown {unknown}: choose from {list(known)}")
    if len(lengths) == 0:
        raise ValueError("lengths is empty")
    if any(m != "full" for m in methods) and len(budgets) == 0:
        raise ValueError("budgets is empty, and every method but the full cache needs one")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    for budget in budgets:  # a fraction resolves against each prompt; here only the type and range are checked
        Policy(budget=budget)


def _load_maps(model: PreTrainedModel, methods: Sequence[str], budgets: Sequence,
               feature_maps: dict[str, FeatureMapsSource]) -> tuple[dict, dict]:
    """The feature maps each (policy kind, budget) of LESS and Baseline+ needs, loaded once; and the name of each
    one's checkpoint for the report (None for a `FeatureMaps` given as an object)."""
    kinds = {suite_method(m)[1].kind for m in methods if suite_method(m)[0] in ("less", "baseline_plus")}
    maps, labels = {}, {}
    for kind in sorted(kinds):
        source = feature_maps[kind]
        for budget in budgets:
            maps[(kind, budget)] = load_feature_maps(model, source, kind, budget=budget)
            path = find_checkpoint(model_layout(model.config), kind, budget) if is_shipped(source) else source
            named = isinstance(path, (str, Path))
            labels.setdefault(kind, {})[str(budget)] = checkpoint_label(path) if named else None
    return maps, labels


def headline_tasks(results: dict, length: int) -> list[str]:
    """The tasks of the headline average at `length`: those the full cache scores at least HEADLINE_FLOOR on (all
    tasks when the report has no full cache)."""
    rows = [r for r in results["results"] if r["length"] == length]
    full = {r["task"]: r["score"] for r in rows if r["method"] == "full"}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    return [t for t in tasks if not full or full.get(t, 0.0) >= HEADLINE_FLOOR]


def format_table(results: dict) -> str:
    """Text tables of an `evaluate_suite` report, one per length and protocol: a row per method and budget, a column
    per task (scores in %) and the headline average."""
    rows = results["results"]
    timing = results["timing"]
    done = min((len(r["scores"]) for r in rows), default=0)
    partial = f" (stopped after {timing['prompts']} of {timing['prompts_planned']} prompts)" \
        if timing["prompts"] < timing["prompts_planned"] else ""
    out = [f"task suite, {results['model']}, {done} samples per task and length{partial} (scores in %; avg: the "
           f"tasks the full cache scores >= {HEADLINE_FLOOR:.0%} on)"]
    for length in results["settings"]["lengths"]:
        tasks = list(dict.fromkeys(r["task"] for r in rows if r["length"] == length))
        headline = headline_tasks(results, length)
        for protocol in results["settings"]["protocols"]:
            out.append(f"\n{length} tokens, question-{protocol}" + (f"; not in avg: {', '.join(sorted(set(tasks) - set(headline)))}"
                                                                     if set(tasks) - set(headline) else ""))
            out.append(f"{'method':<26} {'budget':>6} " + " ".join(f"{t[:9]:>9}" for t in tasks) + f" {'avg':>6}")
            cells: dict[tuple, dict[str, float]] = {}
            for r in rows:
                if r["length"] == length and (r["protocol"] == protocol or r["method"] == "full"):
                    cells.setdefault((r["method"], r["budget"]), {})[r["task"]] = r["score"]
            for (method, budget), by_task in cells.items():
                average = sum(by_task[t] for t in headline if t in by_task) / max(1, len(headline))
                line = " ".join(f"{100 * by_task[t]:>9.1f}" if t in by_task else f"{'-':>9}" for t in tasks)
                out.append(f"{method:<26} {'-' if budget is None else f'{budget:g}':>6} {line} {100 * average:>6.1f}")
    return "\n".join(out)
