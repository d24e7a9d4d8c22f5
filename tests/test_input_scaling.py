"""Fitting φ/ψ on queries and keys far from unit scale (`less_cuda.input_scaling`): the trainers' reparametrisation
is exactly training on inputs divided by their RMS, and it keeps a layer with large keys trainable."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from less_cuda import cli

from less_cuda.train import end_to_end as train_end_to_end
from less_cuda.train.capture import capture
from less_cuda.hf.data import tokenizer_splits
from less_cuda.core.feature_maps import FeatureMapsConfig, LayerFeatureMaps
from less_cuda.hf.models import load_model
from less_cuda.train.input_scaling import input_rms, param_groups, scale_initial_weights, set_learning_rate
from less_cuda.core.policy import Policy
from less_cuda.train.config import TrainConfig
from less_cuda.train.layer_stage import LayerData, LayerTrainer, validation_mse
from tiny import tiny_args


def _loss(maps: LayerFeatureMaps, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Any loss that reaches every weight: the linear attention weights against a target."""
    phi = maps.phi(q).unflatten(1, (k.shape[1], -1))  # [B, Hkv, G, T, R]
    return ((phi * maps.psi(k)[:, :, None]).sum(-1) - 1e-3).square().mean()


def test_scaled_first_layers_train_exactly_as_on_unit_scale_inputs():
    torch.manual_seed(0)
    q, k = 6.0 * torch.randn(2, 4, 32, 16), 0.2 * torch.randn(2, 2, 32, 16)
    q_rms, k_rms = input_rms(q), input_rms(k)
    assert q_rms == pytest.approx(6.0, rel=0.1) and k_rms == pytest.approx(0.2, rel=0.1)
    for bad in (torch.zeros(2, 3), torch.full((2, 3), float("nan")), torch.full((2, 3), float("inf"))):
        with pytest.raises(ValueError, match="cannot fit feature maps on inputs with an RMS of"):
            input_rms(bad)
    unit = LayerFeatureMaps(4, 2, 16, hidden=8, rank=4)
    with torch.no_grad():
        unit.psi_scale.fill_(1.0)
    scaled = copy.deepcopy(unit)
    scale_initial_weights(scaled, q_rms, k_rms)
    # AdamW ignores the gradient's scale up to its eps, which would matter for the nearly dead units here
    optimizers = [torch.optim.AdamW(unit.parameters(), lr=1e-2, weight_decay=0.0, eps=1e-30),
                  torch.optim.AdamW(param_groups({"0": (scaled, q_rms, k_rms)}), lr=1.0, weight_decay=0.0, eps=1e-30)]
    set_learning_rate(optimizers[1], 1e-2)
    for _ in range(5):
        for maps, optimizer, inputs in ((unit, optimizers[0], (q / q_rms, k / k_rms)), (scaled, optimizers[1], (q, k))):
            optimizer.zero_grad()
            _loss(maps, *inputs).backward()
            optimizer.step()
    # w1 = u / c, every other weight the same: the same functions of the raw inputs
    torch.testing.assert_close(scaled.phi_mlp.w1, unit.phi_mlp.w1 / q_rms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scaled.psi_mlp.w1, unit.psi_mlp.w1 / k_rms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scaled.phi_mlp.w2, unit.phi_mlp.w2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scaled.psi_interaction, unit.psi_interaction, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scaled.phi(q), unit.phi(q / q_rms), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(unit.phi_mlp.w2, LayerFeatureMaps(4, 2, 16, 8, 4).phi_mlp.w2)  # it did train


def test_a_layer_with_large_keys_stays_trainable(layer_inputs, tmp_path):  # noqa: F811
    """Keys 40x their natural scale (as Gemma 3's can be) saturate the MLPs' first layer: with `rms` scaling the
    state still beats the sparse policy on held-out sequences."""
    cap, _ = layer_inputs
    cap = copy.copy(cap)
    factor = 40.0 / input_rms(cap.k)
    cap.k, cap.q = cap.k * factor, cap.q / factor  # the same logits, with keys at RMS 40
    cfg = TrainConfig(data="unused", output=str(tmp_path), seq_len=48, budget=10, epochs=12, lr=2e-2, positions=38,
                      rank=4, hidden=8)
    kcfg = FeatureMapsConfig(base_model="tiny", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64,
                             layers=[1],
                             policy={"kind": "h2o", "budget": 10, "recent": None, "sinks": 4}, rank=4, kernel_hidden=8)
    data = LayerData.build(cap, Policy("h2o", budget=10).resolve(48), torch.device("cpu"), "policy")
    train, val = data.select(torch.tensor([0])), data.select(torch.tensor([1]))
    trainer = LayerTrainer(cfg, kcfg, 1, tmp_path, torch.device("cpu"), input_rms(train.q), input_rms(train.k))
    trainer.fit(train, val)
    trainer.feature_maps.load_state_dict(trainer.best_state)
    assert validation_mse(val, trainer.feature_maps, 1) < 0.9 * validation_mse(val, None, 1)


def test_training_records_the_input_scaling_and_refuses_an_unknown_one(tiny_model_dir, tmp_path):  # noqa: F811
    cli.main(tiny_args(tiny_model_dir, tmp_path / "none", "--input-scaling", "none"))
    config = json.loads((tmp_path / "none" / "config.json").read_text())
    assert config["training"]["input_scaling"] == "none"
    with pytest.raises(ValueError, match="input_scaling must be one of"):
        TrainConfig(data="x", output="y", input_scaling="layernorm")


def test_the_end_to_end_stage_steps_the_first_layers_by_their_inputs_scale(tiny_model_dir, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    seen = {}
    init = train_end_to_end.EndToEndTrainer.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        scales = {id(p): group["lr_scale"] for group in self.optimizer.param_groups for p in group["params"]}
        for layer, maps in self.feature_maps.layers.items():
            seen[int(layer)] = [scales[id(w)] for w in (maps.phi_mlp.w1, maps.psi_mlp.w1, maps.phi_mlp.w2)]

    monkeypatch.setattr(train_end_to_end.EndToEndTrainer, "__init__", spy)
    cli.main(tiny_args(tiny_model_dir, tmp_path / "ckpt", "--stages", "layer,end-to-end", "--epochs", "1",
                       "--e2e-epochs", "1", "--batch-size", "2"))
    model, tokenizer = load_model(str(tiny_model_dir))
    ids = tokenizer_splits(tiny_model_dir / "articles.txt", tokenizer, 64, 0.25).train[:2]
    captured = capture(model, ids, [0, 1], batch_size=2)
    for layer in (0, 1):
        assert seen[layer] == pytest.approx([1 / input_rms(captured[layer].q), 1 / input_rms(captured[layer].k), 1.0])
