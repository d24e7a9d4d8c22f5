"""prefill_attention: its output against torch's sdpa with the causal and padding mask, its column sums against
reference.prefill_scores and its window scores against reference.prefill_window_scores, the policy's prefill fields,
and a LessCache prefill that takes its H2O scores from the attention pass."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from helpers import assert_close_ratio, error_ratio
from less_cuda.core import prefill as prefill_module
from less_cuda.core import reference as ref
from less_cuda.core import state as slots
from less_cuda.hf.attention import less_attention
from less_cuda.hf.cache import LessCache
from less_cuda.core.policy import Policy
from less_cuda.core.prefill import prefill_attention
from tiny import tiny_llama, random_feature_maps, left_padded, prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADS = {"mha": (4, 4), "gqa3": (6, 2), "gqa4": (8, 2), "mqa": (4, 1)}  # (Hq, Hkv): G = 1, 3, 4, Hq


def make_valid(B: int, T: int, padding: str) -> torch.Tensor:
    """[B, T] bool: no padding, left padding of different lengths, or left padding plus a row of padding only."""
    valid = torch.ones(B, T, dtype=torch.bool)
    if padding in ("left", "empty_row"):
        for b in range(B):
            valid[b, : 3 * b + 1] = False
    if padding == "empty_row":
        valid[-1] = False
    return valid


def qkv(B: int, Hq: int, Hkv: int, T: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(dtype) for H in (Hq, Hkv, Hkv)]


def sdpa_expected(q, k, v, valid, scale):
    """torch's sdpa with the mask transformers builds (causal, pad columns hidden); pad rows set to 0."""
    T = q.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None] & valid[:, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    return out.masked_fill(~valid[:, None, :, None], 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padding", ["none", "left", "empty_row"])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("T,chunk", [(37, 8), (50, None), (16, 16)], ids=["T37c8", "T50default", "T16c16"])
def test_output_is_sdpa_and_scores_are_the_reference_column_sums(heads, padding, dtype, T, chunk):
    Hq, Hkv = heads
    B, D, scale = 3, 16, 0.3
    q, k, v = qkv(B, Hq, Hkv, T, D, dtype)
    valid = make_valid(B, T, padding)
    out, scores = prefill_attention(q, k, v, valid, scale, chunk=chunk)
    assert out.dtype == dtype and scores.dtype == torch.float32
    assert_close_ratio(out, sdpa_expected(q, k, v, valid, scale), what="output")
    # Both compute the sums in fp32 from the same (upcast) inputs.
    assert_close_ratio(scores, ref.prefill_scores(q, k, valid, scale), dtype=torch.float32, what="scores")
    assert scores.masked_select(~valid[:, None, :]).eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padding", ["none", "left", "empty_row"])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize(
    "T,chunk,window",
    [(37, 8, 5), (50, None, 1), (16, 16, 100), (40, 8, 13), (3, None, 32)],
    ids=["T37c8W5", "T50W1", "T16W100", "T40c8W13", "T3W32"],
)
def test_window_scores_are_the_reference_window_scores(heads, padding, dtype, T, chunk, window):
    """The last-rows scores of the one attention pass, for windows inside the prompt, of one row, and longer than the
    prompt (or than a left-padded row's real tokens); the output is sdpa's whatever the scores."""
    Hq, Hkv = heads
    B, D, scale = 3, 16, 0.3
    q, k, v = qkv(B, Hq, Hkv, T, D, dtype, seed=7)
    valid = make_valid(B, T, padding)
    out, scores = prefill_attention(q, k, v, valid, scale, chunk=chunk, window=window)
    assert_close_ratio(out, sdpa_expected(q, k, v, valid, scale), what="output")
    expected = ref.prefill_window_scores(q, k, valid, scale, window)
    assert_close_ratio(scores, expected, dtype=torch.float32, what="window scores")
    assert scores.masked_select(~valid[:, None, :]).eq(0).all()
    if window < T:  # the scores do tell the window from the whole prompt
        assert error_ratio(scores, ref.prefill_scores(q, k, valid, scale)) > 0.1


@pytest.mark.parametrize("padding", ["none", "left", "empty_row"])
@pytest.mark.parametrize("nb", [1, 2, 3])
@pytest.mark.parametrize("window", [None, 6], ids=["sum", "window"])
def test_batch_groups_and_chunks_do_not_change_the_result(padding, nb, window, monkeypatch):
    """Steps over nb batch rows at a time and any chunk of query rows give the same answer as one big step."""
    B, Hq, Hkv, T, D = 5, 6, 2, 41, 8
    q, k, v = qkv(B, Hq, Hkv, T, D, torch.float32, seed=3)
    valid = make_valid(B, T, padding)
    monkeypatch.setattr(prefill_module, "_batch_rows_per_step", lambda *args: B)
    whole_out, whole_scores = prefill_attention(q, k, v, valid, 0.25, chunk=T, window=window)
    monkeypatch.setattr(prefill_module, "_batch_rows_per_step", lambda *args: nb)
    for chunk in (1, 5, 32):
        out, scores = prefill_attention(q, k, v, valid, 0.25, chunk=chunk, window=window)
        assert_close_ratio(out, whole_out, what=f"output, chunk {chunk}")
        assert_close_ratio(scores, whole_scores, what=f"scores, chunk {chunk}")


def test_output_layout_is_what_transformers_wants_back():
    q, k, v = qkv(2, 4, 2, 9, 8, torch.float32)
    out, _ = prefill_attention(q, k, v, torch.ones(2, 9, dtype=torch.bool), 0.5)
    assert out.shape == (2, 4, 9, 8) and out.transpose(1, 2).is_contiguous()


def test_strided_inputs_as_transformers_hands_them_over():
    """q, k, v arrive as [B, H, T, D] views of [B, T, H, D] projections."""
    B, Hq, Hkv, T, D = 2, 6, 2, 19, 8
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(B, Hq, Hkv, T, D, torch.float32))
    assert not q.is_contiguous()
    valid = make_valid(B, T, "left")
    out, scores = prefill_attention(q, k, v, valid, 0.3, chunk=4)
    assert_close_ratio(out, sdpa_expected(q, k, v, valid, 0.3), what="output")
    assert_close_ratio(scores, ref.prefill_scores(q, k, valid, 0.3), what="scores")


