"""Property-based fuzzing of every public op (hypothesis): a valid call matches less_cuda.reference (fp32 tight, bf16
and fp16 within the ratio tolerances of helpers.assert_close_ratio), an invalid one raises the documented error with
a message naming the argument (docs/guarantees.md), and nothing crashes or hangs.

Each op has one test that draws tiny shapes and, half of the time, breaks one argument of an otherwise valid call.
Valid calls include what the ops promise to tolerate: non-contiguous inputs (the copying wrappers), empty batches,
slots and tokens, all-free rows, all-padding rows, all-zero and very large states, and garbage (NaN, inf, negative
values) wherever a call never reads it: free slots, pad tokens, masked-out tokens. The reference then runs on the
same call without that garbage. The "ci" profile (tests/conftest.py) draws a fixed 520 cases per op;
HYPOTHESIS_PROFILE=long draws twenty times as many fresh ones.
"""

from __future__ import annotations

import faulthandler
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from helpers import assert_close_ratio, clone_cache, reference_steps
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from less_cuda.core import ops
from less_cuda.core import reference as ref
from less_cuda.core.feature_maps import LayerFeatureMaps
from less_cuda.core.policy import policy_id
from less_cuda.core.state import SlotCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MIN_CASES = 500
HANG_SECONDS = 600  # one op's cases take seconds; only a hang comes near this
MAX_POSITION = 2**24
NAN, INF = float("nan"), float("inf")
CASES: Counter = Counter()  # (op, "valid" / "invalid") -> examples run


@pytest.fixture(autouse=True)
def hang_watchdog():
    """Hypothesis' deadline judges only examples that return, and a hung kernel never does: dump every thread's
    stack and exit instead, so that CI fails rather than stalls."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# ---------------------------------------------------------------------------------------------------------------
# Shared machinery
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bad:
    """One way to break a valid call: `apply(args, gen)` edits the call's arguments in place, after which the call
    must raise `error` with a message matching `match`, which names the argument. `applies(args)`: whether this
    break exists for the drawn call (poisoning a value needs an element to poison)."""

    name: str
    apply: Callable[[dict, torch.Generator], None]
    error: type
    match: str
    applies: Callable[[dict], bool] = lambda args: True


def seeded(draw) -> torch.Generator:
    """Tensor contents come from torch's generator under a drawn seed: fast, and hypothesis still shrinks the seed."""
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))


def draw_bad(draw, bads: list[Bad], args: dict) -> Optional[Bad]:
    """None (a valid call) half of the time, otherwise one of the breaks that apply to this call."""
    applicable = [bad for bad in bads if bad.applies(args)]
    return draw(st.sampled_from(applicable)) if applicable and draw(st.booleans()) else None


def run_case(op: str, call: Callable[..., object], case: tuple, check: Callable[[dict, object], None]) -> None:
    """One drawn case (args, context, bad, gen): a valid call is checked by `check(args, context)` against the
    reference (the context: what the reference needs); a broken one must raise the documented error."""
    args, context, bad, gen = case
    if bad is None:
        CASES[op, "valid"] += 1
        return check(args, context)
    CASES[op, "invalid"] += 1
    bad.apply(args, gen)
    with pytest.raises(bad.error, match=bad.match):
        call(**args)


