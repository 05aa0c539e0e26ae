"""Draft-free baselines through the same cache machinery, so comparisons with SpecKV differ only in the method."""

from __future__ import annotations

from .cache import KVCompressionCache
from ..config import SnapKVConfig, StreamingLLMConfig
from .scorers import AttentionScorer, RecencyScorer


class SnapKVCache(KVCompressionCache):
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

    config_class = SnapKVConfig
    window_counts_last_token = True  # SnapKV's observation window ends with the last prompt token

    def __init__(self, config: SnapKVConfig | None = None, model=None, **config_kwargs):
        super().__init__(config, model=model, **config_kwargs)

    def build_scorer(self) -> AttentionScorer:
        return AttentionScorer.from_config(self.config)


class StreamingLLMCache(KVCompressionCache):
    """StreamingLLM (Xiao et al., 2023): keeps the first `num_sink_tokens` real tokens and the most recent ones.

    As kvpress's `StreamingLLMPress`: kept pairs keep their original positions (no key re-rotation to in-cache
    positions, which StreamingLLM's paper uses; kvpress notes the same).

    Args:
        config ([`StreamingLLMConfig`], *optional*): all knobs at once.
        model (`PreTrainedModel`, *optional*): the target to bind.
        **config_kwargs: fields of [`StreamingLLMConfig`].
    """

    config_class = StreamingLLMConfig

    def __init__(self, config: StreamingLLMConfig | None = None, model=None, **config_kwargs):
        super().__init__(config, model=model, **config_kwargs)

    def build_scorer(self) -> RecencyScorer:
        return RecencyScorer()  # the sinks are the policy's `num_sink_tokens`
