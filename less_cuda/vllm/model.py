"""LESS model classes for vLLM: the model's own classes with every full-attention layer's `Attention` replaced by a
`LessStateLayer`. The projections, RoPE and weights are the base model's, loaded unchanged."""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from . import ARCHITECTURE_FOR_MODEL_TYPE
from .layer import LessStateLayer, state_dtypes, state_shapes
from .settings import ServingSettings, serving_settings


def check_family(hf_config, class_name: str) -> None:
    """Refuse a model whose layers are not the ones the LESS class `class_name` wraps."""
    served = [kind for kind, name in ARCHITECTURE_FOR_MODEL_TYPE.items() if name == class_name]
    if hf_config.model_type not in served:
        wanted = ARCHITECTURE_FOR_MODEL_TYPE.get(hf_config.model_type)
        raise ValueError(f"{class_name} serves model_type {' / '.join(served)}, not {hf_config.model_type!r}; "
                         + (f"use {wanted}" if wanted else "LESS has no vLLM model class for that architecture yet"))


def settings_for(vllm_config: VllmConfig) -> ServingSettings:
    model_config = vllm_config.model_config
    return serving_settings(model_config.hf_config, model_config.max_model_len)


def local_kv_heads(vllm_config: VllmConfig) -> int:
    """KV heads on this tensor-parallel rank. Each rank holds its own heads' slots, H and z."""
    total = vllm_config.model_config.get_total_num_kv_heads()
    tp = vllm_config.parallel_config.tensor_parallel_size
    if total % tp:
        raise ValueError(f"LESS shards KV heads over tensor-parallel ranks: {total} KV heads do not split over {tp}")
    return total // tp


class LessStateModel:
    """What every LESS model class adds to vLLM's class for its family (the next base): after the base model is
    built, each full-attention layer's `Attention` becomes a `LessStateLayer`; the state shapes vLLM allocates.
    The family's attention modules must expose `attn`, `num_heads`, `num_kv_heads`, `head_dim` and `scaling`, as
    vLLM's Llama, Qwen2 and Gemma 3 attention do. Settings: `less_cuda.vllm.settings`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        check_family(vllm_config.model_config.hf_config, type(self).__name__)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = settings_for(vllm_config)
        device = self.lm_head.weight.device if hasattr(self.lm_head, "weight") else torch.device("cpu")
        feature_maps = settings.load_feature_maps(device)
        tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        for attention in (getattr(layer, "self_attn", None) for layer in self.model.layers):
            if attention is None:  # a pipeline stage's missing layer
                continue
            if getattr(attention.attn, "sliding_window", None) is not None:
                continue  # sliding-window layers keep vLLM's own paged cache
            index = int(attention.attn.layer_name.split(".")[-3])  # "model.layers.<i>.self_attn.attn"
            maps = None
            if feature_maps is not None:
                if not feature_maps.has_layer(index):
                    raise ValueError(f"the LESS checkpoint has no feature maps for layer {index}; vLLM needs every "
                                     "full-attention layer covered (one state size for all)")  # fmt: skip
                maps = feature_maps.layer(index)
                if tp_size > 1:
                    maps = maps.select_heads(tp_rank, tp_size)
            attention.attn = LessStateLayer(
                attention.attn.layer_name, attention.num_heads, attention.num_kv_heads, attention.head_dim,
                attention.scaling, vllm_config.model_config.dtype, settings, maps,
            )  # fmt: skip

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        shapes = state_shapes(settings_for(vllm_config), local_kv_heads(vllm_config),
                              vllm_config.model_config.get_head_size())  # fmt: skip
        return tuple(shapes.values())

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return tuple(state_dtypes(settings_for(vllm_config), vllm_config.model_config.dtype).values())

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        # Each state tensor is copied whole (only used by vLLM's prefix caching, which LESS turns off).
        return (get_temporal_copy_spec,) * 8


class LessLlamaForCausalLM(LessStateModel, LlamaForCausalLM, HasInnerState, IsHybrid):
    """Llama-family causal LM (Llama, SmolLM2, ...) under LESS."""


class LessQwen2ForCausalLM(LessStateModel, Qwen2ForCausalLM, HasInnerState, IsHybrid):
    """Qwen2-family causal LM (Qwen2, Qwen2.5, Qwen2.5-Coder) under LESS. Layers under vLLM's sliding window (Qwen2's
    `use_sliding_window` above `max_window_layers`) keep vLLM's paged cache."""


class LessGemma3ForCausalLM(LessStateModel, Gemma3ForCausalLM, HasInnerState, IsHybrid):
    """Gemma 3 (text) under LESS: its full-attention layers hold a LESS state, its sliding-window layers keep vLLM's
    paged cache (the window is already a fixed size)."""
