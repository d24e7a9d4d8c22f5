"""less_cuda: LESS KV-cache compression (a sparse policy plus a learned constant-size low-rank state) for PyTorch,
with C++ CPU and CUDA kernels.

Every name is imported on first use: `import less_cuda` (and `less-cuda --help`) loads neither torch nor
transformers, the ops work without transformers installed, and the compiled ops (`torch.ops.less_cuda.*`) are
registered when `less_cuda.ops` or any op function is first imported.
"""

from importlib import import_module

_LAZY = {
    "less_decode_attention": ".core.ops",
    "less_decode_step_": ".core.ops",
    "less_score_and_evict_": ".core.ops",
    "less_state_fold": ".core.ops",
    "less_state_update_": ".core.ops",
    "FeatureMaps": ".core.feature_maps",
    "FeatureMapsConfig": ".core.feature_maps",
    "Policy": ".core.policy",
    "ResolvedPolicy": ".core.policy",
    "EMPTY": ".core.state",
    "H2O": ".core.policy",
    "LAMBDA": ".core.policy",
    "SlotCache": ".core.state",
    "LessPress": ".hf.press",
    "apply": ".hf.press",
    "load_feature_maps": ".hf.press",
    "LessCache": ".hf.cache",
    "LessLayer": ".hf.layer",
    "MemoryReport": ".hf.memory",
    "model_layout": ".hf.models",
    "load_model": ".hf.models",
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
