"""Fitting the LESS feature maps φ/ψ of a frozen model, layer by layer (`less-cuda train`, or
`python -m less_cuda train`; `torchrun --nproc_per_node N -m less_cuda train ...` shards the layers over N processes).

Objective (per full-attention layer, trained independently): the MSE between o_proj(LESS attention output) and
o_proj(full attention output), at the positions where the policy has evicted something (t >= budget + 1; before
that LESS is exact). Teacher forcing: every layer sees the hidden states of the unmodified model, so one forward
pass captures each layer's post-RoPE q, k, v, and the layers never interact.

The LESS output for the loss is the decode step of the compressed cache, run for all T steps of a sequence at once
through the package's ops (`step_attention`): which tokens sit in the slots at step t comes from the policy code
used at inference (`slots.stream_kept_masks` driven by `ops.less_decode_attention` /
`ops.less_score_and_evict_`), and the state H_t, z_t is the fold (`ops.less_state_fold`) of every token evicted
before step t. The policy's choices do not depend on φ/ψ, so they are computed once per layer; a decode step then
costs O((S + R) D) instead of the O(T D) per row of the masked parallel form (`reference.parallel_attention`), which
the tests check it against, together with a literal token-by-token decode loop. A training step scores a random
subset of a sequence's decode steps (`--positions`); validation scores all of them.

Outputs: `<output>/config.json` + `kernels.safetensors` (`FeatureMaps.save_pretrained`) and `report.json` (per-layer
validation MSE of the sparse policy alone, of Baseline+ and of LESS). Progress for resuming lives in
`<output>/progress` until the run completes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import ops, slots
from .cache import model_layout
from .data import tokenizer_splits
from .evaluate import attention_function, baseline_plus
from .feature_maps import FeatureMaps, FeatureMapsConfig, LayerFeatureMaps
from .models import DTYPES, load_model
from .policy import ResolvedPolicy
from .train_config import TrainConfig

CAPTURE_ATTENTION = "less_capture"
PROGRESS_DIR = "progress"


def attention_layers(model_config) -> list[int]:
    """Indices of the full-attention layers (all of them for Llama; hybrid models list `layer_types`)."""
    config = model_config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


# ---------------------------------------------------------------------------------------------------------------
# Capture: what each layer's attention sees in the unmodified model
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LayerCapture:
    """One layer's attention inputs over N sequences: q [N, Hq, T, D], k, v [N, Hkv, T, D] (post-RoPE, model
    dtype); the logit scale; o_proj [hidden, Hq * D], the frozen output projection the loss is measured through."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    o_proj: Tensor