def strided(t: Tensor) -> Tensor:
    """The same values in a non-contiguous view (every other element of a wider tensor's last dimension)."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]


def set_at(t: Tensor, value: float, gen: torch.Generator, where: Optional[Tensor] = None) -> None:
    """Set one element, chosen by `gen` among those where `where` (broadcast to t's shape) is True, to `value`."""
    allowed = torch.ones_like(t, dtype=torch.bool) if where is None else where.expand(t.shape)
    candidates = allowed.nonzero()
    t[tuple(candidates[torch.randint(len(candidates), (), generator=gen)])] = value


def other_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype != torch.float16 else torch.bfloat16


def has(*names: str) -> Callable[[dict], bool]:
    """`applies` for breaks that poison an element: every named argument is a non-empty tensor."""
    return lambda args: all(isinstance(args.get(n), Tensor) and args[n].numel() > 0 for n in names)


def slot_positions(gen: torch.Generator, B: int, Hkv: int, S: int, fill: float, free: int, base: int = 0) -> Tensor:
    """[B, Hkv, S] int32: distinct positions from `base` on in a fraction `fill` of the slots, `free` (any negative
    value marks a free slot) in the rest."""
    positions = torch.rand(B * Hkv, 4 * S + 1, generator=gen).argsort(dim=-1)[:, :S]
    occupied = torch.rand(B * Hkv, S, generator=gen) < fill
    return torch.where(occupied, positions + base, free).view(B, Hkv, S).to(torch.int32)


def draw_policy(draw, budget: int) -> tuple[object, int, int]:
    """(policy as the user names it, recent, sinks) within the documented ranges: each policy's own protected count
    below the budget, the one it ignores anywhere in its allowed range too (H2O sinks < budget, Λ recent <= budget)."""
    policy = draw(st.sampled_from(["h2o", "H2O", "lambda", "Lambda", ref.H2O, ref.LAMBDA]))
    if policy_id(policy) == ref.H2O:
        return policy, draw(st.integers(0, budget - 1)), draw(st.sampled_from([0, draw(st.integers(0, budget - 1))]))
    sinks = draw(st.integers(0, budget - 1))
    return policy, draw(st.sampled_from([0, budget - sinks, draw(st.integers(0, budget))])), sinks


def policy_bads() -> list[Bad]:
    """Breaks of the policy arguments, shared by score_and_evict_ and decode_step_."""
    h2o = lambda a: policy_id(a["policy"]) == ref.H2O  # noqa: E731
    lam = lambda a: policy_id(a["policy"]) == ref.LAMBDA  # noqa: E731
    return [
        Bad("unknown policy name", lambda a, g: a.update(policy="heavy"), ValueError, r"policy must be one of"),
        Bad("policy as a float", lambda a, g: a.update(policy=0.0), TypeError, r"policy must be a name"),
        Bad("unknown policy id", lambda a, g: a.update(policy=7), RuntimeError, r"unknown policy id 7"),
        Bad("budget 0", lambda a, g: a.update(budget=0, recent=0, sinks=0), RuntimeError, r"budget must be in \[1"),
        Bad("budget 2^31", lambda a, g: a.update(budget=2**31), RuntimeError, r"budget must be in \[1, 2\^31\)"),
        Bad("budget a float", lambda a, g: a.update(budget=2.5), RuntimeError, r"argument 'budget'"),
        Bad("negative recent", lambda a, g: a.update(recent=-1), RuntimeError, r"recent and sinks must be >= 0"),
        Bad("negative sinks", lambda a, g: a.update(sinks=-3), RuntimeError, r"recent and sinks must be >= 0"),
        Bad("H2O recent >= budget", lambda a, g: a.update(recent=a["budget"] + int(torch.randint(3, (), generator=g))),
            RuntimeError, r"budget \(\d+\) must exceed recent", h2o),
        Bad("H2O sinks >= budget", lambda a, g: a.update(sinks=a["budget"] + int(torch.randint(3, (), generator=g))),
            RuntimeError, r"must exceed sinks .*H2O keeps no sinks", h2o),
        Bad("Λ sinks >= budget", lambda a, g: a.update(sinks=a["budget"]), RuntimeError, r"must exceed sinks", lam),
        Bad("Λ recent > budget", lambda a, g: a.update(recent=a["budget"] + 1), RuntimeError,
            r"recent \(\d+\) must not exceed budget", lam),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# (c) decode attention
# ---------------------------------------------------------------------------------------------------------------
def state_tensors(draw, gen: torch.Generator, B: int, Hq: int, Hkv: int, R: int, D: int) -> dict:
    """phi_q, H, z of a consistent state (folded from random tokens), all zero, or with a very large z (and H)."""
    kind = draw(st.sampled_from(["folded", "zero", "huge"]))
    H, z = ref.state_fold(torch.rand(B, Hkv, 5, R, generator=gen), torch.randn(B, Hkv, 5, D, generator=gen), None)
    if kind == "zero":
        H, z = torch.zeros_like(H), torch.zeros_like(z)
    elif kind == "huge":  # phi(q) z near 1e30: the state outweighs every slot, and nothing overflows in fp32
        H, z = H * 1e30, z * 1e30
    phi = torch.rand(B, Hq, R, generator=gen) * (torch.rand(B, Hq, R, generator=gen) < 0.8)  # some exact zeros
    return dict(phi_q=phi, H=H, z=z)


@st.composite
def attention_calls(draw):
    gen = seeded(draw)
    dtype = draw(st.sampled_from(DTYPES))
    B, Hkv, G, S = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(0, 9))
    D, R = draw(st.sampled_from([1, 5, 16, 64])), draw(st.sampled_from([None, 0, 1, 4]))  # None: sparse only
    magnitude = draw(st.sampled_from([0.0, 1.0, 4.0]))
    q = (torch.randn(B, Hkv * G, D, generator=gen) * magnitude).to(dtype)
    k, v = (torch.randn(B, Hkv, S, D, generator=gen).to(dtype) for _ in range(2))
    pos = slot_positions(gen, B, Hkv, S, draw(st.sampled_from([0.0, 0.5, 1.0])), draw(st.sampled_from([-1, -7])))
    args = dict(q=q, k=k, v=v, pos=pos, scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))))
    if R is not None:
        args.update(state_tensors(draw, gen, B, Hkv * G, Hkv, R, D))
    clean = dict(args)
    if draw(st.booleans()):  # free slots are never read: garbage there changes nothing
        free = (pos < 0)[..., None]
        args["k"], args["v"] = k.masked_fill(free, NAN), v.masked_fill(free, -INF)
    if draw(st.booleans()):  # the wrapper copies strided inputs
        args["q"], args["k"] = strided(args["q"]), strided(args["k"])
    return args, clean, draw_bad(draw, ATTENTION_BAD, args), gen


