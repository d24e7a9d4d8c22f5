"""Training the feature maps: data splitting, the all-steps LESS output against the token-by-token decode loop and
the parallel form, the per-layer stage from the command line, resuming, and torchrun sharding (the end-to-end stage:
test_train_end_to_end.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import WIKITEXT, assert_close_ratio, missing_input
from less_cuda import cli
from less_cuda.core import ops
from less_cuda.core import reference
from less_cuda.core import state as slots
from less_cuda.train import epochs
from less_cuda.train import layer_stage as train_layers
from less_cuda.hf.data import expected_bos, load_splits, pack, read_text, split_articles
from less_cuda.core.feature_maps import FeatureMaps
from less_cuda.core.policy import Policy
from less_cuda.core.step_attention import kept_attention, policy_steps, step_attention
from tiny import REPO, article_text, tiny_args, read_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def test_articles_split_at_top_level_headings_only():
    articles = split_articles(article_text(n_articles=3))
    assert len(articles) == 3
    assert all(a.startswith(f" = Article {i} = ") for i, a in enumerate(articles))
    assert all(" = = Part = = " in a for a in articles)


def test_text_without_headings_splits_at_blank_lines():
    pieces = split_articles("first doc\nline two\n\n\nsecond doc\n \nthird")
    assert pieces == ["first doc\nline two", "second doc", "third"]


def test_pack_cuts_fixed_length_sequences_with_separators():
    packed = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, separator=0)
    assert packed.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]  # the tail [7, 8, 9] does not fill a sequence
    with_bos = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, separator=0, bos=99)
    assert with_bos.tolist() == [[99, 1, 2, 3], [99, 0, 4, 5], [99, 0, 6, 7]]


class _Tokenizer:
    """The part of a transformers tokenizer `expected_bos` reads."""

    def __init__(self, bos_token_id, adds_bos: bool):
        self.bos_token_id, self.adds_bos = bos_token_id, adds_bos

    def __call__(self, text: str) -> dict:
        return {"input_ids": ([self.bos_token_id] if self.adds_bos else []) + [ord(c) for c in text]}


def test_sequences_start_with_bos_only_when_the_tokenizer_adds_one():
    assert expected_bos(_Tokenizer(2, adds_bos=True)) == 2  # e.g. Gemma, Llama 2/3
    assert expected_bos(_Tokenizer(1, adds_bos=False)) is None  # e.g. SmolLM2: a BOS exists, but texts lack it
    assert expected_bos(_Tokenizer(None, adds_bos=False)) is None


def test_validation_holds_out_the_trailing_articles(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(article_text(n_articles=10))
    tokenize = lambda text: list(text.encode())  # noqa: E731
    splits = load_splits(path, tokenize, seq_len=32, validation_fraction=0.2)
    articles = split_articles(path.read_text())
    expected_val = pack([tokenize(a) for a in articles[-2:]], 32, None)
    assert torch.equal(splits.validation, expected_val)
    assert splits.train.shape[1] == 32 and len(splits.train) > 4 * len(splits.validation)


def test_dataset_names_need_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails, installed or not
    with pytest.raises(FileNotFoundError, match="pip install datasets"):
        read_text("wikitext:wikitext-2-raw-v1")


def test_wikitext_splits_by_articles():
    if not WIKITEXT.is_file():
        missing_input(f"WikiText-2 validation text not found at {WIKITEXT}")
    splits = load_splits(WIKITEXT, lambda text: list(text.encode()), seq_len=1024, validation_fraction=0.1)
    assert len(split_articles(read_text(WIKITEXT))) == 60
    assert len(splits.train) > 8 * len(splits.validation) > 0


# ---------------------------------------------------------------------------------------------------------------
# The LESS output of every step, three ways
# ---------------------------------------------------------------------------------------------------------------
def decode_loop(q, k, v, phi, psi, scale, policy):
    """The compressed cache token by token through the compiled ops: insert, attend (state before the eviction),
    score and evict, fold the victim. q [B, Hq, T, D] ... -> out [B, Hq, T, D]."""
    B, Hkv, T, D = k.shape
    cache = slots.SlotCache.empty(B, Hkv, policy.num_slots, D, psi.shape[-1], k.dtype)
    outs = []
    for t in range(T):
        reference.insert_token(cache, k[:, :, t], v[:, :, t], psi[:, :, t], torch.full((B,), t))
        out, probs = ops.less_decode_attention(q[:, :, t], cache.k, cache.v, cache.pos, phi[:, :, t], cache.H, cache.z,
                                               scale)
        victim = ops.less_score_and_evict_(cache.scores, cache.pos, probs, *policy.as_args())
        slot = victim.clamp(min=0)[..., None, None]
        victim_psi = torch.gather(cache.psi, 2, slot.expand(-1, -1, 1, psi.shape[-1]))
        victim_v = torch.gather(cache.v, 2, slot.expand(-1, -1, 1, D))
        ops.less_state_update_(cache.H, cache.z, victim_psi, victim_v, (victim >= 0)[..., None])
        outs.append(out)
    return torch.stack(outs, dim=2)


POLICIES = [Policy("h2o", budget=10), Policy("h2o", budget=7, recent=0), Policy("lambda", budget=9, sinks=2)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.kind}-{p.budget}-{p.recent}")
def test_step_attention_matches_the_decode_loop_and_the_parallel_form(layer_inputs, policy):
    cap, feature_maps = layer_inputs
    resolved = policy.resolve(cap.q.shape[2])
    q, k, v = cap.q, cap.k, cap.v
    phi, psi = feature_maps.phi(q).detach(), feature_maps.psi(k).detach()
    steps = policy_steps(q, k, cap.scale, resolved)
    batched = step_attention(q, k, v, steps, phi, psi, cap.scale)
    assert_close_ratio(batched, decode_loop(q, k, v, phi, psi, cap.scale, resolved), what="all steps vs decode loop")
    kept = slots.stream_kept_masks(q, k, cap.scale, *resolved.as_args(), attend=ops.less_decode_attention,
                                       evict_=ops.less_score_and_evict_)
    parallel = reference.parallel_attention(q, k, v, kept, phi, psi, cap.scale)
    assert_close_ratio(batched, parallel, what="all steps vs parallel form")
    sparse = step_attention(q, k, v, steps, None, None, cap.scale)
    assert_close_ratio(sparse, reference.parallel_attention(q, k, v, kept, None, None, cap.scale), what="sparse")
    assert (batched - sparse).abs().max() > 0.05 * sparse.abs().max()  # the state weighs in: the test means something


def test_step_attention_gradients_match_the_parallel_form(layer_inputs):
    cap, feature_maps = layer_inputs
    resolved = POLICIES[0].resolve(cap.q.shape[2])
    q, k, v = cap.q, cap.k, cap.v
    steps = policy_steps(q, k, cap.scale, resolved)
    kept = slots.stream_kept_masks(q, k, cap.scale, *resolved.as_args(), attend=reference.decode_attention,
                                   evict_=reference.score_and_evict_)
    grads = []
    for attend in (lambda phi, psi: step_attention(q, k, v, steps, phi, psi, cap.scale),
                   lambda phi, psi: reference.parallel_attention(q, k, v, kept, phi, psi, cap.scale)):
        feature_maps.zero_grad()
        full = train_layers.full_attention(q, k, v, cap.scale)
        train_layers.output_mse(attend(feature_maps.phi(q), feature_maps.psi(k)), full, cap.o_proj,
                            resolved.num_slots).backward()
        grads.append(torch.cat([p.grad.flatten() for p in feature_maps.parameters()]))
    assert_close_ratio(grads[0], grads[1], torch.float32, what="feature-map gradients")


@pytest.mark.parametrize("policy", POLICIES[::2], ids=lambda p: p.kind)
def test_kept_attention_and_all_its_gradients_match_the_parallel_form(layer_inputs, policy):
    """The end-to-end stage differentiates through kept_attention in q, k, v as well as in phi(q), psi(k): the
    gradient reaches the layers below through them."""
    cap, feature_maps = layer_inputs
    resolved = policy.resolve(cap.q.shape[2])
    kept = slots.stream_kept_masks(cap.q, cap.k, cap.scale, *resolved.as_args(), attend=ops.less_decode_attention,
                                   evict_=ops.less_score_and_evict_)
    results = []
    for attention in (kept_attention, reference.parallel_attention):
        q, k, v = (t.float().clone().requires_grad_() for t in (cap.q, cap.k, cap.v))
        feature_maps.zero_grad()
        out = attention(q, k, v, kept, feature_maps.phi(q), feature_maps.psi(k), cap.scale)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [q.grad, k.grad, v.grad, *(p.grad for p in feature_maps.parameters())]
        results.append((out.detach(), torch.cat([g.flatten() for g in grads])))
    assert_close_ratio(results[0][0], results[1][0], what="output")
    assert_close_ratio(results[0][1], results[1][1], torch.float32, what="gradients in q, k, v, phi and psi")


# ---------------------------------------------------------------------------------------------------------------
# The per-layer stage
# ---------------------------------------------------------------------------------------------------------------


def test_cli_training_writes_a_checkpoint_that_beats_the_sparse_policy(tiny_model_dir, tmp_path, capsys):
    cli.main(tiny_args(tiny_model_dir, tmp_path / "ckpt", "--epochs", "4", "--lr", "1e-2"))
    assert "LESS / sparse" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "kernels.safetensors",
                                                                    "report.json"]
    feature_maps = FeatureMaps.from_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["policy"]["kind"] == "h2o" and config["rank"] == 4 and config["kernel_hidden"] == 8
    assert set(config["policy"]) == {"kind", "budget", "recent", "sinks"}  # what fitting ran: no prefill ranking
    assert feature_maps.config.layers == [0, 1] and feature_maps.config.num_kv_heads == 2
    mse = json.loads((tmp_path / "ckpt" / "report.json").read_text())["validation_mse"]
    for layer in ("0", "1"):
        assert mse[layer]["less"] < mse[layer]["sparse"], mse


def test_the_layer_report_names_layers_whose_maps_do_not_beat_the_sparse_policy():
    mse = {"sparse": 2.0, "baseline_plus": 1.9}
    results = {layer: train_layers.LayerResult({}, {**mse, "less": less}) for layer, less in ((5, 1.0), (11, 2.0))}
    text = train_layers.report(results)
    assert text.splitlines()[-1].startswith("warning: the maps of layers [11] do not beat the sparse policy")
    assert "warning" not in train_layers.report({5: results[5]})


def test_resume_after_an_interruption_gives_the_same_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    cli.main(tiny_args(tiny_model_dir, tmp_path / "straight", "--epochs", "3"))

    calls = {"n": 0}
    save = epochs.save_training_state

    def interrupted(*args, **kwargs):
        save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # layer 0 is done (3 epochs), layer 1 has finished its first epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(epochs, "save_training_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(tiny_args(tiny_model_dir, tmp_path / "resumed", "--epochs", "3"))
    monkeypatch.undo()
    progress = sorted(p.name for p in (tmp_path / "resumed" / "progress").iterdir())
    assert progress == ["layer_0.safetensors", "layer_1.partial.safetensors", "train_config.json"]
    cli.main(tiny_args(tiny_model_dir, tmp_path / "resumed", "--epochs", "3"))
    straight, resumed = read_checkpoint(tmp_path / "straight"), read_checkpoint(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_resuming_with_another_configuration_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(epochs, "save_training_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(tiny_args(tiny_model_dir, tmp_path / "ckpt", "--epochs", "1"))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="another configuration"):
        cli.main(tiny_args(tiny_model_dir, tmp_path / "ckpt", "--epochs", "2"))


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    common = tiny_args(tiny_model_dir, tmp_path / "one", "--epochs", "3")  # starts with "train"

    def run(*cmd):
        return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    one = run(sys.executable, "-m", "less_cuda", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "less_cuda", *tiny_args(tiny_model_dir, tmp_path / "two", "--epochs", "3"))
    assert two.returncode == 0, two.stderr[-3000:]
    # Each layer's training depends on its index only (seeded init and batches), and both runs use one thread per
    # process, so sharding changes nothing, bit for bit.
    single, sharded = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    assert single.keys() == sharded.keys()
    for name in single:
        assert torch.equal(sharded[name], single[name]), name
    report_one = json.loads((tmp_path / "one" / "report.json").read_text())
    report_two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert (report_one["processes"], report_two["processes"]) == (1, 2)
    assert report_two["validation_mse"] == report_one["validation_mse"]
