"""What a `LessCache` knows of generate's input: generate's whole input before each forward
(`GenerateInputCheck`, installed as the model's `prepare_inputs_for_generation`), and a fingerprint of the tokens a
cache was fed (`TokenRecord`), so that an input that does not continue them is refused before anything is fed."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from transformers import PreTrainedModel

MODULUS = 2**31 - 1  # prime; a token id times a weight < 2^62, and sums of 2^32 reduced terms fit in int64
BASE = 48271  # a primitive root of the modulus (MINSTD's multiplier): weights do not repeat within 2^31 positions
NEW_PROMPT = (
    "a LessCache holds one batch of sequences: continue them by passing what it was fed followed by new tokens (e.g. "
    "generate's previous output plus a new turn), or use a fresh LessCache (or reset() this one) for a new prompt"
)


def token_fingerprint(ids: Tensor, start: int) -> Tensor:
    """[B] int64: sum over t of ids[:, t] * BASE^(start + t) mod MODULUS, a polynomial hash of each row's tokens at
    positions start, start + 1, ...; the fingerprints of consecutive parts add up (mod MODULUS) to the whole's."""
    weight, weights = pow(BASE, start, MODULUS), []
    for _ in range(ids.shape[1]):
        weights.append(weight)
        weight = weight * BASE % MODULUS
    return (ids.long() * torch.tensor(weights, dtype=torch.long, device=ids.device) % MODULUS).sum(-1) % MODULUS


@dataclass
class TokenRecord:
    """The token ids a LessCache was fed as generate's input: `count` per row, and their `fingerprint` ([B] int64,
    None before the first; see `token_fingerprint`). It covers the cache's tokens only while `count` equals the
    number the cache has seen: tokens fed without ids (direct forward calls, inputs_embeds) leave it behind for good."""

    fingerprint: Optional[Tensor] = None
    count: int = 0

    def extend(self, ids: Tensor) -> None:
        """Add new tokens [B, T], which follow the ones recorded."""
        part = token_fingerprint(ids, self.count)
        self.fingerprint = part if self.fingerprint is None else (self.fingerprint + part) % MODULUS
        self.count += ids.shape[1]

    def check_prefix(self, prefix: Tensor, seen: int) -> None:
        """Raise ValueError unless `prefix` [B, L] is the `seen` tokens the cache holds (as far as the record covers
        them: when it does not, nothing can be compared)."""
        if prefix.shape[1] != seen:
            raise ValueError(f"generate's input continues after token {prefix.shape[1]}, but this LessCache holds "
                             f"{seen} per row: {NEW_PROMPT}")
        if seen == 0 or self.count != seen:
            return
        if prefix.shape[0] != self.fingerprint.shape[0]:
            raise ValueError(f"generate's input has {prefix.shape[0]} rows, but this LessCache holds "
                             f"{self.fingerprint.shape[0]}: {NEW_PROMPT}")
        differs = (token_fingerprint(prefix, 0) != self.fingerprint).nonzero().flatten().tolist()
        if differs:
            raise ValueError(f"generate's input does not continue the {seen} tokens per row this LessCache holds "
                             f"(rows {differs} differ): {NEW_PROMPT}")

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Follow the cache's rows (beam search reorders them)."""
        if self.fingerprint is not None:
            self.fingerprint = fn(self.fingerprint)


class GenerateInputCheck:
    """`model.prepare_inputs_for_generation` once a LessCache was made for `model`: generate calls it with its whole
    input before each forward, the one place a cache can compare that input with what it was fed (the forward itself
    gets only the new tokens). A cache with a `check_generate_input` method (`LessCache`) is shown that input; for
    any other cache it is the model's own method, unchanged."""

    def __init__(self, model: PreTrainedModel):
        self.model = model

    @classmethod
    def install(cls, model: PreTrainedModel) -> None:
        """Install on `model` once; a `prepare_inputs_for_generation` a caller set on the model is left alone."""
        if "prepare_inputs_for_generation" not in vars(model):
            model.prepare_inputs_for_generation = cls(model)

    @property
    def __signature__(self) -> inspect.Signature:
        # generate reads the signature to validate its arguments (e.g. whether inputs_embeds may be passed)
        return inspect.signature(self._prepare)

    @property
    def _prepare(self) -> Callable[..., dict]:
        return type(self.model).prepare_inputs_for_generation.__get__(self.model)

    def __call__(self, input_ids: Optional[Tensor], *args: Any, **kwargs: Any) -> dict:
        check = getattr(kwargs.get("past_key_values"), "check_generate_input", None)
        if check is not None:
            first_step = bool(kwargs.get("is_first_iteration"))
            check(input_ids, kwargs.get("next_sequence_length"), first_step,
                  embeds=first_step and kwargs.get("inputs_embeds") is not None)
        return self._prepare(input_ids, *args, **kwargs)
