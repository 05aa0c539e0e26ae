"""Draft-free baselines through the same cache machinery, so comparisons with SpecKV differ only in the method."""

from __future__ import annotations

import torch

from .cache import PromptCompressionCache
from .config import SnapKVConfig, StreamingLLMConfig


def _resolve(config, config_cls, config_kwargs):
    if config is not None and config_kwargs:
        raise ValueError("Pass either `config` or individual knobs, not both.")
    if config is None:
        return config_cls(**config_kwargs)
    if not isinstance(config, config_cls):
        raise TypeError(f"`config` must be a {config_cls.__name__}, got {type(config).__name__}.")
    return config


class SnapKVCache(PromptCompressionCache):
    """SnapKV (Li et al., 2024; `snapkv/monkeypatch/snapkv_utils.py`): the last `window_size` prompt tokens score the
    earlier keys, no draft.

    Scores are the window's attention averaged over its queries and the query heads of each KV head (ranks as
    SnapKV's sum; the GQA group is reduced per KV head, as kvpress does, for SpecKV's memory), smoothed with a
    max-pool of width `kernel_size` (SnapKV's own experiments; `SnapKVConfig.kvpress()` gives kvpress's average
    pool); each KV head keeps its best `max_capacity_prompt - window_size + 1` earlier keys plus the window (the last
    prompt token is re-computed, as with SpecKV). Same binding and `generate` support as [`SpecKVCache`].

    Args:
        config ([`SnapKVConfig`], *optional*): all knobs at once.
        model (`PreTrainedModel`, *optional*): the target to bind.
        **config_kwargs: fields of [`SnapKVConfig`].
    """

    def __init__(self, config: SnapKVConfig | None = None, model=None, **config_kwargs):
        super().__init__(_resolve(config, SnapKVConfig, config_kwargs), model=model)

    def _window_start(self, prompt_length: int) -> int:
        return prompt_length - self.config.window_size

    def _query_start(self, prompt_length: int) -> int:
        return prompt_length - self.config.window_size


class StreamingLLMCache(PromptCompressionCache):
    """StreamingLLM (Xiao et al., 2023): keeps the first `num_sink_tokens` real tokens and the most recent ones.

    As kvpress's `StreamingLLMPress`: kept pairs keep their original positions (no key re-rotation to in-cache
    positions, which StreamingLLM's paper uses; kvpress notes the same).

    Args:
        config ([`StreamingLLMConfig`], *optional*): all knobs at once.
        model (`PreTrainedModel`, *optional*): the target to bind.
        **config_kwargs: fields of [`StreamingLLMConfig`].
    """

    def __init__(self, config: StreamingLLMConfig | None = None, model=None, **config_kwargs):
        super().__init__(_resolve(config, StreamingLLMConfig, config_kwargs), model=model)

    def _window_start(self, prompt_length: int) -> int:
        return prompt_length - 1  # no always-kept window: recency is part of the score

    def _query_start(self, prompt_length: int) -> int:
        return prompt_length - 1

    def _candidate_scores(self, query, key, *, scaling, query_offset, key_valid, query_valid, num_candidates):
        batch, num_kv_heads = key.shape[0], key.shape[1]
        valid = key_valid[:, :num_candidates]
        positions = torch.arange(num_candidates, device=key.device, dtype=torch.float32)
        # Rank of each real token from the start of its row: sinks are the first `num_sink_tokens` real tokens.
        rank_in_row = valid.long().cumsum(-1) - 1
        recency = positions / max(num_candidates, 1)  # in [0, 1): later is better
        scores = torch.where(rank_in_row < self.config.num_sink_tokens, torch.full_like(recency, 2.0), recency)
        return scores.expand(batch, -1)[:, None, :].expand(batch, num_kv_heads, num_candidates)
