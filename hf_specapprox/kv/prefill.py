"""The compressing prefill: how a compressing cache fills itself from a whole prompt.

For a prompt of `L` tokens (left-padded) and a budget `C < L`:

1. the cache's method appends its lookahead (SpecKV: the draft's greedy answer preview; SnapKV: nothing);
2. the model's backbone runs once over `prompt + lookahead`; in every full-attention layer the queries of the voting
   rows score the candidate keys, and the layer keeps its `C - window` best candidates per KV head plus the window,
   right after computing its own attention (so at most one layer's full K/V exists at a time);
3. the lookahead's and the last prompt token's K/V are never stored: the cache then holds `L - 1` logical positions,
   and the forward that follows (the one `generate` runs) computes the last prompt token at its original position
   against the compressed cache.

Sliding-window layers store the first `L - 1` prompt tokens as `DynamicCache` would have.

Two entry points share this: [`fill_cache`], the public step (`PromptCompressionCache.prepare_prefill`, the shape of
the upstream `Cache.prepare_prefill` hook, which a transformers with that hook calls itself), and [`prepare_forward`],
the body of a bound model's forward pre-hook (where `generate` has no such hook), which fills a fresh cache from the
first forward's prompt and lets that forward run on the last prompt token only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging

from .. import compat
from ..kernels import sparse_attention
from ..modeling.capture import (SCORING_KWARG, AttentionObserver, has_scoring_attention, layer_index, original_attention_names,
                      scoring_attention)
from .layers import CompressedKVLayer, build_layers
from .scorers import ScorerInputs

if TYPE_CHECKING:
    from .cache import PromptCompressionCache

logger = logging.get_logger(__name__)


class PrefillState(AttentionObserver):
    """Per-forward state of one compressing prefill; reaches the attention functions through a forward kwarg.

    It holds the composition of the cache for this forward: the scorer and the selection policy (built from the
    config once per prefill) and each compressed layer's number of candidates to keep.
    """

    def __init__(self, cache: PromptCompressionCache, prompt_length: int, token_valid: torch.Tensor):
        self.cache = cache
        self.prompt_length = prompt_length
        self.token_valid = token_valid  # (batch, prompt + lookahead)
        self.scorer = cache.build_scorer()
        self.policy = cache.selection_policy()
        self.window_start = self.policy.window_start(prompt_length)
        compressed = [index for index, layer in enumerate(cache.layers) if isinstance(layer, CompressedKVLayer)]
        counts = self.policy.candidate_counts(prompt_length, len(compressed))
        self.num_selected = dict(zip(compressed, counts))
        self.sparse = uses_sparse_prefill(cache.config, token_valid.shape[1])
        self.pending: set[int] = set()
        self.done: set[int] = set()

    def update(self, layer_idx: int, key_states, value_states, args, kwargs):
        layer = self.cache.layers[layer_idx]
        if isinstance(layer, CompressedKVLayer):
            # The full K/V go to this forward's attention only; the layer stores its selection in `score_layer`.
            self.pending.add(layer_idx)
        else:
            stop = self.prompt_length - 1
            layer.update(key_states[..., :stop, :], value_states[..., :stop, :], *args, **kwargs)
        return key_states, value_states

    def _layer(self, module):
        layer_idx = layer_index(module)
        layer = self.cache.layers[layer_idx]
        return layer_idx, (layer if isinstance(layer, CompressedKVLayer) else None)

    def score_layer(self, module, query, key, value, scaling) -> None:
        layer_idx, layer = self._layer(module)
        if layer is None:
            return
        scores, candidate_valid = self._scores(module, layer_idx, query, key, value, scaling)
        self._keep(layer_idx, layer, key, value, scores, candidate_valid)

    def attend(self, module, query, key, value, attention_mask, attention, **kwargs):
        """Dense prefill: the model's own attention, then the layer is scored. Sparse prefill (paper §2.1, the
        official code's MInference call): the layer is scored first, and its output for every row is the
        vertical-slash attention whose vertical columns are the best-scoring candidates of each KV head."""
        layer_idx, layer = self._layer(module)
        if not self.sparse or layer is None:
            return super().attend(module, query, key, value, attention_mask, attention, **kwargs)
        if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
            raise ValueError(
                f"{type(module).__name__} adds attention sinks, which the sparse prefill's kernel does not. Use a "
                "dense prefill: `sparse_prefill='off'`."
            )
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        scores, candidate_valid = self._scores(module, layer_idx, query, key, value, scaling)
        config = self.cache.config
        columns = sparse_attention.vertical_columns(
            scores.float().masked_fill(~candidate_valid[:, None, :], float("-inf")), config.prefill_vertical_size
        )
        output = sparse_attention.vertical_slash_attention(
            query, key, value, columns, scaling=scaling, key_valid=self.token_valid.to(key.device),
            window_size=config.prefill_window_size, block_size=config.prefill_block_size,
        )
        self._keep(layer_idx, layer, key, value, scores, candidate_valid)
        return output, None

    def _scores(self, module, layer_idx, query, key, value, scaling):
        """The scorer's `(batch, num_kv_heads, num_candidates)` scores of one layer, and the candidates' validity."""
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        valid = self.token_valid.to(key.device)
        start = self.window_start
        scores = self.scorer(ScorerInputs(
            layer_idx=layer_idx, queries=query[:, :, start:, :], keys=key, values=value, scaling=scaling,
            query_offset=start, key_valid=valid, query_valid=valid[:, start:], num_candidates=start, module=module,
        ))
        return scores, valid[:, :start]

    def _keep(self, layer_idx, layer, key, value, scores, candidate_valid) -> None:
        positions = self.policy.select(scores, candidate_valid, self.num_selected[layer_idx], self.prompt_length)
        layer.keep(key, value, positions, seen_tokens=self.prompt_length - 1)
        self.done.add(layer_idx)

    def check_complete(self) -> None:
        missing = sorted(self.pending - self.done)
        if missing:
            raise ValueError(
                f"Layers {missing} stored keys without passing their queries to the attention interface, so they could "
                "not be scored. hf_specapprox needs models whose attention dispatches through transformers' "
                "`AttentionInterface` (all current transformers text models do)."
            )


def uses_sparse_prefill(config, num_tokens: int) -> bool:
    """Whether a prefill forward over `num_tokens` (prompt + lookahead) runs the sparse attention."""
    mode = getattr(config, "sparse_prefill", "off")
    return mode == "on" or (mode == "auto" and num_tokens > config.sparse_prefill_threshold)


def check_sparse_prefill_model(model) -> None:
    """Refuses models whose attention the vertical-slash kernel cannot reproduce (before any work)."""
    softcap = getattr(compat.text_config(model.config), "attn_logit_softcapping", None)
    if softcap:
        raise ValueError(
            f"This model caps its attention logits (`attn_logit_softcapping={softcap}`), which the sparse prefill's "
            "kernel does not do. Use a dense prefill: `sparse_prefill='off'`."
        )


#: Attention implementations whose masks are plain 4-D tensors (or none), which layer-wise budgets can cut per layer.
LAYER_BUDGET_ATTENTIONS = (None, "eager", "sdpa")


def check_layer_budgets_model(cache: PromptCompressionCache, model) -> None:
    """Refuses, before any work, a model on which layers holding different numbers of rows would not decode exactly.

    transformers builds one mask for all full-attention layers; only the scoring attention wrapper of a bound model
    fits it to each layer's rows (see `capture.fit_mask`), and only masks that are 4-D tensors can be cut.
    """
    name = type(cache).__name__
    if not has_scoring_attention(model):
        raise ValueError(
            f"{name} with layer-wise budgets (`layer_budgets='{cache.config.layer_budgets}'`) needs a bound target: "
            "its layers hold different numbers of rows, and the bound model's attention fits transformers' one mask "
            "to each. Call `hf_specapprox.bind(model)` once, or use `layer_budgets='uniform'`."
        )
    unsupported = sorted(str(name) for name in original_attention_names(model) - set(LAYER_BUDGET_ATTENTIONS))
    if unsupported:
        raise ValueError(
            f"{name} with layer-wise budgets supports the 'sdpa' and 'eager' attention implementations, whose masks it "
            f"can fit to each layer's rows; this model uses {unsupported}. Load it with `attn_implementation='sdpa'`, "
            "or use `layer_budgets='uniform'`."
        )
    if cache.static_decode_tokens is not None:
        raise ValueError(
            f"{name}: static decoding (`use_static_decode`) needs the same rows in every layer, which layer-wise "
            "budgets do not give. Use the dynamic path (`cache.use_static_decode(None)`) or `layer_budgets='uniform'`."
        )


def check_prompt(cache: PromptCompressionCache, input_ids, attention_mask) -> torch.Tensor:
    """Validates a prompt batch for a compressing prefill and returns its 2-D padding mask (all ones if `None`)."""
    name = type(cache).__name__
    if input_ids is None:
        raise ValueError(
            f"{name} needs the prompt's `input_ids` (the draft reads them, and the cache compares them with what it "
            "holds); it cannot take a prompt given only as `inputs_embeds`. Pass `input_ids` to `generate`."
        )
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"{name} needs a non-empty `(batch, length)` prompt, got shape {tuple(input_ids.shape)}.")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.dim() != 2:
        raise ValueError(f"{name} needs a 2-D padding mask, got a {attention_mask.dim()}-D mask.")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"{name} got {input_ids.shape[1]} prompt tokens but a mask of {attention_mask.shape[1]}: it must receive "
            "the whole prompt with its mask at once."
        )
    real = attention_mask.bool().sum(-1)
    if not bool(real.all()):
        rows = torch.nonzero(real == 0).flatten().tolist()
        raise ValueError(f"Prompt rows {rows} are all padding; give every row at least one token.")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "The prompt batch is right-padded. Compressing caches need left padding: set "
            "`tokenizer.padding_side = 'left'` before tokenizing."
        )
    return attention_mask


def fill_cache(cache: PromptCompressionCache, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """Fills a reset `cache` with the first `L - 1` positions of the prompt (compressed when `L > C`).

    Returns whether the prompt was compressed. When it fits the budget, the cache stays empty (with its layers
    built): the following forward is then an ordinary prefill of the whole prompt.
    """
    cache.config.validate()  # a config edited after construction is checked here, before any work
    source = cache.query_source
    source.validate_model(model)
    if uses_sparse_prefill(cache.config, input_ids.shape[1] + source.max_tokens(cache.config)):
        check_sparse_prefill_model(model)
    if not cache.selection_policy().is_uniform:
        check_layer_budgets_model(cache, model)
    source.validate_prompt(input_ids, attention_mask)
    cache.layers = build_layers(model.config)
    prompt_length = input_ids.shape[1]
    cache.prompt_length = prompt_length
    cache.prompt_mask = attention_mask.bool()
    if prompt_length <= cache.config.max_capacity_prompt:
        logger.warning_once(
            f"{type(cache).__name__}: the prompt ({prompt_length} tokens) fits the budget "
            f"(max_capacity_prompt={cache.config.max_capacity_prompt}), so nothing is compressed: this is an "
            "ordinary prefill. Lower `max_capacity_prompt` to compress prompts of this length."
        )
        return False
    try:
        lookahead_ids, lookahead_valid = source.tokens(model, input_ids, attention_mask, cache.config)
        lookahead_ids = lookahead_ids.to(input_ids.device)
        lookahead_valid = lookahead_valid.to(attention_mask.device)
        cache.lookahead_ids, cache.lookahead_valid = lookahead_ids, lookahead_valid
        token_valid = torch.cat([attention_mask.bool(), lookahead_valid.bool()], dim=1)
        position_ids = (token_valid.long().cumsum(-1) - 1).clamp(min=0)
        state = PrefillState(cache, prompt_length, token_valid)
        backbone = model.base_model
        cache._prefill_state = state
        with scoring_attention(model):
            backbone(
                input_ids=torch.cat([input_ids, lookahead_ids], dim=1),
                attention_mask=token_valid.to(attention_mask.dtype),
                position_ids=position_ids,
                use_cache=True,
                **{compat.cache_kwarg_name(backbone): cache, SCORING_KWARG: state},
            )
        state.check_complete()
    except BaseException:
        cache.reset()
        raise
    finally:
        cache._prefill_state = None
    cache._record_consumed(input_ids[:, :-1], attention_mask[:, :-1])
    return True


def _normalise_inputs(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    kwargs = dict(kwargs)
    if args:
        if "input_ids" in kwargs:
            raise TypeError("`input_ids` given both positionally and as a keyword.")
        kwargs["input_ids"], args = args[0], tuple(args[1:])
    return args, kwargs


def refuse_unservable_generation(cache, model_kwargs: dict, generation_config) -> None:
    """Raises, before any work, for generation settings a compressing cache cannot serve exactly."""
    name = type(cache).__name__
    configs = [model_kwargs, generation_config]
    if any(_setting(source, "use_cache") is False for source in configs):
        raise ValueError(
            f"`use_cache=False` with a {name}: without a cache every step would re-run the compressing prefill, which "
            "is neither SpecKV nor plain decoding. Leave `use_cache` on (the default)."
        )
    chunk = next((value for value in (_setting(source, "prefill_chunk_size") for source in configs) if value), None)
    if chunk:
        raise ValueError(
            f"`prefill_chunk_size={chunk}` with a {name}: compressing a prompt chunk by chunk is not the paper's "
            "method (each chunk would be scored without the rest of the prompt). Leave `prefill_chunk_size` unset; "
            "the compressing prefill keeps at most one layer's full keys and values at a time."
        )


def refuse_prompt_outputs(cache, model_kwargs: dict, generation_config) -> None:
    """Raises, before any work, when the prompt's attentions or hidden states are asked for (a new prompt only)."""
    for flag in ("output_attentions", "output_hidden_states"):
        if any(_setting(source, flag) for source in (model_kwargs, generation_config)):
            raise ValueError(
                f"`{flag}=True` with a {type(cache).__name__}: the compressing prefill does not return the prompt's "
                f"{flag[7:].replace('_', ' ')} (its forward computes only the last prompt token against the compressed "
                "cache). Run the prompt through the model with a `DynamicCache` to inspect them."
            )


