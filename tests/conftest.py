"""Fixtures shared by several test modules."""

import importlib.util
import os

import pytest
import torch

# The vLLM plugin tests need vLLM, which lives in its own venv (`make test-vllm`); other venvs do not collect them.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_plugin"]

# Hypothesis profiles (tests/test_fuzz_ops.py), chosen with HYPOTHESIS_PROFILE; the vLLM venv has no hypothesis and
# no fuzz tests. "ci", the default: a fixed seed, so that every run draws the same cases (at least 500 per op), and
# a per-example deadline that turns a pathologically slow case into a failure. "long": fresh random cases on each
# run, twenty times as many; a failure prints the blob that replays it (@reproduce_failure). Neither writes an
# example database into the tree.
if importlib.util.find_spec("hypothesis"):
    from datetime import timedelta

    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, database=None, max_examples=520, deadline=timedelta(seconds=2))
    settings.register_profile("long", database=None, max_examples=10_400, deadline=timedelta(seconds=5),
                              print_blob=True)  # fmt: skip
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny ops: intra-op threads add only hand-offs, which dominate on a busy 2-core machine.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct in fp32, frozen, loaded once for the whole session. Tests that
    switch its attention implementation or wrap `generate` restore them (apply / LessPress do)."""
    from helpers import missing_input
    from less_cuda.hf.models import load_model

    try:
        return load_model("smollm2", torch.float32)
    except FileNotFoundError as error:  # the model wheel is installed by `make test`
        missing_input(str(error))
