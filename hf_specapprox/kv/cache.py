"""The compressing caches' common base: a transformers `Cache` whose layers hold a compressed prompt.

The cache is data: its layers (`layers.py`, `static_layers.py`), a record of the prompt they hold (`record.py`) and,
optionally, a retained context (`context.py`). The behaviour lives in what it is composed of: a query source, a scorer
and a selection policy, run by the prefill (`prefill.py`), after every refusal has been decided (`checks.py`).

[`KVCompressionCache.prepare_prefill`] is the explicit step (the shape of the upstream `Cache.prepare_prefill`
hook): it fills the cache with the compressed first `L - 1` prompt positions, and stock `generate` then continues from
it on any model, bound or not. A bound model (see [`bind`]) runs that step itself for every `generate` call whose ids
do not continue what the cache consumed, so one cache object can serve many prompts (e.g. in a pipeline).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.utils import logging

from .. import compat
from ..checks import (check_prompt, expand_size_reasons, expanded_rows, generation_reasons, layer_budget_reasons,
                      prompt_output_reasons, refuse, sparse_prefill_reasons, static_generation_reasons,
                      static_model_reasons)
from ..config import KVSelectionConfig, resolve_config
from ..modeling.distributed import check_same_inputs_across_ranks
from .binding import bind
from .context import RetainedContext
from .layers import CompressedKVLayer, build_layers
from .policies import SelectionPolicy
from .prefill import compressing_prefill, uses_sparse_prefill
from .query_sources import QuerySource
from .record import ModelSignature, PromptRecord
from .scorers import KVScorer
from .static_layers import StaticCompressedLayer

logger = logging.get_logger(__name__)

# Makes the check-and-claim of a cache by a `generate` call atomic across threads (a lock, not state).
_CLAIM_LOCK = threading.Lock()


class UnboundCacheError(RuntimeError):
    """Raised when a compressing cache reaches a model forward without having seen the prompt."""


class CacheInUseError(RuntimeError):
    """Raised when a compressing cache is used by a second call while another call is still using it."""


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


def _normalise_inputs(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    kwargs = dict(kwargs)
    if args:
        if "input_ids" in kwargs:
            raise TypeError("`input_ids` given both positionally and as a keyword.")
        kwargs["input_ids"], args = args[0], tuple(args[1:])
    return args, kwargs


def _appended_tokens(kwargs: dict[str, Any], input_length: int) -> int:
    """How many trailing tokens of a first forward are not prompt: `logits_to_keep = k > 1` (as assisted decoding
    asks for its candidates on its first forward) means the last `k - 1` tokens are evaluated against the compressed
    prompt."""
    logits_to_keep = kwargs.get("logits_to_keep")
    if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep > 1:
        return min(logits_to_keep - 1, input_length - 1)
    return 0


class _Claim:
    """Which thread's call is using a cache (`owner`), and how deep; a copy of a cache starts unclaimed."""

    def __init__(self):
        self.owner: int | None = None
        self.depth = 0

    def __deepcopy__(self, memo):
        return _Claim()


