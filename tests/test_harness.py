"""The CPU harness that runs CUDA kernel source (csrc/testing) keeps CUDA's promises: thread indexing in 2-D blocks,
warp shuffles with sub-warp widths, votes, shared memory, barriers, conversions, and it reports misuse."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "csrc" / "testing"))
import harness_build  # noqa: E402

SCHEDULES = ["forward", "reverse", "random"]


@pytest.fixture(scope="module")
def lib():
    return harness_build.load("selftest", [harness_build.TESTING / "selftest.cu"])


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.is_contiguous() and t.device.type == "cpu"
    return ctypes.c_void_p(t.data_ptr())


def run(lib, fn: str, *args) -> None:
    harness_build.check(lib, getattr(lib, fn)(*(ptr(a) if isinstance(a, torch.Tensor) else a for a in args)))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("block", [(256, 1), (32, 4), (8, 12)])
def test_block_reduction(lib, schedule, block):
    harness_build.set_schedule(lib, schedule, seed=1)
    x = torch.randn(5000, dtype=torch.float32)
    blocks = 3
    out = torch.empty(blocks)
    run(lib, "selftest_block_sum", x, x.numel(), out, blocks, *block)
    torch.testing.assert_close(out.sum(), x.sum(), rtol=1e-5, atol=1e-4)


def test_thread_and_block_indices_in_3d(lib):
    grid, block = (3, 2, 2), (4, 4, 6)  # 96 threads per block: each warp spans two z-planes
    threads = block[0] * block[1] * block[2]
    out = torch.empty(12, threads, 7, dtype=torch.int32)
    run(lib, "selftest_indices", out, *grid, *block)
    want = []
    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                for tz in range(block[2]):
                    for ty in range(block[1]):
                        for tx in range(block[0]):
                            linear = (tz * block[1] + ty) * block[0] + tx
                            want.append([tx, ty, tz, bx, by, bz, linear - linear % 32])
    assert out.view(-1, 7).tolist() == want


def test_atomics(lib):
    x = torch.randint(0, 40, (3000,), dtype=torch.int32)
    hist = torch.zeros(40, dtype=torch.int32)
    claims = torch.full((8,), -1, dtype=torch.int32)
    run(lib, "selftest_histogram", x, x.numel(), 40, hist, claims, 5)
    assert torch.equal(hist, torch.bincount(x, minlength=40).to(torch.int32))
    assert sorted(claims[:5].tolist()) == [0, 1, 2, 3, 4] and claims[5:].eq(-1).all()


def expected_shuffles(threads: int, width: int, delta: int, src: int) -> torch.Tensor:
    """CUDA's documented shuffle results, lane by lane (segments of `width` lanes within each warp)."""
    rows = []
    for t in range(threads):
        lane, warp_base = t % 32, t - t % 32
        seg = lane - lane % width
        xor_src = lane ^ delta
        rows.append(
            [
                warp_base + (xor_src if xor_src < seg + width else lane),  # later segments: own value
                warp_base + (lane - delta if lane - delta >= seg else lane),
                warp_base + (lane + delta if lane + delta < seg + width else lane),
                warp_base + seg + src % width,
                sum(warp_base + seg + i for i in range(width)),
            ]
        )
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("width,delta,src", [(32, 1, 5), (16, 3, 17), (8, 2, 6), (4, 1, 3), (2, 1, 0), (8, 12, 9)])
def test_sub_warp_shuffles_in_2d_block(lib, width, delta, src):
    bx, by = 8, 12  # 96 threads: lanes follow the x-fastest linear index across rows of the block
    out = torch.empty(bx * by, 5, dtype=torch.int32)
    run(lib, "selftest_shuffles", bx, by, width, delta, src, out)
    assert torch.equal(out, expected_shuffles(bx * by, width, delta, src))