def _setting(source, name: str):
    if source is None:
        return None
    if isinstance(source, dict):
        return source.get(name)
    return getattr(source, name, None)


def prepare_forward(cache: PromptCompressionCache, model, args: tuple, kwargs: dict[str, Any]):
    """Forward pre-hook body: returns the `(args, kwargs)` the forward must run with, or `None` to leave them.

    A cache that holds tokens is continued, as transformers continues any cache it is given (a bound model's
    `generate` resets the cache first when its ids do not continue what the cache consumed). A fresh cache takes the
    forward's ids as the whole prompt.
    """
    if cache._prefill_state is not None:  # the scoring forward itself passes through a bound backbone
        return None
    args, kwargs = _normalise_inputs(args, kwargs)
    refuse_unservable_generation(cache, kwargs, None)
    input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if cache.layers and cache.get_seq_length() > 0:
        cache._check_continuation(input_ids, attention_mask)
        cache._record_consumed(input_ids, attention_mask)
        return args, kwargs
    refuse_prompt_outputs(cache, kwargs, None)
    cache.reset()
    # Assisted decoding's first forward is `prompt + candidates` and asks for the logits of the candidates too: only
    # the prompt is compressed; the candidates are evaluated against it and appended (so a rejection can crop them).
    attention_mask = check_prompt(cache, input_ids, attention_mask)
    input_length = input_ids.shape[1]
    prompt_length = input_length - _appended_tokens(kwargs, input_length)
    compressed = fill_cache(cache, model, input_ids[:, :prompt_length], attention_mask[:, :prompt_length])
    if not compressed:
        cache._record_consumed(input_ids, attention_mask)
        return args, kwargs
    # The forward generate asked for now computes only the last prompt token (and any appended candidates), at their
    # original positions.
    cache._record_consumed(input_ids[:, prompt_length - 1 :], attention_mask[:, prompt_length - 1 :])
    kwargs["input_ids"] = input_ids[:, prompt_length - 1 :]
    kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, prompt_length - 1 :]
    if kwargs.get("cache_position") is not None:
        kwargs["cache_position"] = kwargs["cache_position"][prompt_length - 1 :]
    return args, kwargs


def _appended_tokens(kwargs: dict[str, Any], input_length: int) -> int:
    """How many trailing tokens of a first forward are not prompt: `logits_to_keep = k > 1` (as assisted decoding
    asks for its candidates) means the last `k - 1` tokens are evaluated against the compressed prompt."""
    logits_to_keep = kwargs.get("logits_to_keep")
    if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep > 1:
        return min(logits_to_keep - 1, input_length - 1)
    return 0
