"""The vLLM attention backend of the LESS state layers: per step, which tokens of the flat batch belong to which
request, how many tokens each request had before, and which state row is its own."""

from __future__ import annotations

from dataclasses import dataclass

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
class LessStateMetadata:
    """One step's batch. Requests are rows; their tokens are contiguous in the flat token dimension.

    query_start: [num_reqs + 1] CPU int64, where each request's new tokens start (and the total at the end);
    computed: [num_reqs] CPU int64, tokens each request had before this step (0: a new prompt, which the layer
    compresses; more: the new tokens stream through the decode rule);
    state_rows: [num_reqs] int64 on the model's device, each request's row in the layer's state tensors.
    """

    query_start: torch.Tensor
    computed: torch.Tensor
    state_rows: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.query_start[-1])


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
        seq_lens = m.seq_lens[: m.num_reqs].to("cpu", torch.int64)
        rows = mamba_get_block_table_tensor(
            m.block_table_tensor, m.seq_lens, self.kv_cache_spec, self.vllm_config.cache_config.mamba_cache_mode
        )[: m.num_reqs, 0]
        return LessStateMetadata(query_start, seq_lens - query_start.diff(), rows.to(torch.int64))
