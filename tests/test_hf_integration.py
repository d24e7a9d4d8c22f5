"""The transformers integration on tiny random models: generate with LessCache against full-cache generate and
against the reference stream driven with the very q/k/v the model produced."""

import types

import pytest
import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicSlidingWindowLayer

from helpers import assert_close_ratio
from less_cuda.core import reference as ref
from less_cuda.core import state as slots
from less_cuda.hf.attention import less_attention
from less_cuda.hf.cache import LessCache
from less_cuda.hf.layer import LessLayer
from less_cuda.core.feature_maps import FeatureMaps
from less_cuda.hf.press import LessPress, apply
from less_cuda.core.policy import Policy
from tiny import tiny_llama, tiny_qwen2_with_a_sliding_layer, random_feature_maps, left_padded, prompts, generate


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SETTINGS = [  # (policy, lowrank)
    ("h2o", True),
    ("h2o", False),
    ("lambda", True),
    ("lambda", False),
]


def test_package_exports_stay_what_they_name_on_every_use():
    # Importing a submodule binds its name on the package, so a lazy export must not share a submodule's name.
    import less_cuda

    for _ in range(2):
        for name in less_cuda.__all__:
            assert not isinstance(getattr(less_cuda, name), types.ModuleType), name
    assert less_cuda.apply is apply


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("policy,lowrank", SETTINGS)
def test_budget_above_sequence_is_full_cache_generation(num_kv_heads, policy, lowrank):
    model = tiny_llama(num_kv_heads)
    ids, mask = left_padded(prompts(9, 16))
    full = generate(model, ids, mask, 12)
    feature_maps = random_feature_maps(model, policy) if lowrank else None
    with apply(model, feature_maps, policy=policy, budget=16 + 12, lowrank=lowrank):
        assert torch.equal(generate(model, ids, mask, 12), full)


def test_sampling_with_budget_above_sequence_is_full_cache_sampling():
    model = tiny_llama()
    ids, mask = left_padded(prompts(9, 16))
    torch.manual_seed(5)
    full = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=0)
    with apply(model, random_feature_maps(model), budget=32):
        torch.manual_seed(5)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=0), full)


@pytest.mark.parametrize("policy,lowrank", SETTINGS)
def test_each_sequence_generates_the_same_alone_and_in_a_padded_batch(policy, lowrank):
    model = tiny_llama()
    feature_maps = random_feature_maps(model, policy) if lowrank else None
    batch = prompts(12, 20, 7)
    with apply(model, feature_maps, policy=policy, budget=6, sinks=2, lowrank=lowrank):
        together = generate(model, *left_padded(batch), 10)
        for i, prompt in enumerate(batch):
            alone = generate(model, *left_padded([prompt]), 10)
            assert torch.equal(alone[0], together[i]), f"sequence {i}"


def test_chunked_prompt_streams_through_decode_and_matches_full_cache():
    """A prompt split over several forward calls: the first chunk is compressed, the rest streams token by token;
    the second row's first chunk is all padding. With nothing to evict this is exact attention."""
    model = tiny_llama()
    ids, mask = left_padded(prompts(20, 7))
    full = generate(model, ids, mask, 8)
    cache = LessCache(model, random_feature_maps(model), Policy("h2o", budget=40))
    assert torch.equal(generate(model, ids, mask, 8, past_key_values=cache, prefill_chunk_size=6), full)


def test_a_pad_token_in_a_later_call_changes_nothing():
    """Row 1's new token is padding: it takes no slot, adds no score, evicts and folds nothing."""
    model = tiny_llama()
    layer = LessLayer(0, Policy("h2o", budget=4), random_feature_maps(model))
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    layer.prefill(q[:, :, :8], k[:, :, :8], v[:, :, :8], torch.ones(2, 8, dtype=torch.bool), 0.25)
    before = {name: t.clone() for name, t in vars(layer.slots).items() if name not in ("k", "v", "psi")}
    layer.decode(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], torch.tensor([[True], [False]]), 0.25)
    for name, old in before.items():
        new = getattr(layer.slots, name)
        assert torch.equal(new[1], old[1]), f"padding changed {name}"
        assert not torch.equal(new[0], old[0]), f"a real token left {name} unchanged"
    assert layer.slots.next_position.tolist() == [9, 8]


