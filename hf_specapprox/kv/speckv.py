"""SpecKV (arXiv 2506.08373 §2.1): the draft's answer preview votes, through the target's attention, for the prompt
KV pairs the target keeps."""

from __future__ import annotations

import torch

from .cache import KVCompressionCache
from ..config import SpecKVConfig, resolve_config
from .query_sources import DraftPreview
from .scorers import AttentionScorer


class SpecKVCache(KVCompressionCache):
    """A transformers `Cache` that compresses the prompt's KV pairs with SpecKV during the prefill: the composition of
    the draft's preview ([`DraftPreview`]), the window-attention scorer ([`AttentionScorer`], max reduction,
    max-pool 7) and the window policy.

    The draft greedily writes up to `lookahead_tokens` tokens after the prompt. The target then runs once over
    `prompt + lookahead`; in every full-attention layer the queries of the last `window_size + 1` prompt tokens and of
    the lookahead tokens score the earlier prompt keys (softmax over all keys, max over those queries and over the
    query heads of each KV head, max-pool of width `kernel_size`), and each KV head keeps its
    `max_capacity_prompt - window_size` best keys plus the last `window_size` prompt tokens before the final one.
    The lookahead's K/V are discarded; decoding continues with the original positions.

    Works with stock `generate` (greedy, sampling, beam search, batches with left padding, continuation calls) once the
    target is bound, either by passing `model=` here or by calling `hf_specapprox.bind(target)` once.

    Args:
        draft (`PreTrainedModel`):
            A small causal LM that shares the target's tokenizer. May be `None` when `lookahead_ids` are given.
        config ([`SpecKVConfig`], *optional*):
            All knobs at once. Individual knobs may be given as keyword arguments instead (not both).
        model (`PreTrainedModel`, *optional*):
            The target; if given, it is bound (see [`bind`]).
        lookahead_ids (`torch.LongTensor` of shape `(batch, n)`, *optional*):
            Draft tokens computed beforehand (SpecKV-PC reuses SpecPC's); the draft then does not run. Rows are
            repeated if `generate` expands the batch (beams, `num_return_sequences`).
        lookahead_valid (`torch.BoolTensor` of shape `(batch, n)`, *optional*):
            False for tokens after a row's EOS; defaults to all True.
        **config_kwargs:
            Fields of [`SpecKVConfig`]: `max_capacity_prompt`, `window_size`, `lookahead_tokens`, `kernel_size`,
            `pool_type`, `reduction_type`.

    Example:

    ```python
    >>> from hf_specapprox import SpecKVCache
    >>> cache = SpecKVCache(draft=draft, model=target, max_capacity_prompt=256, lookahead_tokens=32)
    >>> out = target.generate(**inputs, past_key_values=cache, max_new_tokens=32)
    ```
    """

    config_class = SpecKVConfig

    def __init__(
        self,
        draft=None,
        config: SpecKVConfig | None = None,
        model=None,
        lookahead_ids: torch.Tensor | None = None,
        lookahead_valid: torch.Tensor | None = None,
        **config_kwargs,
    ):
        config = resolve_config(SpecKVConfig, config, config_kwargs)
        preview = DraftPreview(draft, lookahead_ids=lookahead_ids, lookahead_valid=lookahead_valid)
        super().__init__(config, model=model, query_source=preview)

    @property
    def draft(self):
        """The draft model that writes the preview (`None` when the cache was given fixed `lookahead_ids` only)."""
        return self.query_source.draft

    @property
    def fixed_lookahead(self):
        """`(lookahead_ids, lookahead_valid)` given at construction, or `None`."""
        return self.query_source.fixed

    def build_scorer(self) -> AttentionScorer:
        """The window attention of the voting rows, reduced and pooled as the config says (max/max-pool 7)."""
        return AttentionScorer.from_config(self.config)
