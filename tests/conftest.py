"""Fixtures shared by several test modules."""

import importlib.util

import pytest
import torch

# The vLLM plugin tests need vLLM, which lives in its own venv (`make test-vllm`); other venvs do not collect them.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_plugin"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny ops: intra-op threads add only hand-offs, which dominate on a busy 2-core machine.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
