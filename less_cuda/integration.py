"""The user API: compress a transformers model's KV cache with LESS (or a sparse-only baseline) during `generate`.

    with less_cuda.apply(model, policy="h2o", budget=0.05):
        out = model.generate(**inputs, max_new_tokens=64)

or, with an explicit cache (one per generate call):

    cache = less_cuda.LessCache(model, feature_maps, less_cuda.Policy("lambda", budget=256, sinks=4))
    out = model.generate(**inputs, max_new_tokens=64, past_key_values=cache)
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from transformers import PreTrainedModel

from .cache import LessCache, model_layout
from .checkpoints import find_checkpoint
from .feature_maps import FeatureMaps
from .policy import Policy


def load_feature_maps(
    model: PreTrainedModel,
    feature_maps: Union[FeatureMaps, str, Path, None],
    policy_kind: str,
    rank: Optional[int] = None,
) -> FeatureMaps:
    """The feature maps for `model` and a policy kind, on the model's device.

    feature_maps: a `FeatureMaps`, a checkpoint directory, or None for the checkpoint shipped with less_cuda for this
    model layout and policy kind. Raises ValueError when none is shipped, or when the feature maps were fitted for
    another model layout, policy kind or rank.
    """
    layout = model_layout(model.config)
    if feature_maps is None:
        feature_maps = find_checkpoint(layout, policy_kind)
        if feature_maps is None:
            raise ValueError(
                f"no LESS checkpoint is shipped for {model.config.name_or_path or type(model).__name__} {layout} with "
                f"policy {policy_kind!r}: pass feature_maps=FeatureMaps.from_pretrained(path) (or the path), or "
                f"lowrank=False for the sparse-only {policy_kind} baseline"
            )
    if isinstance(feature_maps, (str, Path)):
        feature_maps = FeatureMaps.from_pretrained(feature_maps)
    feature_maps.check_compatible(layout, policy_kind, rank)
    return feature_maps.to(model.device).eval()


@contextmanager
def apply(
    model: PreTrainedModel,
    feature_maps: Union[FeatureMaps, str, Path, None] = None,
    policy: str = "h2o",
    budget: Union[int, float] = 0.05,
    recent: Optional[Union[int, float]] = None,
    sinks: int = 4,
    lowrank: bool = True,
    rank: Optional[int] = None,
) -> Iterator[None]:
    """Within the block, every `model.generate` call without its own `past_key_values` uses a fresh `LessCache`.

    Args:
        model: a transformers causal LM (Llama-style attention: GQA and MQA included).
        feature_maps: φ/ψ: a `FeatureMaps`, a checkpoint directory, or None for the checkpoint shipped for
            this model and policy kind (there must be one unless lowrank=False).
        policy: "h2o" (heavy hitters + recent tokens) or "lambda" (Λ: first `sinks` tokens + recent tokens).
        budget: tokens whose K/V stay in the cache between decode steps, per layer, batch row and KV head (the incoming
            token takes one extra slot, so budget + 1 slots are allocated). An int counts tokens; a float in (0, 1] is
            a fraction of the prompt's real tokens (of the longest prompt in the batch, padding excluded), rounded,
            at least 2. A prompt no longer than the budget is kept whole.
        recent: H2O only: newest tokens always kept, an int or a fraction of the budget; default half the budget.
        sinks: Λ only: first tokens always kept; the other budget - sinks slots hold the newest tokens.
        lowrank: True for LESS (every evicted token is folded into the rank-R state); False for the sparse-only
            baseline of the same policy, which needs no feature maps.
        rank: if given, the rank the feature maps must have.

    Malformed settings raise ValueError on entering the block: a budget not above recent (H2O) or sinks (Λ), feature
    maps for another model, policy kind or rank, or no shipped checkpoint. On exit the model's attention
    implementation and `generate` are restored.
    """
    settings = Policy(kind=policy, budget=budget, recent=recent, sinks=sinks)
    if lowrank:
        feature_maps = load_feature_maps(model, feature_maps, settings.kind, rank)
    elif feature_maps is not None:
        raise ValueError("feature_maps were given with lowrank=False, which asks for the sparse-only baseline")
    previous_attention = model.config._attn_implementation
    LessCache(model, feature_maps, settings)  # validates now, allocates nothing; also switches the attention to "less"

    had_own_generate = "generate" in vars(model)
    original_generate = model.generate

    @functools.wraps(original_generate)
    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
            kwargs["past_key_values"] = LessCache(model, feature_maps, settings)
        return original_generate(*args, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        if had_own_generate:
            model.generate = original_generate
        else:
            del model.generate
        model.set_attn_implementation(previous_attention)
