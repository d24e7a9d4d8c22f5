"""Compiler flags for LESS_CUDA_SANITIZE, shared by setup.py (the C++ CPU kernels) and the CUDA harness build
(csrc/testing/harness_build.py), so both are instrumented the same way.

LESS_CUDA_SANITIZE is a comma-separated list of "address" (ASan) and "undefined" (UBSan); empty or unset means an
ordinary build. Reports are fatal (-fno-sanitize-recover): a run under the sanitizers passes only without any.
"""

from __future__ import annotations

import os

SUPPORTED = ("address", "undefined")


def requested() -> tuple[str, ...]:
    """The sanitizers LESS_CUDA_SANITIZE asks for, validated; () when unset."""
    names = tuple(name.strip() for name in os.environ.get("LESS_CUDA_SANITIZE", "").split(",") if name.strip())
    unknown = [name for name in names if name not in SUPPORTED]
    if unknown:
        raise ValueError(f"LESS_CUDA_SANITIZE: unsupported sanitizer(s) {unknown}; supported: {', '.join(SUPPORTED)}")
    return names


def compile_flags(names: tuple[str, ...]) -> list[str]:
    """Compile flags for `names` (no flags for ()): -O1 and frame pointers keep reports' stacks readable."""
    if not names:
        return []
    return [f"-fsanitize={','.join(names)}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1"]


def link_flags(names: tuple[str, ...]) -> list[str]:
    return [f"-fsanitize={','.join(names)}"] if names else []
