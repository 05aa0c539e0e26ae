"""The compressing prefill: what a bound model's forward does when it receives a fresh compressing cache.

For a prompt of `L` tokens (left-padded) and a budget `C < L`:

1. the cache's method appends its lookahead (SpecKV: the draft's greedy answer preview; SnapKV: nothing);
2. the model's backbone runs once over `prompt + lookahead`; in every full-attention layer the queries of the voting
   rows score the candidate keys, and the layer keeps its `C - window` best candidates per KV head plus the window,
   right after computing its own attention (so at most one layer's full K/V exists at a time);
3. the lookahead's and the last prompt token's K/V are never stored; the forward `generate` asked for then runs on
   the last prompt token alone, at its original position, against the compressed cache.

Sliding-window layers store the first `L - 1` prompt tokens as `DynamicCache` would have. When the first forward
asks for the logits of its last `k > 1` tokens (assisted decoding: prompt + the assistant's candidates), the prompt is
its first `L - k + 1` tokens and the rest run with the last prompt token, appended after the compressed prompt.
"""

from __future__ import annotations

from typing import Any

import torch

from . import compat
from .cache import CompressedKVLayer, PromptCompressionCache, build_layers
from .capture import SCORING_KWARG, scoring_attention
from .scoring import select_kept_positions


class PrefillState:
    """Per-forward state of one compressing prefill; reaches the attention functions through a forward kwarg."""

    def __init__(self, cache: PromptCompressionCache, prompt_length: int, token_valid: torch.Tensor):
        self.cache = cache
        self.prompt_length = prompt_length
        self.token_valid = token_valid  # (batch, prompt + lookahead)
        self.window_start = cache._window_start(prompt_length)
        self.query_start = cache._query_start(prompt_length)
        self.num_selected = cache.config.max_capacity_prompt - (prompt_length - 1 - self.window_start)
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

    def score_layer(self, module, query, key, value, scaling) -> None:
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise ValueError(f"{type(module).__name__} has no `layer_idx`; hf_specapprox cannot tell its layers apart.")
        layer = self.cache.layers[layer_idx]
        if not isinstance(layer, CompressedKVLayer):
            return
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        device = key.device
        valid = self.token_valid.to(device)
        scores = self.cache._candidate_scores(
            query[:, :, self.query_start :, :],
            key,
            scaling=scaling,
            query_offset=self.query_start,
            key_valid=valid,
            query_valid=valid[:, self.query_start :],
            num_candidates=self.window_start,
        )
        window = torch.arange(self.window_start, self.prompt_length - 1, device=device)
        positions = select_kept_positions(scores, valid[:, : self.window_start], self.num_selected, window)
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


def _normalise_inputs(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    kwargs = dict(kwargs)
    if args:
        if "input_ids" in kwargs:
            raise TypeError("`input_ids` given both positionally and as a keyword.")
        kwargs["input_ids"], args = args[0], tuple(args[1:])
    return args, kwargs


def _is_continuation(cache: PromptCompressionCache, kwargs: dict[str, Any]) -> bool:
    """Whether this forward's inputs continue the sequence the cache holds (as far as the forward can tell).

    `generate` slices the ids it feeds by the cache's length, so a forward never sees the ids that came before. What
    it does see must agree with the cache: batch size, mask length, the original prompt's padding, and positions.
    """
    input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    position_ids = kwargs.get("position_ids")
    seen = cache.get_seq_length()
    stored = cache.prompt_mask
    if input_ids is not None and stored is not None and input_ids.shape[0] != stored.shape[0]:
        return False
    if attention_mask is not None and attention_mask.dim() == 2 and input_ids is not None:
        if attention_mask.shape[1] != seen + input_ids.shape[1]:
            return False
        if stored is not None:  # the padding of the original prompt must still be there
            if not bool((attention_mask[:, : stored.shape[1]].to(stored.device).bool() == stored).all()):
                return False
    if position_ids is not None and position_ids.dim() == 2 and stored is not None:
        real_tokens_seen = seen - (~stored).sum(-1)
        if not bool((position_ids[:, 0].to(stored.device) == real_tokens_seen).all()):
            return False
    return True


def _holds_whole_prompt(kwargs: dict[str, Any]) -> bool:
    input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    position_ids = kwargs.get("position_ids")
    if input_ids is None:
        return False
    if attention_mask is not None:
        return attention_mask.dim() == 2 and attention_mask.shape[-1] == input_ids.shape[1]
    return position_ids is not None and bool((position_ids[..., 0] == 0).all())


def prepare_forward(cache: PromptCompressionCache, model, args: tuple, kwargs: dict[str, Any]):
    """Forward pre-hook body: returns the `(args, kwargs)` the forward must run with, or `None` to leave them."""
    if cache._prefill_state is not None:  # the scoring forward itself passes through a bound backbone
        return None
    args, kwargs = _normalise_inputs(args, kwargs)
    if cache.layers and cache.get_seq_length() > 0:
        if _is_continuation(cache, kwargs):
            return None
        if not _holds_whole_prompt(kwargs):
            raise ValueError(
                f"This {type(cache).__name__} already holds {cache.get_seq_length()} tokens of another prompt, and the "
                "new input is not their continuation. Pass a fresh cache for every new prompt (or call "
                "`cache.reset()`); `SpecKVTextGenerationPipeline` does this for you."
            )
        cache.reset()  # the whole new prompt is here: start over, as a fresh cache would
    return _compressing_prefill(cache, model, args, kwargs)


def _compressing_prefill(cache: PromptCompressionCache, model, args: tuple, kwargs: dict[str, Any]):
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        raise ValueError(
            f"{type(cache).__name__} needs the prompt's `input_ids` (the draft reads them); it cannot compress a "
            "prompt given only as `inputs_embeds`. Pass `input_ids` to `generate`."
        )
    batch, input_length = input_ids.shape
    # Assisted decoding's first forward is `prompt + candidates` and asks for the logits of the candidates too: only
    # the prompt is compressed; the candidates are evaluated against it and appended (so a rejection can crop them).
    appended = _appended_tokens(kwargs, input_length)
    prompt_length = input_length - appended
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.dim() != 2:
        raise ValueError(f"{type(cache).__name__} needs a 2-D padding mask, got a {attention_mask.dim()}-D mask.")
    if attention_mask.shape[1] != input_length:
        raise ValueError(
            f"The first forward into a fresh {type(cache).__name__} got {input_length} tokens but a mask of "
            f"{attention_mask.shape[1]}: a compressing cache must receive the whole prompt in its first forward. "
            "Pass a fresh cache and the full `input_ids`."
        )
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "The prompt batch is right-padded. Compressing caches need left padding: set "
            "`tokenizer.padding_side = 'left'` before tokenizing."
        )
    cache._validate_model(model)
    cache.layers = build_layers(model.config)
    full_mask = attention_mask
    input_ids, attention_mask = input_ids[:, :prompt_length], attention_mask[:, :prompt_length]
    cache.prompt_length = prompt_length
    cache.prompt_mask = attention_mask.bool()
    if prompt_length <= cache.config.max_capacity_prompt:
        return args, kwargs  # nothing to drop: an ordinary prefill

    try:
        lookahead_ids, lookahead_valid = cache._lookahead(model, input_ids, attention_mask)
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

    # The forward generate asked for now computes only the last prompt token (and any appended candidates), at their
    # original positions.
    kwargs["input_ids"] = kwargs["input_ids"][:, prompt_length - 1 :]
    kwargs["position_ids"] = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, prompt_length - 1 :]
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
