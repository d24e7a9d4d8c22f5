"""Passkey retrieval: a synthetic needle-in-a-haystack task and its accuracy grid (`less-cuda eval --task passkey`).

A prompt hides a needle ("The pass key is 48213. Remember it.") at a chosen depth in long filler text and asks for
it at the end; the model passes when its greedy continuation contains the answer (`answer_found`). Compressing the
KV cache drops most of the filler, and the needle with it unless the policy keeps it (or LESS's low-rank state
recovers it), so the accuracy over context lengths × depths × budgets shows what a policy remembers. Decoding is
greedy, so a run is deterministic:

    from less_cuda.eval.passkey import evaluate_passkey, format_table
    report = evaluate_passkey(model, tokenizer, context_lengths=[512, 1024], depths=[0.1, 0.5, 0.9],
                              budgets=[0.05], policy="h2o")
    print(format_table(report))

Prompts are assembled from token ids, so their length is exact and the needle sits where asked (to within
`SNAP_TOKENS`, which moves it to the nearest sentence boundary of the filler).
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import __version__
from ..checkpoints import checkpoint_label, find_checkpoint
from ..core.policy import Policy
from ..hf.models import model_layout
from ..hf.press import SHIPPED_MAPS, FeatureMapsSource, apply, is_shipped, load_feature_maps, press_settings
from .haystack import Filler, answer_found, bos_ids, in_context
from .methods import PASSKEY_METHODS as METHODS

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)


@dataclass(frozen=True)
class Needle:
    """What is hidden and what is asked.

    text:     the sentence hidden in the filler; "{answer}" stands for the answer and occurs once (a prompt holds
              the answer exactly once).
    question: the end of the prompt, which the answer should continue.
    answer:   a fixed answer (a short fact), or None for a random 5-digit pass key drawn from each sample's seed.
    """

    text: str = "The pass key is {answer}. Remember it."
    question: str = "What is the pass key? The pass key is"
    answer: Optional[str] = None


@dataclass(frozen=True)
class PasskeySample:
    """One prompt. prompt_ids: exactly `context_length` token ids, [BOS,] intro, filler, needle, filler, question;
    the needle's first token is prompt_ids[needle_position]."""

    prompt_ids: list[int]
    answer: str
    context_length: int
    depth: float
    seed: int
    needle_position: int


class PasskeyPrompts:
    """Builds passkey prompts for one tokenizer, filler and needle; `sample` is deterministic in its seed.

    filler: as `haystack.Filler` takes it (None for `DEFAULT_FILLER` repeated, a text file, or the text itself); a
    prompt's filler is the stretch of that many tokens starting at a sentence chosen by the seed.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        filler: Union[str, Path, None] = None,
        needle: Optional[Needle] = None,
    ):
        self.tokenizer = tokenizer
        self.needle = needle or Needle()
        self.filler = Filler(tokenizer, filler)
        self.filler_description = self.filler.description
        self._prefix = bos_ids(tokenizer) + tokenizer.encode(INTRO, add_special_tokens=False)

    def _pieces(self, answer: str) -> tuple[list[int], list[int]]:
        needle = in_context(self.tokenizer, " " + self.needle.text.format(answer=answer))
        return needle, in_context(self.tokenizer, "\n" + self.needle.question)

    def minimum_length(self, answer: str = "00000") -> int:
        """The shortest context length with at least one filler token, for an answer as long as `answer`."""
        needle, question = self._pieces(answer)
        return len(self._prefix) + len(needle) + len(question) + 1

    def sample(self, context_length: int, depth: float, seed: int) -> PasskeySample:
        """A prompt of exactly `context_length` tokens whose needle follows round(depth × F) of its F filler tokens
        (moved by at most `SNAP_TOKENS` to a sentence boundary): depth 0 right after the intro, 1 right before the
        question. Raises ValueError for a depth outside [0, 1], a length too short for intro + needle + question,
        or an answer that the filler itself contains (it must occur in the prompt exactly once)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        rng = random.Random(seed)
        for _attempt in range(100):  # a drawn key (or offset) whose answer also occurs in the filler is redrawn
            answer = self.needle.answer if self.needle.answer is not None else str(rng.randint(10_000, 99_999))
            offset = self.filler.random_start(rng)
            needle, question = self._pieces(answer)
            fill = context_length - len(self._prefix) - len(needle) - len(question)
            if fill < 1:
                raise ValueError(
                    f"context_length {context_length} is too short: intro, needle and question take "
                    f"{context_length - fill} tokens with this tokenizer, and the filler needs at least one more"
                )
            before = self.filler.snap(offset, round(depth * fill), fill)
            filler = self.filler.take(offset, fill)
            ids = self._prefix + filler[:before] + needle + filler[before:] + question
            if self.tokenizer.decode(ids).count(answer) == 1:
                return PasskeySample(ids, answer, context_length, depth, seed, len(self._prefix) + before)
        raise ValueError(f"the filler itself contains the answer {answer!r} wherever the needle goes")