def _phi_shape(a: dict, g) -> None:
    a["phi_q"] = torch.zeros(a["q"].shape[0] + 1, *a["phi_q"].shape[1:])


ATTENTION_BAD = [
    Bad("q is None", lambda a, g: a.update(q=None), TypeError, r"q must be a tensor"),
    Bad("q int32", lambda a, g: a.update(q=a["q"].int()), RuntimeError, r"q must be float32, bfloat16 or float16"),
    Bad("q float64", lambda a, g: a.update(q=a["q"].double()), RuntimeError, r"q must be float32"),
    Bad("q 2-d", lambda a, g: a.update(q=a["q"].flatten(0, 1)), RuntimeError, r"q must have 3 dimensions"),
    Bad("k another dtype", lambda a, g: a.update(k=a["k"].to(other_dtype(a["k"].dtype))), RuntimeError,
        r"k must be (BFloat16|Half|Float)"),
    Bad("v one slot more", lambda a, g: a.update(v=torch.zeros(*a["v"].shape[:2], a["v"].shape[2] + 1,
        a["v"].shape[3], dtype=a["v"].dtype)), RuntimeError, r"v must have shape"),
    Bad("pos int64", lambda a, g: a.update(pos=a["pos"].long()), RuntimeError, r"pos must be Int"),
    Bad("pos 1-d", lambda a, g: a.update(pos=a["pos"].reshape(-1)), RuntimeError, r"pos must have 3 dimensions"),
    Bad("query heads not a multiple", lambda a, g: a.update(q=torch.zeros(a["q"].shape[0], a["q"].shape[1] + 1,
        a["q"].shape[2], dtype=a["q"].dtype)), RuntimeError, r"query heads \(\d+\) must be a multiple of KV heads",
        lambda a: a["k"].shape[1] > 1),
    Bad("head_dim 0", lambda a, g: a.update(q=a["q"][..., :0], k=a["k"][..., :0], v=a["v"][..., :0]), RuntimeError,
        r"head_dim must be positive", lambda a: "H" not in a),
    Bad("z missing", lambda a, g: a.update(z=None), RuntimeError, r"phi_q, H and z must be given together",
        lambda a: "H" in a),
    Bad("H alone", lambda a, g: a.update(H=torch.zeros(*a["k"].shape[:2], 1, a["k"].shape[3])), RuntimeError,
        r"phi_q, H and z must be given together", lambda a: "H" not in a),
    Bad("phi_q batch", _phi_shape, RuntimeError, r"phi_q must have shape", lambda a: "H" in a),
    Bad("H bfloat16", lambda a, g: a.update(H=a["H"].bfloat16()), RuntimeError, r"H must be Float",
        lambda a: "H" in a),
    Bad("phi_q negative", lambda a, g: set_at(a["phi_q"], -0.5, g), RuntimeError, r"phi_q must be finite and >= 0",
        has("phi_q")),
    Bad("phi_q NaN", lambda a, g: set_at(a["phi_q"], NAN, g), RuntimeError, r"phi_q must be finite and >= 0",
        has("phi_q")),
    Bad("z negative", lambda a, g: set_at(a["z"], -1e-3, g), RuntimeError, r"z must be finite and >= 0", has("z")),
    Bad("z inf", lambda a, g: set_at(a["z"], INF, g), RuntimeError, r"z must be finite and >= 0", has("z")),
    Bad("q NaN", lambda a, g: set_at(a["q"], NAN, g), RuntimeError, r"q must be finite, got nan", has("q")),
    Bad("q -inf", lambda a, g: set_at(a["q"], -INF, g), RuntimeError, r"q must be finite, got -inf", has("q")),
    Bad("scale NaN", lambda a, g: a.update(scale=NAN), ValueError, r"scale must be a finite number"),
    Bad("scale inf", lambda a, g: a.update(scale=INF), ValueError, r"scale must be a finite number"),
]  # fmt: skip


def check_attention(args: dict, clean: dict) -> None:
    out, probs = ops.less_decode_attention(**args)
    scale = ops.default_scale(clean["q"], clean["scale"])
    state = [clean.get(n) for n in ("phi_q", "H", "z")]
    ref_out, ref_probs = ref.decode_attention(clean["q"], clean["k"], clean["v"], clean["pos"], *state, scale)
    assert out.dtype == clean["q"].dtype and probs.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert_close_ratio(out, ref_out, what="out")
    assert_close_ratio(probs, ref_probs, torch.float32, what="probs")
    assert not probs[clean["pos"] < 0].any(), "probability mass on a free slot"


