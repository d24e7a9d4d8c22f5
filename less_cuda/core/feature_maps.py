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
with pickle: config.json is read with `json`, the weights with `safetensors`, and both are checked before use (every
field and its type, every tensor's name, shape and finiteness), so a damaged or foreign checkpoint fails with a
message naming the file, never half-loaded.
"""

from __future__ import annotations

import copy
import json
import math
import typing
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .ops import less_feature_maps
from .policy import Policy

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "kernels.safetensors"
STORED_PREFIX = "layer_kernels"
"""What format version 1 calls `FeatureMaps.layers` in the weights file: "layer_kernels.<layer>.phi_mlp.w1", ..."""
BUDGET_TOLERANCE = 2.0
"""A budget within this factor of the one a checkpoint was fitted for uses it without a warning: feature maps fitted
at 5% still help at 4% or 8%, but the further the budget, the more the evicted tokens differ from the ones they
learned to summarise."""


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
    # Policy fields: kind, budget, recent, sinks. The prefill fields (prefill_scores, prefill_window) are accepted but
    # training never writes them: fitting runs the decode rule from the first token and never prefills.
    policy: dict = field(default_factory=dict)
    rank: int = 8
    kernel_hidden: int = 64
    training: dict = field(default_factory=dict)  # how the maps were fitted (data, sequence length, ...): provenance
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        """Checked once here, so that no malformed config is saved or loaded: the field types, positive sizes, layers
        that exist, a valid policy."""
        hints = typing.get_type_hints(FeatureMapsConfig)
        wrong = [f"{f.name} {getattr(self, f.name)!r} (expected {_type_name(hints[f.name])})"
                 for f in fields(self) if not _has_type(getattr(self, f.name), hints[f.name])]
        if wrong:
            raise ValueError(f"feature-map config has fields of the wrong type: {', '.join(wrong)}")
        sizes = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "rank", "kernel_hidden")
        if any(getattr(self, name) < 1 for name in sizes):
            raise ValueError(f"feature-map config sizes must be positive: {({n: getattr(self, n) for n in sizes})}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if len(set(self.layers)) != len(self.layers) or not all(0 <= i < self.num_layers for i in self.layers):
            raise ValueError(f"layers {self.layers} must be distinct indices below num_layers {self.num_layers}")
        try:
            Policy(**self.policy)
        except (TypeError, ValueError) as error:
            raise ValueError(f"feature-map config has an invalid policy {self.policy}: {error}") from None

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "FeatureMapsConfig":
        """Read and check a checkpoint's config.json: valid JSON, this format version, every field present, known and
        of its type. Raises ValueError naming the file otherwise."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an object of config fields")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format_version {raw.get('format_version')}, this less_cuda reads "
                             f"{FORMAT_VERSION}")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        unknown, missing = sorted(raw.keys() - known), sorted(required - raw.keys())
        if unknown or missing:
            raise ValueError(f"{path} does not match format_version {FORMAT_VERSION}: "
                             f"unknown fields {unknown}, missing fields {missing}")
        try:
            return cls(**raw)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    @classmethod
    def from_checkpoint(cls, directory: Union[str, Path]) -> "FeatureMapsConfig":
        """The config of the checkpoint in `directory` (`from_file`), without reading its weights. Raises
        FileNotFoundError when the directory lacks config.json or kernels.safetensors."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"no LESS checkpoint at {directory}: {name} is missing")
        return cls.from_file(directory / CONFIG_NAME)

    def layout(self) -> dict:
        """The model facts a checkpoint must agree with."""
        return {k: getattr(self, k) for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")}

    def check_compatible(self, layout: dict, policy_kind: Optional[str] = None, rank: Optional[int] = None,
                         budget: Optional[Union[int, float]] = None) -> None:
        """Raise a clear ValueError if these feature maps were fitted for another model layout, policy or rank, or
        (when `budget` is given) for a budget more than BUDGET_TOLERANCE from it. `less_cuda.apply` only warns about
        the budget; pass it here to make a mismatch an error."""
        mine = self.layout()
        diff = {k: (mine[k], layout.get(k)) for k in mine if layout.get(k) != mine[k]}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in diff.items())
            raise ValueError(f"LESS checkpoint for {self.base_model!r} does not fit this model ({detail})")
        kind = self.policy.get("kind")
        if policy_kind is not None and kind is not None and policy_kind != kind:
            raise ValueError(f"LESS checkpoint was fitted for policy {kind!r}, not {policy_kind!r}")
        if rank is not None and rank != self.rank:
            raise ValueError(f"LESS checkpoint has rank {self.rank}, but rank {rank} was asked for")
        if budget is not None and (message := self.budget_mismatch(budget)):
            raise ValueError(message)

    def budget_gap(self, budget: Union[int, float]) -> Optional[float]:
        """By what factor (>= 1) `budget` differs from the budget these maps were fitted for, or None when that is
        unknown. Token counts and fractions are compared at the training sequence length."""
        fitted = self.policy.get("budget")
        if fitted is None:
            return None
        if isinstance(fitted, float) != isinstance(budget, float):  # a fraction against a token count
            length = self.training.get("seq_len")
            if not isinstance(length, int) or length < 1:
                return None
            fitted = fitted if isinstance(fitted, float) else fitted / length
            budget = budget if isinstance(budget, float) else budget / length
        return max(budget / fitted, fitted / budget)

    def budget_mismatch(self, budget: Union[int, float]) -> Optional[str]:
        """What to tell a user of `budget` when it is more than BUDGET_TOLERANCE from the fitted budget, else None."""
        gap = self.budget_gap(budget)
        if gap is None or gap <= BUDGET_TOLERANCE:
            return None
        fitted, length = self.policy["budget"], self.training.get("seq_len")
        of = f" of its {length}-token training sequences" if isinstance(fitted, float) and length else ""
        return (f"the LESS checkpoint for {self.base_model!r} was fitted for budget {fitted:g}{of}; budget "
                f"{budget:g} is {gap:.1f}x from it (more than {BUDGET_TOLERANCE:g}x): its feature maps still help, "
                "but feature maps fitted near this budget would help more")

    def warn_budget(self, budget: Optional[Union[int, float]]) -> None:
        """Warn when `budget` is far from the fitted budget (see `budget_mismatch`)."""
        if budget is not None and (message := self.budget_mismatch(budget)):
            warnings.warn(message, stacklevel=3)


def _has_type(value: object, hint: object) -> bool:
    """Whether a JSON-loaded value is of a config field's type (int, str, dict, list[int]; a bool is no int)."""
    origin = typing.get_origin(hint) or hint
    if isinstance(value, bool) or not isinstance(value, origin):
        return False
    return origin is not list or all(_has_type(item, typing.get_args(hint)[0]) for item in value)


