"""Prompt-compression baselines through SpecPC's code path, so comparisons differ only in the selection."""

from __future__ import annotations

import torch

from .config import SpecPCConfig
from .scoring.select import chunk_keep_mask
from .specpc import SpecPCPreprocessor


class SpecPrefillPreprocessor(SpecPCPreprocessor):
    """SpecPrefill-style compression (Liu et al., 2025, as the SpecPC paper describes it): the draft's attention from
    the last prompt token only (a window of 1, unweighted, every layer) scores the tokens, and fixed chunks of
    `chunk_size` tokens are kept by mean score, best first, up to `max_capacity_prompt` tokens.

    Args:
        draft (`PreTrainedModel`): the draft.
        max_capacity_prompt (`int`, *optional*, defaults to 1024): tokens kept.
        chunk_size (`int`, *optional*, defaults to 32): tokens per chunk.
        tokenizer (*optional*): for [`SpecPCPreprocessor.compress_text`].
        **protect: `num_sink_tokens`, `protected_token_ids`, as in [`SpecPCConfig`].
    """

    def __init__(self, draft, max_capacity_prompt: int = 1024, chunk_size: int = 32, tokenizer=None, **protect):
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
        config = SpecPCConfig(max_capacity_prompt=max_capacity_prompt, window_size=1, weighted_query=False,
                              starting_layer_index=0, kernel_size=1, **protect)
        super().__init__(draft, config=config, tokenizer=tokenizer)
        self.chunk_size = chunk_size

    def _select(self, scores, valid, protected):
        return chunk_keep_mask(scores, valid, max_capacity_prompt=self.config.max_capacity_prompt,
                               chunk_size=self.chunk_size, protected=protected)


class _ControlPreprocessor(SpecPCPreprocessor):
    """A control without a draft: scores come from position (recency) or a seeded generator (random); selection,
    protection and output are SpecPC's."""

    _uses_draft = False

    def __init__(self, max_capacity_prompt: int, window_size: int, tokenizer=None, **protect):
        config = SpecPCConfig(max_capacity_prompt=max_capacity_prompt, window_size=window_size, kernel_size=1,
                              neighbor_tokens=1, starting_layer_index=0, **protect)
        super().__init__(None, config=config, tokenizer=tokenizer)

    def _token_scores(self, input_ids, attention_mask):
        empty = input_ids.new_zeros((input_ids.shape[0], 0))
        return self._control_scores(input_ids), empty, empty.bool()

    def _control_scores(self, input_ids):
        raise NotImplementedError


class RecencyPreprocessor(_ControlPreprocessor):
    """Keeps the last `max_capacity_prompt` tokens (plus protected ones): the "just truncate" control."""

    def __init__(self, max_capacity_prompt: int = 1024, tokenizer=None, **protect):
        super().__init__(max_capacity_prompt, window_size=1, tokenizer=tokenizer, **protect)

    def _control_scores(self, input_ids):
        return torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.float32).expand_as(input_ids)


class RandomPreprocessor(_ControlPreprocessor):
    """Keeps the last `window_size` tokens and a uniformly random choice of the others (seeded)."""

    def __init__(self, max_capacity_prompt: int = 1024, window_size: int = 64, seed: int = 0, tokenizer=None,
                 **protect):
        super().__init__(max_capacity_prompt, window_size=window_size, tokenizer=tokenizer, **protect)
        self.seed = seed

    def _control_scores(self, input_ids):
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