@pytest.mark.parametrize("policy", ["h2o", "lambda"])
def test_slots_state_and_outputs_follow_the_reference_stream(policy, monkeypatch):
    """Record what the attention function was given and returned, replay it through reference.py's prefill and
    decode_step, and compare the kept positions (exactly), the low-rank state and the decode outputs."""
    model = tiny_llama()
    feature_maps = random_feature_maps(model, policy)
    calls = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        out, weights = less_attention(module, query, key, value, attention_mask, **kwargs)
        calls.append((module.layer_idx, query, key, value, out, kwargs["scaling"]))
        return out, weights

    monkeypatch.setitem(AttentionInterface._global_mapping, "less", recording_attention)
    batch = prompts(14, 9)
    ids, mask = left_padded(batch)
    cache = LessCache(model, feature_maps, Policy(policy, budget=5, sinks=2))
    generate(model, ids, mask, 9, past_key_values=cache)

    valid = mask.bool()
    for layer in cache.layers:
        (_, q, k, v, _, scale), *steps = [c for c in calls if c[0] == layer.layer_idx]
        args = layer.resolved.as_args()
        scores = ref.prefill_scores(q, k, valid, scale) if policy == "h2o" else torch.zeros(k.shape[:3])
        keep = slots.prefill_keep(scores, valid, *args)
        phi, psi = feature_maps.phi(layer.layer_idx, q), feature_maps.psi(layer.layer_idx, k)
        positions = slots.token_positions(valid)[:, None].expand(k.shape[:3])
        slot_k, slot_v, slot_psi, slot_scores, slot_pos, index = slots.gather_tokens(
            keep, args[1] + 1, k, v, psi, scores, positions
        )
        H, z = ref.state_fold(psi, v, valid[:, None] & ~keep)
        stream = slots.SlotCache(slot_k, slot_v, slot_psi, torch.where(index >= 0, slot_pos, -1).int(), slot_scores,
                                 H, z, valid.sum(-1).int())
        position = valid.sum(-1)
        for _, q, k, v, out, _ in steps:
            expected = ref.decode_step(
                stream, q[:, :, 0], k[:, :, 0], v[:, :, 0], feature_maps.phi(layer.layer_idx, q)[:, :, 0],
                feature_maps.psi(layer.layer_idx, k)[:, :, 0], position, scale, *args,
            )
            position = position + 1
            assert_close_ratio(out[:, 0], expected, what=f"layer {layer.layer_idx} decode output")
        assert torch.equal(layer.slots.pos, stream.pos), f"layer {layer.layer_idx} kept positions"
        assert_close_ratio(layer.slots.H, stream.H, what="H")
        assert_close_ratio(layer.slots.z, stream.z, what="z")
    assert (cache.layers[0].slots.pos >= 0).sum(-1).eq(5).all()  # the budget was reached and is held


@pytest.mark.parametrize("lowrank", [True, False])
def test_cache_bytes_stop_growing_once_the_budget_is_reached(lowrank):
    model = tiny_llama()
    ids, mask = left_padded(prompts(24, 17))
    reports = []
    for new_tokens in (2, 20):
        cache = LessCache(model, random_feature_maps(model) if lowrank else None, Policy("h2o", budget=8))
        generate(model, ids, mask, new_tokens, past_key_values=cache)
        reports.append(cache.memory_report())
    short, long = reports
    assert short.total == long.total > 0
    assert long.full_total > short.full_total > short.total
    B, Hkv, S, D, R = 2, 2, 9, 16, 4 if lowrank else 0
    per_layer = B * Hkv * S * (2 * D * 4 + R * 4 + 4 + 4) + B * Hkv * R * (D + 1) * 4 + B * 4
    assert long.layer_bytes == [per_layer, per_layer]
    assert long.full_layer_bytes == [2 * B * Hkv * (24 + 20 - 1) * D * 4] * 2  # the last token is never fed back


