"""less_cuda: LESS KV-cache compression (a sparse policy plus a learned constant-size low-rank state) for PyTorch,
with C++ CPU and CUDA kernels."""

from .feature_maps import LessKernels, LessKernelsConfig
from .ops import less_decode_attention, less_score_and_evict_, less_state_fold, less_state_update_
from .policy import Policy, ResolvedPolicy
from .reference import EMPTY, H2O, LAMBDA

__all__ = [
    "EMPTY",
    "H2O",
    "LAMBDA",
    "LessKernels",
    "LessKernelsConfig",
    "Policy",
    "ResolvedPolicy",
    "less_decode_attention",
    "less_score_and_evict_",
    "less_state_fold",
    "less_state_update_",
]
