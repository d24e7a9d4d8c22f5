"""less_cuda: LESS KV-cache compression (a sparse policy plus a learned constant-size low-rank state) for PyTorch,
with C++ CPU and CUDA kernels.

Every name is imported on first use: `import less_cuda` (and `less-cuda --help`) loads neither torch nor
transformers, the ops work without transformers installed, and the compiled ops (`torch.ops.less_cuda.*`) are
registered when `less_cuda.ops` or any op function is first imported.
"""

from importlib import import_module

_LAZY = {
    "less_decode_attention": ".ops",
    "less_decode_step_": ".ops",
    "less_score_and_evict_": ".ops",
    "less_state_fold": ".ops",
    "less_state_update_": ".ops",
    "FeatureMaps": ".feature_maps",
    "FeatureMapsConfig": ".feature_maps",
    "Policy": ".policy",
    "ResolvedPolicy": ".policy",
    "EMPTY": ".reference",
    "H2O": ".reference",
    "LAMBDA": ".reference",
    "SlotCache": ".slots",
    "LessPress": ".integration",
    "apply": ".integration",
    "load_feature_maps": ".integration",
    "LessCache": ".cache",
    "LessLayer": ".cache",
    "MemoryReport": ".cache",
    "model_layout": ".cache",
    "backends": "._build",
}


def __getattr__(name: str):
    if name == "__version__":  # the installed distribution's; a source tree that was never installed has none
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("less_cuda")
        except PackageNotFoundError:
            return "unknown"
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'less_cuda' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
