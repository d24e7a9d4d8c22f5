"""What a compressed layer does when it first sees a prompt: exact attention with the H2O scores in one pass, then
the compression of the prompt into slots and state.

`prefill_attention` computes exact causal attention over the prompt and, from the very same probabilities, the H2O
scores the policy ranks the prompt's tokens by: the column sums that `reference.prefill_scores` defines, or the
window scores of `reference.prefill_window_scores` (the same sums over the last W query rows only, max-pooled), so
compression costs no second attention pass.
`compress_prompt` keeps what the policy keeps and folds every other token into H, z; `LessCache` and the vLLM
plugin both call it.

Layout (one layer): q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]; the G = Hq // Hkv query heads of KV head
h are q[:, h*G:(h+1)*G] (transformers' `repeat_kv` convention), so their rows stack into one plain matrix per
(b, h) and each step is a batched matmul over (b, h).

The work is split into steps of `chunk` query rows and a group of batch rows. A step meets only the key columns its
rows can see (0 .. end of the chunk), so the probability block is at most [nb, Hq, chunk, T] and small enough that
logits, softmax, probs @ v and the column sums run on cached data (`_batch_rows_per_step` sizes the group).
Per step: 1 matmul for the logits, 1 mask of the causal corner, 1 in-place softmax, 1 matmul for the output and
1 reduction for the column sums (window scores: a row-weighted one, a matrix-vector product, only in the steps that
reach the window).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import state
from .ops import less_state_update_
from .policy import ResolvedPolicy
from .ranking import WINDOW_POOL, window_rows

DEFAULT_CHUNK = 64
"""Query rows per step on CPU. Measured on SmolLM2's shape (9 / 3 heads, D 64; B 8 x 2k and B 1 x 1k tokens):
64 rows (192 per matmul with G = 3) beat 32 (smaller matmuls, twice the steps) and 128 or more (blocks that
leave the cache)."""
CUDA_CHUNK = 256
"""Query rows per step elsewhere: a GPU wants big matmuls, and its memory holds the larger block."""
BLOCK_ELEMS = 1 << 23
"""Largest probability block per step, in elements (32 MiB fp32): caps the batch rows of one step."""


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float, chunk: Optional[int] = None,
                      window: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Causal attention over a prompt and the H2O scores of its probabilities, in one pass.

    q [B, Hq, T, D]; k [B, Hkv, T, D]; v [B, Hkv, T, Dv]; valid [B, T] bool (False on padding); scale the logit
    scale; chunk query rows per step (None: a per-device default); window: None for the column sums, or W >= 1
    for the window scores (`ResolvedPolicy.prompt_window`).
    Returns out [B, Hq, T, Dv] in q's dtype (a transposed view of a contiguous [B, T, Hq, Dv] tensor, the layout
    transformers wants back) and scores [B, Hkv, T] fp32.
    out: real query rows attend to the real keys at or before them (as sdpa with the causal and padding mask);
    pad query rows are 0. scores: the column sums of those probabilities over query rows and the G query heads of
    each KV head (`reference.prefill_scores`), or with a window the same sums over each batch row's last W real
    query rows only, max-pooled over positions (`reference.prefill_window_scores`); 0 on padding. Math in fp32
    whatever q's dtype.
    """
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 query row, got {window}")
    out, scores, _ = _run(_Pass(q, k, v, valid, scale, chunk, window, None))
    return out, scores


