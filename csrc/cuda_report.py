"""Resource usage of every CUDA kernel instance, from ptxas, and the theoretical occupancy it allows: `make
cuda-report` writes benchmarks/results/cuda_resources.md; tests/test_cuda_report.py reads it.

Each csrc/cuda/*.cu is compiled to PTX with the package's nvcc flags (csrc/cuda_build.py) for sm_80 and sm_90, and
the PTX is assembled by `ptxas -v`: registers, spill stores and loads, stack frame and static shared memory per
kernel, the block size from the PTX's .maxntid (__launch_bounds__). Dynamic shared memory is what the launch code
asks for: the chunk and step kernels get at most attention_block.cuh's kSmemBudget (the planner's tile bound), the
others a few floats per head (listed as 0 here). Blocks per SM follow the occupancy calculator's rules for an A100
(sm_80) and an H100 (sm_90). The report records a digest of the sources and flags it was made from, so that the
test can tell a stale report.

Run: python csrc/cuda_report.py [--out PATH] [--archs 80 90] [--files decode_step.cu ...] (MAX_JOBS compiles at once)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc"))
import cuda_build  # noqa: E402

CUDA = ROOT / "csrc" / "cuda"
REPORT = ROOT / "benchmarks" / "results" / "cuda_resources.md"


@dataclass(frozen=True)
class Gpu:
    name: str
    regs_per_sm: int = 65536
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    max_warps: int = 64
    max_blocks: int = 32
    smem_per_sm: int = 0  # bytes a kernel may use per SM
    smem_reserved: int = 1024  # per block, by the runtime


GPUS = {"80": Gpu("A100", smem_per_sm=164 * 1024), "90": Gpu("H100", smem_per_sm=228 * 1024)}


@dataclass
class Kernel:
    arch: str
    name: str  # demangled, without namespaces and parameters
    threads: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    static_smem: int
    dynamic_smem: int

    def blocks_per_sm(self) -> tuple[int, str]:
        """Theoretical resident blocks per SM and the resource that limits them."""
        gpu = GPUS[self.arch]
        warps = -(-self.threads // 32)
        regs_per_warp = -(-self.registers * 32 // gpu.reg_unit) * gpu.reg_unit
        limits = {
            "registers": gpu.regs_per_sm // regs_per_warp // warps if self.registers else gpu.max_blocks,
            "threads": gpu.max_warps // warps,
            "shared memory": gpu.smem_per_sm // (self.static_smem + self.dynamic_smem + gpu.smem_reserved),
            "blocks": gpu.max_blocks,
        }
        limit = min(limits, key=limits.get)
        return limits[limit], limit


def sources() -> list[Path]:
    return sorted(CUDA.glob("*.cu"))


def digest() -> str:
    """Of everything that decides the kernels' code: the CUDA sources and headers, and the nvcc flags."""
    files = sorted([*CUDA.glob("*.cu"), *CUDA.glob("*.cuh"), *CUDA.glob("*.h"), ROOT / "csrc" / "less_numerics.h"])
    h = hashlib.sha256(" ".join(cuda_build.NVCC_FLAGS).encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def smem_budget() -> int:
    """attention_block.cuh's kSmemBudget: the dynamic shared memory the planner gives a chunk or step block."""
    text = (CUDA / "attention_block.cuh").read_text()
    found = re.search(r"kSmemBudget = (\d+) \* 1024", text)
    assert found, "kSmemBudget not found in attention_block.cuh"
    return int(found.group(1)) * 1024


def short_name(mangled: str) -> str:
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=True).stdout.strip()
    name = re.sub(r"^void |less_cuda::cuda::(\(anonymous namespace\)::)?", "", name)
    name = re.sub(r"\([^()]*\)$", "", name)  # parameters
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32")


def compile_file(source: Path, arch: str, cuda_home: str, workdir: Path) -> tuple[list[Kernel], str]:
    """ptxas's account of every kernel in `source` for sm_<arch>, and the PTX it assembled."""
    ptx = workdir / f"{source.stem}.sm_{arch}.ptx"
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    subprocess.run([str(nvcc), "-std=c++17", *cuda_build.NVCC_FLAGS, f"-arch=compute_{arch}", "-ptx",
                    "-I", str(ROOT / "csrc"), str(source), "-o", str(ptx)], check=True, capture_output=True)
    done = subprocess.run([str(Path(cuda_home) / "bin" / "ptxas"), f"-arch=sm_{arch}", "-O3", "-v", str(ptx),
                           "-o", os.devnull], check=True, capture_output=True, text=True)
    text = ptx.read_text()
    threads = {m.group(1): int(m.group(2)) for m in
               re.finditer(r"\.entry (\S+)\((?:.|\n)*?\.maxntid (\d+), 1, 1", text)}
    budget = smem_budget()
    kernels = []
    # ptxas -v: "Compiling entry function 'X'", then "N bytes stack frame, N bytes spill stores, N bytes spill
    # loads" and "Used N registers, ..., N bytes smem, ...".
    for block in re.split(r"ptxas info\s*: Compiling entry function ", done.stderr)[1:]:
        mangled = re.match(r"'(\S+)'", block).group(1)
        number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, block)) else 0  # noqa: E731
        name = short_name(mangled)
        uses_planner_smem = name.startswith(("decode_step_kernel<", "decode_chunk_kernel<"))
        kernels.append(Kernel(arch, name, threads.get(mangled, 1024), number(r"Used (\d+) registers"),
                              number(r"(\d+) bytes spill stores"), number(r"(\d+) bytes spill loads"),
                              number(r"(\d+) bytes stack frame"), number(r"(\d+) bytes smem"),
                              budget if uses_planner_smem else 0))
    return kernels, text


