"""Engine settings a LESS model needs, applied when vLLM builds its config (before the model class is imported)."""

from __future__ import annotations

import logging

from vllm.config import VllmConfig
from vllm.model_executor.models.config import VerifyAndUpdateConfig

logger = logging.getLogger(__name__)

LESS_LAYER = "less_state"
"""The layer_types entry of a layer LESS serves (it was "full_attention")."""


class LessStateModelConfig(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            # A LESS state depends on how the prompt arrived: a prompt compressed at once differs from the same
            # tokens restored from a cached prefix and streamed on, so a cache hit would change the outputs.
            logger.warning("LESS layers turn prefix caching off: a restored prefix state would change the outputs")
            cache_config.enable_prefix_caching = False
        hf_config = vllm_config.model_config.hf_config
        layer_types = getattr(hf_config, "layer_types", None)
        if layer_types:
            # vLLM reads a layer_types list of attention layers only as "no state layers" and then never sizes the
            # states (model_config.is_hybrid); Llama's config has no list, which vLLM reads as hybrid. The
            # full-attention layers are LESS state layers here, so the list says so. vLLM's Llama and Qwen2 models
            # read the list only to check sliding windows ("sliding_attention" entries are left as they are).
            hf_config.layer_types = [LESS_LAYER if kind == "full_attention" else kind for kind in layer_types]
            rope = getattr(hf_config, "rope_parameters", None)
            if isinstance(rope, dict) and "full_attention" in rope:  # per layer type (Gemma 3): LESS layers keep theirs
                rope.setdefault(LESS_LAYER, rope["full_attention"])
