"""The end-to-end stage of `less-cuda train`: every layer's φ/ψ fitted together against the full cache's next-token
distribution, starting from the per-layer stage's maps.

Per-layer fitting is teacher-forced: each layer learns on the hidden states of the unmodified model, but at
inference it sees those that the compressed layers below it produced, so the per-layer errors compound. Here the
model runs with every full-attention layer compressed, as in the parallel evaluation form (the kept sets from the
inference policy code, `state.kept_masks` on the ops), with the output computed step by step through the ops
(`step_attention.kept_attention`, differentiable). The loss is KL(p_full || p_LESS) of the next-token distributions,
averaged over the positions where the policy has evicted something (t >= budget + 1; before that LESS is exact).
The model's own weights stay frozen; the gradient reaches each layer's φ/ψ through every layer above it.
On a GPU the forward passes run under bf16 autocast (`TrainConfig.autocast`, "auto"); φ/ψ, the recurrent state and
the loss stay fp32.

Data parallel under torchrun: each process takes its share of every batch and its loss is that share of the batch's
mean, so the summed gradients (`distributed.all_reduce_gradients`) are those of one process with the whole batch.
Rank 0 writes the progress; an interrupted run resumes from `<progress>/end_to_end.partial.safetensors`.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..core.feature_maps import FeatureMaps
from ..core.step_attention import kept_attention
from ..hf.attention import attention_function
from ..hf.parallel import parallel_attention_function
from .config import TrainConfig
from .distributed import all_reduce_gradients
from .epochs import EpochTrainer
from .input_scaling import param_groups, set_learning_rate

END_TO_END_ATTENTION = "less_end_to_end"
PARTIAL_NAME = "end_to_end.partial.safetensors"


def next_token_kl(full_logits: Tensor, less_logits: Tensor, start: int) -> Tensor:
    """Summed KL(p_full || p_less) over positions >= start of logits [B, T, V] (computed in fp32)."""
    full = F.log_softmax(full_logits[:, start:].float(), dim=-1)
    less = F.log_softmax(less_logits[:, start:].float(), dim=-1)
    return F.kl_div(less, full, log_target=True, reduction="sum")


def peak_memory_gib(device: torch.device) -> float:
    """The process's peak memory so far: the CUDA allocator's peak on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class EndToEndTrainer(EpochTrainer):
    """Fits all layers' φ/ψ of `feature_maps` on `model` with AdamW (learning rate `cfg.e2e_lr`), keeping the best
    weights by validation KL; after every epoch the whole state goes to `<progress>/end_to_end.partial.safetensors`.

    Sequences are [N, T] token ids without padding. rank / world: this process among the torchrun processes.
    input_rms: {layer: (RMS of its queries, of its keys)} (`input_scaling`); None: 1 for every layer.
    """

    def __init__(self, cfg: TrainConfig, model, feature_maps: FeatureMaps, progress_dir: Path, rank: int = 0,
                 world: int = 1, input_rms: Optional[dict[int, tuple[float, float]]] = None):
        self.cfg, self.model, self.feature_maps = cfg, model, feature_maps
        self.rank, self.world = rank, world
        self.device = next(model.parameters()).device
        model.requires_grad_(False)
        self.parameters = [p for p in feature_maps.parameters()]
        layers = {name: (maps, *(input_rms[int(name)] if input_rms is not None else (1.0, 1.0)))
                  for name, maps in feature_maps.layers.items()}  # every layer has its scales, or none has
        optimizer = torch.optim.AdamW(param_groups(layers), lr=cfg.e2e_lr, weight_decay=0.0)
        super().__init__(feature_maps, optimizer, progress_dir / PARTIAL_NAME, writes=rank == 0)
        self.start = cfg.resolved_policy().num_slots  # the first position where the policy has evicted a token
        self.function = parallel_attention_function(cfg.policy_spec(), feature_maps, kept_attention)
        self.autocast_dtype = cfg.autocast_dtype(self.device.type)
        self.initial_val: Optional[float] = None  # validation KL of the maps the stage started from
        self.seconds_per_step: list[float] = []

    def _my_rows(self, batch: Tensor) -> Tensor:
        return batch[self.rank :: self.world]

    def _sum(self, value: float) -> float:
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total)

    def batch_kl(self, ids: Tensor) -> Tensor:
        """Summed next-token KL of the rows ids [B, T] (this process's share of a batch), differentiable in φ/ψ."""
        ids = ids.to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            with torch.no_grad():
                full = self.model(input_ids=ids, use_cache=False).logits
            with attention_function(self.model, self.function, END_TO_END_ATTENTION):
                less = self.model(input_ids=ids, use_cache=False).logits
        return next_token_kl(full, less, self.start)

    @torch.no_grad()
    def validation_kl(self, sequences: Tensor) -> float:
        """Mean KL per scored position over sequences [N, T] (all processes together)."""
        total = 0.0
        for ids in self._my_rows(sequences).split(self.cfg.batch_size):
            total += float(self.batch_kl(ids))
        positions = len(sequences) * (sequences.shape[1] - self.start)
        return self._sum(total) / positions

    def fit(self, train: Tensor, val: Tensor) -> None:
        """Train for `cfg.e2e_epochs` epochs over train [N, T] (continuing a saved partial run), validating on
        val [M, T] before the first epoch and after each; the best weights end up in `feature_maps`."""
        meta = self.resume()
        if meta is not None:
            self.initial_val = float(meta["initial_val"])
        else:
            self.initial_val = self.best_val = self.validation_kl(val)  # the starting maps are the first candidate
        steps_per_epoch = math.ceil(len(train) / self.cfg.batch_size)
        bar = tqdm(total=steps_per_epoch * self.cfg.e2e_epochs, initial=self.epoch * steps_per_epoch,
                   desc="end-to-end", unit="step", disable=self.rank > 0)
        while self.epoch < self.cfg.e2e_epochs:
            self._train_epoch(train, steps_per_epoch, bar)
            self.end_epoch(self.validation_kl(val), initial_val=self.initial_val)
            if self.world > 1:
                dist.barrier()  # nobody reads the partial state before it is whole
        bar.close()
        self.feature_maps.load_state_dict(self.best_state)

    def _train_epoch(self, train: Tensor, steps_per_epoch: int, bar: tqdm) -> None:
        """One epoch's optimizer steps, each on this process's share of a batch."""
        cfg = self.cfg
        total = steps_per_epoch * cfg.e2e_epochs
        scored = train.shape[1] - self.start
        # Seeded by the epoch alone: a resumed run, or any number of processes, draws the same batches.
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + 7_919 + self.epoch)
        order = torch.randperm(len(train), generator=generator)
        for i in range(steps_per_epoch):
            started = time.perf_counter()
            set_learning_rate(self.optimizer, cfg.learning_rate(self.epoch * steps_per_epoch + i, total, cfg.e2e_lr))
            batch = train[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
            loss = self.batch_kl(self._my_rows(batch)) / (len(batch) * scored)
            self.optimizer.zero_grad(set_to_none=False)
            loss.backward()
            all_reduce_gradients(self.parameters, self.world)
            self.optimizer.step()
            self.seconds_per_step.append(time.perf_counter() - started)
            bar.update()
            bar.set_postfix(kl=f"{self._sum(float(loss.detach())):.4f}", best_val=f"{self.best_val:.4f}",
                            s_per_step=f"{self.seconds_per_step[-1]:.1f}",
                            peak_gib=f"{peak_memory_gib(self.device):.1f}")

    def timing(self) -> Optional[dict[str, float]]:
        """Mean seconds per optimizer step of this run (None before the first) and the peak memory."""
        if not self.seconds_per_step:
            return None
        return {"seconds_per_step": sum(self.seconds_per_step) / len(self.seconds_per_step),
                "peak_memory_gib": peak_memory_gib(self.device)}