class KVCompressionCache(Cache):
    """A transformers `Cache` that drops prompt KV pairs during the prefill: a composition of a scorer, a query
    source and a selection policy.

    * the **query source** ([`QuerySource`], e.g. SpecKV's [`DraftPreview`]) appends tokens after the prompt for the
      scoring forward; their K/V are never stored;
    * the **scorer** ([`KVScorer`]) scores, in every full-attention layer, the candidate prompt keys per KV head from
      the voting rows' post-RoPE queries (the window, the last prompt token and the appended tokens);
    * the **selection policy** ([`SelectionPolicy`], built from the config: window, sinks, uniform or layer-wise
      budgets) keeps the window and the best candidates.

    The cache itself holds data: its layers, a record of the prompt they hold, and optionally a retained context
    ([`retain_context`]: a long context prefilled once, from which every `generate` call selects its own KV).
    [`SpecKVCache`], [`SnapKVCache`], [`StreamingLLMCache`] and `KnormCache` are subclasses that only name their
    config class and build their scorer; a composition of your own needs no subclass:

    ```python
    >>> cache = KVCompressionCache(AttentionSelectionConfig(max_capacity_prompt=256, layer_budgets="pyramid"),
    ...                                scorer=KeyNormScorer(), query_source=DraftPreview(draft))
    ```

    A cache serves one call at a time, like any cache: a second `generate` call that reaches it while another one
    (on another thread) still runs raises `CacheInUseError`. Give each concurrent call its own cache (a
    `copy.deepcopy` shares the draft and a retained context, and copies the rest).

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
        self.record = PromptRecord()
        #: The retained context every prompt is selected from (see [`retain_context`]), or `None`.
        self.context: RetainedContext | None = None
        self._static_decode_tokens: int | None = None
        self._claim = _Claim()
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
        self._check_claim()
        if not self.record.filled:
            raise _unbound_error(self)
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"This {type(self).__name__} was filled for a model with {len(self.layers)} cache layers; a model with "
                f"more layers is using it now. A cache holds one model's keys and values: use a fresh cache (or "
                "`cache.reset()`) for another model."
            )
        layer = self.layers[layer_idx]
        held = layer.keys if isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.dim() == 4 else None
        if held is not None and held.shape[1] != key_states.shape[1]:
            raise ValueError(
                f"Layer {layer_idx} of this {type(self).__name__} holds {held.shape[1]} KV heads, the model feeding it "
                f"has {key_states.shape[1]}: the cache was filled by another model. Use a fresh cache (or "
                "`cache.reset()`)."
            )
        if held is not None and held.shape[0] != key_states.shape[0]:
            raise ValueError(
                f"This {type(self).__name__} holds {held.shape[0]} rows, the forward has {key_states.shape[0]}. If "
                "`generate` expands the batch (num_beams, num_return_sequences), fill the cache for the expanded "
                "rows: `cache.prepare_prefill(..., expand_size=num_beams)` (num_return_sequences without beams); "
                "for a new prompt call `cache.reset()` or use a fresh cache."
            )
        return layer.update(key_states, value_states, *args, **kwargs)

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
        self.record.crop(self.get_seq_length())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() == 0:
            return  # nothing held: a no-op, as for `DynamicCache`
        super().reorder_cache(beam_idx)
        self.record.map_rows(lambda rows: rows.index_select(0, beam_idx.to(rows.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            super().batch_repeat_interleave(repeats)
        self.record.map_rows(lambda rows: rows.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() == 0:
            return
        super().batch_select_indices(indices)
        self.record.map_rows(lambda rows: rows[indices.to(rows.device)])

    def reset(self) -> None:
        """Forgets the prompt, as transformers' `Cache.reset` does: every layer is kept and emptied, and the record
        (consumed ids, draft tokens) is cleared. The configuration, the draft and a retained context stay; the next
        `generate` call or forward is a new prompt."""
        for layer in self.layers:
            layer.reset()
        self.record = PromptRecord()

    # ----------------------------------------------------------------------------------------------------------------
    # The prompt record
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def prompt_length(self) -> int | None:
        """`L`: the width of the last compressed prompt (left-padded), or `None`."""
        return self.record.length

    @property
    def prompt_mask(self) -> torch.Tensor | None:
        """The last prompt's padding mask, `(rows, L)` bool, or `None`."""
        return self.record.mask

    @property
    def lookahead_ids(self) -> torch.Tensor | None:
        """The tokens the query source appended for the last prefill (the draft's preview), or `None`."""
        return self.record.lookahead_ids

    @property
    def lookahead_valid(self) -> torch.Tensor | None:
        """False after a row's end of sequence in [`lookahead_ids`]."""
        return self.record.lookahead_valid

    @property
    def consumed_ids(self) -> torch.Tensor | None:
        """The token ids the cache has seen consumed so far, `(batch, n)` with `-1` on padding; `None` when unknown
        (e.g. a forward given only `inputs_embeds`). `n` is `get_seq_length()`, or less after forwards whose ids the
        cache did not see (transformers' own `generate` on an unbound model): such a cache is never continued, the
        next call is a new prompt (see [`continues`])."""
        return self.record.consumed_ids()

    def continues(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, model=None, *,
                  expand_size: int = 1) -> bool:
        """Whether `input_ids` (a whole sequence, as `generate` receives it) continue what this cache holds: every
        held position was seen (same ids, same padding), the ids add at least one, the cache holds `expand_size` rows
        per row of the ids (as `generate` expands them for beams or returned sequences) and, when `model` is given,
        it was filled by that model. This is `DynamicCache`'s rule, made exact; any other ids are a new prompt."""
        if model is not None and (self.record.signature is None or not self.record.signature.matches(model)):
            return False
        held = self.get_seq_length()
        rows = self.record.rows
        if input_ids is None or rows is None or rows != input_ids.shape[0] * expand_size:
            return False
        return self.record.continues(input_ids, attention_mask, held)

    # ----------------------------------------------------------------------------------------------------------------
    # The explicit prefill step
    # ----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_prefill(self, model, input_ids: torch.Tensor, model_kwargs: dict | None = None,
                        generation_config=None, *, expand_size: int = 1) -> None:
        """Fills the cache from a whole prompt, so that `generate` continues from it (the upstream hook's shape).

        Ids that continue what the cache holds (see [`continues`]) leave it as it is. Any other ids are a new prompt:
        the cache forgets the old one and holds, afterwards, the compressed first `L - 1` positions of the new one;
        `generate(input_ids, ..., cache=this)` then computes the last prompt token against them, on any model (bound
        or not) and on every supported transformers version. A prompt that fits the budget leaves the cache empty
        (an ordinary prefill follows). With a retained context (see [`retain_context`]) every call is a new
        selection, made from the context's keys and values. A transformers whose `generate` calls
        `Cache.prepare_prefill` itself (see docs/upstream.md) runs this step once per call with the expanded prompt.

        Args:
            model (`PreTrainedModel`): the target.
            input_ids (`torch.LongTensor` of shape `(batch, length)`): the whole prompt, left-padded.
            model_kwargs (`dict`, *optional*): `generate`'s model kwargs; its `attention_mask` is used.
            generation_config (`GenerationConfig`, *optional*): checked for what a compressing cache cannot serve
                (`use_cache=False`, `prefill_chunk_size`, the prompt's attentions or hidden states).
            expand_size (`int`, *optional*, defaults to 1): repeat every row this many times after filling, as
                `generate` repeats the prompt for `num_beams` (or `num_return_sequences` without beams; it does not
                expand a cache it is given). Leave it at 1 when the ids are already expanded.

        Example:

        ```python
        >>> cache = SpecKVCache(draft=draft, max_capacity_prompt=256)
        >>> cache.prepare_prefill(target, inputs["input_ids"], {"attention_mask": inputs["attention_mask"]})
        >>> out = target.generate(**inputs, past_key_values=cache, max_new_tokens=32)
        ```
        """
        model_kwargs = model_kwargs or {}
        name = type(self).__name__
        refuse(expand_size_reasons(expand_size) + generation_reasons(name, model_kwargs, generation_config))
        if input_ids is not None and input_ids.shape[-1] == 0 and model_kwargs.get("inputs_embeds") is not None:
            input_ids = None  # `generate` hands a prompt given as embeddings over with empty ids
        attention_mask = model_kwargs.get("attention_mask")
        with self._claimed():
            if self.context is None and input_ids is not None:
                if self.continues(input_ids, attention_mask, model, expand_size=expand_size):
                    return
                if expand_size > 1 and self.continues(input_ids, attention_mask, model):
                    self.batch_repeat_interleave(expand_size)  # filled before for the unexpanded rows
                    return
            reasons = prompt_output_reasons(name, model_kwargs, generation_config)
            if self.static_decode_tokens is not None:
                reasons += static_generation_reasons(name, self.static_decode_tokens, model_kwargs, generation_config)
            refuse(reasons)
            attention_mask = check_prompt(input_ids, attention_mask, name)
            self.reset()
            self._fill(model, input_ids, attention_mask)
            if expand_size > 1:
                self.batch_repeat_interleave(expand_size)
            if self.static_decode_tokens is not None:
                self._install_static_layers()

    def _refuse_unservable(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Every refusal that depends on the model, the config and the prompt, together, before any work."""
        name = type(self).__name__
        self.config.validate()  # a config edited after construction is checked here, before any work
        source = self.query_source
        source.validate_model(model)
        reasons = []
        if uses_sparse_prefill(self.config, input_ids.shape[1] + source.max_tokens(self.config)):
            reasons += sparse_prefill_reasons(model)
        if not self.selection_policy().is_uniform:
            reasons += layer_budget_reasons(name, self.config.layer_budgets, model,
                                            static=self.static_decode_tokens is not None)
        if self.static_decode_tokens is not None:
            reasons += static_model_reasons(name, model, [type(layer).__name__ for layer in
                                                          build_layers(model.config)])
        if self.context is not None:
            reasons += self._context_reasons(model)
        refuse(reasons)
        source.validate_prompt(input_ids, attention_mask)

    def _fill(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
        """Runs the compressing prefill for a checked prompt and installs its layers and record; returns whether the
        layers now hold the prompt's first `L - 1` positions (compressed, or all of them with
        `max_capacity_prompt=None`). On any exception the cache is left empty."""
        self._refuse_unservable(model, input_ids, attention_mask)
        check_same_inputs_across_ranks(model, input_ids, attention_mask)
        prefix = self._context_prefix(input_ids, attention_mask)
        grows = prefix is not None and input_ids.shape[0] == 1 and bool(attention_mask.bool().all())
        try:
            result = compressing_prefill(
                model, input_ids, attention_mask, config=self.config, scorer=self.build_scorer(),
                policy=self.selection_policy(), query_source=self.query_source, context=prefix,
                keep_prompt_from=prefix.length if grows else None,
            )
        except BaseException:
            self.reset()
            raise
        self.layers = result.layers
        self.record = PromptRecord(
            filled=True, length=input_ids.shape[1], mask=attention_mask.bool(), lookahead_ids=result.lookahead_ids,
            lookahead_valid=result.lookahead_valid, signature=ModelSignature.of(model, result.layers),
        )
        if result.holds_prompt:
            self.record.consume(input_ids[:, :-1], attention_mask[:, :-1])
        if grows and result.holds_prompt:
            self._grow_context(input_ids, prefix, result)
        return result.holds_prompt

    # ----------------------------------------------------------------------------------------------------------------
    # A retained context
    # ----------------------------------------------------------------------------------------------------------------
    def retain_context(self, model, input_ids: torch.Tensor, *, offload: bool = False) -> "KVCompressionCache":
        """Prefills a long context once and keeps its full keys and values (the target's and, for SpecKV, the
        draft's), so that every later `generate` call whose ids start with it selects its own KV from it without
        prefilling the context again: multi-turn chat over one document (the same cache, one call per turn) or many
        questions over one corpus (`copy.deepcopy(cache)` per question: the copies share the context).

        Each call's answer is the one a fresh cache gives over the call's whole ids with the dense prefill (the
        retained context is never compressed; only each call's working layers are). A conversation grows the
        retained context by its earlier turns, recomputed with full attention against it (a new context object
        sharing the old one's tensors, so copies never see each other's turns).

        Args:
            model (`PreTrainedModel`): the target.
            input_ids (`torch.LongTensor` of shape `(1, n)`): the context, one row without padding (e.g. the chat
                template rendered up to the first question).
            offload (`bool`, *optional*, defaults to `False`): keep the retained keys and values in CPU memory; each
                question's scoring forward moves one layer at a time to the device.

        Returns:
            The cache itself.

        Example:

        ```python
        >>> cache = SpecKVCache(draft=draft, max_capacity_prompt=128).retain_context(target, context_ids)
        >>> for question_ids in questions:  # each: the context's ids followed by a question
        ...     out = target.generate(question_ids, past_key_values=copy.deepcopy(cache), max_new_tokens=32)
        ```
        """
        draft = getattr(self.query_source, "draft", None)
        with self._claimed():
            self.context = RetainedContext.prefill(model, input_ids, draft=draft, offload=offload)
            self.reset()
        return self

    def _context_reasons(self, model) -> list[str]:
        context, name = self.context, type(self).__name__
        reasons = []
        if not context.belongs_to(model):
            reasons.append(
                f"This {name}'s retained context was prefilled by another target model. Retain it again with this "
                "model (`cache.retain_context(model, context_ids)`), or drop it (`cache.context = None`)."
            )
        draft = getattr(self.query_source, "draft", None)
        if context.has_draft and draft is not None and not context.drafted_by(draft):
            reasons.append(
                f"This {name}'s retained context holds another draft's keys and values than this cache's draft. "
                "Retain it again (`cache.retain_context(model, context_ids)`)."
            )
        if not context.unchanged():
            reasons.append(
                f"The retained context of this {name} was modified in place after its prefill, so its keys and values "
                "no longer belong to its ids. Retain it again (`cache.retain_context(model, context_ids)`)."
            )
        return reasons

    def _context_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The part of the retained context this prompt can start from, or `None` (no context, nothing shared)."""
        budget = self.config.max_capacity_prompt
        if self.context is None or budget is None or input_ids.shape[1] <= budget:
            return None  # (keeping every position from a retained context is a plain continuation of it)
        padding = attention_mask.shape[1] - attention_mask.long().sum(-1)
        common = self.context.common_prefix(input_ids, attention_mask)
        start = min(self.selection_policy().window_start(input_ids.shape[1]), int((padding.cpu() + common).min()))
        if start <= 0 or int(common.min()) == 0:
            logger.warning_once(
                f"{type(self).__name__}: these ids do not start with the retained context, so the whole prompt is "
                "prefilled (exactly, as a fresh cache would; the retained context did not save any work)."
            )
            return None
        return self.context.prefix_for(input_ids, attention_mask, start)

    def _grow_context(self, input_ids: torch.Tensor, prefix, result) -> None:
        """Makes the context this one-row prompt's first `L - 1` positions, from the full keys and values the scoring
        forward (and the draft's preview) computed for them."""
        start, stop = prefix.length, input_ids.shape[1] - 1
        if stop <= start:
            return
        draft = None
        if prefix.draft_cache_used is not None and self.context.has_draft:
            draft = [(layer.keys[..., start:stop, :], layer.values[..., start:stop, :])
                     for layer in prefix.draft_cache_used.layers]
            if any(keys.shape[-2] != stop - start for keys, _ in draft):
                draft = None
        if self.context.has_draft and draft is None:
            return  # the draft did not cover these positions: keep the context as it was
        self.context = self.context.head(start).extended(input_ids[0, start:stop], result.prompt_keys, draft)

    # ----------------------------------------------------------------------------------------------------------------
    # Driven by a bound model (see binding.py)
    # ----------------------------------------------------------------------------------------------------------------
    @contextmanager
    def serving_generate(self, model, input_ids, model_kwargs: dict, generation_config):
        """Held around a bound model's whole `generate` call: claims the cache for this call (a concurrent second
        call raises `CacheInUseError`), refuses what cannot be served, and forgets the old prompt when the ids do not
        continue it (the forward pre-hook then fills the fresh cache)."""
        with self._claimed():
            self._before_generate(model, input_ids, model_kwargs, generation_config)
            yield

    def _before_generate(self, model, input_ids, model_kwargs: dict, generation_config) -> None:
        refuse(generation_reasons(type(self).__name__, model_kwargs, generation_config))
        if input_ids is None:
            if self.get_seq_length() > 0:
                raise ValueError(
                    f"This {type(self).__name__} holds a prompt, and this call gives no `input_ids` to compare it with. "
                    "Pass `input_ids` (or call `cache.reset()` first)."
                )
            return
        expand = expanded_rows(model_kwargs, generation_config)
        if self.context is None and self.continues(input_ids, model_kwargs.get("attention_mask"), model,
                                                   expand_size=expand):
            return
        self.reset()
        if self.static_decode_tokens is not None:
            # Static decoding needs its layers before generate decides to compile and builds fixed-shape masks,
            # so the bound model runs the explicit prefill step here instead of in its forward pre-hook.
            self.prepare_prefill(model, input_ids, model_kwargs, generation_config, expand_size=expand)

    def prepare_forward(self, model, args: tuple, kwargs: dict[str, Any]):
        """A bound model's forward pre-hook: returns the `(args, kwargs)` the forward runs with, or `None` to leave
        them. A cache that holds a prompt is continued; a fresh one takes the forward's ids as the whole prompt."""
        if self.static_decode_tokens is not None and compat.is_compiling():
            # A compiled decode step on the static layers: no Python bookkeeping inside the graph. The consumed ids
            # then stop at the eager forwards, so a later call is taken for a new prompt (never a wrong continuation).
            return None
        self._check_claim()
        args, kwargs = _normalise_inputs(args, kwargs)
        name = type(self).__name__
        refuse(generation_reasons(name, kwargs, None))
        input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if self.record.filled:
            # Decoding steps may carry masks `generate` built already (4-D, or one per layer type): only a 2-D padding
            # mask says which positions are padding.
            padding_mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 \
                else None
            self._check_continuation(input_ids, padding_mask)
            self.record.consume(input_ids, padding_mask)
            return args, kwargs
        refuse(prompt_output_reasons(name, kwargs, None))
        attention_mask = check_prompt(input_ids, attention_mask, name)
        # Assisted decoding's first forward is `prompt + candidates`: only the prompt is compressed; the candidates
        # are evaluated against it and appended (so a rejection can crop them).
        input_length = input_ids.shape[1]
        prompt_length = input_length - _appended_tokens(kwargs, input_length)
        with self._claimed():
            holds_prompt = self._fill(model, input_ids[:, :prompt_length], attention_mask[:, :prompt_length])
        if not holds_prompt:
            self.record.consume(input_ids, attention_mask)
            return args, kwargs
        # The forward generate asked for now computes only the last prompt token (and any appended candidates), at
        # their original positions.
        self.record.consume(input_ids[:, prompt_length - 1:], attention_mask[:, prompt_length - 1:])
        kwargs["input_ids"] = input_ids[:, prompt_length - 1:]
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, prompt_length - 1:]
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = kwargs["cache_position"][prompt_length - 1:]
        return args, kwargs

    def _check_continuation(self, input_ids, attention_mask) -> None:
        """Refuses a forward that cannot continue the held sequence (wrong batch or mask length)."""
        rows = self.record.rows
        name = type(self).__name__
        if input_ids is not None and rows is not None and input_ids.shape[0] != rows:
            raise ValueError(
                f"This {name} holds {rows} rows, the forward has {input_ids.shape[0]}. A forward on a cache that "
                "holds tokens continues them; for a new prompt call `cache.reset()` or use a fresh cache. (A cache "
                "filled with `prepare_prefill` for `generate(num_beams=...)` needs `expand_size=num_beams`.)"
            )
        if attention_mask is not None and input_ids is not None:
            expected = self.get_seq_length() + input_ids.shape[1]
            if attention_mask.shape[1] != expected:
                raise ValueError(
                    f"This {name} holds {self.get_seq_length()} tokens, so a forward of {input_ids.shape[1]} more "
                    f"needs a mask of {expected}, got {attention_mask.shape[1]}. For a new prompt call "
                    "`cache.reset()` or use a fresh cache."
                )

    # ----------------------------------------------------------------------------------------------------------------
    # One call at a time
    # ----------------------------------------------------------------------------------------------------------------
    @contextmanager
    def _claimed(self):
        """Marks the cache as used by this thread for the block (re-entrant); another thread's use raises."""
        claim, me = self._claim, threading.get_ident()
        with _CLAIM_LOCK:
            if claim.owner is not None and claim.owner != me:
                raise self._in_use_error()
            claim.owner = me
            claim.depth += 1
        try:
            yield
        finally:
            with _CLAIM_LOCK:
                claim.depth -= 1
                if claim.depth == 0:
                    claim.owner = None

    def _check_claim(self) -> None:
        if compat.is_compiling():
            return  # a compiled decode step: no Python bookkeeping in the graph (its call was claimed when it began)
        owner = self._claim.owner
        if owner is not None and owner != threading.get_ident():
            raise self._in_use_error()

    def _in_use_error(self) -> CacheInUseError:
        return CacheInUseError(
            f"This {type(self).__name__} is in use by another call (on another thread) that has not finished. A cache "
            "serves one call at a time: give each concurrent call its own cache (`copy.deepcopy(cache)` shares the "
            "draft and any retained context)."
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Inspection
    # ----------------------------------------------------------------------------------------------------------------
    def kept_positions(self, layer_idx: int) -> torch.Tensor | None:
        """Original positions (in the left-padded prompt) of the prompt rows layer `layer_idx` keeps, per batch row
        and KV head, or `None` if that layer was not compressed."""
        layer = self.layers[layer_idx]
        return getattr(layer, "kept_positions", None)

    def cache_bytes(self) -> int:
        """Bytes held by the stored keys and values of every working layer (a retained context apart: see
        `cache.context.nbytes()`)."""
        total = 0
        for layer in self.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    # ----------------------------------------------------------------------------------------------------------------
    # Static decoding: fixed-shape layers after the prefill, so the decode forward can be compiled
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def static_decode_tokens(self) -> int | None:
        """The `max_new_tokens` the static layers are sized for, or `None` for the dynamic path (the default)."""
        return self._static_decode_tokens

    def use_static_decode(self, max_new_tokens: int | None):
        """Decode on static compressed layers: after each compressing prefill, every full-attention layer moves its
        rows into preallocated buffers of `max_capacity_prompt + 1 + max_new_tokens` rows with an in-place row
        counter. Decoding then runs at fixed shapes, `is_compileable` is True, and `generate` compiles the decode
        forward where it compiles for transformers' `StaticCache` (on GPU; on CPU when given a
        `compile_config` with `_compile_all_devices=True`), or wrap the forward in `torch.compile` yourself.

        The static layers are installed by [`prepare_prefill`] (a bound model's `generate` runs that step itself),
        from the next prompt on. They serve greedy, sampling and beam search (beams are reordered in place) for at
        most `max_new_tokens` tokens after the prompt; a forward that would grow past the buffers raises
        `StaticCacheOverflowError` instead of reallocating. What they do not serve, and which stays on the dynamic
        path (`use_static_decode(None)`): models with sliding-window or chunked-attention layers, models that build
        their own compiled-decoding mask (`_prepare_4d_causal_attention_mask_with_cache_position`), layer-wise budgets
        and assisted decoding. Those are refused with an error when the prefill runs.

        Args:
            max_new_tokens (`int` or `None`): the most tokens any `generate` call on this cache will add (the last
                prompt token, re-fed by `generate`, is accounted for separately). `None` switches back to dynamic
                layers at once: static layers already filled become dynamic ones holding the same rows, so a
                conversation continues past the old buffers' size.

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
        if max_new_tokens is None:
            self.layers = [layer.to_dynamic() if isinstance(layer, StaticCompressedLayer) else layer
                           for layer in self.layers]
        return self

    def _install_static_layers(self) -> None:
        """Replaces every compressed full-attention layer by a static one sized for the configured decode length."""
        budget = self.config.max_capacity_prompt or 0
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
