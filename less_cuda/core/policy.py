"""The sparse policy: which tokens keep their K/V, validated once at the boundary, and what it costs in tokens.

No torch here: the command line builds its choices from these names without loading it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

H2O = 0
"""Policy id: keep the `recent` newest tokens plus the heavy hitters by accumulated attention."""
LAMBDA = 1
"""Policy id (Λ-shaped attention): keep the first `sinks` tokens plus the newest ones."""
POLICY_IDS = {"h2o": H2O, "lambda": LAMBDA}
PREFILL_SCORES = ("sum", "window")
"""How H2O ranks a prompt's tokens at prefill: "sum", the column sums of the whole prompt's attention; "window",
the attention of the prompt's last `prefill_window` query rows, max-pooled over positions
(`reference.prefill_window_scores`)."""
DEFAULT_PREFILL_SCORES = "sum"
"""A `Policy`'s prompt ranking unless told: H2O's own rule, which the evaluations and the vLLM plugin keep as the
baseline. `LessPress` defaults to "window" instead (`hf.press.PRESS_PREFILL_SCORES`): on the task suite it keeps what
a prompt asks for, which "sum" never does; on text that asks nothing it costs perplexity (docs/results.md)."""
DEFAULT_PREFILL_WINDOW = 8
"""W: on SmolLM2 passkey prompts the last 8 rows kept the key where 32 did not; more rows add text before the
question, whose attention outweighs the question's own."""


def policy_id(policy: Union[int, str]) -> int:
    """The op-level id of a policy given by name (any case: "h2o", "H2O", "lambda") or by id (the ops check ids)."""
    if not isinstance(policy, str):
        # An int id (the ops range-check it); a float or bool would be truncated to some policy silently.
        if isinstance(policy, bool) or not isinstance(policy, numbers.Integral):
            raise TypeError(f"policy must be a name ({sorted(POLICY_IDS)}) or an int id, got {policy!r}")
        return int(policy)
    if policy.lower() not in POLICY_IDS:
        raise ValueError(f"policy must be one of {sorted(POLICY_IDS)} (any case) or their ids, got {policy!r}")
    return POLICY_IDS[policy.lower()]


