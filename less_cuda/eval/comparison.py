"""The result of one `less-cuda eval` perplexity setting: the perplexities of each method, the share of the gap to
the full cache that LESS closes, and their JSON entry and text table."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ..core.policy import Policy
from .methods import METHODS


def gap_closed(perplexities: dict[str, float], reference: str) -> Optional[float]:
    """(X - LESS) / (X - full) for X = perplexities[reference]: the share of X's gap to the full cache that LESS
    removes. None when a method is missing or X equals the full cache."""
    p = perplexities
    if not all(m in p for m in ("full", "less", reference)) or p[reference] == p["full"]:
        return None
    return (p[reference] - p["less"]) / (p[reference] - p["full"])


@dataclass
class Comparison:
    """Perplexities of one policy setting in one evaluation form over sequences of `length` tokens.
    `budget_length` is what a fractional budget resolves against: the sequence (parallel, streaming) or the prompt
    (prefill, where only the tokens after the prompt are scored)."""

    policy: Policy
    baseline_plus: Policy
    length: int
    perplexity: dict[str, float]
    form: str = "parallel"
    budget_length: int = 0
    checkpoint: Optional[str] = None

    def __post_init__(self) -> None:
        self.budget_length = self.budget_length or self.length

    @property
    def gap_closed(self) -> dict[str, Optional[float]]:
        """Share of the gap to the full cache that LESS closes, against the sparse policy and against Baseline+."""
        return {x: gap_closed(self.perplexity, x) for x in ("sparse", "baseline_plus")}

    @property
    def budget_tokens(self) -> int:
        return self.policy.resolve(self.budget_length).budget

    def to_json(self) -> dict:
        """One entry of `less-cuda eval`'s "results" list."""
        return {
            "policy": asdict(self.policy), "budget_tokens": self.budget_tokens,
            "budget_fraction": self.budget_tokens / self.budget_length,
            "baseline_plus_budget": self.baseline_plus.resolve(self.budget_length).budget,
            "checkpoint": self.checkpoint, "perplexity": self.perplexity, "gap_closed": self.gap_closed,
        }

    def table(self) -> str:
        plus = self.baseline_plus.resolve(self.budget_length).budget
        names = {"full": "full cache", "sparse": self.policy.kind, "baseline_plus": f"Baseline+ ({plus} tokens)",
                 "less": "LESS"}
        scope = (f"the {self.length - self.budget_length} tokens after a {self.budget_length}-token prompt"
                 if self.form == "prefill" else f"{self.length} tokens")
        window = self.policy.prompt_window
        ranked = ""  # only the prefill form compresses a prompt, and only H2O ranks its tokens by scores
        if self.form == "prefill" and self.policy.scores_prompt:
            ranked = f", prompt ranked by {'column sums' if window is None else f'the last {window} rows'}"
        lines = [f"{self.form} form, {self.policy.kind}{ranked}, budget {self.budget_tokens} tokens; scored: {scope}",
                 f"{'method':<24} {'perplexity':>10}"]
        lines += [f"{names[m]:<24} {self.perplexity[m]:>10.3f}" for m in METHODS if m in self.perplexity]
        for reference_method, closed in self.gap_closed.items():
            if closed is not None:
                lines.append(f"LESS closes {100 * closed:.1f}% of the {names[reference_method]} -> full-cache gap")
        return "\n".join(lines)
