"""What a cache holds, in bytes: a `LessCache` against the full cache of the same tokens."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.cache_utils import CacheLayerMixin


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held per cache layer, and what a full cache would hold for the same tokens (K and V of every column
    seen, padding included, as transformers' DynamicCache stores them). Layers LESS does not compress count the same
    in both."""

    layer_bytes: list[int]
    full_layer_bytes: list[int]

    @property
    def total(self) -> int:
        return sum(self.layer_bytes)

    @property
    def full_total(self) -> int:
        return sum(self.full_layer_bytes)

    @property
    def ratio(self) -> float:
        """total / full_total."""
        return self.total / max(self.full_total, 1)

    def __str__(self) -> str:
        mib = 2.0**20
        return f"{self.total / mib:.2f} MiB vs {self.full_total / mib:.2f} MiB for a full cache ({self.ratio:.1%})"


def layer_nbytes(layer: CacheLayerMixin) -> int:
    """Bytes of a transformers cache layer's K and V."""
    return sum(t.nelement() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