@torch.no_grad()
def capture(
    model, sequences: Tensor, layers: list[int], batch_size: int, desc: str = "capture"
) -> dict[int, LayerCapture]:
    """Run the frozen model (exact attention) over sequences [N, T] and keep the q, k, v of `layers` (on the CPU)."""
    captures: dict[int, LayerCapture] = {}
    rows = slice(0, 0)  # the sequences of the current batch

    def record(module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        if layer in layers:
            if layer not in captures:  # filled in place: concatenating per-batch pieces would need twice the memory
                empty = lambda t: t.new_empty(len(sequences), *t.shape[1:], device="cpu")  # noqa: E731
                scale = query.shape[-1] ** -0.5 if scaling is None else scaling
                captures[layer] = LayerCapture(empty(query), empty(key), empty(value), scale,
                                               module.o_proj.weight.detach().float().cpu())
            captures[layer].q[rows], captures[layer].k[rows], captures[layer].v[rows] = query, key, value
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    device = next(model.parameters()).device
    base = model.get_decoder()  # the logits are not needed
    with attention_function(model, record, CAPTURE_ATTENTION):
        for first in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch", leave=False):
            rows = slice(first, first + batch_size)
            base(input_ids=sequences[rows].to(device), use_cache=False)
    return captures


# ---------------------------------------------------------------------------------------------------------------
# The policy's decisions and the LESS output of every decode step
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PolicySteps:
    """What the policy did over B sequences of T tokens, for one layer.

    slots [B, T, Hkv, S] int32: the tokens (indices into T, in position order) that occupy the S = budget + 1 slots
        during step t's attention, EMPTY for a free slot.
    evicted_at [B, Hkv, T] int64: the first step whose attention no longer sees the token (T if it never leaves);
        the state H_t, z_t of step t holds exactly the tokens with evicted_at <= t.
    """

    slots: Tensor
    evicted_at: Tensor

    def select(self, index: Tensor) -> "PolicySteps":
        return PolicySteps(self.slots[index], self.evicted_at[index])


def policy_steps(q: Tensor, k: Tensor, scale: float, policy: ResolvedPolicy) -> PolicySteps:
    """Run the policy over q [B, Hq, T, D], k [B, Hkv, T, D] through the compiled ops, as the cache does."""
    kept = slots.stream_kept_masks(
        q, k, scale, *policy.as_args(), attend=ops.less_decode_attention, evict_=ops.less_score_and_evict_
    )  # [B, Hkv, T, T]
    B, Hkv, T, _ = kept.shape
    (slot_index,) = slots.gather_tokens(kept.transpose(1, 2).reshape(B * T, Hkv, T), policy.num_slots)
    # Eviction is final, so the evicted sets grow step by step and one step index per token describes them all.
    evicted = torch.ones(T, T, dtype=torch.bool, device=kept.device).tril() & ~kept
    left = evicted.any(dim=2)
    first = evicted.to(torch.int8).argmax(dim=2)
    evicted_at = torch.where(left, first, torch.full_like(first, T))
    return PolicySteps(slot_index.view(B, T, Hkv, -1), evicted_at)


def batched_policy_steps(q: Tensor, k: Tensor, scale: float, policy: ResolvedPolicy, desc: str,
                         batch_size: int = 8) -> PolicySteps:
    """`policy_steps` over N sequences, `batch_size` at a time (the policy's token-by-token loop costs about the same
    for one sequence as for eight)."""
    pieces = [policy_steps(q[first : first + batch_size], k[first : first + batch_size], scale, policy)
              for first in tqdm(range(0, len(q), batch_size), desc=desc, unit="batch", leave=False)]
    return PolicySteps(torch.cat([p.slots for p in pieces]), torch.cat([p.evicted_at for p in pieces]))


def _by_step(x: Tensor) -> Tensor:
    """[B, H, T, ...] -> [B * T, H, ...]: every step becomes a batch row of the decode ops."""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], x.shape[1], *x.shape[3:])


def step_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    steps: PolicySteps,
    phi_q: Optional[Tensor],
    psi_k: Optional[Tensor],
    scale: float,
    at: Optional[Tensor] = None,
) -> Tensor:
    """The compressed cache's decode output at many steps at once.

    k, v [B, Hkv, T, D] and psi_k [B, Hkv, T, R]: every token; steps from `policy_steps`; at [M] int64, increasing:
    the steps to compute (default all T); q [B, Hq, M, D] and phi_q [B, Hq, M, R]: the queries of those steps.
    phi_q and psi_k may both be None for the sparse policy alone. Returns out [B, Hq, M, D] in q's dtype,
    differentiable in phi_q and psi_k: row m is `ops.less_decode_attention` of the query over the slots of step at[m]
    and the state of the tokens evicted before it, exactly what `reference.decode_step` computes at that step.
    """
    B, Hq, M, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    slots = steps.slots if at is None else steps.slots[:, at]  # [B, M, Hkv, S]
    S = slots.shape[-1]
    arange = lambda n: torch.arange(n, device=q.device)  # noqa: E731
    # Row indices into k, v viewed as [B * Hkv * T, D]: whole-row copies, much cheaper than an element-wise gather.
    rows = (slots.clamp(min=0).long() + ((arange(B)[:, None] * Hkv + arange(Hkv)) * T)[:, None, :, None]).view(-1)
    k_slots = k.reshape(-1, D).index_select(0, rows).view(B * M, Hkv, S, D)
    v_slots = v.reshape(-1, D).index_select(0, rows).view(B * M, Hkv, S, D)
    state: tuple[Optional[Tensor], ...] = (None, None, None)
    if phi_q is not None:
        R = psi_k.shape[-1]
        # What each token adds to the state (its own fold), binned by the first computed step that no longer sees
        # it, then summed up to each computed step.
        dH, dz = ops.less_state_fold(_by_step(psi_k)[:, :, None].contiguous(), _by_step(v)[:, :, None].contiguous())
        first_step = torch.searchsorted(arange(T) if at is None else at, steps.evicted_at)  # [B, Hkv, T] in [0, M]
        bins = ((arange(B)[:, None, None] * (M + 1) + first_step) * Hkv + arange(Hkv)[:, None]).transpose(1, 2)
        H = dH.new_zeros(B * (M + 1) * Hkv, R * D).index_add(0, bins.reshape(-1), dH.view(-1, R * D))
        z = dz.new_zeros(B * (M + 1) * Hkv, R).index_add(0, bins.reshape(-1), dz.view(-1, R))
        H = H.view(B, M + 1, Hkv, R * D).cumsum(dim=1)[:, :M]
        z = z.view(B, M + 1, Hkv, R).cumsum(dim=1)[:, :M]
        state = (_by_step(phi_q).contiguous(), H.reshape(B * M, Hkv, R, D), z.reshape(B * M, Hkv, R))
    pos = slots.reshape(B * M, Hkv, S)
    out, _ = ops.less_decode_attention(_by_step(q).contiguous(), k_slots, v_slots, pos, *state, scale)
    return out.view(B, M, Hq, D).transpose(1, 2)


