"""The compressing prefill: the step that fills a compressing cache's layers from a whole prompt.

For a prompt of `L` tokens (left-padded) and a budget `C < L`:

1. the query source appends its tokens (SpecKV: the draft's greedy answer preview; SnapKV: nothing);
2. the model's backbone runs once over `prompt + appended tokens`; in every full-attention layer the queries of the
   voting rows score the candidate keys, and the layer keeps its `C - window` best candidates per KV head plus the
   window, right after computing its own attention (so at most one layer's full K/V exists at a time);
3. the appended tokens' and the last prompt token's K/V are never stored: the layers then hold `L - 1` logical
   positions, and the forward that follows (the one `generate` runs) computes the last prompt token at its original
   position against them.

Sliding-window layers store the first `L - 1` prompt tokens as `DynamicCache` would have.

With a retained context (see `hf_specapprox.kv.context`), the backbone runs only over the positions the context does
not hold (at least the voting rows); the context's full keys and values of the earlier positions take the place of
computing them again, which gives the same keys, values and scores.

[`compressing_prefill`] takes everything it needs as arguments and returns the filled layers: it never reads or writes
a cache object. Every refusal that can be decided before this work is in `hf_specapprox.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.utils import logging

from .. import compat
from ..kernels import sparse_attention
from ..modeling.capture import AttentionObserver, layer_index, observing
from .layers import CompressedKVLayer, build_layers
from .policies import SelectionPolicy
from .scorers import KVScorer, ScorerInputs

logger = logging.get_logger(__name__)


def uses_sparse_prefill(config, num_tokens: int) -> bool:
    """Whether a prefill forward over `num_tokens` (prompt + appended tokens) runs the sparse attention."""
    mode = getattr(config, "sparse_prefill", "off")
    return mode == "on" or (mode == "auto" and num_tokens > config.sparse_prefill_threshold)


def sparse_rows(config, token_valid: torch.Tensor) -> torch.Tensor:
    """`(batch,)` bool: the rows whose prefill goes sparse, each decided on its own tokens (prompt + appended, padding
    and tokens after an end of sequence left out), as the row alone would decide."""
    return torch.tensor([uses_sparse_prefill(config, int(count)) for count in token_valid.sum(-1)], dtype=torch.bool)


@dataclass
class PrefillResult:
    """What [`compressing_prefill`] made of a prompt.

    Args:
        layers (`list`): the cache layers, filled with the first `L - 1` positions (compressed where `L > C`); empty
            layers when the prompt fits the budget (an ordinary prefill of the whole prompt follows).
        compressed (`bool`): whether prompt positions were dropped.
        holds_prompt (`bool`): whether the layers hold the first `L - 1` positions (compressed, or all of them with
            `max_capacity_prompt=None`); otherwise they are empty and an ordinary prefill of the whole prompt follows.
        lookahead_ids (`torch.LongTensor` of shape `(batch, n)`, *optional*): the appended tokens.
        lookahead_valid (`torch.BoolTensor` of shape `(batch, n)`, *optional*): False after a row's end of sequence.
        prompt_keys (`list`, *optional*): per layer, the full `(keys, values)` of the prompt positions
            `[start, L - 1)` this forward computed, when asked for (`keep_prompt_from=start`): what a retained context
            grows by.
    """

    layers: list
    compressed: bool
    holds_prompt: bool = False
    lookahead_ids: torch.Tensor | None = None
    lookahead_valid: torch.Tensor | None = None
    prompt_keys: list | None = None


class _PrefillObserver(AttentionObserver):
    """One compressing prefill, seen from the attention layers: scores each full-attention layer from its voting rows,
    keeps its selection (dense), or scores it first and computes its attention under the vertical-slash mask (sparse).

    `query_start` is the sequence position of the forward's first row (0, or the retained context's positions).
    `sparse_rows` (`(batch,)` bool, or `None` for a dense prefill) marks the rows that go sparse; the others attend
    densely inside the same kernel call, as they would alone.
    """

    def __init__(self, layers, scorer: KVScorer, policy: SelectionPolicy, config, prompt_length: int,
                 token_valid: torch.Tensor, query_start: int, sparse_rows: torch.Tensor | None):
        self.layers = layers
        self.scorer = scorer
        self.policy = policy
        self.config = config
        self.prompt_length = prompt_length
        self.token_valid = token_valid  # (batch, prompt + appended)
        self.query_start = query_start
        self.sparse_rows = sparse_rows if sparse_rows is not None and bool(sparse_rows.any()) else None
        self.sparse = self.sparse_rows is not None
        self.window_start = policy.window_start(prompt_length)
        compressed = [index for index, layer in enumerate(layers) if isinstance(layer, CompressedKVLayer)]
        self.keeps_all = config.max_capacity_prompt is None
        if not self.keeps_all:
            self.num_selected = dict(zip(compressed, policy.candidate_counts(prompt_length, len(compressed))))
        self.pending: set[int] = set()
        self.done: set[int] = set()

    def _layer(self, module):
        layer_idx = layer_index(module)
        layer = self.layers[layer_idx]
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
        config = self.config
        columns = sparse_attention.vertical_columns(
            scores.float().masked_fill(~candidate_valid[:, None, :], float("-inf")), config.prefill_vertical_size
        )
        output = sparse_attention.vertical_slash_attention(
            query, key, value, columns, scaling=scaling, key_valid=self.token_valid.to(key.device),
            sparse_rows=self.sparse_rows.to(key.device), window_size=config.prefill_window_size,
            block_size=config.prefill_block_size,
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
            layer_idx=layer_idx, queries=query[:, :, start - self.query_start:, :], keys=key, values=value,
            scaling=scaling, query_offset=start, key_valid=valid, query_valid=valid[:, start:],
            num_candidates=start, module=module,
        ))
        return scores, valid[:, :start]

    def _keep(self, layer_idx, layer, key, value, scores, candidate_valid) -> None:
        stop = self.prompt_length - 1
        if self.keeps_all:  # the sparse prefill without eviction: every prompt position stays
            layer.load(key[..., :stop, :].contiguous(), value[..., :stop, :].contiguous(), stop, None, stop)
            self.done.add(layer_idx)
            return
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


class _ScoringForwardCache(Cache):
    """The cache the scoring forward runs with: it hands every layer the full keys and values of the sequence (the
    retained prefix, if any, then this forward's) and stores nothing itself. Sliding-window layers get the first
    `L - 1` positions, as `DynamicCache` would store them; compressed layers store what the observer keeps."""

    def __init__(self, layers, observer: _PrefillObserver, prefix=None, keep_prompt_from: int | None = None):
        super().__init__(layers=[])
        self.layers = layers  # what the model reads its layer kinds from (sliding or not)
        self.observer = observer
        self.prefix = prefix  # callable layer_idx -> (keys, values) of positions [0, query_start), or None
        self.prefix_length = observer.query_start
        self.keep_prompt_from = keep_prompt_from
        self.prompt_keys: dict[int, tuple] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.prefix is not None and self.prefix_length:
            prefix_keys, prefix_values = self.prefix(layer_idx, key_states.device)
            key_states = torch.cat([prefix_keys.to(key_states.dtype), key_states], dim=-2)
            value_states = torch.cat([prefix_values.to(value_states.dtype), value_states], dim=-2)
        stop = self.observer.prompt_length - 1
        if self.keep_prompt_from is not None:
            start = self.keep_prompt_from
            self.prompt_keys[layer_idx] = (key_states[..., start:stop, :].clone(), value_states[..., start:stop, :].clone())
        layer = self.layers[layer_idx]
        if isinstance(layer, CompressedKVLayer):
            self.observer.pending.add(layer_idx)  # stored by the observer, once scored
        else:
            layer.update(key_states[..., :stop, :], value_states[..., :stop, :], *args, **kwargs)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix_length

    def get_mask_sizes(self, query_length_or_cache_position, layer_idx: int = 0) -> tuple[int, int]:
        return self.prefix_length + compat.query_length_from_mask_arg(query_length_or_cache_position), 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False


@torch.no_grad()
def compressing_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, config, scorer: KVScorer,
                        policy: SelectionPolicy, query_source, context=None, keep_prompt_from: int | None = None
                        ) -> PrefillResult:
    """Fills fresh cache layers with the first `L - 1` positions of a prompt, compressed when `L > C`.

    Args:
        model (`PreTrainedModel`): the target.
        input_ids (`torch.LongTensor` of shape `(batch, L)`), attention_mask (`torch.Tensor` of shape `(batch, L)`):
            the prompt, left-padded, already checked (`hf_specapprox.checks`).
        config: the method's configuration (budget, sparse prefill knobs).
        scorer ([`KVScorer`]), policy ([`SelectionPolicy`]): how each layer's candidates are scored and kept.
        query_source ([`QuerySource`]): the tokens appended after the prompt.
        context ([`~hf_specapprox.kv.context.ContextPrefix`], *optional*): the retained context's keys and values of
            the first `context.length` positions of every row; the backbone then runs from there on.
        keep_prompt_from (`int`, *optional*): also return the full keys and values of the prompt positions from this
            one to `L - 1` (a retained context grows by them).

    Returns:
        [`PrefillResult`].
    """
    layers = build_layers(model.config)
    prompt_length = input_ids.shape[1]
    if config.max_capacity_prompt is None:
        # keep every position: worth a draft and a scoring forward only where the prefill can go sparse
        if context is not None or not uses_sparse_prefill(config, prompt_length + query_source.max_tokens(config)):
            return PrefillResult(layers, compressed=False)
    elif prompt_length <= config.max_capacity_prompt:
        return PrefillResult(layers, compressed=False)
    start = 0 if context is None else context.length
    if query_source.max_tokens(config):
        logger.info(f"draft preview: up to {query_source.max_tokens(config)} tokens after {prompt_length - start} "
                    "new prompt tokens")
    if context is not None:
        lookahead_ids, lookahead_valid = query_source.tokens_after_context(model, input_ids, attention_mask, config,
                                                                           context)
    else:
        lookahead_ids, lookahead_valid = query_source.tokens(model, input_ids, attention_mask, config)
    lookahead_ids = lookahead_ids.to(input_ids.device)
    lookahead_valid = lookahead_valid.to(attention_mask.device)
    token_valid = torch.cat([attention_mask.bool(), lookahead_valid.bool()], dim=1)
    position_ids = (token_valid.long().cumsum(-1) - 1).clamp(min=0)
    rows = None if context is not None else sparse_rows(config, token_valid)
    observer = _PrefillObserver(layers, scorer, policy, config, prompt_length, token_valid, start, rows)
    sparse = observer.sparse
    cache = _ScoringForwardCache(layers, observer, prefix=None if context is None else context.target_layer,
                                 keep_prompt_from=keep_prompt_from)
    backbone = model.base_model
    with observing(model, observer):
        backbone(
            input_ids=torch.cat([input_ids, lookahead_ids], dim=1)[:, start:],
            attention_mask=token_valid.to(attention_mask.dtype),
            position_ids=position_ids[:, start:],
            use_cache=True,
            **{compat.cache_kwarg_name(backbone): cache},
        )
    observer.check_complete()
    kept = "every" if config.max_capacity_prompt is None else config.max_capacity_prompt
    logger.info(f"target prefill: {token_valid.shape[1] - start} tokens scored{' (sparse)' if sparse else ''}; every "
                f"layer keeps {kept} of {prompt_length - 1} prompt positions per KV head")
    prompt_keys = None
    if keep_prompt_from is not None:
        prompt_keys = [cache.prompt_keys[index] for index in range(len(layers))]
    return PrefillResult(layers, config.max_capacity_prompt is not None, True, lookahead_ids, lookahead_valid,
                         prompt_keys)