def test_a_reset_cache_generates_like_a_fresh_one():
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    cache = LessCache(model, random_feature_maps(model), Policy("h2o", budget=6))
    first = generate(model, ids, mask, 6, past_key_values=cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_report().total == 0
    assert torch.equal(generate(model, ids, mask, 6, past_key_values=cache), first)


def test_beam_search_reorders_the_compressed_cache():
    model = tiny_llama()
    ids, mask = left_padded(prompts(10, 13))
    beams = dict(num_beams=3, num_return_sequences=2)
    full = generate(model, ids, mask, 8, **beams)
    with apply(model, random_feature_maps(model), budget=32):
        assert torch.equal(generate(model, ids, mask, 8, **beams), full)
    with apply(model, random_feature_maps(model), budget=4):
        assert generate(model, ids, mask, 8, **beams).shape == (4, 8)


def test_sliding_window_layers_keep_their_own_cache():
    model = tiny_qwen2_with_a_sliding_layer()
    ids, mask = left_padded(prompts(11, 15))
    full = generate(model, ids, mask, 10)
    cache = LessCache(model, random_feature_maps(model, layers=[0]), Policy("h2o", budget=32))
    assert torch.equal(generate(model, ids, mask, 10, past_key_values=cache), full)
    assert isinstance(cache.layers[0], LessLayer) and isinstance(cache.layers[1], DynamicSlidingWindowLayer)
    assert cache.get_seq_length() == 15 + 10 - 1  # tokens seen, not slots kept (the last token is not fed back)


def test_apply_finds_the_shipped_checkpoint_or_loads_a_directory(tmp_path, monkeypatch):
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    random_feature_maps(model).save_pretrained(tmp_path)
    with apply(model, FeatureMaps.from_pretrained(tmp_path), budget=6):
        expected = generate(model, ids, mask, 6)
    with apply(model, str(tmp_path), budget=6):
        assert torch.equal(generate(model, ids, mask, 6), expected)
    monkeypatch.setattr("less_cuda.hf.press.find_checkpoint",
                        lambda layout, kind, budget=None: tmp_path if kind == "h2o" else None)
    with apply(model, budget=6):
        assert torch.equal(generate(model, ids, mask, 6), expected)
    with pytest.warns(DeprecationWarning, match="feature_maps='shipped'"):  # None meant the shipped one until 0.2
        press = LessPress(budget=6, feature_maps=None)
    assert press.feature_maps == "shipped"


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_apply_restores_the_model(implementation):
    model = tiny_llama()
    model.set_attn_implementation(implementation)
    with apply(model, budget=8, lowrank=False):
        assert model.config._attn_implementation == "less"
        assert "generate" in vars(model)
    assert model.config._attn_implementation == implementation
    assert "generate" not in vars(model)


def test_press_is_apply_and_gives_explicit_caches():
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    feature_maps = random_feature_maps(model)
    press = LessPress(policy="h2o", budget=6, feature_maps=feature_maps)
    with press(model) as pressed:
        assert pressed is model
        within = generate(model, ids, mask, 6)
    with apply(model, feature_maps, policy="h2o", budget=6):
        assert torch.equal(generate(model, ids, mask, 6), within)
    cache = press.cache(model)
    assert isinstance(cache, LessCache) and cache.feature_maps is feature_maps
    assert torch.equal(generate(model, ids, mask, 6, past_key_values=cache), within)
    assert not torch.equal(generate(model.set_attn_implementation("sdpa") or model, ids, mask, 6), within)
    # The window ranking unless told: the task suite's choice (PRESS_PREFILL_SCORES).
    assert repr(press) == ("LessPress(policy='h2o', budget=6, recent=None, prefill_scores='window', "
                           "prefill_window=8, lowrank=True)")
    summed = LessPress(policy="h2o", budget=6, prefill_scores="sum")
    assert repr(summed) == "LessPress(policy='h2o', budget=6, recent=None, prefill_scores='sum', lowrank=True)"


def test_press_refuses_bad_settings_before_it_meets_a_model():
    with pytest.raises(ValueError, match="budget > sinks"):
        LessPress(policy="lambda", budget=4, sinks=4)
    with pytest.raises(ValueError, match="lowrank=False"):
        LessPress(feature_maps="somewhere", lowrank=False)
    with pytest.raises(ValueError, match="recent must be"):
        LessPress(budget=0.1, recent=1.0)  # all recent: no heavy hitter at any prompt length


def test_a_fractional_budget_too_small_for_the_prompt_fails_at_prefill_naming_its_length():
    model = tiny_llama()
    ids, mask = left_padded(prompts(30))
    with apply(model, policy="lambda", budget=0.1, sinks=4, lowrank=False):
        with pytest.raises(ValueError, match="0.1 of a 30-token prompt is too small; the prompt needs at least 46"):
            generate(model, ids, mask, 4)
        generate(model, *left_padded(prompts(46)), 4)  # long enough: budget round(4.6) = 5 > 4 sinks


def test_cache_repr_says_what_it_holds():
    model = tiny_llama()
    cache = LessCache(model, random_feature_maps(model), Policy("h2o", budget=0.5))
    assert repr(cache) == "LessCache(h2o, budget 0.5 of the prompt, recent half, rank 4, 2/2 layers compressed, empty)"
    generate(model, *left_padded(prompts(12)), 3, past_key_values=cache)
    text = repr(cache)
    assert text.startswith("LessCache(h2o, budget 6 tokens (0.5 of the prompt), recent 3, rank 4, 2/2 layers")
    assert text.endswith("for a full cache (" + f"{cache.memory_report().ratio:.1%}) held)")
    assert "sparse only" in repr(LessCache(model, None, Policy("lambda", budget=8, sinks=2)))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_layers_less_does_not_own_run_the_models_own_attention(implementation, monkeypatch):
    """Sliding-window layers (and any call without a LessLayer) run the implementation the model had."""
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    model = tiny_qwen2_with_a_sliding_layer()
    model.set_attn_implementation(implementation)
    ids, mask = left_padded(prompts(11, 15))
    full = generate(model, ids, mask, 8)
    eager_calls = []
    eager = qwen2.eager_attention_forward
    monkeypatch.setattr(qwen2, "eager_attention_forward", lambda *a, **k: eager_calls.append(1) or eager(*a, **k))
    cache = LessCache(model, random_feature_maps(model, layers=[0]), Policy("h2o", budget=32))
    assert torch.equal(generate(model, ids, mask, 8, past_key_values=cache), full)
    assert (len(eager_calls) > 0) == (implementation == "eager")


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(policy="lambda", budget=4, sinks=4, lowrank=False), "budget > sinks"),
        (dict(policy="h2o", budget=4, recent=4, lowrank=False), "budget > recent"),
        (dict(policy="h2o", budget=1, lowrank=False), "at least 2"),
        (dict(policy="sliding"), "policy kind"),
        (dict(policy="h2o", prefill_scores="snapkv", lowrank=False), "prefill_scores must be one of"),
        (dict(), "no LESS checkpoint is shipped"),
        (dict(feature_maps="from_another_model"), "does not fit this model"),
        (dict(feature_maps="lambda_feature_maps"), "fitted for policy 'lambda'"),
        (dict(feature_maps="random", rank=8), "rank 8"),
        (dict(feature_maps="random", lowrank=False), "lowrank=False"),
    ],
)
def test_malformed_use_raises_a_clear_error(settings, message):
    model = tiny_llama()
    feature_maps = {
        "from_another_model": random_feature_maps(tiny_llama(num_kv_heads=1)),
        "lambda_feature_maps": random_feature_maps(model, "lambda"),
        "random": random_feature_maps(model),
    }
    if "feature_maps" in settings:
        settings["feature_maps"] = feature_maps[settings["feature_maps"]]
    with pytest.raises(ValueError, match=message):
        with apply(model, **settings):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_a_layer_without_feature_maps_runs_the_sparse_policy_alone():
    model = tiny_llama()
    ids, mask = left_padded(prompts(12, 20))
    cache = LessCache(model, random_feature_maps(model, layers=[0]), Policy("h2o", budget=6))
    generate(model, ids, mask, 5, past_key_values=cache)
    assert cache.layers[0].slots.H.shape[2] == 4 and cache.layers[0].slots.z.abs().sum() > 0
    assert cache.layers[1].feature_maps is None and cache.layers[1].slots.H.shape[2] == 0