@dataclass(frozen=True)
class Policy:
    """Which tokens keep their K/V in the slots; every other token is folded into the low-rank state.

    kind:   "h2o" (heavy hitters by accumulated attention + the newest tokens) or "lambda" (sinks + newest).
    budget: tokens kept between decode steps, per layer and KV head. An int is a token count; a float in (0, 1] is a
            fraction of the prompt length (prefill) or sequence length (training), rounded, at least 2.
            During a step the new token takes one extra slot, so a layer holds budget + 1 slots.
    recent: H2O only: newest tokens always kept (int, or a fraction of the resolved budget); default half.
    sinks:  Λ only: first tokens always kept; the other budget - sinks slots hold the newest tokens.
    prefill_scores: H2O only: how a prompt's tokens are ranked at prefill, "sum" (attention column sums over the
            whole prompt, H2O's own rule) or "window" (attention from the prompt's last `prefill_window` query rows,
            as SnapKV: what the end of the prompt asks for). Both are also the kept tokens' starting scores for
            decoding. Λ ignores both prefill fields (it orders by position), as it ignores `recent`.
    prefill_window: H2O with "window": W, the query rows scored; a prompt shorter than W is scored by all its rows.
    """

    kind: str = "h2o"
    budget: Union[int, float] = 0.05
    recent: Optional[Union[int, float]] = None
    sinks: int = 4
    prefill_scores: str = DEFAULT_PREFILL_SCORES
    prefill_window: int = DEFAULT_PREFILL_WINDOW

    def __post_init__(self) -> None:
        if self.kind not in POLICY_IDS:
            raise ValueError(f"policy kind must be one of {sorted(POLICY_IDS)}, got {self.kind!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise TypeError(f"budget must be an int (tokens) or a float (fraction), got {self.budget!r}")
        if isinstance(self.budget, float) and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"a fractional budget must be in (0, 1], got {self.budget}")
        if isinstance(self.budget, int) and self.budget < 2:
            raise ValueError(f"budget must be at least 2 tokens, got {self.budget}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int):
            raise TypeError(f"sinks must be an int (tokens), got {self.sinks!r}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if isinstance(self.recent, bool) or not isinstance(self.recent, (int, float, type(None))):
            raise TypeError(f"recent must be an int (tokens), a float (fraction) or None, got {self.recent!r}")
        if self.recent is not None and (
            self.recent < 0 or (isinstance(self.recent, float) and self.recent >= 1.0)
        ):
            raise ValueError(f"recent must be a count >= 0 or a fraction in [0, 1), got {self.recent}")
        if self.prefill_scores not in PREFILL_SCORES:
            raise ValueError(f"prefill_scores must be one of {list(PREFILL_SCORES)}, got {self.prefill_scores!r}")
        if isinstance(self.prefill_window, bool) or not isinstance(self.prefill_window, int):
            raise TypeError(f"prefill_window must be an int (query rows), got {self.prefill_window!r}")
        if self.prefill_window < 1:
            raise ValueError(f"prefill_window must be at least 1 query row, got {self.prefill_window}")
        if isinstance(self.budget, int):
            self.resolve(self.budget)  # token counts do not depend on the prompt: reject bad ones now

    def _too_small(self, length: int, problem: str, floor: int) -> ValueError:
        """The error for a budget not above `floor` tokens; a fractional one is explained for this prompt."""
        if isinstance(self.budget, int):
            return ValueError(problem)
        needed = math.floor(floor / self.budget)  # then the first length whose rounded budget clears the floor
        while round(self.budget * needed) <= floor:
            needed += 1
        return ValueError(f"{problem}: a budget of {self.budget:g} of a {length}-token prompt is too small; the "
                          f"prompt needs at least {needed} tokens, or give the budget as a token count")

    @property
    def scores_prompt(self) -> bool:
        """Whether the policy ranks a prompt's tokens by attention scores (H2O); Λ ranks them by position alone."""
        return self.kind == "h2o"

    @property
    def prompt_window(self) -> Optional[int]:
        """The query rows a prompt's tokens are ranked by: the last `prefill_window` under H2O's "window", None for
        all of them (the column sums) under "sum", and under Λ, which needs no scores."""
        return self.prefill_window if self.scores_prompt and self.prefill_scores == "window" else None

    def resolve(self, length: int) -> "ResolvedPolicy":
        """Token counts for a prompt (or training sequence) of `length` tokens."""
        budget = self.budget if isinstance(self.budget, int) else max(2, round(self.budget * length))
        if self.kind == "h2o":
            if self.recent is None:
                recent = budget // 2
            elif isinstance(self.recent, float):
                recent = round(self.recent * budget)
            else:
                recent = self.recent
            if recent >= budget:
                raise self._too_small(length, f"H2O needs budget > recent to keep any heavy hitter: budget {budget}, "
                                              f"recent {recent}", recent)
            return ResolvedPolicy(H2O, budget, recent, 0, self.prompt_window)
        if self.sinks >= budget:
            raise self._too_small(length, f"Λ needs budget > sinks to keep any recent token: budget {budget}, sinks "
                                          f"{self.sinks}", self.sinks)
        return ResolvedPolicy(LAMBDA, budget, budget - self.sinks, self.sinks)

    def in_tokens(self, length: int) -> "Policy":
        """This policy with its fractional budget (and H2O's recent share) fixed to the token counts it resolves to
        at `length` tokens: what a cache that sizes its state once, before it sees a prompt, runs."""
        resolved = self.resolve(length)
        return replace(self, budget=resolved.budget, recent=resolved.recent if self.kind == "h2o" else None)


@dataclass(frozen=True)
class ResolvedPolicy:
    """What the ops take: policy id (H2O / LAMBDA) and token counts; and, for the prefill, the query rows H2O ranks a
    prompt's tokens by: prompt_window W (the last W rows, `prefill.prefill_attention`), or None for the column sums
    over all of them (and under Λ, which ranks by position)."""

    policy_id: int
    budget: int
    recent: int
    sinks: int
    prompt_window: Optional[int] = None

    @property
    def scores_prompt(self) -> bool:
        """Whether a prompt's tokens are ranked by attention scores (H2O) rather than by position (Λ)."""
        return self.policy_id == H2O

    @property
    def num_slots(self) -> int:
        """Slots per (layer, batch, KV head): the budget plus the incoming token's slot."""
        return self.budget + 1

    def as_args(self) -> tuple[int, int, int, int]:
        """(policy, budget, recent, sinks) in the order of `score_and_evict_`."""
        return self.policy_id, self.budget, self.recent, self.sinks


def lowrank_state_bytes(head_dim: int, rank: int, num_slots: int) -> int:
    """fp32 bytes LESS adds per (layer, batch row, KV head): H (R x D), z (R) and psi(k) of every slot (R each)."""
    return 4 * rank * (head_dim + 1 + num_slots)


def baseline_plus(policy: Policy, length: int, head_dim: int, rank: int, dtype: Any) -> Policy:
    """Baseline+: the sparse policy given, as extra tokens, the bytes LESS's state costs at sequence length `length`.

    Extra tokens = ceil(state bytes / (K + V bytes of one token in `dtype`, a torch dtype)): rounded up, in the
    baseline's favour. The token-count fields keep their meaning (H2O's `recent` stays a share of the larger budget
    when it was left to its default or given as a fraction; Λ keeps its sinks and gives the extra slots to recent
    tokens).
    """
    resolved = policy.resolve(length)
    token_bytes = 2 * head_dim * dtype.itemsize
    extra = math.ceil(lowrank_state_bytes(head_dim, rank, resolved.num_slots) / token_bytes)
    return replace(policy, budget=resolved.budget + extra)