def output_mse(out: Tensor, target: Tensor, o_proj: Tensor, start: int) -> Tensor:
    """Mean squared error of o_proj(out) against o_proj(target) over positions >= start.
    out, target [B, Hq, T, D]; o_proj [hidden, Hq * D] (linear, so a bias would cancel)."""
    diff = (out.float() - target.float())[:, :, start:].transpose(1, 2).flatten(2)
    return F.linear(diff, o_proj).square().mean()


def full_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Exact causal attention, the target: q [B, Hq, T, D], k, v [B, Hkv, T, D] -> [B, Hq, T, D] fp32."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scale, enable_gqa=True)


# ---------------------------------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LayerData:
    """One layer's sequences with everything the loss needs that training does not change: q [N, Hq, T, D],
    k, v [N, Hkv, T, D] (fp32), the policy's steps, the full-attention target [N, Hq, T, D] fp32, the logit scale,
    o_proj [hidden, Hq * D], and `start`, the first step at which the policy has evicted a token (budget + 1)."""

    q: Tensor
    k: Tensor
    v: Tensor
    steps: PolicySteps
    target: Tensor
    scale: float
    o_proj: Tensor
    start: int

    @staticmethod
    def build(cap: LayerCapture, policy: ResolvedPolicy, device: torch.device, desc: str,
              batch_size: int = 8) -> "LayerData":
        """Run the policy and full attention over the capture on `device`, `batch_size` sequences at a time."""
        q, k, v = (t.to(device, torch.float32) for t in (cap.q, cap.k, cap.v))
        targets = [full_attention(q[first : first + batch_size], k[first : first + batch_size],
                                  v[first : first + batch_size], cap.scale) for first in range(0, len(q), batch_size)]
        steps = batched_policy_steps(q, k, cap.scale, policy, desc, batch_size)
        return LayerData(q, k, v, steps, torch.cat(targets), cap.scale, cap.o_proj.to(device), policy.num_slots)

    def with_policy(self, policy: ResolvedPolicy, desc: str) -> "LayerData":
        """The same sequences and targets under another policy's steps (`start` unchanged: the same positions are
        scored)."""
        return replace(self, steps=batched_policy_steps(self.q, self.k, self.scale, policy, desc))

    def __len__(self) -> int:
        return len(self.q)

    def select(self, index: Tensor) -> "LayerData":
        return replace(self, q=self.q[index], k=self.k[index], v=self.v[index], steps=self.steps.select(index),
                       target=self.target[index])

    def mse(self, feature_maps: Optional[LayerFeatureMaps], at: Optional[Tensor] = None) -> Tensor:
        """The loss: output MSE of LESS with `feature_maps` (or of the sparse policy alone, None) at the steps `at`
        (increasing, all >= start), or at every step from `start` on."""
        q, target = (self.q, self.target) if at is None else (self.q[:, :, at], self.target[:, :, at])
        features = (feature_maps.phi(q), feature_maps.psi(self.k)) if feature_maps is not None else (None, None)
        out = step_attention(q, self.k, self.v, self.steps, *features, self.scale, at)
        return output_mse(out, target, self.o_proj, self.start if at is None else 0)


