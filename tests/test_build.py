"""The build record and its checks: less_cuda.backends() against the extension's real registrations, and the import
errors for an extension built against another torch, without a record, or that fails to load. `make test-install`
checks the same on a real `pip install .` in a fresh venv (tests/install_check.sh)."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import less_cuda
from less_cuda import _build, _build_info

ROOT = Path(__file__).resolve().parents[1]
CUDA_OPS = ["decode_attention", "score_and_evict_", "state_fold", "state_update_", "decode_step_"]


def test_backends_match_the_registrations():
    b = less_cuda.backends()
    registered = [torch._C._dispatch_has_kernel_for_dispatch_key(f"less_cuda::{op}", "CUDA") for op in CUDA_OPS]
    assert b.cpu
    assert [b.cuda] * len(CUDA_OPS) == registered
    assert bool(b.cuda_archs) == b.cuda
    if os.environ.get("LESS_CUDA_EXPECT_CUDA") == "1":
        assert b.cuda, "LESS_CUDA_EXPECT_CUDA=1 but less_cuda.backends() reports no CUDA kernels"
    assert (b.torch_version, b.torch_cuda_version) == (torch.__version__, torch.version.cuda)
    assert b.gpu_available == torch.cuda.is_available()
    text = str(b)
    assert "CPU:  built" in text and f"torch {torch.__version__}" in text
    assert ("CUDA: built for archs " + " ".join(b.cuda_archs) if b.cuda else "CUDA: not built") in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.cuda = not b.cuda


def test_backends_refuses_a_record_of_another_binary(monkeypatch):
    monkeypatch.setattr(_build_info, "WITH_CUDA", not _build_info.WITH_CUDA)
    with pytest.raises(RuntimeError, match="come from different builds"):
        less_cuda.backends()


def test_another_torch_refuses_to_load_with_the_fix(monkeypatch):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "2.0.0+cu999")
    with pytest.raises(ImportError) as e:
        _build.load_extension()
    message = str(e.value)
    assert f"built against torch 2.0.0+cu999, but torch {torch.__version__} is installed" in message
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in message
    assert "torch==2.0.0, the 2.0.0+cu999 build" in message


def test_a_missing_record_refuses_to_load(monkeypatch):
    monkeypatch.setitem(sys.modules, "less_cuda._build_info", None)  # None in sys.modules makes the import fail
    with pytest.raises(ImportError, match=r"no record .* --no-build-isolation --force-reinstall"):
        _build.load_extension()


def test_an_unloadable_extension_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "less_cuda._C", None)
    with pytest.raises(ImportError, match=r"less_cuda\._C .* failed to load: .* --no-build-isolation --force-reinstall"):
        _build.load_extension()


def test_the_build_pins_the_torch_of_the_dev_venv():
    """pyproject.toml's build requirement is requirements-dev.txt's torch: `pip install .` builds against the torch
    the tests run on (and the wheel then requires it)."""
    tomllib = pytest.importorskip("tomllib")
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    dev_torch = re.search(r"^torch==\S+", (ROOT / "requirements-dev.txt").read_text(), re.M)
    assert dev_torch and dev_torch.group(0) in build_requires
