"""Training over torchrun processes: gloo on CPU, NCCL on GPUs (one GPU per process). The per-layer stage shards the
layers (`share_layer_results` gives every process every layer); the end-to-end stage is data parallel
(`all_reduce_gradients`)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..core.feature_maps import LayerFeatureMaps
from .layer_stage import MSE_KEYS, LayerResult


def init_distributed() -> tuple[int, int, torch.device]:
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


def share_layer_results(results: dict[int, LayerResult], layers: list[int], world: int,
                        template: LayerFeatureMaps) -> None:
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


def all_reduce_gradients(parameters: list[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of `parameters` over the processes, as one flat buffer (one collective per step)."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, piece in zip(parameters, flat.split([g.numel() for g in grads])):
        p.grad = piece.view_as(p)
