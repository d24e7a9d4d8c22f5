"""How the CUDA kernels are compiled, in one place: the toolkit root, the default architectures and nvcc's flags.
Read by setup.py (the package build), csrc/cuda_report.py (`make cuda-report`), the CPU harness (which mirrors the
floating-point mode the flags select, csrc/testing/harness_build.py) and the tests."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

# SASS for Ampere (sm_80, which sm_86 and sm_89 run as well: same major version) and Hopper, PTX for newer GPUs.
# Two SASS targets rather than four keep the build time of the heads-per-block instances where it was.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

# IEEE float semantics, as the CPU kernels have: no --use_fast_math. Its flush-to-zero and approximate exp made
# the H2O scores (sums of tiny probabilities) differ from the CPU path's, so near-ties evicted other victims.
# Contraction into FMA stays on (nvcc's default), as in the CPU kernels' AVX2 + FMA build.
NVCC_FLAGS = ["-O3", "-lineinfo", "-DLESS_WITH_CUDA"]


def fast_math(flags: list[str] = NVCC_FLAGS) -> bool:
    """Whether `flags` ask nvcc for flush-to-zero and approximate math (the harness then emulates both)."""
    return "--use_fast_math" in flags or "-use_fast_math" in flags or "--ftz=true" in flags


def is_toolkit_root(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home():
    """The CUDA toolkit root. `nvcc` on PATH may be a wrapper script, so its directory proves nothing: ask nvcc
    itself, whose dry run prints the TOP it really runs from."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if is_toolkit_root(os.environ.get(var, "")):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            top = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
            if top and is_toolkit_root(os.path.realpath(top.group(1))):
                return os.path.realpath(top.group(1))
        except (OSError, subprocess.SubprocessError):
            pass
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if is_toolkit_root(root):
            return root
    for root in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if is_toolkit_root(root):
            return root
    return None
