"""benchmarks/results/cuda_resources.md (`make cuda-report`, csrc/cuda_report.py): ptxas's registers, spills and
shared memory for every CUDA kernel instance on sm_80 and sm_90, and the blocks per SM they allow. The report is
checked in; these tests hold it to the sources (its digest) and to the occupancy the kernels are designed for, and
recompile two small kernels to show that the report still says what ptxas says."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "csrc"))
import cuda_build  # noqa: E402
import cuda_report  # noqa: E402

ATTENTION_KERNEL = re.compile(r"^decode_(step|chunk)_kernel<(\w+), (\d+), (\d+)>$")


@pytest.fixture(scope="module")
def report():
    digest, ftz, kernels = cuda_report.read()
    assert kernels, f"no kernel rows in {cuda_report.REPORT}"
    return digest, ftz, kernels


def test_report_is_current(report):
    digest, _, _ = report
    assert digest == cuda_report.digest(), "csrc/cuda or the nvcc flags changed since the report: run make cuda-report"


def test_report_covers_both_architectures(report):
    _, _, kernels = report
    archs = {k.arch for k in kernels}
    assert archs == set(cuda_report.GPUS)
    names = {k.name for k in kernels}
    assert all({k.name for k in kernels if k.arch == arch} == names for arch in archs)


def test_no_kernel_spills_or_flushes_subnormals(report):
    _, ftz, kernels = report
    spilling = [f"{k.name} sm_{k.arch}" for k in kernels if k.spill_stores or k.spill_loads]
    assert not spilling, f"register spills: {spilling}"
    assert ftz == "none", f"f32 arithmetic compiled with flush-to-zero (fast math): {ftz}"


def test_half_precision_attention_with_four_heads_fits_four_blocks_per_sm(report):
    """The bf16 / fp16 step and chunk kernels for blocks of up to 4 heads at D <= 128 (vectorised instances 64 and
    128) use at most 128 registers: 4 blocks of 128 threads per SM on an A100 and an H100."""
    _, _, kernels = report
    checked = []
    for k in kernels:
        m = ATTENTION_KERNEL.match(k.name)
        if m and m.group(2) in ("bf16", "fp16") and 0 < int(m.group(3)) <= 128 and int(m.group(4)) <= 4:
            checked.append(k)
            assert k.registers <= 128, f"{k.name} sm_{k.arch}: {k.registers} registers"
            assert k.blocks_per_sm()[0] >= 4, f"{k.name} sm_{k.arch}: {k.blocks_per_sm()}"
    assert len(checked) == 2 * 2 * 2 * 2  # kernels x dtypes x D x archs


def test_occupancy_model():
    """The calculator's arithmetic on known cases: registers round up per warp to 256, shared memory includes the
    1 KiB the runtime reserves per block."""
    k = cuda_report.Kernel("80", "k", 128, 128, 0, 0, 0, 0, 0)
    assert k.blocks_per_sm() == (4, "registers")
    k.registers = 129  # 129 * 32 = 4128 -> 4352 per warp: 15 warps, 3 blocks
    assert k.blocks_per_sm() == (3, "registers")
    k.registers, k.dynamic_smem = 64, 40 * 1024
    assert k.blocks_per_sm() == (4, "shared memory")  # 164 KiB / 41 KiB
    k.arch = "90"
    assert k.blocks_per_sm() == (5, "shared memory")  # 228 KiB / 41 KiB


@pytest.mark.skipif(cuda_build.find_cuda_home() is None, reason="no CUDA toolkit")
def test_report_matches_ptxas_now(report, tmp_path):
    """Two small kernels recompiled for sm_90 (a few seconds): ptxas gives the numbers the report holds."""
    _, _, kernels = report
    written = {(k.arch, k.name): k for k in kernels}
    home = cuda_build.find_cuda_home()
    for name in ("score_and_evict.cu", "state_fold.cu"):
        fresh, _ = cuda_report.compile_file(cuda_report.CUDA / name, "90", home, tmp_path)
        assert fresh
        for k in fresh:
            assert written[("90", k.name)] == k
