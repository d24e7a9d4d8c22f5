"""The compiled extension (less_cuda._C) and the record of what it was built against.

A torch C++/CUDA extension links against the exact torch it was compiled with; beside another torch it either fails
to load with an undefined symbol or, worse, loads and misbehaves. setup.py therefore writes less_cuda/_build_info.py
beside the binary (torch version, CUDA version, which backends, which archs), and `load_extension` compares it with
the running torch before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from types import ModuleType
from typing import Optional

import torch

REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _fix(built_torch: str) -> str:
    return (
        f"Fix: rebuild less_cuda against the installed torch, from its source tree: `{REBUILD}`; or install the "
        f"torch it was built against: torch=={built_torch.split('+')[0]}, the {built_torch} build."
    )


def _build_info() -> ModuleType:
    try:
        return import_module("._build_info", __package__)
    except ImportError as e:
        raise ImportError(
            "less_cuda has no record of the torch its compiled kernels were built against "
            "(less_cuda/_build_info.py, which setup.py writes when it builds less_cuda._C): the extension was built "
            f"by an older setup.py, or not at all. Fix: rebuild it, from the source tree: `{REBUILD}`."
        ) from e


def load_extension() -> None:
    """Loads less_cuda._C, which registers the ops, once its build record matches the running torch.

    Raises:
        ImportError: the extension was built against another torch (compared as the full version string, so the
            CUDA variant, e.g. +cu130 against +cpu, counts), has no build record, or fails to load; the message
            names the fix.
    """
    info = _build_info()
    if info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"less_cuda's compiled kernels were built against torch {info.TORCH_VERSION}, but torch "
            f"{torch.__version__} is installed; an extension only works with the torch it was compiled against. "
            + _fix(info.TORCH_VERSION)
        )
    try:
        import_module("._C", __package__)
    except ImportError as e:
        raise ImportError(
            f"less_cuda._C (built against torch {info.TORCH_VERSION}, the torch installed) failed to load: {e}. "
            + _fix(info.TORCH_VERSION)
        ) from e


def _has_kernel(dispatch_key: str) -> bool:
    # All ops register their kernels together (tests/test_cuda_gpu.py checks that); decode_attention stands for them.
    return torch._C._dispatch_has_kernel_for_dispatch_key("less_cuda::decode_attention", dispatch_key)


@dataclass(frozen=True)
class Backends:
    """Which kernels this installation of less_cuda has, what they were compiled against, and whether a GPU is
    there to run the CUDA ones now. `str()` gives a readable summary."""

    cpu: bool  # the C++ CPU kernels are registered (always, when the extension loads)
    cuda: bool  # the CUDA kernels are registered
    cuda_archs: tuple[str, ...]  # the archs they were compiled for (TORCH_CUDA_ARCH_LIST), () without them
    torch_version: str  # the torch compiled against, e.g. "2.14.1+cu130" (also the one running: see load_extension)
    torch_cuda_version: Optional[str]  # that torch's CUDA version, None for a CPU-only torch
    gpu_available: bool  # torch.cuda.is_available() at the time of the call

    def __str__(self) -> str:
        cuda = "built for archs " + " ".join(self.cuda_archs) if self.cuda else "not built"
        if self.cuda and not self.gpu_available:
            cuda += " (no GPU visible now: the ops run on CPU tensors only)"
        against = f"torch {self.torch_version}"
        if self.torch_cuda_version:
            against += f", CUDA {self.torch_cuda_version}"
        return (
            "less_cuda backends\n"
            f"  CPU:  {'built' if self.cpu else 'not registered'}\n"
            f"  CUDA: {cuda}\n"
            f"  compiled against {against}\n"
            f"  GPU available: {'yes' if self.gpu_available else 'no'}"
        )


def backends() -> Backends:
    """Which kernels were built and registered, against which torch and CUDA, and whether a GPU is available now.

    Raises:
        ImportError: as `load_extension`.
        RuntimeError: the registered CUDA kernels disagree with the build record (the binary is not the one the
            record describes).
    """
    load_extension()  # the registrations to look at; `import less_cuda` alone loads nothing
    info = _build_info()
    cuda = _has_kernel("CUDA")
    if cuda != info.WITH_CUDA:
        raise RuntimeError(
            f"less_cuda._C {'registers' if cuda else 'lacks'} CUDA kernels, but its build record says it was built "
            f"{'without' if cuda else 'with'} them: the binary and less_cuda/_build_info.py come from different "
            f"builds. Rebuild: `{REBUILD}`."
        )
    return Backends(
        cpu=_has_kernel("CPU"),
        cuda=cuda,
        cuda_archs=info.CUDA_ARCHS,
        torch_version=info.TORCH_VERSION,
        torch_cuda_version=info.CUDA_VERSION,
        gpu_available=torch.cuda.is_available(),
    )