# ---------------------------------------------------------------------------------------------------------------
# (a) score accumulation and eviction: exact
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def evict_calls(draw):
    gen = seeded(draw)
    B, Hkv, S = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 12))  # S = 0: see below
    budget = draw(st.integers(1, S + 2))
    policy, recent, sinks = draw_policy(draw, budget)
    base = draw(st.sampled_from([0, MAX_POSITION - 4 * S - 1]))  # positions up to the largest allowed
    pos = slot_positions(gen, B, Hkv, S, draw(st.sampled_from([0.5, 0.9, 1.0])), -1, base)
    if draw(st.booleans()):  # duplicated positions, tied scores and probabilities: ties go to the lowest slot
        pos = torch.where(pos >= 0, base + pos % 3, pos)
        scores, probs = (torch.randint(0, 3, (B, Hkv, S), generator=gen) / 4 for _ in range(2))
    else:
        scores, probs = torch.rand(B, Hkv, S, generator=gen), torch.rand(B, Hkv, S, generator=gen)
    args = dict(scores=scores, pos=pos, probs=probs, policy=policy, budget=budget, recent=recent, sinks=sinks)
    return args, None, draw_bad(draw, EVICT_BAD, args), gen


EVICT_BAD = policy_bads() + [
    Bad("scores is None", lambda a, g: a.update(scores=None), TypeError, r"scores must be a tensor"),
    Bad("probs negative", lambda a, g: set_at(a["probs"], -0.25, g), RuntimeError, r"probs must be finite and >= 0",
        has("probs")),
    Bad("probs NaN", lambda a, g: set_at(a["probs"], NAN, g), RuntimeError, r"probs must be finite and >= 0",
        has("probs")),
    Bad("position 2^24", lambda a, g: set_at(a["pos"], MAX_POSITION, g), RuntimeError, r"pos must be below 2\^24",
        has("pos")),
    Bad("pos int64", lambda a, g: a.update(pos=a["pos"].long()), RuntimeError, r"pos must be Int"),
    Bad("scores float64", lambda a, g: a.update(scores=a["scores"].double()), RuntimeError, r"scores must be Float"),
    Bad("probs one slot short", lambda a, g: a.update(probs=a["probs"][..., 1:].contiguous()), RuntimeError,
        r"probs must have shape", lambda a: a["probs"].shape[-1] > 0),
    Bad("scores strided", lambda a, g: a.update(scores=strided(a["scores"])), RuntimeError,
        r"scores must be contiguous", lambda a: a["scores"].shape[-1] > 1 and a["scores"].numel() > 0),
    Bad("scores are probs", lambda a, g: a.update(scores=a["probs"]), RuntimeError,
        r"scores is updated in place and must not share memory with probs", has("probs")),
]  # fmt: skip


def check_evict(args: dict, _) -> None:
    expected = dict(args, scores=args["scores"].clone(), pos=args["pos"].clone(), policy=policy_id(args["policy"]))
    victim = ops.less_score_and_evict_(**args)
    ref_victim = ref.score_and_evict_(**expected)
    assert victim.dtype == torch.int64 and torch.equal(victim, ref_victim), f"{victim} != {ref_victim}"
    assert torch.equal(args["pos"], expected["pos"]) and torch.equal(args["scores"], expected["scores"])


@pytest.mark.parametrize("policy", ["h2o", "lambda"])
def test_no_slots_evict_nothing(policy):
    """S = 0, which the reference does not define (its argmin needs a slot): nothing to evict, no error."""
    victim = ops.less_score_and_evict_(torch.zeros(2, 3, 0), torch.zeros(2, 3, 0, dtype=torch.int32),
                                       torch.zeros(2, 3, 0), policy, 4, 1, 1)  # fmt: skip
    assert torch.equal(victim, torch.full((2, 3), -1))


# ---------------------------------------------------------------------------------------------------------------
# (b) state fold and in-place update
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def fold_args(draw, gen: torch.Generator) -> tuple[dict, dict]:
    """(args, clean) of a fold: psi, v and mask, with garbage in masked-out tokens in args only."""
    dtype = draw(st.sampled_from(DTYPES))
    B, Hkv, N = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 6))
    R, D = draw(st.integers(0, 4)), draw(st.sampled_from([1, 5, 16, 64]))
    psi = torch.rand(B, Hkv, N, R, generator=gen) * draw(st.sampled_from([0.0, 1.0, 1e3]))
    v = torch.randn(B, Hkv, N, D, generator=gen).to(dtype)
    mask = draw(st.sampled_from([None, 0.0, 0.5, 1.0]))
    if mask is not None:
        mask = torch.rand(B, Hkv, N, generator=gen) < mask
    clean = dict(psi=psi, v=v, mask=mask)
    args = dict(clean)
    if mask is not None and draw(st.booleans()):  # a masked-out token is never read: garbage there changes nothing
        args["psi"] = psi.masked_fill(~mask[..., None], -INF)
        args["v"] = v.masked_fill(~mask[..., None], NAN)
    return args, clean


def folded(a: dict) -> Tensor:
    """Where a token is folded, as a [B, Hkv, N, 1] mask."""
    return (torch.ones(a["psi"].shape[:3], dtype=torch.bool) if a["mask"] is None else a["mask"])[..., None]


def any_folded(name: str) -> Callable[[dict], bool]:
    """`applies` for poisoning `name` on a folded token."""
    return lambda a: bool(folded(a).expand(a[name].shape).any())