@torch.no_grad()
def validation_mse(data: LayerData, feature_maps: Optional[LayerFeatureMaps], batch_size: int) -> float:
    """`LayerData.mse` over all of `data`, every step from `start` on, `batch_size` sequences at a time."""
    total = 0.0
    for first in range(0, len(data), batch_size):
        index = torch.arange(first, min(first + batch_size, len(data)), device=data.q.device)
        total += float(data.select(index).mse(feature_maps)) * len(index)
    return total / len(data)


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    warmup = max(1, total // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class LayerResult:
    """A trained layer: the best feature maps by validation MSE, and the validation MSEs to compare."""

    state: dict[str, Tensor]
    mse: dict[str, float] = field(default_factory=dict)  # MSE_KEYS


MSE_KEYS = ("sparse", "baseline_plus", "less")


class LayerTrainer:
    """Trains one layer's φ/ψ with AdamW, keeping the best epoch by validation MSE; after every epoch its whole
    state (weights, best weights, optimizer moments, epoch) goes to `<progress>/layer_<i>.partial.safetensors`."""

    def __init__(self, cfg: TrainConfig, kcfg: FeatureMapsConfig, layer: int, progress_dir: Path,
                 device: torch.device):
        self.cfg, self.layer = cfg, layer
        with torch.random.fork_rng():  # the layer's init depends on its index only, not on the rank that trains it
            torch.manual_seed(cfg.seed * 100_003 + layer)
            feature_maps = LayerFeatureMaps(kcfg.num_heads, kcfg.num_kv_heads, kcfg.head_dim, kcfg.kernel_hidden,
                                            kcfg.rank)
        self.feature_maps = feature_maps.to(device)
        self.optimizer = torch.optim.AdamW(self.feature_maps.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.partial = progress_dir / f"layer_{layer}.partial.safetensors"
        self.epoch = 0
        self.best_val = math.inf
        self.best_state = {k: v.detach().clone() for k, v in self.feature_maps.state_dict().items()}

    def save_partial(self) -> None:
        tensors = {f"feature_maps.{k}": v for k, v in self.feature_maps.state_dict().items()}
        tensors |= {f"best.{k}": v for k, v in self.best_state.items()}
        for i, state in self.optimizer.state_dict()["state"].items():
            tensors |= {f"optimizer.{i}.{k}": v for k, v in state.items()}
        meta = {"epoch": str(self.epoch), "best_val": repr(self.best_val)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.partial), metadata=meta)

    def load_partial(self) -> None:
        device = next(self.feature_maps.parameters()).device
        tensors = load_file(str(self.partial), device=str(device))
        with safe_open(str(self.partial), "pt") as f:
            meta = f.metadata()
        prefix = "feature_maps."
        self.feature_maps.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.best_state = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        state = self.optimizer.state_dict()
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, i, name = key.split(".", 2)
                state["state"].setdefault(int(i), {})[name] = value
        self.optimizer.load_state_dict(state)
        self.epoch, self.best_val = int(meta["epoch"]), float(meta["best_val"])

    def fit(self, train: LayerData, val: LayerData, position: int = 0) -> None:
        """Train for the configured epochs (continuing a partial run if one is saved)."""
        cfg = self.cfg
        if self.partial.is_file():
            self.load_partial()
        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        T = train.q.shape[2]
        bar = tqdm(total=total, initial=self.epoch * steps_per_epoch, desc=f"layer {self.layer}", position=position,
                   leave=False, unit="step")
        while self.epoch < cfg.epochs:
            # Seeded by (layer, epoch) alone, so a resumed or sharded run draws exactly the same batches.
            generator = torch.Generator().manual_seed(cfg.seed * 100_003 + self.layer * 1_009 + self.epoch)
            order = torch.randperm(len(train), generator=generator).to(train.q.device)
            self.feature_maps.train()
            for i in range(steps_per_epoch):
                for group in self.optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, self.epoch * steps_per_epoch + i, total)
                # A random subset of the scored steps: neighbouring steps carry nearly the same signal, and a
                # training step costs in proportion to the decode steps it computes.
                at = (train.start + torch.randperm(T - train.start, generator=generator)[: cfg.positions]).sort()
                batch = train.select(order[i * cfg.batch_size : (i + 1) * cfg.batch_size])
                loss = batch.mse(self.feature_maps, at.values.to(train.q.device))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3e}", best_val=f"{self.best_val:.3e}")
            self.feature_maps.eval()
            val_mse = validation_mse(val, self.feature_maps, cfg.batch_size)
            if val_mse < self.best_val:
                self.best_val = val_mse
                self.best_state = {k: v.detach().clone() for k, v in self.feature_maps.state_dict().items()}
            self.epoch += 1
            self.save_partial()
        bar.close()