def _accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, samples: list[PasskeySample]) -> float:
    """Share of samples whose greedy continuation contains their answer. Every prompt of a cell has exactly
    context_length tokens, so the trials go through one generate call without padding."""
    ids = torch.tensor([s.prompt_ids for s in samples], device=model.device)
    # The answer's own tokens and a few to spare: a model may put a quote, a colon or "number" before it.
    new_tokens = max(len(in_context(tokenizer, " " + s.answer)) for s in samples) + 3
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
        pad_token_id=pad,
    )
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return sum(answer_found(text, s.answer) for s, text in zip(samples, texts)) / len(samples)


def _checkpoint_name(model: PreTrainedModel, feature_maps: FeatureMapsSource, policy: str,
                     budgets: Sequence) -> Optional[str]:
    """The feature maps' checkpoint for the report: the path given, the names of the shipped checkpoints the budgets
    picked (", "-joined), or None when only a `FeatureMaps` object was given."""
    if feature_maps is None or is_shipped(feature_maps):
        shipped = {find_checkpoint(model_layout(model.config), policy, budget) for budget in budgets}
        return None if None in shipped else ", ".join(sorted(checkpoint_label(path) for path in shipped))
    if isinstance(feature_maps, (str, Path)):
        return checkpoint_label(feature_maps)
    return None


def evaluate_passkey(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    context_lengths: Sequence[int],
    depths: Sequence[float],
    budgets: Sequence[Union[int, float]],
    policy: Union[str, Policy] = "h2o",
    methods: Sequence[str] = METHODS,
    feature_maps: Optional[FeatureMapsSource] = SHIPPED_MAPS,
    trials: int = 4,
    seed: int = 0,
    filler: Union[str, Path, None] = None,
    needle: Optional[Needle] = None,
) -> dict:
    """Passkey accuracy of `model` over context lengths × depths, for the full cache once per cell and for each
    compressed method at each budget. Trial t of every cell uses the sample of seed `seed + t`.

    Args:
        budgets: ints (tokens) or fractions of the prompt length, as `less_cuda.apply` takes them.
        policy: for the sparse and less methods: "h2o" or "lambda" with the policy's defaults, or a `Policy` (its
            recent / sinks and H2O's prefill ranking; its budget is replaced by each of `budgets`).
        methods: a subset of `METHODS`.
        feature_maps: for "less": a `FeatureMaps`, a checkpoint directory, or "shipped" for the checkpoint shipped for
            the model and policy.
        filler, needle: as `PasskeyPrompts` takes them.

    Returns a JSON-able report:
        {"kind": "passkey", "model": name_or_path, "package_version": str,
         "settings": {"policy", "budgets", "context_lengths", "depths", "trials", "seed", "filler", "needle",
                      "prefill_scores", "prefill_window", "feature_maps": checkpoint path or name, or None},
         "results": [{"method": "full" | "sparse" | "less", "policy": "h2o" | "lambda" | None (full),
                      "budget": as given | None (full), "context_length": int, "depth": float,
                      "accuracy": float in [0, 1], "trials": int}, ...]}
    with rows ordered by context length, depth, then full, then each budget's methods.

    Raises ValueError, naming the argument, for an empty list, a depth outside [0, 1], a context length too short
    for the prompt's fixed parts, an unknown method, a budget the policy cannot use at some length, or trials < 1;
    all before any generation.
    """
    policy = Policy(kind=policy) if isinstance(policy, str) else policy
    _check_arguments(context_lengths, depths, budgets, policy, methods, trials)
    prompts = PasskeyPrompts(tokenizer, filler, needle)
    # All samples first, so that a bad length or depth fails before the model runs.
    cells = {
        (length, depth): [prompts.sample(length, depth, seed + t) for t in range(trials)]
        for length in context_lengths
        for depth in depths
    }
    runs = _runs(model, policy, budgets, methods, feature_maps)
    results = []
    with tqdm(total=len(cells) * len(runs), desc="passkey", unit="run") as progress:
        for (length, depth), samples in cells.items():
            for method, budget, settings in runs:
                progress.set_postfix_str(f"{length} tokens, depth {depth}, {method} {budget or ''}".rstrip())
                with apply(model, **settings) if settings is not None else nullcontext():
                    accuracy = _accuracy(model, tokenizer, samples)
                results.append({
                    "method": method, "policy": None if method == "full" else policy.kind, "budget": budget,
                    "context_length": length, "depth": depth, "accuracy": accuracy, "trials": trials,
                })
                progress.update()
    settings = {
        "policy": policy.kind, "budgets": list(budgets), "context_lengths": list(context_lengths),
        "depths": list(depths), "trials": trials, "seed": seed, "filler": prompts.filler_description,
        "prefill_scores": policy.prefill_scores, "prefill_window": policy.prefill_window,
        "needle": {"text": prompts.needle.text, "question": prompts.needle.question, "answer": prompts.needle.answer},
        "feature_maps": _checkpoint_name(model, feature_maps, policy.kind, budgets) if "less" in methods else None,
    }
    return {"kind": "passkey", "model": model.config.name_or_path, "package_version": __version__,
            "settings": settings, "results": results}


