"""What a LESS model in vLLM compresses with, read from the model's hf_config (set through `hf_overrides`).

Overrides (all optional but one of `less_checkpoint` / `less_policy`):
    less_checkpoint  directory of a feature-map checkpoint (`FeatureMaps.save_pretrained`); its config gives the policy
                     kind, budget, recent / sinks and rank. Without one, LESS runs the sparse-only policy.
    less_policy      "h2o" or "lambda"; must agree with the checkpoint's.
    less_budget      tokens kept per layer, request and KV head (int). vLLM allocates every request's state at a
                     fixed size, so a fractional budget (a checkpoint's default, e.g. 0.05) is resolved once against
                     max_model_len instead of per prompt as `LessCache` does.
    less_recent      H2O: newest tokens always kept (int or fraction of the budget); default half the budget.
    less_sinks       Λ: first tokens always kept; default 4.
    less_prefill_scores, less_prefill_window
                     H2O: how a prompt's tokens are ranked at prefill ("sum" / "window", and W; `Policy`). Never
                     taken from the checkpoint: its maps are fitted on the decode rule, so any prefill ranking can
                     use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.feature_maps import FeatureMaps, FeatureMapsConfig
from ..core.policy import Policy, ResolvedPolicy
from ..hf.models import model_layout


@dataclass(frozen=True)
class ServingSettings:
    """The resolved policy and where the feature maps come from."""

    policy: Policy
    resolved: ResolvedPolicy
    checkpoint: Optional[str]
    rank: int  # 0 without feature maps

    def load_feature_maps(self, device: torch.device) -> Optional[FeatureMaps]:
        """The checkpoint's feature maps, fp32 on `device` (None for the sparse-only policy)."""
        if self.checkpoint is None:
            return None
        return FeatureMaps.from_pretrained(self.checkpoint, device=device).eval().requires_grad_(False)


def serving_settings(hf_config: Any, max_model_len: int) -> ServingSettings:
    """Resolve the `less_*` overrides of `hf_config`; raises ValueError naming the override that is wrong."""
    checkpoint = getattr(hf_config, "less_checkpoint", None)
    fitted: dict = {}
    rank = 0
    if checkpoint is not None:  # its config alone: the weights are read once, by the model (`load_feature_maps`)
        config = FeatureMapsConfig.from_checkpoint(checkpoint)
        config.check_compatible(model_layout(hf_config))
        fitted, rank = dict(config.policy), config.rank
    kind = getattr(hf_config, "less_policy", None) or fitted.get("kind")
    if kind is None:
        raise ValueError("a LESS model needs hf_overrides 'less_checkpoint' (feature maps) or 'less_policy' "
                         "('h2o' / 'lambda', sparse-only)")
    if fitted.get("kind") not in (None, kind):
        raise ValueError(f"less_policy {kind!r} disagrees with the checkpoint's policy {fitted['kind']!r}")

    def setting(name: str, default: Any) -> Any:
        value = getattr(hf_config, f"less_{name}", None)
        return fitted.get(name, default) if value is None else value

    budget = setting("budget", 0.05)
    if kind == "h2o":
        prefill = {name: value for name in ("prefill_scores", "prefill_window")
                   if (value := getattr(hf_config, f"less_{name}", None)) is not None}
        policy = Policy(kind, budget, recent=setting("recent", None), **prefill)
    else:
        policy = Policy(kind, budget, sinks=setting("sinks", 4))
    policy = policy.in_tokens(max_model_len)  # every request's state has one size
    return ServingSettings(policy, policy.resolve(max_model_len), checkpoint, rank)
