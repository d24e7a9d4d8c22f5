"""How a policy ranks tokens, on tensors: which kept token leaves the slots first (`eviction_key`), and which query
rows rank a prompt's tokens under H2O's window ranking (`window_rows`, `WINDOW_POOL`).

The production code (state, prefill) and the reference both follow these rules; the kernels carry the same eviction
order in csrc/less_numerics.h, checked against the reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .policy import H2O, LAMBDA

WINDOW_POOL = 7
"""Kernel of the max pool that smooths H2O's window scores at prefill (`reference.prefill_window_scores`): a token
within WINDOW_POOL // 2 positions of a focus of the window's attention scores as high, so the few tokens of a fact the
end of the prompt asks for (a number's digits, a name) are kept together rather than only the one attended most."""


def eviction_key(policy: int, scores: Tensor, pos: Tensor, newest: Tensor, recent: int, sinks: int) -> Tensor:
    """Eviction priority of each token: the smallest key goes first, +inf never goes.

    scores [..., N] fp32, pos [..., N] int (negative for no token), newest [...] the newest position.
    H2O: a token's accumulated score, if it is outside the `recent` newest positions.
    Λ:   a token's position, if it is not one of the first `sinks` positions.
    """
    occupied = pos >= 0
    if policy == H2O:
        evictable = occupied & (pos <= newest[..., None] - recent)
        key = scores
    elif policy == LAMBDA:
        evictable = occupied & (pos >= sinks)
        key = pos.float()
    else:
        raise ValueError(f"unknown policy id {policy}")
    return torch.where(evictable, key, torch.full_like(scores, math.inf))


def window_rows(valid: Tensor, window: int) -> tuple[Tensor, int]:
    """The query rows of each batch row's window: in_window [B, T] bool, True on its last min(window, real tokens)
    real rows; and the first position any row's window starts at (0 if none has one), before which nothing counts."""
    position = valid.long().cumsum(dim=-1) - 1  # among the row's real tokens
    in_window = valid & (position >= valid.sum(dim=-1, keepdim=True) - window)
    return in_window, int(in_window.any(dim=0).to(torch.int8).argmax())
