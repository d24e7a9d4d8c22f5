"""vLLM plugin tests: they run in the vLLM venv (`make test-vllm`), one in-process engine at a time.

The environment below is what makes a CPU engine start in seconds: no engine subprocess, a small KV-cache
allowance. `make test-vllm` also sets OMP_NUM_THREADS=1: two OpenMP threads on our 2 cores made vLLM about 20
times slower, and it must be set before torch loads.
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from engines import readme_prompts  # noqa: E402

from less_cuda.hf.models import export_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def outside_the_source_tree(tmp_path_factory):
    """vLLM inspects model classes in `python -m` subprocesses, which put their working directory first on sys.path:
    run from the repository root they would import its less_cuda/ (built for the main venv's torch), not the one
    installed here."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """SmolLM2 as a transformers directory (safetensors), converted once from the shipped GGUF."""
    return export_model("smollm2", tmp_path_factory.mktemp("smollm2"))


def load_exported(directory: Path):
    """(model, tokenizer) from an exported directory with transformers, fp32: the side vLLM is compared with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def hf_model(model_dir):
    return load_exported(model_dir)


@pytest.fixture(scope="session")
def prompts(hf_model) -> list[list[int]]:
    return readme_prompts(hf_model[1])


def converted_model_fixtures(name: str, directory_fixture: str):
    """Session fixtures for a named model (`hf.models.NAMED_MODELS`): its transformers directory (safetensors, fp32),
    converted once from its GGUF, and (model, tokenizer) loaded from it once."""

    @pytest.fixture(scope="session")
    def directory(tmp_path_factory) -> Path:
        return export_model(name, tmp_path_factory.mktemp(directory_fixture))

    @pytest.fixture(scope="session")
    def loaded(request):
        return load_exported(request.getfixturevalue(directory_fixture))

    return directory, loaded


qwen2_dir, qwen2_hf = converted_model_fixtures("qwen2.5-coder-0.5b", "qwen2_dir")  # Qwen2.5-Coder-0.5B-Instruct
gemma3_dir, gemma3_hf = converted_model_fixtures("gemma3-270m", "gemma3_dir")  # Gemma 3 270M