def test_a_cache_without_the_less_attention_is_refused():
    model = tiny_llama()
    ids, mask = left_padded(prompts(10))
    cache = LessCache(model, None, Policy("h2o", budget=4))
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attention implementation must be 'less'"):
        generate(model, ids, mask, 3, past_key_values=cache)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that reach the dispatcher's backends (after autograd and composite decompositions)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def _decode_ops(model, cache, ids, mask) -> list[str]:
    """The ops of one decode step (one new token per row) after a prefill."""
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        with _CountOps() as counter:
            model(input_ids=ids[:, -1:], attention_mask=step_mask, past_key_values=cache)
    return counter.calls


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_decode_step_adds_few_dispatcher_calls_to_the_full_cache(padded):
    """The sparse-only LessCache's decode step costs at most 5 dispatcher calls per layer and token more than the
    full cache's: the step is one fused op, not a chain of small ones."""
    from transformers import DynamicCache

    model = tiny_llama()
    ids, mask = left_padded(prompts(20, 14 if padded else 20))
    full = _decode_ops(model, DynamicCache(config=model.config), ids, mask)
    less = _decode_ops(model, LessCache(model, None, Policy("h2o", budget=8)), ids, mask)
    assert less.count("less_cuda.decode_step_.default") == model.config.num_hidden_layers
    extra = (len(less) - len(full)) / model.config.num_hidden_layers
    assert extra <= 5, f"{extra:.1f} extra calls per layer: {sorted(set(less) - set(full))}"


@pytest.mark.parametrize("lowrank", [True, False], ids=["less", "sparse"])
def test_layer_decode_compiles_as_one_graph(lowrank):
    """torch.compile(fullgraph=True) of a LessLayer's decode step, φ/ψ included, has no graph break, and steps the
    slots exactly as the eager call does."""
    import copy

    model = tiny_llama()
    cache = LessCache(model, random_feature_maps(model) if lowrank else None, Policy("h2o", budget=8))
    ids, mask = left_padded(prompts(20, 14))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    eager, compiled = cache.layers[0], copy.deepcopy(cache.layers[0])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g)
    k, v = torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g)
    valid = torch.tensor([[True], [False]])
    expected = eager.decode(q, k, v, valid, 0.25)
    out = torch.compile(compiled.decode, fullgraph=True, backend="aot_eager")(q, k, v, valid, 0.25)
    assert_close_ratio(out, expected, what="compiled decode")
    for name, tensor in vars(eager.slots).items():
        assert torch.allclose(getattr(compiled.slots, name), tensor), f"slots.{name} differ"