def test_votes_and_warp_reductions(lib):
    x = torch.randint(-5, 6, (64,), dtype=torch.int32)
    x[32:] = torch.arange(1, 33, dtype=torch.int32)  # second warp: all positive
    out = torch.empty(64, 5, dtype=torch.int32)  # unsigned 32-bit results
    run(lib, "selftest_votes", x, 64, out)
    got = out.to(torch.int64) & 0xFFFFFFFF
    for w in range(2):
        xs = x[32 * w : 32 * (w + 1)]
        ballot = sum(1 << i for i in range(32) if xs[i] > 0)
        sum_, min_ = int(xs.sum()) & 0xFFFFFFFF, int(xs.min()) & 0xFFFFFFFF
        want = [ballot, int(bool(ballot)), int(bool((xs > 0).all())), sum_, min_]
        assert got[32 * w : 32 * (w + 1)].tolist() == [want] * 32


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shared_memory_tiled_matmul(lib, schedule):
    harness_build.set_schedule(lib, schedule, seed=2)
    M, N, K = 37, 21, 45
    A, B = torch.randn(M, K), torch.randn(K, N)
    C = torch.empty(M, N)
    run(lib, "selftest_tiled_matmul", A, B, C, M, N, K)
    torch.testing.assert_close(C, A @ B, rtol=1e-5, atol=1e-5)


def test_dynamic_shared_memory(lib):
    x = torch.randn(3 * 96)
    y = torch.empty_like(x)
    run(lib, "selftest_reverse", x, y, 3, 96, 96 * 4)
    assert torch.equal(y, x.view(3, 96).flip(-1).reshape(-1))


def test_dynamic_shared_memory_is_poisoned(lib):
    """Reading dynamic shared memory that no thread wrote gives NaN, even right after a launch that wrote it."""
    run(lib, "selftest_reverse", torch.randn(64), torch.empty(64), 1, 64, 64 * 4)
    y = torch.zeros(64)
    run(lib, "selftest_read_unwritten", y, 64)
    assert torch.isnan(y).all()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_barrier_ordering(lib, schedule):
    harness_build.set_schedule(lib, schedule, seed=3)
    n, rounds = 96, 5
    x = torch.randn(n)
    y = torch.empty_like(x)
    run(lib, "selftest_rotate", x, y, n, rounds, 1)
    assert torch.equal(y, x.roll(-rounds))


def test_missing_barrier_is_visible(lib):
    """Without its barriers the rotation reads slots before their owners write them: the result is wrong."""
    harness_build.set_schedule(lib, "forward")
    x = torch.randn(64)
    y = torch.empty_like(x)
    run(lib, "selftest_rotate", x, y, 64, 1, 0)
    assert not torch.equal(y, x.roll(-1))


def test_barrier_votes(lib):
    x = torch.tensor([1, 0, 2, -1] * 24, dtype=torch.int32)
    out = torch.empty(3, dtype=torch.int32)
    run(lib, "selftest_barrier_votes", x, x.numel(), out)
    assert out.tolist() == [48, 0, 1]


@pytest.mark.parametrize(
    "kind,message",
    [(0, "__syncthreads"), (1, "leaves it out"), (2, "warp collectives"), (3, r"__trap\(\) in block \(0,0,0\), thread \(5,0,0\)")],
)
def test_misuse_is_reported(lib, kind, message):
    out = torch.empty(32)
    with pytest.raises(RuntimeError, match=message):
        run(lib, "selftest_misuse", kind, out)
    run(lib, "selftest_block_sum", torch.ones(64), 64, out, 1, 32, 1)  # the next launch works again
    assert out[0] == 64


def test_half_and_bfloat16_conversions_match_torch(lib):
    special = [0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 6.1e-5, 5.96e-8, 2.98e-8, 3e-8, 1e-40]
    x = torch.cat([torch.tensor(special), torch.randn(2000) * 10.0 ** torch.randint(-9, 6, (2000,)).float()])
    x = torch.cat([x, torch.tensor([float("inf"), float("-inf")])])
    n = x.numel()
    hb, bb = torch.empty(n, dtype=torch.int16), torch.empty(n, dtype=torch.int16)
    hf, bf = torch.empty(n), torch.empty(n)
    run(lib, "selftest_convert", x, n, hb, bb, hf, bf)
    assert torch.equal(hb, x.half().view(torch.int16))
    assert torch.equal(bb, x.bfloat16().view(torch.int16))
    assert torch.equal(hf, x.half().float())
    assert torch.equal(bf, x.bfloat16().float())
