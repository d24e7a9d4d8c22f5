"""The feature maps φ/ψ, their checkpoint format, and the shipped checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from less_cuda.checkpoints import SHIPPED, find_checkpoint
from less_cuda.core.feature_maps import CONFIG_NAME, WEIGHTS_NAME, FeatureMaps
from tiny import SMOLLM2_LAYOUT, tiny_config

SHIPPED_DIRS = sorted(p.parent for p in SHIPPED.glob("*/config.json"))


def test_phi_and_psi_are_nonnegative_fp32_with_the_documented_shapes():
    feature_maps = FeatureMaps(tiny_config())
    q = torch.randn(2, 4, 5, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 5, 16, dtype=torch.bfloat16)
    phi, psi = feature_maps.phi(0, q), feature_maps.psi(2, k)
    assert phi.shape == (2, 4, 5, 4) and psi.shape == (2, 2, 5, 4)
    assert phi.dtype == psi.dtype == torch.float32
    assert (phi >= 0).all() and (psi >= 0).all()
    assert feature_maps.has_layer(2) and not feature_maps.has_layer(1)


@pytest.mark.parametrize("world", [1, 2])
def test_a_tensor_parallel_share_computes_its_heads_of_the_whole(world):
    """vLLM splits query and KV heads into equal contiguous blocks per rank; each rank's φ/ψ are those heads'."""
    layer = FeatureMaps(tiny_config()).layer(0)
    with torch.no_grad():  # untrained ψ scales are tiny and equal: make every head's weights differ visibly
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    for rank in range(world):
        share = layer.select_heads(rank, world)
        qs, ks = q.chunk(world, dim=1)[rank], k.chunk(world, dim=1)[rank]
        torch.testing.assert_close(share.phi(qs), layer.phi(q).chunk(world, dim=1)[rank])
        torch.testing.assert_close(share.psi(ks), layer.psi(k).chunk(world, dim=1)[rank])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7)], ids=["decode", "multi-token"])
def test_fused_features_match_the_differentiable_form(dtype, shape):
    """The inference op (one call for phi and psi) against LayerFeatureMaps.phi / .psi, with trained-like weights."""
    from helpers import assert_close_ratio

    feature_maps = FeatureMaps(tiny_config(kernel_hidden=24, rank=8))
    layer = feature_maps.layer(0)
    with torch.no_grad():
        layer.psi_scale.uniform_(-1.0, 1.0)  # negative scales too: psi takes their absolute value
        layer.psi_interaction_scale.uniform_(-1.0, 1.0)
    B, T = shape
    q, k = torch.randn(B, 4, T, 16).to(dtype), torch.randn(B, 2, T, 16).to(dtype)
    expected = feature_maps.phi(0, q), feature_maps.psi(0, k)
    with torch.no_grad():
        phi, psi = feature_maps.features(0, q, k)
    assert_close_ratio(phi, expected[0], torch.float32, what="phi")
    assert_close_ratio(psi, expected[1], torch.float32, what="psi")
    torch.library.opcheck(torch.ops.less_cuda.feature_maps.default, (q, k, *layer.inference_weights()),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_features_keep_gradients_when_they_are_needed():
    feature_maps = FeatureMaps(tiny_config())
    phi, psi = feature_maps.features(0, torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16))
    (phi.sum() + psi.sum()).backward()
    assert feature_maps.layer(0).phi_mlp.w1.grad is not None


def test_untrained_psi_folds_almost_nothing():
    feature_maps = FeatureMaps(tiny_config())
    phi, psi = feature_maps.phi(0, torch.randn(1, 4, 64, 16)), feature_maps.psi(0, torch.randn(1, 2, 64, 16))
    assert psi.max() < 1e-3 * phi.max()  # LESS starts out as its sparse policy


def test_parameter_count_matches_the_documented_formula():
    c = tiny_config()
    per_layer = c.num_heads * (c.head_dim * c.kernel_hidden + c.kernel_hidden * c.rank) + c.num_kv_heads * (
        c.head_dim * c.kernel_hidden + c.kernel_hidden * c.rank + c.rank * c.rank + 2 * c.rank)
    assert sum(p.numel() for p in FeatureMaps(c).parameters()) == per_layer * len(c.layers)


def test_save_and_load_round_trip_in_fp16_storage(tmp_path):
    torch.manual_seed(0)
    feature_maps = FeatureMaps(tiny_config())
    feature_maps.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = FeatureMaps.from_pretrained(tmp_path)
    assert loaded.config == feature_maps.config
    for (name, a), b in zip(feature_maps.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.float32
        assert torch.equal(b, a.half().float()), name
    q = torch.randn(1, 4, 3, 16)
    torch.testing.assert_close(loaded.phi(0, q), feature_maps.phi(0, q), rtol=5e-3, atol=1e-5)


def test_save_in_fp32_is_exact(tmp_path):
    feature_maps = FeatureMaps(tiny_config())
    feature_maps.save_pretrained(tmp_path, dtype=torch.float32)
    loaded = FeatureMaps.from_pretrained(tmp_path)
    for a, b in zip(feature_maps.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_loading_refuses_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        FeatureMaps.from_pretrained(tmp_path)
    FeatureMaps(tiny_config()).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        FeatureMaps.from_pretrained(tmp_path)


def test_check_compatible_names_what_differs():
    feature_maps = FeatureMaps(tiny_config())
    layout = feature_maps.config.layout()
    feature_maps.check_compatible(layout, "h2o", 4)
    with pytest.raises(ValueError, match="num_kv_heads: checkpoint 2 vs model 1"):
        feature_maps.check_compatible({**layout, "num_kv_heads": 1})
    with pytest.raises(ValueError, match="policy 'h2o', not 'lambda'"):
        feature_maps.check_compatible(layout, "lambda")
    with pytest.raises(ValueError, match="rank 4, but rank 8"):
        feature_maps.check_compatible(layout, "h2o", 8)


def test_find_checkpoint_matches_layout_and_policy():
    assert find_checkpoint({**SMOLLM2_LAYOUT, "num_layers": 31}, "h2o") is None
    assert find_checkpoint(SMOLLM2_LAYOUT, "no-such-policy") is None


@pytest.mark.parametrize("kind", ["h2o", "lambda"])
def test_a_checkpoint_ships_for_smollm2_and_each_policy(kind):
    directory = find_checkpoint(SMOLLM2_LAYOUT, kind, 0.05)
    assert directory is not None, f"no shipped {kind} checkpoint for SmolLM2 under {SHIPPED}"
    feature_maps = FeatureMaps.from_pretrained(directory)
    feature_maps.check_compatible(SMOLLM2_LAYOUT, kind, rank=8)
    assert feature_maps.config.layers == list(range(30))
    assert feature_maps.config.policy["kind"] == kind and feature_maps.config.policy["budget"] == 0.05
    assert feature_maps.config.training["seq_len"] == 1024
    weights = Path(directory) / WEIGHTS_NAME
    assert weights.stat().st_size < 5 * 2**20  # small enough for git
    q = torch.randn(1, 9, 4, 64)
    assert torch.isfinite(feature_maps.phi(29, q)).all() and torch.isfinite(feature_maps.psi(29, q[:, :3])).all()
