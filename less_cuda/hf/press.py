"""The user API: compress a transformers model's KV cache with LESS (or a sparse-only baseline) during `generate`.

    press = less_cuda.LessPress(policy="h2o", budget=0.05)
    with press(model):                                       # or: with less_cuda.apply(model, budget=0.05)
        out = model.generate(**inputs, max_new_tokens=64)

or, with an explicit cache (one per generate call):

    out = model.generate(**inputs, max_new_tokens=64, past_key_values=press.cache(model))
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, ContextManager, Iterator, Optional, Union

from transformers import PreTrainedModel

from ..checkpoints import find_checkpoint
from ..core.feature_maps import FeatureMaps
from ..core.policy import DEFAULT_PREFILL_WINDOW, Policy
from .attention import keep_attention_implementation
from .cache import LessCache
from .models import model_layout

SHIPPED_MAPS = "shipped"
"""feature_maps=SHIPPED_MAPS: the checkpoint shipped with less_cuda (`checkpoints/`) for the model's layout and the
policy kind (given a budget, the one fitted closest to it). A checkpoint directory named "shipped" is passed as a
`Path`."""
FeatureMapsSource = Union[FeatureMaps, str, Path]
"""A `FeatureMaps`, a checkpoint directory, or SHIPPED_MAPS."""
PRESS_PREFILL_SCORES = "window"
"""LessPress's H2O prompt ranking, chosen by the task suite (docs/results.md): a request's prompt ends with what it
asks, and ranked by its last rows (SnapKV's rule) H2O kept the asked needle in every 4k-token Qwen prompt at 10%,
where the column sums (H2O's own rule, `Policy`'s default) and Λ kept none. It costs perplexity on text that asks
nothing (SmolLM2, prefill form, 5%: sparse 10-15%, LESS 2-4%); prefill_scores="sum" gives H2O's own rule."""


def is_shipped(feature_maps: object) -> bool:
    """Whether `feature_maps` asks for the shipped checkpoint (SHIPPED_MAPS)."""
    return isinstance(feature_maps, str) and feature_maps == SHIPPED_MAPS


def _source(feature_maps: Optional[FeatureMapsSource]) -> FeatureMapsSource:
    """SHIPPED_MAPS for None, which meant the shipped checkpoint before 0.2 (None means "no feature maps" in
    `LessCache`)."""
    if feature_maps is not None:
        return feature_maps
    warnings.warn("feature_maps=None for the shipped checkpoint is deprecated and goes in the next release: pass "
                  "feature_maps='shipped' (the default), or lowrank=False for the sparse policy alone",
                  DeprecationWarning, stacklevel=3)
    return SHIPPED_MAPS


def load_feature_maps(
    model: PreTrainedModel,
    feature_maps: Optional[FeatureMapsSource],
    policy_kind: str,
    rank: Optional[int] = None,
    budget: Optional[Union[int, float]] = None,
) -> FeatureMaps:
    """The feature maps for `model` and a policy kind, on the model's device.

    feature_maps: a `FeatureMaps`, a checkpoint directory, or SHIPPED_MAPS for the checkpoint shipped with less_cuda for
    this model layout and policy kind (given a budget, the one fitted closest to it). Raises ValueError when none is
    shipped, or when the feature maps were fitted for another model layout, policy kind or rank; warns when they were
    fitted for a budget more than `feature_maps.BUDGET_TOLERANCE` from `budget`.
    """
    feature_maps = _source(feature_maps)
    layout = model_layout(model.config)
    shipped = is_shipped(feature_maps)
    if shipped:
        feature_maps = find_checkpoint(layout, policy_kind, budget)  # warns itself when none is near the budget
        if feature_maps is None:
            raise ValueError(
                f"no LESS checkpoint is shipped for {model.config.name_or_path or type(model).__name__} {layout} with "
                f"policy {policy_kind!r}: pass feature_maps=FeatureMaps.from_pretrained(path) (or the path), or "
                f"lowrank=False for the sparse-only {policy_kind} baseline"
            )
    if isinstance(feature_maps, (str, Path)):
        feature_maps = FeatureMaps.from_pretrained(feature_maps)
    feature_maps.check_compatible(layout, policy_kind, rank)
    if not shipped:
        feature_maps.config.warn_budget(budget)
    return feature_maps.to(model.device).eval()


class LessPress:
    """LESS settings for compressing a transformers model's KV cache, in the idiom of kvpress:

        press = less_cuda.LessPress(policy="h2o", budget=0.05)
        with press(model):
            out = model.generate(**inputs, max_new_tokens=64)   # pipelines built on `model` work too
        cache = press.cache(model)                               # or an explicit cache, one per generate call

    Args:
        policy: "h2o" (heavy hitters + recent tokens) or "lambda" (Λ: first `sinks` tokens + recent tokens).
        budget: tokens whose K/V stay in the cache between decode steps, per layer, batch row and KV head (the
            incoming token takes one extra slot, so budget + 1 slots are allocated). An int counts tokens; a float in
            (0, 1] is a fraction of the prompt's real tokens (of the longest prompt in the batch, padding excluded),
            rounded, at least 2. A prompt no longer than the budget is kept whole.
        feature_maps: φ/ψ: a `FeatureMaps`, a checkpoint directory, or "shipped" (SHIPPED_MAPS, the default) for the
            checkpoint shipped for the model and policy kind (there must be one unless lowrank=False).
        recent: H2O only: newest tokens always kept, an int or a fraction of the budget; default half the budget.
        sinks: Λ only: first tokens always kept; the other budget - sinks slots hold the newest tokens.
        lowrank: True for LESS (every evicted token is folded into the rank-R state); False for the sparse-only
            baseline of the same policy, which needs no feature maps.
        rank: if given, the rank the feature maps must have.
        prefill_scores: H2O only: how the prompt's tokens are ranked at prefill, "window" (attention from its last
            `prefill_window` query rows, as SnapKV; the default, `PRESS_PREFILL_SCORES`) or "sum" (attention column
            sums over the whole prompt, H2O's own rule); see `Policy`. Any checkpoint of the policy kind serves both: the feature maps are fitted on the decode rule.
        prefill_window: H2O with "window": the query rows scored.

    Malformed settings raise ValueError here; feature maps for another model, policy kind or rank, or no shipped
    checkpoint, raise it when the press meets the model; feature maps fitted for a budget more than 2x from this one
    (`feature_maps.BUDGET_TOLERANCE`) only warn then, since they still help. A fractional budget too small for a
    prompt raises at prefill, naming the prompt length; nothing is validated mid-decoding.
    """

    def __init__(
        self,
        policy: str = "h2o",
        budget: Union[int, float] = 0.05,
        feature_maps: Optional[FeatureMapsSource] = SHIPPED_MAPS,
        recent: Optional[Union[int, float]] = None,
        sinks: int = 4,
        lowrank: bool = True,
        rank: Optional[int] = None,
        prefill_scores: str = PRESS_PREFILL_SCORES,
        prefill_window: int = DEFAULT_PREFILL_WINDOW,
    ):
        self.policy = Policy(kind=policy, budget=budget, recent=recent, sinks=sinks, prefill_scores=prefill_scores,
                             prefill_window=prefill_window)
        feature_maps = _source(feature_maps)
        if not lowrank and not is_shipped(feature_maps):
            raise ValueError("feature_maps were given with lowrank=False, which asks for the sparse-only baseline")
        self.feature_maps, self.lowrank, self.rank = feature_maps, lowrank, rank

    def __repr__(self) -> str:
        p = self.policy
        kept = f"recent={p.recent}, prefill_scores={p.prefill_scores!r}" if p.kind == "h2o" else f"sinks={p.sinks}"
        if p.prompt_window is not None:
            kept += f", prefill_window={p.prefill_window}"
        return f"LessPress(policy={p.kind!r}, budget={p.budget}, {kept}, lowrank={self.lowrank})"

    def feature_maps_for(self, model: PreTrainedModel) -> Optional[FeatureMaps]:
        """The feature maps this press uses on `model`, on its device (None for the sparse-only baseline)."""
        if not self.lowrank:
            return None
        return load_feature_maps(model, self.feature_maps, self.policy.kind, self.rank, self.policy.budget)

    def cache(self, model: PreTrainedModel) -> LessCache:
        """A fresh `LessCache` for one `generate` call (it switches `model` to the "less" attention)."""
        return LessCache(model, self.feature_maps_for(model), self.policy)

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Iterator[PreTrainedModel]:
        """Within the block, every `model.generate` call without its own `past_key_values` uses a fresh
        `LessCache`. On exit `generate` and the model's attention implementation are restored."""
        feature_maps = self.feature_maps_for(model)  # loaded and checked once, on entering
        with keep_attention_implementation(model):
            LessCache(model, feature_maps, self.policy)  # validates now, allocates nothing; switches the attention

            had_own_generate = "generate" in vars(model)
            original_generate = model.generate

            @functools.wraps(original_generate)
            def generate(*args, **kwargs):
                if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
                    kwargs["past_key_values"] = LessCache(model, feature_maps, self.policy)
                return original_generate(*args, **kwargs)

            model.generate = generate
            try:
                yield model
            finally:
                if had_own_generate:
                    model.generate = original_generate
                else:
                    del model.generate


def press_settings(policy: Policy) -> dict[str, Any]:
    """A `Policy` as the keyword arguments of `LessPress` and `apply` (which call its kind `policy`)."""
    settings = asdict(policy)
    settings["policy"] = settings.pop("kind")
    return settings


def apply(model: PreTrainedModel, feature_maps: Optional[FeatureMapsSource] = SHIPPED_MAPS,
          **settings: Any) -> ContextManager[PreTrainedModel]:
    """The one-line form of `LessPress(...)(model)`; `settings` are LessPress's other arguments:

        with less_cuda.apply(model, policy="h2o", budget=0.05):
            out = model.generate(**inputs, max_new_tokens=64)
    """
    return LessPress(feature_maps=feature_maps, **settings)(model)