FOLD_BAD = [
    Bad("psi is None", lambda a, g: a.update(psi=None), TypeError, r"psi must be a tensor"),
    Bad("mask a list", lambda a, g: a.update(mask=[True]), TypeError, r"mask must be a tensor or None"),
    Bad("psi negative", lambda a, g: set_at(a["psi"], -1e-6, g, folded(a)), RuntimeError,
        r"psi must be finite and >= 0", any_folded("psi")),
    Bad("psi inf", lambda a, g: set_at(a["psi"], INF, g, folded(a)), RuntimeError, r"psi must be finite and >= 0",
        any_folded("psi")),
    Bad("v NaN", lambda a, g: set_at(a["v"], NAN, g, folded(a)), RuntimeError, r"v must be finite", any_folded("v")),
    Bad("psi bfloat16", lambda a, g: a.update(psi=a["psi"].bfloat16()), RuntimeError, r"psi must be Float"),
    Bad("v int32", lambda a, g: a.update(v=a["v"].int()), RuntimeError, r"v must be float32, bfloat16 or float16"),
    Bad("mask float", lambda a, g: a.update(mask=torch.ones(a["psi"].shape[:3])), RuntimeError, r"mask must be Bool"),
    Bad("mask one token more", lambda a, g: a.update(mask=torch.ones(*a["psi"].shape[:2], a["psi"].shape[2] + 1,
        dtype=torch.bool)), RuntimeError, r"mask must have shape"),
    Bad("v one token more", lambda a, g: a.update(v=torch.cat([a["v"], a["v"][:, :, :1]], dim=2)), RuntimeError,
        r"v must have shape", lambda a: a["v"].shape[2] > 0),
    Bad("psi 3-d", lambda a, g: a.update(psi=a["psi"][0]), RuntimeError, r"psi must have 4 dimensions",
        lambda a: a["psi"].shape[0] > 0),
]  # fmt: skip


@st.composite
def fold_calls(draw):
    gen = seeded(draw)
    args, clean = draw(fold_args(gen))
    if draw(st.booleans()):  # less_state_fold copies strided inputs (less_state_update_ does not)
        args["v"] = strided(args["v"])
    return args, clean, draw_bad(draw, FOLD_BAD, args), gen


def check_fold(args: dict, clean: dict) -> None:
    dH, dz = ops.less_state_fold(**args)
    ref_dH, ref_dz = ref.state_fold(**clean)
    assert dH.dtype == dz.dtype == torch.float32
    assert_close_ratio(dH, ref_dH, torch.float32, what="dH")
    assert_close_ratio(dz, ref_dz, torch.float32, what="dz")


def _z_inside_H(a: dict, g) -> None:
    a["z"] = a["H"].view(-1)[: a["z"].numel()].view(a["z"].shape)


UPDATE_BAD = FOLD_BAD + [
    Bad("z negative", lambda a, g: set_at(a["z"], -2.0, g), RuntimeError, r"z must be finite and >= 0", has("z")),
    Bad("H one rank more", lambda a, g: a.update(H=torch.zeros(*a["H"].shape[:2], a["H"].shape[2] + 1,
        a["H"].shape[3])), RuntimeError, r"H must have shape"),
    Bad("H strided", lambda a, g: a.update(H=strided(a["H"])), RuntimeError, r"H must be contiguous",
        lambda a: a["H"].shape[-1] > 1 and a["H"].numel() > 0),
    Bad("z float64", lambda a, g: a.update(z=a["z"].double()), RuntimeError, r"z must be Float"),
    Bad("v strided", lambda a, g: a.update(v=strided(a["v"])), RuntimeError, r"v must be contiguous",
        lambda a: a["v"].shape[-1] > 1 and a["v"].numel() > 0),
    Bad("z inside H", _z_inside_H, RuntimeError, r"H is updated in place and must not share memory with z", has("z")),
]  # fmt: skip


@st.composite
def update_calls(draw):
    gen = seeded(draw)
    args, clean = draw(fold_args(gen))
    B, Hkv, _, R = args["psi"].shape
    H = torch.randn(B, Hkv, R, args["v"].shape[-1], generator=gen)
    z = torch.rand(B, Hkv, R, generator=gen) * draw(st.sampled_from([0.0, 1.0, 1e30]))
    args, clean = dict(args, H=H, z=z), dict(clean, H=H.clone(), z=z.clone())
    return args, clean, draw_bad(draw, UPDATE_BAD, args), gen


def check_update(args: dict, clean: dict) -> None:
    assert ops.less_state_update_(**args) is None
    dH, dz = ref.state_fold(clean["psi"], clean["v"], clean["mask"])
    assert_close_ratio(args["H"], clean["H"] + dH, torch.float32, what="H")
    assert_close_ratio(args["z"], clean["z"] + dz, torch.float32, what="z")