def _type_name(hint: object) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


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
        self.layers = nn.ModuleDict(
            {str(i): LayerFeatureMaps(c.num_heads, c.num_kv_heads, c.head_dim, c.kernel_hidden, c.rank)
             for i in c.layers}
        )

    @property
    def rank(self) -> int:
        return self.config.rank

    def has_layer(self, layer: int) -> bool:
        return str(layer) in self.layers

    def layer(self, layer: int) -> LayerFeatureMaps:
        """The φ/ψ of one layer."""
        return self.layers[str(layer)]

    def phi(self, layer: int, q: Tensor) -> Tensor:
        return self.layer(layer).phi(q)

    def psi(self, layer: int, k: Tensor) -> Tensor:
        return self.layer(layer).psi(k)

    def features(self, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(phi(q), psi(k)) of one layer; see `LayerFeatureMaps.features`."""
        return self.layer(layer).features(q, k)

    def save_pretrained(self, directory: Union[str, Path], dtype: torch.dtype = torch.float16) -> None:
        """Write config.json and kernels.safetensors into `directory`, the tensors in `dtype` (fp16 halves the size;
        `from_pretrained` loads them back into fp32)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        tensors = {_stored(name): p.detach().to("cpu", dtype).contiguous() for name, p in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format_version": str(FORMAT_VERSION)})

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], device: Optional[torch.device] = None) -> "FeatureMaps":
        """Load a checkpoint written by `save_pretrained`: config.json through `FeatureMapsConfig.from_file`, the
        weights with safetensors (never pickle), checked by `_read_weights` before any is copied in."""
        directory = Path(directory)
        feature_maps = cls(FeatureMapsConfig.from_checkpoint(directory))
        weights = feature_maps._read_weights(directory / WEIGHTS_NAME)
        feature_maps.load_state_dict({"layers" + name.removeprefix(STORED_PREFIX): t for name, t in weights.items()})
        return feature_maps.to(device) if device is not None else feature_maps

    def _read_weights(self, path: Path) -> dict[str, Tensor]:
        """The tensors of a kernels.safetensors, after checking that they are exactly this module's (names and
        shapes), floating point and finite. Raises ValueError naming the file and what is wrong."""
        try:
            with safe_open(str(path), framework="pt") as f:
                version = (f.metadata() or {}).get("format_version", str(FORMAT_VERSION))
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except SafetensorError as error:  # truncated, or not safetensors at all (e.g. a pickle)
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
        if version != str(FORMAT_VERSION):
            raise ValueError(f"{path} has format_version {version}, this less_cuda reads {FORMAT_VERSION}")
        expected = {_stored(name): tuple(p.shape) for name, p in self.state_dict().items()}
        missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(f"{path} does not hold the tensors its config describes: missing {_listed(missing)}, "
                             f"unexpected {_listed(unexpected)}")
        problems = [f"{name} has shape {tuple(t.shape)}, not {expected[name]}" for name, t in tensors.items()
                    if tuple(t.shape) != expected[name]]
        problems += [f"{name} is {t.dtype}" for name, t in tensors.items() if not t.is_floating_point()]
        problems += [f"{name} holds NaN or infinity" for name, t in tensors.items()
                     if t.is_floating_point() and not torch.isfinite(t).all()]
        if problems:
            raise ValueError(f"{path} is damaged or does not match its config: {_listed(problems)}")
        return tensors

    def check_compatible(self, layout: dict, policy_kind: Optional[str] = None, rank: Optional[int] = None,
                         budget: Optional[Union[int, float]] = None) -> None:
        """`FeatureMapsConfig.check_compatible` of these maps' config."""
        self.config.check_compatible(layout, policy_kind, rank, budget)


def _stored(name: str) -> str:
    """A `FeatureMaps.state_dict` name as the weights file stores it ("layers.5.psi_scale" -> "layer_kernels.5...")."""
    return STORED_PREFIX + name.removeprefix("layers")


def _listed(items: list[str], shown: int = 4) -> str:
    """A list for an error message, cut after `shown` items."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return "[" + ", ".join(items[:shown]) + "]" + more