def reference_scores(policy: Policy, q, k, valid, scale):
    """The H2O prefill scores `policy` ranks a prompt by, from the reference."""
    if policy.prefill_scores == "window":
        return ref.prefill_window_scores(q, k, valid, scale, policy.prefill_window)
    return ref.prefill_scores(q, k, valid, scale)


@pytest.mark.parametrize("policy", [Policy("h2o", budget=6), Policy("h2o", budget=6, prefill_scores="window",
                                                                    prefill_window=4)], ids=["sum", "window"])
def test_less_cache_prefill_keeps_the_slots_of_the_reference_scores(policy, monkeypatch):
    """One forward over a left-padded prompt into a LessCache (H2O, low-rank): its logits are those of a full cache,
    each layer's kept positions are exactly those that the reference scores of the policy's prefill_scores select,
    the kept tokens start decoding with those scores, and attention runs once per layer (the layer is handed the
    scores and computes none)."""
    model = tiny_llama()
    feature_maps = random_feature_maps(model, "h2o")
    calls = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, query, key, value, kwargs["scaling"]))
        return less_attention(module, query, key, value, attention_mask, **kwargs)

    passes = []

    def counted_pass(*args, **kwargs):
        passes.append(args[0].shape)
        return prefill_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "less", recording_attention)
    monkeypatch.setattr("less_cuda.core.compressed_layer.prefill_attention", counted_pass)
    ids, mask = left_padded(prompts(23, 15, 19))
    with torch.no_grad():
        full_logits = model(ids, attention_mask=mask).logits
        cache = LessCache(model, feature_maps, policy)
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits
    real = mask.bool()
    assert_close_ratio(logits[real], full_logits[real], what="logits")

    valid = mask.bool()
    assert len(calls) == len(cache.layers)
    assert len(passes) == len(cache.layers), "the layer recomputed the prompt's attention"
    for (layer_idx, q, k, v, scale), layer in zip(calls, cache.layers):
        args = layer.resolved.as_args()
        scores = reference_scores(policy, q, k, valid, scale)
        keep = slots.prefill_keep(scores, valid, *args)
        positions = slots.token_positions(valid)[:, None].expand(k.shape[:3])
        *_, slot_scores, slot_pos, index = slots.gather_tokens(keep, args[1] + 1, k, v, scores, positions)
        expected_pos = torch.where(index >= 0, slot_pos, ref.EMPTY).int()
        assert torch.equal(layer.slots.pos, expected_pos), f"layer {layer_idx} kept positions"
        assert_close_ratio(layer.slots.scores, slot_scores, what=f"layer {layer_idx} scores")
        psi = feature_maps.psi(layer_idx, k)
        H, z = ref.state_fold(psi, v, valid[:, None] & ~keep)
        assert_close_ratio(layer.slots.H, H, what=f"layer {layer_idx} H")
        assert_close_ratio(layer.slots.z, z, what=f"layer {layer_idx} z")
    assert (cache.layers[0].slots.pos >= 0).sum(-1).eq(6).all()  # the budget was applied


@pytest.mark.parametrize("policy", [Policy("h2o", budget=4), Policy("h2o", budget=4, prefill_scores="window",
                                                                    prefill_window=3)], ids=["sum", "window"])
