"""less_cuda: LESS KV-cache compression (a sparse policy plus a learned constant-size low-rank state) for PyTorch,
with C++ CPU and CUDA kernels.

Every name is imported on first use: `import less_cuda` (and `less-cuda --help`) loads neither torch nor
transformers, the ops work without transformers installed, and the compiled ops (`torch.ops.less_cuda.*`) are
registered when `less_cuda.core.ops` or any op function is first imported.

The package: core (torch and the compiled ops), hf (transformers), eval, train, vllm; imports run
core <- hf <- {eval, vllm} <- train <- cli (tests/test_layout.py).
"""

import sys
import warnings
from importlib import import_module
from importlib.abc import Loader, MetaPathFinder
from importlib.util import spec_from_loader

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
    "PromptRecord": ".hf.prompt_record",
    "record_prompt": ".hf.prompt_record",
    "MemoryReport": ".hf.memory",
    "model_layout": ".hf.models",
    "load_model": ".hf.models",
    "backends": "._build",
}

_MOVED = {
    "models": "hf.models",
    "integration": "hf.press",
    "generation_timing": "eval.timing",
    "passkey": "eval.passkey",
    "reference": "core.reference",
    "slots": "core.state",
}
"""Module paths of 0.1 that its README and examples imported, and where they live now: they still import, with a
DeprecationWarning, until the next release."""


class _MovedModules(MetaPathFinder, Loader):
    """Imports `less_cuda.<old>` as a module that hands on every name of the module `_MOVED` names."""

    def find_spec(self, fullname, path, target=None):
        old = fullname.removeprefix(__name__ + ".")
        return spec_from_loader(fullname, self) if old in _MOVED else None

    def create_module(self, spec):
        return None  # a plain new module

    def exec_module(self, module) -> None:
        new = import_module(f"{__name__}.{_MOVED[module.__name__.removeprefix(__name__ + '.')]}")
        warnings.warn(f"{module.__name__} moved to {new.__name__}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        module.__getattr__ = lambda name: getattr(new, name)  # PEP 562: the old path's names are the new module's


sys.meta_path.append(_MovedModules())


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