# ---------------------------------------------------------------------------------------------------------------
# The fused decode step
# ---------------------------------------------------------------------------------------------------------------
def step_cache(draw, gen: torch.Generator, B: int, Hkv: int, S: int, D: int, R: int, T: int, budget: int,
               dtype: torch.dtype) -> SlotCache:  # fmt: skip
    """A cache as a stream leaves it: at most `budget` tokens per row at distinct positions below next_position
    (which may sit at the largest value a T-token call allows), scores on the occupied slots, a state."""
    cache = SlotCache.empty(B, Hkv, S, D, R, dtype)
    cache.k.copy_(torch.randn(B, Hkv, S, D, generator=gen))
    cache.v.copy_(torch.randn(B, Hkv, S, D, generator=gen))
    cache.psi.uniform_(generator=gen)
    next_position = draw(st.sampled_from([budget, budget + 9, MAX_POSITION - T]))
    cache.next_position.fill_(next_position)
    for row in cache.pos.view(B * Hkv, S):
        held = int(torch.randint(budget + 1, (), generator=gen))
        slots = torch.randperm(S, generator=gen)[:held]
        row[slots] = (next_position - 1 - torch.randperm(min(next_position, 4 * S), generator=gen)[:held]).int()
    cache.scores.uniform_(generator=gen).masked_fill_(cache.pos < 0, 0.0)
    if draw(st.booleans()):  # a non-zero state; otherwise the all-zero one of a fresh stream
        cache.H.copy_(torch.randn(B, Hkv, R, D, generator=gen))
        cache.z.uniform_(0.5, 1.0, generator=gen)
    return cache


@st.composite
def step_calls(draw):
    gen = seeded(draw)
    dtype = draw(st.sampled_from(DTYPES))
    B, Hkv, G = draw(st.integers(0, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    S, D, R, T = draw(st.integers(2, 8)), draw(st.sampled_from([1, 5, 16, 64])), draw(st.sampled_from([0, 1, 4])), \
        draw(st.integers(1, 3))  # fmt: skip
    budget = draw(st.integers(1, S - 1))
    policy, recent, sinks = draw_policy(draw, budget)
    cache = step_cache(draw, gen, B, Hkv, S, D, R, T, budget, dtype)
    q = (torch.randn(B, Hkv * G, T, D, generator=gen) * draw(st.sampled_from([0.0, 1.0, 4.0]))).to(dtype)
    k, v = (torch.randn(B, Hkv, T, D, generator=gen).to(dtype) for _ in range(2))
    phi = torch.rand(B, Hkv * G, T, R, generator=gen) if R else None
    psi = torch.rand(B, Hkv, T, R, generator=gen) if R else None
    valid = draw(st.sampled_from([None, 0.0, 0.7]))
    valid = None if valid is None else torch.rand(B, T, generator=gen) < valid  # 0.0: every token a pad token
    clean = dict(cache=cache, q=q, k=k, v=v, phi_q=phi, psi_k=psi, valid=valid, policy=policy, budget=budget,
                 recent=recent, sinks=sinks, scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))))  # fmt: skip
    if T == 1 and draw(st.booleans()):  # the single-token form
        clean.update({n: clean[n][:, :, 0] for n in ("q", "k", "v", "phi_q", "psi_k") if clean[n] is not None})
        clean["valid"] = None if valid is None else valid[:, 0]
    args = dict(clean, cache=clone_cache(cache))
    if valid is not None and draw(st.booleans()):  # a pad token's inputs are never read into a result
        pad = ~clean["valid"][:, None, ..., None]
        for name in ("q", "k", "v", "phi_q", "psi_k"):
            if args[name] is not None:
                args[name] = args[name].masked_fill(pad, NAN if name in ("q", "k", "v") else -1.0)
    if draw(st.booleans()):  # the wrapper copies strided token inputs
        args["q"], args["v"] = strided(args["q"]), strided(args["v"])
    return args, clean, draw_bad(draw, STEP_BAD, args), gen


def real_tokens(a: dict) -> Tensor:
    """Where a token is real, broadcastable to [B, H, T, X] (or [B, H, X] in the single-token form)."""
    if a["valid"] is None:
        return torch.ones(a["q"].shape[0], 1, *a["q"].shape[2:-1], 1, dtype=torch.bool)
    return a["valid"][:, None, ..., None]


def real(name: str) -> Callable[[dict], bool]:
    """`applies` for poisoning `name` on a real token."""
    return lambda a: a[name] is not None and a[name].numel() > 0 and bool(real_tokens(a).any())


def _too_many_held(a: dict, g) -> None:
    a.update(budget=int((a["cache"].pos >= 0).sum(-1).max()) - 1, recent=0, sinks=0)


def _budget_without_room(a: dict, g) -> None:
    a.update(budget=a["cache"].pos.shape[-1] + int(torch.randint(2, (), generator=g)))


def _more_query_heads(a: dict, g) -> None:
    shape = list(a["q"].shape)
    shape[1] += 1
    a["q"] = torch.zeros(shape, dtype=a["q"].dtype)