# f32 arithmetic that flushes subnormals to zero: what --use_fast_math (-ftz=true) makes of every add and multiply.
FTZ_ARITHMETIC = re.compile(r"^\s*(add|sub|mul|fma|div|max|min)(\.\w+)*\.ftz(\.\w+)*\.f32", re.M)


def collect(archs: list[str], files: list[Path]) -> tuple[list[Kernel], list[str]]:
    cuda_home = cuda_build.find_cuda_home()
    if cuda_home is None:
        raise SystemExit("cuda_report: no CUDA toolkit found (set CUDA_HOME)")
    jobs = [(f, a) for a in archs for f in files]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(int(os.environ.get("MAX_JOBS", "2"))) as pool:
        results = list(pool.map(lambda job: compile_file(*job, cuda_home, Path(tmp)), jobs))
    kernels = [k for ks, _ in results for k in ks]
    flushing = [f"{f.name} sm_{a}" for (f, a), (_, ptx) in zip(jobs, results) if FTZ_ARITHMETIC.search(ptx)]
    return kernels, flushing


def write(kernels: list[Kernel], flushing: list[str], path: Path) -> None:
    lines = [
        "# CUDA kernel resources",
        "",
        "Written by `make cuda-report` (csrc/cuda_report.py): ptxas -v for every kernel instance, nvcc flags "
        f"`{' '.join(cuda_build.NVCC_FLAGS)}`. Dynamic shared memory: the planner's bound for the chunk and step "
        "kernels (attention_block.cuh kSmemBudget), a few floats per head for the others (0 here). Blocks per SM: "
        "the occupancy calculator's rules (A100: sm_80, 164 KiB shared memory per SM; H100: sm_90, 228 KiB; 64K "
        "registers, 64 warps, 1 KiB reserved per block). Regenerate after any change to csrc/cuda or the flags; "
        "tests/test_cuda_report.py checks the digest.",
        "",
        f"digest: {digest()}",
        f"f32 arithmetic flushing subnormals (.ftz): {', '.join(flushing) if flushing else 'none'}",
        "",
        "| arch | kernel | threads | registers | spill stores | spill loads | stack | static smem | dynamic smem "
        "| blocks/SM | limited by |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for k in sorted(kernels, key=lambda k: (k.arch, k.name)):
        blocks, limit = k.blocks_per_sm()
        lines.append(f"| sm_{k.arch} ({GPUS[k.arch].name}) | `{k.name}` | {k.threads} | {k.registers} | "
                     f"{k.spill_stores} | {k.spill_loads} | {k.stack} | {k.static_smem} | {k.dynamic_smem} | "
                     f"{blocks} | {limit} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


ROW = re.compile(r"^\| sm_(\d+) \(\w+\) \| `(.+?)` \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|")


def read(path: Path = REPORT) -> tuple[str, str, list[Kernel]]:
    """The digest, the .ftz line and the kernels of a written report."""
    text = path.read_text()
    kernels = [Kernel(m.group(1), m.group(2), *(int(x) for x in m.groups()[2:]))
               for m in map(ROW.match, text.splitlines()) if m]
    found = re.search(r"^digest: (\w+)$", text, re.M)
    ftz = re.search(r"^f32 arithmetic flushing subnormals \(\.ftz\): (.*)$", text, re.M)
    return (found.group(1) if found else ""), (ftz.group(1) if ftz else ""), kernels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPORT)
    parser.add_argument("--archs", nargs="+", default=list(GPUS), choices=list(GPUS))
    parser.add_argument("--files", nargs="+", help="names in csrc/cuda (default: all .cu files)")
    args = parser.parse_args()
    files = [CUDA / f for f in args.files] if args.files else sources()
    kernels, flushing = collect(args.archs, files)
    write(kernels, flushing, args.out)
    worst = max((k for k in kernels), key=lambda k: k.registers)
    print(f"cuda_report: {len(kernels)} kernel instances -> {args.out} (most registers: {worst.registers}, "
          f"{worst.name} sm_{worst.arch}; spills: {sum(k.spill_stores + k.spill_loads for k in kernels)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
