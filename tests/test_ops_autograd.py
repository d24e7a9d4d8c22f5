"""The registered ops as PyTorch sees them: schemas, fake kernels and gradients (torch.library.opcheck,
torch.autograd.gradcheck against finite differences)."""

import pytest
import torch

import less_cuda
from less_cuda.core import reference as ref

ops = torch.ops.less_cuda


def decode_inputs(B=2, Hq=4, Hkv=2, S=6, D=8, R=3, dtype=torch.float32, lowrank=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    pos = torch.arange(S, dtype=torch.int32).repeat(B, Hkv, 1)
    pos[0, 0, 2] = ref.EMPTY
    if not lowrank:
        return q, k, v, pos, None, None, None
    return q, k, v, pos, torch.rand(B, Hq, R, generator=g), torch.rand(B, Hkv, R, D, generator=g), torch.rand(B, Hkv, R, generator=g)


@pytest.mark.parametrize("lowrank", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_decode_attention(lowrank, dtype):
    args = decode_inputs(dtype=dtype, lowrank=lowrank)
    if dtype == torch.float32:
        for t in args:
            if t is not None and t.is_floating_point():
                t.requires_grad_(True)
    torch.library.opcheck(ops.decode_attention.default, (*args, 0.35))


@pytest.mark.parametrize("policy,budget,recent,sinks", [(ref.H2O, 4, 2, 0), (ref.LAMBDA, 4, 0, 1)])
def test_opcheck_score_and_evict(policy, budget, recent, sinks):
    scores = torch.rand(3, 2, 6)
    pos = torch.arange(6, dtype=torch.int32).repeat(3, 2, 1)
    torch.library.opcheck(ops.score_and_evict_.default, (scores, pos, torch.rand(3, 2, 6), policy, budget, recent, sinks))


@pytest.mark.parametrize("masked", [True, False])
def test_opcheck_state_ops(masked):
    psi = torch.rand(2, 3, 5, 4, requires_grad=True)
    v = torch.randn(2, 3, 5, 8, requires_grad=True)
    mask = torch.rand(2, 3, 5) > 0.4 if masked else None
    torch.library.opcheck(ops.state_fold.default, (psi, v, mask))
    H, z = torch.zeros(2, 3, 4, 8), torch.zeros(2, 3, 4)
    torch.library.opcheck(ops.state_update_.default, (H, z, psi.detach(), v.detach(), mask))


# The kernels take fp32 at most, so finite differences run in fp32 with a wide step and matching tolerances.
FP32_GRADCHECK = pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")


@FP32_GRADCHECK
def test_gradcheck_decode_attention():
    q, k, v, pos, phi, H, z = decode_inputs(B=1, Hq=2, Hkv=1, S=4, D=4, R=2)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, phi, H, z)]

    def f(q, k, v, phi, H, z):
        return less_cuda.less_decode_attention(q, k, v, pos, phi, H, z, scale=0.5)[0]

    assert torch.autograd.gradcheck(f, leaves, eps=1e-2, atol=2e-3, rtol=2e-2)


def test_decode_attention_grads_match_reference_autograd():
    args = decode_inputs(seed=3)
    q, k, v, pos, phi, H, z = [t.detach().requires_grad_(t.is_floating_point()) for t in args]
    out, _ = less_cuda.less_decode_attention(q, k, v, pos, phi, H, z, scale=0.4)
    ref_out, _ = ref.decode_attention(q, k, v, pos, phi, H, z, 0.4)
    grad = torch.randn_like(out)
    mine = torch.autograd.grad(out, (q, k, v, phi, H, z), grad)
    theirs = torch.autograd.grad(ref_out, (q, k, v, phi, H, z), grad)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b)


def test_decode_attention_probs_are_not_differentiable():
    q, k, v, pos, *_ = decode_inputs(lowrank=False)
    q.requires_grad_(True)
    _, probs = less_cuda.less_decode_attention(q, k, v, pos)
    assert not probs.requires_grad


@FP32_GRADCHECK
@pytest.mark.parametrize("masked", [True, False])
def test_gradcheck_state_fold(masked):
    g = torch.Generator().manual_seed(5)
    psi = torch.rand(1, 2, 3, 2, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 3, 4, generator=g, requires_grad=True)
    mask = torch.tensor([[[True, False, True], [False, True, True]]]) if masked else None

    def f(psi, v):
        return less_cuda.less_state_fold(psi, v, mask)

    assert torch.autograd.gradcheck(f, (psi, v), eps=1e-2, atol=2e-3, rtol=2e-2)
