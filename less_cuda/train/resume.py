"""A trainer's whole state in one safetensors file, so that an interrupted run resumes exactly where it stopped: the
weights being trained, the best weights so far, the optimizer's moments and a few numbers (epoch, best validation
loss). Both training stages keep their progress this way."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor


def save_training_state(path: Path, module: torch.nn.Module, best: dict[str, Tensor],
                        optimizer: torch.optim.Optimizer, meta: dict[str, object]) -> None:
    """Write the state to `path` atomically (a crash mid-write leaves the previous state in place)."""
    tensors = {f"module.{k}": v for k, v in module.state_dict().items()}
    tensors |= {f"best.{k}": v for k, v in best.items()}
    for i, state in optimizer.state_dict()["state"].items():
        tensors |= {f"optimizer.{i}.{k}": v for k, v in state.items()}
    partial = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(partial),
              metadata={k: repr(v) for k, v in meta.items()})
    os.replace(partial, path)


def load_training_state(path: Path, module: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load what `save_training_state` wrote into `module` and `optimizer`; returns (best weights, meta as written,
    each value its repr)."""
    device = next(module.parameters()).device
    tensors = load_file(str(path), device=str(device))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(state)
    return {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}, meta
