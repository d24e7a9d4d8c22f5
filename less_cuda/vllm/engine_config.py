"""Engine settings a LESS model needs, applied when vLLM builds its config (before the model class is imported)."""

from __future__ import annotations

import logging

from vllm.config import VllmConfig
from vllm.model_executor.models.config import VerifyAndUpdateConfig

logger = logging.getLogger(__name__)


class LessStateModelConfig(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            # A LESS state depends on how the prompt arrived: a prompt compressed at once differs from the same
            # tokens restored from a cached prefix and streamed on, so a cache hit would change the outputs.
            logger.warning("LESS layers turn prefix caching off: a restored prefix state would change the outputs")
            cache_config.enable_prefix_caching = False
