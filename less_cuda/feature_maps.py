"""The learned feature maps phi (per query head) and psi (per KV head) of every full-attention layer, and their
checkpoint format.

Architecture (as the LESS paper and its official code): a two-layer GELU MLP per head, D -> hidden -> R, made
non-negative by abs. psi multiplies its output by a learned per-rank scaling that starts at 1e-4, so an untrained
psi folds almost nothing and LESS starts out as its sparse policy, and adds a small R x R interaction term.

Defaults: R = 8 (the paper's rank) and hidden = head_dim. Parameters per layer:
    Hq * (D * hidden + hidden * R) + Hkv * (D * hidden + hidden * R + R * R + 2 * R)
e.g. SmolLM2-135M (Hq 9, Hkv 3, D 64, hidden 64, R 8): 41,472 + 14,064 = 55,536 per layer, 1.67 M for 30 layers,
3.3 MB in fp16. The official code uses hidden 512 for Llama-2-7B (D 128); on SmolLM2 a short trial with hidden 128
lowered the validation MSE by only about 4% for twice the size, and hidden 32 raised it by about 5%.

Checkpoint: a directory with config.json (model layout, policy, rank, hidden size, how it was trained, format
version) and kernels.safetensors, stored in fp16 by default and loaded back into fp32 parameters. Nothing is loaded
with pickle.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .ops import less_feature_maps

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "kernels.safetensors"


@dataclass
class FeatureMapsConfig:
    """What a set of feature maps was fitted for. `layers` lists the layers that have feature maps."""

    base_model: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    layers: list[int]
    policy: dict = field(default_factory=dict)  # Policy fields: kind, budget, recent, sinks
    rank: int = 8
    kernel_hidden: int = 64
    training: dict = field(default_factory=dict)  # how the maps were fitted (data, sequence length, ...): provenance
    format_version: int = FORMAT_VERSION

    def layout(self) -> dict:
        """The model facts a checkpoint must agree with."""
        return {k: getattr(self, k) for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")}


def _uniform(*shape: int, fan: int) -> nn.Parameter:
    bound = math.sqrt(3.0 / fan)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class HeadMLP(nn.Module):
    """Per-head two-layer GELU MLP: x [B, heads, T, D] -> [B, heads, T, R], before the non-negativity."""

    def __init__(self, heads: int, head_dim: int, hidden: int, rank: int):
        super().__init__()
        self.w1 = _uniform(heads, head_dim, hidden, fan=head_dim + rank)
        self.w2 = _uniform(heads, hidden, rank, fan=hidden + rank)

    def forward(self, x: Tensor) -> Tensor:
        # Batched matmuls broadcast the per-head weights over the batch: half the dispatcher calls of einsum, which
        # matters in decode, where this runs once per layer and token on tiny tensors.
        return F.gelu(F.gelu(x.float() @ self.w1) @ self.w2)


class LayerFeatureMaps(nn.Module):
    """phi and psi of one attention layer."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, hidden: int, rank: int):
        super().__init__()
        self.phi_mlp = HeadMLP(num_heads, head_dim, hidden, rank)
        self.psi_mlp = HeadMLP(num_kv_heads, head_dim, hidden, rank)
        self.psi_scale = nn.Parameter(torch.full((num_kv_heads, 1, rank), 1e-4))
        self.psi_interaction = _uniform(num_kv_heads, rank, rank, fan=2 * rank)
        self.psi_interaction_scale = nn.Parameter(torch.full((num_kv_heads, 1, rank), 1e-4))

    def phi(self, q: Tensor) -> Tensor:
        """q [B, Hq, T, D] -> phi(q) [B, Hq, T, R] fp32, non-negative."""
        return self.phi_mlp(q).abs()

    def psi(self, k: Tensor) -> Tensor:
        """k [B, Hkv, T, D] -> psi(k) [B, Hkv, T, R] fp32, non-negative."""
        a = self.psi_scale.abs() * self.psi_mlp(k)
        return (a + (a @ self.psi_interaction) * self.psi_interaction_scale).abs()

    def inference_weights(self) -> tuple[Tensor, ...]:
        """The weights in the order of `ops.less_feature_maps`."""
        return (self.phi_mlp.w1, self.phi_mlp.w2, self.psi_mlp.w1, self.psi_mlp.w2, self.psi_scale,
                self.psi_interaction, self.psi_interaction_scale)  # fmt: skip

    def select_heads(self, rank: int, world: int) -> "LayerFeatureMaps":
        """A copy with tensor-parallel rank `rank`'s share of the heads: every weight's first dimension is the head,
        split into `world` equal contiguous blocks as vLLM splits query and KV heads."""
        part = copy.deepcopy(self)
        for p in part.parameters():
            p.data = p.data.chunk(world, dim=0)[rank].contiguous()
        return part

    def features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(phi(q), psi(k)). Without gradients on CPU one fused op computes both (decode runs this per layer and
        token, where a chain of small ops would cost more than the arithmetic); otherwise the differentiable form."""
        if not torch.is_grad_enabled() and q.device.type == "cpu":
            return less_feature_maps(q, k, *self.inference_weights())
        return self.phi(q), self.psi(k)


class FeatureMaps(nn.Module):
    """Feature maps for every full-attention layer of one model.

    `phi(layer, q)` and `psi(layer, k)` take the layer's post-RoPE queries / keys in transformers' layout
    ([B, heads, T, D]) and return fp32 features [B, heads, T, R].
    """

    def __init__(self, config: FeatureMapsConfig):
        super().__init__()
        self.config = config
        c = config
        # "layer_kernels" (like kernels.safetensors) is the name format version 1 stores the weights under.
        self.layer_kernels = nn.ModuleDict(
            {str(i): LayerFeatureMaps(c.num_heads, c.num_kv_heads, c.head_dim, c.kernel_hidden, c.rank)
             for i in c.layers}
        )

    @property
    def rank(self) -> int:
        return self.config.rank

    def has_layer(self, layer: int) -> bool:
        return str(layer) in self.layer_kernels

    def phi(self, layer: int, q: Tensor) -> Tensor:
        return self.layer_kernels[str(layer)].phi(q)

    def psi(self, layer: int, k: Tensor) -> Tensor:
        return self.layer_kernels[str(layer)].psi(k)

    def features(self, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(phi(q), psi(k)) of one layer; see `LayerFeatureMaps.features`."""
        return self.layer_kernels[str(layer)].features(q, k)

    def save_pretrained(self, directory: Union[str, Path], dtype: torch.dtype = torch.float16) -> None:
        """Write config.json and kernels.safetensors into `directory`, the tensors in `dtype` (fp16 halves the size;
        `from_pretrained` loads them back into fp32)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format_version": str(FORMAT_VERSION)})

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], device: Optional[torch.device] = None) -> "FeatureMaps":
        """Load a checkpoint written by `save_pretrained` (safetensors only, never pickle)."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"no LESS checkpoint at {directory}: {CONFIG_NAME} is missing")
        raw = json.loads(config_path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format_version {raw.get('format_version')}, this less_cuda reads {FORMAT_VERSION}"
            )
        feature_maps = cls(FeatureMapsConfig(**raw))
        feature_maps.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))  # copies into the fp32 parameters
        return feature_maps.to(device) if device is not None else feature_maps

    def check_compatible(self, layout: dict, policy_kind: Optional[str] = None, rank: Optional[int] = None) -> None:
        """Raise a clear ValueError if these feature maps were fitted for another model layout, policy or rank."""
        mine = self.config.layout()
        diff = {k: (mine[k], layout.get(k)) for k in mine if layout.get(k) != mine[k]}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in diff.items())
            raise ValueError(f"LESS checkpoint for {self.config.base_model!r} does not fit this model ({detail})")
        kind = self.config.policy.get("kind")
        if policy_kind is not None and kind is not None and policy_kind != kind:
            raise ValueError(f"LESS checkpoint was fitted for policy {kind!r}, not {policy_kind!r}")
        if rank is not None and rank != self.config.rank:
            raise ValueError(f"LESS checkpoint has rank {self.config.rank}, but rank {rank} was asked for")
