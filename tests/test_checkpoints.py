"""Feature-map checkpoints as untrusted input: only JSON and safetensors are ever parsed, and a damaged, malformed or
foreign checkpoint fails with a ValueError naming the file and the problem; the budget a checkpoint was fitted for
picks among shipped checkpoints and warns when far from the one asked for."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import less_cuda.checkpoints
from less_cuda.hf.models import model_layout
from less_cuda.checkpoints import find_checkpoint
from less_cuda.core.feature_maps import CONFIG_NAME, WEIGHTS_NAME, FeatureMaps
from less_cuda.hf.press import apply
from tiny import SMOLLM2_LAYOUT, tiny_llama, tiny_config, left_padded, prompts

TRAINING = {"seq_len": 1000}  # what a fitted checkpoint records; token budgets are compared at this length


def saved(directory: Path, budget: float | int = 0.05, **overrides) -> Path:
    """A tiny checkpoint fitted for `budget`, written to `directory`."""
    torch.manual_seed(0)
    policy = {"kind": "h2o", "budget": budget, "recent": None, "sinks": 4}
    FeatureMaps(tiny_config(policy=policy, training=TRAINING, **overrides)).save_pretrained(directory)
    return directory


def edit_config(directory: Path, edit) -> None:
    raw = json.loads((directory / CONFIG_NAME).read_text())
    edit(raw)
    (directory / CONFIG_NAME).write_text(json.dumps(raw))


UNPICKLED: list = []


def trip() -> None:
    UNPICKLED.append(True)


class Tripwire:
    """Unpickled, it calls `trip`: the proof that a file went through pickle."""

    def __reduce__(self):
        return trip, ()


def test_loading_never_reaches_pickle(tmp_path, monkeypatch):
    directory = saved(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load reached torch.load / pickle")

    for owner, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(owner, name, refuse)
    FeatureMaps.from_pretrained(directory)


def test_a_pickle_in_place_of_the_weights_is_refused_unopened(tmp_path):
    directory = saved(tmp_path)
    torch.save({"layer_kernels.0.phi_mlp.w1": Tripwire()}, directory / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME} is not a readable safetensors file"):
        FeatureMaps.from_pretrained(directory)
    assert UNPICKLED == []


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.0], ids=["tail", "half", "empty"])
def test_a_truncated_weights_file_names_the_file(tmp_path, keep):
    weights = saved(tmp_path) / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=f"{re.escape(str(weights))} is not a readable safetensors file"):
        FeatureMaps.from_pretrained(tmp_path)


def test_a_corrupted_header_names_the_file(tmp_path):
    weights = saved(tmp_path) / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header that follows the 8-byte length
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{re.escape(str(weights))} is not a readable safetensors file"):
        FeatureMaps.from_pretrained(tmp_path)


def rewrite_weights(directory: Path, edit) -> None:
    """Rewrite kernels.safetensors with `edit` applied to its tensors (a dict), keeping its metadata."""
    tensors = load_file(str(directory / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format_version": "1"})


W1 = "layer_kernels.0.phi_mlp.w1"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t[W1].view(-1)[3].fill_(float("nan")), rf"{W1} holds NaN or infinity"),
        (lambda t: t[W1].view(-1)[0].fill_(float("-inf")), rf"{W1} holds NaN or infinity"),
        (lambda t: t.pop(W1), rf"missing \[{W1}\], unexpected \[\]"),
        (lambda t: t.update(extra=torch.zeros(2)), r"missing \[\], unexpected \[extra\]"),
        (lambda t: t.update({W1: t[W1][:, :-1].contiguous()}), rf"{W1} has shape \(4, 15, 8\), not \(4, 16, 8\)"),
        (lambda t: t.update({W1: t[W1].to(torch.int32)}), rf"{W1} is torch.int32"),
    ],
    ids=["nan", "inf", "missing", "unexpected", "shape", "integer"],
)
def test_weights_that_do_not_match_the_config_fail_before_loading(tmp_path, edit, message):
    directory = saved(tmp_path)
    rewrite_weights(directory, edit)
    with pytest.raises(ValueError, match=f"{re.escape(str(directory / WEIGHTS_NAME))}.*{message}"):
        FeatureMaps.from_pretrained(directory)


def test_weights_of_another_format_version_are_refused(tmp_path):
    directory = saved(tmp_path)
    tensors = load_file(str(directory / WEIGHTS_NAME))
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format_version": "2"})
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME} has format_version 2, this less_cuda reads 1"):
        FeatureMaps.from_pretrained(directory)


def test_a_missing_weights_file_is_named(tmp_path):
    (saved(tmp_path) / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME} is missing"):
        FeatureMaps.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        (b"\xff\xfe{}", "is not valid JSON"),
    ],
    ids=["syntax", "list", "not-utf8"],
)
def test_a_config_that_is_not_a_json_object_names_the_file(tmp_path, text, message):
    config = saved(tmp_path) / CONFIG_NAME
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=f"{re.escape(str(config))} {message}"):
        FeatureMaps.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.pop("format_version"), "has format_version None, this less_cuda reads 1"),
        (lambda c: c.update(format_version=2), "has format_version 2"),
        (lambda c: c.pop("num_heads"), r"unknown fields \[\], missing fields \['num_heads'\]"),
        (lambda c: c.update(kernel_size=3), r"unknown fields \['kernel_size'\], missing fields \[\]"),
        (lambda c: c.update(num_heads="4"), r"wrong type: num_heads '4' \(expected int\)"),
        (lambda c: c.update(rank=True), r"wrong type: rank True \(expected int\)"),
        (lambda c: c.update(layers=[0, "2"]), r"layers \[0, '2'\] \(expected list\[int\]\)"),
        (lambda c: c.update(policy="h2o"), r"policy 'h2o' \(expected dict\)"),
        (lambda c: c.update(head_dim=0), "sizes must be positive"),
        (lambda c: c.update(num_kv_heads=3), "num_heads 4 is not a multiple of num_kv_heads 3"),
        (lambda c: c.update(layers=[0, 3]), r"layers \[0, 3\] must be distinct indices below num_layers 3"),
        (lambda c: c["policy"].update(kind="sliding"), "invalid policy .*policy kind must be one of"),
        (lambda c: c["policy"].update(window=4), "invalid policy .*unexpected keyword argument 'window'"),
        (lambda c: c["policy"].update(prefill_scores="snap"), "invalid policy .*prefill_scores must be one of"),
        (lambda c: c["policy"].update(prefill_window=0), "invalid policy .*prefill_window must be at least 1"),
    ],
    ids=["no-version", "version", "missing", "unknown", "str-int", "bool-int", "layer-type", "policy-type", "size",
         "heads", "layer-range", "policy-kind", "policy-field", "prefill-scores", "prefill-window"],
)
def test_a_malformed_config_fails_with_a_clear_message(tmp_path, edit, message):
    directory = saved(tmp_path)
    edit_config(directory, edit)
    with pytest.raises(ValueError, match=f"{re.escape(str(directory / CONFIG_NAME))}.*{message}"):
        FeatureMaps.from_pretrained(directory)


def test_budget_gap_compares_like_with_like():
    config = tiny_config(policy={"kind": "h2o", "budget": 0.05}, training=TRAINING)
    assert config.budget_gap(0.05) == 1.0
    assert config.budget_gap(0.04) == pytest.approx(1.25)
    assert config.budget_gap(0.2) == pytest.approx(4.0)
    assert config.budget_gap(100) == pytest.approx(2.0)  # 100 tokens of the 1000-token training sequences = 10%
    assert tiny_config(policy={"kind": "h2o", "budget": 0.05}).budget_gap(100) is None  # no training length
    assert tiny_config(policy={"kind": "h2o"}).budget_gap(0.05) is None  # no fitted budget recorded
    assert tiny_config(policy={"kind": "h2o", "budget": 64}).budget_gap(16) == pytest.approx(4.0)


def test_check_compatible_refuses_a_far_budget_only_when_asked():
    feature_maps = FeatureMaps(tiny_config(policy={"kind": "h2o", "budget": 0.05}, training=TRAINING))
    layout = feature_maps.config.layout()
    feature_maps.check_compatible(layout, "h2o", budget=0.04)
    feature_maps.check_compatible(layout, "h2o", budget=0.1)  # 2x: still within the tolerance
    feature_maps.check_compatible(layout, "h2o")  # no budget: not checked
    message = (r"fitted for budget 0.05 of its 1000-token training sequences; budget 300 is 6.0x from it "
               r"\(more than 2x\)")
    with pytest.raises(ValueError, match=message):
        feature_maps.check_compatible(layout, "h2o", budget=300)


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> dict:
    """Two shipped h2o checkpoints for the tiny layout, fitted at 5% and 20%, and a Λ one at 5%."""
    directories = {
        "h2o-5pct": saved(tmp_path / "a-h2o-5pct", 0.05),
        "h2o-20pct": saved(tmp_path / "b-h2o-20pct", 0.2),
        "lambda-5pct": saved(tmp_path / "c-lambda-5pct", 0.05),
    }
    edit_config(directories["lambda-5pct"], lambda c: c["policy"].update(kind="lambda"))
    monkeypatch.setattr(less_cuda.checkpoints, "SHIPPED", tmp_path)
    return directories


@pytest.mark.parametrize(
    "budget,expected",
    [(None, "h2o-5pct"), (0.04, "h2o-5pct"), (0.09, "h2o-5pct"), (0.12, "h2o-20pct"), (0.3, "h2o-20pct"),
     (150, "h2o-20pct"), (40, "h2o-5pct")],
)
def test_find_checkpoint_picks_the_closest_fitted_budget(shipped, budget, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_checkpoint(tiny_config().layout(), "h2o", budget) == shipped[expected]


def test_find_checkpoint_warns_when_no_shipped_budget_is_near(shipped):
    with pytest.warns(UserWarning, match="fitted for budget 0.2 of its 1000-token training sequences; budget 0.9 is"):
        assert find_checkpoint(tiny_config().layout(), "h2o", 0.9) == shipped["h2o-20pct"]
    assert find_checkpoint(tiny_config().layout(), "lambda", 0.05) == shipped["lambda-5pct"]
    assert find_checkpoint({**tiny_config().layout(), "num_layers": 4}, "h2o", 0.05) is None


def test_a_malformed_shipped_config_is_not_skipped_silently(shipped):
    edit_config(shipped["h2o-20pct"], lambda c: c.update(rank="8"))
    with pytest.raises(ValueError, match="b-h2o-20pct/config.json.*rank '8'"):
        find_checkpoint(tiny_config().layout(), "h2o", 0.05)


@pytest.mark.parametrize("explicit", [True, False], ids=["given", "shipped"])
def test_apply_warns_about_a_far_budget_and_still_runs(shipped, explicit):
    """A checkpoint fitted at 20% used at 90% is still used, given or found: a warning, not an error."""
    model = tiny_llama()
    layout = model_layout(model.config)
    directory = saved(shipped["h2o-20pct"].parent / "d-llama-h2o-20pct", 0.2, **layout,
                      layers=list(range(layout["num_layers"])))
    ids, mask = left_padded(prompts(12))
    with pytest.warns(UserWarning, match="budget 0.9 is 4.5x from it"):
        with apply(model, directory if explicit else "shipped", policy="h2o", budget=0.9):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("kind", ["h2o", "lambda"])
def test_the_shipped_smollm2_checkpoints_match_their_own_budget_silently(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_checkpoint(SMOLLM2_LAYOUT, kind, 0.05) is not None
        assert find_checkpoint(SMOLLM2_LAYOUT, kind, 64) is not None  # 64 of 1024 tokens: 1.25x from 5%
    with pytest.warns(UserWarning, match="budget 0.5 is 10.0x from it"):
        find_checkpoint(SMOLLM2_LAYOUT, kind, 0.5)


@pytest.mark.parametrize("kind", ["h2o", "lambda"])
def test_the_shipped_gemma3_checkpoints_are_found_by_their_layout(kind):
    """Gemma 3 270M (MQA, head_dim 256, 18 layers): its own 5% maps, never SmolLM2's."""
    gemma3 = {"num_layers": 18, "num_heads": 4, "num_kv_heads": 1, "head_dim": 256, "hidden_size": 640}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        directory = find_checkpoint(gemma3, kind, 0.05)
    assert directory.name == f"gemma3-270m-{kind}-5pct"
    assert FeatureMaps.from_pretrained(directory).config.layers == [5, 11, 17]