def test_a_layer_ranks_the_prompt_by_the_reference_scores(policy):
    model = tiny_llama()
    B, T = 2, 12
    q, k, v = qkv(B, 4, 2, T, 16, torch.float32, seed=5)
    valid = make_valid(B, T, "left")
    layer = LessCache(model, None, policy).layers[0]
    layer.lazy_initialization(k, v)
    layer.prefill(q, k, v, valid, 0.25)
    psi = torch.zeros(*k.shape[:3], 0)
    given = prefill_module.compress_prompt(k, v, psi, valid, reference_scores(policy, q, k, valid, 0.25), layer.resolved)
    assert torch.equal(layer.slots.pos, given.pos)
    assert_close_ratio(layer.slots.scores, given.scores, what="scores")


def test_steps_take_enough_batch_rows_to_share_out_over_the_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cpu = torch.device("cpu")
        assert prefill_module._batch_rows_per_step(8, 3, 1000, cpu) == 2  # 6 (b, h) matrices: 3 per thread
        assert prefill_module._batch_rows_per_step(8, 4, 1000, cpu) == 1
        assert prefill_module._batch_rows_per_step(1, 3, 1000, cpu) == 1
        assert prefill_module._batch_rows_per_step(8, 3, prefill_module.BLOCK_ELEMS, cpu) == 1  # the block cap
    finally:
        torch.set_num_threads(threads)


def test_window_and_sum_keep_different_tokens_of_the_same_prompt():
    """The selection follows the scores: on a prompt whose last rows attend elsewhere than the whole prompt does,
    "window" keeps other heavy hitters than "sum" (else the tests above could not tell the two apart)."""
    model = tiny_llama()
    ids, mask = left_padded(prompts(40, 33))
    kept = {}
    for mode in ("sum", "window"):
        cache = LessCache(model, None, Policy("h2o", budget=8, prefill_scores=mode, prefill_window=2))
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache)
        kept[mode] = torch.stack([layer.slots.pos for layer in cache.layers])
    assert not torch.equal(kept["sum"], kept["window"])


def test_a_prompt_within_the_budget_is_kept_whole_whatever_the_scores():
    model = tiny_llama()
    ids, mask = left_padded(prompts(7, 5))
    for mode in ("sum", "window"):
        cache = LessCache(model, None, Policy("h2o", budget=8, prefill_scores=mode, prefill_window=1))
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache)
        for layer in cache.layers:
            held = (layer.slots.pos >= 0).sum(-1)
            assert held.tolist() == [[7] * held.shape[1], [5] * held.shape[1]], mode


@pytest.mark.parametrize(
    "fields,error,message",
    [
        (dict(prefill_scores="snapkv"), ValueError, r"prefill_scores must be one of \['sum', 'window'\]"),
        (dict(prefill_scores="window", prefill_window=0), ValueError, "prefill_window must be at least 1"),
        (dict(prefill_window=-3), ValueError, "prefill_window must be at least 1"),
        (dict(prefill_window=8.0), TypeError, "prefill_window must be an int"),
        (dict(prefill_window=True), TypeError, "prefill_window must be an int"),
        (dict(kind="lambda", prefill_scores="Window"), ValueError, "prefill_scores must be one of"),
    ],
)
def test_bad_prefill_fields_name_the_field(fields, error, message):
    with pytest.raises(error, match=message):
        Policy(**{"budget": 8, **fields})


def test_the_prefill_window_reaches_the_resolved_policy_under_h2o_only():
    assert Policy("h2o", 8).resolve(100).prompt_window is None  # column sums
    assert Policy("h2o", 8, prefill_scores="window", prefill_window=12).resolve(100).prompt_window == 12
    # W beyond the prompt is not clipped here: the scoring clips it per batch row, to the row's real tokens.
    assert Policy("h2o", 0.5, prefill_scores="window", prefill_window=64).resolve(10).prompt_window == 64
    # Λ ranks by position: it ignores the prefill fields, as it ignores `recent`.
    lam = Policy("lambda", 8, sinks=2, prefill_scores="window", prefill_window=3)
    assert lam.prompt_window is None and lam.resolve(100) == Policy("lambda", 8, sinks=2).resolve(100)


def test_lambda_keeps_the_same_tokens_whatever_the_prefill_scores():
    model = tiny_llama()
    ids, mask = left_padded(prompts(23, 15))
    held = []
    for mode in ("sum", "window"):
        cache = LessCache(model, None, Policy("lambda", budget=6, sinks=2, prefill_scores=mode, prefill_window=2))
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache)
        held.append(torch.stack([layer.slots.pos for layer in cache.layers]))
    assert torch.equal(*held)