def _check_arguments(context_lengths: Sequence[int], depths: Sequence[float], budgets: Sequence, policy: Policy,
                     methods: Sequence[str], trials: int) -> None:
    """`evaluate_passkey`'s checks that need no tokenizer or model (a ValueError naming the argument)."""
    for name, values in (("context_lengths", context_lengths), ("depths", depths), ("methods", methods)):
        if len(values) == 0:
            raise ValueError(f"{name} is empty")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods has unknown {unknown}: choose from {list(METHODS)}")
    compressed = [m for m in METHODS[1:] if m in methods]
    if compressed and len(budgets) == 0:
        raise ValueError(f"budgets is empty, and methods {compressed} need at least one")
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    for budget in budgets if compressed else ():
        for length in context_lengths:  # a fraction resolves against the prompt length, as apply does
            try:
                replace(policy, budget=budget).resolve(length)
            except (TypeError, ValueError) as error:  # TypeError: neither an int nor a float
                raise ValueError(f"budgets: {budget!r} at context length {length}: {error}") from error


def _runs(model: PreTrainedModel, policy: Policy, budgets: Sequence, methods: Sequence[str],
          feature_maps: Optional[FeatureMapsSource]) -> list[tuple[str, Any, Optional[dict]]]:
    """(method, budget, `apply`'s arguments or None for the full cache) of each run a cell gets: the full cache, then
    each budget's compressed methods. LESS's feature maps are loaded once per budget here, not per cell."""
    runs: list[tuple[str, Any, Optional[dict]]] = [("full", None, None)] if "full" in methods else []
    for budget in budgets:
        settings = press_settings(replace(policy, budget=budget))
        if "sparse" in methods:
            runs.append(("sparse", budget, {**settings, "lowrank": False}))
        if "less" in methods:
            maps = load_feature_maps(model, feature_maps, policy.kind, budget=budget)
            runs.append(("less", budget, {**settings, "feature_maps": maps}))
    return runs


def format_table(results: dict) -> str:
    """A text table of an `evaluate_passkey` report: one line per method, policy, budget and context length, one
    column per depth plus the mean over depths."""
    rows = results["results"]
    depths = sorted({r["depth"] for r in rows})
    lines: dict[tuple, dict[float, float]] = {}  # (length, method, policy, budget) -> {depth: accuracy}
    for r in rows:
        key = (r["context_length"], r["method"], r["policy"], r["budget"])
        lines.setdefault(key, {})[r["depth"]] = r["accuracy"]
    header = (f"{'method':<8} {'policy':<7} {'budget':>7} {'length':>7} " + " ".join(f"{d:>6.2f}" for d in depths)
              + f" {'mean':>6}")
    settings = results["settings"]
    prefill = ""
    if any(r["policy"] == "h2o" for r in rows):
        window = f" of the last {settings['prefill_window']} rows" if settings["prefill_scores"] == "window" else ""
        prefill = f", H2O prefill scores: {settings['prefill_scores']}{window}"
    out = [
        f"passkey accuracy, {results['model']}, {settings['trials']} trials per cell{prefill} (columns: needle depth)",
        header,
    ]
    order = sorted(lines.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1])))  # stable: budgets as given
    for (length, method, policy, budget), by_depth in order:
        cells = " ".join(f"{by_depth[d]:>6.2f}" if d in by_depth else f"{'-':>6}" for d in depths)
        mean = sum(by_depth.values()) / len(by_depth)
        out.append(f"{method:<8} {policy or '-':<7} {'-' if budget is None else str(budget):>7} {length:>7} {cells} "
                   f"{mean:>6.2f}")
    return "\n".join(out)