def train_layer(
    cfg: TrainConfig,
    kcfg: FeatureMapsConfig,
    layer: int,
    train_cap: Optional[LayerCapture],
    val_cap: Optional[LayerCapture],
    progress_dir: Path,
    device: torch.device,
    position: int = 0,
) -> LayerResult:
    """Fit one layer and measure its validation MSEs, or pick up its finished result from `progress_dir` (then the
    captures may be None)."""
    done = progress_dir / f"layer_{layer}.safetensors"
    if done.is_file():
        with safe_open(str(done), "pt") as f:
            mse = json.loads(f.metadata()["mse"])
        return LayerResult(load_file(str(done)), mse)
    policy = cfg.resolved_policy()
    desc = f"layer {layer} policy"
    train, val = LayerData.build(train_cap, policy, device, desc), LayerData.build(val_cap, policy, device, desc)
    trainer = LayerTrainer(cfg, kcfg, layer, progress_dir, device)
    trainer.fit(train, val, position)
    plus = baseline_plus(cfg.policy_spec(), cfg.seq_len, kcfg.head_dim, kcfg.rank, DTYPES[cfg.dtype])
    val_plus = val.with_policy(plus.resolve(cfg.seq_len), desc)
    trainer.feature_maps.load_state_dict(trainer.best_state)
    mse = {
        "sparse": validation_mse(val, None, cfg.batch_size),
        "baseline_plus": validation_mse(val_plus, None, cfg.batch_size),
        "less": validation_mse(val, trainer.feature_maps, cfg.batch_size),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in trainer.best_state.items()}
    save_file(state, str(done), metadata={"mse": json.dumps(mse)})
    trainer.partial.unlink(missing_ok=True)
    return LayerResult(state, mse)


