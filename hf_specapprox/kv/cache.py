"""The compressing caches' common base: a transformers `Cache` that fills itself from a whole prompt.

[`PromptCompressionCache.prepare_prefill`] is the explicit step (the shape of the upstream `Cache.prepare_prefill`
hook): it fills the cache with the compressed first `L - 1` prompt positions, and stock `generate` then continues from
it on any model, bound or not. A bound model (see [`bind`]) runs that step itself for every `generate` call whose ids
do not continue what the cache consumed, so one cache object can serve many prompts (e.g. in a pipeline). The layer
classes live in `layers.py`, the prefill in `prefill.py`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from .. import compat
from . import prefill
from .binding import ModelBoundCache, bind
from ..config import KVSelectionConfig, resolve_config
from .layers import CompressedKVLayer, build_layers
from .policies import SelectionPolicy
from .query_sources import QuerySource
from .scorers import KVScorer
from .static_layers import StaticCompressedLayer

def _expand_size(model_kwargs: dict, generation_config) -> int:
    """How many times `generate` repeats each prompt row (beams, or returned sequences when not beam searching)."""
    def setting(name):
        value = model_kwargs.get(name)
        return value if value is not None else getattr(generation_config, name, None)

    beams = setting("num_beams") or 1
    sequences = setting("num_return_sequences") or 1
    return beams if beams > 1 else sequences


class UnboundCacheError(RuntimeError):
    """Raised when a compressing cache reaches a model forward without having seen the prompt."""


_UNBOUND_MESSAGE = (
    "{cls} was used by a model that is not bound to hf_specapprox, so it never saw the prompt ids. Bind the target "
    "once with `hf_specapprox.bind(model)` (or pass `model=` when you build the cache), then call "
    "`model.generate(...)` again with the cache, or fill it first with `cache.prepare_prefill(model, input_ids, "
    "{{'attention_mask': attention_mask}})`."
)
# Where `generate` calls `Cache.prepare_prefill` itself, only a forward outside `generate` can reach an empty cache.
_UNFILLED_MESSAGE = (
    "{cls} reached a model forward before it saw the prompt ids. `generate` fills it itself (this transformers calls "
    "`Cache.prepare_prefill`); for a forward of your own, fill it first with `cache.prepare_prefill(model, input_ids, "
    "{{'attention_mask': attention_mask}})`."
)


def _unbound_error(cache) -> UnboundCacheError:
    message = _UNFILLED_MESSAGE if compat.has_native_prepare_prefill() else _UNBOUND_MESSAGE
    return UnboundCacheError(message.format(cls=type(cache).__name__))


class _FirstLayerKeys(DynamicCache):
    """A `DynamicCache` that also keeps the keys layer 0 received in its last `update`."""

    first_keys: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            self.first_keys = key_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class PromptCompressionCache(ModelBoundCache, Cache):
    """A transformers `Cache` that drops prompt KV pairs during the prefill: a composition of a scorer, a query
    source and a selection policy.

    * the **query source** ([`QuerySource`], e.g. SpecKV's [`DraftPreview`]) appends tokens after the prompt for the
      scoring forward; their K/V are never stored;
    * the **scorer** ([`KVScorer`]) scores, in every full-attention layer, the candidate prompt keys per KV head from
      the voting rows' post-RoPE queries (the window, the last prompt token and the appended tokens);
    * the **selection policy** ([`SelectionPolicy`], built from the config: window, sinks, uniform or layer-wise
      budgets) keeps the window and the best candidates.

    This class owns the rest: the layers, the compressing prefill, batches and padding, continuation, the binding and
    every transformers version seam. [`SpecKVCache`], [`SnapKVCache`], [`StreamingLLMCache`] and `KnormCache` are
    subclasses that only name their config class and build their scorer; a composition of your own needs no
    subclass:

    ```python
    >>> cache = PromptCompressionCache(AttentionSelectionConfig(max_capacity_prompt=256, layer_budgets="pyramid"),
    ...                                scorer=KeyNormScorer(), query_source=DraftPreview(draft))
    ```

    Args:
        config ([`KVSelectionConfig`], *optional*): the knobs (budget, window, layer budgets, ...), an instance of the
            class's `config_class`; or pass its fields as keyword arguments instead (not both).
        model (`PreTrainedModel`, *optional*): the target; if given, it is bound (see [`bind`]).
        scorer ([`KVScorer`], *optional*): the scorer; subclasses build theirs from the config ([`build_scorer`]).
        query_source ([`QuerySource`], *optional*): defaults to appending nothing.
        **config_kwargs: fields of `config_class`.
    """

    #: The configuration class this cache takes (and builds from keyword arguments).
    config_class: type = KVSelectionConfig
    #: Whether the recent window counts the last prompt token (SnapKV) or lies before it (SpecKV).
    window_counts_last_token: bool = False

    def __init__(self, config: KVSelectionConfig | None = None, model=None, *, scorer: KVScorer | None = None,
                 query_source: QuerySource | None = None, **config_kwargs):
        super().__init__(layers=[])
        self.config = resolve_config(self.config_class, config, config_kwargs)
        self.scorer = scorer
        self.query_source = query_source if query_source is not None else QuerySource()
        self.prompt_length: int | None = None
        self.prompt_mask: torch.Tensor | None = None
        self.lookahead_ids: torch.Tensor | None = None
        self.lookahead_valid: torch.Tensor | None = None
        self._prefill_state = None
        self._consumed: list[torch.Tensor] | None = []  # ids fed so far (padding as -1), in chunks; None: unknown
        # Layer 0's keys of the positions fed after them by forwards whose ids the cache did not see (transformers'
        # own `generate` on an unbound model): checked against the next call's ids (see `continues`).
        self._unseen_keys: list[torch.Tensor] = []
        if model is not None:
            bind(model)

    # ----------------------------------------------------------------------------------------------------------------
    # transformers Cache API
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def is_compileable(self) -> bool:
        """True only once the static compressed layers are in place (see [`use_static_decode`])."""
        return self.is_static

    @property
    def is_static(self) -> bool:
        """Whether the full-attention layers are static compressed layers (fixed shapes, compileable decoding)."""
        return bool(self.layers) and any(isinstance(layer, StaticCompressedLayer) for layer in self.layers)

    @property
    def is_compressed(self) -> bool:
        """Whether the last prefill dropped prompt positions."""
        return any(
            isinstance(layer, (CompressedKVLayer, StaticCompressedLayer)) and layer.kept_positions is not None
            for layer in self.layers
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._prefill_state is not None:
            return self._prefill_state.update(layer_idx, key_states, value_states, args, kwargs)
        if not self.layers:
            raise _unbound_error(self)
        output = self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        if layer_idx == 0 and not compat.is_compiling():
            self._note_unseen(key_states)
        return output

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if not self.layers:
            return 0
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length_or_cache_position, layer_idx: int = 0) -> tuple[int, int]:
        if not self.layers:
            raise _unbound_error(self)
        layer = self.layers[layer_idx]
        if isinstance(layer, CompressedKVLayer):
            # transformers builds one mask for all full-attention layers from one layer's sizes. Under layer-wise
            # budgets the layers hold different numbers of rows: the mask is built for the widest, and the scoring
            # attention wrapper gives every layer its last `rows + q` columns (see `capture.fit_mask`).
            layer = max((other for other in self.layers if isinstance(other, CompressedKVLayer)),
                        key=lambda other: other.num_rows)
        return layer.get_mask_sizes(query_length_or_cache_position)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self._static_capacity(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self._static_capacity(layer_idx or 0)

    def _static_capacity(self, layer_idx: int) -> int:
        if self.layers and isinstance(self.layers[layer_idx], StaticCompressedLayer):
            return self.layers[layer_idx].capacity
        return -1

    def crop(self, max_length: int) -> None:
        # Sliding layers follow transformers' own rules (they refuse once past their window).
        for layer in self.layers:
            layer.crop(max_length)
        consumed = self.consumed_ids
        if consumed is not None:
            held = self.get_seq_length()
            self._consumed = [consumed[:, :held]]
            unseen = held - consumed.shape[1]
            self._unseen_keys = [torch.cat(self._unseen_keys, dim=-2)[..., :unseen, :]] if unseen > 0 else []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_rows(lambda rows: rows.index_select(0, beam_idx.to(rows.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_rows(lambda rows: rows.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_rows(lambda rows: rows[indices.to(rows.device)])

    def _map_rows(self, function) -> None:
        """Applies a batch-row operation to the per-row records kept beside the layers."""
        if self.prompt_mask is not None:
            self.prompt_mask = function(self.prompt_mask)
        consumed = self.consumed_ids
        if consumed is not None:
            self._consumed = [function(consumed)]
        if self._unseen_keys:
            self._unseen_keys = [function(torch.cat(self._unseen_keys, dim=-2))]

    def reset(self) -> None:
        """Forgets the prompt and everything derived from it (layers, draft tokens, consumed ids); the configuration
        and the draft stay. The next `generate` call or forward is a new prompt."""
        self.layers = []
        self.prompt_length = None
        self.prompt_mask = None
        self.lookahead_ids = None
        self.lookahead_valid = None
        self._prefill_state = None
        self._consumed = []
        self._unseen_keys = []

    def __deepcopy__(self, memo):
        # transformers' prompt-reuse recipe deep-copies a filled cache: the copy gets its own tensors, but models the
        # cache only refers to (the draft) are shared, not copied.
        for model in self._shared_models():
            memo[id(model)] = model
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            setattr(copied, name, copy.deepcopy(value, memo))
        return copied

    def _shared_models(self) -> list:
        """Models the cache refers to and that `copy.deepcopy` must share, not copy."""
        return self.query_source.shared_models()

    # ----------------------------------------------------------------------------------------------------------------
    # The prompt: the explicit prefill step, and what the cache has consumed
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def consumed_ids(self) -> torch.Tensor | None:
        """The token ids the cache has seen consumed so far, `(batch, n)` with `-1` on padding; `None` when unknown
        (e.g. a forward given only `inputs_embeds`). `n` is `get_seq_length()`, or less after forwards whose ids the
        cache did not see (transformers' own `generate` on an unbound model): the next `generate` call's ids are
        checked against the keys those forwards stored (see [`continues`])."""
        if self._consumed is None:
            return None
        if not self._consumed:
            return torch.empty(0, 0, dtype=torch.long)
        if len(self._consumed) > 1:
            self._consumed = [torch.cat(self._consumed, dim=1)]
        return self._consumed[0]

    def _recorded_width(self) -> int:
        if len(self._consumed) > 16:
            self._consumed = [torch.cat(self._consumed, dim=1)]
        if len(self._unseen_keys) > 16:
            self._unseen_keys = [torch.cat(self._unseen_keys, dim=-2)]
        return sum(ids.shape[1] for ids in self._consumed) + sum(keys.shape[-2] for keys in self._unseen_keys)

    def _note_unseen(self, key_states: torch.Tensor) -> None:
        """Keeps layer 0's keys of the positions a forward fed without the cache seeing their ids."""
        if self._consumed is None:
            return
        unseen = int(self.layers[0].get_seq_length()) - self._recorded_width()
        rows = next((chunk.shape[0] for chunk in (*self._consumed, *self._unseen_keys)), key_states.shape[0])
        if unseen > key_states.shape[-2] or rows != key_states.shape[0]:
            self._consumed = None  # not a record of one sequence any more: the next call is a new prompt
        elif unseen > 0:
            self._unseen_keys.append(key_states[..., key_states.shape[-2] - unseen :, :].detach())

    def _unseen_ids_match(self, model, input_ids, attention_mask, start: int, stop: int, repeats: int) -> bool:
        """Whether `input_ids[:, start:stop]` are the tokens whose layer-0 keys the cache stored unseen.

        Layer 0's keys depend only on each token and its position, so one backbone forward over those tokens (with a
        throwaway `DynamicCache`) recomputes them; other tokens give other keys.
        """
        expected = torch.cat(self._unseen_keys, dim=-2)
        ids = input_ids[:, start:stop].to(model.device)
        if attention_mask is None:
            valid = torch.ones_like(ids, dtype=torch.bool)
            positions = torch.arange(start, stop, device=ids.device).expand_as(ids)
        else:
            mask = attention_mask.to(ids.device).bool()
            valid = mask[:, start:stop]
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:stop]
        recorder = _FirstLayerKeys()
        backbone = model.base_model
        with torch.no_grad():
            backbone(input_ids=ids, position_ids=positions, use_cache=True,
                     **{compat.cache_kwarg_name(backbone): recorder})
        actual = recorder.first_keys
        if actual is None or actual.shape[-2] != expected.shape[-2]:
            return False
        if repeats > 1:
            actual, valid = actual.repeat_interleave(repeats, dim=0), valid.repeat_interleave(repeats, dim=0)
        expected = expected.to(actual.device).float()
        difference = (actual.float() - expected).abs().amax(dim=(1, 3))  # (rows, positions)
        tolerance = 1e-2 * float(expected.abs().amax()) + 1e-5
        return bool((difference[valid.to(difference.device)] <= tolerance).all())

    def _record_consumed(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Appends what a forward feeds the cache; `attention_mask` may cover earlier positions too (its last
        `input_ids.shape[1]` columns are the new tokens')."""
        if input_ids is None or self._consumed is None:
            self._consumed = None
            return
        ids = input_ids.detach()
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask[:, attention_mask.shape[1] - ids.shape[1] :].to(ids.device)
            ids = ids.masked_fill(~mask.bool(), -1)
        if self._consumed and self._consumed[0].shape[0] != ids.shape[0]:
            self._consumed = None
            return
        self._consumed.append(ids)

    def continues(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, model=None) -> bool:
        """Whether `input_ids` (a whole sequence, as `generate` receives it) continue what this cache consumed: they
        start with every consumed token (same padding) and add at least one. A cache filled for `r` times fewer rows
        than it holds (beams, `num_return_sequences`) compares each row `r` times, as `generate` expands them.

        Positions fed by forwards whose ids the cache did not see (transformers' own `generate` on an unbound model)
        are compared through the keys they stored, which needs `model` (without it they never match).

        This is `DynamicCache`'s rule made explicit; any other ids are a new prompt.
        """
        consumed = self.consumed_ids
        held = self.get_seq_length()
        if consumed is None or input_ids is None or held == 0 or input_ids.shape[1] <= held:
            return False
        known = consumed.shape[1]
        unseen = sum(keys.shape[-2] for keys in self._unseen_keys)
        if known + unseen != held:
            return False
        rows = consumed.shape[0] if known else self._unseen_keys[0].shape[0]
        if rows % input_ids.shape[0]:
            return False
        repeats = rows // input_ids.shape[0]
        ids = input_ids[:, :held]
        if attention_mask is not None:
            ids = ids.masked_fill(~attention_mask[:, :held].bool().to(ids.device), -1)
        if repeats > 1:
            ids = ids.repeat_interleave(repeats, dim=0)
        if known and not torch.equal(ids[:, :known].to(consumed.device), consumed):
            return False
        if unseen:
            if model is None or not self._unseen_ids_match(model, input_ids, attention_mask, known, held, repeats):
                return False
            # Those positions are now known: they hold what the ids say.
            self._consumed = [ids.to(consumed.device if known else ids.device)]
            self._unseen_keys = []
        return True

    @torch.no_grad()
    def prepare_prefill(self, model, input_ids: torch.Tensor, model_kwargs: dict | None = None,
                        generation_config=None, *, expand_size: int = 1) -> None:
        """Fills the cache from a whole prompt, so that `generate` continues from it (the upstream hook's shape).

        Ids that continue what the cache consumed (see [`continues`]) leave it as it is. Any other ids are a new prompt:
        the cache forgets the old one and holds, afterwards, the compressed first `L - 1` positions of the new one;
        `generate(input_ids, ..., cache=this)` then computes the last prompt token against them, on any model (bound
        or not) and on every supported transformers version. A prompt that fits the budget leaves the cache empty
        (an ordinary prefill follows). A transformers whose `generate` calls `Cache.prepare_prefill` itself (see
        docs/upstream.md) runs this step once per call with the expanded prompt.

        Args:
            model (`PreTrainedModel`): the target.
            input_ids (`torch.LongTensor` of shape `(batch, length)`): the whole prompt, left-padded.
            model_kwargs (`dict`, *optional*): `generate`'s model kwargs; its `attention_mask` is used.
            generation_config (`GenerationConfig`, *optional*): checked for what a compressing cache cannot serve
                (`use_cache=False`, `prefill_chunk_size`, the prompt's attentions or hidden states).
            expand_size (`int`, *optional*, defaults to 1): repeat every row this many times after filling, as
                `generate` repeats the prompt for `num_beams` × `num_return_sequences` (it does not expand a cache it
                is given). Leave it at 1 when the ids are already expanded.

        Example:

        ```python
        >>> cache = SpecKVCache(draft=draft, max_capacity_prompt=256)
        >>> cache.prepare_prefill(target, inputs["input_ids"], {"attention_mask": inputs["attention_mask"]})
        >>> out = target.generate(**inputs, past_key_values=cache, max_new_tokens=32)
        ```
        """
        model_kwargs = model_kwargs or {}
        attention_mask = model_kwargs.get("attention_mask")
        prefill.refuse_unservable_generation(self, model_kwargs, generation_config)
        if input_ids is not None and input_ids.shape[-1] == 0 and model_kwargs.get("inputs_embeds") is not None:
            input_ids = None  # `generate` hands a prompt given as embeddings over with empty ids
        if self.continues(input_ids, attention_mask, model=model):
            return
        if expand_size < 1:
            raise ValueError(f"`expand_size` must be >= 1, got {expand_size}.")
        prefill.refuse_prompt_outputs(self, model_kwargs, generation_config)
        attention_mask = prefill.check_prompt(self, input_ids, attention_mask)
        if self.static_decode_tokens is not None:
            self._check_static_model(model)
            self._check_static_generation(model_kwargs, generation_config)
        self.reset()
        prefill.fill_cache(self, model, input_ids, attention_mask)
        if expand_size > 1:
            self.batch_repeat_interleave(expand_size)
        if self.static_decode_tokens is not None:
            self._install_static_layers()

    def _prepare_generate(self, model, input_ids, model_kwargs: dict, generation_config) -> None:
        """Called by a bound model's `generate` before anything else: refuse what cannot be served, and forget the
        old prompt when the ids do not continue it (the forward pre-hook then fills the fresh cache)."""
        prefill.refuse_unservable_generation(self, model_kwargs, generation_config)
        if input_ids is None:
            if self.get_seq_length() > 0:
                raise ValueError(
                    f"This {type(self).__name__} holds a prompt, and this call gives no `input_ids` to compare it with. "
                    "Pass `input_ids` (or call `cache.reset()` first)."
                )
            return
        if not self.continues(input_ids, model_kwargs.get("attention_mask"), model=model):
            self.reset()
            if self.static_decode_tokens is not None:
                self._check_static_generation(model_kwargs, generation_config)
                # Static decoding needs its layers before generate decides to compile and builds fixed-shape masks,
                # so the bound model runs the explicit prefill step here instead of in its forward pre-hook.
                self.prepare_prefill(
                    model, input_ids, model_kwargs, generation_config, expand_size=_expand_size(model_kwargs, generation_config)
                )

    def _check_continuation(self, input_ids, attention_mask) -> None:
        """Refuses a forward that cannot continue the held sequence (wrong batch or mask length)."""
        rows = self.prompt_mask.shape[0] if self.prompt_mask is not None else None
        if input_ids is not None and rows is not None and input_ids.shape[0] != rows:
            raise ValueError(
                f"This {type(self).__name__} holds {rows} rows, the forward has {input_ids.shape[0]}. A forward on a "
                "cache that holds tokens continues them; for a new prompt call `cache.reset()` or use a fresh cache."
            )
        if attention_mask is not None and attention_mask.dim() == 2 and input_ids is not None:
            expected = self.get_seq_length() + input_ids.shape[1]
            if attention_mask.shape[1] != expected:
                raise ValueError(
                    f"This {type(self).__name__} holds {self.get_seq_length()} tokens, so a forward of "
                    f"{input_ids.shape[1]} more needs a mask of {expected}, got {attention_mask.shape[1]}. For a new "
                    "prompt call `cache.reset()` or use a fresh cache."
                )

    def kept_positions(self, layer_idx: int) -> torch.Tensor | None:
        """Original positions (in the left-padded prompt) of the prompt rows layer `layer_idx` keeps, per batch row
        and KV head, or `None` if that layer was not compressed."""
        layer = self.layers[layer_idx]
        return getattr(layer, "kept_positions", None)

    def cache_bytes(self) -> int:
        """Bytes held by the stored keys and values of every layer."""
        total = 0
        for layer in self.layers:
            for tensor in (layer.keys, layer.values):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    # ----------------------------------------------------------------------------------------------------------------
    # Static decoding: fixed-shape layers after the prefill, so the decode forward can be compiled
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def static_decode_tokens(self) -> int | None:
        """The `max_new_tokens` the static layers are sized for, or `None` for the dynamic path (the default)."""
        return getattr(self, "_static_decode_tokens", None)

    def use_static_decode(self, max_new_tokens: int | None):
        """Decode on static compressed layers: after each compressing prefill, every full-attention layer moves its
        rows into preallocated buffers of `max_capacity_prompt + 1 + max_new_tokens` rows with an in-place row
        counter. Decoding then runs at fixed shapes, `is_compileable` is True, and `generate` compiles the decode
        forward where it compiles for transformers' `StaticCache` (on GPU; on CPU when given a
        `compile_config` with `_compile_all_devices=True`), or wrap the forward in `torch.compile` yourself.

        The static layers are installed by [`prepare_prefill`] (a bound model's `generate` runs that step itself).
        They serve greedy, sampling and beam search (beams are reordered in place) for at most `max_new_tokens`
        tokens after the prompt; a forward that would grow past the buffers raises `StaticCacheOverflowError` instead
        of reallocating. What they do not serve, and which stays on the dynamic path (`use_static_decode(None)`):
        models with sliding-window or chunked-attention layers, models that build their own compiled-decoding mask
        (`_prepare_4d_causal_attention_mask_with_cache_position`), growing a cache across `generate` calls, and
        assisted decoding. Those are refused with an error when the prefill runs.

        Args:
            max_new_tokens (`int` or `None`): the most tokens any `generate` call on this cache will add (the last
                prompt token, re-fed by `generate`, is accounted for separately). `None` switches back to dynamic.

        Returns:
            The cache itself.

        Example:

        ```python
        >>> cache = SnapKVCache(max_capacity_prompt=256).use_static_decode(max_new_tokens=64)
        >>> cache.prepare_prefill(model, inputs["input_ids"], {"attention_mask": inputs["attention_mask"]})
        >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
        ```
        """
        if max_new_tokens is not None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"`max_new_tokens` must be a positive integer or None, got {max_new_tokens!r}.")
        self._static_decode_tokens = max_new_tokens
        return self

    def _check_static_model(self, model) -> None:
        """Refuses, before any work, models the static compressed layers cannot serve."""
        name = type(self).__name__
        reason = compat.static_decode_unsupported_reason(model)
        if reason is None:
            others = sorted({type(layer).__name__ for layer in build_layers(model.config)
                             if not isinstance(layer, CompressedKVLayer)})
            if others:
                reason = f"this model has {others} cache layers (sliding-window or chunked attention)"
        if reason is not None:
            raise ValueError(
                f"{name}.use_static_decode: {reason}, which the static compressed cache does not serve. Use the "
                "dynamic path for this model: `cache.use_static_decode(None)`."
            )

    def _check_static_generation(self, model_kwargs: dict, generation_config) -> None:
        """Refuses a `generate` call that asks for more tokens than the static layers are sized for."""
        requested = model_kwargs.get("max_new_tokens")
        if requested is None:
            requested = getattr(generation_config, "max_new_tokens", None)
        if requested is not None and requested > self.static_decode_tokens:
            raise ValueError(
                f"This call asks for max_new_tokens={requested}, but the static compressed cache was sized for "
                f"{self.static_decode_tokens} (`use_static_decode`). The buffers never grow: call "
                f"`cache.use_static_decode({requested})`, or use the dynamic path (`use_static_decode(None)`)."
            )
        if (model_kwargs.get("assistant_model") is not None or model_kwargs.get("prompt_lookup_num_tokens")
                or getattr(generation_config, "prompt_lookup_num_tokens", None)):
            raise ValueError(
                "Assisted decoding with a static compressed cache is not supported (its candidates and rejections "
                "change the rows per step). Use the dynamic path: `cache.use_static_decode(None)`."
            )

    def _install_static_layers(self) -> None:
        """Replaces every compressed full-attention layer by a static one sized for the configured decode length."""
        budget = self.config.max_capacity_prompt
        for index, layer in enumerate(self.layers):
            if isinstance(layer, CompressedKVLayer):
                capacity = max(budget, layer.num_rows) + 1 + self.static_decode_tokens
                self.layers[index] = StaticCompressedLayer.from_layer(layer, capacity)

    # ----------------------------------------------------------------------------------------------------------------
    # The composition: scorer, query source, selection policy
    # ----------------------------------------------------------------------------------------------------------------
    def build_scorer(self) -> KVScorer:
        """The scorer of the next prefill: the one given at construction; subclasses build theirs from the config
        (read at every prefill, so edits to the config apply)."""
        if self.scorer is None:
            raise ValueError(
                f"{type(self).__name__} has no scorer: pass `scorer=` (a `KVScorer`) or use a method's cache class "
                "(SpecKVCache, SnapKVCache, ...)."
            )
        return self.scorer

    def selection_policy(self) -> SelectionPolicy:
        """The selection policy of the next prefill, built from the config."""
        return SelectionPolicy.from_config(self.config, window_counts_last_token=self.window_counts_last_token)

    # ----------------------------------------------------------------------------------------------------------------
    # The compressing prefill, run from the bound model's forward pre-hook (see binding.py)
    # ----------------------------------------------------------------------------------------------------------------
    def _prepare_forward(self, model, args: tuple, kwargs: dict[str, Any]):
        if self.static_decode_tokens is not None and compat.is_compiling():
            # A compiled decode step on the static layers: no Python bookkeeping inside the graph. The consumed ids
            # then stop at the eager forwards, so a later call is taken for a new prompt (never a wrong continuation).
            return None
        return prefill.prepare_forward(self, model, args, kwargs)