STEP_BAD = policy_bads() + [
    Bad("cache a dict", lambda a, g: a.update(cache=vars(a["cache"])), TypeError, r"cache must be a SlotCache"),
    Bad("q is None", lambda a, g: a.update(q=None), TypeError, r"q must be a tensor"),
    Bad("budget without room", _budget_without_room, RuntimeError, r"slots cannot hold the budget"),
    Bad("more held than the budget", _too_many_held, RuntimeError, r"pos holds \d+ tokens in row",
        lambda a: bool(((a["cache"].pos >= 0).sum(-1) >= 2).any())),
    Bad("next_position negative", lambda a, g: set_at(a["cache"].next_position, -1, g), RuntimeError,
        r"next_position must be in \[0, 2\^24 - T\]", lambda a: a["q"].shape[0] > 0),
    Bad("next_position past 2^24 - T", lambda a, g: set_at(a["cache"].next_position, MAX_POSITION, g), RuntimeError,
        r"next_position must be in \[0, 2\^24 - T\]", lambda a: a["q"].shape[0] > 0),
    Bad("phi_q negative", lambda a, g: set_at(a["phi_q"], -0.5, g, real_tokens(a)), RuntimeError,
        r"phi_q must be finite and >= 0", real("phi_q")),
    Bad("psi_k NaN", lambda a, g: set_at(a["psi_k"], NAN, g, real_tokens(a)), RuntimeError,
        r"psi_k must be finite and >= 0", real("psi_k")),
    Bad("q NaN", lambda a, g: set_at(a["q"], NAN, g, real_tokens(a)), RuntimeError, r"q must be finite", real("q")),
    Bad("k inf", lambda a, g: set_at(a["k"], INF, g, real_tokens(a)), RuntimeError, r"k must be finite", real("k")),
    Bad("v NaN", lambda a, g: set_at(a["v"], NAN, g, real_tokens(a)), RuntimeError, r"v must be finite", real("v")),
    Bad("z negative", lambda a, g: set_at(a["cache"].z, -1.0, g), RuntimeError, r"z must be finite and >= 0",
        lambda a: a["cache"].z.numel() > 0),
    Bad("valid int", lambda a, g: a.update(valid=torch.ones(a["q"].shape[0], *a["q"].shape[2:-1], dtype=torch.int32)),
        RuntimeError, r"valid must be Bool"),
    Bad("k_slots another dtype", lambda a, g: setattr(a["cache"], "k", a["cache"].k.to(other_dtype(a["q"].dtype))),
        RuntimeError, r"k_slots must be"),
    Bad("k_slots strided", lambda a, g: setattr(a["cache"], "k", strided(a["cache"].k)), RuntimeError,
        r"k_slots must be contiguous", lambda a: a["cache"].k.shape[-1] > 1 and a["cache"].k.numel() > 0),
    Bad("v_slots are k_slots", lambda a, g: setattr(a["cache"], "v", a["cache"].k), RuntimeError,
        r"k_slots is updated in place and must not share memory with v_slots", lambda a: a["cache"].k.numel() > 0),
    Bad("phi_q without psi_k", lambda a, g: a.update(psi_k=None), RuntimeError,
        r"phi_q and psi_k must be given together", lambda a: a["phi_q"] is not None),
    Bad("no feature maps for a state", lambda a, g: a.update(phi_q=None, psi_k=None), RuntimeError,
        r"phi_q and psi_k are needed for a rank-\d+ state", lambda a: a["phi_q"] is not None),
    Bad("query heads not a multiple", _more_query_heads, RuntimeError, r"must be a multiple of KV heads",
        lambda a: a["k"].shape[1] > 1),
    Bad("a single token's k with a T axis", lambda a, g: a.update(k=a["k"][:, :, None]), ValueError,
        r"with a single token's q", lambda a: a["q"].dim() == 3),
    Bad("scale NaN", lambda a, g: a.update(scale=NAN), ValueError, r"scale must be a finite number"),
]  # fmt: skip


def check_step(args: dict, clean: dict) -> None:
    cache, expected = args["cache"], clean["cache"]
    out = ops.less_decode_step_(**args)
    scale = ops.default_scale(clean["q"], clean["scale"])
    names = ("q", "k", "v", "phi_q", "psi_k", "valid")
    ref_out = reference_steps(expected, *(clean[n] for n in names), scale, policy_id(clean["policy"]),
                              clean["budget"], clean["recent"], clean["sinks"])  # fmt: skip
    assert torch.equal(cache.pos, expected.pos), "positions (victims) differ"
    assert torch.equal(cache.next_position, expected.next_position), "next positions differ"
    real = real_tokens(clean).expand(out.shape)
    assert_close_ratio(out[real], ref_out[real], what="out of the real tokens")
    held = cache.pos >= 0
    for name in ("k", "v", "psi"):  # copies of the tokens: exact where a token is held
        assert torch.equal(getattr(cache, name)[held], getattr(expected, name)[held]), f"{name} slots differ"
    assert_close_ratio(cache.scores, expected.scores, torch.float32, what="scores")
    assert_close_ratio(cache.H, expected.H, torch.float32, what="H")
    assert_close_ratio(cache.z, expected.z, torch.float32, what="z")


