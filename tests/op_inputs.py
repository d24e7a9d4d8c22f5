"""Random arguments for the ops and kernels, shared by the CPU-op, CUDA-harness, GPU and isolation tests."""

from __future__ import annotations

import torch

from less_cuda.core import reference as ref
from less_cuda.core.state import SlotCache


def decode_inputs(B, Hkv, G, S, D, R, dtype, fill, seed, empty_row=False):
    """Random decode inputs: a fraction `fill` of the slots occupied (at distinct positions), a state folded from
    random tokens (so it is a consistent, non-negative one) when R > 0, row (0, 0) fully empty if asked."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    positions = torch.stack([torch.randperm(4 * S, generator=gen)[:S] for _ in range(B * Hkv)]).view(B, Hkv, S)
    occupied = torch.rand(B, Hkv, S, generator=gen) < fill
    pos = torch.where(occupied, positions, ref.EMPTY).to(torch.int32)
    if empty_row:
        pos[0, 0] = ref.EMPTY
    state = (None, None, None)
    if R:
        psi = torch.rand(B, Hkv, 20, R, generator=gen)
        H, z = ref.state_fold(psi, torch.randn(B, Hkv, 20, D, generator=gen), None)
        state = (torch.rand(B, Hkv * G, R, generator=gen), H, z)
    return q, k, v, pos, *state, D**-0.5


def harness_decode_inputs(B, Hkv, G, S, D, R, dtype, seed, empty_frac=0.25):
    """Random decode inputs with free slots (pos -1, garbage K/V) and, for b = 0, h = 0, no occupied slot at all."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, S, D, generator=g) * 1.5).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    pos = torch.randperm(B * Hkv * S, generator=g).view(B, Hkv, S).to(torch.int32)
    pos[torch.rand(B, Hkv, S, generator=g) < empty_frac] = ref.EMPTY
    if S:
        pos[0, 0] = ref.EMPTY
    lowrank = None
    if R:
        phi_q = torch.rand(B, Hkv * G, R, generator=g)
        H = torch.randn(B, Hkv, R, D, generator=g) * 3
        z = torch.rand(B, Hkv, R, generator=g) * 4
        lowrank = (phi_q, H, z)
    return q, k, v, pos, lowrank


def step_inputs(B, Hkv, G, S, D, R, dtype, seed, *, held=None, pad=(), full=(), empty=(), tied_scores=False):
    """A layer's slots mid-stream and its next token. Each (b, h) holds `held` tokens (default S - 1, the steady state:
    inserting one puts it over a budget of S - 1) at distinct random positions in random slots, the rest free with
    garbage K/V. Rows (b, h) in `full` have no free slot (the token overwrites slot 0), rows in `empty` none held;
    batch rows in `pad` get a pad token. Returns (cache, q, k, v, phi_q, psi_k, valid) for one token."""
    g = torch.Generator().manual_seed(seed)
    cache = SlotCache.empty(B, Hkv, S, D, R, dtype)
    cache.k.copy_((torch.randn(B, Hkv, S, D, generator=g) * 1.5).to(dtype))
    cache.v.copy_(torch.randn(B, Hkv, S, D, generator=g).to(dtype))
    cache.psi.copy_(torch.rand(B, Hkv, S, R, generator=g))
    held = S - 1 if held is None else held
    for b in range(B):
        for h in range(Hkv):
            n = S if (b, h) in full else 0 if (b, h) in empty else held
            slot = torch.randperm(S, generator=g)[:n]
            cache.pos[b, h, slot] = torch.randperm(4 * S, generator=g)[:n].to(torch.int32)
    occupied = cache.pos >= 0
    scores = torch.ones(B, Hkv, S) if tied_scores else torch.rand(B, Hkv, S, generator=g) * 3
    cache.scores.copy_(torch.where(occupied, scores, torch.zeros_like(scores)))
    cache.H.copy_(torch.randn(B, Hkv, R, D, generator=g) * 3)
    cache.z.copy_(torch.rand(B, Hkv, R, generator=g) * 4)
    cache.next_position.copy_((cache.pos.amax(dim=(1, 2)) + 1).clamp(min=0))
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, D, generator=g) * 1.5).to(dtype)
    v = torch.randn(B, Hkv, D, generator=g).to(dtype)
    phi_q = torch.rand(B, Hkv * G, R, generator=g) if R else None
    psi_k = torch.rand(B, Hkv, R, generator=g) if R else None
    valid = torch.tensor([b not in pad for b in range(B)]) if pad else None
    return cache, q, k, v, phi_q, psi_k, valid


def random_cache(B, Hkv, S, D, R, dtype, occupied, gen):
    """A cache whose first `occupied` slots of each row hold distinct positions (shuffled), the rest free."""
    cache = SlotCache.empty(B, Hkv, S, D, R, dtype)
    cache.k.copy_(torch.randn(B, Hkv, S, D, generator=gen))
    cache.v.copy_(torch.randn(B, Hkv, S, D, generator=gen))
    cache.psi.uniform_(generator=gen)
    cache.scores.uniform_(generator=gen)
    cache.H.copy_(torch.randn(B, Hkv, R, D, generator=gen))
    cache.z.uniform_(0.5, 1.0, generator=gen)
    for b in range(B):
        for h in range(Hkv):
            slots = torch.randperm(S, generator=gen)[:occupied]
            cache.pos[b, h, slots] = torch.randperm(2 * S, generator=gen)[:occupied].int()
    cache.scores.masked_fill_(cache.pos < 0, 0.0)
    cache.next_position.fill_(3 * S)
    return cache


def new_token(B, Hq, Hkv, D, R, dtype, gen):
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    k, v = (torch.randn(B, Hkv, D, generator=gen).to(dtype) for _ in range(2))
    return q, k, v, torch.rand(B, Hq, R, generator=gen), torch.rand(B, Hkv, R, generator=gen)


def paged_pool(rows: int, Hkv: int, S: int, D: int, R: int, dtype: torch.dtype, gen) -> SlotCache:
    """A pool of `rows` states laid out as vLLM lays out a request's state: all of one row's fields in one page of a
    byte buffer (SlotCache's field order), each field an as_strided view whose rows are a page apart. Every byte starts
    random, NaNs included, as memory vLLM hands over does: a step must read and write only the rows it is given."""
    shapes = dict(k=(Hkv, S, D), v=(Hkv, S, D), psi=(Hkv, S, R), pos=(Hkv, S), scores=(Hkv, S), H=(Hkv, R, D),
                  z=(Hkv, R), next_position=())  # fmt: skip
    dtypes = dict(k=dtype, v=dtype, pos=torch.int32, next_position=torch.int32)
    sizes = {name: torch.Size(shape).numel() * dtypes.get(name, torch.float32).itemsize for name, shape in shapes.items()}
    page = -(-sum(sizes.values()) // 8) * 8
    raw = torch.randint(0, 256, (rows * page,), dtype=torch.uint8, generator=gen)
    fields, offset = {}, 0
    for name, shape in shapes.items():
        field_dtype = dtypes.get(name, torch.float32)
        size = field_dtype.itemsize
        contiguous = torch.empty(rows, *shape).stride()
        fields[name] = torch.as_strided(raw.view(field_dtype), (rows, *shape), (page // size, *contiguous[1:]),
                                        offset // size)  # fmt: skip
        offset += sizes[name]
    return SlotCache(**fields)


def place_rows(pool: SlotCache, rows: torch.Tensor, cache: SlotCache) -> None:
    """Writes `cache`'s batch rows into the pool's rows `rows`."""
    for name, field in vars(pool).items():
        field[rows] = getattr(cache, name)