def test_apply_picks_the_shipped_smollm2_h2o_checkpoint_by_budget():
    """H2O ships 5% and 2% maps: each budget finds its own, silently; Λ has only 5%, which a 2% budget gets with a
    warning (2.5x away)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_checkpoint(SMOLLM2_LAYOUT, "h2o", 0.02).name == "smollm2-135m-h2o-2pct"
        assert find_checkpoint(SMOLLM2_LAYOUT, "h2o", 20).name == "smollm2-135m-h2o-2pct"  # 20 of 1024 tokens
        assert find_checkpoint(SMOLLM2_LAYOUT, "h2o", 0.05).name == "smollm2-135m-h2o-5pct"
        assert find_checkpoint(SMOLLM2_LAYOUT, "h2o", 0.1).name == "smollm2-135m-h2o-5pct"
    with pytest.warns(UserWarning, match="budget 0.02 is 2.5x from it"):
        assert find_checkpoint(SMOLLM2_LAYOUT, "lambda", 0.02).name == "smollm2-135m-lambda-5pct"

def test_the_shipped_configs_predate_the_prefill_fields():
    """The configs as shipped record no prefill ranking; they load with Policy's defaults for it."""
    for kind in ("h2o", "lambda"):
        directory = find_checkpoint(SMOLLM2_LAYOUT, kind)
        raw = json.loads((directory / CONFIG_NAME).read_text())
        assert not {"prefill_scores", "prefill_window"} & raw["policy"].keys()
        FeatureMaps.from_pretrained(directory).check_compatible(SMOLLM2_LAYOUT, kind)


