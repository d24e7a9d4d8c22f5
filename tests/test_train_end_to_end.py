"""The end-to-end stage of training on the tiny Llama: it lowers the validation KL, resumes exactly, checks where
it starts from, and two torchrun processes equal one with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from less_cuda import cli

from less_cuda.train import end_to_end as train_end_to_end
from less_cuda.train import epochs
from less_cuda.hf.attention import attention_function
from less_cuda.hf.parallel import parallel_attention_function
from less_cuda.core.feature_maps import FeatureMaps
from less_cuda.core.policy import Policy
from less_cuda.core.step_attention import kept_attention
from less_cuda.train.config import TrainConfig
from tiny import REPO, tiny_args, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def end_to_end_args(model_dir, output, init, *extra: str) -> list[str]:
    return tiny_args(model_dir, output, "--stages", "end-to-end", "--init", str(init), "--e2e-epochs", "3",
                     "--batch-size", "2", *extra)


@pytest.fixture(scope="module")
def layer_checkpoint(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """Feature maps of the tiny Llama after the per-layer stage: where the end-to-end stage starts."""
    output = tmp_path_factory.mktemp("layer_stage")
    cli.main(tiny_args(tiny_model_dir, output, "--epochs", "3", "--lr", "1e-2"))
    return output


def test_both_stages_in_one_run_lower_the_validation_kl(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    cli.main(tiny_args(tiny_model_dir, tmp_path / "ckpt", "--stages", "layer,end-to-end", "--epochs", "3",
                       "--lr", "1e-2", "--e2e-epochs", "3", "--e2e-lr", "1e-2"))
    out = capsys.readouterr().out
    assert "LESS / sparse" in out and "end-to-end stage, after" in out and "s per step, peak memory" in out
    report = json.loads((tmp_path / "ckpt" / "report.json").read_text())
    assert report["stages"] == ["layer", "end-to-end"] and set(report["validation_mse"]) == {"0", "1"}
    e2e = report["end_to_end"]
    assert e2e["validation_kl_best"] < e2e["validation_kl_before"], e2e
    assert e2e["perplexity_after"]["less"] != e2e["perplexity_before"]["less"]
    assert e2e["perplexity_after"]["full"] == e2e["perplexity_before"]["full"]
    assert e2e["timing"]["seconds_per_step"] > 0 and e2e["timing"]["peak_memory_gib"] > 0
    assert not (tmp_path / "ckpt" / "progress").exists()
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["training"]["stages"] == ["layer", "end-to-end"]


def test_end_to_end_alone_starts_from_init_and_changes_the_maps(tiny_model_dir, layer_checkpoint, tmp_path):  # noqa: F811
    cli.main(end_to_end_args(tiny_model_dir, tmp_path / "e2e", layer_checkpoint, "--e2e-lr", "1e-2"))
    before, after = read_checkpoint(layer_checkpoint), read_checkpoint(tmp_path / "e2e")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    config = json.loads((tmp_path / "e2e" / "config.json").read_text())
    assert config["training"]["init"] == layer_checkpoint.name
    assert config["training"]["init_training"]["stages"] == ["layer"]


def test_end_to_end_resume_after_an_interruption_gives_the_same_checkpoint(tiny_model_dir, layer_checkpoint,  # noqa: F811
                                                                           tmp_path, monkeypatch):
    cli.main(end_to_end_args(tiny_model_dir, tmp_path / "straight", layer_checkpoint))

    save = epochs.save_training_state

    def interrupted(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # after the first epoch's state is saved

    monkeypatch.setattr(epochs, "save_training_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(end_to_end_args(tiny_model_dir, tmp_path / "resumed", layer_checkpoint))
    monkeypatch.undo()
    progress = sorted(p.name for p in (tmp_path / "resumed" / "progress").iterdir())
    assert progress == ["end_to_end.partial.safetensors", "train_config.json"]
    cli.main(end_to_end_args(tiny_model_dir, tmp_path / "resumed", layer_checkpoint))
    straight, resumed = read_checkpoint(tmp_path / "straight"), read_checkpoint(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    reports = [json.loads((tmp_path / d / "report.json").read_text())["end_to_end"] for d in ("straight", "resumed")]
    assert reports[0]["validation_kl_before"] == reports[1]["validation_kl_before"]
    assert reports[0]["validation_kl_best"] == reports[1]["validation_kl_best"]


def test_end_to_end_alone_refuses_a_mismatched_or_missing_start(tiny_model_dir, layer_checkpoint, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="policy 'h2o', not 'lambda'"):
        cli.main(end_to_end_args(tiny_model_dir, tmp_path / "a", layer_checkpoint, "--policy", "lambda"))
    with pytest.raises(ValueError, match="rank 4, but rank 2"):
        cli.main(end_to_end_args(tiny_model_dir, tmp_path / "b", layer_checkpoint, "--rank", "2"))
    with pytest.raises(FileNotFoundError, match="no LESS checkpoint"):
        cli.main(end_to_end_args(tiny_model_dir, tmp_path / "c", tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="init is the starting point"):
        cli.main(tiny_args(tiny_model_dir, tmp_path / "d", "--init", str(layer_checkpoint)))
    with pytest.raises(ValueError, match="stages must be"):
        cli.main(tiny_args(tiny_model_dir, tmp_path / "e", "--stages", "end-to-end,layer"))


def test_end_to_end_defaults_to_the_checkpoint_in_output(tiny_model_dir, layer_checkpoint, tmp_path):  # noqa: F811
    output = tmp_path / "ckpt"
    shutil.copytree(layer_checkpoint, output)
    cli.main(tiny_args(tiny_model_dir, output, "--stages", "end-to-end", "--e2e-epochs", "1", "--batch-size", "2"))
    assert json.loads((output / "report.json").read_text())["stages"] == ["end-to-end"]
    assert any(not torch.equal(a, b) for a, b in zip(read_checkpoint(layer_checkpoint).values(),
                                                     read_checkpoint(output).values()))


def test_end_to_end_under_bfloat16_autocast_lowers_the_validation_kl(tiny_model_dir, layer_checkpoint, tmp_path):  # noqa: F811
    # The GPU default (`--autocast auto`); run here under CPU autocast, which takes the same code path.
    cli.main(end_to_end_args(tiny_model_dir, tmp_path / "bf16", layer_checkpoint, "--e2e-lr", "1e-2",
                             "--autocast", "bfloat16"))
    e2e = json.loads((tmp_path / "bf16" / "report.json").read_text())["end_to_end"]
    assert e2e["validation_kl_best"] < e2e["validation_kl_before"], e2e
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["training"]["autocast"] == "bfloat16"


def test_autocast_is_bfloat16_on_a_gpu_only_by_default():
    cfg = lambda **kw: TrainConfig(data="x.txt", output="o", **kw)  # noqa: E731
    assert cfg().autocast_dtype("cuda") == torch.bfloat16 and cfg().autocast_dtype("cpu") is None
    assert cfg(autocast="bfloat16").autocast_dtype("cpu") == torch.bfloat16
    assert cfg(autocast="none").autocast_dtype("cuda") is None
    with pytest.raises(ValueError, match="autocast must be one of"):
        cfg(autocast="float16")


def test_the_training_attention_under_autocast_stays_near_fp32_and_reaches_the_maps(tiny_model_dir,  # noqa: F811
                                                                                    layer_checkpoint):
    """Under autocast the projections hand the attention bf16 (or mixed) q, k, v; the ops take them in bf16 with
    φ/ψ in fp32. The KL against the full model stays within bf16 rounding of the fp32 one, with gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval().requires_grad_(False)
    maps = FeatureMaps.from_pretrained(layer_checkpoint)
    function = parallel_attention_function(Policy(kind="h2o", budget=8), maps, kept_attention)
    ids = torch.randint(0, 260, (2, 64), generator=torch.Generator().manual_seed(0))

    def kl(autocast: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                full = model(input_ids=ids, use_cache=False).logits
            with attention_function(model, function, "less_autocast_test"):
                less = model(input_ids=ids, use_cache=False).logits
        assert less.dtype == (torch.bfloat16 if autocast else torch.float32)
        return train_end_to_end.next_token_kl(full, less, 9) / (ids.numel() - 2 * 9)

    exact, low = kl(False), kl(True)
    value, expected = float(low.detach()), float(exact.detach())
    assert 0 < value and abs(value - expected) < 0.1 * expected + 1e-3, (value, expected)
    low.backward()
    grads = [p.grad for p in maps.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_the_same_global_batch(tiny_model_dir, layer_checkpoint,  # noqa: F811
                                                                     tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(*cmd):
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    # AdamW turns gradients that differ only by rounding into steps of up to ±lr on weights whose gradient is near
    # zero; --input-scaling rms would raise the first layers' lr by 1 / (their inputs' RMS), about 6 for this random
    # model, beyond the rounding tolerance below. The scaling is the same computation on every process.
    args = ("--input-scaling", "none")
    run(sys.executable, "-m", "less_cuda", *end_to_end_args(tiny_model_dir, tmp_path / "one", layer_checkpoint, *args))
    run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "less_cuda",
        *end_to_end_args(tiny_model_dir, tmp_path / "two", layer_checkpoint, *args))
    # Each process computes half of every batch and the gradients are summed, so only the order of the sums differs
    # from one process: equal to rounding (the checkpoint is stored in fp16).
    single, parallel = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    assert any(not torch.equal(single[n], read_checkpoint(layer_checkpoint)[n]) for n in single)
    for name in single:
        torch.testing.assert_close(parallel[name].float(), single[name].float(), rtol=2e-3, atol=2e-3, msg=name)
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two")]
    assert (reports[0]["processes"], reports[1]["processes"]) == (1, 2)
    kl = [r["end_to_end"]["validation_kl_best"] for r in reports]
    assert kl[1] == pytest.approx(kl[0], rel=1e-3)
