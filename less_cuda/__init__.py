"""less_cuda: LESS KV-cache compression (a sparse policy plus a learned constant-size low-rank state) for PyTorch,
with C++ CPU and CUDA kernels."""

from importlib import import_module

from .feature_maps import FeatureMaps, FeatureMapsConfig
from .ops import (
    less_decode_attention,
    less_decode_step_,
    less_score_and_evict_,
    less_state_fold,
    less_state_update_,
)
from .policy import Policy, ResolvedPolicy
from .reference import EMPTY, H2O, LAMBDA
from .slots import SlotCache

# The transformers integration is imported on first use, so the ops work without transformers installed.
_LAZY = {
    "apply": ".integration",
    "load_feature_maps": ".integration",
    "LessCache": ".cache",
    "LessLayer": ".cache",
    "MemoryReport": ".cache",
    "model_layout": ".cache",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'less_cuda' has no attribute {name!r}")


__all__ = [
    "EMPTY",
    "H2O",
    "LAMBDA",
    "LessCache",
    "FeatureMaps",
    "FeatureMapsConfig",
    "LessLayer",
    "MemoryReport",
    "Policy",
    "ResolvedPolicy",
    "SlotCache",
    "apply",
    "less_decode_attention",
    "less_decode_step_",
    "less_score_and_evict_",
    "less_state_fold",
    "less_state_update_",
    "load_feature_maps",
    "model_layout",
]