@pytest.mark.parametrize("recorded", [None, {"prefill_scores": "window", "prefill_window": 8}],
                         ids=["no-field", "window"])
def test_a_checkpoint_serves_either_prefill_ranking_whatever_it_recorded(shipped, recorded):
    """The feature maps are fitted on the decode rule, which has no prefill: a checkpoint written before the prefill
    fields existed, or recording another ranking, is found, loads, and compresses with "sum" and with "window"."""
    model = tiny_llama()
    layout = model_layout(model.config)
    directory = saved(shipped["h2o-5pct"].parent / "d-llama-h2o-5pct", 0.05, **layout,
                      layers=list(range(layout["num_layers"])))
    if recorded is not None:
        edit_config(directory, lambda c: c["policy"].update(recorded))
    assert FeatureMaps.from_pretrained(directory).config.policy == {
        "kind": "h2o", "budget": 0.05, "recent": None, "sinks": 4, **(recorded or {})}
    assert find_checkpoint(layout, "h2o", 0.05) == directory
    ids, mask = left_padded(prompts(24, 17))
    for mode in ("sum", "window"):
        with apply(model, "shipped", policy="h2o", budget=0.1, prefill_scores=mode, prefill_window=4):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert out.shape == (2, ids.shape[1] + 3)


def test_results_name_shipped_checkpoints_by_name_and_others_by_path(tmp_path):
    from less_cuda.checkpoints import SHIPPED, checkpoint_label

    assert checkpoint_label(SHIPPED / "smollm2-135m-h2o-5pct") == "smollm2-135m-h2o-5pct"  # no machine path
    assert checkpoint_label(str(tmp_path / "mine")) == str(tmp_path / "mine")
