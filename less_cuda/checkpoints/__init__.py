"""Feature-map checkpoints shipped with the package: one directory each (config.json + kernels.safetensors)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

from ..core.feature_maps import CONFIG_NAME, FeatureMapsConfig

SHIPPED = Path(__file__).parent


def checkpoint_label(path: Union[str, Path]) -> str:
    """How a results file names a checkpoint: a shipped one by its directory name (the same on every machine),
    any other by the path given."""
    resolved = Path(path).resolve()
    return resolved.name if resolved.parent == SHIPPED.resolve() else str(path)


def find_checkpoint(layout: dict, policy_kind: str, budget: Optional[Union[int, float]] = None) -> Optional[Path]:
    """The shipped checkpoint fitted for a model with this layout (see FeatureMapsConfig.layout) and policy kind, or
    None. Given a budget, the one fitted for the closest budget, with a warning when even that one is more than
    BUDGET_TOLERANCE away (`FeatureMapsConfig.budget_mismatch`). How H2O ranks a prompt at prefill
    (`Policy.prefill_scores`) plays no part: a checkpoint serves every prefill ranking of its policy kind."""
    fitting = []
    for config_path in sorted(SHIPPED.glob(f"*/{CONFIG_NAME}")):
        config = FeatureMapsConfig.from_file(config_path)
        if config.layout() == layout and config.policy.get("kind") == policy_kind:
            fitting.append((config, config_path.parent))
    if not fitting:
        return None
    if budget is None:
        return fitting[0][1]
    config, directory = min(fitting, key=lambda found: found[0].budget_gap(budget) or math.inf)
    config.warn_budget(budget)
    return directory
