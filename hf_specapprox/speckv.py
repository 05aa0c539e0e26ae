"""SpecKV (arXiv 2506.08373 §2.1): the draft's answer preview votes, through the target's attention, for the prompt
KV pairs the target keeps."""

from __future__ import annotations

import torch

from .adapters import unwrap_adapters
from .cache import PromptCompressionCache
from .config import SpecKVConfig
from .draft import check_draft_compatible, check_lookahead_ids, generate_lookahead


class SpecKVCache(PromptCompressionCache):
    """A transformers `Cache` that compresses the prompt's KV pairs with SpecKV during the prefill.

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

    def __init__(
        self,
        draft=None,
        config: SpecKVConfig | None = None,
        model=None,
        lookahead_ids: torch.Tensor | None = None,
        lookahead_valid: torch.Tensor | None = None,
        **config_kwargs,
    ):
        if config is not None and config_kwargs:
            raise ValueError("Pass either `config` or individual knobs, not both.")
        if config is None:
            config = SpecKVConfig(**config_kwargs)
        elif not isinstance(config, SpecKVConfig):
            raise TypeError(f"`config` must be a SpecKVConfig, got {type(config).__name__}.")
        if draft is None and lookahead_ids is None:
            raise ValueError(
                "SpecKVCache needs a `draft` model (or precomputed `lookahead_ids`); use SnapKVCache for draft-free "
                "compression."
            )
        if lookahead_ids is not None and lookahead_ids.dim() != 2:
            raise ValueError(f"`lookahead_ids` must be (batch, n), got shape {tuple(lookahead_ids.shape)}.")
        self.draft = None if draft is None else unwrap_adapters(draft, role="draft")
        self.fixed_lookahead = None
        self._fixed_lookahead_prompt = None  # the prompt the fixed lookahead belongs to (the first one prefilled)
        if lookahead_ids is not None:
            valid = torch.ones_like(lookahead_ids, dtype=torch.bool) if lookahead_valid is None else lookahead_valid
            self.fixed_lookahead = (lookahead_ids, valid.bool())
        super().__init__(config, model=model)

    def _shared_models(self) -> list:
        return [] if self.draft is None else [self.draft]

    def _validate_model(self, model) -> None:
        if self.draft is not None:
            check_draft_compatible(self.draft, model)
        if self.fixed_lookahead is not None:
            check_lookahead_ids(model, self.fixed_lookahead[0])

    def _uses_fixed_lookahead(self, input_ids, attention_mask) -> bool:
        """Fixed `lookahead_ids` belong to one prompt: the first one this cache compresses. Another prompt uses the
        draft, or is refused when there is none."""
        if self.fixed_lookahead is None:
            return False
        prompt = input_ids.masked_fill(~attention_mask.bool(), -1)
        if self._fixed_lookahead_prompt is None:
            self._fixed_lookahead_prompt = prompt
            return True
        same = prompt.shape == self._fixed_lookahead_prompt.shape and torch.equal(
            prompt, self._fixed_lookahead_prompt.to(prompt.device)
        )
        if not same and self.draft is None:
            raise ValueError(
                "This SpecKVCache was given fixed `lookahead_ids` for one prompt and has no draft, so it cannot "
                "compress another prompt (the draft tokens would belong to the wrong prompt). Build a new cache for "
                "each prompt (`SpecKVPC` does), or give the cache a `draft=` to preview new prompts with."
            )
        return same

    def _validate_prompt(self, input_ids, attention_mask) -> None:
        if self._uses_fixed_lookahead(input_ids, attention_mask):
            ids, _ = self.fixed_lookahead
            if input_ids.shape[0] % ids.shape[0]:
                raise ValueError(
                    f"`lookahead_ids` has {ids.shape[0]} rows but the prompt batch has {input_ids.shape[0]}; give one "
                    "row per prompt."
                )

    def _max_lookahead_tokens(self) -> int:
        fixed = 0 if self.fixed_lookahead is None else self.fixed_lookahead[0].shape[1]
        return max(fixed, self.config.lookahead_tokens if self.draft is not None else 0)

    def _lookahead(self, model, input_ids, attention_mask):
        if self.fixed_lookahead is None or not self._uses_fixed_lookahead(input_ids, attention_mask):
            return generate_lookahead(self.draft, input_ids, attention_mask, self.config.lookahead_tokens,
                                      decoding=self.config.lookahead_decoding)
        ids, valid = self.fixed_lookahead
        repeats = input_ids.shape[0] // ids.shape[0]
        return ids.repeat_interleave(repeats, 0), valid.repeat_interleave(repeats, 0)

    def _window_start(self, prompt_length: int) -> int:
        return prompt_length - 1 - self.config.window_size

    def _query_start(self, prompt_length: int) -> int:
        return prompt_length - 1 - self.config.window_size