# ---------------------------------------------------------------------------------------------------------------
# Feature maps (inference form) against LayerFeatureMaps.phi / .psi
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def feature_map_calls(draw):
    gen = seeded(draw)
    dtype = draw(st.sampled_from(DTYPES))
    B, Hkv, G, T = draw(st.integers(0, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 3))
    D, E, R = draw(st.integers(1, 8)), draw(st.integers(1, 6)), draw(st.integers(1, 4))  # LayerFeatureMaps needs R > 0
    layer = LayerFeatureMaps(Hkv * G, Hkv, D, E, R)
    with torch.no_grad():  # from `gen`, at about their initial scale; psi's [Hkv, 1, R] scales in (-1, 1)
        for p in layer.parameters():
            bound = 1.0 if p.shape[1] == 1 else (3.0 / (p.shape[1] + p.shape[2])) ** 0.5
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    q, k = torch.randn(B, Hkv * G, T, D, generator=gen).to(dtype), torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
    if draw(st.booleans()):  # strided q, k are fine: the op reads them through a contiguous fp32 copy
        q, k = strided(q), strided(k)
    args = dict(q=q, k=k, weights=list(layer.inference_weights()))
    return args, layer, draw_bad(draw, FEATURE_MAP_BAD, args), gen


def _weight(i: int, change: Callable[[Tensor], Optional[Tensor]]) -> Callable[[dict, torch.Generator], None]:
    def apply(a: dict, g) -> None:
        a["weights"] = [change(w) if j == i else w for j, w in enumerate(a["weights"])]

    return apply


FEATURE_MAP_BAD = [
    Bad("q int32", lambda a, g: a.update(q=a["q"].int(), k=a["k"].int()), RuntimeError, r"q must be float32"),
    Bad("q float64", lambda a, g: a.update(q=a["q"].double(), k=a["k"].double()), RuntimeError, r"q must be float32"),
    Bad("k another dtype", lambda a, g: a.update(k=a["k"].to(other_dtype(a["q"].dtype))), RuntimeError,
        r"k must be (BFloat16|Half|Float)"),
    Bad("q 3-d", lambda a, g: a.update(q=a["q"][0]), RuntimeError, r"q and k must be \[B, heads, T, D\]",
        lambda a: a["q"].shape[0] > 0),
    Bad("k one token more", lambda a, g: a.update(k=torch.cat([a["k"], a["k"][:, :, :1]], dim=2)), RuntimeError,
        r"less_cuda: k must", lambda a: a["k"].shape[2] > 0),
    Bad("head_dim 0", lambda a, g: a.update(q=a["q"][..., :0], k=a["k"][..., :0]), RuntimeError,
        r"head_dim must be positive"),
    Bad("phi_w1 float64", _weight(0, Tensor.double), RuntimeError, r"phi_w1 must"),
    Bad("psi_scale one rank more", _weight(4, lambda w: torch.cat([w, w[..., :1]], dim=-1)), RuntimeError,
        r"psi_scale must", lambda a: a["weights"][4].shape[-1] > 0),
    Bad("psi_interaction strided", _weight(5, strided), RuntimeError, r"psi_interaction must",
        lambda a: a["weights"][5].shape[-1] > 1),
    Bad("a weight missing", lambda a, g: a.update(weights=a["weights"][:-1]), RuntimeError,
        r"psi_interaction_scale"),
    Bad("a weight is None", _weight(0, lambda w: None), TypeError, r"weights\[0\] must be a tensor"),
]  # fmt: skip


def call_feature_maps(q: Tensor, k: Tensor, weights: list) -> tuple[Tensor, Tensor]:
    return ops.less_feature_maps(q, k, *weights)


def check_feature_maps(args: dict, layer: LayerFeatureMaps) -> None:
    phi, psi = call_feature_maps(**args)
    with torch.no_grad():
        expected = layer.phi(args["q"]), layer.psi(args["k"])
    assert_close_ratio(phi, expected[0], torch.float32, what="phi")
    assert_close_ratio(psi, expected[1], torch.float32, what="psi")


# ---------------------------------------------------------------------------------------------------------------
# One test per op
# ---------------------------------------------------------------------------------------------------------------
FUZZED = {  # op -> (cases, the public entry point, the valid side's check)
    "decode_attention": (attention_calls(), ops.less_decode_attention, check_attention),
    "score_and_evict_": (evict_calls(), ops.less_score_and_evict_, check_evict),
    "state_fold": (fold_calls(), ops.less_state_fold, check_fold),
    "state_update_": (update_calls(), ops.less_state_update_, check_update),
    "decode_step_": (step_calls(), ops.less_decode_step_, check_step),
    "feature_maps": (feature_map_calls(), call_feature_maps, check_feature_maps),
}


@pytest.mark.parametrize("op", list(FUZZED))
def test_fuzz(op: str) -> None:
    cases, call, check = FUZZED[op]

    @given(cases)
    def fuzz(case: tuple) -> None:
        run_case(op, call, case, check)

    CASES[op, "valid"] = CASES[op, "invalid"] = 0
    fuzz()
    valid, invalid = CASES[op, "valid"], CASES[op, "invalid"]
    print(f"{op}: {valid + invalid} cases ({valid} valid, {invalid} invalid)")
    assert valid + invalid >= MIN_CASES and min(valid, invalid) >= MIN_CASES // 4
