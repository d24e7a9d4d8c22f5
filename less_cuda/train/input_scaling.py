"""Fitting φ/ψ on queries and keys of any scale.

A model's post-RoPE queries and keys can be far from unit scale: Gemma 3 normalises them with learned weights, and
one of its layers' keys have an RMS of 8 per coordinate. The MLPs' first layer then starts saturated and AdamW's
steps are too large for it: its GELUs die and the low-rank state stays empty. So both training stages fit each
first-layer weight as if its input were divided by its RMS c over the training data. That is an exact
reparametrisation, w1 = u / c with u trained at the configured learning rate, which for AdamW (invariant to the
gradient's scale) means starting w1 at its initial value / c and stepping it at lr / c. The maps, the inference
path and the checkpoint format do not change. `--input-scaling none` (c = 1) trains the weights as they are.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from ..core.feature_maps import LayerFeatureMaps


def input_rms(x: Tensor) -> float:
    """The RMS of one coordinate of x [..., D] over all of it (fp32); a ValueError when it is 0 or not finite, which
    no model's queries or keys give and which would poison every weight."""
    rms = float(x.float().square().mean().sqrt())
    if not 0 < rms < math.inf:
        raise ValueError(f"cannot fit feature maps on inputs with an RMS of {rms} (all zero, or not finite)")
    return rms


def scale_initial_weights(maps: LayerFeatureMaps, q_rms: float, k_rms: float) -> None:
    """Divide freshly initialised first-layer weights by their inputs' RMS: φ's by the queries', ψ's by the keys'."""
    with torch.no_grad():
        maps.phi_mlp.w1.div_(q_rms)
        maps.psi_mlp.w1.div_(k_rms)


def param_groups(layers: Mapping[str, tuple[LayerFeatureMaps, float, float]]) -> list[dict]:
    """AdamW parameter groups for layers {name: (maps, q_rms, k_rms)}: each first-layer weight in a group of its own
    with "lr_scale" 1 / its input's RMS, every other weight in one group with "lr_scale" 1."""
    groups, others = [], []
    for maps, q_rms, k_rms in layers.values():
        groups += [{"params": [maps.phi_mlp.w1], "lr_scale": 1.0 / q_rms},
                   {"params": [maps.psi_mlp.w1], "lr_scale": 1.0 / k_rms}]
        first = {id(maps.phi_mlp.w1), id(maps.psi_mlp.w1)}
        others += [p for p in maps.parameters() if id(p) not in first]
    return [*groups, {"params": others, "lr_scale": 1.0}]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to lr times its "lr_scale"."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
