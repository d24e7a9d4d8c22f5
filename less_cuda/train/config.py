"""The settings of a feature-map training run (`less-cuda train`). Importing this module needs no torch, so the
command line can build its parser and answer --help at once."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import torch

    from ..core.policy import Policy, ResolvedPolicy

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch dtypes by name: models.DTYPES
STAGES = ("layer", "end-to-end")  # in the order they run
AUTOCAST_NAMES = ("auto", "bfloat16", "none")  # the end-to-end stage's autocast: auto is bfloat16 on a GPU only
INPUT_SCALINGS = ("rms", "none")  # how φ/ψ's first layers are fitted: see the module input_scaling


@dataclass
class TrainConfig:
    """Everything a training run depends on; validated once, stored with the checkpoint and checked on resume."""

    data: str
    output: str
    model: str = "smollm2"  # a name in models.NAMED_MODELS, a transformers model directory / name, or a .gguf
    gguf_file: Optional[str] = None  # a GGUF file inside the `model` directory
    policy: str = "h2o"
    budget: Union[int, float] = 0.05
    recent: Optional[Union[int, float]] = None
    sinks: int = 4
    rank: int = 8
    hidden: Optional[int] = None  # φ/ψ hidden width; default: head_dim
    seq_len: int = 1024
    sequences: int = 40  # training sequences (at most; fewer if the text is short)
    val_sequences: int = 4  # held-out sequences that pick each layer's best epoch
    val_fraction: float = 0.1  # share of the articles held out for validation
    epochs: int = 14
    batch_size: int = 1
    positions: int = 128  # decode steps scored per sequence in a training step (validation scores all of them)
    lr: float = 2e-2
    schedule: str = "cosine"  # "cosine" (after a 5% linear warm-up) or "constant"
    dtype: str = "float32"  # the model's dtype during capture
    seed: int = 0
    layers: Optional[list[int]] = None  # default: every full-attention layer
    stages: tuple[str, ...] = ("layer",)  # STAGES to run; "end-to-end" alone starts from the checkpoint `init`
    init: Optional[str] = None  # checkpoint directory the end-to-end stage starts from (default: `output`)
    e2e_epochs: int = 2
    e2e_lr: float = 2e-3
    autocast: str = "auto"  # AUTOCAST_NAMES: the end-to-end stage's forward passes (the maps stay fp32)
    input_scaling: str = "rms"  # INPUT_SCALINGS: "rms" fits φ/ψ's first layers as if q, k were unit-scale

    def __post_init__(self) -> None:
        self.policy_spec()  # raises on a bad policy
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.autocast not in AUTOCAST_NAMES:
            raise ValueError(f"autocast must be one of {list(AUTOCAST_NAMES)}, got {self.autocast!r}")
        if self.input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"input_scaling must be one of {list(INPUT_SCALINGS)}, got {self.input_scaling!r}")
        self.stages = tuple(self.stages)
        if not self.stages or any(stage not in STAGES for stage in self.stages) or list(self.stages) != sorted(
                set(self.stages), key=STAGES.index):
            raise ValueError(f"stages must be one or more of {list(STAGES)}, each once and in that order, "
                             f"got {list(self.stages)}")
        if self.init is not None and "layer" in self.stages:
            raise ValueError("init is the starting point of an end-to-end stage run alone; the layer stage starts "
                             "from scratch")
        for name in ("rank", "seq_len", "sequences", "val_sequences", "epochs", "batch_size", "positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if self.e2e_epochs < 0:
            raise ValueError(f"e2e_epochs must be >= 0, got {self.e2e_epochs}")
        for name in ("lr", "e2e_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.resolved_policy().num_slots >= self.seq_len:
            raise ValueError(f"a budget of {self.resolved_policy().budget} tokens never evicts from "
                             f"{self.seq_len}-token sequences: nothing to train")

    def policy_spec(self) -> Policy:
        from ..core.policy import Policy  # torch: imported when a run is configured, not for `less-cuda --help`

        return Policy(kind=self.policy, budget=self.budget, recent=self.recent, sinks=self.sinks)

    def resolved_policy(self) -> ResolvedPolicy:
        return self.policy_spec().resolve(self.seq_len)

    def autocast_dtype(self, device_type: str) -> Optional[torch.dtype]:
        """The dtype the end-to-end stage autocasts its forward passes to on `device_type` (None: no autocast)."""
        import torch

        if self.autocast == "bfloat16" or (self.autocast == "auto" and device_type == "cuda"):
            return torch.bfloat16
        return None

    def learning_rate(self, step: int, total: int, peak: Optional[float] = None) -> float:
        """The learning rate at optimizer step `step` of `total`, peaking at `peak` (default `lr`)."""
        peak = self.lr if peak is None else peak
        if self.schedule == "constant":
            return peak
        warmup = max(1, total // 20)
        if step < warmup:
            return peak * (step + 1) / warmup
        return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def defaults() -> dict[str, Any]:
    """TrainConfig's default values by field name (without building, and so validating, a config)."""
    return {f.name: f.default for f in fields(TrainConfig)}
