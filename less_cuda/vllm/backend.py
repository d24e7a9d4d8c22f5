"""The vLLM attention backend of the LESS state layers: per step, which tokens of the flat batch belong to which
request and which state row is its own, prepared on the host once per step for every LESS layer, so that the
layers' decode step reads device tensors only (no host synchronisation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.attention.backends.utils import mamba_get_block_table_tensor
from vllm.v1.kv_cache_interface import MambaSpec


class LessStateBackend(AttentionBackend):
    """Registered as `MambaAttentionBackendEnum.CUSTOM` by `less_cuda.vllm.register`."""

    @staticmethod
    def get_name() -> str:
        return "LESS_STATE"

    @staticmethod
    def get_builder_cls() -> type["LessStateMetadataBuilder"]:
        return LessStateMetadataBuilder

    @classmethod
    def is_ssm(cls) -> bool:
        return True


@dataclass
class RequestGroup:
    """Requests whose new tokens one op call handles, as a right-padded [n, T] batch (all on the model's device).

    tokens: [n, T] int64, each request's new tokens as rows of the flat batch (a pad repeats the request's last one);
    valid: [n, T] bool, False on padding, or None when no request is padded;
    rows: [n] int64, each request's row in the layer's state tensors;
    real: [num_real] int64, where the real tokens lie in the flattened [n * T] batch, or None when all are real;
    destination: [num_real] int64, the flat-batch row of each real token (where its output goes).
    """

    tokens: torch.Tensor
    valid: Optional[torch.Tensor]
    rows: torch.Tensor
    real: Optional[torch.Tensor]
    destination: torch.Tensor


@dataclass
class LessStateMetadata:
    """One step's batch for the LESS layers.

    fresh: requests with no tokens before this step (a whole prompt or a chunked prefill's first chunk), which the
    layer attends exactly and compresses into their rows; stream: every other request (decodes, later chunks), whose
    new tokens go through the in-place decode step. Either is None when the step has no such request.
    """

    fresh: Optional[RequestGroup]
    stream: Optional[RequestGroup]


def request_group(index: torch.Tensor, query_start: torch.Tensor, state_rows: torch.Tensor,
                  device: torch.device) -> Optional[RequestGroup]:  # fmt: skip
    """The `RequestGroup` of the requests `index` ([n] int64, CPU); query_start [num_reqs + 1] int64 (CPU) delimits each
    request's tokens in the flat batch; state_rows [num_reqs] int64 (device)."""
    if index.numel() == 0:
        return None
    starts = query_start[index]
    lengths = query_start[index + 1] - starts
    steps = torch.arange(int(lengths.max()))
    valid = steps[None, :] < lengths[:, None]
    tokens = starts[:, None] + torch.minimum(steps[None, :], lengths[:, None] - 1)
    padded = not bool(valid.all())
    return RequestGroup(
        tokens=tokens.to(device, non_blocking=True),
        valid=valid.to(device, non_blocking=True) if padded else None,
        rows=state_rows[index.to(state_rows.device, non_blocking=True)],
        real=valid.flatten().nonzero()[:, 0].to(device, non_blocking=True) if padded else None,
        destination=tokens[valid].to(device, non_blocking=True),
    )


class LessStateMetadataBuilder(AttentionMetadataBuilder[LessStateMetadata]):
    kv_cache_spec: MambaSpec
    reorder_batch_threshold: int = 1  # decodes first, as vLLM's Mamba backends order them

    def __init__(self, kv_cache_spec: MambaSpec, layer_names: list[str], vllm_config, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)  # abstract in the base class

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> LessStateMetadata:
        m = common_attn_metadata
        query_start = m.query_start_loc_cpu[: m.num_reqs + 1].to(torch.int64)
        # Tokens each request had before this step, from the host's copy of the lengths where vLLM keeps one.
        seq_lens = m.seq_lens_cpu_upper_bound if m.seq_lens_cpu_upper_bound is not None else m.seq_lens.cpu()
        computed = seq_lens[: m.num_reqs].to(torch.int64) - query_start.diff()
        rows = mamba_get_block_table_tensor(
            m.block_table_tensor, m.seq_lens, self.kv_cache_spec, self.vllm_config.cache_config.mamba_cache_mode
        )[: m.num_reqs, 0].to(torch.int64)
        fresh = computed == 0
        return LessStateMetadata(
            fresh=request_group(fresh.nonzero()[:, 0], query_start, rows, self.device),
            stream=request_group((~fresh).nonzero()[:, 0], query_start, rows, self.device),
        )
