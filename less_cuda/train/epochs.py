"""What both training stages share: a trainer that runs its epochs, keeps the best weights by a validation loss, and
after every epoch writes its whole state (`resume.save_training_state`), so that an interrupted run resumes exactly
where it stopped."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .resume import load_training_state, save_training_state


class EpochTrainer:
    """The epoch count, the best weights so far and their validation loss, for `maps` trained by `optimizer`.

    partial: the file the state goes to after each epoch (`writes`: this process writes it; under torchrun, rank 0).
    """

    def __init__(self, maps: nn.Module, optimizer: torch.optim.Optimizer, partial: Path, writes: bool = True):
        self.maps, self.optimizer, self.partial, self.writes = maps, optimizer, partial, writes
        self.epoch = 0
        self.best_val = math.inf
        self.best_state = self.snapshot()

    def snapshot(self) -> dict[str, Tensor]:
        """A copy of the weights as they are now."""
        return {k: v.detach().clone() for k, v in self.maps.state_dict().items()}

    def resume(self) -> Optional[dict[str, str]]:
        """Load the saved state, if a run saved one, into the weights, the optimizer and the counters. Returns the
        meta it was saved with (each value its repr), or None when there is none: a fresh run."""
        if not self.partial.is_file():
            return None
        self.best_state, meta = load_training_state(self.partial, self.maps, self.optimizer)
        self.epoch, self.best_val = int(meta["epoch"]), float(meta["best_val"])
        return meta

    def end_epoch(self, val_loss: float, **meta: object) -> None:
        """Keep the weights if they validate best so far, count the epoch, and save the whole state with `meta`."""
        if val_loss < self.best_val:
            self.best_val, self.best_state = val_loss, self.snapshot()
        self.epoch += 1
        if self.writes:
            save_training_state(self.partial, self.maps, self.best_state, self.optimizer,
                                {"epoch": self.epoch, "best_val": self.best_val, **meta})