def prefill_rankings(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float, row_weights: Tensor,
                     chunk: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """`prefill_attention` with the column sums, and besides them the same probabilities summed with N other weights
    over the query rows: what several rankings of one prompt need from a single pass (`hf.prompt_record`).

    row_weights [N, B, T] fp32 (e.g. 1 on the rows of a prefix, or on a window's rows). Returns out [B, Hq, T, Dv],
    column sums [B, Hkv, T] (bit for bit `prefill_attention`'s) and the weighted sums [N, B, Hkv, T], unpooled
    (`pool_window` turns a window's sums into its scores); 0 on padding.
    """
    if row_weights.dim() != 3 or row_weights.shape[1:] != valid.shape:
        raise ValueError(f"row_weights must be [N, B, T] for valid {list(valid.shape)}, got {list(row_weights.shape)}")
    return _run(_Pass(q, k, v, valid, scale, chunk, None, row_weights.to(torch.float32)))


def pool_window(sums: Tensor) -> Tensor:
    """Window scores from a window's summed probabilities [..., T]: max-pooled over positions (`WINDOW_POOL`)."""
    shape = sums.shape
    pooled = F.max_pool1d(sums.reshape(-1, 1, shape[-1]), WINDOW_POOL, stride=1, padding=WINDOW_POOL // 2)
    return pooled.view(shape)


def _run(one_pass: "_Pass") -> tuple[Tensor, Tensor, Optional[Tensor]]:
    for b0 in range(0, one_pass.q.shape[0], one_pass.nb):
        one_pass.attend_group(b0, min(b0 + one_pass.nb, one_pass.q.shape[0]))
    return one_pass.finish()


class _Pass:
    """The state of one `prefill_attention` call: the inputs in the layouts the matmuls read, the outputs, and
    buffers for the largest step, reused by every step (sliced to the step's shape)."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float, chunk: Optional[int],
                 window: Optional[int], row_weights: Optional[Tensor]):
        B, Hq, T, D = q.shape
        self.Hkv, self.Dv = k.shape[1], v.shape[-1]
        self.G = Hq // self.Hkv
        if chunk is None:
            chunk = DEFAULT_CHUNK if q.device.type == "cpu" else CUDA_CHUNK
        self.chunk = max(1, min(chunk, T))
        self.nb = _batch_rows_per_step(B, self.Hkv, Hq * self.chunk * T, q.device)
        self.q, self.valid, self.scale, self.window = q, valid, scale, window
        f32 = dict(dtype=torch.float32, device=q.device)
        # One copy each, in the layouts the matmuls read: k^T per (b, h) and contiguous v (transformers hands both
        # over as strided views of the projections).
        self.kt = k.to(torch.float32).transpose(-1, -2).contiguous()
        self.vf = v.to(torch.float32).contiguous()
        self.out = torch.empty(B, T, Hq, self.Dv, dtype=q.dtype, device=q.device)
        self.scores = torch.zeros(B, self.Hkv, T, **f32)
        self.probs_buf = torch.empty(self.nb * Hq * self.chunk * T, **f32)
        self.q_buf = torch.empty(self.nb * Hq * self.chunk * D, **f32)
        self.o_buf = torch.empty(self.nb * Hq * self.chunk * self.Dv, **f32)
        self.upper = torch.ones(self.chunk, self.chunk, dtype=torch.bool, device=q.device).triu_(1)
        self.in_place = q.device.type == "cpu"  # the CPU softmax kernel is verified safe in place (test_prefill.py)
        self.padded = not bool(valid.all())
        if window is not None:
            in_window, self.first = window_rows(valid, window)  # steps ending before `first` add nothing
            self.row_weight = in_window.to(torch.float32)
        self.row_weights = row_weights
        self.weighted = None if row_weights is None else torch.zeros(row_weights.shape[0], B, self.Hkv, T, **f32)

    def attend_group(self, b0: int, b1: int) -> None:
        """Every step of batch rows b0..b1-1: `chunk` query rows at a time against the key columns they can see."""
        q, G, Hkv, Dv = self.q, self.G, self.Hkv, self.Dv
        T, D = q.shape[2], q.shape[3]
        n_b = b1 - b0
        bh = n_b * Hkv
        kt_g = self.kt[b0:b1].view(bh, D, T)
        v_g = self.vf[b0:b1].view(bh, T, Dv)
        scores_g = self.scores[b0:b1].view(bh, 1, T)
        if self.padded:
            valid_g = self.valid[b0:b1]
            pad_list = (~valid_g).any(dim=0).tolist()  # a pad row or column in some row; one host sync per group
            pad_end = T - pad_list[::-1].index(True) if any(pad_list) else 0
        for s in range(0, T, self.chunk):
            e = min(s + self.chunk, T)
            n = e - s
            rows = G * n
            qc = self.q_buf[: bh * rows * D].view(n_b, Hkv, G, n, D)
            qc.copy_(q[b0:b1, :, s:e].view(n_b, Hkv, G, n, D))
            logits = self.probs_buf[: bh * rows * e].view(bh, rows, e)
            # beta=0: the buffer's stale contents are never read.
            torch.baddbmm(logits, qc.view(bh, rows, D), kt_g[:, :, :e], beta=0, alpha=self.scale, out=logits)
            blocks = logits.view(n_b, Hkv, G, n, e)
            blocks[..., s:e].masked_fill_(self.upper[:n, :n], -math.inf)  # causal: only this corner sees the future
            if self.padded:
                _mask_padding(blocks, valid_g, s, e, e if any(pad_list[s:e]) else min(e, pad_end))
            probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits) if self.in_place else logits.softmax(-1)
            oc = self.o_buf[: bh * rows * Dv].view(bh, rows, Dv)
            torch.bmm(probs, v_g[:, :e], out=oc)
            if self.window is None:
                scores_g[..., :e] += probs.sum(dim=1, keepdim=True)
            elif e > self.first:  # sum the window's rows alone: a 0/1 row vector times the block
                weight = self.row_weight[b0:b1, None, None, s:e].expand(n_b, Hkv, G, n).reshape(bh, 1, rows)
                scores_g[..., :e] += torch.bmm(weight, probs)
            if self.row_weights is not None:  # N weighted row sums at once: [bh, N, rows] times the block
                N = self.row_weights.shape[0]
                weight = self.row_weights[:, b0:b1, None, None, s:e].expand(N, n_b, Hkv, G, n)
                sums = torch.bmm(weight.permute(1, 2, 0, 3, 4).reshape(bh, N, rows), probs)
                self.weighted[:, b0:b1, :, :e] += sums.view(n_b, Hkv, N, e).permute(2, 0, 1, 3)
            self.out[b0:b1, s:e].view(n_b, n, Hkv, G, Dv).copy_(oc.view(n_b, Hkv, G, n, Dv).permute(0, 3, 1, 2, 4))

    def finish(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(out [B, Hq, T, Dv], scores [B, Hkv, T], weighted sums [N, B, Hkv, T] or None) once every group is
        done."""
        out, scores, valid, weighted = self.out, self.scores, self.valid, self.weighted
        if self.window is not None:  # pad columns hold 0 here (no window row sees one), which a max pool leaves alone
            scores = pool_window(scores)
        if self.padded:
            # Pad rows attended to themselves only (see _mask_padding), and the pool spread into pad columns: clear.
            out.masked_fill_(~valid[:, :, None, None], 0.0)
            scores.masked_fill_(~valid[:, None, :], 0.0)
            if weighted is not None:
                weighted.masked_fill_(~valid[None, :, None, :], 0.0)
        return out.transpose(1, 2), scores, weighted


def _batch_rows_per_step(B: int, Hkv: int, elems_per_row: int, device: torch.device) -> int:
    """How many batch rows one step takes, given the probability elements one batch row adds to the block.

    On CPU each matmul splits its nb * Hkv (b, h) matrices over the threads, so nb is the fewest rows that make
    that count a multiple of the thread count: 3 KV heads on 2 threads took 1.5x as long as 6 (SmolLM2, B 8 x 2k
    and 4k), and more rows than that only push the block out of cache. Elsewhere: as many as fit the block cap.
    """
    fit = max(1, BLOCK_ELEMS // max(1, elems_per_row))
    if device.type != "cpu":
        return min(B, fit)
    threads = torch.get_num_threads()
    return max(1, min(B, fit, threads // math.gcd(Hkv, threads)))


def _mask_padding(blocks: Tensor, valid: Tensor, s: int, e: int, width: int) -> None:
    """Mask the padding of one step's logits in place: blocks [nb, Hkv, G, n, e] for query rows s..e-1.

    A real row must not see pad columns. A pad row is left its own diagonal alone rather than nothing, so that no
    softmax row is all -inf (NaN) and its one-hot probability lands on a pad column, whose score is cleared at the
    end. Only the first `width` columns can need a mask: all of them when the step has pad rows, else those up to
    the last pad column of the group.
    """
    if width == 0:
        return
    rows = torch.arange(s, e, device=valid.device)[:, None]
    cols = torch.arange(width, device=valid.device)
    row_real = valid[:, s:e, None]
    visible = (row_real & valid[:, None, :width]) | (~row_real & (cols == rows))  # [nb, n, width]
    blocks[..., :width].masked_fill_(~visible[:, None, None], -math.inf)


@torch.no_grad()
def compress_prompt(
    k: Tensor, v: Tensor, psi: Tensor, valid: Tensor, scores: Tensor, resolved: ResolvedPolicy
) -> state.SlotCache:
    """A prompt's compressed cache. k, v [B, Hkv, T, D]; psi [B, Hkv, T, R] fp32 (R = 0 without feature maps);
    valid [B, T] bool; scores [B, Hkv, T] fp32, the H2O prefill scores of `resolved.prompt_window` (column sums or
    window scores, from `prefill_attention`; zeros under Λ, which orders by position alone). The kept tokens start
    decoding with these scores, so the decode rule goes on ranking by what chose them: had the window's picks
    started from their column sums instead, a fact seen once would rank lowest and go in the first decode steps.

    The policy keeps `resolved.budget` tokens per row and KV head in `resolved.num_slots` slots, in position order;
    every other real token is folded into H, z in one call. Positions count real tokens only.
    """
    B, Hkv, T, D = k.shape
    keep = state.prefill_keep(scores, valid, *resolved.as_args())
    positions = state.token_positions(valid)[:, None, :].expand(B, Hkv, T)
    slot_k, slot_v, slot_psi, slot_scores, slot_pos, index = state.gather_tokens(
        keep, resolved.num_slots, k, v, psi, scores, positions
    )
    R = psi.shape[-1]
    H = torch.zeros(B, Hkv, R, D, dtype=torch.float32, device=k.device)
    z = torch.zeros(B, Hkv, R, dtype=torch.float32, device=k.device)
    if R:
        less_state_update_(H, z, psi.contiguous(), v.contiguous(), valid[:, None, :] & ~keep)
    pos = torch.where(index >= 0, slot_pos, state.EMPTY).to(torch.int32)
    return state.SlotCache(slot_k, slot_v, slot_psi, pos, slot_scores, H, z, valid.sum(dim=-1).to(torch.int32))
