"""Feature-map checkpoints shipped with the package: one directory each (config.json + kernels.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

SHIPPED = Path(__file__).parent


def find_checkpoint(layout: dict, policy_kind: str) -> Optional[Path]:
    """The shipped checkpoint fitted for a model with this layout (see FeatureMapsConfig.layout) and policy kind,
    or None."""
    for config_path in sorted(SHIPPED.glob("*/config.json")):
        config = json.loads(config_path.read_text())
        same_layout = all(config.get(k) == v for k, v in layout.items())
        if same_layout and config.get("policy", {}).get("kind") == policy_kind:
            return config_path.parent
    return None
