"""The compressed KV cache for transformers: `LessCache` is a transformers `Cache` whose full-attention layers are
`LessLayer`s; every other layer kind keeps the layer class transformers would use.

Per layer, batch row and KV head the cache holds `budget + 1` slots (the budget plus the incoming token) and the
rank-R state H, z: its size stops growing once the budget is reached. The sparse-only baselines are the same
machinery with R = 0 (no feature maps, an empty state that attention ignores exactly).

One cache, one batch of sequences, one thread at a time: `LessCache` refuses a second thread's forward while one is
running, and a `generate` call whose input does not continue the sequences it holds (see its docstring).
"""

from __future__ import annotations

import threading
from typing import Optional, Union

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..core.feature_maps import FeatureMaps
from ..core.policy import Policy
from .attention import use_less_attention
from .generate_input import NEW_PROMPT, GenerateInputCheck, TokenRecord
from .layer import LessLayer
from .memory import MemoryReport, layer_nbytes
from .models import model_layout

# Guards the short check-and-record steps of every LessCache (a lock per cache would make caches impossible to
# deepcopy, which transformers' recipe for reusing a prompt's cache does).
_LOCK = threading.Lock()


class LessCache(Cache):
    """A transformers `Cache` that compresses every full-attention layer with LESS.

    Full-attention layers get a `LessLayer`; other layer kinds (e.g. sliding-window) the layer class transformers
    would use. Constructing one switches `model` to the "less" attention implementation, which is exact sdpa for any
    other cache, so `model.generate(..., past_key_values=LessCache(model, feature_maps, policy))` just works; it also
    lets generate show the cache its whole input before each forward (`GenerateInputCheck`, a pass-through for other
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
            (`FeatureMapsConfig.layers`) runs the sparse policy alone, as in the parallel form (`hf.parallel`).
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
        self._tokens = TokenRecord()
        self._forward_thread: Optional[int] = None  # the thread of the latest forward
        self._user: Optional[int] = None  # the thread of the latest forward or generate step
        use_less_attention(model)
        GenerateInputCheck.install(model)

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
                                     f"already holds {seen}: {NEW_PROMPT}")
                new = input_ids[:, -next_sequence_length:]
                if first_step:
                    self._tokens.check_prefix(input_ids[:, :-next_sequence_length], seen)
            self._tokens.extend(new)
            self._user = me

    def record_tokens(self, ids: Tensor) -> None:
        """Note tokens [B, T] the cache was given other than through generate (`PromptRecord.compressed_cache`), so
        that a later generate call is checked against them as against its own input."""
        self._tokens.extend(ids)

    def reset(self) -> None:
        """Empty the cache for a new batch of prompts."""
        super().reset()
        self._tokens = TokenRecord()
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
