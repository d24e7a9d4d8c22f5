"""The per-layer stage of `less-cuda train`: each full-attention layer's φ/ψ fitted alone.

Objective: the MSE between o_proj(LESS attention output) and o_proj(full attention output), at the positions where
the policy has evicted something (t >= budget + 1; before that LESS is exact). Teacher forcing: every layer sees the
hidden states of the unmodified model (`capture`), so the layers never interact and can be sharded over processes.
The LESS output is `step_attention` at a random subset of a sequence's decode steps (`--positions`); validation
scores all of them and picks each layer's best epoch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..core.feature_maps import FeatureMapsConfig, LayerFeatureMaps
from ..core.policy import ResolvedPolicy, baseline_plus
from ..core.step_attention import PolicySteps, batched_policy_steps, step_attention
from ..hf.models import DTYPES
from .capture import LayerCapture
from .config import TrainConfig
from .epochs import EpochTrainer
from .input_scaling import input_rms, param_groups, scale_initial_weights, set_learning_rate


def output_mse(out: Tensor, target: Tensor, o_proj: Tensor, start: int) -> Tensor:
    """Mean squared error of o_proj(out) against o_proj(target) over positions >= start.
    out, target [B, Hq, T, D]; o_proj [hidden, Hq * D] (linear, so a bias would cancel)."""
    diff = (out.float() - target.float())[:, :, start:].transpose(1, 2).flatten(2)
    return F.linear(diff, o_proj).square().mean()


def full_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Exact causal attention, the target: q [B, Hq, T, D], k, v [B, Hkv, T, D] -> [B, Hq, T, D] fp32."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scale, enable_gqa=True)


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


@dataclass
class LayerResult:
    """A trained layer: the best feature maps by validation MSE, and the validation MSEs to compare."""

    state: dict[str, Tensor]
    mse: dict[str, float] = field(default_factory=dict)  # MSE_KEYS


MSE_KEYS = ("sparse", "baseline_plus", "less")


class LayerTrainer(EpochTrainer):
    """Trains one layer's φ/ψ with AdamW, keeping the best epoch by validation MSE; after every epoch its whole
    state (weights, best weights, optimizer moments, epoch) goes to `<progress>/layer_<i>.partial.safetensors`.
    q_rms, k_rms: the RMS of the layer's training queries and keys (`input_scaling`; 1 for --input-scaling none)."""

    def __init__(self, cfg: TrainConfig, kcfg: FeatureMapsConfig, layer: int, progress_dir: Path,
                 device: torch.device, q_rms: float = 1.0, k_rms: float = 1.0):
        self.cfg, self.layer = cfg, layer
        with torch.random.fork_rng():  # the layer's init depends on its index only, not on the rank that trains it
            torch.manual_seed(cfg.seed * 100_003 + layer)
            feature_maps = LayerFeatureMaps(kcfg.num_heads, kcfg.num_kv_heads, kcfg.head_dim, kcfg.kernel_hidden,
                                            kcfg.rank)
        scale_initial_weights(feature_maps, q_rms, k_rms)
        self.feature_maps = feature_maps.to(device)
        optimizer = torch.optim.AdamW(param_groups({str(layer): (self.feature_maps, q_rms, k_rms)}), lr=cfg.lr,
                                      weight_decay=0.0)
        super().__init__(self.feature_maps, optimizer, progress_dir / f"layer_{layer}.partial.safetensors")

    def fit(self, train: LayerData, val: LayerData, position: int = 0) -> None:
        """Train for the configured epochs (continuing a partial run if one is saved)."""
        self.resume()
        steps_per_epoch = math.ceil(len(train) / self.cfg.batch_size)
        bar = tqdm(total=steps_per_epoch * self.cfg.epochs, initial=self.epoch * steps_per_epoch,
                   desc=f"layer {self.layer}", position=position, leave=False, unit="step")
        while self.epoch < self.cfg.epochs:
            self.feature_maps.train()
            self._train_epoch(train, steps_per_epoch, bar)
            self.feature_maps.eval()
            self.end_epoch(validation_mse(val, self.feature_maps, self.cfg.batch_size))
        bar.close()

    def _train_epoch(self, train: LayerData, steps_per_epoch: int, bar: tqdm) -> None:
        cfg = self.cfg
        total = steps_per_epoch * cfg.epochs
        T = train.q.shape[2]
        # Seeded by (layer, epoch) alone, so a resumed or sharded run draws exactly the same batches.
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + self.layer * 1_009 + self.epoch)
        order = torch.randperm(len(train), generator=generator).to(train.q.device)
        for i in range(steps_per_epoch):
            set_learning_rate(self.optimizer, cfg.learning_rate(self.epoch * steps_per_epoch + i, total))
            # A random subset of the scored steps: neighbouring steps carry nearly the same signal, and a training
            # step costs in proportion to the decode steps it computes.
            at = (train.start + torch.randperm(T - train.start, generator=generator)[: cfg.positions]).sort()
            batch = train.select(order[i * cfg.batch_size : (i + 1) * cfg.batch_size])
            loss = batch.mse(self.feature_maps, at.values.to(train.q.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3e}", best_val=f"{self.best_val:.3e}")


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
    scales = (input_rms(train.q), input_rms(train.k)) if cfg.input_scaling == "rms" else (1.0, 1.0)
    trainer = LayerTrainer(cfg, kcfg, layer, progress_dir, device, *scales)
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


def report(results: dict[int, LayerResult]) -> str:
    """Per-layer validation MSE table: sparse policy alone, Baseline+, LESS, and the share of the sparse error LESS
    removes; then a warning naming the layers whose maps do not beat the sparse policy (as Gemma 3's layer 11 did
    before `input_scaling`), whose state then carries almost nothing."""
    def row(label: object, m: dict[str, float]) -> str:
        ratio = m["less"] / m["sparse"] if m["sparse"] > 0 else float("nan")
        return f"{label:>5}  {m['sparse']:>10.4e}  {m['baseline_plus']:>10.4e}  {m['less']:>10.4e}  {ratio:>13.3f}"

    mean = {k: sum(r.mse[k] for r in results.values()) / len(results) for k in MSE_KEYS}
    lines = [f"{'layer':>5}  {'sparse':>10}  {'baseline+':>10}  {'LESS':>10}  {'LESS / sparse':>13}"]
    lines += [row(layer, results[layer].mse) for layer in sorted(results)]
    lines.append(row("mean", mean))
    failed = [layer for layer in sorted(results) if results[layer].mse["less"] >= results[layer].mse["sparse"]]
    if failed:
        lines.append(f"warning: the maps of layers {failed} do not beat the sparse policy on validation, so their "
                     "state carries almost nothing; try more sequences or epochs, or another --lr")
    return "\n".join(lines)
