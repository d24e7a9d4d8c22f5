"""LESS in vLLM: an out-of-tree plugin in which every full-attention layer is a constant-size per-request state.

A LESS layer's cache (fixed K/V slots, positions, H2O scores, and the low-rank H, z) does not grow with the
sequence, which is what vLLM's hybrid allocator manages for Mamba-style layers. The plugin therefore needs no patch
to vLLM: its layers subclass `MambaBase`, its backend is registered as the custom Mamba backend, and its model
classes are registered by name.

Installed with `pip install .[vllm]`, vLLM calls `register` through the `vllm.general_plugins` entry point. Choose
LESS for a model with, e.g.:

    LLM(model_dir, hf_overrides={"architectures": ["LessLlamaForCausalLM"], "less_checkpoint": ckpt_dir,
                                 "less_budget": 128}, enable_prefix_caching=False)

See `less_cuda.vllm.settings` for every override.
"""

ARCHITECTURE_FOR_MODEL_TYPE = {"llama": "LessLlamaForCausalLM", "mistral": "LessLlamaForCausalLM",
                               "qwen2": "LessQwen2ForCausalLM", "gemma3_text": "LessGemma3ForCausalLM"}
"""The LESS class that serves a transformers config's model_type, built on vLLM's class for that family (readable
without vLLM)."""

ARCHITECTURES = {name: f"less_cuda.vllm.model:{name}" for name in dict.fromkeys(ARCHITECTURE_FOR_MODEL_TYPE.values())}
"""The LESS model classes by name, and where each lives."""


SPLITTING_OP = "vllm::less_state_attention"
"""The registered op of a LESS layer's step, where vLLM's compiled graph splits."""


def register() -> None:
    """vLLM's plugin hook: register the LESS model classes and the state layer's backend. Safe to call twice."""
    from vllm import ModelRegistry
    from vllm.config import CompilationConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum, register_backend

    from .engine_config import LessStateModelConfig

    for name, path in ARCHITECTURES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, path)
        MODELS_CONFIG_MAP[name] = LessStateModelConfig
    register_backend(MambaAttentionBackendEnum.CUSTOM, "less_cuda.vllm.backend.LessStateBackend", is_mamba=True)
    # The layers' op (less_cuda.vllm.layer) runs between compiled pieces, as vLLM's own attention ops do.
    if SPLITTING_OP not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(SPLITTING_OP)