# ---------------------------------------------------------------------------------------------------------------
# The whole model, optionally sharded over torchrun processes
# ---------------------------------------------------------------------------------------------------------------
def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device), initialising torch.distributed under torchrun: gloo on CPU, NCCL on GPU (one GPU
    per process, by LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # Processes on one machine share its cores; oversubscribed OpenMP threads stall each other.
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return dist.get_rank(), world, device


def _share_results(results: dict[int, LayerResult], layers: list[int], world: int, template: LayerFeatureMaps) -> None:
    """Give every process every layer's result: the owner of layer i (rank i mod world) broadcasts it. No gradients
    are ever exchanged; this is the only communication."""
    if world == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    names = list(template.state_dict())
    shapes = [template.state_dict()[n].shape for n in names]
    for position, layer in enumerate(layers):
        owner = position % world
        mine = layer in results
        flat = (torch.cat([results[layer].state[n].flatten() for n in names]) if mine
                else torch.empty(sum(s.numel() for s in shapes)))
        mse = torch.tensor([results[layer].mse[k] if mine else 0.0 for k in MSE_KEYS], dtype=torch.float64)
        flat, mse = flat.to(device), mse.to(device)
        dist.broadcast(flat, src=owner)
        dist.broadcast(mse, src=owner)
        if not mine:
            pieces = flat.cpu().split([s.numel() for s in shapes])
            results[layer] = LayerResult({n: p.view(s) for n, p, s in zip(names, pieces, shapes)},
                                         dict(zip(MSE_KEYS, mse.cpu().tolist())))


def report(results: dict[int, LayerResult]) -> str:
    """Per-layer validation MSE table: sparse policy alone, Baseline+, LESS, and the share of the sparse error LESS
    removes."""
    def row(label: object, m: dict[str, float]) -> str:
        ratio = m["less"] / m["sparse"] if m["sparse"] > 0 else float("nan")
        return f"{label:>5}  {m['sparse']:>10.4e}  {m['baseline_plus']:>10.4e}  {m['less']:>10.4e}  {ratio:>13.3f}"

    mean = {k: sum(r.mse[k] for r in results.values()) / len(results) for k in MSE_KEYS}
    lines = [f"{'layer':>5}  {'sparse':>10}  {'baseline+':>10}  {'LESS':>10}  {'LESS / sparse':>13}"]
    lines += [row(layer, results[layer].mse) for layer in sorted(results)]
    return "\n".join([*lines, row("mean", mean)])


def provenance(cfg: TrainConfig) -> dict:
    """How a checkpoint was trained, for its config.json: the run's settings with the data file's name (not a local
    path) and the budget in tokens."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "output"}
    settings["data"] = Path(cfg.data).name if Path(cfg.data).is_file() else cfg.data
    return {**settings, "budget_tokens": cfg.resolved_policy().budget}


def _check_progress(progress_dir: Path, cfg: TrainConfig) -> None:
    """Resume only a run with the same configuration: a stale progress directory would silently mix two runs."""
    record = progress_dir / "train_config.json"
    wanted = json.dumps(asdict(cfg), sort_keys=True)
    if record.is_file() and record.read_text() != wanted:
        raise ValueError(f"{progress_dir} holds progress of a run with another configuration ({record}); "
                         "use another output directory or delete it")
    record.write_text(wanted)


def train(cfg: TrainConfig) -> FeatureMaps:
    """Fit φ/ψ for every full-attention layer of `cfg.model` and write the checkpoint to `cfg.output`.

    Under torchrun each process trains the layers i with i mod world == rank and rank 0 writes the merged
    checkpoint. Finished layers and per-epoch state are kept under `<output>/progress`, so rerunning the same
    command after an interruption resumes where it stopped. Returns the feature maps (on every rank).
    """
    rank, world, device = _distributed()
    started = time.time()
    model, tokenizer = load_model(cfg.model, DTYPES[cfg.dtype], cfg.gguf_file)
    model.to(device)
    layers = cfg.layers if cfg.layers is not None else attention_layers(model.config)
    layout = model_layout(model.config)
    kcfg = FeatureMapsConfig(
        base_model=str(model.config.name_or_path), **layout, layers=layers,
        policy=asdict(cfg.policy_spec()), rank=cfg.rank, kernel_hidden=cfg.hidden or layout["head_dim"],
        training=provenance(cfg),
    )
    output = Path(cfg.output)
    progress_dir = output / PROGRESS_DIR
    if rank == 0:
        progress_dir.mkdir(parents=True, exist_ok=True)
        _check_progress(progress_dir, cfg)
    if world > 1:
        dist.barrier()

    splits = tokenizer_splits(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction)
    if len(splits.train) == 0 or len(splits.validation) == 0:
        raise ValueError(f"{cfg.data!r} is too short for one {cfg.seq_len}-token sequence in both splits "
                         f"(train {len(splits.train)}, validation {len(splits.validation)})")
    mine = [layer for i, layer in enumerate(layers) if i % world == rank]
    todo = [layer for layer in mine if not (progress_dir / f"layer_{layer}.safetensors").is_file()]
    train_caps, val_caps = {}, {}
    if todo:
        train_caps = capture(model, splits.train[: cfg.sequences], todo, cfg.batch_size, "capture train")
        val_caps = capture(model, splits.validation[: cfg.val_sequences], todo, cfg.batch_size, "capture val")
    results = {}
    for layer in tqdm(mine, desc=f"rank {rank} layers", position=0, unit="layer", disable=world > 1 and rank > 0):
        results[layer] = train_layer(cfg, kcfg, layer, train_caps.pop(layer, None), val_caps.pop(layer, None),
                                     progress_dir, device, position=1)
    feature_maps = FeatureMaps(kcfg)
    _share_results(results, layers, world, feature_maps.layer_kernels[str(layers[0])])
    feature_maps.load_state_dict({f"layer_kernels.{i}.{k}": v for i, r in results.items() for k, v in r.state.items()})
    if rank == 0:
        feature_maps.save_pretrained(output)
        shutil.rmtree(progress_dir)  # only needed to resume an unfinished run
        summary = {str(layer): results[layer].mse for layer in sorted(results)}
        seconds = round(time.time() - started, 1)
        (output / "report.json").write_text(
            json.dumps({"validation_mse": summary, "seconds": seconds, "processes": world}, indent=2) + "\n")
        print(report(results))
        print(f"checkpoint written to {output} in {seconds:.0f} s")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return feature_maps
