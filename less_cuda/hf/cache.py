"""The compressed KV cache for transformers: `LessLayer` owns one full-attention layer's fixed slots, H2O scores and
low-rank state; `LessCache` is a transformers `Cache` whose full-attention layers are LessLayers.

Per layer, batch row and KV head the cache holds `budget + 1` slots (the budget plus the incoming token) and the
rank-R state H, z: its size stops growing once the budget is reached. The sparse-only baselines are the same
machinery with R = 0 (no feature maps, an empty state that attention ignores exactly).

Positions given to the policy are each real token's index among the real tokens of its row
(`state.token_positions`), so left padding shifts nothing; pad tokens are never attended, scored, kept or folded.

A prompt fed to a fresh cache in one forward call is compressed at once (exact attention, H2O scores — column sums
or the attention of the prompt's last query rows, `Policy.prefill_scores` —, keep the recent and top-scoring tokens,
fold the rest). Chunked prefill in that sense is not offered: the selection needs the attention columns of the whole
prompt, and a chunk cannot know them. Tokens that arrive in later calls (decode, generate's `prefill_chunk_size`,
continuing a conversation) stream through the decode rule one at a time, which is the contract's streaming form of
the same policy; a fractional budget is resolved on the first call's length.

One cache, one batch of sequences, one thread at a time: `LessCache` refuses a second thread's forward while one is
running, and a `generate` call whose input does not continue the sequences it holds (see its docstring).
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..core import reference, state
from .attention import announce, use_less_attention
from ..core.feature_maps import FeatureMaps
from ..core.ops import less_decode_step_
from ..core.policy import Policy, ResolvedPolicy
from ..core.prefill import compress_prompt, prefill_attention


def model_layout(config: PretrainedConfig) -> dict:
    """The model facts a feature-map checkpoint must agree with (keys of `FeatureMapsConfig.layout`)."""
    config = config.get_text_config(decoder=True)
    return {
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "hidden_size": config.hidden_size,
    }


class LessLayer(CacheLayerMixin):
    """One full-attention layer under LESS (H2O or Λ, with or without the low-rank state).

    State: a `state.SlotCache` with S = budget + 1 slots per (batch row, KV head) and R = 0 without feature maps.

    transformers' protocol: `update` receives the new tokens' k/v and returns them unchanged (a compressed layer
    cannot hand back the full history); the "less" attention function then calls `prefill` (first call) or
    `decode`, which runs the fused decode step (`ops.less_decode_step_`): one op call per layer and forward.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False  # evicted tokens are folded into H, z for good: there is no rolling back
    supports_early_init = False  # slot count depends on the prompt (fractional budgets)

    def __init__(self, layer_idx: int, policy: Policy, feature_maps: Optional[FeatureMaps]):
        super().__init__()
        self.layer_idx = layer_idx
        self.policy = policy
        self.feature_maps = feature_maps
        self.resolved: Optional[ResolvedPolicy] = None
        self.slots: Optional[state.SlotCache] = None
        self.seen = 0  # columns seen, padding included: what transformers counts for masks and positions
        self.awaiting_attention = False

    @property
    def is_prefilled(self) -> bool:
        return self.slots is not None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Record the new tokens and hand them on to the "less" attention call, which does the work."""
        if self.awaiting_attention:
            raise self.unattended_error()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self.awaiting_attention = True
        announce(self, key_states)
        return key_states, value_states

    def unattended_error(self) -> RuntimeError:
        """The error for an update that comes before the previous update's attention call."""
        return RuntimeError(
            f"LessCache layer {self.layer_idx} was updated twice without the 'less' attention in between: the "
            "model's attention implementation must be 'less' (LessCache(model, ...) and less_cuda.apply set it)"
        )

    def _psi(self, k: Tensor) -> Tensor:
        """psi(k) [B, Hkv, T, R]; R = 0 without feature maps."""
        if self.feature_maps is None:
            return k.new_zeros(*k.shape[:3], 0, dtype=torch.float32)
        return self.feature_maps.psi(self.layer_idx, k)

    @torch.no_grad()
    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float, scores: Optional[Tensor] = None
    ) -> None:
        """Compress a prompt into the slots and the state. q [B, Hq, T, D]; k, v [B, Hkv, T, D]; valid [B, T] bool.

        H2O scores rank the prompt's tokens, scores [B, Hkv, T] fp32: the column sums of the prompt's causal
        attention, or under `Policy.prefill_scores` "window" those of its last `prefill_window` query rows
        (`prefill.prefill_attention` with `Policy.score_window`). The attention function passes those of its own
        pass; without them they are computed here. Λ needs none. The policy keeps `budget` tokens per row and KV
        head; every other real token is folded into H, z in one call.
        """
        self.awaiting_attention = False
        B, Hkv, T, _ = k.shape
        self.resolved = self.policy.resolve(int(valid.sum(dim=-1).max()))
        if self.resolved.policy_id == reference.H2O:
            if scores is None:
                scores = prefill_attention(q, k, v, valid, scale, window=self.resolved.prefill_window)[1]
        else:  # Λ orders evictions by position alone
            scores = torch.zeros(B, Hkv, T, dtype=torch.float32, device=k.device)
        self.slots = compress_prompt(k, v, self._psi(k), valid, scores, self.resolved)

    @torch.no_grad()
    def decode(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float) -> Tensor:
        """The decode step for each of T new tokens in turn, in one fused op call.
        q [B, Hq, T, D]; k, v [B, Hkv, T, D]; valid [B, T]. Returns out [B, Hq, T, D].
        A pad token takes no slot, adds no score and evicts nothing."""
        self.awaiting_attention = False
        phi = psi = None
        if self.feature_maps is not None:  # phi(q), psi(k) once for all of the call's tokens
            phi, psi = self.feature_maps.features(self.layer_idx, q, k)
        return less_decode_step_(self.slots, q, k, v, phi, psi, valid, *self.resolved.as_args(), scale=scale)

    def get_seq_length(self) -> int:
        """Tokens seen (columns, padding included), not slots kept: transformers derives positions from it."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask is sized as for a full cache; only its padding pattern over the new tokens is read.
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1  # any number of tokens fits

    def nbytes(self) -> int:
        """Bytes held: k, v, psi, pos, scores, H, z and next_position."""
        if self.slots is None:
            return 0
        return sum(t.nelement() * t.element_size() for t in vars(self.slots).values())

    def full_nbytes(self) -> int:
        """Bytes a full cache (transformers' DynamicLayer) would hold for the same tokens: K and V of every column."""
        if self.slots is None:
            return 0
        B, Hkv, _, D = self.slots.k.shape
        return 2 * B * Hkv * self.seen * D * self.slots.k.element_size()

    def _map_rows(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply a batch-dimension selection to every per-row tensor."""
        if self.slots is not None:
            self.slots = replace(self.slots, **{name: fn(t) for name, t in vars(self.slots).items()})

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes the state of row beam_idx[i]."""
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_rows(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a LessCache cannot be cropped: evicted tokens are folded into the state for good")

    def reset(self) -> None:
        self.resolved = self.slots = None
        self.seen = 0
        self.awaiting_attention = self.is_initialized = False


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held per cache layer, and what a full cache would hold for the same tokens (K and V of every column
    seen, padding included, as transformers' DynamicCache stores them). Layers LESS does not compress count the same
    in both."""

    layer_bytes: list[int]
    full_layer_bytes: list[int]

    @property
    def total(self) -> int:
        return sum(self.layer_bytes)

    @property
    def full_total(self) -> int:
        return sum(self.full_layer_bytes)

    @property
    def ratio(self) -> float:
        """total / full_total."""
        return self.total / max(self.full_total, 1)

    def __str__(self) -> str:
        mib = 2.0**20
        return f"{self.total / mib:.2f} MiB vs {self.full_total / mib:.2f} MiB for a full cache ({self.ratio:.1%})"


def layer_nbytes(layer: CacheLayerMixin) -> int:
    """Bytes of a transformers cache layer's K and V."""
    return sum(t.nelement() * t.element_size() for t in (layer.keys, layer.values) if t is not None)


# Guards the short check-and-record steps of every LessCache (a lock per cache would make caches impossible to
# deepcopy, which transformers' recipe for reusing a prompt's cache does).
_LOCK = threading.Lock()

_MODULUS = 2**31 - 1  # prime; a token id times a weight < 2^62, and sums of 2^32 reduced terms fit in int64
_BASE = 48271  # a primitive root of the modulus (MINSTD's multiplier): weights do not repeat within 2^31 positions
_NEW_PROMPT = (
    "a LessCache holds one batch of sequences: continue them by passing what it was fed followed by new tokens (e.g. "
    "generate's previous output plus a new turn), or use a fresh LessCache (or reset() this one) for a new prompt"
)


def _fingerprint(ids: Tensor, start: int) -> Tensor:
    """[B] int64: sum over t of ids[:, t] * BASE^(start + t) mod MODULUS, a polynomial hash of each row's tokens at
    positions start, start + 1, ...; the fingerprints of consecutive parts add up (mod MODULUS) to the whole's."""
    weight, weights = pow(_BASE, start, _MODULUS), []
    for _ in range(ids.shape[1]):
        weights.append(weight)
        weight = weight * _BASE % _MODULUS
    return (ids.long() * torch.tensor(weights, dtype=torch.long, device=ids.device) % _MODULUS).sum(-1) % _MODULUS


@dataclass
class _TokenRecord:
    """The token ids a LessCache was fed as generate's input: `count` per row, and their `fingerprint` ([B] int64,
    None before the first; see `_fingerprint`). It covers the cache's tokens only while `count` equals the number the
    cache has seen: tokens fed without ids (direct forward calls, inputs_embeds) leave it behind for good."""

    fingerprint: Optional[Tensor] = None
    count: int = 0

    def extend(self, ids: Tensor) -> None:
        """Add new tokens [B, T], which follow the ones recorded."""
        part = _fingerprint(ids, self.count)
        self.fingerprint = part if self.fingerprint is None else (self.fingerprint + part) % _MODULUS
        self.count += ids.shape[1]

    def check_prefix(self, prefix: Tensor, seen: int) -> None:
        """Raise ValueError unless `prefix` [B, L] is the `seen` tokens the cache holds (as far as the record covers
        them: when it does not, nothing can be compared)."""
        if prefix.shape[1] != seen:
            raise ValueError(f"generate's input continues after token {prefix.shape[1]}, but this LessCache holds "
                             f"{seen} per row: {_NEW_PROMPT}")
        if seen == 0 or self.count != seen:
            return
        if prefix.shape[0] != self.fingerprint.shape[0]:
            raise ValueError(f"generate's input has {prefix.shape[0]} rows, but this LessCache holds "
                             f"{self.fingerprint.shape[0]}: {_NEW_PROMPT}")
        differs = (_fingerprint(prefix, 0) != self.fingerprint).nonzero().flatten().tolist()
        if differs:
            raise ValueError(f"generate's input does not continue the {seen} tokens per row this LessCache holds "
                             f"(rows {differs} differ): {_NEW_PROMPT}")

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Follow the cache's rows (beam search reorders them)."""
        if self.fingerprint is not None:
            self.fingerprint = fn(self.fingerprint)


class LessCache(Cache):
    """A transformers `Cache` that compresses every full-attention layer with LESS.

    Full-attention layers get a `LessLayer`; other layer kinds (e.g. sliding-window) the layer class transformers
    would use. Constructing one switches `model` to the "less" attention implementation, which is exact sdpa for any
    other cache, so `model.generate(..., past_key_values=LessCache(model, feature_maps, policy))` just works; it also
    lets generate show the cache its whole input before each forward (`_GenerateInputCheck`, a pass-through for other
    caches), for the check below.

    One cache holds one batch of sequences, fed by one thread at a time:

    - *Continuing.* A later `generate` call with the cache continues its sequences, the new tokens streaming through
      the decode rule. Its input is everything the cache was fed followed by new tokens (e.g. the previous output plus
      a new turn, with the attention mask extended to match), or the new tokens alone with an attention mask over the
      whole sequence (transformers' two forms). At the call's first step the cache compares the given prefix with a
      fingerprint of the tokens it was fed, and an input that does not continue them (another prompt, other rows, no
      new tokens) raises ValueError before anything is fed. For a new prompt use a fresh cache, or `reset()` it.
      The check needs generate's whole input: a call with `prefill_chunk_size` shows the cache only its chunks, and
      tokens fed other than as generate's `input_ids` (direct forward calls, `inputs_embeds`) cannot be compared
      later; those are not checked.
    - *Threads.* A forward while another thread's forward through the cache is running raises RuntimeError, and so
      does a generate step when another thread used the cache after the call's previous step. A forward that raised
      part-way leaves the layers holding different numbers of tokens: the next forward raises; `reset()` the cache.
    - `copy.deepcopy(cache)` is an independent cache, e.g. to compress a prompt once and continue it several ways.

    Args:
        model: the causal LM (its config gives the layer kinds and layout).
        feature_maps: φ/ψ fitted for this model and policy kind, on the model's device; None for the sparse-only
            baseline of the same policy (real eviction, no low-rank state). A layer the feature maps do not cover
            (`FeatureMapsConfig.layers`) runs the sparse policy alone, as in `less_cuda.evaluate`.
        policy: a `Policy`, or its kind ("h2o" / "lambda") with the default budget.
    """

    def __init__(
        self, model: PreTrainedModel, feature_maps: Optional[FeatureMaps] = None, policy: Union[Policy, str] = "h2o"
    ):
        policy = Policy(kind=policy) if isinstance(policy, str) else policy
        if feature_maps is not None:
            feature_maps.check_compatible(model_layout(model.config), policy.kind)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
        layers = []
        for i, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
            if kind == "full_attention":
                covered = feature_maps is not None and feature_maps.has_layer(i)
                layers.append(LessLayer(i, policy, feature_maps if covered else None))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
        super().__init__(layers=layers)
        self.policy = policy
        self.feature_maps = feature_maps
        # Where a forward starts: the first layer that takes K/V through `update` (linear-attention layers do not).
        self._first_update = next(i for i, layer in enumerate(self.layers) if isinstance(layer, CacheLayerMixin))
        self._tokens = _TokenRecord()
        self._forward_thread: Optional[int] = None  # the thread of the latest forward
        self._user: Optional[int] = None  # the thread of the latest forward or generate step
        use_less_attention(model)
        _GenerateInputCheck.install(model)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, ...]:
        """transformers' per-layer update; a forward's first one also checks that no other forward is running."""
        if layer_idx != self._first_update:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        with _LOCK:  # check and update together, so that two threads cannot both find the cache idle
            self._start_forward()
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _start_forward(self) -> None:
        """Raise RuntimeError unless the previous forward through the cache finished: then every layer holds the same
        number of tokens and none awaits its attention call.

        The "less" attention pairs a layer's update with its attention call through a ContextVar (attention.py), and
        every thread has its own context, so a thread only ever claims the layer its own update announced. That keeps
        the pairing right but is not enough: the layers' slots, scores, H and z are shared by all threads holding the
        cache, and two forwards at once would interleave their tokens in them. Hence this check.
        """
        me = threading.get_ident()
        layers = [layer for layer in self.layers if isinstance(layer, CacheLayerMixin)]
        unattended = [layer for layer in layers if isinstance(layer, LessLayer) and layer.awaiting_attention]
        if len({layer.get_seq_length() for layer in layers}) > 1 or unattended:
            if self._forward_thread != me:
                raise RuntimeError(
                    f"this LessCache is in use: thread {self._forward_thread}'s forward through it has not finished. "
                    "A LessCache holds one batch of sequences and serves one forward at a time: give each thread its "
                    "own cache"
                )
            if unattended:
                raise unattended[0].unattended_error()
            raise RuntimeError("an earlier forward through this LessCache stopped part-way (it raised), so its layers "
                               "hold different numbers of tokens: reset() the cache or use a fresh one")
        self._forward_thread = self._user = me

    def check_generate_input(
        self, input_ids: Optional[Tensor], next_sequence_length: Optional[int], first_step: bool, embeds: bool
    ) -> None:
        """Called by generate before each forward with this cache (through `_GenerateInputCheck`), with its whole
        input: `input_ids` [B, L], of which the last `next_sequence_length` are new (None: all of them), or token
        embeddings when `embeds`. Checks the contract of the class docstring, then records the new tokens."""
        me = threading.get_ident()
        with _LOCK:
            if not first_step and self._user not in (None, me):
                raise RuntimeError(
                    f"thread {self._user} used this LessCache after this generate call's previous step, which would "
                    "mix its tokens into these sequences: give each thread its own cache"
                )
            if embeds or input_ids is None:  # nothing to compare or record; the record stops covering the cache
                self._user = me
                return
            seen, new = self.get_seq_length(), input_ids
            if next_sequence_length is not None:
                if next_sequence_length <= 0:
                    raise ValueError(f"generate was given {input_ids.shape[1]} tokens per row, but this LessCache "
                                     f"already holds {seen}: {_NEW_PROMPT}")
                new = input_ids[:, -next_sequence_length:]
                if first_step:
                    self._tokens.check_prefix(input_ids[:, :-next_sequence_length], seen)
            self._tokens.extend(new)
            self._user = me

    def reset(self) -> None:
        """Empty the cache for a new batch of prompts."""
        super().reset()
        self._tokens = _TokenRecord()
        self._forward_thread = self._user = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._tokens.map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._tokens.map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._tokens.map_rows(lambda t: t[indices])

    def __repr__(self) -> str:
        """Policy, budget, rank, the layers compressed and the bytes held, e.g. "LessCache(h2o, budget 51 tokens
        (0.05 of the prompt), recent 25, rank 8, 30/30 layers compressed, 1.23 MiB vs 22.50 MiB for a full cache
        (5.5%) held)". Before the prompt, a fractional budget is shown as given."""
        p = self.policy
        less_layers = [layer for layer in self.layers if isinstance(layer, LessLayer)]
        resolved = next((layer.resolved for layer in less_layers if layer.resolved is not None), None)
        if resolved is None and isinstance(p.budget, int):
            resolved = p.resolve(p.budget)
        if resolved is None:
            recent = "half" if p.recent is None else p.recent
            settings = f"budget {p.budget:g} of the prompt, " + (
                f"sinks {p.sinks}" if p.kind == "lambda" else f"recent {recent}")
        else:
            fraction = f" ({p.budget:g} of the prompt)" if isinstance(p.budget, float) else ""
            kept = f"sinks {resolved.sinks}" if p.kind == "lambda" else f"recent {resolved.recent}"
            settings = f"budget {resolved.budget} tokens{fraction}, {kept}"
        rank = f"rank {self.feature_maps.rank}" if self.feature_maps is not None else "sparse only"
        held = f"{self.memory_report()} held" if any(layer.is_prefilled for layer in less_layers) else "empty"
        layers = f"{len(less_layers)}/{len(self.layers)} layers compressed"
        return f"LessCache({p.kind}, {settings}, {rank}, {layers}, {held})"

    def memory_report(self) -> MemoryReport:
        """Bytes held by each layer and in total, against a full cache of the same tokens."""
        held = [layer.nbytes() if isinstance(layer, LessLayer) else layer_nbytes(layer) for layer in self.layers]
        full = [layer.full_nbytes() if isinstance(layer, LessLayer) else layer_nbytes(layer) for layer in self.layers]
        return MemoryReport(held, full)


class _GenerateInputCheck:
    """`model.prepare_inputs_for_generation` once a LessCache was made for `model`: generate calls it with its whole
    input before each forward, the one place a cache can compare that input with what it was fed (the forward itself
    gets only the new tokens). For any other cache it is the model's own method, unchanged."""

    def __init__(self, model: PreTrainedModel):
        self.model = model

    @classmethod
    def install(cls, model: PreTrainedModel) -> None:
        """Install on `model` once; a `prepare_inputs_for_generation` a caller set on the model is left alone."""
        if "prepare_inputs_for_generation" not in vars(model):
            model.prepare_inputs_for_generation = cls(model)

    @property
    def __signature__(self) -> inspect.Signature:
        # generate reads the signature to validate its arguments (e.g. whether inputs_embeds may be passed)
        return inspect.signature(self._prepare)

    @property
    def _prepare(self) -> Callable[..., dict]:
        return type(self.model).prepare_inputs_for_generation.__get__(self.model)

    def __call__(self, input_ids: Optional[Tensor], *args: Any, **kwargs: Any) -> dict:
        cache = kwargs.get("past_key_values")
        if isinstance(cache, LessCache):
            first_step = bool(kwargs.get("is_first_iteration"))
            cache.check_generate_input(input_ids, kwargs.get("next_sequence_length"), first_step,
                                       embeds=first_step and kwargs.get("inputs_embeds") is not None)
        return self._prepare(input_ids, *args, **kwargs)
